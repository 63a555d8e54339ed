"""Product description generation with review posterior distillation and copying (spec
`experiments_ads_text.md` P3; the model and its [R] choices: jdjax/models/prodgen.py).

    python -m jdjax.main --config=configs/prodgen.py

Methods (`--config.method`, a comma list; each trains in its own sub-directory of the workdir):

    transformer         title + attributes -> description, no reviews, no copy
    transformer_copy    + the pointer-generator copy over the source (extended vocabulary)
    reviews_prior       + the review memory selected by the prior p(j|x), the adaptive gate, the BOW loss
    full                + the posterior q(j|x,y) in training and KL(q || p)

Every run selects its checkpoint on val BLEU-4 (beam search as in the table) and is scored on test:
BLEU-1..4, ROUGE-L, Dist-1/2 and aspect coverage (our metric: the share of the reference's
user-cared aspects the output mentions, jdjax.metrics.generation), on the whole test split and on
its long tail (products with at most `long_tail_reviews` reviews). The table is comparison.md; on data
with product types and aspects it ends with two non-learned rows for the aspect columns (`aspect_rules`).
The word vocabulary (min_count counted once per product, so one-off model tokens are __unk__ and
only copying produces them) is built from train into workdir/vocab.json and read back on resume.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from jdjax.data import products as prod
from jdjax.data import text
from jdjax.data.pipeline import ArraySource
from jdjax.metrics import generation
from jdjax.metrics import text as text_metrics
from jdjax.models import prodgen as pg
from jdjax.train import sweep
from jdjax.train.task import Task


@dataclasses.dataclass(frozen=True)
class Method:
    """Switches of one comparison run (module docstring)."""

    reviews: bool = True
    posterior: bool = True
    copy: bool = True
    gate: bool = True
    bow: bool = True


METHODS = {
    "transformer": Method(reviews=False, posterior=False, copy=False, gate=False, bow=False),
    "transformer_copy": Method(reviews=False, posterior=False, gate=False, bow=False),
    "reviews_prior": Method(posterior=False),
    "full": Method(),
}
ARRAY_KEYS = ("source", "segment", "reviews", "target_in", "target_out", "source_ext", "target_ext")


# ----------------------------------------------------------------------------- data


def load_products(data_cfg) -> dict[str, list[prod.Product]]:
    if data_cfg.name == "generated":
        return prod.product_splits({"train": data_cfg.num_train, "val": data_cfg.num_eval,
                                    "test": data_cfg.num_eval}, seed=data_cfg.seed)
    return prod.read_products_dir(data_cfg.data_dir)


def load_vocab(data_cfg, train: list[prod.Product], workdir: str):
    """The training split's vocabulary (jdjax.data.text.workdir_vocab), stable across resume; word
    counts once per product, SentencePiece trains on every text."""
    return text.workdir_vocab(data_cfg, prod.vocab_texts(train), workdir, prod.product_texts(train))


@dataclasses.dataclass
class Encoded:
    """Every split encoded once: arrays[split] (ARRAY_KEYS plus 'index', 'num_reviews'), and per
    global index the product and its source OOV words (for decoding copied ids)."""

    arrays: dict[str, dict[str, np.ndarray]]
    products: list[prod.Product]
    oov_words: list[list[str]]


def encode(config, vocab, splits: dict[str, list[prod.Product]]) -> Encoded:
    d = config.data
    arrays, everything, oov = {}, [], []
    for split, items in splits.items():
        e = prod.encode_products(vocab, items, d.max_title, d.max_attr, d.max_reviews, d.max_review_len, d.max_target)
        arrays[split] = {k: e[k].astype(np.int32) for k in ARRAY_KEYS}
        arrays[split]["index"] = np.arange(len(everything), len(everything) + len(items), dtype=np.int32)
        arrays[split]["num_reviews"] = np.array([len(p.reviews) for p in items], np.int32)
        everything += items
        oov += e["oov_words"]
    return Encoded(arrays, everything, oov)


def max_oov(config) -> int:
    """Static extended-vocabulary slots: every source token could be a distinct OOV word."""
    return config.data.max_title + config.data.max_attr


# ----------------------------------------------------------------------------- model and task


def build_model(config, method: Method, vocab_size: int) -> pg.ProductGenerator:
    m = config.model
    return pg.ProductGenerator(
        vocab_size=vocab_size, max_oov=max_oov(config), num_layers=m.num_layers, width=m.width,
        num_heads=m.num_heads, mlp_dim=m.mlp_dim, max_positions=m.max_positions, dropout=m.dropout,
        share_encoder=m.share_encoder, use_reviews=method.reviews, use_posterior=method.posterior,
        review_select=m.review_select, review_memory=m.review_memory, gumbel_temperature=m.gumbel_temperature,
        use_copy=method.copy, use_gate=method.gate, gate_bias_init=m.gate_bias_init, dtype=jnp.dtype(m.dtype))


def _probe(config) -> dict:
    d = config.data
    ls = d.max_title + d.max_attr
    z = lambda *shape: jnp.zeros(shape, jnp.int32)  # noqa: E731
    return {"source": z(1, ls).at[:, 0].set(text.UNK_ID), "segment": z(1, ls).at[:, 0].set(prod.TITLE_SEGMENT),
            "reviews": z(1, d.max_reviews, d.max_review_len), "target_in": z(1, d.max_target).at[:, 0].set(1),
            "target_out": z(1, d.max_target), "source_ext": z(1, ls), "target_ext": z(1, d.max_target)}


def _subsets(tail: int):
    """(metric prefix, keep(num_reviews)) of the table's product subsets: all, long tail, reviewed."""
    return (("", lambda n: True), ("tail_", lambda n: n <= tail), ("reviewed_", lambda n: n > tail))


