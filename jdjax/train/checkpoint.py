"""Checkpoints with orbax: the last K (for resuming) and the best by a validation metric.

Layout in the workdir:
  ckpt/<step>/{state,meta}   periodic, keep-last-K; `meta` holds the data-iterator state and the
                             best validation value so far, so a rerun resumes exactly.
  best/<step>/{state,meta}   the single best state by `checkpoint.best_metric` (a validation
                             metric, never a test one); `meta` names the weights that won
                             ('raw', or 'ema' for the moving average the state carries).
Orbax writes each step to a temporary directory and renames it when complete, so a crash
never leaves a half-written checkpoint that would be restored. The workdir is a local directory
or gs://bucket/... (the two places orbax writes arrays to).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jdjax.io import as_path, is_remote


class Checkpointer:
    def __init__(self, workdir: epath.PathLike, keep: int, best_metric: str, best_mode: str, async_save: bool = True):
        if best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}.")
        workdir = as_path(workdir)
        if is_remote(workdir) and not os.fspath(workdir).startswith("gs://"):
            raise CheckpointError(
                f"orbax cannot write checkpoints to {workdir}: use a local directory (a mounted bucket "
                "counts) or gs://bucket/... as --workdir."
            )
        self.best_metric = best_metric
        self.best_mode = best_mode
        opts = dict(create=True, enable_async_checkpointing=async_save)
        self.last = ocp.CheckpointManager(workdir / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts))
        self.best = ocp.CheckpointManager(workdir / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, **opts))
        self.best_value = None
        self.best_step = None
        self.best_weights = "raw"

    def latest_step(self) -> int | None:
        return self.last.latest_step()

    def _meta(self, data_state) -> dict:
        return {"data": data_state, "best_value": self.best_value, "best_step": self.best_step,
                "best_weights": self.best_weights}

    def save(self, step: int, state, data_state) -> None:
        """Saves (state, data-iterator state) as step `step` of the keep-last-K series."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self._meta(data_state)))
        self.last.save(step, args=args, force=True)

    def _value(self, metrics: dict) -> float:
        if self.best_metric not in metrics:
            raise KeyError(
                f"checkpoint.best_metric={self.best_metric!r} is not among the eval metrics {sorted(metrics)}."
            )
        return float(metrics[self.best_metric])

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.best_mode == "max" else value < than

    def best_of(self, candidates: dict[str, dict]) -> str:
        """The name of the candidate weights (name -> their validation metrics, e.g. {'raw': ..., 'ema': ...})
        that score best on `best_metric`; the first one wins ties."""
        names = list(candidates)
        best = names[0]
        for name in names[1:]:
            if self._better(self._value(candidates[name]), self._value(candidates[best])):
                best = name
        return best

    def improves(self, metrics: dict) -> bool:
        value = self._value(metrics)
        return self.best_value is None or self._better(value, self.best_value)

    def save_best(self, step: int, state, metrics: dict, weights: str = "raw") -> None:
        """Call after `improves(metrics)` returned True; `weights` names the weights of `state` that scored
        `metrics` ('raw' or 'ema')."""
        self.best_value, self.best_step, self.best_weights = float(metrics[self.best_metric]), int(step), weights
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self._meta(None)))
        self.best.save(step, args=args, force=True)

    def restore(self, abstract_state, best: bool = False):
        """Restores (state, data_state) from the latest (or best) checkpoint; None if there is none.

        `abstract_state` holds jax.ShapeDtypeStruct leaves with shardings, so arrays are read
        straight into their target layout. The latest checkpoint brings back the best value, step and
        weights seen so far; the best one sets `best_weights` to the weights it was selected with.
        """
        mngr = self.best if best else self.last
        step = mngr.latest_step()
        if step is None:
            return None
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        try:
            restored = mngr.restore(step, args=args)
        except Exception as e:  # orbax raises several types for unreadable or mismatched trees
            raise CheckpointError(
                f"could not restore the checkpoint at {mngr.directory}/{step}: {e}. If the model or "
                "optimizer changed since it was written, use a new --workdir; if the files are damaged, "
                "delete that step's directory to fall back to the previous one."
            ) from e
        meta = restored.meta
        if not best:
            self.best_value, self.best_step = meta["best_value"], meta["best_step"]
        self.best_weights = meta["best_weights"]
        return restored.state, meta["data"]

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.last.close()
        self.best.close()


class CheckpointError(RuntimeError):
    """A checkpoint could not be read into the current model, or cannot be written to the workdir."""


def abstract_with_shardings(tree, shardings):
    """jax.ShapeDtypeStruct leaves carrying the target shardings, for restoring."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def saved_steps(workdir: epath.PathLike, kind: str = "ckpt") -> list[int]:
    """Steps saved under workdir/<kind> ('ckpt': keep-last-K series, 'best': the val-selected one)."""
    d = as_path(workdir) / kind
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def read_state(workdir: epath.PathLike, step: int | None = None, kind: str = "ckpt") -> dict:
    """The saved train state at `step` (default: latest) as nested dicts of NumPy arrays, on the host,
    without building the model (e.g. `read_state(workdir, kind='best')['params']`)."""
    if step is None:
        steps = saved_steps(workdir, kind)
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {as_path(workdir) / kind}: train there first, or pass another workdir.")
        step = steps[-1]
    path = as_path(workdir) / kind / str(step) / "state"
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(path, restore_args=restore_args)
