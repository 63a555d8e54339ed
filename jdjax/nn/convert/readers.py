"""Checkpoint files -> flat {name: array} dicts: PyTorch (TorchScript or torch.save), NumPy .npz,
.safetensors and Hugging Face save_pretrained directories.

torch is imported only to read torch files (the `convert` extra); .npz and .safetensors need none.
Every failure raises `ConversionError` naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Mapping

import numpy as np

INSTALL_HINT = "pip install -e .[convert]"


class ConversionError(ValueError):
    """A checkpoint cannot be converted (or loaded); the message names the key, the shapes and the fix."""


def _import_torch(what: str):
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConversionError(
            f"reading {what} needs PyTorch, which is not installed; install the converter extras with "
            f"`{INSTALL_HINT}` (Google ViT .npz and .safetensors files need no torch)."
        ) from e
    return torch


def to_numpy(value) -> np.ndarray:
    """A torch tensor / NumPy array / scalar -> NumPy; floating types (fp16, bf16, fp64) -> float32."""
    if hasattr(value, "detach"):  # torch.Tensor
        t = value.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        arr = t.numpy()
    else:
        arr = np.asarray(value)
    if arr.dtype.name in ("bfloat16", "float16", "float64") or (arr.dtype.kind == "f" and arr.dtype != np.float32):
        arr = arr.astype(np.float32)
    return arr


def _unwrap_state_dict(obj, src: str) -> dict:
    """Finds the tensor dict inside a training checkpoint ({'state_dict': ...}, {'model': ...}) and
    strips a DataParallel 'module.' prefix."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
            for key in ("state_dict", "model", "module", "params"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(
            f"{src} does not hold a state dict (a mapping from names to tensors); got {type(obj).__name__}. "
            "Save the model's `state_dict()` with torch.save, or pass the right --format."
        )
    tensors = {k: v for k, v in obj.items() if hasattr(v, "shape")}
    if not tensors:
        raise ConversionError(f"{src} holds no tensors (keys: {sample_keys(obj)}); is it a checkpoint of a model?")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return dict(tensors)


def _is_torchscript(path: str) -> bool:
    """Whether `path` is a TorchScript archive (a zip with constants.pkl or code/), not a torch.save file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("constants.pkl") for n in names) or any("/code/" in n for n in names)


def read_torch(path: str, allow_pickle: bool = False) -> dict:
    """A TorchScript archive or a torch.save'd (state) dict -> {name: tensor}."""
    torch = _import_torch(f"the PyTorch file {path}")
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch.jit.load is deprecated, but OpenAI's archives need it
                warnings.simplefilter("ignore", DeprecationWarning)
                return dict(torch.jit.load(path, map_location="cpu").state_dict())
        except Exception as e:
            raise ConversionError(f"could not load the TorchScript archive {path}: {type(e).__name__}: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        hint = ""
        if zipfile.is_zipfile(path) and any(n.endswith(".npy") for n in zipfile.ZipFile(path).namelist()):
            hint = " It is a NumPy .npz archive: use --format=google_vit_npz."
        elif "weights_only" in str(e) or "Unsupported global" in str(e):
            hint = (" The file pickles Python objects besides tensors; if you trust it, pass --allow_pickle "
                    "(allow_pickle=True), or re-save just the state dict.")
        raise ConversionError(
            f"could not read {path} as a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:300]}).{hint}"
        ) from e
    return _unwrap_state_dict(obj, path)


def read_npz(path: str) -> dict:
    """A NumPy .npz archive (e.g. a Google ViT checkpoint) -> {name: array}."""
    hint = ("google_vit_npz expects the ViT .npz files of google-research/vision_transformer "
            "(e.g. imagenet21k_ViT-B_16.npz).")
    if not zipfile.is_zipfile(path):
        raise ConversionError(f"{path} is not a NumPy .npz archive (not a zip file); {hint}")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if not all(n.endswith(".npy") for n in names):
        torch_like = any(n.endswith("data.pkl") for n in names)
        raise ConversionError(
            f"{path} is a zip archive but not a NumPy .npz (entries {sample_keys(names, 3)})"
            + ("; it looks like a PyTorch checkpoint: use --format=openai_clip/open_clip/timm_vit/hf_vit/hf_clip."
               if torch_like else f"; {hint}")
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise ConversionError(
            f"could not read {path} as a NumPy .npz archive ({type(e).__name__}: {e}); google_vit_npz expects the "
            "ViT .npz files of google-research/vision_transformer (e.g. imagenet21k_ViT-B_16.npz)."
        ) from e


def read_safetensors(path: str) -> dict:
    """A .safetensors file -> {name: array} (no torch needed)."""
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover
        raise ConversionError(f"reading {path} needs the safetensors package: {INSTALL_HINT}") from e
    try:
        return load_file(path)
    except Exception as e:
        raise ConversionError(f"could not read {path} as a .safetensors file ({type(e).__name__}: {e}).") from e


def read_hf(path: str, allow_pickle: bool = False) -> tuple[dict, dict | None]:
    """A save_pretrained directory (config.json + model.safetensors / pytorch_model.bin, sharded or not)
    or a single weights file -> (state dict, config dict or None)."""
    if not os.path.isdir(path):
        return read_state_dict(path, allow_pickle), None
    config = None
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            config = json.load(f)
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", lambda p: read_torch(p, allow_pickle))):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            sd = {}
            for name in files:
                sd.update(reader(os.path.join(path, name)))
            return sd, config
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, name)):
            return read_state_dict(os.path.join(path, name), allow_pickle), config
    raise ConversionError(
        f"{path} is a directory without model.safetensors or pytorch_model.bin; pass a save_pretrained "
        "directory or a weights file."
    )


def read_state_dict(path: str, allow_pickle: bool = False) -> dict:
    """A weights file -> {name: array-like}, by content: .safetensors, .npz, or torch."""
    if not os.path.exists(path):
        raise ConversionError(f"--src={path} does not exist.")
    if os.path.isdir(path):
        raise ConversionError(
            f"--src={path} is a directory; pass a checkpoint file (directories only for hf_vit / hf_clip)."
        )
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith(".npz"):
        return read_npz(path)
    return read_torch(path, allow_pickle)


def sample_keys(keys, n: int = 6) -> str:
    """The first `n` keys quoted and comma-separated, plus the total count when there are more."""
    keys = list(keys)
    return ", ".join(repr(k) for k in keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


