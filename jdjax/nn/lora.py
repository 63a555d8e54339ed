"""LoRA: a low-rank update of a frozen dense projection, and folding it back for inference.

For a base projection y = x W (+ b) with kernel W [*in, *out], LoRA adds

    delta = scale * dropout(x) A B,   A [*in, rank], B [rank, *out],  scale = alpha / rank (or 1)

A is Kaiming-uniform(a=sqrt(5)) as torch's nn.Linear, i.e. U(+-1/sqrt(fan_in)); B is zero, so
a freshly initialised LoRA leaves the base model unchanged. PYRA and TempMe use no alpha/rank
scaling (the default, `alpha=None`) and TempMe/PYRA checkpoints store A as torch [rank, C] and B
as [3C, rank]: transpose both; B's 3C rows are in (3, H, Dh) order, reshape to [rank, 3, H, Dh].

Parameter layout: the LoRA of a base module named `X` is a sibling module `X_lora` holding
`a` and `b`; e.g. `block0/attn/qkv/{kernel,bias}` and `block0/attn/qkv_lora/{a,b}`.
`fold_lora` relies on that naming, and `lora_trainable_pattern` selects those parameters.

Models take one `LoRAConfig` (rank, alpha, dropout, targets); `lora_delta` adds the `X_lora`
child of a base projection `X` when the config targets it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

LORA_SUFFIX = "_lora"
# Projections of an encoder block that may carry LoRA (attention fused qkv, attention output, MLP).
LORA_TARGETS = ("qkv", "out", "fc1", "fc2")


def kaiming_uniform_sqrt5(num_in_axes: int = 1):
    """torch's default Linear init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).

    fan_in is the product of the first `num_in_axes` dimensions of the shape.
    """

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[:num_in_axes])
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on an encoder block's projections (hashable, a Flax module attribute); rank 0 = off.

    Attributes:
      rank: 0 (off) or the rank r of A [*in, r] and B [r, *out].
      alpha: None (no scaling, PYRA / TempMe) or alpha, giving scale alpha / rank.
      dropout: dropout rate on the LoRA input (train mode only).
      targets: projections that carry LoRA, among LORA_TARGETS (a list is stored as a tuple).
    """

    rank: int = 0
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv",)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, Integral) or self.rank < 0:
            raise ValueError(f"LoRAConfig.rank must be an int >= 0 (0 turns LoRA off), got {self.rank!r}.")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be None (no scaling) or positive, got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        if isinstance(self.targets, str):
            raise ValueError(
                f"LoRAConfig.targets is a sequence of names; write ({self.targets!r},), not {self.targets!r}."
            )
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(
                f"LoRAConfig.targets {list(self.targets)} has unknown entries {bad}; choose from {LORA_TARGETS}."
            )
        object.__setattr__(self, "targets", tuple(self.targets))

    def applies_to(self, name: str) -> bool:
        """Whether the projection `name` ('qkv', 'out', 'fc1', 'fc2') carries LoRA."""
        return self.rank > 0 and name in self.targets


class LoRA(nn.Module):
    """The low-rank delta of one dense projection: [..., *in] -> [..., *features].

    Attributes:
      features: output shape of the base projection (e.g. (3, H, Dh) for the fused qkv).
      rank: r > 0.
      num_in_axes: trailing input axes contracted by the base projection (2 for the
        attention output [.., H, Dh] -> C).
      alpha: None (no scaling, PYRA / TempMe) or alpha, giving scale alpha / rank.
      dropout: dropout rate on the LoRA input (train mode only; needs the 'dropout' rng).
      in_names / out_names: logical axis names of the input and output axes (for A and B).
    """

    features: tuple[int, ...]
    rank: int
    num_in_axes: int = 1
    alpha: float | None = None
    dropout: float = 0.0
    in_names: tuple[str | None, ...] = ("embed",)
    out_names: tuple[str | None, ...] = ("embed",)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}.")
        features = tuple(self.features)
        in_shape = x.shape[x.ndim - self.num_in_axes :]
        if len(self.in_names) != self.num_in_axes or len(self.out_names) != len(features):
            raise ValueError(
                f"LoRA axis names {self.in_names} / {self.out_names} do not match {self.num_in_axes} "
                f"input axes and features {features}."
            )
        a = self.param(
            "a",
            nn.with_logical_partitioning(kaiming_uniform_sqrt5(self.num_in_axes), (*self.in_names, "lora_rank")),
            (*in_shape, self.rank),
            self.param_dtype,
        )  # [*in, rank]
        b = self.param(
            "b",
            nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", *self.out_names)),
            (self.rank, *features),
            self.param_dtype,
        )  # [rank, *out]
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        x, a, b = x.astype(self.dtype), a.astype(self.dtype), b.astype(self.dtype)
        lead = x.shape[: x.ndim - self.num_in_axes]
        h = x.reshape(*lead, -1) @ a.reshape(-1, self.rank)  # [..., rank]
        out = (h @ b.reshape(self.rank, -1)).reshape(*lead, *features)  # [..., *out]
        return out * jnp.asarray(self.scale, self.dtype) if self.alpha is not None else out


