"""Dialogue generators: training tokens/s, decoding sentences/s, and the cost of the contrastive (CL)
step over an MLE step, for `Seq2SeqLSTM` and `Seq2SeqTransformer` (issue 14; spec
`experiments_ads_text.md` P4), at the embedded default sizes and at the paper's.

    python -m benchmarks.dialog                               # both sizes, both models; records to benchmarks/RESULTS.md
    python -m benchmarks.dialog --sizes=default --repeats=5   # the embedded sizes only
    python -m benchmarks.dialog --nopaper_caps                # every paper case at --batch (slow on 2 cores)
    python -m benchmarks.dialog --norecord                    # print the rows, write nothing
    python -m benchmarks.dialog --smoke                       # tiny models (configs/dialog_cl.py:smoke), records nothing

Sizes (models built by `jdjax.tasks.dialog_cl.build_model` from `configs/dialog_cl.py`):
- default: the embedded config (LSTM embed = hidden 128, 2 layers; Transformer 2 layers, width 128, 4 heads,
  mlp 512), context 32, response 24 tokens, vocabulary 3000 (about chatterbot's);
- paper (`:paper`, `:paper,transformer`): LSTM embed 300, hidden 256, 2 layers; Transformer 6 layers, width
  512, 8 heads, mlp 2048; context 120, response 40, vocabulary 20000.
Both at --batch (64), except the paper cases in PAPER_CAPS (on 2 shared CPU cores a paper Transformer
training step at 64 takes ~25 s, beam 5 ~30 s, and the CL step is ~7 MLE steps): their batch is capped
and the row says `capped_from`; --nopaper_caps runs them at --batch.

Batches are random: token ids uniform over the non-special ids, lengths uniform in [L/2, L] (contexts
right-padded; responses = words + end, response_in = start + words). Weights: N(0, 0.02^2) NumPy noise
(LayerNorm scales 1 + noise; `random_params`, no init compile), float32; dropout on in training as in the task. Cases per (size, model):

- train: one jitted MLE step: `decoding.token_nll` (token-averaged), value_and_grad, the recipe's optimizer
  (`optim.make_optimizer(config.optimizer)`: Adam(W), clip 1.0) update. resp_tokens_per_s = non-pad response
  tokens (the labels, end included) / s; ctx_tokens_per_s = non-pad context tokens / s.
- greedy, beam5: jitted `decoding.generate` (beam_size 1 / 5, max_len = response length). With random weights
  no row emits the end token, so decoding runs the full max_len steps (mean_out_len says so).
- mle-grad, cond-mle-grad, cond-cl-grad: jitted value_and_grad w.r.t. {'model', 'reference'} of the CL
  task's loss (`tasks.dialog_cl.contrastive_task`, pretrain_steps 1) on a batch with k = cl.sample_k samples
  per example; cond-mle-grad / cond-cl-grad are the same executable (the loss switches with `lax.cond` on
  the step, an argument) at step 0 / 1; mle-grad is the MLE branch alone (no cond). vs_mle_grad = case /
  mle-grad: cond-cl-grad's is the CL step's cost over an MLE step, cond-mle-grad's tells whether the cond
  wastes compute (JAX's cond under grad makes the forward write the residuals of both branches).

Every function is compiled ahead of time (compile_s), run once (warmup_s), then the functions of a
(size, model) are timed in interleaved rounds (`harness.interleaved`; --repeats, --paper_repeats); medians,
ratios within those rounds. mem_temp_mb = XLA temporaries of the compiled function; xla_gflop = XLA
cost_analysis FLOPs of the train step. load1 = 1-minute load average (2 shared cores).
"""

from __future__ import annotations

import os
import time

