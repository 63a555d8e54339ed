"""A seeded click-log generator with planted structure for user-behaviour CTR models (KFAtt).

    log = generate(SIZES["small"], seed=0)        # {'train', 'val', 'test'}: dicts of raw arrays
    log["test"]["new"]                            # per-example slice flags

World. C leaf categories in G groups (C/G categories per group, a two-level taxonomy); category
popularity is Zipf-like, so some categories are rare ("infreq"). Every category c has a centre
u_c = a_{g(c)} + noise (categories of one group are alike), a global preference vector m_c and
a global bias b_c. Items belong to one category each, with latent z_i = u_c + N(0, I) (item
ids are `c * items_per_category + j`). Users have one or two interest groups; their click
history draws categories of those groups by popularity and items uniformly within a category.
A fraction of users has a *habit*: one item of an interest group clicked again and again
(`repeat_range` times), interleaved with the other clicks.

Labels (the planted rule). An impression of item j of category c for user u is clicked with
probability sigmoid(alpha <z_j, v*> + b_c + bias), where v* is the user's interest under c,
the posterior mean of a KFAtt-freq measurement model with *known* parameters:

    prior      v ~ N(m_c, 1/prior_precision)                    (global per-category preference)
    sensors    each distinct history category c' with n clicks of mean latent z_bar:
               system precision P(c, c') = same_precision (c' = c), group_precision (same group),
               0 (other groups: irrelevant); random error variance random_var per click
    v*       = (prior_precision m_c + sum_c' w_c' z_bar_c') / (prior_precision + sum_c' w_c'),
               w_c' = 1 / (1/P(c, c') + random_var / n_c')

so (1) a target whose category is absent from the history ("new") is driven by the global
per-category preference m_c, b_c, mixed with same-group evidence in proportion to its
strength: the prior of KFAtt-base helps there; (2) a habit item repeated n times counts as
one capped sensor, not n measurements: frequency capping (KFAtt-freq) helps where a frequent
same-group habit sits next to a rare relevant behaviour ("repeat"). Targets are drawn from a
history category (40 %), the user's interest groups (30 %, half of them the habit's group for
habit users) or global popularity (30 %). A clicked impression joins the user's history
before the next one (a click log, in time order).

Splits: 'time' (per user the last `eval_impressions` impressions are test, the ones before
val, the rest train; the DIN/DIEN protocol, with two test impressions per user so that gAUC
is defined) or 'user' (users split 80/10/10). Examples carry raw ids (`user`,
`item`, `cat`, `hist_item`/`hist_cat` [N, maxlen] holding the most recent clicks, padded with
-1), `label`, `time` (impression index), `oracle_logit` (the planted logit: the Bayes ceiling)
and per-example slice flags: `new` (target category absent from the history), `repeat` (the
history holds an item of another category of the target's group clicked >= repeat_flag times)
and `infreq` (the target category is among the rarest: fewer training impressions than the
`infreq_quantile` quantile over categories).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jdjax.nn.ctr.features import SparseFeat, VarLenFeat

PAD = -1


@dataclass(frozen=True)
class ClickLogSize:
    num_users: int
    num_categories: int
    num_groups: int
    items_per_category: int
    impressions_per_user: int
    eval_impressions: int = 2  # 'time' split: the last ones per user are test, the ones before val
    history_range: tuple[int, int] = (3, 20)  # clicks before the first impression
    maxlen: int = 30


SIZES = {
    "tiny": ClickLogSize(num_users=100, num_categories=12, num_groups=4, items_per_category=10, impressions_per_user=8, maxlen=12),
    "small": ClickLogSize(num_users=5000, num_categories=40, num_groups=8, items_per_category=40, impressions_per_user=10),
    "medium": ClickLogSize(num_users=30000, num_categories=60, num_groups=10, items_per_category=80, impressions_per_user=10),
    "large": ClickLogSize(num_users=200000, num_categories=120, num_groups=20, items_per_category=150, impressions_per_user=10, maxlen=50),
}


@dataclass(frozen=True)
class Planted:
    """Constants of the planted world and label rule (see the module docstring)."""

    latent_dim: int = 8
    category_noise: float = 0.7  # spread of category centres around their group centre
    habit_fraction: float = 0.35  # users with a habit item
    repeat_range: tuple[int, int] = (8, 20)
    prior_precision: float = 1.0
    same_precision: float = 4.0
    group_precision: float = 0.5
    random_var: float = 1.0
    alpha: float = 0.35  # scale of <z_j, v*>
    bias: float = -1.5
    repeat_flag: int = 5  # `repeat` slice: another same-group item clicked at least this often
    infreq_quantile: float = 0.25


def features(embedding_dim: int, maxlen: int) -> tuple:
    """The feature declarations of the click log (item and category tables shared with history)."""
    return (
        SparseFeat("user", embedding_dim),
        SparseFeat("item", embedding_dim),
        SparseFeat("cat", embedding_dim),
        VarLenFeat("hist_item", maxlen, embedding_dim, embedding_name="item", pad_value=PAD),
        VarLenFeat("hist_cat", maxlen, embedding_dim, embedding_name="cat", pad_value=PAD),
    )


class World:
    """The world of one seed: taxonomy, popularity, latents z_i, preferences m_c, biases b_c and the
    precision table P(c, c') of the planted label rule."""

    def __init__(self, size: ClickLogSize, planted: Planted, rng: np.random.Generator):
        c, g, r = size.num_categories, size.num_groups, planted.latent_dim
        if c % g:
            raise ValueError(f"num_categories={c} must be a multiple of num_groups={g}.")
        self.size, self.planted = size, planted
        self.group = np.arange(c) // (c // g)  # [C]
        self.popularity = 1.0 / (rng.permutation(c) + 3.0)  # Zipf-like, random order
        centres = rng.normal(size=(g, r))
        self.centre = centres[self.group] + planted.category_noise * rng.normal(size=(c, r))  # [C, r]
        self.pref = rng.normal(size=(c, r)) * 0.7  # m_c
        self.cat_bias = rng.normal(size=c) * 0.7  # b_c
        ipc = size.items_per_category
        self.item_cat = np.repeat(np.arange(c), ipc)  # [I]
        self.z = self.centre[self.item_cat] + rng.normal(size=(c * ipc, r))  # [I, r]
        precision = np.where(self.group[:, None] == self.group[None, :], planted.group_precision, 0.0)
        np.fill_diagonal(precision, planted.same_precision)
        self.precision = precision  # P(c, c') [C, C]

    def sample_categories(self, groups: np.ndarray, rng) -> np.ndarray:
        """One category per entry of `groups` [...], by popularity within the group."""
        per = self.size.num_categories // self.size.num_groups
        pop = self.popularity.reshape(-1, per)[groups]  # [..., per]
        cdf = np.cumsum(pop / pop.sum(-1, keepdims=True), -1)
        idx = (rng.random(groups.shape)[..., None] > cdf).sum(-1)
        return groups * per + np.minimum(idx, per - 1)

    def sample_items(self, cats: np.ndarray, rng) -> np.ndarray:
        return cats * self.size.items_per_category + rng.integers(0, self.size.items_per_category, cats.shape)

    def oracle_logit(self, item, cat, counts, sums) -> np.ndarray:
        """The planted logit [n] of items [n] of categories [n] given the visible history's clicks
        per category counts [n, C] and their latent sums [n, C, r]."""
        p = self.planted
        prec = self.precision[cat]  # [U, C]
        with np.errstate(divide="ignore"):
            w = np.where((counts > 0) & (prec > 0), 1.0 / (1.0 / np.maximum(prec, 1e-12) + p.random_var / np.maximum(counts, 1)), 0.0)
        z_bar = sums / np.maximum(counts, 1)[..., None]
        v = (p.prior_precision * self.pref[cat] + np.einsum("uc,ucr->ur", w, z_bar)) / (p.prior_precision + w.sum(-1))[:, None]
        return p.alpha * np.einsum("ur,ur->u", self.z[item], v) + self.cat_bias[cat] + p.bias


def make_world(size: ClickLogSize | str, seed: int = 0, planted: Planted = Planted()) -> World:
    """The world `generate(size, seed, planted=planted)` draws its users from."""
    return World(SIZES[size] if isinstance(size, str) else size, planted, np.random.default_rng([seed, 0]))


CHUNK_USERS = 10_000  # users are independent; they are generated in chunks to bound memory


def generate(size: ClickLogSize | str, seed: int = 0, split: str = "time", planted: Planted = Planted()) -> dict:
    """The click log as {'train', 'val', 'test'} -> dict of arrays (see the module docstring)."""
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"click-log size {size!r} is unknown; choose one of {sorted(SIZES)}.")
        size = SIZES[size]
    if split not in ("time", "user"):
        raise ValueError(f"click-log split must be 'time' or 'user', got {split!r}.")
    world = make_world(size, seed, planted)
    chunks = []
    for i, first in enumerate(range(0, size.num_users, CHUNK_USERS)):
        users = np.arange(first, min(first + CHUNK_USERS, size.num_users))
        chunks.append(_user_impressions(world, users, np.random.default_rng([seed, 1, i])))
    examples = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    splits = _split(examples, split, size, seed)
    _mark_infreq(splits, size.num_categories, planted.infreq_quantile)
    return splits


