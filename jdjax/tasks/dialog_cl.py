"""Group-wise contrastive learning for dialogue generation (Cai et al., Findings of EMNLP 2020; spec
`experiments_ads_text.md` P4): an MLE baseline, a response matcher and the contrastive model, then a
table of MLE vs CL on the test split.

    python -m jdjax.main --config=configs/dialog_cl.py

The workdir holds, in order:
    vocab.json               the word vocabulary of the training split (SentencePiece: vocab.model);
                             reused on resume, so token ids never change
    retrieval/               BM25 lists per split (jdjax.data.dialogue.retrieval_cache): for each example
                             the training examples of the most and the least similar contexts
    reference/               the MLE baseline, selected on val perplexity: the table's "MLE" row and
                             the frozen reference p_n of the contrastive model
    matcher/                 the response matcher [R] (BCE, one in-batch negative per positive), selected
                             on val accuracy
    matching_scores.npz      matcher probabilities m of every retrieved pair, both sides, per split
    contrastive/             the same architecture (from scratch, or from the reference with
                             `cl.init_from_reference`): `cl.pretrain_steps` updates of MLE, then `cl.num_cl_steps` of
                             L = (1 - w) NLL + w / (k + 1) [sum_j l_CL(sample_j) + l_CL(gold, 1)]
                             (jdjax.models.dialog_cl) with the reference frozen in the parameter tree
                             ('reference/', never updated); selected on val CL loss + 0.5 NLL
    comparison.{md,json}     BLEU, Dist-1/2, intra-Dist-2, Ent-2, response length and perplexity on test,
                             with sample responses of both models

Each retrieved pair (c'_j, r'_j) of an example (c, r) gives two samples: the context side (c'_j, r)
and the response side (c, r'_j); a training step draws `cl.sample_k` of the 2R uniformly per
example (index uniform, side by a fair coin, as `contrast_by=both`; the released code draws one
index and one side per sample for the whole batch [R]). Validation scores the gold pair and all 2R.
Generation metrics use greedy decoding (beam 1, the paper's setting; `decode.beam_size` for beams);
BLEU and Dist are computed on the vocabulary's tokens (unknown words as __unk__, in hypotheses and
references alike).
"""

from __future__ import annotations

import dataclasses
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.metrics import roc_auc_score

from jdjax.data import dialogue, text
from jdjax.io import as_path, write_bytes
from jdjax.metrics import text as text_metrics
from jdjax.models import dialog_cl as cl
from jdjax.nn import decoding
from jdjax.nn.seq2seq import Seq2SeqLSTM, Seq2SeqTransformer
from jdjax.train import sweep
from jdjax.train.logging import is_main_process
from jdjax.train.task import Task

DATASETS = ("chatterbot", "dir")
DIR_FORMATS = ("fbdialog", "parlai", "tsv")
MODELS = ("lstm", "transformer")
TOKEN_KEYS = ("context", "response_in", "response_out")
RUNS = ("reference", "matcher", "contrastive")


# ----------------------------------------------------------------------------- data


def load_dialogues(data_cfg) -> dict[str, list[dialogue.DialogueExample]]:
    """{'train', 'val', 'test'}: the chatterbot conversations, or `data_dir` in `data.format`."""
    if data_cfg.name == "chatterbot":
        return dialogue.chatterbot_dialogues(seed=data_cfg.seed)
    return dialogue.read_dialogue_dir(data_cfg.data_dir, data_cfg.format)


def load_vocab(data_cfg, train: list[dialogue.DialogueExample], workdir: str):
    """The training split's vocabulary (jdjax.data.text.workdir_vocab), stable across resume."""
    return text.workdir_vocab(data_cfg, dialogue.dialogue_texts(train), workdir)


def encode_split(vocab, examples, data_cfg) -> dict[str, np.ndarray]:
    """context int32 [N, Lc] (latest turns kept), response_in / response_out int32 [N, Lr]."""
    return text.encode_pairs(vocab, [e.context for e in examples], [e.response for e in examples],
                             data_cfg.max_context, data_cfg.max_response)


