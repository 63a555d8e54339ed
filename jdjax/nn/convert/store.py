"""Converted checkpoints on disk: `dst/params/` (an orbax checkpoint of the bare parameter tree, no
{'params': ...} wrapper), for models with BatchNorm (CLIP's ResNet towers) `dst/batch_stats/` (the
running statistics, same form), and `dst/model.json` (the model class, its keyword arguments, the
source format and the dropped keys). Written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jdjax import io
from jdjax.nn.convert.formats import convert
from jdjax.nn.convert.mapping import Converted
from jdjax.nn.convert.readers import ConversionError

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
BATCH_STATS_DIR = "batch_stats"


def _save_trees(converted: Converted, dst) -> None:
    """The orbax checkpoints of `converted`: dst/params and, if any, dst/batch_stats."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dst / PARAMS_DIR, converted.params)
        if converted.batch_stats:
            ckptr.save(dst / BATCH_STATS_DIR, converted.batch_stats)


def save_converted(converted: Converted, dst, overwrite: bool = False, source: str | None = None) -> str:
    """Writes `dst/params` (+ `dst/batch_stats`) (orbax) and `dst/model.json`; `dst` may be local or a gs:// URI.

    Locally the directory is written under a temporary name and renamed when complete; in a
    bucket (no directory rename) model.json is written last, so a directory without it is never
    taken for a checkpoint (`read_info` refuses it)."""
    dst = io.as_path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"--dst={dst} already exists; choose a new directory or pass --overwrite.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    info = {**converted.info(), "source": source, "format_version": 1}
    if io.is_remote(dst):
        if dst.exists():
            dst.rmtree()
        _save_trees(converted, dst)
        io.write_text(dst / MODEL_JSON, json.dumps(info, indent=2, sort_keys=True))
        return str(dst)
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.rmtree()
    try:
        tmp.mkdir()
        _save_trees(converted, tmp)
        io.write_text(tmp / MODEL_JSON, json.dumps(info, indent=2, sort_keys=True))
        if dst.exists():
            old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            old.rmtree()
        else:
            tmp.rename(dst)
    except BaseException:
        if tmp.exists():
            tmp.rmtree()
        raise
    return str(dst)


def read_info(path) -> dict:
    """The model.json of a converted checkpoint directory (local or gs://); JSON lists in its config
    (vision_layers of a ResNet CLIP, an (h, w) image_size) come back as the tuples the models take."""
    file = io.as_path(path) / MODEL_JSON
    if not file.exists():
        raise ConversionError(
            f"{path} is not a converted checkpoint (no {MODEL_JSON}); create one with "
            "`python -m jdjax.tools.convert --format=... --src=... --dst=...`."
        )
    info = io.read_json(file)
    info["config"] = {k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()}
    return info


def _restore(ckpt) -> dict:
    """An orbax tree as NumPy float32; unreadable files raise ConversionError."""
    import jax
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(ckpt)
    except Exception as e:
        raise ConversionError(
            f"could not read the converted checkpoint at {ckpt}: {type(e).__name__}: {e}. Re-run the converter "
            "into a new --dst if the files are damaged."
        ) from e
    return jax.tree.map(lambda v: np.asarray(v, dtype=np.float32), restored)


def load_params(path) -> dict:
    """The trees of a converted checkpoint (NumPy float32): the bare parameter tree (no {'params': ...}
    wrapper), or {'params': ..., 'batch_stats': ...} when it holds BatchNorm statistics (CLIP's ResNet
    towers): the variables of `model.apply` as they are.

    `path` is the directory written by the converter (or its `params/` orbax directory: the parameters only)."""
    path = io.as_path(path)
    ckpt = path / PARAMS_DIR if (path / PARAMS_DIR).is_dir() else path
    if not ckpt.is_dir():
        raise ConversionError(f"{path} does not exist or is not a converted checkpoint directory.")
    params = _restore(ckpt)
    if ckpt != path and (path / BATCH_STATS_DIR).is_dir():
        return {"params": params, "batch_stats": _restore(path / BATCH_STATS_DIR)}
    return params


def load_converted(path: str, format: str | None = None, **convert_kwargs) -> tuple[dict, dict]:
    """(trees, model_kwargs) for a converted checkpoint directory: `ViT(**kwargs)` / `CLIP(**kwargs)` with
    `{'params': trees}` (or `trees` itself when it is {'params': ..., 'batch_stats': ...}, see `load_params`)
    reproduces the source model (read_info(path)['model'] says which).

    A raw source (file, or save_pretrained directory for hf_*) works too when `format` is given
    (a `.npz` file defaults to google_vit_npz): it is converted in memory, same return form
    (e.g. `config.init_from='imagenet21k_ViT-L_16.npz'`)."""
    if format or (os.path.isfile(path) and path.endswith(".npz")):
        c = convert(path, format or "google_vit_npz", **convert_kwargs)
        return (c.variables() if c.batch_stats else c.params), dict(c.config)
    info = read_info(path)
    return load_params(path), dict(info["config"])
