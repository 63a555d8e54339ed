"""The machinery every format's key mapping uses: mapping kinds (how source tensors become one
jdjax parameter), the source tensors with their used keys, and `assemble`, which applies a mapping
and checks it against the parameter shapes of `jdjax.nn.vit.ViT` / `jdjax.nn.clip.CLIP`.

NumPy only at import; jax and the models are imported when a model's shapes are needed.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jdjax.nn.convert.names import model_desc
from jdjax.nn.convert.readers import ConversionError, sample_keys, to_numpy

FORMATS = ("openai_clip", "open_clip", "timm_vit", "google_vit_npz", "hf_vit", "hf_clip")


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
      batch_stats: the BatchNorm running statistics (CLIP's ResNet towers: {.../bn1: {mean, var}}),
        {} for models without BatchNorm; `variables()` puts them beside the parameters.
    """

    params: dict
    model: str
    config: dict
    source_format: str
    dropped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    batch_stats: dict = dataclasses.field(default_factory=dict)

    def build_model(self, **overrides):
        """The flax module of this tree (`overrides` replace keyword arguments)."""
        return build_model(self.model, {**self.config, **overrides})

    def variables(self) -> dict:
        """{'params': params} (+ 'batch_stats' when there are any): the variables of `model.apply`."""
        return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}

    def info(self) -> dict:
        """The JSON-able description written to model.json (everything but the arrays)."""
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
    "linear_heads": lambda j: (j[1] * j[2], j[0]),  # torch Linear [H*Dh, C] -> kernel [C, H, Dh]
    "heads_bias": lambda j: (j[0] * j[1],),  # [H*Dh] -> [H, Dh]
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
    "linear_heads": lambda a, j: a[0].T.reshape(j),
    "heads_bias": lambda a, j: a[0].reshape(j),
}


class Source:
    """The source tensors, with the keys used so far (to report unexpected ones)."""

    def __init__(self, state_dict: Mapping, fmt: str):
        self.fmt = fmt
        self.arrays = {str(k): to_numpy(v) for k, v in state_dict.items()}
        self.used: set[str] = set()
        # size name -> (value, the first key that says so, its shape, the keys that disagree, a tie?)
        self.inferred: dict[str, tuple[int, str, tuple, set, bool]] = {}

    def has(self, key: str) -> bool:
        return key in self.arrays

    def get(self, key: str, needed_for: str = "") -> np.ndarray:
        if key not in self.arrays:
            why = f" (needed for {needed_for})" if needed_for else ""
            raise ConversionError(
                f"the {self.fmt} checkpoint has no key {key!r}{why}. Its keys: {sample_keys(sorted(self.arrays))}. "
                "Check --format and --model (the file may be another architecture or depth)."
            )
        return self.arrays[key]

    def shape(self, key: str, needed_for: str = "the architecture", ndim: int | None = None) -> tuple:
        shape = tuple(self.get(key, needed_for).shape)
        if ndim is not None and len(shape) != ndim:
            raise ConversionError(
                f"{self.fmt} key {key!r} has shape {shape}, but a {ndim}-D tensor is needed there ({needed_for}); "
                "the file is damaged or holds another architecture."
            )
        return shape

    def dim(self, what: str, axes: Sequence[tuple[str, int]]) -> int:
        """A size that several tensors carry, given as (key, axis): the most common value over the
        present ones (ties: the first listed). One damaged tensor is outvoted, so `assemble` names it
        as the one that disagrees, with where the size was read (`inferred`)."""
        votes = [(k, int(self.arrays[k].shape[ax])) for k, ax in axes
                 if k in self.arrays and -self.arrays[k].ndim <= ax < self.arrays[k].ndim]
        if not votes:
            key, axis = axes[0]
            shape = self.shape(key, what)  # names the missing key
            raise ConversionError(f"{self.fmt} key {key!r} has shape {shape}, which has no axis {axis} (the {what}); "
                                  "the file is damaged or holds another architecture.")
        counts = collections.Counter(v for _, v in votes)
        top = max(counts.values())
        key, value = next((k, v) for k, v in votes if counts[v] == top)
        dissent = {k for k, v in votes if v != value}
        tie = sum(c == top for c in counts.values()) > 1
        self.inferred[what] = (value, key, tuple(self.arrays[key].shape), dissent, tie)
        return value

    def provenance(self, key: str) -> str:
        """Where the sizes `key` disagrees on were read, for its wrong-shape message ('' if none)."""
        parts = []
        for what, (value, src_key, shape, dissent, tie) in self.inferred.items():
            if key in dissent:
                parts.append(f"{what}={value} was read from {src_key!r} of shape {shape}"
                             + (", but as many tensors say otherwise, so either side may be the damaged one"
                                if tie else ", as most tensors that carry it say"))
        return "; ".join(parts)

    def indices(self, pattern: str) -> list[int]:
        """Sorted distinct integers captured by `pattern` (one group) over the keys."""
        rx = re.compile(pattern)
        return sorted({int(m.group(1)) for k in self.arrays if (m := rx.match(k))})

    def expect_any(self, keys: Sequence[str]) -> None:
        """Raises (naming the format the keys look like) unless one of `keys` is present."""
        if not any(k in self.arrays for k in keys):
            guess = guess_format(self.arrays)
            fix = (f"It looks like {guess}: use --format={guess.split(' ')[0]}." if guess else
                   f"Pass the matching --format ({', '.join(FORMATS)}).")
            raise ConversionError(
                f"this does not look like a {self.fmt} checkpoint: none of {list(keys)} is present. "
                f"Its keys: {sample_keys(sorted(self.arrays))}. {fix}"
            )


