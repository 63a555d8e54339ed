"""Roofline: each model's forward (and training step) against the same run's machine limits,
next to transformers' PyTorch ViT-B/16 timed in the same rounds.

    python -m benchmarks.roofline                      # batch 1 and 8, train step at 8; records
    python -m benchmarks.roofline --batch_sizes=1,8,32 --repeats=7
    python -m benchmarks.roofline --notrain --norecord # forward only, print the rows
    python -m benchmarks.roofline --smoke              # tiny models, records nothing
    python -m benchmarks.roofline --profile            # kernel-time shares by kind (jax.profiler trace)

Per batch size every function below is compiled ahead of time (compile_s), run once, then all
are timed in --repeats interleaved rounds (`harness.interleaved`: every function once per round,
rotated order), so that a change of load on the shared machine hits limits and models alike.

Cases (float32, 224 px, random weights; jdjax rows are `jax.jit` of the model's apply):
- 'vit dense' ViT-B/16 with its 1000-class head; 'vit tome r=16' the same with ToMe r=16
  (proportional attention); 'pyra-high' the PYRA task's model (LoRA on qkv, 100 classes, the
  paper's high schedule); 'clip image' / 'clip text' the CLIP ViT-B/32 towers (224 px; 77 tokens).
- 'torch vit dense': `transformers.ViTForImageClassification(ViTConfig())` (ViT-B/16, 1000
  labels, the library's default attention), eval mode under `torch.inference_mode()`, with
  torch's default threads (one per core).
- train (at --train_batch): 'vit dense train' full fine-tuning (cross-entropy, grads of every
  parameter, AdamW); 'pyra-high train' the PYRA recipe's step (grads of LoRA + PYRA + head only,
  benchmarks/pyra.py `train_step_fn`); 'torch vit dense train' the same full step in PyTorch.

Ablations (at --train_batch, ViT-B/16 shapes, forward and forward + backward): the two places
where jdjax writes a formula by hand instead of the obvious library call, each beside that call:
- 'attention head-major' (`jdjax.nn.attention.attend`, products over [B, H, N, Dh], with the
  transposes from and to token-major) vs 'attention token-major' (the same einsums written over
  [B, N, H, Dh], as the model had them; `jax.nn.dot_product_attention` uses that layout too);
- 'mlp exact_gelu' (`jdjax.nn.vit.exact_gelu`, erf) vs 'mlp jax.nn.gelu' (erfc), the MLP
  fc1 -> GELU -> fc2 of one block. ablation_speedup = the alternative's median / ours.

Limits, measured in the same rounds:
- matmul: a 2048 x 2048 float32 product, jax (limit of the jdjax rows) and torch (of the torch
  rows); matmul_gflop_s = 2 * 2048^3 / median.
- stream: the sum of 256 MB of float32 (a read of memory that caches cannot hold), stream_gb_s.

Columns:
- items_per_s = batch / median (images, or texts for 'clip text').
- gflop: XLA cost_analysis FLOPs per item of the compiled function (2 per multiply-add plus
  element-wise work); torch rows carry their jdjax twin's count (same architecture).
- gflop_s = gflop * items_per_s; pct_of_matmul = 100 * gflop_s / the framework's matmul rate.
- bound_ms: the roofline lower bound of one call: max(FLOPs / matmul rate, parameter bytes /
  stream rate), i.e. compute-bound or bound by reading every weight once from memory (which
  decides small batches); pct_of_roofline = 100 * bound_ms / median_ms.
- vs_torch = items_per_s / 'torch vit dense' items_per_s at the same batch (train rows: / the torch
  train step's). ablation_speedup: see Ablations (items are the batch's images).
- load1: the 1-minute load average when the row was written (2 shared cores).
"""

from __future__ import annotations

import os
import time