def generation_summary(config, vocab, encoded: Encoded):
    """summarize: BLEU-1..4, ROUGE-L, Dist-1/2, aspect coverage and precision on all products, on the long tail
    (`tail_`: at most `long_tail_reviews` reviews) and on the rest (`reviewed_`)."""
    tail = config.long_tail_reviews

    def scores(hyps, refs, aspects) -> dict[str, float]:
        out = text_metrics.bleu_n(hyps, refs)
        out["rouge_l"] = 100 * generation.rouge_l(hyps, refs)
        out["dist_1"] = text_metrics.distinct(hyps, 1)
        out["dist_2"] = text_metrics.distinct(hyps, 2)
        out["aspect_coverage"] = 100 * generation.aspect_coverage(hyps, aspects, prod.ASPECT_PHRASES)
        out["aspect_precision"] = 100 * generation.aspect_precision(hyps, aspects, prod.ASPECT_PHRASES)
        return out

    def summarize(out: dict[str, np.ndarray]) -> dict[str, float]:
        idx = out["index"]
        hyps = [prod.decode_extended(vocab, t, encoded.oov_words[i]).split() for t, i in zip(out["hypothesis"], idx)]
        refs = [vocab.tokenize(encoded.products[i].description) for i in idx]
        aspects = [encoded.products[i].aspects for i in idx]
        metrics = scores(hyps, refs, aspects)
        for prefix, keep in _subsets(tail)[1:]:
            sel = [k for k, n in enumerate(out["num_reviews"]) if keep(n)]
            if sel:
                metrics.update({f"{prefix}{k}": v for k, v in scores([hyps[k] for k in sel], [refs[k] for k in sel],
                                                                     [aspects[k] for k in sel]).items()})
        metrics["nll"] = float(np.sum(out["nll_sum"]) / max(float(np.sum(out["nll_count"])), 1.0))
        return metrics

    return summarize