@dataclasses.dataclass
class GroupSource:
    """A split's examples with their retrieved groups, gathered on request (jdjax.data.pipeline source).

    For an example with retrieved training examples j_1..j_R, `get_batch` adds the 2R sample pairs:
    group_context [B, 2R, Lc], group_response_in / group_response_out [B, 2R, Lr] (pairs 0..R-1 the
    context side (c'_j, r), pairs R..2R-1 the response side (c, r'_j)) and group_m [B, 2R], the
    matcher's probability of each pair (0.5 = no opinion before the matcher exists).

    Attributes:
      tokens: this split's arrays (TOKEN_KEYS) [N, ...].
      pool: the training split's arrays, which `retrieved` indexes.
      retrieved: int32 [N, R] training example indices.
      m: float32 [N, 2R] matcher probabilities, or None.
    """

    tokens: dict[str, np.ndarray]
    pool: dict[str, np.ndarray]
    retrieved: np.ndarray
    m: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.retrieved)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        gold = {k: v[indices] for k, v in self.tokens.items()}
        idx = self.retrieved[indices]  # [B, R]
        r = idx.shape[1]

        def group(key: str, swapped_on_context_side: bool) -> np.ndarray:
            own = np.repeat(gold[key][:, None], r, axis=1)  # [B, R, L]
            other = self.pool[key][idx]  # [B, R, L]
            return np.concatenate([other, own] if swapped_on_context_side else [own, other], axis=1)

        m = self.m[indices] if self.m is not None else np.full((len(indices), 2 * r), 0.5, np.float32)
        return {**gold, "group_context": group("context", True), "group_response_in": group("response_in", False),
                "group_response_out": group("response_out", False), "group_m": m}


def pick_samples(k: int):
    """augment(batch, draws) keeping `k` of each example's 2R group pairs, uniform with replacement
    (draws [B, >= k] uniform(0, 1)): sample_context [B, k, Lc], sample_response_in / _out [B, k, Lr],
    sample_m [B, k]; the group arrays are dropped."""

    def augment(batch: dict, draws: np.ndarray) -> dict:
        out = {k_: v for k_, v in batch.items() if not k_.startswith("group_")}
        n = batch["group_m"].shape[1]
        j = np.minimum((draws[:, :k] * n).astype(np.int64), n - 1)  # [B, k]
        for key in ("context", "response_in", "response_out"):
            out[f"sample_{key}"] = np.take_along_axis(batch[f"group_{key}"], j[:, :, None], axis=1)
        out["sample_m"] = np.take_along_axis(batch["group_m"], j, axis=1)
        return out

    return augment


# ----------------------------------------------------------------------------- models


def build_model(model_cfg, vocab_size: int):
    m = model_cfg
    dtype = jnp.dtype(m.dtype)
    if m.name == "lstm":
        return Seq2SeqLSTM(vocab_size=vocab_size, embed_dim=m.embed_dim, hidden=m.hidden, num_layers=m.num_layers,
                           dropout=m.dropout, dtype=dtype)
    return Seq2SeqTransformer(vocab_size=vocab_size, num_layers=m.num_layers, width=m.width, num_heads=m.num_heads,
                              mlp_dim=m.mlp_dim, max_positions=m.max_positions, dropout=m.dropout,
                              attention_dropout=m.attention_dropout, relu_dropout=m.relu_dropout, dtype=dtype)


def build_matcher(config, vocab_size: int) -> cl.ResponseMatcher:
    m = config.matcher
    return cl.ResponseMatcher(vocab_size=vocab_size, embed_dim=m.embed_dim, hidden=m.hidden, mlp_dim=m.hidden,
                              dtype=jnp.dtype(config.model.dtype))


def _probe(data_cfg):
    return (jnp.zeros((1, data_cfg.max_context), jnp.int32).at[:, 0].set(text.UNK_ID),
            jnp.zeros((1, data_cfg.max_response), jnp.int32).at[:, 0].set(text.BOS_ID))


# ----------------------------------------------------------------------------- generation tasks


