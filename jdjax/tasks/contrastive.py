"""Image-text contrastive training of `jdjax.nn.clip.CLIP` (symmetric InfoNCE, CLIP's recipe).

Loss (Radford et al. 2021): over the *global* batch of B (image, caption) pairs, with unit
embeddings u_i (image) and v_j (text) and the learned temperature t = exp(logit_scale) clamped
to [1, 100] as CLIP does,

    logits[i, j] = t * <u_i, v_j>                                        # [B, B]
    loss = (CE(logits, diag) + CE(logits^T, diag)) / 2                   (mean over the batch)

The batch arrays are global (sharded over the data/fsdp axes), so the [B, B] similarity
covers every pair of the global batch on any mesh; XLA gathers the embeddings it needs.
OpenAI and open_clip clamp the *parameter* in place after each step; this loop has no such
hook, so the clamp is applied in the forward pass (same logits; above the clamp the gradient
of logit_scale is 0, and the scalar gets no weight decay, see train.optim.decay_mask).

Embedded data (no download): the procedural `shapes` images of jdjax.data.images (10 classes:
5 shapes x 2 fills, random colours, size, position and noise) paired with a caption that names
the class, e.g. "a photo of a striped ring", its template drawn per example from
`TEMPLATES` (deterministic in (seed, split, index)). Captions within a split repeat (10 classes
x 5 templates), so the in-batch InfoNCE has duplicate positives and a floor above 0; that is
expected and harmless for learning the class-text alignment.

Tokens: `WordTokenizer` is a stand-in for the CLIP BPE tokenizer (jdjax/data/clip_tokenizer.py,
which needs OpenAI's `bpe_simple_vocab_16e6.txt.gz`): a word-level vocabulary built in code
from the templates and class names, laid out like CLIP's -- 0 is padding, SOT and EOT are the
two largest ids -- so the text tower's default pooling at argmax(ids) lands on EOT. Rows are
[SOT, words..., EOT, 0, ...] of `model.context_length`; no padding mask is passed (as in
OpenAI CLIP: attention is causal, so the EOT position never sees the padding after it). With
`--config.data.bpe_path=/path/to/bpe_simple_vocab_16e6.txt.gz` the real CLIPTokenizer is used.

Eval metrics per split (`summarize` sees the whole split): `zero_shot_accuracy` (each image
against the 10 prompts "a photo of a {fill} {shape}", the primary metric), `loss` (the symmetric
InfoNCE above over consecutive blocks of `EVAL_BLOCK` examples of the split, averaged),
`image_to_text_r1` / `text_to_image_r1` (recall@1 within those blocks at the class level: the
top match names / shows the same class; captions name only the class, so an exact-caption
recall would be capped by the template draw).
"""

from __future__ import annotations

import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jdjax.data import images
from jdjax.data.pipeline import ArraySource
from jdjax.nn.clip import CLIP, clip_config, l2_normalize
from jdjax.train.task import Task

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps exp(logit_scale) to <= 100
FILL_WORDS = {"solid": "solid", "stripes": "striped"}
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of the {}.",
    "a drawing of a {}.",
    "a small {}.",
)
ZERO_SHOT_TEMPLATE = "a photo of a {}."
EVAL_BLOCK = 1000  # examples per block for the eval loss and recall@1 (N^2 similarities per block)


def class_names() -> list[str]:
    """'solid disk', ..., 'striped cross': class c of `images.shapes_split` (shape c % 5, fill c // 5)."""
    return [f"{FILL_WORDS[images.FILLS[c // 5]]} {images.SHAPES[c % 5]}" for c in range(images.NUM_SHAPE_CLASSES)]


# ----------------------------------------------------------------------------------------- tokens