def prodgen_task(config, method: Method, model: pg.ProductGenerator, vocab, encoded: Encoded) -> Task:
    """A Task: prodgen_loss with the KL weight annealed linearly over `kl_anneal_steps` (model state
    {'step'}), predictions by beam search from the inputs only."""
    c = config.loss
    probe = _probe(config)
    decode = dict(max_len=config.data.max_target, beam_size=config.decode.beam_size,
                  length_penalty_alpha=config.decode.length_penalty, block_ngram=config.decode.block_ngram)

    def init(rng):
        return model.init({"params": rng, "dropout": rng}, probe)["params"]

    def init_model_state(rng):
        del rng
        return {"anneal": {"step": jnp.zeros((), jnp.int32)}}

    def loss(params, model_state, batch, rng):
        step = model_state["anneal"]["step"]
        kl_weight = c.kl_weight * (jnp.minimum(1.0, (step + 1) / c.kl_anneal_steps) if c.kl_anneal_steps else 1.0)
        outputs = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
        total, aux = pg.prodgen_loss(outputs, batch, kl_weight, c.bow_weight if method.bow else 0.0)
        return total, {**{k: aux[k] for k in ("nll", "kl", "bow")}, "kl_weight": kl_weight}, {
            "anneal": {"step": step + 1}}

    def predict(params, model_state, batch):
        del model_state
        outputs = model.apply({"params": params}, batch, train=False)
        labels = jnp.where(batch["target_ext"] >= outputs["log_probs"].shape[-1], text.UNK_ID, batch["target_ext"])
        mask = labels != text.PAD_ID
        picked = jnp.take_along_axis(outputs["log_probs"], labels[..., None], axis=-1)[..., 0]
        tokens = pg.generate(model, {"params": params}, {k: batch[k] for k in ("source", "segment", "reviews",
                                                                              "source_ext")}, **decode)
        return {"hypothesis": tokens, "index": batch["index"], "num_reviews": batch["num_reviews"],
                "nll_sum": -jnp.sum(jnp.where(mask, picked, 0.0), axis=-1), "nll_count": jnp.sum(mask, axis=-1)}

    sources = {split: ArraySource(a) for split, a in encoded.arrays.items()}
    return Task(init=init, loss=loss, predict=predict, summarize=generation_summary(config, vocab, encoded),
                train_source=sources["train"], eval_sources={k: v for k, v in sources.items() if k != "train"},
                init_model_state=init_model_state)


# ----------------------------------------------------------------------------- the recipe

COLUMNS = (("BLEU-1", "bleu_1"), ("BLEU-2", "bleu_2"), ("BLEU-3", "bleu_3"), ("BLEU-4", "bleu_4"),
           ("ROUGE-L", "rouge_l"), ("Dist-1", "dist_1"), ("Dist-2", "dist_2"), ("aspects", "aspect_coverage"),
           ("aspect prec.", "aspect_precision"))