def _pair_log_probs(model, params, context, response_in, response_out, deterministic: bool, rng=None):
    """Teacher-forced sum of log p over the label tokens (end included): [N], and (nll sum, count)."""
    rngs = None if deterministic else {"dropout": rng}
    logits = model.apply({"params": params}, context, response_in, deterministic, rngs=rngs)  # [N, Lr, V]
    return decoding.sequence_log_probs(logits, response_out), decoding.token_nll(logits, response_out)


def _flat(x):  # [B, k, L] -> [B k, L]
    return x.reshape((-1,) + x.shape[2:])


def generation_summary(vocab, val_nll_weight: float = 0.0):
    """summarize for a generator's predictions: perplexity, BLEU, Dist, Ent, and with the CL model's
    per-example val loss 'cl' also cl_loss and to_minimize = cl_loss + val_nll_weight * NLL."""

    def summarize(out: dict[str, np.ndarray]) -> dict[str, float]:
        hyps = [vocab.decode(t).split() for t in out["hypothesis"]]
        refs = [vocab.decode(t).split() for t in out["response_out"]]
        scores = text_metrics.text_metrics(hyps, refs)
        metrics = {k: scores[k] for k in ("bleu", "dist_1", "dist_2", "intra_dist_2", "ent_2", "response_length")}
        nll = float(np.sum(out["nll_sum"]) / max(float(np.sum(out["nll_count"])), 1.0))
        metrics.update(nll=nll, ppl=text_metrics.perplexity(float(np.sum(out["nll_sum"])), float(np.sum(out["nll_count"]))))
        if "cl" in out:
            metrics["cl_loss"] = float(np.mean(out["cl"]))
            metrics["to_minimize"] = metrics["cl_loss"] + val_nll_weight * nll
        return metrics

    return summarize


def _decode_kwargs(config) -> dict:
    d = config.decode
    return dict(max_len=config.data.max_response, beam_size=d.beam_size, length_penalty_alpha=d.length_penalty,
                block_ngram=d.block_ngram)


def mle_task(config, model, sources: dict, vocab) -> Task:
    """The MLE baseline: token-averaged NLL (ParlAI), selected on val perplexity."""
    probe = _probe(config.data)

    def init(rng):
        return model.init({"params": rng}, *probe)["params"]

    def loss(params, batch, rng):
        _, (nll_sum, count) = _pair_log_probs(model, params, batch["context"], batch["response_in"],
                                              batch["response_out"], False, rng)
        nll = nll_sum / jnp.maximum(count, 1)
        return nll, {"nll": nll}

    def predict(params, batch):
        return generation_predict(config, model, params, batch)

    return Task(init=init, loss=loss, predict=predict, summarize=generation_summary(vocab),
                train_source=sources["train"], eval_sources={k: v for k, v in sources.items() if k != "train"})


def generation_predict(config, model, params, batch) -> dict:
    """Per example: nll_sum / nll_count of the gold response, the decoded hypothesis [B, Lr]."""
    logits = model.apply({"params": params}, batch["context"], batch["response_in"], True)  # [B, Lr, V]
    mask = batch["response_out"] != text.PAD_ID
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, batch["response_out"][..., None], axis=-1)[..., 0]
    tokens, _ = decoding.generate(model, {"params": params}, batch["context"], **_decode_kwargs(config))
    return {"nll_sum": -jnp.sum(jnp.where(mask, token_logp, 0.0), axis=-1), "nll_count": jnp.sum(mask, axis=-1),
            "hypothesis": tokens, "response_out": batch["response_out"]}


