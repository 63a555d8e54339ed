"""A synthetic product-page environment for ad blending with externalities (spec P2), in JAX.

A request is one page of S slots (default 10) of a recommendation module. The platform has
M = S organic candidates, already ranked by the recommender, and N candidate ads (default 6),
each with a bid. K of the slots (default 3, `ad_slots`) may show an ad; every other slot, and
any ad slot left without an ad, shows the next organic item in rank order. An allocation is
therefore `assignment` int [K]: for each ad slot an ad index in [0, N) or -1 (organic), no
ad twice. With K = 3 and N = 6 there are 1 + 3*6 + 3*30 + 120 = 229 allocations.

Ground-truth click probabilities (documented; the click model must learn them from logs):

    q_i      = sigmoid(<u, x_i> + type_bias_i)                     relevance of item i to the user
    decay(s) = position_decay ** s                                  s = 0..S-1 (slot index)
    ext_i    = gamma * (number of neighbours in slots s-1, s+1 of i's category) / 2
    ctr_i    = clip(q_i * decay(s_i) * (1 - ext_i), 0, 1)

gamma > 0 is *competition* (a similar item next to i takes clicks from it), gamma < 0
*complementarity* (similar neighbours raise i's clicks), gamma = 0 is the separable
position model CTR = q_i * decay(s) used by the spec's invariants. `variant` names these.

Draws (all seeded through one `jax.random` key): user u ~ N(0, I_D) / sqrt(D) * user_scale;
C categories with centres c_k ~ N(0, I_D); an item of category k has x = c_k + N(0, I_D) * 0.5;
ad categories are the page's anchor category with probability `anchor_share` (detail-page ads
are often alike), else uniform; organic categories likewise with their own share; bids ~
LogNormal(bid_mu, bid_sigma). Organic items are ranked by q (the recommender is perfect).

Logs for the click model come from a *random* logging policy (`random_assignment`: each ad
slot shows an ad with probability `log_ad_rate`, ads uniformly without replacement), so that
the externality is identifiable from the logs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = {"competition": 0.6, "complementarity": -0.6, "none": 0.0}  # gamma per variant


def env_errors(env) -> list[str]:
    """Problems with an `env` config section (empty when valid)."""
    errors = []
    if env.variant not in VARIANTS:
        errors.append(f"env.variant={env.variant!r}: expected one of {sorted(VARIANTS)}")
    slots = list(env.ad_slots)
    if not slots or len(set(slots)) != len(slots) or min(slots) < 0 or max(slots) >= env.num_slots:
        errors.append(f"env.ad_slots={tuple(slots)}: distinct slot indices in [0, {env.num_slots}) expected")
    if len(slots) > env.num_ads:
        errors.append(f"env.ad_slots has {len(slots)} slots but env.num_ads={env.num_ads}: need num_ads >= slots")
    for key in ("num_slots", "num_ads", "num_categories", "feature_dim"):
        if env[key] < 1:
            errors.append(f"env.{key}={env[key]} must be >= 1")
    for key in ("position_decay", "anchor_share", "log_ad_rate"):
        if not 0.0 <= env[key] <= 1.0:
            errors.append(f"env.{key}={env[key]} must be in [0, 1]")
    return errors


class EnvParams(NamedTuple):
    """Static numbers of the environment, read from the config once."""

    num_slots: int
    ad_slots: tuple[int, ...]
    num_ads: int
    num_categories: int
    feature_dim: int
    gamma: float
    user_scale: float
    ad_bias: float
    organic_bias: float
    position_decay: float
    anchor_share: float
    bid_mu: float
    bid_sigma: float
    log_ad_rate: float

    @classmethod
    def from_config(cls, env) -> "EnvParams":
        errors = env_errors(env)
        if errors:
            raise ValueError("; ".join(errors))
        fields = {k: env[k] for k in cls._fields if k not in ("gamma", "ad_slots")}
        return cls(gamma=VARIANTS[env.variant], ad_slots=tuple(int(s) for s in env.ad_slots), **fields)


class Page(NamedTuple):
    """One request (add a leading batch axis for many). D = feature_dim, N ads, M = S organic."""

    user: jax.Array  # [D]
    ad_x: jax.Array  # [N, D] ad item features
    ad_cat: jax.Array  # [N] int ad categories
    bid: jax.Array  # [N] bids per click
    org_x: jax.Array  # [M, D] organic features, in the recommender's rank order
    org_cat: jax.Array  # [M] int


class Layout(NamedTuple):
    """What a page shows under one assignment, slot by slot ([S] each, or [B, S])."""

    x: jax.Array  # [S, D] item features
    cat: jax.Array  # [S] int category
    is_ad: jax.Array  # [S] bool
    ad: jax.Array  # [S] int ad index, -1 for organic slots
    bid: jax.Array  # [S] bid of the ad in the slot, 0 for organic slots


def category_centres(seed: int, p: EnvParams) -> jax.Array:
    """[C, D] category centres, fixed per environment seed (shared by every page)."""
    return jax.random.normal(jax.random.key(seed), (p.num_categories, p.feature_dim))


def sample_page(key, centres: jax.Array, p: EnvParams) -> Page:
    """Draw one request. centres [C, D] from `category_centres`."""
    k_user, k_anchor, k_cat, k_x, k_bid = jax.random.split(key, 5)
    n, m, d, c = p.num_ads, p.num_slots, p.feature_dim, p.num_categories
    user = jax.random.normal(k_user, (d,)) * p.user_scale / np.sqrt(d)
    anchor = jax.random.randint(k_anchor, (), 0, c)
    k_a1, k_a2, k_o1, k_o2 = jax.random.split(k_cat, 4)

    def categories(k_share, k_uniform, size):
        use_anchor = jax.random.uniform(k_share, (size,)) < p.anchor_share
        return jnp.where(use_anchor, anchor, jax.random.randint(k_uniform, (size,), 0, c))

    ad_cat, org_cat = categories(k_a1, k_a2, n), categories(k_o1, k_o2, m)
    noise = jax.random.normal(k_x, (n + m, d)) * 0.5
    ad_x = centres[ad_cat] + noise[:n]
    org_x = centres[org_cat] + noise[n:]
    order = jnp.argsort(-(org_x @ user))  # the recommender ranks organic items by relevance
    bid = jnp.exp(p.bid_mu + p.bid_sigma * jax.random.normal(k_bid, (n,)))
    return Page(user, ad_x, ad_cat, bid, org_x[order], org_cat[order])


@functools.partial(jax.jit, static_argnames=("p", "num"))
def sample_pages(key, centres: jax.Array, p: EnvParams, num: int) -> Page:
    """`num` requests, each field with a leading [num] axis (one compiled program)."""
    return jax.vmap(lambda k: sample_page(k, centres, p))(jax.random.split(key, num))


def layout(page: Page, assignment: jax.Array, p: EnvParams) -> Layout:
    """The displayed list for assignment [K] (ad index or -1 per ad slot). Organic items fill the
    remaining slots in rank order. Works on one page; vmap for batches."""
    ad_in_slot = jnp.full((p.num_slots,), -1, jnp.int32).at[jnp.array(p.ad_slots)].set(assignment)
    is_ad = ad_in_slot >= 0
    org_rank = jnp.cumsum(~is_ad) - 1  # the k-th organic slot shows organic item k
    ad_idx = jnp.maximum(ad_in_slot, 0)
    x = jnp.where(is_ad[:, None], page.ad_x[ad_idx], page.org_x[org_rank])
    cat = jnp.where(is_ad, page.ad_cat[ad_idx], page.org_cat[org_rank])
    bid = jnp.where(is_ad, page.bid[ad_idx], 0.0)
    return Layout(x, cat, is_ad, ad_in_slot, bid)


def relevance(user: jax.Array, lay: Layout, p: EnvParams) -> jax.Array:
    """q [S]: the position- and context-free click propensity of each displayed item."""
    bias = jnp.where(lay.is_ad, p.ad_bias, p.organic_bias)
    return jax.nn.sigmoid(lay.x @ user + bias)


def true_ctr(user: jax.Array, lay: Layout, p: EnvParams) -> jax.Array:
    """Ground-truth click probabilities [S] of a displayed list (see the module docstring)."""
    q = relevance(user, lay, p)
    decay = p.position_decay ** jnp.arange(p.num_slots)
    same = lay.cat[:, None] == lay.cat[None, :]
    s = jnp.arange(p.num_slots)
    neighbour = jnp.abs(s[:, None] - s[None, :]) == 1
    ext = p.gamma * jnp.sum(same & neighbour, axis=1) / 2.0
    return jnp.clip(q * decay * (1.0 - ext), 0.0, 1.0)


def random_assignment(key, p: EnvParams, ad_rate: float | None = None) -> jax.Array:
    """The logging policy: each ad slot shows an ad with probability `ad_rate` (default
    p.log_ad_rate); ads are drawn uniformly without replacement. Returns [K] int."""
    k_show, k_perm = jax.random.split(key)
    rate = p.log_ad_rate if ad_rate is None else ad_rate
    show = jax.random.uniform(k_show, (len(p.ad_slots),)) < rate
    ads = jax.random.permutation(k_perm, p.num_ads)[: len(p.ad_slots)]
    return jnp.where(show, ads, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("p", "num"))
def _click_log(key, centres, p: EnvParams, num: int) -> dict:
    k_page, k_assign, k_click = jax.random.split(key, 3)
    pages = sample_pages(k_page, centres, p, num)
    assignments = jax.vmap(lambda k: random_assignment(k, p))(jax.random.split(k_assign, num))
    lays = jax.vmap(lambda pg, a: layout(pg, a, p))(pages, assignments)
    ctr = jax.vmap(lambda u, lay: true_ctr(u, lay, p))(pages.user, lays)
    label = jax.random.uniform(k_click, ctr.shape) < ctr
    return {
        "user": pages.user,  # [B, D]
        "x": lays.x,  # [B, S, D]
        "cat": lays.cat,  # [B, S]
        "is_ad": lays.is_ad,  # [B, S]
        "label": label,  # [B, S] clicks
        "ctr": ctr,  # [B, S] true click probabilities (the oracle)
    }


LOG_CHUNK = 1000  # pages per compiled generator call (one compilation serves every log size)


def click_log(seed: int, p: EnvParams, num: int, stream: int = 0) -> dict[str, np.ndarray]:
    """Impression logs of `num` pages under the random logging policy, as NumPy arrays:
    user [B, D] float32, x [B, S, D] float32, cat [B, S] int32, is_ad [B, S] bool,
    label [B, S] float32 (clicks), ctr [B, S] float32 (ground truth, for the oracle row only).
    `seed` fixes the environment (category centres), `stream` the pages (use one per split).
    Pages are drawn in chunks of LOG_CHUNK, so a log is a prefix of any longer log of its stream."""
    centres = category_centres(seed, p)
    key = jax.random.fold_in(jax.random.key(seed), 1 + stream)
    chunks = [jax.device_get(_click_log(jax.random.fold_in(key, i), centres, p, LOG_CHUNK))
              for i in range(-(-num // LOG_CHUNK))]
    out = {k: np.concatenate([c[k] for c in chunks])[:num] for k in chunks[0]}
    out["label"] = out["label"].astype(np.float32)
    out["is_ad"] = out["is_ad"].astype(bool)
    return out