BENCHMARK = "dialog"
MODELS = ("lstm", "transformer")
SIZES = ("default", "paper")
VOCAB = {"smoke": 64, "default": 3000, "paper": 20000}
CONFIG_ARGS = {"smoke": "smoke", "default": "", "paper": "paper"}
BEAM = 5
FIRST_WORD = 5  # ids 0..4 are pad, start (bos), end (eos), unk, eot (jdjax.data.text)
# Paper-size batches on 2 shared CPU cores (calibrated: Transformer train step ~2.5 s at batch 8).
PAPER_CAPS = {"lstm": {"cl": 16}, "transformer": {"train": 16, "greedy": 32, "beam": 8, "cl": 4}}
SMOKE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}  # --smoke compiles faster; timings mean nothing
NOTES = (
    "Seq2SeqLSTM / Seq2SeqTransformer (configs/dialog_cl.py: default = embedded sizes, context 32, response 24, "
    "vocab 3000; paper = :paper sizes, context 120, response 40, vocab 20000), float32, random "
    "token batches (lengths uniform in [L/2, L]), random weights N(0, 0.02^2). train: jitted MLE step (token_nll, grads, the recipe's Adam "
    "update); resp_tokens_per_s = non-pad response tokens/s, ctx_tokens_per_s = non-pad context tokens/s. greedy / "
    "beam5: jitted decoding.generate, max_len = response length; random weights never emit the end token, so every "
    "call decodes max_len steps (mean_out_len). mle-grad / cond-mle-grad / cond-cl-grad: jitted value_and_grad of "
    "the CL task's loss (k = 6 samples + frozen reference): the MLE branch alone, and the lax.cond loss at the MLE "
    "/ CL step (one executable); vs_mle_grad = case / mle-grad in the same rounds. Paper cases with capped_from "
    "run at a smaller batch than 64 (2 shared CPU cores). Compiled ahead of time (compile_s), one warm-up call "
    "(warmup_s), then interleaved rounds per (size, model); medians. mem_temp_mb = XLA temporaries; xla_gflop = "
    "XLA FLOPs of the train step. load1 = 1-minute load average (2 shared cores)."
)


# ----------------------------------------------------------------------------- configs and data


def size_config(size: str, model: str):
    """configs/dialog_cl.py for a size ('smoke', 'default', 'paper') and generator, cl.pretrain_steps = 1."""
    from configs import dialog_cl as dialog_config

    arg = ",".join(filter(None, [CONFIG_ARGS[size], "transformer" if model == "transformer" else ""]))
    c = dialog_config.get_config(arg)
    c.cl.pretrain_steps = 1  # step 0: the MLE branch, step 1: the group loss
    return c


def dims_string(config, vocab: int) -> str:
    """'V3000 Lc32 Lr24 E128 H128 x2' (LSTM) or 'V20000 Lc120 Lr40 C512 F2048 h8 x6' (Transformer)."""
    d, m = config.data, config.model
    sizes = f"E{m.embed_dim} H{m.hidden}" if m.name == "lstm" else f"C{m.width} F{m.mlp_dim} h{m.num_heads}"
    return f"V{vocab} Lc{d.max_context} Lr{d.max_response} {sizes} x{m.num_layers}"


def batches(size: str, model: str, batch: int, caps: bool = True) -> dict[str, int]:
    """{'train', 'greedy', 'beam', 'cl': batch size}: `batch`, capped by PAPER_CAPS at the paper size."""
    cap = PAPER_CAPS.get(model, {}) if caps and size == "paper" else {}
    return {part: min(batch, cap.get(part, batch)) for part in ("train", "greedy", "beam", "cl")}