BENCHMARK = "roofline"
MATMUL_N = 2048
STREAM_FLOATS = 64 * 2**20  # 256 MB
NOTES = (
    "Forward passes and training steps (float32, random weights) against the same run's limits: a 2048^2 "
    "float32 matmul per framework (matmul_gflop_s) and the read of 256 MB (stream_gb_s). Every function compiled "
    "ahead (compile_s), warmed up once, timed in interleaved rounds (all once per round, rotated order); "
    "medians. gflop = XLA cost_analysis FLOPs per item (torch rows: their jdjax twin's); gflop_s = gflop x "
    "items/s; pct_of_matmul = gflop_s / the framework's matmul rate; bound_ms = max(FLOPs / matmul rate, "
    "parameter bytes / stream rate); pct_of_roofline = bound_ms / median_ms; vs_torch = items/s over "
    "transformers' PyTorch ViT-B/16 at the same batch (train rows: over its train step). load1 = 1-minute "
    "load average (2 shared cores)."
)
SMOKE_VIT = dict(patch_size=8, width=64, depth=4, num_heads=2, mlp_dim=128)  # 32 px -> 17 tokens
SMOKE_CLIP = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                  context_length=16, vocab_size=100, text_width=32, text_layers=2, text_heads=2)


# ----------------------------------------------------------------------------- the cases


def _compiled(fn, *args):
    """(call() blocking on fn(*args), compile seconds, XLA GFLOP of one call)."""
    import jax

    from benchmarks import harness

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    return (lambda: jax.block_until_ready(compiled(*args))), compile_s, harness.xla_flops(compiled) / 1e9


def _param_bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def jax_models(smoke: bool) -> dict:
    """{label: (model, apply(params, x), example input builder(batch), params)} for the jdjax cases."""
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import pyra as pyra_bench
    from configs import pyra as pyra_config
    from jdjax.merging import schedules
    from jdjax.nn.clip import CLIP, clip_config
    from jdjax.nn.vit import MergeConfig, ViT, vit_config

    dims = SMOKE_VIT if smoke else vit_config("B/16")
    size = 32 if smoke else 224
    rng = np.random.default_rng(0)

    def images(batch):
        return jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32)

    vits = {label: ViT(num_classes=1000, **dims, merge=MergeConfig(r=schedules.parse_r(r, dims["depth"])),
                       image_size=size) for label, r in (("vit dense", 0), ("vit tome r=16", 16))}
    out = {}
    for label, model in vits.items():
        out[label] = (model, lambda p, x, m=model: m.apply({"params": p}, x), images,
                      pyra_bench.random_params(model, size))
    if smoke:
        config = pyra_config.get_config("smoke")
        config.model.update(width=64, depth=4, num_heads=2, mlp_dim=128, patch_size=8, lora_rank=2)
        config.data.image_size = 32
        config.schedules.update(high=[4, 4, 2, 2])
    else:
        config = pyra_bench.paper_config("B/16")
    pyra = pyra_bench.build_models(config)["pyra-high"]
    out["pyra-high"] = (pyra, lambda p, x: pyra.apply({"params": p}, x), images, pyra_bench.random_params(pyra, size))
    clip = CLIP(**(SMOKE_CLIP if smoke else clip_config("ViT-B/32")))
    image_tower, text_tower = clip.towers()
    ctx, vocab = clip.context_length, clip.vocab_size

    def texts(batch):
        return jnp.asarray(rng.integers(1, vocab, (batch, ctx)), jnp.int32)

    clip_size = clip.image_size
    out["clip image"] = (image_tower, lambda p, x: image_tower.apply({"params": p}, x),
                         lambda b: jnp.asarray(rng.uniform(-1, 1, (b, clip_size, clip_size, 3)), jnp.float32),
                         pyra_bench.random_params(image_tower, clip_size))
    out["clip text"] = (text_tower, lambda p, x: text_tower.apply({"params": p}, x), texts,
                        pyra_bench.random_params(text_tower, example=(texts(1),)))
    return out, config


def torch_vit(smoke: bool):
    """transformers' ViT-B/16 (1000 labels, random weights), eval mode."""
    import torch
    import transformers

    kw = {}
    if smoke:
        kw = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000, **kw)).eval()


def torch_forward(model, batch: int, size: int):
    import torch

    x = torch.rand(batch, 3, size, size) * 2 - 1

    def call():
        with torch.inference_mode():
            return model(pixel_values=x).logits

    return call


def torch_train_step(model, batch: int, size: int):
    """One full fine-tuning step (CE, AdamW) of a copy of `model`; the copy keeps training from call
    to call (throughput does not depend on the weights), while the jax steps restart from one state."""
    import copy

    import torch

    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size) * 2 - 1
    y = torch.randint(0, 1000, (batch,))

    def call():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        loss.backward()
        opt.step()
        return loss.item()

    return call


