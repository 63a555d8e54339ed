"""Token merging (ToMe) throughput: ViT-B/16 at 224 px, float32, dense vs r = 8, 13, 16, (16, -1).

    python -m benchmarks.token_merging                        # records to benchmarks/RESULTS.md
    python -m benchmarks.token_merging --batch_sizes=1 --repeats=3
    python -m benchmarks.token_merging --smoke                # tiny model, records nothing

Per device (the CPU, plus the default accelerator if there is one) and batch size, every case
is one `jax.jit(model.apply)`. Its first call (compile + run) goes through `harness.time_call`
and is reported apart as compile_s (first call minus the median); `time_call`'s one timed call
serves as the warm-up. Then the cases (and the merge-kernel chains below) are timed in
--repeats interleaved rounds, each round calling every function once in a rotated order, and
each case reports its median over the rounds: on a shared machine a change of load then
affects dense and merged cases alike, which a block of repeats per case does not. All cases
share the same random parameters (ToMe adds none) and one random input batch. Columns:

- images_per_s = batch / median; speedup = dense median / case median (same run, same rounds).
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
  slices its input to N_{l+1} tokens and keeps the indices alive). Both chains are timed in
  the same rounds as the models and their medians divided by the case's model median.
- traces: how often the case's jitted function was traced for this batch shape over the first
  call, the warm-up and all rounds (jit should compile once per shape: 1 in every row).
- tokens: N_0 > N_1 > ... > N_L after the 50% clamp.
- load1: the machine's 1-minute load average when the row was written (2 cores shared).
"""

from __future__ import annotations

import functools
import itertools
import os

from absl import app, flags

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds (one call per case each; median reported).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, batch 1 and 2, three rounds; print but do not record.")
_MODEL = flags.DEFINE_string("model", "B/16", "ViT name (jdjax.nn.vit.vit_config).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input resolution.")

CASES = (("dense", 0), ("r=8", 8), ("r=13", 13), ("r=16", 16), ("r=(16,-1)", (16, -1)))
SMOKE_MODEL = dict(patch_size=8, width=64, depth=4, num_heads=2, mlp_dim=128)  # 32 px -> 17 tokens
BENCHMARK = "token_merging"
NOTES = (
    "ViT forward pass (float32, random weights, 1000-class head) with ToMe merging r tokens per block "
    "(proportional attention on). Median over interleaved rounds (every case once per round, rotated "
    "order) after compile and one warm-up; compile_s = first call - median. speedup = dense median / case "
    "median in the same rounds. xla_gflop = XLA cost_analysis FLOPs per image; gmacs = analytic MACs per "
    "image (jdjax.merging.flops: patch embedding + blocks, no head, no matching). match_pct / merge_pct = "
    "time of the matching alone / matching + weighted merge, timed as a jitted chain of the merge kernels "
    "at every block's shapes (in the same rounds), as a share of the case's forward time. traces = times "
    "the case's jit traced for this shape (should be 1). load1 = 1-minute load average when the row was "
    "written (2 shared cores). Targets: r=16 >= 1.9x dense on CPU; merge_pct < 10; traces == 1."
)


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
    from jdjax.nn.vit import MergeConfig, ViT

    depth = model_dims["depth"]
    models = {label: ViT(num_classes=1000, **model_dims, merge=MergeConfig(r=schedules.parse_r(r, depth)),
                         image_size=image_size)
              for label, r in CASES}
    traces = {label: 0 for label, _ in CASES}

    def forward(label, params, x):
        traces[label] += 1  # runs only while tracing
        return models[label].apply(params, x)

    jitted = {label: jax.jit(functools.partial(forward, label)) for label, _ in CASES}
    with jax.default_device(device):
        params = jax.jit(models["dense"].init)(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    params = jax.device_put(params, device)
    macs = {label: flops.count_model(m, image_size) for label, m in models.items()}
    name = f"{'smoke ' if smoke else ''}ViT-{_MODEL.value if not smoke else 'tiny'}@{image_size} {device.platform}"
    rng = np.random.default_rng(0)

    for batch in batch_sizes:
        x = jax.device_put(rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32), device)
        x0 = jax.device_put(rng.normal(size=(batch, macs["dense"].token_counts[0], model_dims["width"]))
                            .astype(np.float32), device)
        fns, first, extra = {}, {}, {}
        before = dict(traces)
        for label, _ in CASES:  # compile (first call, reported apart) and one warm-up call per function
            fns[label] = lambda f=jitted[label], x=x: jax.block_until_ready(f(params, x))
            first[label] = harness.time_call(fns[label], warmup=0, repeats=1)["first_s"]
            extra[label] = {"xla_gflop": harness.xla_flops(jitted[label].lower(params, x).compile()) / batch / 1e9}
            if label != "dense":
                for kind, only in (("match", True), ("merge", False)):
                    chain = jax.jit(merge_chain(macs[label].token_counts, model_dims["num_heads"], only))
                    fns[f"{label} {kind}"] = lambda chain=chain, x0=x0: jax.block_until_ready(chain(x0))
                    harness.time_call(fns[f"{label} {kind}"], warmup=0, repeats=1)
            print(f"  {name} b{batch} {label}: compiled, first call {first[label]:.1f} s", flush=True)
        timing = harness.interleaved(fns, repeats)
        dense_s = timing["dense"]["median_s"]
        for label, _ in CASES:
            t = timing[label]
            counts = macs[label].token_counts
            metrics = {
                "images_per_s": batch / t["median_s"],
                "speedup": dense_s / t["median_s"],
                "median_ms": 1e3 * t["median_s"],
                "p10_p90_ms": f"{1e3 * t['p10_s']:.4g}-{1e3 * t['p90_s']:.4g}",
                "compile_s": first[label] - t["median_s"],
                "xla_gflop": extra[label]["xla_gflop"],
                "gmacs": macs[label].gmacs,
                "gmacs_speedup": macs["dense"].total / macs[label].total,
                "match_pct": 0.0 if label == "dense" else 100 * timing[f"{label} match"]["median_s"] / t["median_s"],
                "merge_pct": 0.0 if label == "dense" else 100 * timing[f"{label} merge"]["median_s"] / t["median_s"],
                "traces": traces[label] - before[label],  # over the first call, warm-up and all rounds
                "tokens": ">".join(str(n) for n in counts),
                "load1": os.getloadavg()[0],
                "notes": NOTES,
            }
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
    repeats = 3 if smoke else _REPEATS.value
    devices = [jax.devices("cpu")[0]]
    if jax.default_backend() != "cpu":
        devices.append(jax.devices()[0])
    for device in devices:
        run_device(device, dims, image_size, batch_sizes, repeats, smoke)


if __name__ == "__main__":
    app.run(main)
