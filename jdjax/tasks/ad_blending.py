"""Ad blending with virtual bids and VCG (spec P2), end to end:

    python -m jdjax.main --config=configs/ad_blending.py --workdir=runs/ad-blending

1. Click models. Impression logs of the synthetic page environment (`jdjax.econ.page_env`,
   random logging policy) train the context-aware click model and the no-context baseline with
   the generic loop (`click_context/`, `click_no_context/`; finished runs are reused, interrupted
   ones resume). Their test AUC / logloss is reported next to the oracle (the true CTR).
2. Pages for the auctions come from two fresh streams: `tune` pages for choosing the virtual bids,
   `eval` pages for every reported number (the tuned values are never chosen on them).
3. Frontier: VB_org is swept on the eval pages for VCG with each click model (context,
   no-context, and the ground truth as a bound): expected revenue, ad clicks, organic clicks and
   the clip rate under the true CTR -> `frontier.png`, `frontier.json`.
4. Tuning, on the tune pages, of the business target J = revenue - penalty * max(0, floor -
   organic clicks) [R], floor = `organic_floor` x the organic clicks of the page without ads:
   golden-section search over VB_org (VB_ad fixed) per click model, and SPSA over (VB_ad, VB_org)
   for the context model.
5. Report, on the eval pages: GSP and the separable position auction (independent CTR from the
   no-context model, no blending), VCG with each click model at its tuned VB_org, and VCG with
   the SPSA virtual bids -> `report.md`, `report.json`.

Outcomes are expected values under the environment's true CTR (what an online bucket would
measure, without the Bernoulli noise); the learned models only choose allocations and prices.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from tqdm import tqdm

from jdjax.econ import allocation as al
from jdjax.econ import page_env, vb_tuning
from jdjax.io import as_path, save_figure, write_json, write_text
from jdjax.models.page_click import make_ctr_fn
from jdjax.tasks import page_click
from jdjax.train import sweep
from jdjax.train.logging import is_main_process

CLICK_MODELS = {"context": True, "no_context": False}
AUCTION_STREAMS = {"tune": 10, "eval": 11}  # page streams, apart from the click logs' 0-2
GENERATORS = ("exhaustive", "greedy", "random")
METRICS = ("revenue", "ad_clicks", "organic_clicks", "clip_rate", "ads_shown", "advertiser_value")


def make_generator(name: str):
    if name == "exhaustive":
        return al.Exhaustive()
    if name == "greedy":
        return al.Greedy()
    if name == "random":
        return al.RandomSampling()
    raise ValueError(f"auction.generator={name!r}: expected one of {GENERATORS}")


def train_click_models(config, workdir: str) -> sweep.SweepResult:
    """Trains (or reuses) both click models as jobs of the sweep runner (click_<name>/)."""
    from jdjax.train.loop import train_and_evaluate

    jobs = [sweep.Job(f"click_{name}", lambda sub, context=context: train_and_evaluate(
        config, sub, page_click.click_model_task(config, context))) for name, context in CLICK_MODELS.items()]
    return sweep.run_sweep(workdir, jobs, desc="ad_blending")


def load_ctr_fn(config, workdir: str, context: bool):
    """The allocation interface (`make_ctr_fn`) of the val-selected click model in `workdir`."""
    from jdjax.train.checkpoint import read_state

    model = page_click.build_model(config, context=context)
    params = jax.tree.map(jnp.asarray, read_state(workdir, kind="best")["params"])
    return make_ctr_fn(model, params)


def sample_auction_pages(config, p: page_env.EnvParams) -> dict[str, page_env.Page]:
    centres = page_env.category_centres(config.data.seed, p)
    base = jax.random.key(config.data.seed)
    return {split: page_env.sample_pages(jax.random.fold_in(base, stream), centres, p,
                                         int(config.auction[f"{split}_pages"]))
            for split, stream in AUCTION_STREAMS.items()}


def no_ads_organic_clicks(pages: page_env.Page, p: page_env.EnvParams) -> float:
    """Mean expected organic clicks of the pages with every ad slot organic."""
    empty = jnp.full((len(p.ad_slots),), -1, jnp.int32)
    out = jax.vmap(lambda page: al.outcomes(page, empty, jnp.zeros(len(p.ad_slots)), p))(pages)
    return float(jnp.mean(out.organic_clicks))


def plot_frontier(frontiers: dict, points: dict, floor: float, path) -> None:
    """Revenue against organic clicks per request: one VB_org sweep per click model, the tuned
    operating points and the baselines as markers, the organic-click floor as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, f in frontiers.items():
        line, = ax.plot(f["organic_clicks"], f["revenue"], "o-", ms=3, label=f"VCG, {name} click model (VB_org sweep)")
        for x, y, v in zip(f["organic_clicks"][::3], f["revenue"][::3], f["vb_org"][::3]):
            ax.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=line.get_color())
    markers = iter("s^DvP*X")
    for name, r in points.items():
        ax.plot(r["organic_clicks"], r["revenue"], next(markers, "o"), ms=8, label=name)
    ax.axvline(floor, color="grey", ls="--", lw=1, label="organic-click floor")
    ax.set_xlabel("expected organic clicks per request (true CTR)")
    ax.set_ylabel("expected revenue per request")
    ax.set_title("Revenue / organic-click frontier (eval pages; labels: VB_org)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def format_report(click_rows: list[dict], rows: list[dict], notes: list[str]) -> str:
    lines = ["Click models (test split of the logs; checkpoint chosen on val):", "",
             "| model | test AUC | test logloss | ad AUC | organic AUC |", "|---|---|---|---|---|"]
    for r in click_rows:
        lines.append(f"| {r['model']} | {r['auc']:.4f} | {r['logloss']:.4f} | {r['ad_auc']:.4f} | {r['organic_auc']:.4f} |")
    lines += ["", "Mechanisms on the eval pages (expected values per request under the true CTR):", "",
              "| mechanism | VB_ad | VB_org | revenue | ad clicks | organic clicks | ads shown | clip rate | J |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mechanism']} | {r['vb_ad']:.3f} | {r['vb_org']:.3f} | {r['revenue']:.4f} | "
                     f"{r['ad_clicks']:.4f} | {r['organic_clicks']:.4f} | {r['ads_shown']:.2f} | "
                     f"{100 * r['clip_rate']:.1f} % | {r['objective']:.4f} |")
    return "\n".join(lines + [""] + notes) + "\n"


def run(config, workdir: str) -> dict:
    main = is_main_process()
    a = config.auction
    p = page_env.EnvParams.from_config(config.env)

    trained = train_click_models(config, workdir)
    if trained.status != sweep.COMPLETED:
        return {"status": trained.status, "failed": trained.failed}
    keys = ("auc", "logloss", "ad_auc", "organic_auc")
    click_rows, ctr_fns = [], {}
    for name, context in CLICK_MODELS.items():
        res = trained.results[f"click_{name}"]
        click_rows.append({"model": name, **{k: res[f"test/{k}"] for k in keys}})
        ctr_fns[name] = load_ctr_fn(config, os.path.join(workdir, f"click_{name}"), context)
    res = trained.results["click_context"]
    click_rows.append({"model": "oracle (true CTR)", **{k: res[f"test/oracle_{k}"] for k in keys}})
    ctr_fns["oracle"] = al.true_ctr_fn(p)
    pages = sample_auction_pages(config, p)
    generator = make_generator(a.generator)
    key = jax.random.key(config.seed)
    replay = {(split, name): vb_tuning.replay_evaluator(pages[split], p, fn, generator, a.reserve, key, a.chunk)
              for split in pages for name, fn in ctr_fns.items()}  # (split, model) -> evaluate(vb_org, vb_ad)
    floors = {split: a.organic_floor * no_ads_organic_clicks(pages[split], p) for split in pages}
    objective = lambda r, split: float(vb_tuning.penalized_objective(r["revenue"], r["organic_clicks"],  # noqa: E731
                                                                     floors[split], a.penalty))

    grid = [float(v) for v in a.vb_org_grid]
    frontiers = {}
    with tqdm(total=len(grid) * len(ctr_fns), desc="frontier (eval pages)", disable=not main) as bar:
        for name in ctr_fns:
            rows = []
            for v in grid:
                rows.append(replay["eval", name](v, a.vb_ad))
                bar.update()
            frontiers[name] = {"vb_org": grid, **{k: [r[k] for r in rows] for k in METRICS}}

    tuned = {}
    with tqdm(total=len(ctr_fns) * a.golden_evals + 2 * a.spsa_iters + 1, desc="tuning (tune pages)", disable=not main) as bar:
        for name in ctr_fns:
            def j_org(v, name=name):
                bar.update()
                return objective(replay["tune", name](v, a.vb_ad), "tune")

            g = vb_tuning.golden_section(j_org, a.vb_org_lo, a.vb_org_hi, a.golden_evals)
            tuned[name] = {"vb_ad": float(a.vb_ad), "vb_org": g.x, "tune_objective": g.value,
                           "history": g.history}

        def j_both(v):
            bar.update()
            return objective(replay["tune", "context"](v[1], v[0]), "tune")

        s = vb_tuning.spsa(j_both, (a.vb_ad, tuned["context"]["vb_org"]), lower=(a.vb_ad_lo, a.vb_org_lo),
                           upper=(a.vb_ad_hi, a.vb_org_hi), num_iters=a.spsa_iters, a=a.spsa_a, c=a.spsa_c,
                           seed=config.seed)
        tuned["spsa"] = {"vb_ad": float(s.x[0]), "vb_org": float(s.x[1]),
                         "tune_objective": j_both(s.x), "trajectory": s.trajectory.tolist()}

    def report_row(label, mechanism, model, vb_ad, vb_org):
        if mechanism == "vcg":
            r = replay["eval", model](vb_org, vb_ad)
        else:  # the baselines take no virtual bids
            _, r = al.run_auctions(pages["eval"], p, ctr_fns[model], generator, mechanism, reserve=a.reserve,
                                   key=key, chunk=a.chunk)
        return {"mechanism": label, "vb_ad": vb_ad, "vb_org": vb_org, **{k: r[k] for k in METRICS},
                "objective": objective(r, "eval")}

    rows = [
        report_row("GSP (no-context CTR, no blending)", "gsp", "no_context", 0.0, 0.0),
        report_row("position auction VCG (no-context CTR, no blending)", "position", "no_context", 0.0, 0.0),
    ]
    for name in ctr_fns:
        t = tuned[name]
        rows.append(report_row(f"VCG, {name} click model, golden VB_org", "vcg", name, t["vb_ad"], t["vb_org"]))
    t = tuned["spsa"]
    rows.append(report_row("VCG, context click model, SPSA (VB_ad, VB_org)", "vcg", "context", t["vb_ad"], t["vb_org"]))

    notes = [
        f"Environment: {config.env.variant}, {p.num_slots} slots, ad slots {p.ad_slots}, {p.num_ads} ads, "
        f"generator {a.generator}, reserve {a.reserve}; {a.tune_pages} tune pages, {a.eval_pages} eval pages.",
        f"J = revenue - {a.penalty} x max(0, floor - organic clicks); floor = {a.organic_floor} x organic clicks "
        f"without ads = {floors['eval']:.4f} (eval) / {floors['tune']:.4f} (tune). Virtual bids tuned on the "
        "tune pages only. Clip rate = share of shown ads whose VCG price was clipped to [reserve, bid].",
    ]
    report = format_report(click_rows, rows, notes)
    out = {"status": "completed", "click_models": click_rows, "mechanisms": rows, "tuned": tuned,
           "frontier": frontiers, "floor": floors}
    if main:
        points = {r["mechanism"]: r for r in rows if not r["mechanism"].startswith("VCG, oracle")}
        root = as_path(workdir)
        plot_frontier({k: frontiers[k] for k in ctr_fns}, points, floors["eval"], root / "frontier.png")
        write_text(root / "report.md", report)
        write_json(root / "report.json", out)
        print("\n" + report, flush=True)
    return out


def validate(config) -> list[str]:
    errors = page_click.validate(config)
    a = config.auction
    if a.generator not in GENERATORS:
        errors.append(f"auction.generator={a.generator!r}: expected one of {GENERATORS}")
    for split in AUCTION_STREAMS:
        if a[f"{split}_pages"] < 1:
            errors.append(f"auction.{split}_pages={a[f'{split}_pages']} must be >= 1")
    if not a.vb_org_lo < a.vb_org_hi or not a.vb_ad_lo <= a.vb_ad <= a.vb_ad_hi:
        errors.append("auction: need vb_org_lo < vb_org_hi and vb_ad_lo <= vb_ad <= vb_ad_hi")
    if not 0.0 <= a.organic_floor <= 1.0:
        errors.append(f"auction.organic_floor={a.organic_floor} must be in [0, 1] (a share of the no-ads organic clicks)")
    if a.golden_evals < 2 or a.spsa_iters < 0 or a.chunk < 1 or a.reserve < 0:
        errors.append("auction: need golden_evals >= 2, spsa_iters >= 0, chunk >= 1, reserve >= 0")
    return errors


def loop_configs(config) -> list:
    """Both click models train with `config` itself."""
    return [config]