def jax_full_train_step(apply, params, x, y):
    """(call, compile_s, GFLOP) of one full fine-tuning step: CE, grads of every parameter, AdamW."""
    import jax
    import optax

    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)

    def step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return _compiled(step, params, opt_state, x, y)


def ablations(batch: int, smoke: bool) -> dict:
    """{name: (fn(*args), args)}: attention and MLP of one block, ours and the alternative, forward
    and grad of a weighted sum (the weights keep the backward from simplifying)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdjax.nn.attention import attend
    from jdjax.nn.vit import exact_gelu

    n, c, h = (17, 64, 2) if smoke else (197, 768, 12)
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)

    q, k, v, r = (arr(batch, n, h, c // h) for _ in range(4))  # token-major, as the qkv projection gives them
    x, w1, w2, rm = arr(batch, n, c), arr(c, 4 * c), arr(4 * c, c), arr(batch, n, c)

    def head_major(q, k, v):
        return attend(*(jnp.swapaxes(t, 1, 2) for t in (q, k, v)))[0]

    def token_major(q, k, v):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)

    def mlp(act):
        return lambda x, w1, w2: act(x @ w1) @ w2

    fns = {"attention head-major": (head_major, (q, k, v), r), "attention token-major": (token_major, (q, k, v), r),
           "mlp exact_gelu": (mlp(exact_gelu), (x, w1, w2), rm),
           "mlp jax.nn.gelu": (mlp(lambda t: jax.nn.gelu(t, approximate=False)), (x, w1, w2), rm)}
    out = {}
    for name, (fn, args, weight) in fns.items():
        out[name] = (fn, args)
        loss = lambda *a, fn=fn, weight=weight: jnp.sum(fn(*a) * weight)  # noqa: E731
        out[f"{name} grad"] = (jax.grad(loss, argnums=tuple(range(len(args)))), args)
    return out


ABLATION_PAIRS = {"attention head-major": "attention token-major", "mlp exact_gelu": "mlp jax.nn.gelu"}


# ----------------------------------------------------------------------------- measurement


def measure(batch_sizes, train_batch: int | None, repeats: int, smoke: bool = False, log=print) -> list[dict]:
    """Compiles and times every case per batch size (and the train steps at train_batch); rows."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from benchmarks import harness
    from benchmarks import pyra as pyra_bench

    cases, pyra_config = jax_models(smoke)
    size = 32 if smoke else 224
    tvit = torch_vit(smoke)
    torch_bytes = sum(p.numel() * p.element_size() for p in tvit.parameters())
    a = jnp.asarray(np.random.default_rng(0).standard_normal((MATMUL_N, MATMUL_N)), jnp.float32)
    ta = torch.randn(MATMUL_N, MATMUL_N)
    stream = jnp.ones((STREAM_FLOATS,), jnp.float32)
    limits = {
        "matmul": _compiled(lambda a: a @ a, a)[0],
        "torch matmul": lambda: torch.mm(ta, ta),
        "stream": _compiled(jnp.sum, stream)[0],
    }
    runs = [(b, False) for b in batch_sizes] + ([(train_batch, True)] if train_batch else [])
    rows = []
    for batch, train in runs:
        fns, info = dict(limits), {}
        for label, (model, apply, example, params) in cases.items():
            if train and label not in ("vit dense", "pyra-high"):
                continue
            x, y = example(batch), jnp.zeros((batch,), jnp.int32)
            if not train:
                call, compile_s, gflop = _compiled(apply, params, x)
                gflop /= batch
            elif label == "vit dense":
                call, compile_s, gflop = jax_full_train_step(apply, params, x, y)
                gflop /= batch
            else:  # train_step_fn reports GFLOP per image
                call, compile_s, gflop, _ = pyra_bench.train_step_fn(model, params, pyra_config, x, y)
            name = f"{label} train" if train else label
            fns[name] = call
            info[name] = dict(compile_s=compile_s, gflop=gflop, bytes=_param_bytes(params), framework="jax")
            log(f"  b{batch} {name}: compiled in {compile_s:.1f} s", flush=True)
        if train:
            for name, (fn, args) in ablations(batch, smoke).items():
                fns[name], compile_s, gflop = _compiled(fn, *args)
                info[name] = dict(compile_s=compile_s, gflop=gflop / batch, bytes=0, framework="jax")
        twin = "vit dense train" if train else "vit dense"
        tname = "torch vit dense train" if train else "torch vit dense"
        fns[tname] = torch_train_step(tvit, batch, size) if train else torch_forward(tvit, batch, size)
        info[tname] = dict(compile_s=0.0, gflop=info[twin]["gflop"], bytes=torch_bytes, framework="torch")
        for fn in fns.values():  # warm-up
            fn()
        timing = harness.interleaved(fns, repeats)
        med = {name: t["median_s"] for name, t in timing.items()}
        rate = {"jax": 2 * MATMUL_N**3 / med["matmul"] / 1e9, "torch": 2 * MATMUL_N**3 / med["torch matmul"] / 1e9}
        stream_gb_s = STREAM_FLOATS * 4 / med["stream"] / 1e9
        for name, i in info.items():
            t = med[name]
            gflop_s = i["gflop"] * batch / t
            bound_s = max(i["gflop"] * batch / rate[i["framework"]], i["bytes"] / 1e9 / stream_gb_s)
            rows.append({
                "case": name,
                "batch": batch,
                "items_per_s": batch / t,
                "median_ms": 1e3 * t,
                "p10_p90_ms": f"{1e3 * timing[name]['p10_s']:.4g}-{1e3 * timing[name]['p90_s']:.4g}",
                "gflop": i["gflop"],
                "gflop_s": gflop_s,
                "matmul_gflop_s": rate[i["framework"]],
                "pct_of_matmul": 100 * gflop_s / rate[i["framework"]],
                "stream_gb_s": stream_gb_s,
                "bound_ms": 1e3 * bound_s,
                "pct_of_roofline": 100 * bound_s / t,
                "vs_torch": med[tname] / t if name.startswith(("vit", "pyra", "torch")) else None,
                "ablation_speedup": ablation_speedup(name, med),
                "compile_s": i["compile_s"],
                "load1": os.getloadavg()[0],
            })
    return rows


