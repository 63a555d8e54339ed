"""Run logging on process 0: metrics.jsonl, TensorBoard events, progress bar, the resolved config."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
from tqdm.auto import tqdm


def is_main_process() -> bool:
    return jax.process_index() == 0


def save_config(config, workdir: str) -> None:
    if is_main_process():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


class MetricWriter:
    """Appends `{"step": s, name: value, ...}` lines to workdir/metrics.jsonl and TensorBoard events."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.enabled = is_main_process()
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **{k: v if math.isfinite(v) else str(v) for k, v in clean.items()}}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


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
