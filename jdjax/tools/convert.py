"""Checkpoint converters: OpenAI CLIP, open_clip, timm ViT, Google ViT npz, Hugging Face ViT / CLIP -> jdjax.

Every converter reads a source state dict, infers the architecture from its shapes (plus a model
name or explicit dims where shapes cannot tell, e.g. the head count), maps every tensor onto the
parameter tree of `jdjax.nn.vit.ViT` or `jdjax.nn.clip.CLIP` and checks the result against that
model's `init` shapes. A missing key, an unexpected key, a shape that does not fit the chosen model
or an unreadable file raises `ConversionError` naming the key and both shapes. All floating tensors
become float32 (OpenAI's fp16 archives included).

Command line (absl flags; errors exit with status 2 and one message):

    python -m jdjax.tools.convert --format=google_vit_npz --src=imagenet21k_ViT-B_16.npz --dst=ckpt/vit_b16
    python -m jdjax.tools.convert --format=openai_clip --src=ViT-B-32.pt --dst=ckpt/clip_b32 [--model=ViT-B/32]

Formats and the layouts they read (C width, H heads, Dh = C / H, P patch):

  openai_clip     TorchScript archive (`torch.jit.load(...).state_dict()`) or a plain state dict.
                  visual.conv1.weight [C, 3, P, P]; visual.transformer.resblocks.{i}.attn.in_proj_weight
                  [3C, C] (rows q; k; v, each (H, Dh)); mlp.c_fc / c_proj; ln_1 / ln_2; text
                  transformer.resblocks.{i}; visual.proj / text_projection used as x @ proj.
                  `input_resolution`, `context_length`, `vocab_size` are dropped. QuickGELU, eps 1e-5.
  open_clip       the same names (optionally under {'state_dict': ...} with a 'module.' prefix from DDP);
                  the text `attn_mask` buffer is dropped; a Linear `text_projection.weight` is accepted.
                  Activation: exact GELU (open_clip's default) unless the model name ends in
                  '-quickgelu' or --activation says otherwise.
  timm_vit        patch_embed.proj, cls_token, pos_embed, blocks.{i}.{norm1, attn.qkv [3C, C], attn.proj,
                  norm2, mlp.fc1, mlp.fc2}, norm, head (optional); old in21k `pre_logits.fc` is dropped.
  google_vit_npz  the google-research/vision_transformer npz (NumPy only, no torch): embedding/kernel
                  HWIO, cls, Transformer/posembed_input/pos_embedding, Transformer/encoderblock_{i}/
                  {LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value} [C, H, Dh], out [H, Dh, C],
                  LayerNorm_2, MlpBlock_3/Dense_{0,1}}, Transformer/encoder_norm, head; `pre_logits` dropped.
  hf_vit          transformers ViTModel / ViTForImageClassification (4.x and 5.x key names); a state
                  dict file, a .safetensors file, or a save_pretrained directory (config.json is read).
                  ViTModel's `pooler` (the in21k pre-logits) is dropped.
  hf_clip         transformers CLIPModel, same sources as hf_vit.

Output of the CLI / `save_converted`: a directory `dst/` with `params/` (an orbax checkpoint of
the bare parameter tree, no {'params': ...} wrapper) and `model.json` (the model class, its
keyword arguments, the source format and the dropped keys). The directory is written under a
temporary name and renamed when complete.

Python API: `convert(src, format, model=None, **dims) -> Converted` (or `from_<format>(state_dict)`),
`save_converted(converted, dst)`, `load_params(dst)`, `read_info(dst)`, `load_converted(dst) ->
(params, model_kwargs)`, `merge_pretrained(fresh, params, exclude='^head/') -> (params, report)`
(puts the backbone into a freshly initialised tree; LoRA / PYRA / new-head leaves stay as they are;
scanned `blocks` and other position grids handled), and `make_load_pretrained(path)`, a ready
`Task.load_pretrained` for `config.init_from`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np

FORMATS = ("openai_clip", "open_clip", "timm_vit", "google_vit_npz", "hf_vit", "hf_clip")
MODEL_JSON = "model.json"
PARAMS_DIR = "params"
EXIT_USAGE = 2
_INSTALL_HINT = "pip install -e .[convert]"


class ConversionError(ValueError):
    """A checkpoint cannot be converted (or loaded); the message names the key, the shapes and the fix."""


@dataclasses.dataclass
class Converted:
    """The result of a conversion.

    Attributes:
      params: the jdjax parameter tree (nested dicts of float32 NumPy arrays), without the
        {'params': ...} wrapper; use `{'params': params}` with `model.apply`.
      model: 'ViT' or 'CLIP' (the jdjax class the tree belongs to).
      config: keyword arguments of that class (`build_model()` makes the module).
      source_format: one of FORMATS.
      dropped: source keys ignored on purpose (buffers, pre-logits, pooler, ...).
      notes: how ambiguous settings were decided (e.g. the head count from the width table).
    """

    params: dict
    model: str
    config: dict
    source_format: str
    dropped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def build_model(self, **overrides):
        return build_model(self.model, {**self.config, **overrides})

    def info(self) -> dict:
        return {"model": self.model, "config": self.config, "source_format": self.source_format,
                "dropped": list(self.dropped), "notes": list(self.notes)}


def build_model(model: str, kwargs: Mapping):
    """'ViT' / 'CLIP' and keyword arguments -> the flax module."""
    if model == "ViT":
        from jdjax.nn.vit import ViT

        return ViT(**kwargs)
    if model == "CLIP":
        from jdjax.nn.clip import CLIP

        return CLIP(**kwargs)
    raise ConversionError(f"unknown jdjax model {model!r}; expected 'ViT' or 'CLIP'.")


# ----------------------------------------------------------------------------- flat trees


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """Nested dicts -> {'a/b/c': leaf}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping) -> dict:
    """{'a/b/c': leaf} -> nested dicts."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


# ----------------------------------------------------------------------------- tensors and files


def _import_torch(what: str):
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConversionError(
            f"reading {what} needs PyTorch, which is not installed; install the converter extras with "
            f"`{_INSTALL_HINT}` (Google ViT .npz and .safetensors files need no torch)."
        ) from e
    return torch


def _to_numpy(value) -> np.ndarray:
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
        raise ConversionError(f"{src} holds no tensors (keys: {_sample(obj)}); is it a checkpoint of a model?")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return dict(tensors)


def _is_torchscript(path: str) -> bool:
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
    hint = ("google_vit_npz expects the ViT .npz files of google-research/vision_transformer "
            "(e.g. imagenet21k_ViT-B_16.npz).")
    if not zipfile.is_zipfile(path):
        raise ConversionError(f"{path} is not a NumPy .npz archive (not a zip file); {hint}")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if not all(n.endswith(".npy") for n in names):
        torch_like = any(n.endswith("data.pkl") for n in names)
        raise ConversionError(
            f"{path} is a zip archive but not a NumPy .npz (entries {_sample(names, 3)})"
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
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover
        raise ConversionError(f"reading {path} needs the safetensors package: {_INSTALL_HINT}") from e
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


def _sample(keys, n: int = 6) -> str:
    keys = list(keys)
    return ", ".join(repr(k) for k in keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


# ----------------------------------------------------------------------------- mapping kinds
#
# Each jdjax parameter is produced from one or more source tensors by a `kind`. For a jdjax shape
# j, `_SRC_SHAPE[kind](j)` is the shape each source tensor must have, and `_APPLY[kind]` builds the
# parameter from the source arrays.

_SRC_SHAPE: dict[str, Callable[[tuple], tuple]] = {
    "copy": lambda j: j,
    "linear": lambda j: (j[1], j[0]),  # torch Linear weight [out, in] -> kernel [in, out]
    "conv": lambda j: (j[3], j[2], j[0], j[1]),  # OIHW -> HWIO
    "in_proj": lambda j: (j[1] * j[2] * j[3], j[0]),  # [3C, C] -> [C, 3, H, Dh]
    "in_proj_bias": lambda j: (j[0] * j[1] * j[2],),  # [3C] -> [3, H, Dh]
    "out_proj": lambda j: (j[2], j[0] * j[1]),  # [C, C] -> [H, Dh, C]
    "split_qkv": lambda j: (j[2] * j[3], j[0]),  # q/k/v Linear [C, C] each -> [C, 3, H, Dh]
    "split_qkv_bias": lambda j: (j[1] * j[2],),  # [C] each -> [3, H, Dh]
    "npz_qkv": lambda j: (j[0], j[2], j[3]),  # [C, H, Dh] each -> [C, 3, H, Dh]
    "npz_qkv_bias": lambda j: (j[1], j[2]),  # [H, Dh] each -> [3, H, Dh]
}

_APPLY: dict[str, Callable[[list, tuple], np.ndarray]] = {
    "copy": lambda a, j: a[0],
    "linear": lambda a, j: a[0].T,
    "conv": lambda a, j: a[0].transpose(2, 3, 1, 0),
    "in_proj": lambda a, j: a[0].T.reshape(j),
    "in_proj_bias": lambda a, j: a[0].reshape(j),
    "out_proj": lambda a, j: a[0].T.reshape(j),
    "split_qkv": lambda a, j: np.stack([x.T for x in a], axis=1).reshape(j),
    "split_qkv_bias": lambda a, j: np.stack(a).reshape(j),
    "npz_qkv": lambda a, j: np.stack(a, axis=1),
    "npz_qkv_bias": lambda a, j: np.stack(a, axis=0),
}


class _Source:
    """The source tensors, with the keys used so far (to report unexpected ones)."""

    def __init__(self, state_dict: Mapping, fmt: str):
        self.fmt = fmt
        self.arrays = {str(k): _to_numpy(v) for k, v in state_dict.items()}
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.arrays

    def get(self, key: str, needed_for: str = "") -> np.ndarray:
        if key not in self.arrays:
            why = f" (needed for {needed_for})" if needed_for else ""
            raise ConversionError(
                f"the {self.fmt} checkpoint has no key {key!r}{why}. Its keys: {_sample(sorted(self.arrays))}. "
                "Check --format and --model (the file may be another architecture or depth)."
            )
        return self.arrays[key]

    def shape(self, key: str, needed_for: str = "the architecture") -> tuple:
        return tuple(self.get(key, needed_for).shape)

    def indices(self, pattern: str) -> list[int]:
        """Sorted distinct integers captured by `pattern` (one group) over the keys."""
        rx = re.compile(pattern)
        return sorted({int(m.group(1)) for k in self.arrays if (m := rx.match(k))})

    def expect_any(self, keys: Sequence[str]) -> None:
        if not any(k in self.arrays for k in keys):
            guess = guess_format(self.arrays)
            fix = (f"It looks like {guess}: use --format={guess.split(' ')[0]}." if guess else
                   f"Pass the matching --format ({', '.join(FORMATS)}).")
            raise ConversionError(
                f"this does not look like a {self.fmt} checkpoint: none of {list(keys)} is present. "
                f"Its keys: {_sample(sorted(self.arrays))}. {fix}"
            )


_ANCHORS = (  # (key suffix, format)
    ("embedding/kernel", "google_vit_npz"),
    ("patch_embed.proj.weight", "timm_vit"),
    ("visual.conv1.weight", "openai_clip (or open_clip)"),
    ("embeddings.patch_embeddings.projection.weight", "hf_vit"),
    ("vision_model.embeddings.patch_embedding.weight", "hf_clip"),
)


def guess_format(keys) -> str | None:
    """The format whose characteristic key the state dict has, or None."""
    for anchor, fmt in _ANCHORS:
        if any(k == anchor or k.endswith("." + anchor) for k in keys):
            return fmt
    return None


def _count(src: _Source, pattern: str, what: str) -> int:
    idx = src.indices(pattern)
    if not idx:
        raise ConversionError(f"the {src.fmt} checkpoint has no {what} (keys matching {pattern!r}); "
                              f"its keys: {_sample(sorted(src.arrays))}.")
    return idx[-1] + 1


def _grid_image_size(num_tokens: int, patch: int, key: str, shape) -> int:
    side = math.isqrt(num_tokens - 1)
    if side * side != num_tokens - 1:
        raise ConversionError(
            f"{key!r} has shape {tuple(shape)}: {num_tokens} positions are not 1 class token + a square patch grid; "
            "non-square position embeddings are not supported."
        )
    return side * patch


def _model_desc(model: str, cfg: Mapping) -> str:
    keys = (("patch_size", "width", "depth", "num_heads", "mlp_dim", "image_size", "num_classes") if model == "ViT"
            else ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                  "text_width", "text_layers", "text_heads", "context_length", "vocab_size"))
    return f"{model}(" + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg) + ")"


def expected_shapes(model: str, config: Mapping) -> dict[str, tuple]:
    """{'/'-path: shape} of the parameters `model(**config).init` creates (traced, nothing computed)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    try:
        module = build_model(model, config)
        size = config.get("image_size") or 224
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        args = (images,) if model == "ViT" else (images, jnp.zeros((1, config.get("context_length", 77)), jnp.int32))
        shapes = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), *args)))["params"]
    except (ValueError, TypeError) as e:
        raise ConversionError(f"the inferred model {_model_desc(model, config)} is invalid: {e}") from e
    return {p: tuple(s.shape) for p, s in flatten(shapes).items()}