def _user_impressions(world: World, users: np.ndarray, rng: np.random.Generator) -> dict:
    """All impressions of `users`, user-major ([user, impression] flattened)."""
    size, planted = world.size, world.planted
    n, k_imp, t_max = len(users), size.impressions_per_user, size.maxlen
    lo, hi = size.history_range
    capacity = hi + planted.repeat_range[1] + k_imp
    rows_n = np.arange(n)

    # Initial histories: clicks from 1-2 interest groups, plus a habit item for some users.
    interests = rng.integers(0, size.num_groups, (n, 2))
    interests[:, 1] = np.where(rng.random(n) < 0.5, interests[:, 1], interests[:, 0])
    length = rng.integers(lo, hi + 1, n)
    slot = np.arange(capacity)[None]
    click_groups = np.take_along_axis(interests, rng.integers(0, 2, (n, capacity)), 1)
    clicks = world.sample_items(world.sample_categories(click_groups, rng), rng)  # [n, capacity]
    habit = rng.random(n) < planted.habit_fraction
    habit_item = world.sample_items(world.sample_categories(interests[:, 0], rng), rng)
    repeats = np.where(habit, rng.integers(planted.repeat_range[0], planted.repeat_range[1] + 1, n), 0)
    total = length + repeats
    # Habit clicks take `repeats` random positions among the first `total`.
    order = np.where(slot < total[:, None], rng.random((n, capacity)), 2.0)
    rank = np.argsort(np.argsort(order, 1), 1)
    clicks = np.where(rank < repeats[:, None], habit_item[:, None], clicks)
    clicks = np.where(slot < total[:, None], clicks, PAD)

    rows = []
    for k in range(k_imp):
        # The visible history: the most recent maxlen clicks, oldest first, padded at the end.
        start = np.maximum(total - t_max, 0)
        pos = start[:, None] + np.arange(t_max)[None]
        hist = np.where(pos < total[:, None], np.take_along_axis(clicks, np.minimum(pos, capacity - 1), 1), PAD)
        valid = hist != PAD
        hist_cat = np.where(valid, world.item_cat[np.maximum(hist, 0)], PAD)

        # Target category: a history click's (40 %), an interest group's (30 %; the habit's group for
        # half of the habit users), or global popularity (30 %).
        pick = rng.random(n)
        from_history = hist_cat[rows_n, (rng.random(n) * valid.sum(1)).astype(int)]
        group = np.where(habit & (rng.random(n) < 0.5), interests[:, 0], interests[rows_n, rng.integers(0, 2, n)])
        from_interest = world.sample_categories(group, rng)
        from_global = rng.choice(size.num_categories, n, p=world.popularity / world.popularity.sum())
        cat = np.where(pick < 0.4, from_history, np.where(pick < 0.7, from_interest, from_global))
        item = world.sample_items(cat, rng)

        counts = np.zeros((n, size.num_categories))
        sums = np.zeros((n, size.num_categories, planted.latent_dim))
        flat_rows, flat_cats = np.repeat(rows_n, t_max), np.maximum(hist_cat, 0).ravel()
        np.add.at(counts, (flat_rows, flat_cats), valid.ravel())
        np.add.at(sums, (flat_rows, flat_cats), (world.z[np.maximum(hist, 0)] * valid[..., None]).reshape(-1, planted.latent_dim))
        logit = world.oracle_logit(item, cat, counts, sums)
        label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)

        same_group = valid & (world.group[np.maximum(hist_cat, 0)] == world.group[cat][:, None]) & (hist_cat != cat[:, None])
        item_count = (hist[:, :, None] == hist[:, None, :]).sum(-1)  # [n, T] occurrences of each behaviour's item
        rows.append(dict(
            user=users, item=item, cat=cat, hist_item=hist, hist_cat=hist_cat, label=label,
            time=np.full(n, k), oracle_logit=logit.astype(np.float32),
            new=~(hist_cat == cat[:, None]).any(1),
            repeat=(same_group & (item_count >= planted.repeat_flag)).any(1),
        ))
        clicked = label > 0  # a click joins the history
        clicks[rows_n[clicked], total[clicked]] = item[clicked]
        total = total + clicked
    return {key: np.stack([r[key] for r in rows], 1).reshape(n * k_imp, *rows[0][key].shape[1:]) for key in rows[0]}