def ablation_speedup(name: str, med: dict) -> float | None:
    """The alternative's median over ours for the ablation rows of our formulas, else None."""
    base, grad = name.removesuffix(" grad"), " grad" if name.endswith(" grad") else ""
    if base not in ABLATION_PAIRS:
        return None
    return med[ABLATION_PAIRS[base] + grad] / med[name]


def summary(rows: list[dict]) -> str:
    head = (f"{'case':<30} {'batch':>5} {'items/s':>8} {'GFLOP':>6} {'GFLOP/s':>8} {'%matmul':>8} "
            f"{'%roofline':>9} {'vs torch':>10}")
    lines = [head]
    for r in rows:
        vs = f"{r['vs_torch']:.2f}x" if r["vs_torch"] is not None else ""
        if r["ablation_speedup"] is not None:
            vs = f"abl {r['ablation_speedup']:.2f}x"
        lines.append(f"{r['case']:<30} {r['batch']:>5} {r['items_per_s']:>8.2f} {r['gflop']:>6.2f} "
                     f"{r['gflop_s']:>8.1f} {r['pct_of_matmul']:>7.1f}% {r['pct_of_roofline']:>8.1f}% {vs:>10}")
    return "\n".join(lines)


def record_rows(rows: list[dict], name: str, write: bool = True) -> None:
    from benchmarks import harness

    for row in rows:
        metrics = {k: v for k, v in row.items() if k != "case" and v is not None}
        harness.record(BENCHMARK, f"{name} b{row['batch']} {row['case']}", {**metrics, "notes": NOTES},
                       smoke=not write)