def _assemble(src: _Source, model: str, config: dict, mapping: Sequence[tuple], drop: Sequence[str],
              notes: Sequence[str] = ()) -> Converted:
    """Applies `mapping` [(jdjax path, source keys, kind)] and validates against the model's shapes.

    `drop` are regexes of source keys ignored on purpose; any other unused key is an error.
    """
    expected = expected_shapes(model, config)
    desc = _model_desc(model, config)
    flat = {}
    for path, keys, kind in mapping:
        if path not in expected:
            raise ConversionError(
                f"{src.fmt} keys {list(keys)} map to jdjax parameter {path!r}, which {desc} does not have; "
                "check --model and the explicit dims."
            )
        j = expected[path]
        want = _SRC_SHAPE[kind](j)
        arrays = []
        for key in keys:
            a = src.get(key, f"jdjax parameter {path!r}")
            if tuple(a.shape) != tuple(want):
                raise ConversionError(
                    f"{src.fmt} key {key!r} has shape {tuple(a.shape)}, but {desc} needs shape {tuple(want)} there "
                    f"(jdjax parameter {path!r} of shape {j}). Check --model / --num_heads / the dims, or the file."
                )
            src.used.add(key)
            arrays.append(a.astype(np.float32) if a.dtype != np.float32 else a)
        value = np.array(_APPLY[kind](arrays, j), dtype=np.float32, order="C")  # (ascontiguousarray makes 0-d 1-d)
        if value.shape != tuple(j):  # pragma: no cover - a converter bug
            raise ConversionError(f"internal: {src.fmt} {list(keys)} gave {value.shape} for {path!r}, expected {j}.")
        flat[path] = value
    missing = sorted(set(expected) - set(flat))
    if missing:  # the mapping does not cover the model: a converter bug or an unsupported option
        raise ConversionError(f"no {src.fmt} key provides the jdjax parameters {missing} of {desc}.")
    drop_rx = [re.compile(d) for d in drop]
    dropped, unexpected = [], []
    for key in sorted(src.arrays):
        if key in src.used:
            continue
        (dropped if any(rx.search(key) for rx in drop_rx) else unexpected).append(key)
    if unexpected:
        shapes = ", ".join(f"{k!r} {tuple(src.arrays[k].shape)}" for k in unexpected[:8])
        more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
        raise ConversionError(
            f"unexpected {src.fmt} keys that {desc} has no place for: {shapes}{more}. The checkpoint has parts "
            "this model does not (another architecture, extra layers, or a different --model / depth)."
        )
    return Converted(unflatten(flat), model, dict(config), src.fmt, tuple(dropped), tuple(notes))


