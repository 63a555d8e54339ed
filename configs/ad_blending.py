"""Ad blending with virtual bids and VCG with externalities (Carrion et al., arXiv 2105.13556 /
AAAI-23) on the synthetic page environment (jdjax/econ/page_env.py).

    python -m jdjax.main --config=configs/ad_blending.py                          # competition env
    python -m jdjax.main --config=configs/ad_blending.py:variant=complementarity
    python -m jdjax.main --config=configs/ad_blending.py:smoke                    # seconds, for CI
    python -m jdjax.main --config=configs/ad_blending.py --config.auction.generator=greedy

Trains the context-aware click model and the no-context baseline on logs of a random logging
policy, sweeps VB_org (revenue / organic-click frontier, frontier.png), tunes the virtual bids on
separate pages (golden section over VB_org, SPSA over (VB_ad, VB_org)) and reports revenue, ad
clicks, organic clicks and the VCG clip rate against GSP and the separable position auction
(jdjax/tasks/ad_blending.py). The top-level keys are the click models' loop config
(configs/page_click.py); `auction` holds the mechanism and tuning settings.
"""

import ml_collections

from configs import common, page_click


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False, variant="competition")
    c = page_click.click_config(args.variant)
    c.task = "ad_blending"
    c.auction = ml_collections.ConfigDict(
        dict(
            generator="exhaustive",  # exhaustive (truthful) | greedy | random (bid-dependent, spec)
            reserve=0.05,  # per-click reserve; VCG prices are clipped to [reserve, bid]
            tune_pages=500,  # pages for choosing the virtual bids
            eval_pages=1000,  # pages for every reported number
            chunk=8,  # requests per lax.map chunk: bounds the click model's activations (8 fastest on CPU)
            vb_ad=0.0,  # platform value per ad click (fixed in the golden-section search)
            vb_ad_lo=0.0,
            vb_ad_hi=1.0,
            vb_org_lo=0.0,  # platform value per organic click: search interval
            vb_org_hi=4.0,
            vb_org_grid=(0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 3.0, 4.0),  # frontier sweep
            organic_floor=0.95,  # share of the no-ads organic clicks the business requires [R]
            penalty=20.0,  # hinge penalty per organic click below the floor [R]
            golden_evals=14,
            spsa_iters=12,  # 2 evaluations each
            spsa_a=0.05,
            spsa_c=0.1,
        )
    )
    if args.smoke:
        page_click.shrink_click_for_smoke(c)
        c.auction.tune_pages = c.auction.eval_pages = 40
        c.auction.vb_org_grid = (0.0, 0.5, 2.0)
        c.auction.golden_evals = 4
        c.auction.spsa_iters = 2
    return c
