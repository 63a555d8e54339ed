"""CSCNN: category-specific CNN for CTR (JD.com, KDD 2020), and its baselines.

Every conv layer l of the image tower is followed by CBAM-style attention whose inputs include
learned per-layer, per-category priors (spec §2.1, a reconstruction):

    M_c = sigmoid(MLP([AvgPool_HW(F); A_c^{k,l}]) + MLP([MaxPool_HW(F); A_c^{k,l}]))   [B, C]
    F'  = M_c * F
    M_s = sigmoid(Conv7x7([AvgPool_C(F'); MaxPool_C(F'); A_s^{k,l}]))                  [B, H, W]
    F'' = M_s * F'

A_c^{k,l} [K, C'] and A_s^{k,l} [K, H*W] are tables indexed by the ad's category k (its encoded
id, so an unseen category falls back to the OOV row). 'cbam' drops the priors, 'cnn' drops the
attention. The visual vector joins the CTR MLP after its first layer (as in JD's production
model, spec §2.1). Ads shared by many samples of a batch are embedded once: with
`max_unique_images` > 0 the tower runs on the batch's distinct ads (by id) when there are at
most that many, and on every sample otherwise (both exact).

Serving (spec §2.2): an ad's image and category are fixed, so its visual vector can be computed
offline, once per ad, and looked up at request time with no CNN in the request path:

    table = precompute_visual(model, params, images, ad_categories)    # [num_ads, visual_dim], offline
    batch["visual"] = table[batch["ad_index"]]                         # online: a row gather
    logits, _ = model.apply({"params": params}, batch)                 # the tower is skipped

A batch that carries `visual` skips the tower; its logits equal the end-to-end model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.nn.ctr.embedding import Embeddings, concat_features
from jdjax.nn.ctr.features import TableSpec
from jdjax.nn.ctr.layers import MLP, activate

Dtype = Any
MODELS = ("no_image", "cnn", "cbam", "cscnn")


class CategoryAttention(nn.Module):
    """Channel then spatial attention on F [B, H, W, C], with category priors when `num_categories` > 0.

    Attributes:
      num_categories: rows of the prior tables (0: plain CBAM, no priors).
      prior_channels: C', width of the channel prior.
      reduction: r, the channel MLP's hidden width is C / r.
      kernel_size: of the spatial convolution.
    """

    num_categories: int = 0
    prior_channels: int = 8
    reduction: int = 4
    kernel_size: int = 7
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, f: jax.Array, category: jax.Array) -> tuple[jax.Array, dict]:
        """f [B, H, W, C], category [B] int -> (F'' [B, H, W, C], {'channel': [B, C], 'spatial': [B, H, W]})."""
        b, h, w, c = f.shape
        avg, mx = jnp.mean(f, axis=(1, 2)), jnp.max(f, axis=(1, 2))  # [B, C]
        if self.num_categories:
            init = nn.with_logical_partitioning(nn.initializers.normal(0.1), ("table_rows", None))
            a_c = self.param("channel_prior", init, (self.num_categories, self.prior_channels), self.param_dtype)
            a_s = self.param("spatial_prior", init, (self.num_categories, h * w), self.param_dtype)
            prior_c = jnp.take(a_c, category, axis=0).astype(f.dtype)  # [B, C']
            avg, mx = jnp.concatenate([avg, prior_c], -1), jnp.concatenate([mx, prior_c], -1)
        hidden = max(c // self.reduction, 1)
        mlp_in = nn.Dense(hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="channel_hidden",
                          kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), ("embed", None)),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))
        mlp_out = nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name="channel_out",
                           kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), (None, "embed")),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
        m_c = jax.nn.sigmoid(mlp_out(nn.relu(mlp_in(avg))) + mlp_out(nn.relu(mlp_in(mx))))  # [B, C]
        f = f * m_c[:, None, None, :]
        maps = [jnp.mean(f, axis=-1), jnp.max(f, axis=-1)]  # [B, H, W] each
        if self.num_categories:
            maps.append(jnp.take(a_s, category, axis=0).reshape(b, h, w).astype(f.dtype))
        conv = nn.Conv(1, (self.kernel_size, self.kernel_size), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), (None, None, None, None)),
                       name="spatial")
        m_s = jax.nn.sigmoid(conv(jnp.stack(maps, axis=-1)))[..., 0]  # [B, H, W]
        return f * m_s[..., None], {"channel": m_c, "spatial": m_s}


class ImageTower(nn.Module):
    """Conv 3x3 (stride 1, then 2) + ReLU per layer, each followed by (category) attention; global
    average pooling and a linear map to the visual vector [B, out_dim].

    Attributes:
      attention: 'cnn' (none), 'cbam' (no priors) or 'cscnn' (category priors).
      num_categories: rows of the prior tables ('cscnn').
    """

    channels: Sequence[int] = (16, 32, 32)
    out_dim: int = 16
    attention: str = "cscnn"
    num_categories: int = 0
    prior_channels: int = 8
    reduction: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, category: jax.Array, bypass: bool = False) -> tuple[jax.Array, list]:
        """images [B, S, S, 3], category [B] -> (visual [B, out_dim], attention maps per layer).

        bypass=True skips every attention module (all gates 1): the plain CNN on the same weights.
        """
        if self.attention not in ("cnn", "cbam", "cscnn"):
            raise ValueError(f"ImageTower: attention must be 'cnn', 'cbam' or 'cscnn', got {self.attention!r}.")
        x, maps = images.astype(self.dtype), []
        for i, width in enumerate(self.channels):
            x = nn.Conv(width, (3, 3), strides=1 if i == 0 else 2, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), (None, None, None, "embed")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name=f"conv_{i}")(x)
            x = nn.relu(x)
            if self.attention != "cnn" and not bypass:
                rows = self.num_categories if self.attention == "cscnn" else 0
                x, m = CategoryAttention(rows, self.prior_channels, self.reduction, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=f"attention_{i}")(x, category)
                maps.append(m)
        x = jnp.mean(x, axis=(1, 2))
        out = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="out",
                       kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(x)
        return out, maps


def distinct_count(ids: jax.Array) -> jax.Array:
    """Number of distinct values in ids [B]."""
    s = jnp.sort(ids)
    return 1 + jnp.sum(s[1:] != s[:-1])


class ImageCTR(nn.Module):
    """CTR MLP over the feature embeddings with the ad image's visual vector after the first layer.

    Attributes:
      features, tables: declarations and tables; `category` names the ad-category feature whose
        encoded ids index the priors, `image` / `image_id` the batch inputs [B, S, S, 3] / [B].
      model: one of MODELS.
      visual: name of an optional input [B, visual_dim] of precomputed visual vectors
        (`precompute_visual`); when the batch has it, the image tower is not run.
    """

    features: tuple
    tables: tuple[TableSpec, ...]
    model: str = "cscnn"
    category: str = "cat"
    image: str = "image"
    image_id: str = "ad_index"
    visual: str = "visual"
    channels: Sequence[int] = (16, 32, 32)
    visual_dim: int = 16
    prior_channels: int = 8
    reduction: int = 4
    mlp_hidden: Sequence[int] = (64, 32)
    activation: str = "relu"
    max_unique_images: int = 0
    row_multiple: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> tuple[jax.Array, dict]:
        """Returns (logits [B], aux with 'maps': the attention maps of the distinct or all images)."""
        if self.model not in MODELS:
            raise ValueError(f"model.name={self.model!r} is not an image CTR model; choose one of {MODELS}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = Embeddings(self.features, self.tables, self.row_multiple, name="embeddings", **kw)(batch)
        x = concat_features(emb, self.features, batch)
        h = nn.Dense(self.mlp_hidden[0], name="fc_0", **kw,
                     kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
        h = activate(self.activation, h, train, "mlp", self.param_dtype, "act_0")
        aux = {}
        if self.model != "no_image":
            if self.visual in batch and not self.is_initializing():
                visual = batch[self.visual]  # [B, visual_dim], precomputed per ad (serving)
            else:
                visual, aux["maps"] = self._visual(self.image_tower(name="tower"), batch[self.image], batch[self.category],
                                                   batch[self.image_id])
            h = jnp.concatenate([h, visual.astype(h.dtype)], axis=-1)
        logits = MLP(self.mlp_hidden[1:], self.activation, out_features=1, in_axis="embed", name="mlp", **kw)(h, train)
        return logits[:, 0].astype(jnp.float32), aux

    def image_tower(self, name: str | None = None, standalone: bool = False) -> ImageTower:
        """The image tower of this model (its parameters are params['tower']); standalone=True
        builds an unbound copy to apply on its own (precompute_visual)."""
        rows = next(t.rows for t in self.tables if t.name == self._category_table())
        extra = {"parent": None} if standalone else {"name": name}
        return ImageTower(self.channels, self.visual_dim, self.model, -(-rows // self.row_multiple) * self.row_multiple,
                          self.prior_channels, self.reduction, dtype=self.dtype, param_dtype=self.param_dtype, **extra)

    def _category_table(self) -> str:
        for f in self.features:
            if f.name == self.category:
                return f.table
        raise ValueError(f"ImageCTR: no feature named {self.category!r} for the category priors.")

    def _visual(self, tower, images, category, ids):
        """The tower on each distinct image of the batch (when few enough), broadcast to its samples."""
        if not self.max_unique_images or self.is_initializing():
            return tower(images, category)
        u = self.max_unique_images
        _, first, inverse = jnp.unique(ids, size=u, fill_value=ids[0], return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)

        def distinct(module, images, category):
            v, maps = module(images[first], category[first])  # [U, D]
            return v[inverse], jax.tree.map(lambda m: m[inverse], maps)

        def every(module, images, category):
            return module(images, category)

        return nn.cond(distinct_count(ids) <= u, distinct, every, tower, images, category)


def precompute_visual(model: ImageCTR, params, images, categories, batch_size: int = 256):
    """The serving table of visual vectors: model's image tower on every ad image, offline.

    Args:
      model: the ImageCTR (not 'no_image').
      params: its parameters (the 'params' collection, or a dict holding it).
      images: [N, S, S, 3] one image per ad.
      categories: [N] each ad's *encoded* category id (as the model's category input).
      batch_size: ads per tower call.

    Returns:
      [N, visual_dim] float32 NumPy array; row n is ad n's visual vector, to be fed as
      batch[model.visual] = table[ad_index].
    """
    import numpy as np

    if model.model == "no_image":
        raise ValueError("precompute_visual: model 'no_image' has no image tower.")
    params = params.get("params", params)
    tower = model.image_tower(standalone=True)
    apply = jax.jit(lambda p, x, c: tower.apply({"params": p}, x, c)[0])
    n = len(images)
    if len(categories) != n:
        raise ValueError(f"precompute_visual: {n} images but {len(categories)} categories.")
    out = []
    for start in range(0, n, batch_size):
        x = np.asarray(images[start : start + batch_size], np.float32)
        c = np.asarray(categories[start : start + batch_size], np.int32)
        pad = batch_size - len(x) if n > batch_size else 0  # one compiled shape for every chunk
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
            c = np.concatenate([c, np.repeat(c[-1:], pad, 0)])
        out.append(np.asarray(apply(params["tower"], x, c))[: len(x) - pad])
    return np.concatenate(out).astype(np.float32)
