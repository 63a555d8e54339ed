"""Converted checkpoints on disk: `dst/params/` (an orbax checkpoint of the bare parameter tree, no
{'params': ...} wrapper) and `dst/model.json` (the model class, its keyword arguments, the source
format and the dropped keys). Written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from jdjax.nn.convert.formats import convert
from jdjax.nn.convert.mapping import Converted
from jdjax.nn.convert.readers import ConversionError

MODEL_JSON = "model.json"
PARAMS_DIR = "params"


def save_converted(converted: Converted, dst: str, overwrite: bool = False, source: str | None = None) -> str:
    """Writes `dst/params` (orbax) and `dst/model.json`, atomically (temporary directory + rename)."""
    import orbax.checkpoint as ocp

    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise ConversionError(f"--dst={dst} already exists; choose a new directory or pass --overwrite.")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{dst}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        os.makedirs(tmp)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), converted.params)
        info = {**converted.info(), "source": source, "format_version": 1}
        with open(os.path.join(tmp, MODEL_JSON), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        if os.path.exists(dst):
            old = f"{dst}.old-{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_info(path: str) -> dict:
    """The model.json of a converted checkpoint directory."""
    file = os.path.join(path, MODEL_JSON)
    if not os.path.exists(file):
        raise ConversionError(
            f"{path} is not a converted checkpoint (no {MODEL_JSON}); create one with "
            "`python -m jdjax.tools.convert --format=... --src=... --dst=...`."
        )
    with open(file) as f:
        return json.load(f)


def load_params(path: str) -> dict:
    """The parameter tree (NumPy float32, no {'params': ...} wrapper) of a converted checkpoint.

    `path` is the directory written by the converter (or its `params/` orbax directory)."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    ckpt = os.path.join(path, PARAMS_DIR) if os.path.isdir(os.path.join(path, PARAMS_DIR)) else path
    if not os.path.isdir(ckpt):
        raise ConversionError(f"{path} does not exist or is not a converted checkpoint directory.")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(ckpt)
    except Exception as e:
        raise ConversionError(
            f"could not read the converted checkpoint at {ckpt}: {type(e).__name__}: {e}. Re-run the converter "
            "into a new --dst if the files are damaged."
        ) from e
    return jax.tree.map(lambda v: np.asarray(v, dtype=np.float32), restored)


def load_converted(path: str, format: str | None = None, **convert_kwargs) -> tuple[dict, dict]:
    """(params, model_kwargs) for a converted checkpoint directory: `ViT(**kwargs)` / `CLIP(**kwargs)`
    with `{'params': params}` reproduces the source model (read_info(path)['model'] says which).

    A raw source (file, or save_pretrained directory for hf_*) works too when `format` is given
    (a `.npz` file defaults to google_vit_npz): it is converted in memory
    (e.g. `config.init_from='imagenet21k_ViT-L_16.npz'`)."""
    if format or (os.path.isfile(path) and path.endswith(".npz")):
        c = convert(path, format or "google_vit_npz", **convert_kwargs)
        return c.params, dict(c.config)
    info = read_info(path)
    return load_params(path), dict(info["config"])