def _ln(path: str, prefix: str, w: str = "weight", b: str = "bias", sep: str = ".") -> list:
    return [(f"{path}/scale", [f"{prefix}{sep}{w}"], "copy"), (f"{path}/bias", [f"{prefix}{sep}{b}"], "copy")]


def _linear(path: str, prefix: str, bias: bool = True) -> list:
    out = [(f"{path}/kernel", [f"{prefix}.weight"], "linear")]
    return out + ([(f"{path}/bias", [f"{prefix}.bias"], "copy")] if bias else [])


def _block_torch(jp: str, ln1: str, ln2: str, fc1: str, fc2: str, out: str, qkv: Sequence[str] | str,
                 qkv_bias: bool = True) -> list:
    """An EncoderBlock from torch names; `qkv` is one fused in_proj-style prefix or three q/k/v Linear prefixes.
    A fused prefix is given as (weight key, bias key)."""
    m = _ln(f"{jp}/ln1", ln1) + _ln(f"{jp}/ln2", ln2)
    if isinstance(qkv, str):  # timm: attn.qkv Linear
        m.append((f"{jp}/attn/qkv/kernel", [f"{qkv}.weight"], "in_proj"))
        if qkv_bias:
            m.append((f"{jp}/attn/qkv/bias", [f"{qkv}.bias"], "in_proj_bias"))
    elif len(qkv) == 2:  # OpenAI: attn.in_proj_weight / in_proj_bias
        m.append((f"{jp}/attn/qkv/kernel", [qkv[0]], "in_proj"))
        m.append((f"{jp}/attn/qkv/bias", [qkv[1]], "in_proj_bias"))
    else:  # Hugging Face: separate q / k / v
        m.append((f"{jp}/attn/qkv/kernel", [f"{p}.weight" for p in qkv], "split_qkv"))
        m.append((f"{jp}/attn/qkv/bias", [f"{p}.bias" for p in qkv], "split_qkv_bias"))
    m.append((f"{jp}/attn/out/kernel", [f"{out}.weight"], "out_proj"))
    m.append((f"{jp}/attn/out/bias", [f"{out}.bias"], "copy"))
    return m + _linear(f"{jp}/mlp/fc1", fc1) + _linear(f"{jp}/mlp/fc2", fc2)


# ----------------------------------------------------------------------------- model names

_VIT_SIZE_WORDS = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}
# Head counts of the standard widths (ViT-Ti/S/B/L/H); other widths need --num_heads.
_VIT_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# open_clip models whose head width is not 64: (vision heads, text heads).
_OPEN_CLIP_HEADS = {"ViT-H-14": (16, 16), "ViT-g-14": (16, 16), "ViT-bigG-14": (16, 20)}


def vit_name_config(name: str) -> dict:
    """ViT dims from a name: 'B/16', 'ViT-B_16' (Google npz), 'vit_base_patch16_384' (timm),
    'google/vit-base-patch16-224-in21k' (Hugging Face). Includes image_size when the name has it."""
    from jdjax.nn.vit import vit_config

    n = name.strip()
    m = re.search(r"(?:^|[^A-Za-z])(?:ViT-)?(Ti|S|B|L|H)[/_-](\d+)(?:$|[^0-9])", n)
    image = None
    if m:
        size, patch = m.group(1), m.group(2)
    else:
        m = re.search(r"vit[_-](tiny|small|base|large|huge)[_-]patch(\d+)(?:[_-](\d+))?", n, re.IGNORECASE)
        if not m:
            raise ConversionError(
                f"unknown ViT model name {name!r}; use e.g. 'B/16', 'ViT-B_16', 'vit_base_patch16_224' or "
                "'google/vit-base-patch16-224', or give the dims (--num_heads) and no name."
            )
        size, patch, image = _VIT_SIZE_WORDS[m.group(1).lower()], m.group(2), m.group(3)
    cfg = vit_config(f"{size}/{patch}")
    if image:
        cfg["image_size"] = int(image)
    return cfg


