"""Run logging on process 0: metrics.jsonl, TensorBoard events, progress bar, the resolved config."""

from __future__ import annotations

import os
import sys
import time

import jax
from etils import epath
from tqdm.auto import tqdm

from jdjax.io import as_path, dumps, is_remote, write_text


def is_main_process() -> bool:
    return jax.process_index() == 0


def save_config(config, workdir: epath.PathLike) -> None:
    if is_main_process():
        write_text(as_path(workdir) / "config.json", config.to_json_best_effort(indent=2, sort_keys=True))


class MetricWriter:
    """Appends `{"step": s, name: value, ...}` lines to workdir/metrics.jsonl and TensorBoard events.

    Every line is strict JSON (`jdjax.io.dumps`): a NaN or infinite value is written as the string
    "nan", "inf" or "-inf" (`jdjax.io.loads` reads it back as a float); TensorBoard gets the float.

    A local metrics.jsonl is appended to and flushed line by line. A bucket cannot append to an
    object, so for a gs:// workdir the whole file (earlier runs' lines included) is uploaded again
    at most every REMOTE_UPLOAD_SECONDS and at close(). TensorBoard events go to gs:// through
    tensorboardX, which needs google-cloud-storage there.
    """

    REMOTE_UPLOAD_SECONDS = 30.0

    def __init__(self, workdir: epath.PathLike, tensorboard: bool = True):
        self.enabled = is_main_process()
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self._path = as_path(workdir) / "metrics.jsonl"
        if is_remote(self._path):
            self._lines = self._path.read_text().splitlines(keepends=True) if self._path.exists() else []
            self._uploaded = time.monotonic()
        else:
            self._jsonl = self._path.open("a")
        if tensorboard:
            self._tb = _summary_writer(as_path(workdir) / "tensorboard")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        line = dumps({"step": int(step), **clean}) + "\n"
        if self._jsonl is not None:
            self._jsonl.write(line)
            self._jsonl.flush()
        else:
            self._lines.append(line)
            if time.monotonic() - self._uploaded >= self.REMOTE_UPLOAD_SECONDS:
                self._upload()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, int(step))

    def _upload(self) -> None:
        write_text(self._path, "".join(self._lines))
        self._uploaded = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.close()
        else:
            self._upload()
        if self._tb is not None:
            self._tb.close()


def _summary_writer(logdir: epath.Path):
    """A tensorboardX SummaryWriter for a local or gs:// `logdir`."""
    from tensorboardX import SummaryWriter, record_writer

    if os.fspath(logdir).startswith("gs://") and not record_writer.GCS_ENABLED:
        raise ImportError(
            f"tensorboardX writes TensorBoard events to {logdir} with google-cloud-storage, which is not "
            "installed. Install it (gcsfs, which epath needs for gs:// anyway, brings it), or set "
            "--config.logging.tensorboard=False; metrics.jsonl is written either way."
        )
    return SummaryWriter(os.fspath(logdir))


def progress_bar(total: int, initial: int, desc: str):
    """A tqdm bar (step, loss, steps/s, ETA) on process 0; slow refresh when not on a terminal."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.2 if tty else 10.0,
        disable=not is_main_process() or os.environ.get("JDJAX_NO_PROGRESS") == "1",
    )


class Chrono:
    """Steps/s over log intervals; the first step (compilation) is timed apart."""

    def __init__(self):
        self.compile_seconds = None
        self._t = time.perf_counter()

    def first_step(self, outputs) -> float:
        """Blocks on the first step's outputs; returns the seconds since construction."""
        jax.block_until_ready(outputs)
        seconds = time.perf_counter() - self._t
        self.start()
        return seconds

    def start(self):
        self._t = time.perf_counter()

    def rate(self, steps: int) -> float:
        """Steps/s since the last start() or rate() call, for `steps` steps."""
        now = time.perf_counter()
        rate = steps / (now - self._t) if now > self._t else float("nan")
        self._t = now
        return rate