def contrastive_task(config, model, sources: dict, vocab, reference_dir: str) -> Task:
    """The CL model: params {'model', 'reference'}; only 'model' trains (the reference is loaded from
    `reference_dir`'s val-selected checkpoint and stays frozen). 'model' starts from scratch as in the
    paper, or [R] from the reference's weights with `cl.init_from_reference` (the compute-saving
    reading: the paper's MLE phase re-trains what the reference already is). Model state
    {'cl': {'step'}} counts updates: MLE before `cl.pretrain_steps`, from there the group loss with
    w = cl_weight(n), n = step - pretrain_steps."""
    c = config.cl
    probe = _probe(config.data)
    weight_kw = dict(mode=c.normalization, threshold=c.threshold, pos_threshold=c.pos_threshold,
                     neg_threshold=c.neg_threshold)

    def init(rng):
        k1, k2 = jax.random.split(rng)
        return {"model": model.init({"params": k1}, *probe)["params"],
                "reference": model.init({"params": k2}, *probe)["params"]}

    def init_model_state(rng):
        del rng
        return {"cl": {"step": jnp.zeros((), jnp.int32)}}

    def load_pretrained(variables):
        from jdjax.train.checkpoint import read_state

        reference = read_state(reference_dir, kind="best")["params"]
        start = reference if c.init_from_reference else variables["params"]["model"]
        return {**variables, "params": {"model": start, "reference": reference}}

    def mle_loss(params, batch, rng):
        _, (nll_sum, count) = _pair_log_probs(model, params["model"], batch["context"], batch["response_in"],
                                              batch["response_out"], False, rng)
        nll = nll_sum / jnp.maximum(count, 1)
        zero = jnp.zeros((), jnp.float32)
        return nll, {"nll": nll, "w": zero, "cl_loss": zero, "h_gold": zero, "frac_pos": zero, "frac_neg": zero}

    def group_loss(params, batch, rng, n):
        b, k = batch["sample_m"].shape
        pairs = {key: jnp.concatenate([batch[key], _flat(batch[f"sample_{key}"])]) for key in TOKEN_KEYS}
        l_m, _ = _pair_log_probs(model, params["model"], *(pairs[key] for key in TOKEN_KEYS), False, rng)  # [B (k+1)]
        l_n, _ = _pair_log_probs(model, jax.lax.stop_gradient(params["reference"]),
                                 *(pairs[key] for key in TOKEN_KEYS), True)
        # The gold pairs are the first B rows; their token-averaged NLL is the MLE term.
        nll = -jnp.sum(l_m[:b]) / jnp.maximum(jnp.sum(batch["response_out"] != text.PAD_ID), 1)
        s = cl.matching_weight(batch["sample_m"], **weight_kw)  # [B, k]
        w = cl.cl_weight(n, c.speed)
        total, aux = cl.group_cl_loss(nll, l_m[:b], l_n[:b], l_m[b:].reshape(b, k), l_n[b:].reshape(b, k), s, w)
        return total, {key: aux[key] for key in ("nll", "w", "cl_loss", "h_gold", "frac_pos", "frac_neg")}

    def loss(params, model_state, batch, rng):
        step = model_state["cl"]["step"]
        n = step - c.pretrain_steps
        total, metrics = jax.lax.cond(n >= 0, lambda: group_loss(params, batch, rng, n),
                                      lambda: mle_loss(params, batch, rng))
        return total, metrics, {"cl": {"step": step + 1}}

    def predict(params, model_state, batch):
        del model_state
        out = generation_predict(config, model, params["model"], batch)
        b, g = batch["group_m"].shape
        pairs = [jnp.concatenate([batch[key], _flat(batch[f"group_{key}"])]) for key in TOKEN_KEYS]
        l_m, _ = _pair_log_probs(model, params["model"], *pairs, True)  # [B (2R + 1)]
        l_n, _ = _pair_log_probs(model, params["reference"], *pairs, True)
        s = jnp.concatenate([jnp.ones((b, 1)), cl.matching_weight(batch["group_m"], **weight_kw)], axis=1)
        per_pair = cl.cl_pair_loss(jnp.concatenate([l_m[:b, None], l_m[b:].reshape(b, g)], axis=1),
                                   jnp.concatenate([l_n[:b, None], l_n[b:].reshape(b, g)], axis=1), s)
        return {**out, "cl": jnp.mean(per_pair, axis=1)}

    return Task(init=init, loss=loss, predict=predict, summarize=generation_summary(vocab, c.val_nll_weight),
                train_source=sources["train"], eval_sources={k: v for k, v in sources.items() if k != "train"},
                init_model_state=init_model_state, augment=pick_samples(c.sample_k), trainable=r"^model/",
                load_pretrained=load_pretrained)