class WordTokenizer:
    """A word-level stand-in for `jdjax.data.clip_tokenizer.CLIPTokenizer` (same call interface).

    Lower-cases, splits into runs of letters / single other non-space characters, and maps each to
    its id; unknown words map to `<unk>`. Layout: 0 `<pad>`, 1 `<unk>`, the words in sorted order,
    then SOT and EOT (the largest id, so CLIP's argmax(ids) pooling finds it).
    """

    PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
    _split = re.compile(r"[a-z]+|[^\sa-z]")

    def __init__(self, texts):
        words = sorted({w for t in texts for w in self.words(t)})
        self.vocab = [self.PAD, self.UNK, *words, self.SOT, self.EOT]
        self.encoder = {w: i for i, w in enumerate(self.vocab)}
        self.sot_token_id, self.eot_token_id = len(self.vocab) - 2, len(self.vocab) - 1

    @classmethod
    def words(cls, text: str) -> list[str]:
        return cls._split.findall(text.lower())

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        unk = self.encoder[self.UNK]
        return [self.encoder.get(w, unk) for w in self.words(text)]

    def tokenize(self, texts, context_length: int, truncate: bool = True) -> np.ndarray:
        """int32 [B, context_length]: SOT, words, EOT, then 0s; too long: cut, last token EOT (with
        truncate=False: ValueError)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), context_length), np.int32)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length and not truncate:
                raise ValueError(f"{text!r} is {len(ids)} tokens with SOT and EOT, more than context_length "
                                 f"{context_length}; pass truncate=True or a longer context.")
            ids = ids[:context_length]
            ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        return out

    __call__ = tokenize

    def decode(self, ids) -> str:
        words = []
        for i in np.asarray(ids).tolist():
            if i == self.eot_token_id:
                break
            if i not in (0, self.sot_token_id):
                words.append(self.vocab[i])
        return " ".join(words)


def make_tokenizer(data_cfg):
    """CLIP's BPE tokenizer when `data.bpe_path` is set, else the built-in word vocabulary."""
    if data_cfg.bpe_path:
        from jdjax.data.clip_tokenizer import CLIPTokenizer

        return CLIPTokenizer.from_file(data_cfg.bpe_path)
    texts = [t.format(n) for t in {*TEMPLATES, ZERO_SHOT_TEMPLATE} for n in class_names()]
    return WordTokenizer(texts)


# ------------------------------------------------------------------------------------------- data


def captions(labels: np.ndarray, split: str, seed: int) -> list[str]:
    """One caption per example; the template of example i depends only on (seed, split, i)."""
    draws = np.random.default_rng([seed, images.SPLIT_SEEDS[split], 7]).integers(0, len(TEMPLATES), len(labels))
    names = class_names()
    return [TEMPLATES[t].format(names[y]) for t, y in zip(draws, labels)]


def captioned_shapes_splits(data_cfg, tokenizer, context_length: int) -> dict[str, ArraySource]:
    """{'train', 'val', 'test'}: image [S, S, 3] float32, label int32, text [T] int32 token ids."""
    sizes = {"train": data_cfg.num_train, "val": data_cfg.num_eval, "test": data_cfg.num_eval}
    out = {}
    for split, src in images.shapes_splits(sizes, data_cfg.image_size, seed=data_cfg.shapes_seed).items():
        arrays = dict(src.arrays)
        arrays["text"] = tokenizer(captions(arrays["label"], split, data_cfg.shapes_seed), context_length)
        out[split] = ArraySource(arrays)
    return out


# ------------------------------------------------------------------------------------------- loss


def clip_logits(image_embeds, text_embeds, logit_scale):
    """[B, E] x [B, E] (not normalised) -> [B_image, B_text] = clamp(exp(logit_scale)) * cosine."""
    scale = jnp.exp(jnp.clip(logit_scale.astype(jnp.float32), 0.0, MAX_LOGIT_SCALE))
    return scale * l2_normalize(image_embeds) @ l2_normalize(text_embeds).T


def contrastive_loss(logits):
    """Symmetric InfoNCE of a square [B, B] logits matrix whose positives are on the diagonal."""
    labels = jnp.arange(logits.shape[0])
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return (image_to_text.mean() + text_to_image.mean()) / 2


