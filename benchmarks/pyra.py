"""PYRA throughput: ViT with LoRA, dense vs ToMe vs PYRA at the paper's "low" and "high"
schedules, inference and training step, in one run (spec `vision_token_merging.md` §3).

    python -m benchmarks.pyra                          # ViT-B/16 @ 224, batch 8; records to benchmarks/RESULTS.md
    python -m benchmarks.pyra --batch=1 --repeats=10
    python -m benchmarks.pyra --model=L/16 --notrain   # ViT-L/16 (LoRA rank 12), inference only
    python -m benchmarks.pyra --norecord --repeats=3   # print the rows, write nothing
    python -m benchmarks.pyra --smoke                  # tiny model (configs/pyra.py:smoke), records nothing

The five cases are the models of the PYRA task (`jdjax.tasks.pyra.build_model` under
`configs/pyra.py:vit_b16` for --model=B/16, `:vit_s16` / `:vit_l16` for S/16 / L/16): LoRA on
qkv (rank 8 for ViT-B), 100-class head, float32, 224 px; 'lora' is dense, 'tome-*' and
'pyra-*' merge with `schedules.PAPER_SCHEDULES[model, low|high]`. Weights are random (throughput
does not depend on them) and shared: the same parameter path holds the same values in every
model, and nothing is zero (LoRA B, PYRA W_D and the head too). Parameters are arguments of the
jitted functions, never constants, so XLA cannot fold a zero W_D away either way.

Every function is compiled ahead of time (`jit(f).lower(...).compile()`; that wall time is
compile_s), run once as warm-up, then all ten (five inference, five training) are timed in
--repeats interleaved rounds (`harness.interleaved`: every function once per round, rotated
order) so that load changes on the shared machine hit every case alike; medians are reported.
Columns:

- infer_img_s = batch / median; speedup = dense LoRA median / case median (same rounds).
  Targets on CPU: low >= 1.7x, high >= 3.0x (the paper, on a GPU: ~1.7x and ~3.2x).
- pyra_overhead_pct = 100 (PYRA median / ToMe median - 1) at the same schedule (target <= 3).
- train_img_s, train_speedup, train_pyra_overhead_pct: the same for one training step at
  --train_batch: cross-entropy, `value_and_grad` w.r.t. the trainable parameters only (LoRA +
  PYRA + head, `optim.trainable_mask` with `tasks.pyra.TRAINABLE`; the frozen backbone is a
  separate argument with no gradient), then the task's AdamW update (`optim.make_optimizer`).
  Train mode: drop path 0.1 and LoRA dropout 0.1 as in the recipe.
- gmacs: analytic MACs per image (`jdjax.merging.flops`: patch embedding + blocks, no head, no
  matching); must be 17.56 / 8.77 / 5.07 G for ViT-B/16 dense / low / high (checked).
  gmacs_speedup = dense / case. fvcore_gflops = the same MACs / 2^30, PYRA's "GFLOPs"
  convention (fvcore counts a multiply-add as one flop and the paper divides by 2^30).
  xla_gflop / xla_train_gflop: XLA cost_analysis FLOPs of the compiled inference / training
  function per image (2 per multiply-add plus element-wise work).
- tokens: N_0 > N_1 > ... > N_L (after the 50% clamp); ViT-B/16 high must end at 5 (checked).
- trainable_params: LoRA + PYRA + head parameters of the case.
- load1: the 1-minute load average when the row was written (2 shared cores).
"""

from __future__ import annotations

import os
import time
import zlib