# ----------------------------------------------------------------------------- matcher


def matcher_task(config, matcher: cl.ResponseMatcher, sources: dict) -> Task:
    """BCE on each gold pair (label 1) and one negative (label 0): the context with the next
    example's response in the (shuffled) batch. Selected on val accuracy (AUC reported too)."""
    probe_c, probe_r = _probe(config.data)

    def init(rng):
        return matcher.init({"params": rng}, probe_c, probe_r)["params"]

    def logits(params, batch, deterministic=True, rng=None):
        negative = jnp.roll(batch["response_out"], 1, axis=0)  # [B, Lr]
        context = jnp.concatenate([batch["context"], batch["context"]])
        response = jnp.concatenate([batch["response_out"], negative])
        rngs = None if deterministic else {"dropout": rng}
        out = matcher.apply({"params": params}, context, response, deterministic, rngs=rngs)  # [2B]
        return jnp.split(out, 2)

    def loss(params, batch, rng):
        pos, neg = logits(params, batch, False, rng)
        labels = jnp.concatenate([jnp.ones_like(pos), jnp.zeros_like(neg)])
        bce = cl.matcher_loss(jnp.concatenate([pos, neg]), labels)
        return bce, {"accuracy": 0.5 * (jnp.mean(pos > 0) + jnp.mean(neg < 0))}

    def predict(params, batch):
        pos, neg = logits(params, batch)
        return {"positive": pos, "negative": neg}

    def summarize(out):
        pos, neg = out["positive"], out["negative"]
        auc = roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])
        return {"accuracy": float(0.5 * (np.mean(pos > 0) + np.mean(neg < 0))), "auc": float(auc)}

    return Task(init=init, loss=loss, predict=predict, summarize=summarize, train_source=sources["train"],
                eval_sources={k: v for k, v in sources.items() if k != "train"})


def matching_scores(config, matcher, params, groups: dict[str, GroupSource], path: str) -> dict[str, np.ndarray]:
    """m [N, 2R] per split: sigmoid of the matcher's logit for every group pair, cached in `path` (.npz)."""
    if as_path(path).exists():
        with np.load(io.BytesIO(as_path(path).read_bytes())) as f:
            return {k: f[k] for k in f.files}
    apply = jax.jit(lambda p, c, r: jax.nn.sigmoid(matcher.apply({"params": p}, c, r)))
    out = {}
    for split, source in groups.items():
        rows = []
        for start in range(0, len(source), config.eval_batch_size):
            batch = source.get_batch(np.arange(start, min(start + config.eval_batch_size, len(source))))
            b, g = batch["group_m"].shape
            m = apply(params, _flat(batch["group_context"]), _flat(batch["group_response_out"]))
            rows.append(np.asarray(m).reshape(b, g))
        out[split] = np.concatenate(rows).astype(np.float32)
    if is_main_process():
        buffer = io.BytesIO()
        np.savez(buffer, **out)
        write_bytes(path, buffer.getvalue())  # atomic
    return out


# ----------------------------------------------------------------------------- the recipe