def _np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _block_metrics(u, v, scale, labels) -> tuple[float, float, float]:
    """Symmetric InfoNCE and class-level recall@1 of one block of unit embeddings [n, E]."""
    logits = scale * (u @ v.T)  # [n, n] float64
    diag = np.arange(len(u))
    loss = -(_np_log_softmax(logits)[diag, diag].mean() + _np_log_softmax(logits.T)[diag, diag].mean()) / 2
    i2t = np.mean(labels[logits.argmax(1)] == labels)
    t2i = np.mean(labels[logits.argmax(0)] == labels)
    return float(loss), float(i2t), float(t2i)


# ------------------------------------------------------------------------------------------- task


SHAPE_KEYS = ("embed_dim", "patch_size", "vision_width", "vision_layers", "vision_heads", "context_length",
              "vocab_size", "text_width", "text_layers", "text_heads")


def model_dims(model_cfg) -> dict:
    """The tower shapes: a published CLIP's (`model.name`, e.g. 'ViT-B/16') or the config's numbers."""
    if not model_cfg.name:
        return {k: model_cfg[k] for k in SHAPE_KEYS}
    dims = clip_config(model_cfg.name)
    dims.pop("image_size")  # data.image_size decides
    return dims


def model_kwargs(config, vocab_size: int) -> dict:
    """CLIP keyword arguments from `config.model` (vocab_size 0 = the tokenizer's)."""
    m = config.model
    dims = model_dims(m)
    return {
        **dims, "image_size": config.data.image_size, "vocab_size": dims["vocab_size"] or vocab_size,
        "drop_path": m.drop_path, "remat": m.remat, "remat_policy": m.remat_policy, "scan": m.scan,
        "dtype": jnp.dtype(m.dtype),
    }


