"""Product-description generator: training tokens/s, beam-5 decoding products/s, and the cost of the copy
head and of the review memory over the plain Transformer, for `ProductGenerator` in the four methods of
`jdjax/tasks/prodgen.py` (issue 15; spec `experiments_ads_text.md` P3), at the embedded default sizes and
at the paper's.

    python -m benchmarks.prodgen                               # both sizes, 4 methods; records to benchmarks/RESULTS.md
    python -m benchmarks.prodgen --sizes=default --repeats=5   # the embedded sizes only
    python -m benchmarks.prodgen --nopaper_caps                # paper cases at --batch (very slow on 2 cores)
    python -m benchmarks.prodgen --norecord                    # print the rows, write nothing
    python -m benchmarks.prodgen --smoke                       # tiny models (configs/prodgen.py:smoke), records nothing

Sizes (models built by `jdjax.tasks.prodgen.build_model(config, METHODS[name], V)` from `configs/prodgen.py`):
- default: the embedded config (2 layers, width 128, 4 heads, mlp 256), source 16 title + 24 attribute
  tokens, 4 reviews x 24 tokens (the decoder reads every review's tokens, review_memory='all'), target 48,
  vocabulary V = 2000;
- paper (`:paper`): 6 layers, width 512, 8 heads, mlp 2048, source 30 + 60, 10 reviews x 50, target 100,
  V = 20000.
Extended vocabulary V + max_oov, max_oov = max_title + max_attr (the task's). Both at --batch (32), except
the paper cases in PAPER_CAPS (on 2 shared CPU cores a paper `full` training step encodes ~690 tokens per
product): their batch is capped and the row says `capped_from`; --nopaper_caps runs them at --batch.

Batches are random, with the data encoder's layout (`jdjax.data.products.encode_product`): title and attribute
lengths uniform in [L/2, L] (no gap between; segments 1 title, 2 key / 3 value), 0-3 source positions per
product out of vocabulary (unk 3 in `source`, V, V+1, ... in `source_ext`); half the products have 0-1
reviews, the others 2..M, review lengths uniform in [Lrev/2, Lrev]; targets of length uniform in [Lt/2, Lt]
(words + end; target_in = start + words), where a product with OOV source words uses up to 2 of them
(unk in target_*, the extended id in `target_ext`) and 1 in 5 products has one unk that no copy can fix.
Weights: N(0, 0.02^2) NumPy noise (LayerNorm scales 1 + noise; no init compile), equal across methods for
the parameters they share; float32; dropout on in training as in the task. Cases per (size, method):

- train: one jitted step: value_and_grad of `prodgen_loss` on `model.apply(batch, train=True)` (kl_weight =
  loss.kl_weight, bow_weight = loss.bow_weight for the two review methods, 0 for the others, as the task), then
  the recipe's optimizer (`optim.make_optimizer(config.optimizer, num_train_steps)`). tokens_per_s = non-pad target
  tokens (end included) / s.
- beam5: jitted `prodgen.generate` (beam 5, max_len = target length, the recipe's length penalty and n-gram
  block). With random weights the end token is rarely emitted, so decoding runs ~max_len steps (mean_out_len).
- cost rows (per size): copy-head = transformer_copy / transformer, review-memory = reviews_prior /
  transformer_copy, everything = full / transformer; ratios of the median times (train_ratio, beam5_ratio) and
  the range of the per-round ratios (all functions of a size are timed in the same interleaved rounds).

Every function is compiled ahead of time (compile_s), run once (warmup_s), then all functions of a size are
timed in interleaved rounds (`harness.interleaved`; --repeats, --paper_repeats); medians. vs_transformer =
case / the transformer's same part in those rounds. mem_temp_mb = XLA temporaries of the compiled function;
xla_gflop = XLA cost_analysis FLOPs of the train step. load1 = 1-minute load average (2 shared cores).
"""

from __future__ import annotations

import os
import time