def run_config(config, name: str):
    """The config the loop gets for run `name` (RUNS): the matcher has its own steps, batch and
    learning rate; each run selects on its own val metric."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.init_from = ""
        if name == "reference":
            c.checkpoint.update(best_metric="val/ppl", best_mode="min")
        elif name == "contrastive":
            c.num_train_steps = config.cl.pretrain_steps + config.cl.num_cl_steps
            c.batch_size = config.cl.batch_size
            c.eval_every_steps = config.cl.eval_every_steps
            c.checkpoint.update(best_metric="val/to_minimize", best_mode="min")
        else:
            m = config.matcher
            c.batch_size, c.num_train_steps, c.eval_every_steps = m.batch_size, m.num_train_steps, m.eval_every_steps
            c.optimizer.update(learning_rate=m.learning_rate, warmup_steps=min(c.optimizer.warmup_steps,
                                                                               m.num_train_steps // 10))
            c.checkpoint.update(best_metric="val/accuracy", best_mode="max")
        c.checkpoint.every_steps = c.eval_every_steps
    return c


def loop_configs(config) -> list:
    return [run_config(config, name) for name in RUNS]


def sample_responses(config, model, vocab, params: dict[str, dict], tokens: dict[str, np.ndarray], examples,
                     count: int) -> list[dict]:
    """The first `count` examples of a split with distinct contexts, with each model's decoded response:
    [{'context', 'gold', name: text}]."""
    first = {}
    for i, e in enumerate(examples):
        first.setdefault(e.context, i)
    chosen = sorted(first.values())[:count]
    context = jnp.asarray(tokens["context"][chosen])
    rows = [{"context": examples[i].context, "gold": examples[i].response} for i in chosen]
    for name, p in params.items():
        out, _ = jax.jit(lambda p, c: decoding.generate(model, {"params": p}, c, **_decode_kwargs(config)))(p, context)
        for row, t in zip(rows, np.asarray(out)):
            row[name] = vocab.decode(t)
    return rows


COLUMNS = (("BLEU", "bleu", ".2f"), ("Dist-1", "dist_1", ".3f"), ("Dist-2", "dist_2", ".3f"),
           ("intra-Dist-2", "intra_dist_2", ".3f"), ("Ent-2", "ent_2", ".2f"), ("length", "response_length", ".1f"),
           ("ppl", "ppl", ".1f"))


def format_table(config, rows: list[dict], samples: list[dict]) -> str:
    lines = ["| model | " + " | ".join(h for h, _, _ in COLUMNS) + " | selected step |",
             "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = " | ".join("-" if r.get(f"test/{k}") is None else format(r[f"test/{k}"], f) for _, k, f in COLUMNS)
        lines.append(f"| {r['run']} | {cells} | {r['selected_step']} |")
    text_ = "\n".join(lines) + (
        f"\n\n{config.model.name.upper()} generators on the test split, greedy decoding (beam {config.decode.beam_size}); "
        "MLE selected on val perplexity, CL on val CL loss + "
        f"{config.cl.val_nll_weight} NLL. BLEU-4 (sacrebleu, vocabulary tokens), Dist-n = distinct / all n-grams of "
        "the corpus, intra-Dist-2 its per-response mean, Ent-2 the entropy (nats) of the generated bigrams, ppl the "
        "gold responses' perplexity.\n")
    for s in samples:
        text_ += f"\n- context: {s['context']!r}\n  - gold: {s['gold']!r}\n" + "".join(
            f"  - {name}: {s[name]!r}\n" for name in ("MLE", "CL"))
    return text_


def run(config, workdir: str) -> dict:
    """Vocabulary and retrieval, then the reference and the matcher, then the contrastive model; the table."""
    from jdjax.train.checkpoint import read_state
    from jdjax.train.loop import train_and_evaluate

    os.makedirs(workdir, exist_ok=True)
    d = config.data
    examples = load_dialogues(d)
    vocab = load_vocab(d, examples["train"], workdir)
    tokens = {split: encode_split(vocab, ex, d) for split, ex in examples.items()}
    retrieved = dialogue.retrieval_cache(examples, workdir, k_top=d.k_top, k_bottom=d.k_bottom, seed=d.seed)
    retrieved = {split: np.concatenate([r["top"], r["bottom"]], axis=1) for split, r in retrieved.items()}
    model, matcher = build_model(config.model, vocab.size), build_matcher(config, vocab.size)
    plain = {split: _array_source(t) for split, t in tokens.items()}

    first = sweep.run_sweep(workdir, [
        sweep.Job("reference", lambda wd: train_and_evaluate(run_config(config, "reference"), wd,
                                                             mle_task(config, model, plain, vocab))),
        sweep.Job("matcher", lambda wd: train_and_evaluate(run_config(config, "matcher"), wd,
                                                           matcher_task(config, matcher, plain))),
    ], desc="dialog_cl")
    if first.status != sweep.COMPLETED:
        return {"status": first.status, "failed": first.failed}
    groups = {split: GroupSource(t, tokens["train"], retrieved[split]) for split, t in tokens.items()}
    m = matching_scores(config, matcher, read_state(os.path.join(workdir, "matcher"), kind="best")["params"], groups,
                        os.path.join(workdir, "matching_scores.npz"))
    groups = {split: dataclasses.replace(g, m=m[split]) for split, g in groups.items()}
    reference_dir = os.path.join(workdir, "reference")
    second = sweep.run_sweep(workdir, [sweep.Job("contrastive", lambda wd: train_and_evaluate(
        run_config(config, "contrastive"), wd, contrastive_task(config, model, groups, vocab, reference_dir)))],
        desc="dialog_cl")
    if second.status != sweep.COMPLETED:
        return {"status": second.status, "failed": second.failed}

    results = {"MLE": first.results["reference"], "CL": second.results["contrastive"]}
    rows = [{"run": name, "selected_step": r.get("selected_step"),
             **{f"{split}/{k}": r.get(f"{split}/{k}") for split in ("val", "test") for _, k, _ in COLUMNS}}
            for name, r in results.items()]
    params = {"MLE": read_state(reference_dir, kind="best")["params"],
              "CL": read_state(os.path.join(workdir, "contrastive"), kind="best")["params"]["model"]}
    samples = sample_responses(config, model, vocab, params, tokens["test"], examples["test"], config.num_samples)
    rows.append({"run": "samples", "samples": samples})
    sweep.write_comparison(workdir, rows, format_table(config, rows[:-1], samples))
    return {"status": "completed", "runs": rows,
            "matcher": {k: v for k, v in first.results["matcher"].items() if k.startswith(("val/", "test/"))}}


def _array_source(t: dict[str, np.ndarray]):
    from jdjax.data.pipeline import ArraySource

    return ArraySource(dict(t))


# ----------------------------------------------------------------------------- validation


def validate(config) -> list[str]:
    d, m, c = config.data, config.model, config.cl
    errors = []
    if d.name not in DATASETS:
        errors.append(f"data.name={d.name!r} must be one of {DATASETS}.")
    elif d.name == "dir":
        if not d.data_dir or not os.path.isdir(d.data_dir):
            errors.append(f"data.name='dir' reads train.txt / valid.txt / test.txt from data.data_dir={d.data_dir!r}, "
                          "which is not a directory.")
        if d.format not in DIR_FORMATS:
            errors.append(f"data.format={d.format!r} must be one of {DIR_FORMATS} (jdjax/data/dialogue.py).")
    if d.vocab not in ("word", "sentencepiece"):
        errors.append(f"data.vocab={d.vocab!r} must be 'word' or 'sentencepiece'.")
    if m.name not in MODELS:
        errors.append(f"model.name={m.name!r} must be one of {MODELS}.")
    elif m.name == "transformer" and max(d.max_context, d.max_response) > m.max_positions:
        errors.append(f"data.max_context / max_response ({d.max_context}, {d.max_response}) exceed "
                      f"model.max_positions={m.max_positions}.")
    if c.pretrain_steps < 0 or c.num_cl_steps < 1:
        errors.append(f"cl.pretrain_steps={c.pretrain_steps} must be >= 0 and cl.num_cl_steps={c.num_cl_steps} >= 1.")
    if not 1 <= c.sample_k <= 8:  # jdjax.data.pipeline.AUGMENT_DRAWS uniform draws per example
        errors.append(f"cl.sample_k={c.sample_k} must be in 1..8.")
    if c.normalization not in cl.MATCHING_MODES:
        errors.append(f"cl.normalization={c.normalization!r} must be one of {cl.MATCHING_MODES}.")
    if d.k_top < 2 or d.k_bottom < 1:
        errors.append(f"data.k_top={d.k_top} must be >= 2 (the example itself is dropped on train) and "
                      f"data.k_bottom={d.k_bottom} >= 1.")
    return errors
