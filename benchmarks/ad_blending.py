"""Ad-blending auction latency and throughput (spec P2): allocation + VCG per request.

    python -m benchmarks.ad_blending                  # records to benchmarks/RESULTS.md
    python -m benchmarks.ad_blending --smoke          # few calls, prints only

Setting: the synthetic page of jdjax.econ.page_env (competition variant), 6 ads, 10 slots of which
3 are ad slots, the exhaustive generator (229 candidate assignments, every one scored by the click
model), selection of the max-welfare candidate and VCG prices for the winners (with the exhaustive
list the counterfactual max over A_-i is a mask over the scored list: no extra model call).

'latency/<model>/<what>': one request per call of a jitted function (batch 1), cycling over 64
pre-sampled pages already on the device, after compile (compile_s = first call minus the median)
and warm-up; p50 / p99 over --rounds calls. Every case of a model family is timed once per round,
rotated (harness.interleaved), so load changes hit all alike. <what> = 'auction' (allocation + VCG)
or 'allocate' (generation + scoring + argmax only; vcg_overhead = auction p50 / allocate p50).
Models: 'true_ctr' = the ground-truth CTR of page_env (vmapped, closed form); 'learned_context' /
'learned_no_context' = jdjax.models.page_click.PageClickModel (random weights, config sizes) via
make_ctr_fn, when that module exists.
'throughput/<model>/b<batch>/<how>': requests per second of the auction on --batch pages per call
(median of --batch_rounds interleaved calls), 'vmap' over the whole batch or 'map_chunk<c>' =
jax.lax.map over chunks of --chunk vmapped requests (bounds the activations of a learned model:
[batch, 229, S, ...] at once is memory-bound on CPU).

load1 = 1-minute load average when the row was written (2 cores shared with other jobs).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

_ROUNDS = flags.DEFINE_integer("rounds", 500, "Per-request calls timed per latency case.")
_BATCH = flags.DEFINE_integer("batch", 256, "Requests per call of the throughput cases.")
_BATCH_ROUNDS = flags.DEFINE_integer("batch_rounds", 10, "Timed calls per throughput case.")
_CHUNK = flags.DEFINE_integer("chunk", 8, "Requests per vmapped chunk of the lax.map throughput case.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Few calls; print but do not record.")

BENCHMARK = "ad_blending"
NOTES = ("Allocation + VCG per request on the synthetic page (competition variant, 6 ads, 10 slots, 3 ad slots, "
         "exhaustive generator = 229 candidates scored by the click model); batch-1 calls of a jitted function "
         "cycling over 64 device-resident pages, p50/p99 over the calls after compile and warm-up, cases of a "
         "model timed interleaved; compile_s apart. learned_* = jdjax.models.page_click with random weights. "
         "throughput = requests/s of the auction on a batch: vmap over all, or lax.map over vmapped chunks. load1 = 1-minute load average (2 shared cores).")


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def _click_models(p):
    """{name: ctr_fn}: the ground truth and the learned page click models (configs/ad_blending.py sizes)."""
    import jax

    from configs import ad_blending as ad_config
    from jdjax.econ import allocation as al
    from jdjax.econ import page_env
    from jdjax.models import page_click
    from jdjax.tasks import page_click as task

    models = {"true_ctr": al.true_ctr_fn(p)}
    config = ad_config.get_config()
    builds = {ctx: task.build_model(config, context=ctx) for ctx in (True, False)}
    centres = page_env.category_centres(0, p)
    page = jax.tree.map(lambda x: x[0], page_env.sample_pages(jax.random.key(0), centres, p, 1))
    lays = al.candidate_layouts(page, jax.numpy.full((1, len(p.ad_slots)), -1), p)
    for ctx, model in builds.items():
        params = model.init(jax.random.key(1), page_click.page_batch(page, lays), train=False)["params"]
        models["learned_context" if ctx else "learned_no_context"] = page_click.make_ctr_fn(model, params)
    return models


def measure(rounds: int, batch: int, batch_rounds: int, chunk: int) -> list[tuple[str, dict]]:
    import jax
    import numpy as np

    from benchmarks import harness
    from configs import page_click as cp
    from jdjax.econ import allocation as al
    from jdjax.econ import page_env

    p = page_env.EnvParams.from_config(cp.env_config("competition"))
    centres = page_env.category_centres(0, p)
    gen = al.Exhaustive()
    cands, valid = al.exhaustive_assignments(p.num_ads, len(p.ad_slots))
    vb_ad, vb_org, reserve = 0.1, 0.5, 0.05
    pages_np = jax.device_get(page_env.sample_pages(jax.random.key(1), centres, p, max(batch, 64)))
    singles = [jax.device_put(jax.tree.map(lambda x: x[i], pages_np)) for i in range(64)]
    batch_pages = jax.device_put(jax.tree.map(lambda x: x[:batch], pages_np))
    rows = []
    for name, ctr_fn in _click_models(p).items():
        auction = jax.jit(lambda pg, f=ctr_fn: al.auction(pg, gen, f, p, vb_ad, vb_org, reserve))
        allocate = jax.jit(lambda pg, f=ctr_fn: al.allocate(pg, cands, valid, f, vb_ad, vb_org, p))
        one = lambda pg, f=ctr_fn: al.auction(pg, gen, f, p, vb_ad, vb_org, reserve)  # noqa: E731
        batched = jax.jit(lambda pgs, one=one: jax.vmap(one)(pgs))
        chunked = jax.jit(lambda pgs, one=one: jax.lax.map(one, pgs, batch_size=chunk))
        compile_s = {}
        for what, fn, arg in (("auction", auction, singles[0]), ("allocate", allocate, singles[0]),
                              ("batched", batched, batch_pages), ("chunked", chunked, batch_pages)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(arg))
            first = time.perf_counter() - t0
            for _ in range(3):
                jax.block_until_ready(fn(arg))
            t0 = time.perf_counter()
            jax.block_until_ready(fn(arg))
            compile_s[what] = first - (time.perf_counter() - t0)
        raw = {"auction": [], "allocate": []}
        counter = {"auction": 0, "allocate": 0}

        def per_request(what, fn):
            def call():
                i = counter[what] = counter[what] + 1
                t0 = time.perf_counter()
                jax.block_until_ready(fn(singles[i % len(singles)]))
                raw[what].append(time.perf_counter() - t0)
            return call

        for what, fn in (("auction", auction), ("allocate", allocate)):  # warm-up over every page
            for pg in singles:
                jax.block_until_ready(fn(pg))
        harness.interleaved({"auction": per_request("auction", auction), "allocate": per_request("allocate", allocate)},
                            rounds)
        p50 = {w: float(np.percentile(raw[w], 50)) for w in raw}
        for what in ("auction", "allocate"):
            ts = np.asarray(raw[what])
            row = {"batch": 1, "candidates": int(cands.shape[0]), "p50_ms": 1e3 * p50[what],
                   "p99_ms": 1e3 * float(np.percentile(ts, 99)), "mean_ms": 1e3 * float(ts.mean()),
                   "compile_s": compile_s[what], "calls": len(ts)}
            if what == "auction":
                row["vcg_overhead"] = p50["auction"] / p50["allocate"]
            row["load1"] = _load1()
            rows.append((f"latency/{name}/{what}", row))
        ts = harness.interleaved({"batched": lambda: jax.block_until_ready(batched(batch_pages)),
                                  "chunked": lambda: jax.block_until_ready(chunked(batch_pages))}, batch_rounds)
        for what, label in (("batched", "vmap"), ("chunked", f"map_chunk{chunk}")):
            t = ts[what]
            rows.append((f"throughput/{name}/b{batch}/{label}", {
                "batch": batch, "candidates": int(cands.shape[0]), "call_ms": 1e3 * t["median_s"],
                "requests_per_s": batch / t["median_s"], "p90_ms": 1e3 * t["p90_s"], "compile_s": compile_s[what],
                "calls": batch_rounds, "load1": _load1()}))
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from benchmarks import harness

    smoke = _SMOKE.value
    rows = measure(20, 16, 2, 4) if smoke else measure(_ROUNDS.value, _BATCH.value, _BATCH_ROUNDS.value, _CHUNK.value)
    for i, (case, metrics) in enumerate(rows):
        if i == 0:
            metrics = {"notes": NOTES, **metrics}
        harness.record(BENCHMARK, case, metrics, smoke=smoke)
    print()
    print(f"{'case':42s} {'p50_ms':>8s} {'p99_ms':>8s} {'req/s':>10s} {'compile_s':>9s} {'load1':>6s}")
    for case, m in rows:
        p50 = m.get("p50_ms", m.get("call_ms"))
        print(f"{case:42s} {p50:8.3f} {m.get('p99_ms', float('nan')):8.3f} "
              f"{m.get('requests_per_s', m['batch'] * 1e3 / p50):10.0f} {m['compile_s']:9.2f} {m['load1']:6.2f}")


if __name__ == "__main__":
    app.run(main)