BENCHMARK = "prodgen"
METHOD_NAMES = ("transformer", "transformer_copy", "reviews_prior", "full")  # jdjax.tasks.prodgen.METHODS
SIZES = ("default", "paper")
VOCAB = {"smoke": 64, "default": 2000, "paper": 20000}
CONFIG_ARGS = {"smoke": "smoke", "default": "", "paper": "paper"}
BEAM = 5
FIRST_WORD = 5  # ids 0..4 are pad, start, end, unk, eot (jdjax.data.text)
START, END, UNK = 1, 2, 3
TITLE, KEY, VALUE = 1, 2, 3  # jdjax.data.products segments
MAX_SOURCE_OOV = 3  # OOV source positions per product: uniform in 0..3
# (numerator, denominator) methods of the cost rows.
COSTS = {"copy-head": ("transformer_copy", "transformer"), "review-memory": ("reviews_prior", "transformer_copy"),
         "everything": ("full", "transformer")}
# Paper-size batches on 2 shared CPU cores (calibrated at load ~7: at batch 2 a train step takes ~3 s, beam 5
# 3 s (transformer) to 6 s (full); compiling a train step ~20-30 s).
PAPER_CAPS = {"train": 4, "beam": 4}
SMOKE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}  # --smoke compiles faster; timings mean nothing
NOTES = (
    "ProductGenerator in the 4 methods of jdjax/tasks/prodgen.py (transformer: no reviews, no copy; "
    "transformer_copy: + pointer-generator; reviews_prior: + review memory by the prior, gate, BOW; full: + "
    "posterior, KL); configs/prodgen.py: default = embedded sizes, source 16+24, 4 reviews x 24, target 48, "
    "V 2000; the decoder reads every review's tokens (review_memory='all'); paper = :paper sizes, source 30+60, "
    "10 x 50, target 100, V 20000; extended vocab V + Ls. float32, "
    "random batches (half the products with 0-1 reviews, 0-3 OOV source words, copied into the target), random "
    "weights N(0, 0.02^2). train: jitted step (value_and_grad of prodgen_loss, the recipe's AdamW); tokens_per_s = "
    "non-pad target tokens/s. beam5: jitted prodgen.generate, beam 5, max_len = target length, recipe length "
    "penalty and n-gram block; random weights rarely emit end (mean_out_len). Cost rows: copy-head = "
    "transformer_copy / transformer, review-memory = reviews_prior / transformer_copy, everything = full / "
    "transformer, ratios of medians (and range of per-round ratios). Paper cases with capped_from run at a smaller "
    "batch than 32 (2 shared CPU cores). Compiled ahead of time (compile_s), one warm-up call (warmup_s), then "
    "all functions of a size in interleaved rounds; medians. mem_temp_mb = XLA temporaries; xla_gflop = XLA FLOPs "
    "of the train step. load1 = 1-minute load average (2 shared cores)."
)


# ----------------------------------------------------------------------------- configs and data


def size_config(size: str):
    """configs/prodgen.py for a size ('smoke', 'default', 'paper')."""
    from configs import prodgen as prodgen_config

    return prodgen_config.get_config(CONFIG_ARGS[size])


def dims_string(config, vocab: int) -> str:
    """'V2000 Ls16+24 R6x24 Lt48 C128 F256 h4 x2'."""
    d, m = config.data, config.model
    return (f"V{vocab} Ls{d.max_title}+{d.max_attr} R{d.max_reviews}x{d.max_review_len} Lt{d.max_target} "
            f"C{m.width} F{m.mlp_dim} h{m.num_heads} x{m.num_layers}")


def batches(size: str, batch: int, caps: bool = True) -> dict[str, int]:
    """{'train', 'beam': batch size}: `batch`, capped by PAPER_CAPS at the paper size."""
    cap = PAPER_CAPS if caps and size == "paper" else {}
    return {part: min(batch, cap.get(part, batch)) for part in ("train", "beam")}