# ----------------------------------------------------------------------------- profile


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """{instruction name: category} for the top-level instructions of an optimised HLO module:
    'matmul' (a fusion around one dot), 'attention' (two dots, or a dot with the softmax's exp),
    'convolution', 'gather / scatter / sort' (the merge kernels), or 'elementwise and copies'."""
    import re

    body: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            m = re.match(r"(?:ENTRY )?%?([\w.\-]+) ", line)
            current = m.group(1) if m else None
            body[current] = []
        elif current is not None:
            body[current].append(line)

    def ops(comp: str) -> list[str]:
        return re.findall(r"= \S+ ([\w\-]+)\(", "\n".join(body.get(comp, [])))

    out = {}
    for line in (x for lines in body.values() for x in lines):
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if not m:
            continue
        called = re.search(r"calls=%?([\w.\-]+)", line)
        kinds = ops(called.group(1)) if called else [m.group(2)]
        if kinds.count("dot") >= 2 or ("dot" in kinds and "exponential" in kinds):
            out[m.group(1)] = "attention"
        elif "dot" in kinds:
            out[m.group(1)] = "matmul"
        elif "convolution" in kinds:
            out[m.group(1)] = "convolution"
        elif {"gather", "scatter", "sort"} & set(kinds):
            out[m.group(1)] = "gather / scatter / sort"
        else:
            out[m.group(1)] = "elementwise and copies"
    return out


def profile(apply, params, x, calls: int = 3) -> dict[str, float]:
    """{category: share (%) of the executed kernels' time} of jit(apply)(params, x), from a
    `jax.profiler` trace of `calls` runs: each XLA:CPU thunk's duration, grouped by hlo_categories.
    Thunks may overlap on the two cores, so the shares are of summed kernel time, not wall time."""
    import collections
    import glob
    import gzip
    import json
    import tempfile

    import jax

    compiled = jax.jit(apply).lower(params, x).compile()
    categories = hlo_categories(compiled.as_text())
    for _ in range(2):
        jax.block_until_ready(compiled(params, x))
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(compiled(params, x))
        (trace,) = glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True)
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in categories:
            total[categories[e["name"]]] += e.get("dur", 0)
    summed = sum(total.values())
    return {k: 100 * v / summed for k, v in total.most_common()}


def profile_rows(smoke: bool) -> list[dict]:
    """The kernel-time shares of ViT-B/16 dense at batch 8 and ToMe r=16 at batch 1."""
    cases, _ = jax_models(smoke)
    rows = []
    for label, batch in (("vit dense", 8), ("vit tome r=16", 1)):
        _, apply, example, params = cases[label]
        shares = profile(apply, params, example(batch))
        rows.append({"case": f"profile {label}", "batch": batch, **{f"pct {k}": v for k, v in shares.items()}})
    return rows


# ----------------------------------------------------------------------------- entry point


def _define_flags():
    from absl import flags

    flags.DEFINE_list("batch_sizes", ["1", "8"], "Forward batch sizes.")
    flags.DEFINE_integer("train_batch", 8, "Training-step batch size (0: no training rows).")
    flags.DEFINE_bool("train", True, "Time the training steps (--notrain: forward only).")
    flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds (one call per function each; medians).")
    flags.DEFINE_bool("record", True, "Append to benchmarks/results.jsonl and regenerate RESULTS.md.")
    flags.DEFINE_bool("smoke", False, "Tiny models, batch 2, two rounds; records nothing.")
    flags.DEFINE_bool("profile", False, "Instead of timing: the share of kernel time per kind of kernel "
                      "(jax.profiler trace) of ViT-B/16 dense at batch 8 and ToMe r=16 at batch 1.")


def main(argv):
    from absl import app, flags

    from benchmarks import harness

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    smoke = f.smoke
    batches = [2] if smoke else [int(b) for b in f.batch_sizes]
    train_batch = (2 if smoke else f.train_batch) if f.train else 0
    repeats = 2 if smoke else f.repeats
    if f.profile:
        for row in profile_rows(smoke):
            harness.record(BENCHMARK, f"{'smoke' if smoke else 'B/16 224px fp32'} b{row['batch']} {row['case']}",
                           {k: v for k, v in row.items() if k != "case"}, smoke=smoke or not f.record)
        return
    print(f"roofline: batches {batches}, train batch {train_batch or '-'}, {repeats} rounds; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    rows = measure(batches, train_batch, repeats, smoke=smoke)
    record_rows(rows, "smoke" if smoke else "B/16 224px fp32", write=f.record and not smoke)
    print(summary(rows), flush=True)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