_ANCHORS = (  # (key suffix, format)
    ("embedding/kernel", "google_vit_npz"),
    ("patch_embed.proj.weight", "timm_vit"),
    ("visual.conv1.weight", "openai_clip (or open_clip)"),
    ("visual.layer1.0.conv1.weight", "openai_clip (or open_clip)"),
    ("embeddings.patch_embeddings.projection.weight", "hf_vit"),
    ("vision_model.embeddings.patch_embedding.weight", "hf_clip"),
)


def guess_format(keys) -> str | None:
    """The format whose characteristic key the state dict has, or None."""
    for anchor, fmt in _ANCHORS:
        if any(k == anchor or k.endswith("." + anchor) for k in keys):
            return fmt
    return None


def expected_variables(model: str, config: Mapping) -> dict[str, dict[str, tuple]]:
    """{collection: {'/'-path: shape}} of the variables `model(**config).init` creates ('params', and
    'batch_stats' for CLIP's ResNet towers), traced, nothing computed."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    try:
        module = build_model(model, config)
        size = config.get("image_size") or 224
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        args = (images,) if model == "ViT" else (images, jnp.zeros((1, config.get("context_length", 77)), jnp.int32))
        shapes = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), *args)))
    except (ValueError, TypeError) as e:
        raise ConversionError(f"the inferred model {model_desc(model, config)} is invalid: {e}") from e
    return {c: {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(tree, sep="/").items()}
            for c, tree in shapes.items()}


def expected_shapes(model: str, config: Mapping) -> dict[str, tuple]:
    """{'/'-path: shape} of the parameters `model(**config).init` creates (traced, nothing computed)."""
    return expected_variables(model, config)["params"]


def _apply_mapping(src: Source, expected: dict[str, tuple], mapping: Sequence[tuple], desc: str,
                   what: str) -> dict[str, np.ndarray]:
    """{path: float32 array} of one collection: every (jdjax path, source keys, kind) built and checked
    against `expected` ({path: shape}); `what` names the collection's entries in messages."""
    flat = {}
    for path, keys, kind in mapping:
        if path not in expected:
            raise ConversionError(
                f"{src.fmt} keys {list(keys)} map to jdjax {what} {path!r}, which {desc} does not have; "
                "check --model and the explicit dims."
            )
        j = expected[path]
        want = _SRC_SHAPE[kind](j)
        arrays = []
        for key in keys:
            a = src.get(key, f"jdjax {what} {path!r}")
            if tuple(a.shape) != tuple(want):
                origin = src.provenance(key)
                raise ConversionError(
                    f"{src.fmt} key {key!r} has shape {tuple(a.shape)}, but {desc} needs shape {tuple(want)} there "
                    f"(jdjax {what} {path!r} of shape {j}{'; ' + origin if origin else ''}). "
                    "Check --model / --num_heads / the dims, or the file (damaged, or another model)."
                )
            src.used.add(key)
            arrays.append(a.astype(np.float32) if a.dtype != np.float32 else a)
        value = np.array(_APPLY[kind](arrays, j), dtype=np.float32, order="C")  # (ascontiguousarray makes 0-d 1-d)
        if value.shape != tuple(j):  # pragma: no cover - a converter bug
            raise ConversionError(f"internal: {src.fmt} {list(keys)} gave {value.shape} for {path!r}, expected {j}.")
        flat[path] = value
    missing = sorted(set(expected) - set(flat))
    if missing:  # the mapping does not cover the model: a converter bug or an unsupported option
        raise ConversionError(f"no {src.fmt} key provides the jdjax {what}s {missing} of {desc}.")
    return flat


def assemble(src: Source, model: str, config: dict, mapping: Sequence[tuple], drop: Sequence[str],
             notes: Sequence[str] = (), stats_mapping: Sequence[tuple] = ()) -> Converted:
    """Applies `mapping` [(jdjax path, source keys, kind)] to the parameters and `stats_mapping` (same form)
    to the 'batch_stats' collection, and validates both against the model's shapes.

    `drop` are regexes of source keys ignored on purpose; any other unused key is an error.
    """
    from flax import traverse_util

    expected = expected_variables(model, config)
    desc = model_desc(model, config)
    params = _apply_mapping(src, expected["params"], mapping, desc, "parameter")
    stats = _apply_mapping(src, expected.get("batch_stats", {}), stats_mapping, desc, "batch statistic")
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
    return Converted(traverse_util.unflatten_dict(params, sep="/"), model, dict(config), src.fmt, tuple(dropped),
                     tuple(notes), traverse_util.unflatten_dict(stats, sep="/"))