def lora_delta(config: LoRAConfig, name: str, x, features: tuple[int, ...], in_names: tuple, out_names: tuple, *,
               dtype, param_dtype, deterministic: bool):
    """The LoRA delta [..., *features] of the base projection `name` on x [..., *in], as the child
    `{name}_lora` of the calling compact module (len(in_names) trailing input axes)."""
    return LoRA(
        features, config.rank, num_in_axes=len(in_names), alpha=config.alpha, dropout=config.dropout,
        in_names=in_names, out_names=out_names, dtype=dtype, param_dtype=param_dtype, name=name + LORA_SUFFIX,
    )(x, deterministic)


def lora_delta_kernel(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
    """scale * A B reshaped to the base kernel's shape (float32).

    a: [*lead, *in, rank]; b: [*lead, rank, *out]; kernel: [*lead, *in, *out]. Leading axes
    (e.g. the layer axis of a scanned encoder) are batched.
    """
    num_lead = a.ndim + b.ndim - 2 - len(kernel_shape)
    if num_lead < 0 or a.shape[:num_lead] != b.shape[:num_lead] or a.shape[-1] != b.shape[num_lead]:
        raise ValueError(f"LoRA shapes a {a.shape}, b {b.shape} do not fit a kernel of shape {kernel_shape}.")
    lead = a.shape[:num_lead]
    rank = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(*lead, -1, rank)
    b2 = b.astype(jnp.float32).reshape(*lead, rank, -1)
    delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)  # [*lead, prod(in), prod(out)]
    if delta.size != math.prod(kernel_shape):
        raise ValueError(f"LoRA shapes a {a.shape}, b {b.shape} do not fit a kernel of shape {kernel_shape}.")
    return (scale * delta).reshape(kernel_shape)


def fold_lora(params: Mapping, alpha: float | None = None) -> dict:
    """Folds every `X_lora/{a,b}` into its sibling `X/kernel` and drops the LoRA parameters.

    Args:
      params: the (unboxed) parameter tree of a model built with `LoRAConfig(rank > 0)`.
      alpha: the model's `LoRAConfig.alpha` (None: no scaling). The rank is read from `a`.

    Returns:
      A new tree for the same model with `LoRAConfig()` (rank 0); its outputs equal the LoRA model's
      in eval mode (up to float rounding).
    """

    def fold(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {}
        for key, value in tree.items():
            if key.endswith(LORA_SUFFIX):
                base = key[: -len(LORA_SUFFIX)]
                if base not in tree or "kernel" not in tree[base]:
                    raise ValueError(f"LoRA parameters {key!r} have no sibling {base!r} with a kernel to fold into.")
                continue
            out[key] = fold(value)
        for key, value in tree.items():
            if not key.endswith(LORA_SUFFIX):
                continue
            base = key[: -len(LORA_SUFFIX)]
            kernel = out[base]["kernel"]
            a, b = value["a"], value["b"]
            scale = 1.0 if alpha is None else float(alpha) / a.shape[-1]
            delta = lora_delta_kernel(a, b, kernel.shape, scale)
            out[base] = {**out[base], "kernel": (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)}
        return out

    return fold(params)


def lora_trainable_pattern(extras: Sequence[str] = ("head",), lora: bool = True) -> str:
    """Regex for `config.trainable` (optim.trainable_mask): LoRA parameters plus named extras.

    A path matches if one of its '/'-separated components is a LoRA module (`*_lora`), or
    equals an extra name, or starts with extra + '_' (so 'pyra' selects `pyra_w_r`, `pyra_w_d`,
    `pyra_norm_scale`, ...; 'head' selects the classifier). E.g.
    `lora_trainable_pattern(("head", "pyra"))` is PYRA's "LoRA + PYRA + head" recipe.
    """
    parts = []
    if lora:
        parts.append(rf"(^|/)[^/]*{LORA_SUFFIX}(/|$)")
    if extras:
        names = "|".join(re.escape(e) for e in extras)
        parts.append(rf"(^|/)({names})(_[^/]*)?(/|$)")
    if not parts:
        raise ValueError("lora_trainable_pattern: nothing selected; pass lora=True or some extras.")
    return "|".join(parts)