def clip_name_config(name: str) -> tuple[dict, str | None]:
    """CLIP dims from 'ViT-B/32', 'ViT-B-32-quickgelu', 'ViT-L-14-336', 'ViT-L/14@336px' or
    'openai/clip-vit-base-patch32' -> (kwargs (all dims, or only the head counts for open_clip's big
    models), activation implied by an open_clip name or None)."""
    from jdjax.nn.clip import clip_config

    n = name.strip()
    activation = "quick_gelu" if n.endswith("-quickgelu") else None
    n = n.removesuffix("-quickgelu")
    if re.match(r"RN\d", n):
        raise ConversionError(f"{name!r} is a ResNet CLIP; only ViT CLIP models are supported.")
    m = re.search(r"clip-vit-(base|large)-patch(\d+)(?:-(\d+))?", n, re.IGNORECASE)
    if m:
        n = f"ViT-{_VIT_SIZE_WORDS[m.group(1).lower()]}/{m.group(2)}" + (f"@{m.group(3)}px" if m.group(3) else "")
    elif n in _OPEN_CLIP_HEADS:
        vh, th = _OPEN_CLIP_HEADS[n]
        return {"vision_heads": vh, "text_heads": th}, activation
    else:
        m = re.fullmatch(r"(?:ViT-)?(B|L)[-/](\d+)(?:[-@](\d+)(?:px)?)?", n)
        if m:
            n = f"ViT-{m.group(1)}/{m.group(2)}" + (f"@{m.group(3)}px" if m.group(3) and m.group(3) != "224" else "")
    try:
        return clip_config(n), activation
    except ValueError as e:
        raise ConversionError(
            f"unknown CLIP model name {name!r}: {e} open_clip names like 'ViT-B-32-quickgelu', 'ViT-H-14' and "
            "Hugging Face names like 'openai/clip-vit-base-patch32' work too; or give --num_heads / --text_heads."
        ) from e


_HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "relu": "relu"}


def _hf_activation(act) -> str:
    if act not in _HF_ACT:
        raise ConversionError(f"Hugging Face hidden_act={act!r} has no jdjax equivalent; known: {sorted(_HF_ACT)}.")
    return _HF_ACT[act]


def _config_of(hf_config) -> dict | None:
    if hf_config is None:
        return None
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    return dict(hf_config)


def _heads_note(width: int, heads: int, where: str) -> str:
    return f"{where}: num_heads={heads} inferred from width {width} (pass --model or explicit heads if that is wrong)"


def _check_overrides(overrides: Mapping | None, allowed: Sequence[str]) -> dict:
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise ConversionError(f"unknown model options {bad}; this model takes {sorted(allowed)}.")
    return overrides


_VIT_KEYS = ("num_classes", "patch_size", "width", "depth", "num_heads", "mlp_dim", "ln_eps", "image_size",
             "activation", "qkv_bias")
_CLIP_KEYS = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
              "vision_mlp_dim", "context_length", "vocab_size", "text_width", "text_layers", "text_heads",
              "text_mlp_dim", "ln_eps", "activation", "eot_token_id")


def _finish_vit_config(cfg: dict, model: str | None, overrides: dict, fmt: str, notes: list) -> dict:
    if model:
        cfg.update(vit_name_config(model))
    cfg.update(overrides)
    if cfg.get("num_heads") is None:
        heads = _VIT_HEADS_BY_WIDTH.get(cfg["width"])
        if heads is None:
            raise ConversionError(
                f"cannot tell the head count of this {fmt} checkpoint (width {cfg['width']} is not a standard ViT "
                "width); pass --model (e.g. B/16) or --num_heads."
            )
        cfg["num_heads"] = heads
        notes.append(_heads_note(cfg["width"], heads, "ViT"))
    return {k: cfg[k] for k in _VIT_KEYS}