def build_model(config, tokenizer=None) -> CLIP:
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer(config.data)
    vocab_size = model_dims(config.model)["vocab_size"]
    if vocab_size and vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens; set --config.model.vocab_size=0 (= the tokenizer's).")
    return CLIP(**model_kwargs(config, tokenizer.vocab_size))


def init_fn(model: CLIP, image_size: int):
    """rng -> boxed parameters (logical axis names) of `model`."""

    def init(rng):
        ids = jnp.zeros((1, model.context_length), jnp.int32)
        return model.init({"params": rng}, jnp.zeros((1, image_size, image_size, 3), jnp.float32), ids)["params"]

    return init


def contrastive_task(model: CLIP, splits: dict, image_size: int, class_prompts: np.ndarray, **task_kwargs) -> Task:
    """A Task for CLIP on sources with 'image' [S, S, 3], 'text' [T] ids and 'label' (class of the
    caption, used by the metrics only); `class_prompts` [K, T] are the zero-shot prompt ids."""
    prompts = jnp.asarray(class_prompts)

    def loss(params, batch, rng):
        out = model.apply({"params": params}, batch["image"], batch["text"], train=True, rngs={"dropout": rng})
        logits = clip_logits(out["image_embeds"], out["text_embeds"], out["logit_scale"])  # [B, B]
        labels = batch["label"]
        metrics = {
            "temperature": jnp.exp(jnp.clip(out["logit_scale"], 0.0, MAX_LOGIT_SCALE)),
            "image_to_text_r1": jnp.mean(labels[jnp.argmax(logits, 1)] == labels),
        }
        return contrastive_loss(logits), metrics

    def encode(params, batch):
        variables = {"params": params}
        image = model.apply(variables, batch["image"], method=CLIP.encode_image)  # [B, E]
        text = model.apply(variables, batch["text"], method=CLIP.encode_text)  # [B, E]
        classes = model.apply(variables, prompts, method=CLIP.encode_text)  # [K, E]
        return l2_normalize(image), l2_normalize(text), l2_normalize(classes)

    def predict(params, batch):
        image, text, classes = encode(params, batch)
        b = image.shape[0]
        scale = jnp.exp(jnp.clip(params["logit_scale"].astype(jnp.float32), 0.0, MAX_LOGIT_SCALE))
        return {
            "image_embeds": image,
            "text_embeds": text,
            "label": batch["label"],
            "zero_shot_correct": (jnp.argmax(image @ classes.T, -1) == batch["label"]).astype(jnp.float32),
            "scale": jnp.broadcast_to(scale, (b,)),
        }

    def summarize(out: dict[str, np.ndarray]) -> dict[str, float]:
        n = len(out["label"])
        u, v = out["image_embeds"].astype(np.float64), out["text_embeds"].astype(np.float64)
        blocks = [_block_metrics(u[s:s + EVAL_BLOCK], v[s:s + EVAL_BLOCK], float(out["scale"][0]),
                                 out["label"][s:s + EVAL_BLOCK]) for s in range(0, n, EVAL_BLOCK)]
        weights = [min(EVAL_BLOCK, n - s) for s in range(0, n, EVAL_BLOCK)]
        loss, i2t, t2i = (float(np.average(col, weights=weights)) for col in zip(*blocks))
        return {
            "zero_shot_accuracy": float(np.mean(out["zero_shot_correct"])),
            "loss": loss,
            "image_to_text_r1": i2t,
            "text_to_image_r1": t2i,
            "temperature": float(out["scale"][0]),
            "count": float(n),
        }

    return Task(
        init=init_fn(model, image_size), loss=loss, predict=predict, summarize=summarize,
        train_source=splits["train"], eval_sources={k: v for k, v in splits.items() if k != "train"}, **task_kwargs,
    )


def build(config) -> Task:
    tokenizer = make_tokenizer(config.data)
    model = build_model(config, tokenizer)
    context_length = model_dims(config.model)["context_length"]
    splits = captioned_shapes_splits(config.data, tokenizer, context_length)
    prompts = tokenizer([ZERO_SHOT_TEMPLATE.format(n) for n in class_names()], context_length)
    augment = images.random_shift(config.data.augment_shift) if config.data.augment_shift else None
    return contrastive_task(model, splits, config.data.image_size, prompts, augment=augment,
                            trainable=config.trainable)


def validate(config) -> list[str]:
    """Config problems this task can see before anything is built."""
    d = config.data
    try:
        m = ml_collections.ConfigDict(model_dims(config.model))
    except ValueError as e:
        return [str(e)]
    errors = []
    if m.vision_width % m.vision_heads:
        errors.append(f"model.vision_width={m.vision_width} is not divisible by model.vision_heads={m.vision_heads}.")
    if m.text_width % m.text_heads:
        errors.append(f"model.text_width={m.text_width} is not divisible by model.text_heads={m.text_heads}.")
    if d.image_size % m.patch_size:
        errors.append(f"data.image_size={d.image_size} is not divisible by model.patch_size={m.patch_size}.")
    if d.name != "shapes":
        errors.append(f"data.name={d.name!r}: the contrastive task's embedded source is 'shapes' (captioned "
                      "generated shapes); no other image-text source exists yet.")
    if m.context_length < 2:
        errors.append(f"model.context_length={m.context_length} must be at least 2 (SOT and EOT).")
    if d.bpe_path and not os.path.isfile(d.bpe_path):
        errors.append(f"data.bpe_path={d.bpe_path!r} does not exist; point it at OpenAI's "
                      "bpe_simple_vocab_16e6.txt.gz or leave it empty for the built-in word vocabulary.")
    if config.checkpoint.best_metric.split("/", 1)[-1] not in (
            "zero_shot_accuracy", "loss", "image_to_text_r1", "text_to_image_r1"):
        errors.append(f"checkpoint.best_metric={config.checkpoint.best_metric!r} is not a metric of this task; "
                      "use e.g. 'val/zero_shot_accuracy'.")
    return errors


def abstract_params(config, mesh, rules):
    """(boxed ShapeDtypeStruct parameters, their NamedShardings) of the config's CLIP, nothing allocated."""
    from jdjax.train import sharding as shd

    model = build_model(config)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_fn(model, config.data.image_size), jax.random.key(0))
        return boxed, shd.logical_shardings(boxed, mesh, rules)
