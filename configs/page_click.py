"""The ad-blending click model alone (spec P2): per-slot click prediction with externalities on the
logs of the synthetic page environment (jdjax/econ/page_env.py, jdjax/tasks/page_click.py).

    python -m jdjax.main --config=configs/page_click.py                      # context-aware model
    python -m jdjax.main --config=configs/page_click.py:no_context           # the baseline
    python -m jdjax.main --config=configs/page_click.py:variant=none,smoke

configs/ad_blending.py trains both models with these settings (`click_config`) and runs the
auctions on top; `env_config` is the environment section both share.
"""

import ml_collections

from configs import common


def env_config(variant: str = "competition") -> ml_collections.ConfigDict:
    """The page environment (section `env`; jdjax.econ.page_env.EnvParams.from_config reads it)."""
    c = ml_collections.ConfigDict()
    c.variant = variant  # competition | complementarity | none  (sets gamma)
    c.num_slots = 10  # S
    c.ad_slots = (1, 4, 7)  # slot indices that may show an ad (K = 3)
    c.num_ads = 6  # N candidate ads per request
    c.num_categories = 8  # C
    c.feature_dim = 8  # D
    c.user_scale = 2.0
    c.ad_bias = -1.5  # type bias of ads (ads are less relevant than organic items)
    c.organic_bias = -1.0
    c.position_decay = 0.85
    c.anchor_share = 0.5  # chance that an ad / organic item has the page's anchor category
    c.bid_mu = 0.0  # bids ~ LogNormal(bid_mu, bid_sigma)
    c.bid_sigma = 0.5
    c.log_ad_rate = 0.6  # logging policy: chance that an ad slot shows an ad
    return c


def click_config(variant: str = "competition") -> ml_collections.ConfigDict:
    """The click model's loop config: the shared sections with the environment, log sizes, model
    widths and loop settings. Trains in about a minute on 2 CPU cores and shows the context
    model's gain on the competition variant."""
    c = common.base_config()
    c.task = "page_click"
    c.env = env_config(variant)
    c.data = ml_collections.ConfigDict(
        dict(
            seed=0,  # the environment (category centres) and the pages; `seed` varies init and batch order
            train_pages=30_000,  # pages per split (S impressions each)
            val_pages=5_000,
            test_pages=5_000,
            prefetch=4,
        )
    )
    c.model = ml_collections.ConfigDict(
        dict(
            context=True,  # each item attends over the other displayed items; False: the no-context baseline
            width=32,
            num_heads=4,
            mlp_hidden=(64, 32),
            activation="relu",
            dropout=0.0,
            dtype="float32",
        )
    )
    c.batch_size = 128  # pages per step
    c.eval_batch_size = 1000
    c.num_train_steps = 3000
    c.eval_every_steps = 500
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 1e-4
    c.checkpoint.best_metric = "val/auc"
    c.checkpoint.best_mode = "max"
    c.checkpoint.every_steps = 1000
    c.logging.every_steps = 100  # flushes also bound the steps queued ahead of the host
    return c


def shrink_click_for_smoke(c: ml_collections.ConfigDict) -> None:
    """Seconds on 2 CPU cores: 20 steps on small logs."""
    common.shrink_for_smoke(c, steps=20)
    c.data.train_pages, c.data.val_pages, c.data.test_pages = 320, 100, 100
    c.batch_size = 32
    c.eval_batch_size = 64


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False, no_context=False, variant="competition")
    c = click_config(args.variant)
    c.model.context = not args.no_context
    if args.smoke:
        shrink_click_for_smoke(c)
    return c
