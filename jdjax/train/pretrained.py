"""`config.init_from`: a pretrained backbone (a converted directory or a raw checkpoint) merged into
a freshly initialised parameter tree.

`merge_pretrained(fresh, params, exclude='^head/') -> (params, report)` puts the backbone into the
fresh tree (LoRA / PYRA / new-head leaves stay as they are; scanned `blocks` and other position
grids handled); `make_load_pretrained(path)` is a ready `Task.load_pretrained` (parameters and
BatchNorm statistics). Checkpoints are converted with `jdjax.nn.convert` (or its command-line tool).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping

import flax.linen as nn
import numpy as np
from absl import logging
from flax import traverse_util

from jdjax.nn.convert import ConversionError, load_converted
from jdjax.nn.convert.readers import sample_keys
from jdjax.nn.vit import interpolate_pos_embedding


@dataclasses.dataclass
class MergeReport:
    """What `merge_pretrained` did, by '/'-path of the fresh tree (unused: pretrained paths)."""

    loaded: list[str]
    resized: list[str]
    kept: list[str]
    excluded: list[str]
    unused: list[str]

    def summary(self) -> str:
        """One line: how many leaves were loaded, and the paths resized, kept, excluded and unused."""

        def short(names):
            return ", ".join(names[:6]) + (f", ... ({len(names)})" if len(names) > 6 else "")

        lines = [f"loaded {len(self.loaded)} pretrained parameters"]
        if self.resized:
            lines.append(f"resized position embeddings: {short(self.resized)}")
        if self.kept:
            lines.append(f"kept {len(self.kept)} freshly initialised: {short(self.kept)}")
        if self.excluded:
            lines.append(f"excluded (kept fresh) {len(self.excluded)}: {short(self.excluded)}")
        if self.unused:
            lines.append(f"unused pretrained {len(self.unused)}: {short(self.unused)}")
        return "; ".join(lines)


_POS_NAMES = re.compile(r"(^|/)(pos_embedding|positional_embedding)$")


def _stacked_blocks(flat: Mapping, path: str, length: int):
    """For a scanned fresh path '.../blocks/rest' [L, ...]: the pretrained '.../block{i}/rest' stacked, or None."""
    parts = path.split("/")
    if "blocks" not in parts:
        return None
    k = parts.index("blocks")
    names = ["/".join(parts[:k] + [f"block{i}"] + parts[k + 1 :]) for i in range(length)]
    if not all(n in flat for n in names):
        return None
    return np.stack([np.asarray(flat[n]) for n in names]), names


def merge_pretrained(
    fresh: Mapping,
    pretrained: Mapping,
    exclude: str | None = None,
    prefix: str = "",
    resize_pos: bool = True,
    strict: bool = False,
) -> tuple[dict, MergeReport]:
    """Replaces the leaves of a freshly initialised tree by the pretrained ones where both exist.

    Args:
      fresh: the new model's parameters (bare tree; boxed leaves keep their box and sharding names).
      pretrained: a converted tree (`load_params`); e.g. a ViT backbone.
      exclude: regex of fresh '/'-paths to keep fresh even if pretrained has them (e.g. '^head/'
        for a new classifier).
      prefix: where the pretrained tree sits in the fresh one (e.g. 'backbone/'); fresh paths outside
        it are kept.
      resize_pos: a position embedding of another grid is resampled (bicubic, as Hugging Face)
        instead of being an error.
      strict: pretrained parameters the fresh tree has no place for are an error (default: reported).

    Pretrained `block{i}/...` leaves fill a scanned model's stacked `blocks/...` leaves. Leaves only
    in `fresh` (LoRA, PYRA, a new head) stay as they are. A shape mismatch raises ConversionError
    naming the path and both shapes.

    Returns:
      (params, report): params has the structure of `fresh` (plain nested dicts) with each
      loaded leaf cast to the fresh leaf's dtype.
    """
    pre = traverse_util.flatten_dict(pretrained, sep="/")
    wrapped = set(fresh) == {"params"} and "params" not in pre and not any(k.startswith("params/") for k in pre)
    flat_fresh = traverse_util.flatten_dict(fresh["params"] if wrapped else fresh, sep="/")  # boxes stay leaves
    rx = re.compile(exclude) if exclude else None
    out, used, mismatched = {}, set(), []
    report = MergeReport([], [], [], [], [])
    for path, leaf in flat_fresh.items():
        boxed = isinstance(leaf, nn.meta.AxisMetadata)
        value = leaf.unbox() if boxed else leaf
        if not path.startswith(prefix):
            out[path] = leaf
            report.kept.append(path)
            continue
        q = path[len(prefix):]
        names = [q]
        new = pre.get(q)
        if new is None:
            stacked = _stacked_blocks(pre, q, value.shape[0]) if value.ndim else None
            if stacked is not None:
                new, names = stacked
        if new is None:
            out[path] = leaf
            report.kept.append(path)
            continue
        if rx and rx.search(path):
            out[path] = leaf
            report.excluded.append(path)
            used.update(names)
            continue
        new = np.asarray(new)
        if tuple(new.shape) != tuple(value.shape):
            if resize_pos and _POS_NAMES.search(q) and new.ndim == value.ndim and new.shape[-1] == value.shape[-1]:
                new = _resize_pos(new, value.shape, path)
                report.resized.append(path)
            else:
                mismatched.append(f"pretrained {q!r} has shape {tuple(new.shape)} but the model's {path!r} has shape "
                                  f"{tuple(value.shape)}")
                continue
        cast = np.asarray(new).astype(np.asarray(value).dtype) if hasattr(value, "dtype") else new
        out[path] = leaf.replace_boxed(cast) if boxed else cast
        report.loaded.append(path)
        used.update(names)
    if mismatched:
        raise ConversionError(
            "; ".join(mismatched) + ". If those parts are meant to be new (e.g. a classifier for other classes), "
            "pass exclude= (a regex such as '^head/'); otherwise fix the model config to match the checkpoint."
        )
    report.unused = sorted(set(pre) - used)
    if not report.loaded and pre:
        raise ConversionError(
            f"no pretrained parameter matched the model (pretrained paths like {sample_keys(sorted(pre), 3)}; model "
            f"paths like {sample_keys(sorted(flat_fresh), 3)}); check the model type and prefix={prefix!r}."
        )
    if strict and report.unused:
        raise ConversionError(f"pretrained parameters without a place in the model: {report.unused}.")
    merged = traverse_util.unflatten_dict(out, sep="/")
    return ({"params": merged} if wrapped else merged), report


def _resize_pos(pos: np.ndarray, shape: tuple, path: str) -> np.ndarray:
    """A [1, 1 + n, C] position embedding resampled to `shape` (1 class token + a square grid)."""
    n_new = shape[-2] - 1
    side = math.isqrt(n_new)
    if side * side != n_new:
        raise ConversionError(
            f"cannot resize {path!r} from {pos.shape} to {tuple(shape)}: the target grid is not square."
        )
    try:
        return np.asarray(interpolate_pos_embedding(np.asarray(pos, np.float32), side))
    except ValueError as e:
        raise ConversionError(f"cannot resize {path!r} from {pos.shape} to {tuple(shape)}: {e}") from e


MODEL_STATE_COLLECTIONS = ("batch_stats",)  # non-param collections a bare converted tree may hold at its top level


def pretrained_collections(tree: Mapping) -> dict:
    """A converted tree as {collection: tree}: {'params': ..., 'batch_stats': ...} stays as it is; a bare
    parameter tree, possibly with a top-level 'batch_stats' (nested or '/'-joined keys) beside the
    parameters, becomes {'params': the rest, 'batch_stats': ...}."""
    if "params" in tree:
        return dict(tree)
    state = {k: tree[k] for k in MODEL_STATE_COLLECTIONS if k in tree}
    return {"params": {k: v for k, v in tree.items() if k not in state}, **state}


def make_load_pretrained(path: str, exclude: str | None = r"^head/", prefix: str = "", log: Callable | None = None,
                         format: str | None = None, **merge_kwargs) -> Callable:
    """A `Task.load_pretrained` for `config.init_from`: variables -> variables ({'params': ..., **model_state})
    with every collection of the converted checkpoint at `path` (parameters, BatchNorm 'batch_stats')
    merged into the model's collection of that name (the head stays fresh by default; `exclude` and
    `prefix` apply to every collection). The report goes to `log` (absl logging). `path` is a converted
    directory, or a raw source with `format` (a `.npz` needs none)."""
    pretrained, _ = load_converted(path, format)
    pretrained = pretrained_collections(pretrained)

    def load(variables):
        merged, lines = dict(variables), []
        for name, tree in pretrained.items():
            if name not in variables:
                unused = len(traverse_util.flatten_dict(tree))
                lines.append(f"{name}: not in the model, {unused} pretrained leaves unused")
                continue
            merged[name], report = merge_pretrained(variables[name], tree, exclude=exclude, prefix=prefix,
                                                    **merge_kwargs)
            lines.append(report.summary() if name == "params" else f"{name}: {report.summary()}")
        message = f"init_from {path}: " + "; ".join(lines)
        if log is None:
            logging.info("%s", message)
        else:
            log(message)
        return merged

    return load
