"""Token merging (ToMe) throughput: ViT-B/16 at 224 px, float32, dense vs r = 8, 13, 16, (16, -1).

    python -m benchmarks.token_merging                        # records to benchmarks/RESULTS.md
    python -m benchmarks.token_merging --batch_sizes=1 --repeats=3
    python -m benchmarks.token_merging --smoke                # tiny model, records nothing

Per device (the CPU, plus the default accelerator if there is one) and batch size, every case
is one `jax.jit(model.apply)` timed with `harness.time_call` (first call = compile + run,
reported apart as compile_s; one warm-up call; median of --repeats calls). All cases share the
same random parameters (ToMe adds none) and one random input batch. Columns:

- images_per_s = batch / median; speedup = dense median / case median, both measured in this
  run. Dense is timed first and again last (the machine may be shared); its median is the
  mean of the two, and dense_drift_pct says how much they differ.
- xla_gflop: `jit(f).lower(...).compile().cost_analysis()['flops']` per image (XLA counts 2
  FLOPs per multiply-add plus element-wise work); gmacs: the analytic MACs per image in the
  spec's convention (`jdjax.merging.flops`: patch embedding + blocks, no head, no matching);
  gmacs_speedup = dense gmacs / case gmacs.
- match_pct / merge_pct: share of the case's forward time spent in the token-merging kernels,
  measured by timing the kernels alone at every block's shapes: one jitted chain of the
  merging blocks, where block l maps [B, N_l, C] tokens to [B, N_{l+1}, C] exactly as
  `TokenMerger` does (keys averaged over heads -> `bipartite_soft_matching` ->
  `merge_wavg` with sizes), the keys being the tokens viewed as [B, N_l, H, Dh]. merge_pct
  times matching + weighted merge; match_pct times the matching alone (block l then just
  slices its input to N_{l+1} tokens and keeps the indices alive). Both chains are timed
  like the model (median after warm-up) and divided by the case's model median.
- traces: how often the case's jitted function was traced for this batch shape (jit should
  compile once per shape: 1 for every row, however many calls were timed).
- tokens: N_0 > N_1 > ... > N_L after the 50% clamp.
- load1: the machine's 1-minute load average when the row was written (2 cores shared).
"""

from __future__ import annotations

import functools
import itertools
import os

from absl import app, flags

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per case after one warm-up call (median reported).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, batch 1 and 2, two repeats; print but do not record.")
_MODEL = flags.DEFINE_string("model", "B/16", "ViT name (jdjax.nn.vit.vit_config).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input resolution.")