def token_batch(rng, batch: int, max_context: int, max_response: int, vocab: int) -> dict:
    """context int32 [B, Lc], response_in / response_out [B, Lr] (NumPy): lengths uniform in [L/2, L]
    (response length counts the end token), ids uniform in [FIRST_WORD, vocab)."""
    import numpy as np

    from jdjax.nn.seq2seq import END, PAD, START

    pos_c, pos_r = np.arange(max_context)[None], np.arange(max_response)[None]
    lc = rng.integers(max(1, max_context // 2), max_context + 1, (batch, 1))
    lr = rng.integers(max(1, max_response // 2), max_response + 1, (batch, 1))
    context = np.where(pos_c < lc, rng.integers(FIRST_WORD, vocab, (batch, max_context)), PAD)
    words = rng.integers(FIRST_WORD, vocab, (batch, max_response))
    response_out = np.where(pos_r < lr - 1, words, np.where(pos_r == lr - 1, END, PAD))
    response_in = np.where(pos_r == 0, START, np.where(pos_r < lr, np.roll(words, 1, axis=1), PAD))
    return {k: v.astype(np.int32) for k, v in
            dict(context=context, response_in=response_in, response_out=response_out).items()}


def cl_batch(rng, batch: int, k: int, max_context: int, max_response: int, vocab: int) -> dict:
    """A contrastive batch as `tasks.dialog_cl.pick_samples` makes it: the gold TOKEN_KEYS plus
    sample_context [B, k, Lc], sample_response_in / _out [B, k, Lr], sample_m [B, k] uniform(0, 1)."""
    gold = token_batch(rng, batch, max_context, max_response, vocab)
    samples = token_batch(rng, batch * k, max_context, max_response, vocab)
    out = {**gold, **{f"sample_{key}": v.reshape((batch, k) + v.shape[1:]) for key, v in samples.items()}}
    out["sample_m"] = rng.uniform(0, 1, (batch, k)).astype("float32")
    return out


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


def build_task(config, vocab: int):
    """(model, contrastive Task) for `config`; the task's vocab and sources are placeholders (unused here)."""
    import numpy as np

    from jdjax.data.pipeline import ArraySource
    from jdjax.tasks import dialog_cl as task_lib

    model = task_lib.build_model(config.model, vocab)
    source = ArraySource({"context": np.zeros((1, config.data.max_context), np.int32)})
    task = task_lib.contrastive_task(config, model, {"train": source, "val": source}, vocab=None, reference_dir="")
    return model, task


def random_params(task, seed: int = 0, scale: float = 0.02) -> dict:
    """{'model', 'reference'} parameters of the CL task from NumPy noise (no `init` compile): N(0, scale^2),
    LayerNorm scales 1 + noise; the noise depends only on (seed, parameter path)."""
    import zlib

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdjax.train.optim import path_names

    shapes = jax.eval_shape(lambda key: nn.meta.unbox(task.init(key)), jax.random.key(0))

    def fill(name, s):
        v = scale * np.random.default_rng([seed, zlib.crc32(name.encode())]).standard_normal(s.shape, np.float32)
        return jnp.asarray(1.0 + v if name.endswith("scale") else v, s.dtype)

    return jax.tree.map(fill, path_names(shapes), shapes)


def train_step_fn(model, config, params, batch, compiler_options: dict | None = None):
    """(run() -> (params, opt_state, loss), compile s, XLA GFLOP, temp MiB): MLE step with the recipe's optimizer."""
    import jax
    import optax

    from benchmarks import harness
    from jdjax.nn import decoding
    from jdjax.train import optim

    tx, _ = optim.make_optimizer(config.optimizer, int(config.num_train_steps))
    opt_state = tx.init(params)
    rng = jax.random.key(1)

    def loss_fn(p, batch, rng):
        logits = model.apply({"params": p}, batch["context"], batch["response_in"], False, rngs={"dropout": rng})
        total, count = decoding.token_nll(logits, batch["response_out"])
        return total / jax.numpy.maximum(count, 1)

    def step(p, opt_state, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    args = (params, opt_state, batch, rng)
    compiled, compile_s = _compile(step, *args, compiler_options=compiler_options)
    return (lambda: jax.block_until_ready(compiled(*args))), compile_s, harness.xla_flops(compiled) / 1e9, \
        memory_mb(compiled)


def generate_fn(model, params, context, max_len: int, beam_size: int, compiler_options: dict | None = None):
    """(run() -> (tokens [B, max_len], scores), compile s): jitted `decoding.generate`."""
    import jax

    from jdjax.nn import decoding

    def gen(p, c):
        return decoding.generate(model, {"params": p}, c, max_len=max_len, beam_size=beam_size)

    compiled, compile_s = _compile(gen, params, context, compiler_options=compiler_options)
    return (lambda: jax.block_until_ready(compiled(params, context))), compile_s


def cl_grad_fns(model, task, params, batch, compiler_options: dict | None = None) -> dict:
    """{'mle-grad', 'cond-mle-grad', 'cond-cl-grad': (run, compile s, temp MiB)}: value_and_grad w.r.t.
    {'model', 'reference'} of the MLE loss alone and of `task.loss` (lax.cond) at step 0 / 1 (one executable)."""
    import jax
    import jax.numpy as jnp

    from jdjax.tasks import dialog_cl as task_lib

    rng = jax.random.key(2)

    def mle(p, batch, rng):  # the task's mle_loss: token-averaged NLL of the gold pairs, dropout on
        _, (nll_sum, count) = task_lib._pair_log_probs(model, p["model"], batch["context"], batch["response_in"],
                                                       batch["response_out"], False, rng)
        return nll_sum / jnp.maximum(count, 1)

    def cond(p, model_state, batch, rng):
        total, metrics, _ = task.loss(p, model_state, batch, rng)
        return total, metrics

    plain, plain_s = _compile(jax.value_and_grad(mle), params, batch, rng, compiler_options=compiler_options)
    states = [{"cl": {"step": jnp.asarray(s, jnp.int32)}} for s in (0, 1)]
    switched, switched_s = _compile(jax.value_and_grad(cond, has_aux=True), params, states[0], batch, rng,
                                    compiler_options=compiler_options)
    return {
        "mle-grad": (lambda: jax.block_until_ready(plain(params, batch, rng)), plain_s, memory_mb(plain)),
        "cond-mle-grad": (lambda: jax.block_until_ready(switched(params, states[0], batch, rng)), switched_s,
                          memory_mb(switched)),
        "cond-cl-grad": (lambda: jax.block_until_ready(switched(params, states[1], batch, rng)), 0.0,
                         memory_mb(switched)),
    }


# ----------------------------------------------------------------------------- measurement


def measure_group(size: str, model_name: str, batch: int, repeats: int, caps: bool = True,
                  compiler_options: dict | None = None, seed: int = 0, log=print) -> dict[str, dict]:
    """Builds, compiles and times the six functions of one (size, model); returns {case: row}."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import harness

    config = size_config(size, model_name)
    vocab, d = VOCAB[size], config.data
    lc, lr, k = d.max_context, d.max_response, int(config.cl.sample_k)
    sizes = batches(size, model_name, batch, caps)
    model, task = build_task(config, vocab)
    params = random_params(task, seed)  # {'model', 'reference'}
    log(f"{size} {model_name} ({dims_string(config, vocab)}): batches {sizes}", flush=True)
    rng = np.random.default_rng(seed)
    train_np = token_batch(rng, sizes["train"], lc, lr, vocab)
    cl_np = cl_batch(rng, sizes["cl"], k, lc, lr, vocab)
    contexts = {part: jnp.asarray(token_batch(rng, sizes[part], lc, lr, vocab)["context"]) for part in ("greedy", "beam")}

    fns, info = {}, {}
    fns["train"], compile_s, gflop, mem = train_step_fn(model, config, params["model"],
                                                        jax.tree.map(jnp.asarray, train_np), compiler_options)
    info["train"] = dict(compile_s=compile_s, xla_gflop=gflop, mem_temp_mb=mem)
    for part, beam in (("greedy", 1), ("beam", BEAM)):
        fns[part], compile_s = generate_fn(model, params["model"], contexts[part], lr, beam, compiler_options)
        info[part] = dict(compile_s=compile_s)
    for part, (fn, compile_s, mem) in cl_grad_fns(model, task, params, jax.tree.map(jnp.asarray, cl_np),
                                                  compiler_options).items():
        fns[part], info[part] = fn, dict(compile_s=compile_s, mem_temp_mb=mem)
    log("  compiled: " + ", ".join(f"{p} {i['compile_s']:.1f} s" for p, i in info.items()), flush=True)

    outputs = {}
    for part, fn in fns.items():  # warm-up: the first execution of every compiled function
        t0 = time.perf_counter()
        outputs[part] = fn()
        info[part]["warmup_s"] = time.perf_counter() - t0
    timing = harness.interleaved(fns, repeats)

    def n_tokens(b):
        return int(np.sum(b["response_out"] != 0)), int(np.sum(b["context"] != 0))

    def base(part, batch_size):
        t = timing[part]
        row = {"size": size, "model": model_name, "part": "beam5" if part == "beam" else part, "batch": batch_size,
               "capped_from": batch if batch_size < batch else None, "dims": dims_string(config, vocab),
               "ms": 1e3 * t["median_s"], "p10_p90_ms": f"{1e3 * t['p10_s']:.4g}-{1e3 * t['p90_s']:.4g}",
               "repeats": t["repeats"]}
        return row

    rows = {}
    resp, ctx = n_tokens(train_np)
    t = timing["train"]["median_s"]
    rows["train"] = {**base("train", sizes["train"]), "examples_per_s": sizes["train"] / t,
                     "resp_tokens_per_s": resp / t, "ctx_tokens_per_s": ctx / t,
                     "resp_fill": resp / train_np["response_out"].size, "ctx_fill": ctx / train_np["context"].size,
                     "params": sum(int(x.size) for x in jax.tree.leaves(params["model"])), **info["train"]}
    for part, beam in (("greedy", 1), ("beam", BEAM)):
        tokens = np.asarray(outputs[part][0])
        t = timing[part]["median_s"]
        rows[part] = {**base(part, sizes[part]), "sentences_per_s": sizes[part] / t, "beam_size": beam,
                      "max_len": lr, "mean_out_len": float(np.mean(np.sum(tokens != 0, axis=1))), **info[part]}
    resp, ctx = n_tokens(cl_np)
    for part in ("mle-grad", "cond-mle-grad", "cond-cl-grad"):
        t = timing[part]["median_s"]
        rows[part] = {**base(part, sizes["cl"]), "examples_per_s": sizes["cl"] / t, "resp_tokens_per_s": resp / t,
                      "ctx_tokens_per_s": ctx / t, "k": k, "vs_mle_grad": t / timing["mle-grad"]["median_s"],
                      **info[part]}
    return {f"{size} {model_name} {r['part']} b{r['batch']}": r for r in rows.values()}


def measure(sizes=SIZES, models=MODELS, batch: int = 64, repeats: int = 10, paper_repeats: int = 3,
            caps: bool = True, compiler_options: dict | None = None, log=print) -> dict[str, dict]:
    """measure_group for every (size, model), in order; {case: row} (no recording)."""
    rows = {}
    for size in sizes:
        for model in models:
            rows.update(measure_group(size, model, batch, paper_repeats if size == "paper" else repeats, caps,
                                      compiler_options, log=log))
    return rows


def summary(rows: dict[str, dict]) -> str:
    """Per (size, model): train tokens/s, decoding sentences/s, CL step / MLE step."""
    groups = {}
    for r in rows.values():
        groups.setdefault((r["size"], r["model"]), {})[r["part"]] = r
    head = (f"{'size':<8} {'model':<12} {'train resp tok/s':>16} {'ctx tok/s':>10} {'greedy sent/s':>13} "
            f"{'beam5 sent/s':>12} {'CL/MLE grad':>11} {'cond-MLE/MLE':>12}")
    lines = [head]
    for (size, model), g in groups.items():
        lines.append(f"{size:<8} {model:<12} {g['train']['resp_tokens_per_s']:>16.0f} "
                     f"{g['train']['ctx_tokens_per_s']:>10.0f} {g['greedy']['sentences_per_s']:>13.1f} "
                     f"{g['beam5']['sentences_per_s']:>12.1f} {g['cond-cl-grad']['vs_mle_grad']:>10.2f}x "
                     f"{g['cond-mle-grad']['vs_mle_grad']:>11.2f}x")
    capped = [case for case, r in rows.items() if r.get("capped_from")]
    if capped:
        lines.append("batch capped for 2 CPU cores (PAPER_CAPS; --nopaper_caps for all at --batch): " + ", ".join(capped))
    lens = {r["mean_out_len"] for r in rows.values() if "mean_out_len" in r}
    lines.append(f"decoded lengths (random weights): mean {sorted(lens)} of max_len; no end token is emitted, so every "
                 "call decodes max_len steps")
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
    flags.DEFINE_list("models", list(MODELS), "Generators: 'lstm' and/or 'transformer'.")
    flags.DEFINE_integer("batch", 64, "Batch size of every case (paper cases capped by PAPER_CAPS unless "
                         "--nopaper_caps).")
    flags.DEFINE_integer("repeats", 10, "Interleaved timing rounds at the default sizes (medians reported).")
    flags.DEFINE_integer("paper_repeats", 3, "Interleaved timing rounds at the paper sizes (a round of the "
                         "Transformer takes ~40 s on 2 cores).")
    flags.DEFINE_bool("paper_caps", True, "Cap the paper-size batches (PAPER_CAPS) for 2 CPU cores.")
    flags.DEFINE_bool("record", True, "Append to benchmarks/results.jsonl and regenerate RESULTS.md.")
    flags.DEFINE_bool("smoke", False, "Tiny models (configs/dialog_cl.py:smoke), batch 4, two rounds, XLA backend "
                      "optimisation off; records nothing.")


def run(smoke: bool = False, sizes=SIZES, models=MODELS, batch: int = 64, repeats: int = 10, paper_repeats: int = 3,
        caps: bool = True, record: bool = True, compiler_options: dict | None = None, log=print) -> dict[str, dict]:
    """The body of main: measure, record (never for smoke), print the summary; returns the rows."""
    if smoke:
        sizes, batch, repeats = ("smoke",), 4, 2
        compiler_options = SMOKE_COMPILER_OPTIONS if compiler_options is None else compiler_options
    unknown = [s for s in sizes if s not in VOCAB] + [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown sizes / models {unknown}: sizes {list(SIZES)}, models {list(MODELS)}.")
    log(f"dialog generators: sizes {list(sizes)}, models {list(models)}, batch {batch}, {repeats} / {paper_repeats} "
        f"rounds; load {os.getloadavg()[0]:.2f}", flush=True)
    rows = measure(sizes, models, batch, repeats, paper_repeats, caps, compiler_options, log=log)
    record_rows(rows, write=record and not smoke)
    log(summary(rows), flush=True)
    return rows


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    try:
        run(smoke=f.smoke, sizes=tuple(f.sizes), models=tuple(f.models), batch=f.batch, repeats=f.repeats,
            paper_repeats=f.paper_repeats, caps=f.paper_caps, record=f.record)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