def product_batch(rng, batch: int, data, vocab: int) -> dict:
    """A random batch with the task's keys (jdjax.tasks.prodgen.ARRAY_KEYS), int32 NumPy (module docstring):
    source / segment / source_ext [B, Ls], reviews [B, M, Lrev], target_in / target_out / target_ext [B, Lt]."""
    import numpy as np

    ltitle, la, m, lr, lt = data.max_title, data.max_attr, data.max_reviews, data.max_review_len, data.max_target
    ls = ltitle + la
    out = {k: np.zeros((batch, ls), np.int64) for k in ("source", "segment", "source_ext")}
    out.update({k: np.zeros((batch, lt), np.int64) for k in ("target_in", "target_out", "target_ext")})
    out["reviews"] = np.zeros((batch, m, lr), np.int64)

    def half(n):  # uniform in [n/2, n]
        return rng.integers(max(1, n // 2), n + 1)

    for b in range(batch):
        n_title, n_attr = half(ltitle), half(la)
        n = n_title + n_attr
        words = rng.integers(FIRST_WORD, vocab, n)
        attr_seg = np.where(np.arange(n_attr) % 3 == 0, KEY, VALUE)  # key : value value, ...
        out["segment"][b, :n] = np.concatenate([np.full(n_title, TITLE), attr_seg])
        oov_pos = rng.choice(n, rng.integers(0, MAX_SOURCE_OOV + 1), replace=False)
        oov_pos = np.sort(oov_pos)  # extended ids in order of first appearance
        ext = words.copy()
        ext[oov_pos] = vocab + np.arange(len(oov_pos))
        words[oov_pos] = UNK
        out["source"][b, :n], out["source_ext"][b, :n] = words, ext

        n_rev = rng.integers(0, 2) if b % 2 == 0 else rng.integers(min(2, m), m + 1)  # half: 0-1 reviews
        for j in range(n_rev):
            k = half(lr)
            out["reviews"][b, j, :k] = rng.integers(FIRST_WORD, vocab, k)

        length = half(lt)  # words + end
        target = rng.integers(FIRST_WORD, vocab, length - 1)
        target_ext = target.copy()
        if len(oov_pos) and length > 1:  # copy up to 2 of the source's OOV words
            at = rng.choice(length - 1, min(length - 1, rng.integers(1, 3)), replace=False)
            target_ext[at] = vocab + rng.integers(0, len(oov_pos), len(at))
            target[at] = UNK
        if length > 1 and rng.uniform() < 0.2:  # an unk no copy can fix
            at = rng.integers(0, length - 1)
            target[at] = target_ext[at] = UNK
        out["target_out"][b, :length] = np.append(target, END)
        out["target_ext"][b, :length] = np.append(target_ext, END)
        out["target_in"][b, :length] = np.insert(target, 0, START)
    return {k: v.astype(np.int32) for k, v in out.items()}


# ----------------------------------------------------------------------------- compiled functions


def _compile(fn, *args, compiler_options: dict | None = None):
    """(compiled, seconds to lower + compile)."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(compiler_options)
    return compiled, time.perf_counter() - t0


def memory_mb(compiled) -> float:
    """XLA temporaries of a compiled executable in MiB (nan if the backend does not say)."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return float("nan")


def random_params(model, batch, seed: int = 0, scale: float = 0.02) -> dict:
    """Parameters of `model` from NumPy noise (no `init` compile): N(0, scale^2), LayerNorm scales 1 + noise;
    the noise depends only on (seed, parameter path), so methods share the values of the parameters they share."""
    import zlib

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdjax.train.optim import path_names

    shapes = jax.eval_shape(lambda key: nn.meta.unbox(model.init({"params": key, "dropout": key}, batch)["params"]),
                            jax.random.key(0))

    def fill(name, s):
        v = scale * np.random.default_rng([seed, zlib.crc32(name.encode())]).standard_normal(s.shape, np.float32)
        return jnp.asarray(1.0 + v if name.endswith("scale") else v, s.dtype)

    return jax.tree.map(fill, path_names(shapes), shapes)


def train_step_fn(model, method, config, params, batch, compiler_options: dict | None = None):
    """(run() -> (params, opt_state, loss), compile s, XLA GFLOP, temp MiB): the task's loss (constant KL
    weight) and the recipe's optimizer."""
    import jax
    import optax

    from benchmarks import harness
    from jdjax.models import prodgen as pg
    from jdjax.train import optim

    tx, _ = optim.make_optimizer(config.optimizer, int(config.num_train_steps))
    opt_state = tx.init(params)
    rng = jax.random.key(1)
    kl_weight, bow_weight = config.loss.kl_weight, config.loss.bow_weight if method.bow else 0.0

    def loss_fn(p, batch, rng):
        outputs = model.apply({"params": p}, batch, train=True, rngs={"dropout": rng})
        return pg.prodgen_loss(outputs, batch, kl_weight, bow_weight)[0]

    def step(p, opt_state, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    args = (params, opt_state, batch, rng)
    compiled, compile_s = _compile(step, *args, compiler_options=compiler_options)
    return (lambda: jax.block_until_ready(compiled(*args))), compile_s, harness.xla_flops(compiled) / 1e9, \
        memory_mb(compiled)


def generate_fn(model, config, params, inputs, max_len: int, beam_size: int, compiler_options: dict | None = None):
    """(run() -> tokens [B, max_len], compile s, temp MiB): jitted `prodgen.generate` with the recipe's length
    penalty and n-gram block."""
    import jax

    from jdjax.models import prodgen as pg

    def gen(p, batch):
        return pg.generate(model, {"params": p}, batch, max_len=max_len, beam_size=beam_size,
                           length_penalty_alpha=config.decode.length_penalty, block_ngram=config.decode.block_ngram)

    compiled, compile_s = _compile(gen, params, inputs, compiler_options=compiler_options)
    return (lambda: jax.block_until_ready(compiled(params, inputs))), compile_s, memory_mb(compiled)


def _recording(fn, times: list):
    """fn, appending each call's seconds to `times` (per-round ratios)."""
    def run():
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        return out
    return run


# ----------------------------------------------------------------------------- measurement


def measure_size(size: str, methods=METHOD_NAMES, batch: int = 32, repeats: int = 10, caps: bool = True,
                 compiler_options: dict | None = None, seed: int = 0, log=print) -> dict[str, dict]:
    """Builds, compiles and times train + beam5 of every method at one size, all in the same interleaved
    rounds; returns {case: row} (method rows, then the cost rows whose methods were measured)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import harness
    from jdjax.tasks import prodgen as task_lib

    config = size_config(size)
    vocab, d = VOCAB[size], config.data
    sizes = batches(size, batch, caps)
    dims = dims_string(config, vocab)
    log(f"{size} ({dims}): batches {sizes}", flush=True)
    rng = np.random.default_rng(seed)
    train_np = product_batch(rng, sizes["train"], d, vocab)
    beam_np = product_batch(rng, sizes["beam"], d, vocab)
    train_batch = jax.tree.map(jnp.asarray, train_np)
    inputs = {k: jnp.asarray(beam_np[k]) for k in ("source", "segment", "reviews", "source_ext")}

    fns, info, params_count = {}, {}, {}
    for name in methods:
        method = task_lib.METHODS[name]
        model = task_lib.build_model(config, method, vocab)
        params = random_params(model, train_batch, seed)
        params_count[name] = sum(int(x.size) for x in jax.tree.leaves(params))
        fn, compile_s, gflop, mem = train_step_fn(model, method, config, params, train_batch, compiler_options)
        fns[(name, "train")], info[(name, "train")] = fn, dict(compile_s=compile_s, xla_gflop=gflop, mem_temp_mb=mem)
        fn, compile_s, mem = generate_fn(model, config, params, inputs, d.max_target, BEAM, compiler_options)
        fns[(name, "beam5")], info[(name, "beam5")] = fn, dict(compile_s=compile_s, mem_temp_mb=mem)
        log(f"  {name}: compiled train {info[(name, 'train')]['compile_s']:.1f} s, beam5 {compile_s:.1f} s",
            flush=True)

    outputs = {}
    for key, fn in fns.items():  # warm-up: the first execution of every compiled function
        t0 = time.perf_counter()
        outputs[key] = fn()
        info[key]["warmup_s"] = time.perf_counter() - t0
    log(f"  warm-up done ({sum(i['warmup_s'] for i in info.values()):.1f} s); {repeats} rounds", flush=True)
    round_times = {key: [] for key in fns}
    timing = harness.interleaved({key: _recording(fn, round_times[key]) for key, fn in fns.items()}, repeats)
    median = {key: t["median_s"] for key, t in timing.items()}

    tokens = int(np.sum(train_np["target_out"] != 0))
    fill = dict(target_fill=tokens / train_np["target_out"].size,
                source_fill=float(np.mean(train_np["source"] != 0)),
                reviews_per_product=float(np.mean(np.any(train_np["reviews"] != 0, axis=-1).sum(-1))),
                oov_per_product=float(np.mean(np.sum(train_np["source_ext"] >= vocab, axis=-1))),
                copied_per_product=float(np.mean(np.sum(train_np["target_ext"] >= vocab, axis=-1))))
    rows = {}
    for (name, part), t in timing.items():
        b = sizes["train" if part == "train" else "beam"]
        row = {"size": size, "method": name, "part": part, "batch": b, "capped_from": batch if b < batch else None,
               "dims": dims, "ms": 1e3 * t["median_s"], "p10_p90_ms": f"{1e3 * t['p10_s']:.4g}-{1e3 * t['p90_s']:.4g}",
               "repeats": t["repeats"]}
        if ("transformer", part) in median:
            row["vs_transformer"] = t["median_s"] / median[("transformer", part)]
        if part == "train":
            row.update(examples_per_s=b / t["median_s"], tokens_per_s=tokens / t["median_s"], **fill,
                       params=params_count[name])
        else:
            out = np.asarray(outputs[(name, part)])
            row.update(products_per_s=b / t["median_s"], beam_size=BEAM, max_len=d.max_target,
                       mean_out_len=float(np.mean(np.sum(out != 0, axis=1))),
                       copied_out=float(np.mean(np.sum(out >= vocab, axis=1))))
        rows[f"{size} {name} {part} b{b}"] = {**row, **info[(name, part)]}
    for cost, (num, den) in COSTS.items():
        if num not in methods or den not in methods:
            continue
        row = {"size": size, "method": f"{num} / {den}", "part": cost, "repeats": repeats}
        for part in ("train", "beam5"):
            per_round = [a / b for a, b in zip(round_times[(num, part)], round_times[(den, part)])]
            row[f"{part}_ratio"] = median[(num, part)] / median[(den, part)]
            row[f"{part}_ratio_range"] = f"{min(per_round):.3g}-{max(per_round):.3g}"
        rows[f"{size} cost {cost}"] = row
    return rows


def measure(sizes=SIZES, methods=METHOD_NAMES, batch: int = 32, repeats: int = 10, paper_repeats: int = 3,
            caps: bool = True, compiler_options: dict | None = None, log=print) -> dict[str, dict]:
    """measure_size for every size, in order; {case: row} (no recording)."""
    rows = {}
    for size in sizes:
        rows.update(measure_size(size, methods, batch, paper_repeats if size == "paper" else repeats, caps,
                                 compiler_options, log=log))
    return rows


def summary(rows: dict[str, dict]) -> str:
    """Per (size, method): train tokens/s, beam-5 products/s, vs transformer; then the cost ratios."""
    groups, costs = {}, []
    for r in rows.values():
        if r["part"] in COSTS:
            costs.append(r)
        else:
            groups.setdefault((r["size"], r["method"]), {})[r["part"]] = r
    lines = [(f"{'size':<8} {'method':<17} {'train tok/s':>11} {'train/tf':>8} {'beam5 prod/s':>12} {'beam5/tf':>8} "
              f"{'out len':>7}")]
    for (size, method), g in groups.items():
        tr, bm = g["train"], g["beam5"]
        lines.append(f"{size:<8} {method:<17} {tr['tokens_per_s']:>11.0f} {tr.get('vs_transformer', float('nan')):>7.2f}x "
                     f"{bm['products_per_s']:>12.2f} {bm.get('vs_transformer', float('nan')):>7.2f}x "
                     f"{bm['mean_out_len']:>7.1f}")
    if costs:
        lines.append(f"{'size':<8} {'cost':<14} {'of':<34} {'train':>14} {'beam5':>14}  (median ratio [per-round range])")
        for r in costs:
            lines.append(f"{r['size']:<8} {r['part']:<14} {r['method']:<34} {r['train_ratio']:>5.2f}x "
                         f"[{r['train_ratio_range']:>6}] {r['beam5_ratio']:>5.2f}x [{r['beam5_ratio_range']:>6}]")
    capped = [case for case, r in rows.items() if r.get("capped_from")]
    if capped:
        lines.append("batch capped for 2 CPU cores (PAPER_CAPS; --nopaper_caps for all at --batch): " + ", ".join(capped))
    lens = sorted({round(r["mean_out_len"], 2) for r in rows.values() if "mean_out_len" in r})
    lines.append(f"decoded lengths (random weights): mean {lens} of max_len")
    return "\n".join(lines)


def record_rows(rows: dict[str, dict], write: bool = True) -> list[dict]:
    """One harness.record line per case (None values dropped), printed as JSON; with write=False
    nothing goes to benchmarks/results.jsonl or RESULTS.md."""
    from benchmarks import harness

    out = []
    for case, row in rows.items():
        metrics = {k: v for k, v in row.items() if v is not None}
        metrics.update(load1=os.getloadavg()[0], notes=NOTES)
        out.append(harness.record(BENCHMARK, case, metrics, smoke=not write))
    return out


# ----------------------------------------------------------------------------- entry point


def _define_flags():
    """Flags are defined only when run as a script, so importing this module (tests) defines none."""
    from absl import flags

    flags.DEFINE_list("sizes", list(SIZES), "Model sizes: 'default' (embedded config) and/or 'paper'.")
    flags.DEFINE_list("methods", list(METHOD_NAMES), "Methods of jdjax/tasks/prodgen.py (the cost rows need their "
                      "pairs).")
    flags.DEFINE_integer("batch", 32, "Batch size of every case (paper cases capped by PAPER_CAPS unless "
                         "--nopaper_caps).")
    flags.DEFINE_integer("repeats", 10, "Interleaved timing rounds at the default size (medians reported).")
    flags.DEFINE_integer("paper_repeats", 3, "Interleaved timing rounds at the paper size.")
    flags.DEFINE_bool("paper_caps", True, "Cap the paper-size batches (PAPER_CAPS) for 2 CPU cores.")
    flags.DEFINE_bool("record", True, "Append to benchmarks/results.jsonl and regenerate RESULTS.md.")
    flags.DEFINE_bool("smoke", False, "Tiny models (configs/prodgen.py:smoke), batch 4, two rounds, XLA backend "
                      "optimisation off; records nothing.")


def run(smoke: bool = False, sizes=SIZES, methods=METHOD_NAMES, batch: int = 32, repeats: int = 10,
        paper_repeats: int = 3, caps: bool = True, record: bool = True, compiler_options: dict | None = None,
        log=print) -> dict[str, dict]:
    """The body of main: measure, record (never for smoke), print the summary; returns the rows."""
    if smoke:
        sizes, batch, repeats = ("smoke",), 4, 2
        compiler_options = SMOKE_COMPILER_OPTIONS if compiler_options is None else compiler_options
    unknown = [s for s in sizes if s not in VOCAB] + [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown sizes / methods {unknown}: sizes {list(SIZES)}, methods {list(METHOD_NAMES)}.")
    log(f"product generators: sizes {list(sizes)}, methods {list(methods)}, batch {batch}, {repeats} / "
        f"{paper_repeats} rounds; load {os.getloadavg()[0]:.2f}", flush=True)
    rows = measure(sizes, methods, batch, repeats, paper_repeats, caps, compiler_options, log=log)
    record_rows(rows, write=record and not smoke)
    log(summary(rows), flush=True)
    return rows


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    try:
        run(smoke=f.smoke, sizes=tuple(f.sizes), methods=tuple(f.methods), batch=f.batch, repeats=f.repeats,
            paper_repeats=f.paper_repeats, caps=f.paper_caps, record=f.record)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