CASES = (("dense", 0), ("r=8", 8), ("r=13", 13), ("r=16", 16), ("r=(16,-1)", (16, -1)))
SMOKE_MODEL = dict(patch_size=8, width=64, depth=4, num_heads=2, mlp_dim=128)  # 32 px -> 17 tokens
BENCHMARK = "token_merging"
NOTES = (
    "ViT forward pass (float32, random weights, 1000-class head) with ToMe merging r tokens per block "
    "(proportional attention on). speedup = dense median / case median in the same run; dense is timed "
    "first and last (mean of both medians, drift in dense_drift_pct). xla_gflop = XLA cost_analysis FLOPs "
    "per image; gmacs = analytic MACs per image (jdjax.merging.flops: patch embedding + blocks, no head, "
    "no matching). match_pct / merge_pct = time of the matching alone / matching + weighted merge, timed "
    "as a jitted chain of the merge kernels at every block's shapes, as a share of the model's forward "
    "time. load1 = 1-minute load average (2 shared cores). traces = times the case's jit traced for this shape (should be 1). "
    "Targets: r=16 >= 1.9x dense on CPU; merge_pct < 10; traces == 1."
)


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def merge_chain(counts, num_heads: int, matching_only: bool):
    """fn(x [B, N_0, C]) running only the merge kernels of every merging block, chained.

    Block l with r_l = N_l - N_{l+1} > 0 does what TokenMerger does (metric = keys.mean(heads),
    bipartite_soft_matching, merge_wavg), or with matching_only just the matching, then slices
    its input to N_{l+1} tokens (the index sums keep the matching from being removed).
    """
    import jax.numpy as jnp

    from jdjax.merging import tome

    def fn(x):
        size = None
        total = jnp.zeros((), jnp.float32)
        for n_in, n_out in itertools.pairwise(counts):
            r = n_in - n_out
            if r == 0:
                continue
            b, n, c = x.shape
            keys = x.reshape(b, n, num_heads, c // num_heads)  # [B, N_l, H, Dh]
            metric = keys.astype(jnp.float32).mean(axis=2)  # [B, N_l, Dh]
            matching = tome.bipartite_soft_matching(metric, r, class_token=True)
            if matching_only:
                idx = matching.src_idx.sum() + matching.dst_idx.sum() + matching.unm_idx.sum()
                total = total + idx.astype(jnp.float32)
                x = x[:, :n_out]
            else:
                x, size = tome.merge_wavg(x, size, matching)  # [B, N_{l+1}, C]
        return x, size, total

    return fn


def run_device(device, model_dims: dict, image_size: int, batch_sizes, repeats: int, smoke: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import harness
    from jdjax.merging import flops, schedules
    from jdjax.nn.vit import ViT

    depth = model_dims["depth"]
    models = {label: ViT(num_classes=1000, **model_dims, merge_r=schedules.parse_r(r, depth), image_size=image_size)
              for label, r in CASES}
    traces = {label: 0 for label, _ in CASES}

    def forward(label, params, x):
        traces[label] += 1  # runs only while tracing
        return models[label].apply(params, x)

    jitted = {label: jax.jit(functools.partial(forward, label)) for label, _ in CASES}
    dense_model = models["dense"]
    with jax.default_device(device):
        params = jax.jit(dense_model.init)(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    params = jax.device_put(params, device)
    macs = {label: flops.count_model(m, image_size) for label, m in models.items()}
    name = f"{'smoke ' if smoke else ''}ViT-{_MODEL.value if not smoke else 'tiny'}@{image_size} {device.platform}"

    for batch in batch_sizes:
        x = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32),
                           device)
        timings, rows = {}, {}
        order = [label for label, _ in CASES] + ["dense"]
        for i, label in enumerate(order):
            before = traces[label]
            f = jitted[label]
            t = harness.time_call(lambda f=f, x=x: jax.block_until_ready(f(params, x)), warmup=1, repeats=repeats)
            if label in timings:  # dense, second time
                timings[label] = (timings[label], t)
                continue
            timings[label] = t
            rows[label] = {"traces": traces[label] - before,
                           "xla_gflop": _cost_flops(f.lower(params, x).compile()) / batch / 1e9}
            print(f"  {name} b{batch} {label}: {t['median_s'] * 1e3:.1f} ms (first call {t['first_s']:.1f} s)", flush=True)
        first, last = timings["dense"]
        dense_s = (first["median_s"] + last["median_s"]) / 2
        for label, _ in CASES:
            t = timings[label] if label != "dense" else first
            median = dense_s if label == "dense" else t["median_s"]
            counts = macs[label].token_counts
            metrics = {
                "images_per_s": batch / median,
                "speedup": dense_s / median,
                "median_ms": 1e3 * median,
                "p10_p90_ms": f"{1e3 * t['p10_s']:.4g}-{1e3 * t['p90_s']:.4g}",
                "compile_s": t["first_s"] - t["median_s"],
                "xla_gflop": rows[label]["xla_gflop"],
                "gmacs": macs[label].gmacs,
                "gmacs_speedup": macs["dense"].total / macs[label].total,
                "match_pct": 0.0,
                "merge_pct": 0.0,
                "traces": rows[label]["traces"],
                "tokens": ">".join(str(n) for n in counts),
                "load1": os.getloadavg()[0],
            }
            if label == "dense":
                metrics["dense_drift_pct"] = 100 * (last["median_s"] / first["median_s"] - 1)
            else:
                x0 = jax.device_put(np.random.default_rng(1).normal(size=(batch, counts[0], model_dims["width"]))
                                    .astype(np.float32), device)
                for key, only in (("match_pct", True), ("merge_pct", False)):
                    chain = jax.jit(merge_chain(counts, model_dims["num_heads"], only))
                    tc = harness.time_call(lambda chain=chain, x0=x0: jax.block_until_ready(chain(x0)), warmup=1,
                                           repeats=max(repeats, 10))
                    metrics[key] = 100 * tc["median_s"] / median
            metrics["notes"] = NOTES
            harness.record(BENCHMARK, f"{name} b{batch} {label}", metrics, smoke=smoke)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import jax

    from jdjax.nn.vit import vit_config

    smoke = _SMOKE.value
    dims = SMOKE_MODEL if smoke else vit_config(_MODEL.value)
    image_size = 32 if smoke else _IMAGE_SIZE.value
    batch_sizes = [1, 2] if smoke else [int(b) for b in _BATCH_SIZES.value]
    repeats = 2 if smoke else _REPEATS.value
    devices = [jax.devices("cpu")[0]]
    if jax.default_backend() != "cpu":
        devices.append(jax.devices()[0])
    for device in devices:
        run_device(device, dims, image_size, batch_sizes, repeats, smoke)


if __name__ == "__main__":
    app.run(main)