BENCHMARK = "pyra"
CASES = (("lora", "dense"), ("tome", "low"), ("pyra", "low"), ("tome", "high"), ("pyra", "high"))
# configs/pyra.py variant of each --model (its PAPER_MODELS: size and LoRA rank of the released scripts).
CONFIG_VARIANTS = {"S/16": "vit_s16", "B/16": "vit_b16", "L/16": "vit_l16"}
# Spec §3.1 / §5.7-5.8 at 224 px: final token count and analytic GMACs (2 decimals) per compression.
EXPECTED = {
    "B/16": {"tokens": {"dense": 197, "low": 11, "high": 5}, "gmacs": {"dense": 17.56, "low": 8.77, "high": 5.07}},
    "L/16": {"tokens": {"dense": 197, "low": 7, "high": 5}, "gmacs": {"dense": 61.55, "low": 30.96, "high": 17.91}},
    "S/16": {"tokens": {"dense": 197, "low": 11, "high": 5}},
}
SPEEDUP_TARGETS = {"low": 1.7, "high": 3.0}
OVERHEAD_TARGET_PCT = 3.0
NOTES = (
    "ViT (float32, random shared weights, nothing zero) with LoRA on qkv and a 100-class head: dense LoRA, "
    "ToMe + LoRA and PYRA at the paper's low / high schedules (schedules.PAPER_SCHEDULES). Each function is "
    "compiled ahead of time (compile_s), warmed up once, then timed in interleaved rounds (every function once "
    "per round, rotated order); medians. speedup = dense LoRA median / case median in the same rounds "
    "(targets: low >= 1.7x, high >= 3.0x). pyra_overhead_pct = PYRA / ToMe median - 1 at the same schedule "
    "(target <= 3). train_*: one training step at train_batch (CE, grads w.r.t. LoRA + PYRA + head only, "
    "AdamW; drop path and LoRA dropout on). gmacs = analytic MACs per image (patch embedding + blocks; ViT-B/16 "
    "17.56 / 8.77 / 5.07); fvcore_gflops = MACs / 2^30 (PYRA's GFLOPs); xla_gflop / xla_train_gflop = XLA "
    "cost_analysis FLOPs per image. tokens after each block. load1 = 1-minute load average (2 shared cores)."
)


# ----------------------------------------------------------------------------- models and parameters


def paper_config(model_name: str = "B/16"):
    """configs/pyra.py for a paper model size: 224 px, its LoRA rank and its low / high schedules."""
    from configs import pyra as pyra_config

    if model_name not in CONFIG_VARIANTS:
        raise ValueError(f"--model={model_name!r}: the paper's schedules exist for {sorted(CONFIG_VARIANTS)}.")
    return pyra_config.get_config(CONFIG_VARIANTS[model_name])


def build_models(config) -> dict:
    """{'lora', 'tome-low', 'pyra-low', 'tome-high', 'pyra-high': ViT} as the PYRA task builds them."""
    from jdjax.tasks import pyra as pyra_task

    return {pyra_task.run_name(m, c): pyra_task.build_model(config, m, c, config.data.num_classes) for m, c in CASES}


def random_params(model, image_size: int | None = None, seed: int = 0, scale: float = 0.02, example=None) -> dict:
    """Unboxed parameters of `model` from NumPy noise (no `init` compile): N(0, scale^2), norm scales
    1 + noise. The noise depends only on (seed, parameter path), so models share their common weights.
    The model is initialised on one [1, image_size, image_size, 3] image, or on the arrays `example`."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdjax.train.optim import path_names

    if example is None:
        example = (jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),)
    shapes = jax.eval_shape(lambda *x: nn.meta.unbox(model.init(jax.random.key(0), *x)["params"]), *example)

    def fill(name, s):
        v = scale * np.random.default_rng([seed, zlib.crc32(name.encode())]).standard_normal(s.shape, np.float32)
        if name.endswith("scale"):  # LayerNorm scales (ln1, ln2, encoder_norm, pyra_norm_scale)
            v = 1.0 + v
        return jnp.asarray(v, s.dtype)

    return jax.tree.map(fill, path_names(shapes), shapes)


def check_expectations(model_name: str | None, rows: dict) -> None:
    """Raises if the token counts or analytic MACs differ from the spec's for a paper model at 224 px."""
    expected = EXPECTED.get(model_name or "")
    if not expected:
        return
    for label, row in rows.items():
        compression = row["compression"]
        want = expected["tokens"][compression]
        if row["final_tokens"] != want:
            raise RuntimeError(
                f"ViT-{model_name} {compression} must end at {want} tokens (spec §3.1, §5.7), but {label} ends at "
                f"{row['final_tokens']} ({row['tokens']}); check schedules.PAPER_SCHEDULES and the 50% clamp."
            )
        want = expected.get("gmacs", {}).get(compression)
        if want is not None and round(row["gmacs"], 2) != want:
            raise RuntimeError(
                f"ViT-{model_name} {compression}: analytic MACs {row['gmacs']:.4f} G, the spec says {want} G "
                "(§3.1); check jdjax.merging.flops."
            )