def _split(examples: dict, how: str, size: ClickLogSize, seed: int) -> dict:
    if how == "time":
        t, k, e = examples["time"], size.impressions_per_user, size.eval_impressions
        if k <= 2 * e:
            raise ValueError(f"impressions_per_user={k} leaves no training impressions after 2 x {e} for val and test.")
        parts = {"train": t < k - 2 * e, "val": (t >= k - 2 * e) & (t < k - e), "test": t >= k - e}
    else:
        num_users = size.num_users
        order = np.random.default_rng([seed, 2]).permutation(num_users)
        n_val = n_test = max(1, num_users // 10)
        which = np.empty(num_users, np.int64)
        which[order[:n_test]], which[order[n_test : n_test + n_val]], which[order[n_test + n_val :]] = 2, 1, 0
        u = which[examples["user"]]
        parts = {"train": u == 0, "val": u == 1, "test": u == 2}
    return {name: {k: v[sel] for k, v in examples.items()} for name, sel in parts.items()}


def _mark_infreq(splits: dict, num_categories: int, quantile: float) -> None:
    counts = np.bincount(splits["train"]["cat"], minlength=num_categories)
    rare = counts < np.quantile(counts, quantile)
    for arrays in splits.values():
        arrays["infreq"] = rare[arrays["cat"]]


# ---------------------------------------------------------------------------------------------
# Multi-scene click log (DADNN)


@dataclass(frozen=True)
class SceneLogSize:
    num_users: int
    num_items: int
    num_categories: int
    num_impressions: int
    scene_shares: tuple[float, ...] = (0.45, 0.30, 0.24, 0.01)  # the last scene is the long tail
    # Extra impressions of the long-tail scene in val and in test (none in train): at a 1 % share
    # the natural 10 % eval split holds ~300 of them, an AUC with a sampling sd of ~0.03.
    tail_eval_impressions: int = 0


SCENE_SIZES = {
    "tiny": SceneLogSize(num_users=100, num_items=60, num_categories=6, num_impressions=3000, tail_eval_impressions=200),
    "small": SceneLogSize(num_users=3000, num_items=800, num_categories=20, num_impressions=300_000, tail_eval_impressions=10_000),
    "medium": SceneLogSize(num_users=20000, num_items=4000, num_categories=40, num_impressions=1_000_000,
                           tail_eval_impressions=20_000),
}


def scene_features(embedding_dim: int) -> tuple:
    """Declarations of the multi-scene log: user, item, category and the scene id itself."""
    return (
        SparseFeat("user", embedding_dim),
        SparseFeat("item", embedding_dim),
        SparseFeat("cat", embedding_dim),
        SparseFeat("scene", embedding_dim),
    )


def generate_scenes(size: SceneLogSize | str, seed: int = 0, latent_dim: int = 6, tail_relatedness: float = 0.8) -> dict:
    """A multi-scene click log with planted shared and scene-specific structure.

    Each impression (user u, item i of category c, scene s; scenes drawn by `scene_shares`, the
    last one a 1 % long tail) is clicked with probability sigmoid(logit),

        logit = 0.6 <b_u, a_i>  +  0.6 <c_s, a_i> + d_{s, c}  - 0.5
                (shared: every scene)   (scene-specific taste over items and categories)

    The big scenes' tastes (c_s, d_s) are independent draws. The long tail's taste is related to
    them, as a small channel's audience is a blend of the main ones': (c_tail, d_tail) =
    sqrt(rho) * sum_s pi_s (c_s, d_s) / |pi| + sqrt(1 - rho) * (its own draw), rho =
    `tail_relatedness`, pi ~ Dirichlet(1) over the big scenes (fixed per seed), scaled so the tail's
    taste has the spread of one scene's. So a single mixed model has to learn the scene terms from
    the scene id, per-scene towers see little data in the tail scene, and the tail's taste can be
    learned from the big scenes' (what a shared bottom, MMoE gates and knowledge transfer are for).
    rho = 0 makes the tail an unrelated scene, whose 6-d direction c_tail and category offsets
    must be learned from its ~2.4k training impressions alone (test AUC on the tail then varies
    by ~0.03 across training seeds, whatever the test size).

    Caveat (measured): with ~80 training impressions per user, none of the DADNN models learns the
    shared user x item product <b_u, a_i>; their AUC per scene is close to that of the scene-specific
    logit alone, and the gap to the oracle (the planted logit) is that term.

    Impressions are split 80/10/10 at random; val and test each get `tail_eval_impressions` more of
    the tail scene (drawn apart, so the training data is unchanged), so that its AUC is measurable:
    the pooled val/test metrics over-weight the tail accordingly (a quarter of the small log's). `scene`
    holds the scene index and `scene<k>` flags slice the metrics; `oracle_logit` is the planted logit.
    """
    if isinstance(size, str):
        if size not in SCENE_SIZES:
            raise ValueError(f"scene-log size {size!r} is unknown; choose one of {sorted(SCENE_SIZES)}.")
        size = SCENE_SIZES[size]
    if not 0.0 <= tail_relatedness <= 1.0:
        raise ValueError(f"tail_relatedness must be in [0, 1], got {tail_relatedness}.")
    rng = np.random.default_rng([seed, 10])
    shares = np.asarray(size.scene_shares, np.float64)
    num_scenes = len(shares)
    user_latent = rng.normal(size=(size.num_users, latent_dim)) / np.sqrt(latent_dim) * 1.5
    item_latent = rng.normal(size=(size.num_items, latent_dim))
    item_cat = rng.integers(0, size.num_categories, size.num_items)
    scene_latent = rng.normal(size=(num_scenes, latent_dim)) / np.sqrt(latent_dim) * 1.5
    scene_cat = rng.normal(size=(num_scenes, size.num_categories))
    if num_scenes > 1:  # the long tail's taste: a blend of the other scenes' plus its own part
        blend = np.random.default_rng([seed, 13]).dirichlet(np.ones(num_scenes - 1))
        blend = blend / np.sqrt(np.sum(blend**2))  # unit norm: the blend of independent tastes keeps their spread
        r = tail_relatedness
        scene_latent[-1] = np.sqrt(r) * blend @ scene_latent[:-1] + np.sqrt(1 - r) * scene_latent[-1]
        scene_cat[-1] = np.sqrt(r) * blend @ scene_cat[:-1] + np.sqrt(1 - r) * scene_cat[-1]

    def impressions(n, rng, scene=None):
        user = rng.integers(0, size.num_users, n)
        item = rng.integers(0, size.num_items, n)
        if scene is None:
            scene = rng.choice(num_scenes, n, p=shares / shares.sum())
        cat = item_cat[item]
        shared = 0.6 * np.einsum("nr,nr->n", user_latent[user], item_latent[item])
        specific = 0.6 * np.einsum("nr,nr->n", scene_latent[scene], item_latent[item]) + scene_cat[scene, cat]
        logit = shared + specific - 0.5
        label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        return dict(user=user, item=item, cat=cat, scene=scene, label=label, oracle_logit=logit.astype(np.float32))

    n = size.num_impressions
    examples = impressions(n, rng)
    part = np.random.default_rng([seed, 11]).random(n)
    splits = {"train": part < 0.8, "val": (part >= 0.8) & (part < 0.9), "test": part >= 0.9}
    out = {name: {k: v[sel] for k, v in examples.items()} for name, sel in splits.items()}
    if size.tail_eval_impressions:
        tail_rng = np.random.default_rng([seed, 12])
        for name in ("val", "test"):
            extra = impressions(size.tail_eval_impressions, tail_rng, np.full(size.tail_eval_impressions, num_scenes - 1))
            out[name] = {k: np.concatenate([v, extra[k]]) for k, v in out[name].items()}
    for arrays in out.values():
        for s in range(num_scenes):
            arrays[f"scene{s}"] = arrays["scene"] == s
    return out


# ---------------------------------------------------------------------------------------------
# Ad-image click log (CSCNN)


@dataclass(frozen=True)
class AdLogSize:
    num_users: int
    num_ads: int
    num_categories: int  # at most 12: one (colour, quadrant) cue each
    num_impressions: int
    image_size: int = 16


AD_SIZES = {
    "tiny": AdLogSize(num_users=50, num_ads=60, num_categories=4, num_impressions=2000),
    "small": AdLogSize(num_users=2000, num_ads=1500, num_categories=8, num_impressions=100_000),
    "medium": AdLogSize(num_users=10000, num_ads=6000, num_categories=12, num_impressions=500_000),
}


def ad_features(embedding_dim: int) -> tuple:
    """Declarations of the ad-image log: user, ad id and the ad's category (the image is an input)."""
    return (SparseFeat("user", embedding_dim), SparseFeat("ad", embedding_dim), SparseFeat("cat", embedding_dim))


def _blob(images, ad, channel, quadrant, rng, size):
    """Paints a 3x3 square of intensity 1 in `channel` at a random place inside `quadrant` (0..3)."""
    half = size // 2
    y0 = (quadrant // 2) * half + rng.integers(0, half - 3, len(ad))
    x0 = (quadrant % 2) * half + rng.integers(0, half - 3, len(ad))
    for dy in range(3):
        for dx in range(3):
            images[ad, y0 + dy, x0 + dx, channel] = 1.0


def generate_ads(size: AdLogSize | str, seed: int = 0) -> tuple[dict, np.ndarray]:
    """An ad-image click log whose clickable visual cue depends on the ad's category.

    Category k has a cue, a blob of colour k % 3 in quadrant (k // 3) % 4 (category A: red top
    left, category B: green top left, ...). Every ad image [S, S, 3] holds noise, two distractor
    blobs (random colour and quadrant, often another category's cue) and, for half of the ads,
    its own category's cue. An impression of ad a (category k) for user u is clicked with
    probability sigmoid(2 cue(a) + q_{u,k} + e_a - 1): cue(a) = 1 when the image holds the cue of
    k, q_{u,k} ~ N(0, 0.5^2) a user-category affinity, e_a ~ N(0, 0.3^2) an ad effect. The same
    blob means 'click' for one category and nothing for another, so the image must be read in
    the light of the category. Ads are split 70/15/15 into train/val/test, so val/test ads are
    unseen: their ad ids are out of vocabulary and only the image tells their cue.

    Returns (splits, images): splits {'train','val','test'} of per-impression arrays (`user`,
    `ad`, `cat`, `ad_index` (row of `images`), `label`, `oracle_logit`) and images
    [num_ads, S, S, 3] float32.
    """
    if isinstance(size, str):
        if size not in AD_SIZES:
            raise ValueError(f"ad-log size {size!r} is unknown; choose one of {sorted(AD_SIZES)}.")
        size = AD_SIZES[size]
    if size.num_categories > 12:
        raise ValueError(f"num_categories={size.num_categories}: at most 12 distinct (colour, quadrant) cues.")
    rng = np.random.default_rng([seed, 20])
    a, s = size.num_ads, size.image_size
    ad_cat = rng.integers(0, size.num_categories, a)
    images = (0.1 * rng.normal(size=(a, s, s, 3))).astype(np.float32)
    ads = np.arange(a)
    cue_of = lambda k: (k % 3, (k // 3) % 4)
    blobs = []
    for _ in range(2):
        colour, quadrant = rng.integers(0, 3, a), rng.integers(0, 4, a)
        _blob(images, ads, colour, quadrant, rng, s)
        blobs.append((colour, quadrant))
    own = rng.random(a) < 0.5
    colour, quadrant = cue_of(ad_cat)
    _blob(images, ads[own], colour[own], quadrant[own], rng, s)
    cue = own.copy()
    for c, q in blobs:
        cue |= (c == colour) & (q == quadrant)
    affinity = 0.5 * rng.normal(size=(size.num_users, size.num_categories))
    ad_effect = 0.3 * rng.normal(size=a)
    n = size.num_impressions
    user, ad = rng.integers(0, size.num_users, n), rng.integers(0, a, n)
    logit = 2.0 * cue[ad] + affinity[user, ad_cat[ad]] + ad_effect[ad] - 1.0
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    examples = dict(user=user, ad=ad, cat=ad_cat[ad], ad_index=ad.astype(np.int32), label=label,
                    oracle_logit=logit.astype(np.float32))
    part = np.random.default_rng([seed, 21]).random(a)[ad]
    splits = {"train": part < 0.7, "val": (part >= 0.7) & (part < 0.85), "test": part >= 0.85}
    return {name: {k: v[sel] for k, v in examples.items()} for name, sel in splits.items()}, images


# ---------------------------------------------------------------------------------------------
# Multi-scene logs from files (DADNN on real data)

SCENE_FILE_SPLITS = ("train", "val", "test")
SCENE_FILE_SUFFIXES = (".parquet", ".csv", ".csv.gz")


def _scene_file(data_dir: str, split: str) -> str:
    import os

    for suffix in SCENE_FILE_SUFFIXES:
        path = os.path.join(data_dir, split + suffix)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"no {split} file in {data_dir!r}: expected one of {', '.join(split + s for s in SCENE_FILE_SUFFIXES)}. A multi-scene "
        "log is one file per split (train, val, test) with a header row: a label column (0/1), a scene column, "
        "categorical feature columns and optional dense columns (--config.data.dense_columns)."
    )


def _read_columns(path: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Columns of a CSV (with header; values as strings) or Parquet file (native types), and the
    row numbers messages name: the line number in a CSV file (the header is line 1), the 0-based
    row index in a Parquet file (as pyarrow and pandas count)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or convert the file to CSV).") from e
        table = pq.read_table(path)
        columns = {name: np.asarray(table.column(name).to_numpy(zero_copy_only=False)) for name in table.column_names}
        return columns, np.arange(table.num_rows)
    import csv
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path} is empty; expected a header row and one row per impression.") from None
        rows, lines = [], []
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)  # the row's last line (a quoted field may span lines)
    bad = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if bad is not None:
        raise ValueError(f"{path}:{lines[bad]} has {len(rows[bad])} fields, the header {len(header)}; is the file corrupt?")
    cols = list(zip(*rows)) if rows else [()] * len(header)
    return {name: np.asarray(col, dtype=str) for name, col in zip(header, cols)}, np.asarray(lines, np.int64)


def _show_cell(value) -> str:
    """A cell for a message: 'an empty cell', or the repr of the plain Python value (not np.str_(...))."""
    value = value.item() if isinstance(value, np.generic) else value
    return "an empty cell" if isinstance(value, str) and not value.strip() else repr(value)


def _finite_column(path: str, column: str, values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`values` (strings from a CSV, native values from Parquet) as float32; the first cell that is
    not a finite float32 number (empty, text, NaN, inf, beyond float32) raises
    ValueError('file:row:column: not a finite number ...')."""
    try:
        parsed = values.astype(np.float64)
    except (TypeError, ValueError):  # an empty cell, text or None: parse cell by cell to find them
        parsed = np.empty(len(values), np.float64)
        for i, v in enumerate(values):
            try:
                parsed[i] = float(v)
            except (TypeError, ValueError):
                parsed[i] = np.nan
    with np.errstate(over="ignore", invalid="ignore"):
        out = parsed.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{path}:{rows[i]}:{column}: not a finite number ({_show_cell(values[i])}); {int(bad.sum())} of the column's {len(values)} "
            "cells are empty, text, NaN, inf or beyond float32. Fill or drop them in the file (e.g. impute the column's "
            "training mean and add a 0/1 missing-value column), then rerun."
        )
    return out


def scene_file_features(columns, embedding_dim: int, dense: tuple[str, ...] = ()) -> tuple:
    """Declarations for a multi-scene file: one SparseFeat per categorical column (the scene
    column, named 'scene', included), one DenseFeat per dense column."""
    from jdjax.nn.ctr.features import DenseFeat

    return tuple(DenseFeat(c, 1) if c in dense else SparseFeat(c, embedding_dim) for c in columns)


def load_scene_files(data_dir: str, embedding_dim: int, label: str = "label", scene: str = "scene", user: str = "user",
                     dense: tuple[str, ...] = ()) -> tuple[tuple, dict]:
    """A DADNN-style multi-scene log from `data_dir`: train / val / test as .parquet, .csv or .csv.gz.

    Every file holds the same columns: `label` (0/1 click), `scene` (scene id, any type),
    categorical feature columns (any type; ids unseen in training map to the OOV row) and the
    `dense` columns (floats). Every label and dense cell of every file is checked as it is read:
    an empty cell, text, NaN, inf or a value beyond float32 raises ValueError
    'file:row:column: not a finite number' (row: the CSV line number, header = line 1, or the
    0-based Parquet row), before anything is trained or written. The scene ids of the training
    file, sorted, become scene indices 0..S-1 (an unseen scene in val/test is an error); the
    returned arrays hold the index under 'scene' (also a feature) and a flag 'scene<k>' per scene
    for per-scene metrics. `user` groups the rows for gAUC when the column exists (otherwise all
    rows form one group, and gAUC equals AUC); it is a feature like any other categorical column.

    Returns (feature declarations, {'train', 'val', 'test'} -> dict of arrays).
    """
    paths = {split: _scene_file(data_dir, split) for split in SCENE_FILE_SPLITS}
    read = {split: _read_columns(path) for split, path in paths.items()}
    splits = {split: cols for split, (cols, _) in read.items()}
    names = list(splits["train"])
    for split, cols in splits.items():
        if list(cols) != names:
            raise ValueError(f"the {split} file's columns {list(cols)} differ from the train file's {names}.")
    missing = [c for c in (label, scene, *dense) if c not in names]
    if missing:
        raise ValueError(f"columns {missing} are not in the multi-scene files (columns: {names}); set "
                         "--config.data.label_column / scene_column / dense_columns to the right names.")
    scene_ids = np.unique(splits["train"][scene])
    out = {}
    for split, cols in splits.items():
        path, rows = paths[split], read[split][1]
        arrays: dict[str, np.ndarray] = {}
        arrays["label"] = _finite_column(path, label, cols[label], rows)
        not_binary = ~np.isin(arrays["label"], (0.0, 1.0))
        if not_binary.any():
            i = int(np.flatnonzero(not_binary)[0])
            raise ValueError(f"{path}:{rows[i]}:{label}: a label must be 0 or 1, got {_show_cell(cols[label][i])} "
                             f"({int(not_binary.sum())} such cells).")
        pos = np.clip(np.searchsorted(scene_ids, cols[scene]), 0, len(scene_ids) - 1)
        unseen = scene_ids[pos] != cols[scene]
        if unseen.any():
            raise ValueError(f"the {split} file has scenes {np.unique(cols[scene][unseen])[:5]} that are not in the train file.")
        arrays["scene"] = pos.astype(np.int64)
        for s in range(len(scene_ids)):
            arrays[f"scene{s}"] = pos == s
        for c in names:
            if c in (label, scene):
                continue
            arrays[c] = _finite_column(path, c, cols[c], rows) if c in dense else cols[c]
        if user not in names:
            arrays["user"] = np.zeros(len(arrays["label"]), np.int64)
        out[split] = arrays
    categorical = [c for c in names if c not in (label, scene) and c not in dense]
    return scene_file_features(["scene", *categorical, *dense], embedding_dim, tuple(dense)), out