def _finish_clip_config(cfg: dict, model: str | None, overrides: dict, fmt: str, notes: list) -> dict:
    if model:
        named, act = clip_name_config(model)
        cfg.update(named)
        if act:
            cfg["activation"] = act
    cfg.update(overrides)
    for tower, width_key in (("vision_heads", "vision_width"), ("text_heads", "text_width")):
        if cfg.get(tower) is None:
            width = cfg[width_key]
            wide_heads = fmt == "open_clip" and tower == "vision_heads" and width in (1280, 1408, 1664)
            if width % 64 or width < 64 or wide_heads:
                flag = "--num_heads" if tower == "vision_heads" else "--text_heads"
                raise ConversionError(
                    f"cannot tell the {tower.split('_')[0]} head count of this {fmt} checkpoint from width {width}; "
                    f"pass --model (e.g. ViT-B/32, ViT-H-14) or {flag}."
                )
            cfg[tower] = width // 64  # OpenAI's build_model: heads = width // 64
            notes.append(_heads_note(width, width // 64, tower.split("_")[0] + " tower (width // 64, as OpenAI)"))
    return {k: cfg[k] for k in _CLIP_KEYS}


# ----------------------------------------------------------------------------- CLIP (OpenAI / open_clip)


def _from_clip_layout(state_dict: Mapping, fmt: str, model: str | None, overrides: dict) -> Converted:
    src = _Source(state_dict, fmt)
    src.expect_any(["visual.conv1.weight", "visual.layer1.0.conv1.weight"])
    if src.has("visual.layer1.0.conv1.weight"):
        raise ConversionError("this is a ResNet CLIP (visual.layer1...); only ViT CLIP models are supported.")
    vw, _, patch, _ = src.shape("visual.conv1.weight")
    pos_shape = src.shape("visual.positional_embedding")
    linear_proj = not src.has("text_projection") and src.has("text_projection.weight")
    tp_key = "text_projection.weight" if linear_proj else "text_projection"
    tp = src.shape(tp_key)
    vl = _count(src, r"visual\.transformer\.resblocks\.(\d+)\.", "visual blocks")
    tl = _count(src, r"transformer\.resblocks\.(\d+)\.", "text blocks")
    cfg = dict(
        embed_dim=tp[0] if linear_proj else tp[1],
        image_size=_grid_image_size(pos_shape[0], patch, "visual.positional_embedding", pos_shape),
        patch_size=patch, vision_width=vw, vision_layers=vl, vision_heads=None,
        vision_mlp_dim=src.shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
        context_length=src.shape("positional_embedding")[0], vocab_size=src.shape("token_embedding.weight")[0],
        text_width=src.shape("ln_final.weight")[0], text_layers=tl, text_heads=None,
        text_mlp_dim=src.shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
        ln_eps=1e-5, activation="quick_gelu" if fmt == "openai_clip" else "gelu", eot_token_id=None,
    )
    notes = []
    if fmt == "open_clip" and "activation" not in overrides and not (model or "").endswith("-quickgelu"):
        notes.append("open_clip: exact GELU (open_clip's default); OpenAI-trained weights need "
                     "--model=<name>-quickgelu or --activation=quick_gelu")
    cfg = _finish_clip_config(cfg, model, overrides, fmt, notes)
    for name, counted in (("vision_layers", vl), ("text_layers", tl)):
        if cfg[name] != counted:
            raise ConversionError(f"the checkpoint has {counted} {name.split('_')[0]} blocks but the chosen model "
                                  f"{_model_desc('CLIP', cfg)} has {name}={cfg[name]}.")

    m = [("visual/conv1/kernel", ["visual.conv1.weight"], "conv"),
         ("visual/class_embedding", ["visual.class_embedding"], "copy"),
         ("visual/positional_embedding", ["visual.positional_embedding"], "copy"),
         *_ln("visual/ln_pre", "visual.ln_pre"), *_ln("visual/ln_post", "visual.ln_post"),
         ("visual/proj", ["visual.proj"], "copy"),
         ("text/token_embedding/embedding", ["token_embedding.weight"], "copy"),
         ("text/positional_embedding", ["positional_embedding"], "copy"),
         *_ln("text/ln_final", "ln_final"),
         ("text/text_projection", [tp_key], "linear" if linear_proj else "copy"),
         ("logit_scale", ["logit_scale"], "copy")]
    for tower, prefix, depth in (("visual", "visual.transformer", cfg["vision_layers"]),
                                 ("text", "transformer", cfg["text_layers"])):
        for i in range(depth):
            p = f"{prefix}.resblocks.{i}"
            m += _block_torch(f"{tower}/block{i}", f"{p}.ln_1", f"{p}.ln_2", f"{p}.mlp.c_fc", f"{p}.mlp.c_proj",
                              f"{p}.attn.out_proj", (f"{p}.attn.in_proj_weight", f"{p}.attn.in_proj_bias"))
    drop = [r"^(input_resolution|context_length|vocab_size)$"] if fmt == "openai_clip" else [r"^attn_mask$"]
    return _assemble(src, "CLIP", cfg, m, drop, notes)


def from_openai_clip(state_dict: Mapping, model: str | None = None, **overrides) -> Converted:
    """An OpenAI CLIP state dict (`torch.jit.load('ViT-B-32.pt').state_dict()`) -> CLIP params.

    Heads default to width // 64 (as OpenAI's build_model). `overrides`: any of the CLIP keyword
    arguments (vision_heads, text_heads, activation, ln_eps, eot_token_id, ...)."""
    return _from_clip_layout(state_dict, "openai_clip", model, _check_overrides(overrides, _CLIP_KEYS))


def from_open_clip(state_dict: Mapping, model: str | None = None, **overrides) -> Converted:
    """An open_clip CLIP state dict -> CLIP params. The activation is exact GELU unless the model name
    ends in '-quickgelu' or activation='quick_gelu' is given."""
    return _from_clip_layout(state_dict, "open_clip", model, _check_overrides(overrides, _CLIP_KEYS))


# ----------------------------------------------------------------------------- timm ViT


def from_timm_vit(state_dict: Mapping, model: str | None = None, **overrides) -> Converted:
    """A timm VisionTransformer state dict -> ViT params (eps 1e-6, exact GELU).

    The head count comes from `model` ('vit_base_patch16_224', 'B/16'), `num_heads`, or the standard
    width table (192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16)."""
    overrides = _check_overrides(overrides, _VIT_KEYS)
    src = _Source(state_dict, "timm_vit")
    src.expect_any(["patch_embed.proj.weight", "cls_token"])
    width, _, patch, _ = src.shape("patch_embed.proj.weight")
    pos = src.shape("pos_embed")
    depth = _count(src, r"blocks\.(\d+)\.", "blocks")
    cfg = dict(
        num_classes=src.shape("head.weight")[0] if src.has("head.weight") else 0, patch_size=patch, width=width,
        depth=depth, num_heads=None, mlp_dim=src.shape("blocks.0.mlp.fc1.weight")[0], ln_eps=1e-6,
        image_size=_grid_image_size(pos[1], patch, "pos_embed", pos), activation="gelu",
        qkv_bias=src.has("blocks.0.attn.qkv.bias"),
    )
    notes = []
    cfg = _finish_vit_config(cfg, model, overrides, "timm_vit", notes)
    _check_depth(cfg, depth)
    m = [("embedding/kernel", ["patch_embed.proj.weight"], "conv"),
         ("embedding/bias", ["patch_embed.proj.bias"], "copy"),
         ("cls", ["cls_token"], "copy"), ("pos_embedding", ["pos_embed"], "copy"), *_ln("encoder_norm", "norm")]
    if cfg["num_classes"]:
        m += _linear("head", "head")
    for i in range(cfg["depth"]):
        p = f"blocks.{i}"
        m += _block_torch(f"block{i}", f"{p}.norm1", f"{p}.norm2", f"{p}.mlp.fc1", f"{p}.mlp.fc2", f"{p}.attn.proj",
                          f"{p}.attn.qkv", qkv_bias=cfg["qkv_bias"])
    return _assemble(src, "ViT", cfg, m, [r"^pre_logits\."], notes)


def _check_depth(cfg: dict, counted: int) -> None:
    if cfg["depth"] != counted:
        raise ConversionError(f"the checkpoint has {counted} blocks but the chosen model "
                              f"{_model_desc('ViT', cfg)} has depth={cfg['depth']}.")


# ----------------------------------------------------------------------------- Google ViT npz


def from_google_vit(arrays: Mapping, model: str | None = None, **overrides) -> Converted:
    """The arrays of a google-research/vision_transformer .npz -> ViT params (NumPy only).

    The head count is read from the query kernel [C, H, Dh]; `pre_logits/*` is dropped."""
    overrides = _check_overrides(overrides, _VIT_KEYS)
    src = _Source(arrays, "google_vit_npz")
    src.expect_any(["embedding/kernel", "Transformer/posembed_input/pos_embedding"])
    patch, _, _, width = src.shape("embedding/kernel")
    pos_key = "Transformer/posembed_input/pos_embedding"
    pos = src.shape(pos_key)
    blk = "Transformer/encoderblock_{}/"
    att = blk + "MultiHeadDotProductAttention_1/"
    depth = _count(src, r"Transformer/encoderblock_(\d+)/", "encoder blocks")
    q = src.shape(att.format(0) + "query/kernel")
    cfg = dict(
        num_classes=src.shape("head/kernel")[1] if src.has("head/kernel") else 0, patch_size=patch, width=width,
        depth=depth, num_heads=q[1] if len(q) == 3 else None,
        mlp_dim=src.shape(blk.format(0) + "MlpBlock_3/Dense_0/kernel")[1], ln_eps=1e-6,
        image_size=_grid_image_size(pos[1], patch, pos_key, pos), activation="gelu", qkv_bias=True,
    )
    notes = []
    cfg = _finish_vit_config(cfg, model, overrides, "google_vit_npz", notes)
    _check_depth(cfg, depth)
    m = [("embedding/kernel", ["embedding/kernel"], "copy"), ("embedding/bias", ["embedding/bias"], "copy"),
         ("cls", ["cls"], "copy"), ("pos_embedding", [pos_key], "copy"),
         *_ln("encoder_norm", "Transformer/encoder_norm", "scale", "bias", "/")]
    if cfg["num_classes"]:
        m += [("head/kernel", ["head/kernel"], "copy"), ("head/bias", ["head/bias"], "copy")]
    for i in range(cfg["depth"]):
        b, a = blk.format(i), att.format(i)
        m += [*_ln(f"block{i}/ln1", b + "LayerNorm_0", "scale", "bias", "/"),
              (f"block{i}/attn/qkv/kernel", [a + n + "/kernel" for n in ("query", "key", "value")], "npz_qkv"),
              (f"block{i}/attn/qkv/bias", [a + n + "/bias" for n in ("query", "key", "value")], "npz_qkv_bias"),
              (f"block{i}/attn/out/kernel", [a + "out/kernel"], "copy"),
              (f"block{i}/attn/out/bias", [a + "out/bias"], "copy"),
              *_ln(f"block{i}/ln2", b + "LayerNorm_2", "scale", "bias", "/")]
        for j, name in enumerate(("fc1", "fc2")):
            d = b + f"MlpBlock_3/Dense_{j}/"
            m += [(f"block{i}/mlp/{name}/kernel", [d + "kernel"], "copy"),
                  (f"block{i}/mlp/{name}/bias", [d + "bias"], "copy")]
    return _assemble(src, "ViT", cfg, m, [r"^pre_logits/"], notes)


# ----------------------------------------------------------------------------- Hugging Face


def from_hf_vit(state_dict: Mapping, model: str | None = None, hf_config=None, **overrides) -> Converted:
    """A transformers ViTModel / ViTForImageClassification state dict (4.x or 5.x names) -> ViT params.

    hf_config: the ViTConfig (or its dict / config.json contents), which gives the head count,
    layer_norm_eps and hidden_act; without it heads come from `model` / `num_heads` / the width
    table, eps is transformers' default 1e-12 and the activation exact GELU."""
    overrides = _check_overrides(overrides, _VIT_KEYS)
    src = _Source(state_dict, "hf_vit")
    p = "vit." if any(k.startswith("vit.") for k in src.arrays) else ""
    src.expect_any([f"{p}embeddings.cls_token"])
    new = src.has(f"{p}layers.0.attention.q_proj.weight")
    patch_key = f"{p}embeddings.patch_embeddings.projection.weight"
    width, _, patch, _ = src.shape(patch_key)
    pos_key = f"{p}embeddings.position_embeddings"
    pos = src.shape(pos_key)
    layer = f"{p}layers.{{}}" if new else f"{p}encoder.layer.{{}}"
    depth = _count(src, re.escape(layer.split("{")[0]) + r"(\d+)\.", "encoder layers")
    fc1 = (layer + ".mlp.fc1") if new else (layer + ".intermediate.dense")
    fc2 = (layer + ".mlp.fc2") if new else (layer + ".output.dense")
    q_name = (layer + ".attention.q_proj") if new else (layer + ".attention.attention.query")
    cfg = dict(
        num_classes=src.shape("classifier.weight")[0] if src.has("classifier.weight") else 0, patch_size=patch,
        width=width, depth=depth, num_heads=None, mlp_dim=src.shape(fc1.format(0) + ".weight")[0], ln_eps=1e-12,
        image_size=_grid_image_size(pos[1], patch, pos_key, pos), activation="gelu",
        qkv_bias=src.has(q_name.format(0) + ".bias"),
    )
    hc = _config_of(hf_config)
    if hc:
        cfg.update(num_heads=hc.get("num_attention_heads"), ln_eps=hc.get("layer_norm_eps", 1e-12),
                   activation=_hf_activation(hc.get("hidden_act", "gelu")))
    notes = []
    cfg = _finish_vit_config(cfg, model, overrides, "hf_vit", notes)
    _check_depth(cfg, depth)
    if not cfg["qkv_bias"]:
        raise ConversionError("Hugging Face ViT without qkv bias is not supported.")
    m = [("embedding/kernel", [patch_key], "conv"),
         ("embedding/bias", [f"{p}embeddings.patch_embeddings.projection.bias"], "copy"),
         ("cls", [f"{p}embeddings.cls_token"], "copy"), ("pos_embedding", [pos_key], "copy"),
         *_ln("encoder_norm", f"{p}layernorm")]
    if cfg["num_classes"]:
        m += _linear("head", "classifier")
    for i in range(cfg["depth"]):
        lp = layer.format(i)
        if new:
            qkv = [f"{lp}.attention.{n}_proj" for n in "qkv"]
            out = f"{lp}.attention.o_proj"
        else:
            qkv = [f"{lp}.attention.attention.{n}" for n in ("query", "key", "value")]
            out = f"{lp}.attention.output.dense"
        m += _block_torch(f"block{i}", f"{lp}.layernorm_before", f"{lp}.layernorm_after", fc1.format(i),
                          fc2.format(i), out, qkv)
    return _assemble(src, "ViT", cfg, m, [r"(^|\.)pooler\.", r"position_ids$", r"embeddings\.mask_token$"], notes)


def from_hf_clip(state_dict: Mapping, model: str | None = None, hf_config=None, **overrides) -> Converted:
    """A transformers CLIPModel state dict -> CLIP params.

    hf_config (CLIPConfig or its dict) gives head counts, eps, activation and the EOT id
    (eos_token_id 2 = legacy argmax pooling); without it heads are width // 64 unless given,
    eps 1e-5, QuickGELU, argmax pooling."""
    overrides = _check_overrides(overrides, _CLIP_KEYS)
    src = _Source(state_dict, "hf_clip")
    src.expect_any(["vision_model.embeddings.patch_embedding.weight"])
    v, t = "vision_model", "text_model"
    vw, _, patch, _ = src.shape(f"{v}.embeddings.patch_embedding.weight")
    pos = src.shape(f"{v}.embeddings.position_embedding.weight")
    vl = _count(src, rf"{v}\.encoder\.layers\.(\d+)\.", "vision layers")
    tl = _count(src, rf"{t}\.encoder\.layers\.(\d+)\.", "text layers")
    cfg = dict(
        embed_dim=src.shape("visual_projection.weight")[0],
        image_size=_grid_image_size(pos[0], patch, f"{v}.embeddings.position_embedding.weight", pos),
        patch_size=patch, vision_width=vw, vision_layers=vl, vision_heads=None,
        vision_mlp_dim=src.shape(f"{v}.encoder.layers.0.mlp.fc1.weight")[0],
        context_length=src.shape(f"{t}.embeddings.position_embedding.weight")[0],
        vocab_size=src.shape(f"{t}.embeddings.token_embedding.weight")[0],
        text_width=src.shape(f"{t}.final_layer_norm.weight")[0], text_layers=tl, text_heads=None,
        text_mlp_dim=src.shape(f"{t}.encoder.layers.0.mlp.fc1.weight")[0],
        ln_eps=1e-5, activation="quick_gelu", eot_token_id=None,
    )
    hc = _config_of(hf_config)
    if hc:
        vc, tc = hc.get("vision_config") or {}, hc.get("text_config") or {}
        acts = {_hf_activation(c.get("hidden_act", "quick_gelu")) for c in (vc, tc)}
        epss = {float(c.get("layer_norm_eps", 1e-5)) for c in (vc, tc)}
        if len(acts) > 1 or len(epss) > 1:
            raise ConversionError(f"the two CLIP towers differ in hidden_act {acts} / layer_norm_eps {epss}; "
                                  "jdjax CLIP uses one of each.")
        eos = tc.get("eos_token_id")
        cfg.update(vision_heads=vc.get("num_attention_heads"), text_heads=tc.get("num_attention_heads"),
                   activation=acts.pop(), ln_eps=epss.pop(), eot_token_id=None if eos in (None, 2) else int(eos))
    notes = []
    cfg = _finish_clip_config(cfg, model, overrides, "hf_clip", notes)
    m = [("visual/conv1/kernel", [f"{v}.embeddings.patch_embedding.weight"], "conv"),
         ("visual/class_embedding", [f"{v}.embeddings.class_embedding"], "copy"),
         ("visual/positional_embedding", [f"{v}.embeddings.position_embedding.weight"], "copy"),
         *_ln("visual/ln_pre", f"{v}.pre_layrnorm"), *_ln("visual/ln_post", f"{v}.post_layernorm"),
         ("visual/proj", ["visual_projection.weight"], "linear"),
         ("text/token_embedding/embedding", [f"{t}.embeddings.token_embedding.weight"], "copy"),
         ("text/positional_embedding", [f"{t}.embeddings.position_embedding.weight"], "copy"),
         *_ln("text/ln_final", f"{t}.final_layer_norm"),
         ("text/text_projection", ["text_projection.weight"], "linear"),
         ("logit_scale", ["logit_scale"], "copy")]
    for tower, prefix, depth, counted in (("visual", v, cfg["vision_layers"], vl), ("text", t, cfg["text_layers"], tl)):
        if depth != counted:
            raise ConversionError(f"the checkpoint has {counted} {tower} layers but the chosen model "
                                  f"{_model_desc('CLIP', cfg)} has {depth}.")
        for i in range(depth):
            lp = f"{prefix}.encoder.layers.{i}"
            m += _block_torch(f"{tower}/block{i}", f"{lp}.layer_norm1", f"{lp}.layer_norm2", f"{lp}.mlp.fc1",
                              f"{lp}.mlp.fc2", f"{lp}.self_attn.out_proj", [f"{lp}.self_attn.{n}_proj" for n in "qkv"])
    return _assemble(src, "CLIP", cfg, m, [r"position_ids$"], notes)


# ----------------------------------------------------------------------------- files -> Converted

_FROM = {
    "openai_clip": from_openai_clip,
    "open_clip": from_open_clip,
    "timm_vit": from_timm_vit,
    "google_vit_npz": from_google_vit,
    "hf_vit": from_hf_vit,
    "hf_clip": from_hf_clip,
}


def convert(src: str, format: str, model: str | None = None, allow_pickle: bool = False,
            **overrides) -> Converted:
    """Reads `src` in `format` (one of FORMATS) and converts it; see the module docstring.

    overrides: model keyword arguments that shapes cannot tell or that should be forced, e.g.
    num_heads (ViT), vision_heads / text_heads (CLIP), activation, ln_eps, eot_token_id.
    allow_pickle: let torch unpickle arbitrary objects (only for files you trust).
    """
    if format not in FORMATS:
        raise ConversionError(f"unknown --format={format!r}; choose one of {', '.join(FORMATS)}.")
    if not os.path.exists(src):
        raise ConversionError(f"--src={src} does not exist.")
    if format == "google_vit_npz":
        if os.path.isdir(src):
            raise ConversionError(f"--src={src} is a directory; google_vit_npz expects an .npz file.")
        return from_google_vit(read_npz(src), model, **overrides)
    if format in ("hf_vit", "hf_clip"):
        sd, hf_config = read_hf(src, allow_pickle)
        return _FROM[format](sd, model, hf_config=hf_config, **overrides)
    return _FROM[format](read_state_dict(src, allow_pickle), model, **overrides)


# ----------------------------------------------------------------------------- save / load


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
    return unflatten({k: np.asarray(v, dtype=np.float32) for k, v in flatten(_to_plain(restored)).items()})


def _to_plain(tree):
    """Orbax metadata / restored trees -> plain nested dicts."""
    if isinstance(tree, Mapping):
        return {k: _to_plain(v) for k, v in tree.items()}
    return tree


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


# ----------------------------------------------------------------------------- pretrained -> fresh tree


@dataclasses.dataclass
class MergeReport:
    """What `merge_pretrained` did, by '/'-path of the fresh tree (unused: pretrained paths)."""

    loaded: list[str]
    resized: list[str]
    kept: list[str]
    excluded: list[str]
    unused: list[str]

    def summary(self) -> str:
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


def _is_box(x) -> bool:
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, nn.meta.AxisMetadata)


def _flatten_any(tree, prefix: str = "") -> dict:
    """Nested mappings (flax FrozenDict included) -> flat dict; boxed (Partitioned) leaves stay boxed."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and not _is_box(value):
            out.update(_flatten_any(value, path + "/"))
        else:
            out[path] = value
    return out


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
    pre = dict(flatten(_to_plain(pretrained)))
    wrapped = set(fresh) == {"params"} and "params" not in pre and not any(k.startswith("params/") for k in pre)
    flat_fresh = _flatten_any(fresh["params"] if wrapped else fresh)
    rx = re.compile(exclude) if exclude else None
    out, used, mismatched = {}, set(), []
    report = MergeReport([], [], [], [], [])
    for path, leaf in flat_fresh.items():
        boxed = _is_box(leaf)
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
            f"no pretrained parameter matched the model (pretrained paths like {_sample(sorted(pre), 3)}; model "
            f"paths like {_sample(sorted(flat_fresh), 3)}); check the model type and prefix={prefix!r}."
        )
    if strict and report.unused:
        raise ConversionError(f"pretrained parameters without a place in the model: {report.unused}.")
    merged = unflatten(out)
    return ({"params": merged} if wrapped else merged), report


def _resize_pos(pos: np.ndarray, shape: tuple, path: str) -> np.ndarray:
    from jdjax.nn.vit import interpolate_pos_embedding

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


def make_load_pretrained(path: str, exclude: str | None = r"^head/", prefix: str = "", log: Callable | None = None,
                         format: str | None = None, **merge_kwargs) -> Callable:
    """A `Task.load_pretrained` for `config.init_from`: params -> params with the converted backbone
    at `path` merged in (the head stays fresh by default). The report goes to `log` (absl logging).
    `path` is a converted directory, or a raw source with `format` (a `.npz` needs none)."""
    pretrained, _ = load_converted(path, format)

    def load(params):
        merged, report = merge_pretrained(params, pretrained, exclude=exclude, prefix=prefix, **merge_kwargs)
        if log is None:
            from absl import logging

            logging.info("init_from %s: %s", path, report.summary())
        else:
            log(f"init_from {path}: {report.summary()}")
        return merged

    return load


# ----------------------------------------------------------------------------- command line


def _define_flags(fv):
    from absl import flags

    flags.DEFINE_enum("format", None, list(FORMATS), "Source checkpoint format.", flag_values=fv)
    flags.DEFINE_string("src", None, "Source checkpoint file (or a save_pretrained directory for hf_*).",
                        flag_values=fv)
    flags.DEFINE_string("dst", None, "Output directory (orbax params/ + model.json).", flag_values=fv)
    flags.DEFINE_string("model", None, "Model name where shapes cannot tell (heads): e.g. B/16, ViT-B/32, "
                        "vit_base_patch16_224, ViT-H-14, ViT-B-32-quickgelu.", flag_values=fv)
    flags.DEFINE_integer("num_heads", None, "Attention heads (ViT, or the CLIP image tower).", flag_values=fv)
    flags.DEFINE_integer("text_heads", None, "Attention heads of the CLIP text tower.", flag_values=fv)
    flags.DEFINE_enum("activation", None, ["gelu", "quick_gelu", "gelu_tanh", "relu"], "Force the MLP activation.",
                      flag_values=fv)
    flags.DEFINE_float("ln_eps", None, "Force the LayerNorm epsilon.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.", flag_values=fv)
    flags.DEFINE_bool("allow_pickle", False, "Let torch unpickle arbitrary objects (trusted files only).",
                      flag_values=fv)


def cli(argv: Sequence[str]) -> int:
    """Runs the converter command line; returns the exit status (2 on any usage or conversion error)."""
    from absl import flags

    fv = flags.FlagValues()
    _define_flags(fv)
    prog = "python -m jdjax.tools.convert"
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(f"usage: {prog} --format={{{'|'.join(FORMATS)}}} --src=... --dst=... [--model=...]\n")
        print(fv.get_help())
        return 0
    try:
        rest = fv(list(argv))
        if len(rest) > 1:
            raise flags.Error(f"unexpected positional arguments {rest[1:]}")
        for name in ("format", "src", "dst"):
            if fv[name].value is None:
                raise flags.Error(f"--{name} is required")
    except flags.Error as e:
        print(f"{prog}: error: {e}. Usage: {prog} --format={{{'|'.join(FORMATS)}}} --src=PATH --dst=DIR "
              "[--model=NAME] [--num_heads=H] (--help lists all flags).", file=sys.stderr)
        return EXIT_USAGE
    overrides = {}
    is_clip = fv["format"].value in ("openai_clip", "open_clip", "hf_clip")
    if fv["num_heads"].value is not None:
        overrides["vision_heads" if is_clip else "num_heads"] = fv["num_heads"].value
    if fv["text_heads"].value is not None:
        if not is_clip:
            print(f"{prog}: error: --text_heads applies to CLIP formats only.", file=sys.stderr)
            return EXIT_USAGE
        overrides["text_heads"] = fv["text_heads"].value
    if fv["activation"].value is not None:
        overrides["activation"] = fv["activation"].value
    if fv["ln_eps"].value is not None:
        overrides["ln_eps"] = fv["ln_eps"].value
    try:
        src = fv["src"].value
        converted = convert(src, fv["format"].value, fv["model"].value, allow_pickle=fv["allow_pickle"].value,
                            **overrides)
        dst = save_converted(converted, fv["dst"].value, overwrite=fv["overwrite"].value, source=os.path.abspath(src))
    except ConversionError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    n = sum(int(np.prod(v.shape)) for v in flatten(converted.params).values())
    print(f"wrote {dst}: {_model_desc(converted.model, converted.config)}, {n:,} parameters")
    if converted.dropped:
        print(f"dropped source keys: {_sample(converted.dropped, 8)}")
    for note in converted.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv))