# ----------------------------------------------------------------------------- compiled functions


def _compile(fn, *args, compiler_options: dict | None = None):
    """(compiled, seconds to lower + compile). compiler_options: XLA options (tests pass
    {'xla_backend_optimization_level': 0} to compile ~2.5x faster; never for timing)."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(compiler_options)
    return compiled, time.perf_counter() - t0


def inference_fn(model, params, x, compiler_options: dict | None = None):
    """(fn() -> blocks on logits, compile seconds, XLA GFLOP per image) of jit(model.apply) at x."""
    import jax

    from benchmarks import harness

    def forward(p, x):
        return model.apply({"params": p}, x)

    compiled, compile_s = _compile(forward, params, x, compiler_options=compiler_options)
    gflop = harness.xla_flops(compiled) / x.shape[0] / 1e9
    return (lambda: jax.block_until_ready(compiled(params, x))), compile_s, gflop


def split_trainable(params, pattern: str):
    """(trainable, frozen): flat {'a/b/c': array} dicts, split by `optim.trainable_mask(params, pattern)`."""
    from flax import traverse_util

    from jdjax.train import optim

    flat = traverse_util.flatten_dict(params, sep="/")
    mask = traverse_util.flatten_dict(optim.trainable_mask(params, pattern), sep="/")
    trainable = {k: v for k, v in flat.items() if mask[k]}
    frozen = {k: v for k, v in flat.items() if not mask[k]}
    return trainable, frozen


def train_step_fn(model, params, config, x, y, compiler_options: dict | None = None):
    """(fn() -> blocks on one training step, compile seconds, XLA GFLOP per image, trainable count).

    The step of the transfer recipe: loss = CE(model(x, train=True)), value_and_grad w.r.t. the
    trainable parameters only (tasks.pyra.TRAINABLE: LoRA + PYRA + head), AdamW update of those
    (optim.make_optimizer with the config's optimizer section). The frozen backbone is an argument
    without gradient. Every call starts from the same state (the result is dropped).
    """
    import jax
    import optax
    from flax import traverse_util

    from benchmarks import harness
    from jdjax.tasks import pyra as pyra_task
    from jdjax.train import optim

    trainable, frozen = split_trainable(params, pyra_task.TRAINABLE)
    tx, _ = optim.make_optimizer(config.optimizer, int(config.num_train_steps), pyra_task.TRAINABLE,
                                 pyra_task.lr_multipliers(config))
    opt_state = tx.init(trainable)
    rng = jax.random.key(1)

    def loss_fn(trainable, frozen, x, y, rng):
        p = traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")
        logits = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(trainable, opt_state, frozen, x, y, rng):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y, rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    args = (trainable, opt_state, frozen, x, y, rng)
    compiled, compile_s = _compile(step, *args, compiler_options=compiler_options)
    gflop = harness.xla_flops(compiled) / x.shape[0] / 1e9
    count = sum(int(v.size) for v in trainable.values())
    return (lambda: jax.block_until_ready(compiled(*args))), compile_s, gflop, count


# ----------------------------------------------------------------------------- measurement


def static_rows(models: dict) -> dict[str, dict]:
    """{label: method, compression, analytic MACs and token counts} of the cases (nothing compiled)."""
    from jdjax.merging import flops

    out = {}
    for (method, compression), (label, model) in zip(CASES, models.items()):
        macs, tokens = flops.count_model(model), model.token_counts()
        out[label] = {"method": method, "compression": compression, "macs": macs, "gmacs": macs.gmacs,
                      "tokens": tokens, "final_tokens": tokens[-1]}
    return out


def measure(config, batch: int, train_batch: int, repeats: int, train: bool = True, model_name: str | None = None,
            compiler_options: dict | None = None, log=print) -> dict[str, dict]:
    """Builds, compiles and times the five cases; returns {label: row} in CASES order (no recording).

    With a paper `model_name` the token counts and MACs are checked against the spec first.
    compiler_options go to every XLA compile (tests only; the defaults are what is timed).
    """
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import harness

    models = build_models(config)
    info = static_rows(models)
    check_expectations(model_name, {k: {**v, "tokens": ">".join(map(str, v["tokens"]))} for k, v in info.items()})
    size, num_classes = config.data.image_size, config.data.num_classes
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
    xt = jnp.asarray(rng.uniform(-1, 1, (train_batch, size, size, 3)), jnp.float32)
    yt = jnp.asarray(rng.integers(0, num_classes, train_batch), jnp.int32)

    fns = {}
    for label, model in models.items():
        params = random_params(model, size)
        fns[label], compile_s, xla = inference_fn(model, params, x, compiler_options)
        info[label].update(compile_s=compile_s, xla_gflop=xla)
        msg = f"  {label}: inference compiled in {compile_s:.1f} s"
        if train:
            fns[f"{label} train"], tc, txla, count = train_step_fn(model, params, config, xt, yt, compiler_options)
            info[label].update(train_compile_s=tc, xla_train_gflop=txla, trainable_params=count)
            msg += f", train step in {tc:.1f} s"
        log(msg, flush=True)
    for fn in fns.values():  # warm-up: first execution of every compiled function
        fn()
    timing = harness.interleaved(fns, repeats)

    def med(name):
        return timing[name]["median_s"]

    dense = info["lora"]["macs"].total
    rows = {}
    for label, i in info.items():
        t, tome = med(label), f"tome-{i['compression']}"
        row = {
            "method": i["method"],
            "compression": i["compression"],
            "batch": batch,
            "infer_img_s": batch / t,
            "speedup": med("lora") / t,
            "infer_ms": 1e3 * t,
            "infer_p10_p90_ms": f"{1e3 * timing[label]['p10_s']:.4g}-{1e3 * timing[label]['p90_s']:.4g}",
            "pyra_overhead_pct": 100 * (t / med(tome) - 1) if i["method"] == "pyra" else None,
        }
        if train:
            tt = med(f"{label} train")
            row.update(
                train_batch=train_batch,
                train_img_s=train_batch / tt,
                train_speedup=med("lora train") / tt,
                train_ms=1e3 * tt,
                train_pyra_overhead_pct=100 * (tt / med(f"{tome} train") - 1) if i["method"] == "pyra" else None,
            )
        row.update(
            gmacs=i["macs"].gmacs,
            gmacs_speedup=dense / i["macs"].total,
            fvcore_gflops=i["macs"].total / 2**30,
            xla_gflop=i["xla_gflop"],
            xla_train_gflop=i.get("xla_train_gflop"),
            compile_s=i["compile_s"],
            train_compile_s=i.get("train_compile_s"),
            trainable_params=i.get("trainable_params"),
            final_tokens=i["tokens"][-1],
            tokens=">".join(map(str, i["tokens"])),
        )
        rows[label] = row
    return rows


def summary(rows: dict[str, dict], targets: bool = True) -> str:
    """A short text table of the rows, with the targets met or missed (paper models only)."""
    train = "train_img_s" in rows["lora"]
    head = f"{'case':<10} {'img/s':>8} {'speedup':>8} {'GMACs':>7} {'fvcoreGF':>8} {'XLA GF':>7} {'tokens out':>10}"
    head += f" {'train img/s':>11} {'train x':>8}" if train else ""
    lines = [head]
    for label, r in rows.items():
        line = (f"{label:<10} {r['infer_img_s']:>8.2f} {r['speedup']:>7.2f}x {r['gmacs']:>7.2f} {r['fvcore_gflops']:>8.2f} "
                f"{r['xla_gflop']:>7.2f} {r['final_tokens']:>10}")
        if train:
            line += f" {r['train_img_s']:>11.2f} {r['train_speedup']:>7.2f}x"
        lines.append(line)
    for label, r in rows.items():
        if r["method"] == "lora" or not targets:
            continue
        target = SPEEDUP_TARGETS[r["compression"]]
        verdict = "ok" if r["speedup"] >= target else "MISSED"
        lines.append(f"{label}: inference {r['speedup']:.2f}x dense LoRA (target >= {target}x) {verdict}")
        if r["method"] == "pyra":
            verdict = "ok" if r["pyra_overhead_pct"] <= OVERHEAD_TARGET_PCT else "MISSED"
            extra = f", training step {r['train_pyra_overhead_pct']:+.1f} %" if train else ""
            lines.append(f"{label}: PYRA over ToMe {r['pyra_overhead_pct']:+.1f} % inference "
                         f"(target <= {OVERHEAD_TARGET_PCT} %) {verdict}{extra}")
    for label, r in rows.items():
        lines.append(f"tokens {label}: {r['tokens']}")
    return "\n".join(lines)


def record_rows(rows: dict[str, dict], name: str, write: bool = True) -> list[dict]:
    """One harness.record line per case (None values dropped), printed as JSON; with write=False
    nothing goes to benchmarks/results.jsonl or RESULTS.md."""
    from benchmarks import harness

    out = []
    for label, row in rows.items():
        metrics = {k: v for k, v in row.items() if v is not None}
        metrics.update(load1=os.getloadavg()[0], notes=NOTES)
        out.append(harness.record(BENCHMARK, f"{name} b{row['batch']} {label}", metrics, smoke=not write))
    return out


# ----------------------------------------------------------------------------- entry point


def _define_flags():
    """Flags are defined only when run as a script, so importing this module (tests) defines none."""
    from absl import flags

    flags.DEFINE_integer("batch", 8, "Inference batch size.")
    flags.DEFINE_integer("train_batch", 4, "Training-step batch size.")
    flags.DEFINE_integer("repeats", 10, "Interleaved timing rounds (one call per function each; medians reported). "
                         "A round of ViT-B/16 takes ~10 s idle; PYRA's ~2 % over ToMe needs ~10 rounds to show.")
    flags.DEFINE_string("model", "B/16", f"ViT size with the paper's schedules: one of {sorted(CONFIG_VARIANTS)}.")
    flags.DEFINE_bool("train", True, "Also time the training step (--notrain: inference only).")
    flags.DEFINE_bool("record", True, "Append to benchmarks/results.jsonl and regenerate RESULTS.md.")
    flags.DEFINE_bool("smoke", False, "Tiny model (configs/pyra.py:smoke), batch 2, two rounds; records nothing.")


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if f.smoke:
        from configs import pyra as pyra_config

        config, model_name, batch, train_batch, repeats = pyra_config.get_config("smoke"), None, 2, 2, 2
        name = "smoke ViT"
    else:
        if f.model not in CONFIG_VARIANTS:
            raise app.UsageError(f"--model={f.model!r}: the paper's schedules exist for {sorted(CONFIG_VARIANTS)}.")
        config, model_name, batch, train_batch, repeats = paper_config(f.model), f.model, f.batch, f.train_batch, f.repeats
        name = f"ViT-{model_name}@{config.data.image_size} LoRA r{config.model.lora_rank}"
    print(f"{name}: batch {batch}, train batch {train_batch}, {repeats} rounds; load {os.getloadavg()[0]:.2f}", flush=True)
    rows = measure(config, batch, train_batch, repeats, train=f.train, model_name=model_name)
    record_rows(rows, name, write=f.record and not f.smoke)
    print(summary(rows, targets=model_name is not None), flush=True)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
