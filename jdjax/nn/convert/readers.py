"""Checkpoint files -> flat {name: array} dicts: PyTorch (TorchScript or torch.save), NumPy .npz,
.safetensors and Hugging Face save_pretrained directories.

torch is imported only to read torch files (the `convert` extra); .npz and .safetensors need none.
Every failure raises `ConversionError` naming the file and the fix. An empty file, a zip archive
(torch.save, TorchScript, .npz) without its end record and a .safetensors file shorter than its
header says are reported as truncated before any reader runs.
"""

from __future__ import annotations

import json
import os
import struct
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


def _reason(e: BaseException) -> str:
    """'Type: first line of the message' (torch raises EOFError and others with an empty message)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


_REFETCH = "the download or copy did not finish; fetch the file again"


def _truncated(path: str, detail: str) -> ConversionError:
    return ConversionError(f"{path} is truncated ({detail}): {_REFETCH}.")


def check_complete(path: str) -> None:
    """Raises ConversionError when `path` is visibly cut short: empty, a zip archive (torch.save,
    TorchScript, .npz) whose central directory at the end is missing, or a .safetensors file shorter
    than its header says. Other damage is left to the readers."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise ConversionError(f"{path} is empty (0 bytes): {_REFETCH}.")
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
                raise _truncated(path, f"a zip archive (torch.save, TorchScript or .npz) of {size:,} bytes without "
                                 "the end record every complete one has")
            if not path.endswith(".safetensors"):
                return
            if len(head) < 8:
                raise _truncated(path, f"{size} bytes, fewer than the 8 of the .safetensors header length")
            (n,) = struct.unpack("<Q", head)
            header = f.read(min(n, 100_000_000))
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {_reason(e)}.") from e
    if len(header) < n:
        raise _truncated(path, f"{size:,} bytes, but its .safetensors header alone needs {8 + n:,}")
    try:
        meta = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return  # not a readable header: safetensors' own error says so
    if size < 8 + n + end:
        raise _truncated(path, f"{size:,} of the {8 + n + end:,} bytes its .safetensors header describes")


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
    check_complete(path)
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch.jit.load is deprecated, but OpenAI's archives need it
                warnings.simplefilter("ignore", DeprecationWarning)
                return dict(torch.jit.load(path, map_location="cpu").state_dict())
        except Exception as e:
            raise ConversionError(f"could not load the TorchScript archive {path} ({_reason(e)}).") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        hint = ""
        if isinstance(e, EOFError) or "EOF" in str(e):
            hint = f" The file ends early: {_REFETCH}."
        elif zipfile.is_zipfile(path) and any(n.endswith(".npy") for n in zipfile.ZipFile(path).namelist()):
            hint = " It is a NumPy .npz archive: use --format=google_vit_npz."
        elif "weights_only" in str(e) or "Unsupported global" in str(e):
            hint = (" The file pickles Python objects besides tensors; if you trust it, pass --allow_pickle "
                    "(allow_pickle=True), or re-save just the state dict.")
        raise ConversionError(
            f"could not read {path} as a PyTorch checkpoint ({_reason(e)}).{hint}"
        ) from e
    return _unwrap_state_dict(obj, path)


def read_npz(path: str) -> dict:
    """A NumPy .npz archive (e.g. a Google ViT checkpoint) -> {name: array}."""
    hint = ("google_vit_npz expects the ViT .npz files of google-research/vision_transformer "
            "(e.g. imagenet21k_ViT-B_16.npz).")
    check_complete(path)
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
            f"could not read {path} as a NumPy .npz archive ({_reason(e)}); the file is damaged (fetch it again) "
            "or not a NumPy .npz archive."
        ) from e


def read_safetensors(path: str) -> dict:
    """A .safetensors file -> {name: array} (no torch needed)."""
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover
        raise ConversionError(f"reading {path} needs the safetensors package: {INSTALL_HINT}") from e
    check_complete(path)
    try:
        return load_file(path)
    except Exception as e:
        raise ConversionError(f"could not read {path} as a .safetensors file ({_reason(e)}); the file is damaged "
                              "or not a .safetensors file: fetch it again.") from e


def read_hf(path: str, allow_pickle: bool = False) -> tuple[dict, dict | None]:
    """A save_pretrained directory (config.json + model.safetensors / pytorch_model.bin, sharded or not)
    or a single weights file -> (state dict, config dict or None)."""
    if not os.path.isdir(path):
        return read_state_dict(path, allow_pickle), None
    config = None
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):
        config = _read_json(cfg_path)
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", lambda p: read_torch(p, allow_pickle))):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, Mapping) or not weight_map:
                raise ConversionError(f"{index} has no 'weight_map' of tensor names to shard files; the "
                                      "save_pretrained directory is incomplete: save or fetch it again.")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.isfile(os.path.join(path, name)):
                    raise ConversionError(f"{index} lists the shard {name!r}, which is not in {path}; the "
                                          "save_pretrained directory is incomplete: save or fetch it again.")
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


def _read_json(path: str) -> dict:
    """A JSON object file of a save_pretrained directory; a damaged one names the file, line and fix."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); is the file truncated? Save or fetch "
                              "the directory again.") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read {path} ({_reason(e)}).") from e
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a JSON {type(obj).__name__}, not an object; save or fetch it again.")
    return obj


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