def aspect_rules(train: list[prod.Product], test: list[prod.Product], lexicon=prod.ASPECT_PHRASES,
                 num_aspects: int | None = None) -> dict[str, list[list[str]]]:
    """Two non-learned references for the aspect columns, each a list of aspects per test product:

    'type prior': the `num_aspects` aspects most frequent in train for the product's type;
    'reviews + type prior': every aspect a lexicon phrase names in the product's reviews, filled up to
    `num_aspects` from the type prior (so a product without reviews gets the type prior).
    `num_aspects` defaults to the train mean of true aspects, rounded. Needs `product_type` and `aspects`
    (generated data has both)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for p in train:
        counts[p.product_type].update(p.aspects)
    k = num_aspects or max(1, round(float(np.mean([len(p.aspects) for p in train]))))

    def prior(p, skip=()):
        ranked = sorted(counts.get(p.product_type, {}).items(), key=lambda kv: (-kv[1], kv[0]))
        return [a for a, _ in ranked if a not in skip]

    def from_reviews(p):
        found = sorted(set().union(*(generation.mentioned_aspects(r, lexicon) for r in p.reviews)))
        return found + prior(p, found)[:max(0, k - len(found))]

    return {"type prior": [prior(p)[:k] for p in test], "reviews + type prior": [from_reviews(p) for p in test]}


def aspect_rule_rows(config, splits: dict[str, list[prod.Product]]) -> list[dict]:
    """The `aspect_rules` as table rows (aspect columns only) on the test split: all, long tail, reviewed."""
    train, test = splits["train"], splits["test"]
    if not all(p.product_type and p.aspects for p in train + test):
        return []
    rows = []
    for name, named in aspect_rules(train, test).items():
        hyps = [" . ".join(prod.ASPECT_PHRASES[a][0] for a in asp) for asp in named]
        row = {"run": f"rule: {name}", "selected_step": "-"}
        for prefix, keep in _subsets(config.long_tail_reviews):
            sel = [i for i, p in enumerate(test) if keep(len(p.reviews))]
            args = ([hyps[i] for i in sel], [test[i].aspects for i in sel], prod.ASPECT_PHRASES)
            row[f"test/{prefix}aspect_coverage"] = 100 * generation.aspect_coverage(*args) if sel else None
            row[f"test/{prefix}aspect_precision"] = 100 * generation.aspect_precision(*args) if sel else None
        rows.append(row)
    return rows


def comparison(config, results: dict[str, dict]) -> list[dict]:
    rows = []
    for name in sweep.run_names(config.method):
        r = results[name]
        rows.append({"run": name, "selected_step": r.get("selected_step"),
                     **{f"test/{p}{k}": r.get(f"test/{p}{k}") for p in ("", "tail_", "reviewed_") for _, k in COLUMNS},
                     "val/bleu_4": r.get("val/bleu_4")})
    return rows


def format_table(config, rows: list[dict], tail_count: int) -> str:
    def num(v, key):
        return "-" if v is None else (f"{v:.3f}" if key.startswith("dist") else f"{v:.1f}")

    head = ("| method | " + " | ".join(h for h, _ in COLUMNS)
            + " | long-tail BLEU-4 | long-tail aspects | reviewed BLEU-4 | reviewed aspects | step |")
    lines = [head, "|" + "---|" * (len(COLUMNS) + 6)]
    for r in rows:
        cells = " | ".join(num(r.get(f"test/{k}"), k) for _, k in COLUMNS)
        subsets = " | ".join(num(r.get(f"test/{p}{k}"), k) for p in ("tail_", "reviewed_")
                             for k in ("bleu_4", "aspect_coverage"))
        lines.append(f"| {r['run']} | {cells} | {subsets} | {r['selected_step']} |")
    return "\n".join(lines) + (
        f"\n\nTest split, beam {config.decode.beam_size}, checkpoint chosen on val BLEU-4. BLEU (sacrebleu) and ROUGE-L "
        "(rouge-score) in %, on the vocabulary's tokens with copied words restored; Dist-n over the corpus; aspects = "
        "aspect coverage (our metric): the share of the reference's user-cared aspects the output mentions, in %; aspect "
        "prec. = of all the aspects the outputs mention, the share their references hold (a model naming every aspect "
        "would cover all at a low precision). "
        f"Long tail: the {tail_count} test products with at most {config.long_tail_reviews} review(s); reviewed: the "
        "others. Only the reviewed products can gain from reading reviews. Rule rows (when the data has product types "
        "and aspects) are non-learned references for the aspect columns: 'type prior' names the type's most frequent "
        "train aspects, 'reviews + type prior' names what the reviews' lexicon phrases mention and fills up from the "
        "type prior (tasks.prodgen.aspect_rules).\n")


def run(config, workdir: str) -> dict:
    from jdjax.train.loop import train_and_evaluate

    os.makedirs(workdir, exist_ok=True)
    splits = load_products(config.data)
    vocab = load_vocab(config.data, splits["train"], workdir)
    encoded = encode(config, vocab, splits)

    def job(name: str) -> sweep.Job:
        method = METHODS[name]
        return sweep.Job(name, lambda wd: train_and_evaluate(
            config, wd, prodgen_task(config, method, build_model(config, method, vocab.size), vocab, encoded)))

    out = sweep.run_sweep(workdir, [job(n) for n in sweep.run_names(config.method)], desc="prodgen")
    if out.status != sweep.COMPLETED:
        return {"status": out.status, "failed": out.failed}
    rows = comparison(config, out.results) + aspect_rule_rows(config, splits)
    tail_count = int(np.sum(encoded.arrays["test"]["num_reviews"] <= config.long_tail_reviews))
    sweep.write_comparison(workdir, rows, format_table(config, rows, tail_count))
    return {"status": "completed", "runs": rows}


def validate(config) -> list[str]:
    d, m = config.data, config.model
    errors = sweep.run_name_errors("method", config.method, METHODS)
    if d.name not in ("generated", "dir"):
        errors.append(f"data.name={d.name!r} must be 'generated' or 'dir' (train.jsonl / valid.jsonl / test.jsonl).")
    elif d.name == "dir" and (not d.data_dir or not os.path.isdir(d.data_dir)):
        errors.append(f"data.name='dir' reads JSON lines from data.data_dir={d.data_dir!r}, which is not a directory.")
    if d.vocab not in ("word", "sentencepiece"):
        errors.append(f"data.vocab={d.vocab!r} must be 'word' or 'sentencepiece'.")
    longest = max(d.max_title + d.max_attr, d.max_review_len, d.max_target)
    if longest > m.max_positions:
        errors.append(f"the longest sequence ({longest} tokens) exceeds model.max_positions={m.max_positions}.")
    if m.review_select not in pg.REVIEW_SELECTS:
        errors.append(f"model.review_select={m.review_select!r} must be one of {pg.REVIEW_SELECTS}.")
    if m.review_memory not in pg.REVIEW_MEMORIES:
        errors.append(f"model.review_memory={m.review_memory!r} must be one of {pg.REVIEW_MEMORIES}.")
    return errors
