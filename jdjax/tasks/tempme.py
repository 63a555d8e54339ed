"""TempMe end to end: text-video retrieval with dense LoRA, ImgMe and TempMe on one CLIP backbone.

Spec `vision_token_merging.md` §2. Workdir layout (every stage resumes; a finished one is skipped):

    pretrain/              only without `init_from`: a small CLIP fully trained on the captioned
                           frames of the generated train videos (the contrastive task);
                           pretrain/backbone holds its val-selected parameters (converter format).
    dense/  imgme/  tempme/
                           one retrieval run per method: CLIP backbone frozen (mode 'peft': LoRA
                           rank r on the visual and text qkv + clip position embeddings trained)
                           or fully trained (mode 'full'; the temperature stays frozen).
    comparison.md, comparison.json
                           t2v / v2t R@1/5/10, R-Sum of the val-selected checkpoint on val and
                           test, ms/video (measured here, interleaved), visual GMACs per video,
                           tokens out and trainable parameters.

Loss: symmetric InfoNCE of exp(logit_scale) cos(text, video) over the *global* batch (the batch
arrays are global and sharded over the data axis, so XLA gathers the features and 8 devices see
the negatives 1 device sees; tests/tasks/test_tempme.py checks it). The temperature is frozen
(TempMe keeps CLIP's 100). Retrieval metrics: `jdjax.metrics.retrieval` (ties counted once).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdjax.data import video as video_data
from jdjax.data.pipeline import ArraySource
from jdjax.io import as_path
from jdjax.merging import flops, tempme
from jdjax.merging.tempme import TemporalConfig
from jdjax.metrics.retrieval import t2v_v2t_metrics
from jdjax.models.tempme import TempMeCLIP
from jdjax.nn.clip import CLIP, l2_normalize
from jdjax.nn.lora import LoRAConfig, lora_trainable_pattern
from jdjax.tasks import contrastive
from jdjax.train import sweep
from jdjax.train.logging import is_main_process
from jdjax.train.task import Task

METHODS = ("dense", "imgme", "tempme")
MODES = ("peft", "full")
PEFT_TRAINABLE = lora_trainable_pattern(("clip_pos_embedding",))
FULL_TRAINABLE = r"^(?!logit_scale$)"  # everything but the temperature
METRIC_NAMES = ("R1", "R5", "R10", "MdR", "MnR", "RSum")
ZERO_SHOT_TEMPLATE = "a {} {}"  # colour, shape: the frame classes of the pretraining stage



def temporal_config(config, method: str) -> TemporalConfig:
    """dense: no merging (mean pooling); imgme: ImgMe r in every layer; tempme: the config's."""
    t = config.temporal
    frames = config.data.num_frames
    if method == "dense":
        return TemporalConfig(frames)
    if method == "imgme":
        return TemporalConfig(frames, t.imgme_r)
    return TemporalConfig(frames, t.imgme_r, tuple(t.clip_layers), tuple(t.group_factors), t.cross_ratio,
                          t.intra_ratio)


# ----------------------------------------------------------------------------- tokens and data


def make_tokenizer(data_cfg):
    """CLIP's BPE tokenizer when `data.bpe_path` is set, else a word vocabulary of the generated captions."""
    if data_cfg.bpe_path:
        from jdjax.data.clip_tokenizer import CLIPTokenizer

        return CLIPTokenizer.from_file(data_cfg.bpe_path)
    return contrastive.WordTokenizer([" ".join(video_data.caption_vocabulary())])


def generated_splits(data_cfg) -> dict[str, video_data.VideoSplit]:
    sizes = {"train": data_cfg.num_train, "val": data_cfg.num_eval, "test": data_cfg.num_eval}
    return {split: video_data.moving_shapes_videos(split, n, data_cfg.num_frames, data_cfg.image_size, data_cfg.seed)
            for split, n in sizes.items()}


def video_sources(data_cfg, tokenizer, context_length: int) -> dict:
    """{'train', 'val', 'test'} sources with 'video' [T, S, S, 3], 'video_mask' [T], 'text' [L], 'video_index'."""
    if data_cfg.name == "moving_shapes":  # train: batches of twin pairs; val / test: one video per caption
        splits = generated_splits(data_cfg)
        out = {k: video_data.MovingShapesSource(splits[k].distinct_captions(), tokenizer, context_length)
               for k in ("val", "test")}
        out["train"] = video_data.MovingShapesSource(splits["train"], tokenizer, context_length,
                                                     twin_batches=data_cfg.twin_batches)
        return out
    out = {}
    for split in ("train", "val", "test"):
        listing = video_data.load_video_text(data_cfg.name, data_cfg.data_dir, split, val_fraction=data_cfg.val_fraction,
                                             seed=data_cfg.seed, skip_missing=data_cfg.skip_missing)
        out[split] = video_data.VideoTextSource(listing.items, listing.locate, tokenizer, context_length,
                                                data_cfg.num_frames, data_cfg.image_size)
    return out


def frame_splits(data_cfg, tokenizer, context_length: int) -> tuple[dict[str, ArraySource], np.ndarray]:
    """The captioned frames of the generated videos (pretraining): {'train', 'val', 'test'} sources with
    'image' [S, S, 3], 'text' [L], 'label' (colour x shape), and the [K, L] zero-shot prompt ids."""
    out = {}
    for split, videos in generated_splits(data_cfg).items():
        frames, captions, labels = videos.frames()
        out[split] = ArraySource({"image": video_data.clip_normalize(frames),
                                  "text": tokenizer(captions, context_length), "label": labels})
    names = [ZERO_SHOT_TEMPLATE.format(c, s) for c in video_data.COLOURS for s in video_data.SHAPES]
    return out, tokenizer(names, context_length)


# ----------------------------------------------------------------------------- model and task


def clip_kwargs(config, vocab_size: int) -> dict:
    """CLIP shapes (a published model's for `model.name`) at data.image_size."""
    dims = contrastive.model_dims(config.model)
    return {**dims, "image_size": config.data.image_size, "vocab_size": dims["vocab_size"] or vocab_size}


def build_model(config, method: str, vocab_size: int) -> TempMeCLIP:
    m = config.model
    lora = LoRAConfig(rank=m.lora_rank, dropout=m.lora_dropout) if config.mode == "peft" else LoRAConfig()
    return TempMeCLIP(**clip_kwargs(config, vocab_size), temporal=temporal_config(config, method), lora=lora,
                      remat=m.remat, remat_policy=m.remat_policy, dtype=jnp.dtype(m.dtype))


def text_mask(ids):
    return ids > 0


def retrieval_task(model: TempMeCLIP, sources: dict, image_size: int, **task_kwargs) -> Task:
    """A Task for video-text retrieval on sources with 'video', 'video_mask', 'text', 'video_index'."""
    frames = model.temporal.num_frames

    def init(rng):
        videos = jnp.zeros((1, frames, image_size, image_size, 3), jnp.float32)
        return model.init({"params": rng}, videos, jnp.zeros((1, model.context_length), jnp.int32))["params"]

    def loss(params, batch, rng):
        out = model.apply({"params": params}, batch["video"], batch["text"], batch["video_mask"], text_mask(batch["text"]),
                          train=True, rngs={"dropout": rng})
        logits = contrastive.clip_logits(out["text_embeds"], out["video_embeds"], out["logit_scale"])  # [B, B] t2v
        t2v = jnp.argmax(logits, 1) == jnp.arange(logits.shape[0])
        return contrastive.contrastive_loss(logits), {"t2v_r1": jnp.mean(t2v)}

    def predict(params, batch):
        variables = {"params": params}
        video = model.apply(variables, batch["video"], batch["video_mask"], method=TempMeCLIP.encode_video)
        text = model.apply(variables, batch["text"], text_mask(batch["text"]), method=TempMeCLIP.encode_text)
        out = {"video_embeds": video, "text_embeds": l2_normalize(text), "video_index": batch["video_index"]}
        if "twin_index" in batch:  # generated data
            out["twin_index"] = batch["twin_index"]
        return out

    return Task(init=init, loss=loss, predict=predict, summarize=summarize, train_source=sources["train"],
                eval_sources={k: v for k, v in sources.items() if k != "train"}, **task_kwargs)


def summarize(out: dict[str, np.ndarray]) -> dict[str, float]:
    """t2v / v2t retrieval metrics of a split holding one text per video (texts x videos cosine).

    With 'twin_index' (generated data): `order_accuracy`, the share of texts whose video scores above
    its time-reversed twin (ties count half) -- 50 % for any model blind to frame order.
    """
    index = out["video_index"]
    if len(np.unique(index)) != len(index):
        raise ValueError("retrieval evaluation needs one text per video in the split (val and test do).")
    order = np.argsort(index)
    text, video = out["text_embeds"][order].astype(np.float64), out["video_embeds"][order].astype(np.float64)
    sim = text @ video.T  # [texts, videos], ground truth on the diagonal
    metrics = {k.replace("/", "_"): v for k, v in t2v_v2t_metrics(sim).items()}
    metrics["rsum"] = metrics["t2v_RSum"] + metrics["v2t_RSum"]
    if "twin_index" in out:
        twin = out["twin_index"][order]
        rows = np.flatnonzero(twin >= 0)
        own, other = sim[rows, rows], sim[rows, twin[rows]]
        metrics["order_accuracy"] = 100.0 * float(np.mean((own > other) + 0.5 * (own == other)))
    metrics["count"] = float(len(index))
    return metrics


def transfer_task(config, method: str, backbone: str, log=None) -> Task:
    """One retrieval run: the backbone at `backbone` loaded into the method's TempMeCLIP."""
    from jdjax.train.pretrained import make_load_pretrained

    tokenizer = make_tokenizer(config.data)
    model = build_model(config, method, tokenizer.vocab_size)
    sources = video_sources(config.data, tokenizer, config.data.text_length or model.context_length)
    fmt = (config.init_format or None) if backbone == config.init_from else None  # the exported backbone: converted
    return retrieval_task(
        model, sources, config.data.image_size,
        load_pretrained=make_load_pretrained(backbone, exclude=None, log=log, format=fmt),
        trainable=PEFT_TRAINABLE if config.mode == "peft" else FULL_TRAINABLE,
    )


def build(config) -> Task:
    """The first run of `config` from `config.init_from` (the loop's entry; `run` does them all)."""
    return transfer_task(config, sweep.run_names(config.method)[0], config.init_from)


# ----------------------------------------------------------------------------- pretraining


def pretrain_config(config):
    """The config of the embedded pretraining stage: a dense CLIP on frames, every parameter trained."""
    c = config.copy_and_resolve_references()
    p = config.pretrain
    with c.unlocked():
        c.trainable = ""
        c.init_from = ""
        c.batch_size = p.batch_size
        c.num_train_steps = p.num_train_steps
        c.eval_every_steps = p.eval_every_steps
        c.checkpoint.every_steps = p.eval_every_steps
        c.checkpoint.update(best_metric="val/zero_shot_accuracy", best_mode="max")
        c.optimizer.update(learning_rate=p.learning_rate, weight_decay=p.weight_decay,
                           warmup_steps=min(c.optimizer.warmup_steps, p.num_train_steps // 10))
    return c


def pretrain_job(config) -> sweep.Job:
    from jdjax.train.loop import train_and_evaluate

    c = pretrain_config(config)

    def run(workdir: str) -> dict:
        tokenizer = make_tokenizer(c.data)
        model = CLIP(**clip_kwargs(c, tokenizer.vocab_size))
        splits, prompts = frame_splits(c.data, tokenizer, model.context_length)
        return train_and_evaluate(c, workdir, contrastive.contrastive_task(model, splits, c.data.image_size, prompts))

    return sweep.Job("pretrain", run)


def export_backbone(config, workdir: str, results: dict) -> str:
    """The val-selected CLIP of the pretraining run in `workdir`, saved once as workdir/backbone."""
    from jdjax.nn import convert
    from jdjax.train.checkpoint import read_state

    backbone = os.path.join(workdir, "backbone")
    if is_main_process() and not (as_path(backbone) / convert.MODEL_JSON).exists():
        params = read_state(workdir, kind="best")["params"]
        kwargs = clip_kwargs(config, make_tokenizer(config.data).vocab_size)
        convert.save_converted(
            convert.Converted(params, "CLIP", kwargs, source_format="jdjax"), backbone, overwrite=True,
            source=f"{workdir} (val-selected step {results['selected_step']}, "
                   f"val zero-shot accuracy {results['val/zero_shot_accuracy']:.4f})",
        )
    return backbone


# ----------------------------------------------------------------------------- comparison


def video_macs(model: TempMeCLIP, image_size: int) -> flops.ViTMacs:
    return flops.video_macs(model.plan(), image_size=image_size, patch_size=model.patch_size, width=model.vision_width,
                            num_heads=model.vision_heads, mlp_dim=model.vision_mlp_dim or 4 * model.vision_width,
                            num_frames=model.temporal.num_frames)


def ms_per_video(config, methods: list[str], batch: int = 16, rounds: int = 7) -> dict[str, float]:
    """Median ms per video of the jitted video tower of each method, timed in interleaved rounds
    (random weights: the time does not depend on their values; compile time excluded)."""
    vocab = make_tokenizer(config.data).vocab_size
    s, t = config.data.image_size, config.data.num_frames
    videos = jax.random.normal(jax.random.key(0), (batch, t, s, s, 3), jnp.float32)
    fns = {}
    for method in methods:
        model = build_model(config, method, vocab)
        params = jax.jit(lambda k, m=model: m.init(k, videos[:1], jnp.zeros((1, m.context_length), jnp.int32)))(
            jax.random.key(1))
        fn = jax.jit(lambda p, v, m=model: m.apply(p, v, method=TempMeCLIP.encode_video))
        fn(params, videos).block_until_ready()  # compile + warm up
        fns[method] = (fn, params)
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m, (fn, params) in fns.items():
            t0 = time.perf_counter()
            fn(params, videos).block_until_ready()
            times[m].append(time.perf_counter() - t0)
    return {m: 1e3 * float(np.median(v)) / batch for m, v in times.items()}


def comparison(config, results: dict[str, dict], speed: dict[str, float]) -> list[dict]:
    vocab = make_tokenizer(config.data).vocab_size
    rows = []
    for method in sweep.run_names(config.method):
        model = build_model(config, method, vocab)
        r = results[method]
        row = {"run": method, "selected_step": r.get("selected_step"), "trainable_params": r["trainable_params"]}
        for split in ("val", "test"):
            for d in ("t2v", "v2t"):
                for k in METRIC_NAMES:
                    row[f"{split}/{d}_{k}"] = r.get(f"{split}/{d}_{k}")
            row[f"{split}/order_accuracy"] = r.get(f"{split}/order_accuracy")
        clips, tokens = tempme.output_shape(model.plan())
        row.update(gmacs=video_macs(model, config.data.image_size).gmacs, tokens_out=f"{clips}x{tokens}",
                   ms_per_video=speed.get(method))
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    def num(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| run | t2v R@1 | R@5 | R@10 | v2t R@1 | R@5 | R@10 | t2v R-Sum | v2t R-Sum | val R-Sum (t2v+v2t) "
             "| order acc | ms/video | GMACs | tokens out | trainable |", "|" + "---|" * 15]
    for r in rows:
        t = [num(r[f"test/{d}_{k}"]) for d in ("t2v", "v2t") for k in ("R1", "R5", "R10")]
        val = None if r["val/t2v_RSum"] is None else r["val/t2v_RSum"] + r["val/v2t_RSum"]
        lines.append(f"| {r['run']} | " + " | ".join(t) + f" | {num(r['test/t2v_RSum'])} | {num(r['test/v2t_RSum'])} "
                     f"| {num(val)} | {num(r.get('test/order_accuracy'))} | {num(r['ms_per_video'], '{:.2f}')} "
                     f"| {r['gmacs']:.4g} | {r['tokens_out']} "
                     f"| {r['trainable_params']:,} |")
    return "\n".join(lines) + (
        "\n\nRecall in %, on test, of the checkpoint chosen on val R-Sum (t2v + v2t). order acc (generated "
        "data): % of test captions whose video scores above its time-reversed twin (50 = blind to order). ms/video: the video tower, "
        "measured in this run (median of interleaved rounds, random weights, batch 16). GMACs: visual tower per "
        "video (analytic). tokens out: sequences x tokens per video after the last layer.\n")


# ----------------------------------------------------------------------------- entry point


def transfer_job(config, method: str, backbone: str) -> sweep.Job:
    from jdjax.train.loop import train_and_evaluate

    log = print if is_main_process() else None
    return sweep.Job(method, lambda workdir: train_and_evaluate(config, workdir,
                                                                transfer_task(config, method, backbone, log=log)))


def run(config, workdir: str) -> dict:
    """Pretrains if needed, trains every method, writes and prints the comparison."""
    methods = sweep.run_names(config.method)
    out = sweep.run_from_backbone(
        workdir, config.init_from, pretrain_job(config), lambda d, r: export_backbone(config, d, r),
        lambda backbone: [transfer_job(config, m, backbone) for m in methods], desc="tempme")
    if out.status != sweep.COMPLETED:
        return {"status": out.status, "failed": out.failed}
    rows = comparison(config, out.results, ms_per_video(config, methods))
    sweep.write_comparison(workdir, rows, format_table(rows))
    return {"status": "completed", "runs": rows}


def loop_configs(config) -> list:
    """The retrieval runs' config and, without init_from, the pretraining stage's."""
    return [config] if config.init_from else [config, pretrain_config(config)]


# ----------------------------------------------------------------------------- validation


def validate(config) -> list[str]:
    errors = sweep.run_name_errors("method", config.method, METHODS)
    if config.mode not in MODES:
        errors.append(f"mode={config.mode!r} must be one of {MODES}.")
    try:
        dims = contrastive.model_dims(config.model)
    except ValueError as e:
        return errors + [str(e)]
    d = config.data
    if dims["vision_width"] % dims["vision_heads"] or dims["text_width"] % dims["text_heads"]:
        errors.append("model widths must divide by their head counts.")
    if d.image_size % dims["patch_size"]:
        errors.append(f"data.image_size={d.image_size} is not divisible by the patch size {dims['patch_size']}.")
    if d.name != "moving_shapes" and d.name not in video_data.READERS:
        errors.append(f"data.name={d.name!r}: use 'moving_shapes' (generated) or one of {sorted(video_data.READERS)}.")
    if d.name in video_data.READERS:
        if not d.data_dir:
            errors.append(f"data.name={d.name!r} reads a local copy: set --config.data.data_dir.")
        if not config.init_from:
            errors.append(f"data.name={d.name!r} needs a pretrained CLIP: set --config.init_from to OpenAI's .pt "
                          "(with --config.init_format=openai_clip) or a directory written by python -m jdjax.tools.convert.")
        if not d.bpe_path:
            errors.append("real captions need CLIP's BPE vocabulary: set --config.data.bpe_path=bpe_simple_vocab_16e6.txt.gz.")
    if config.model.name and not config.init_from:
        errors.append(f"model.name={config.model.name!r} needs pretrained weights: set --config.init_from.")
    if d.bpe_path and not os.path.isfile(d.bpe_path):
        errors.append(f"data.bpe_path={d.bpe_path!r} does not exist.")
    if not 0 <= d.text_length <= dims["context_length"]:
        errors.append(f"data.text_length={d.text_length} must be in [0, {dims['context_length']}] (0: the context length).")
    if d.name == "moving_shapes" and (d.num_train % 2 or d.num_eval % 2):
        errors.append("data.num_train and data.num_eval must be even (the generated videos come in time-reversed pairs).")
    if d.name == "moving_shapes" and d.twin_batches and config.batch_size % 2:
        errors.append(f"batch_size={config.batch_size} must be even with data.twin_batches (pairs of twins).")
    if config.mode == "peft" and config.model.lora_rank <= 0:
        errors.append("model.lora_rank must be positive in mode 'peft'.")
    t = config.temporal
    try:
        temporal = TemporalConfig(d.num_frames, t.imgme_r, tuple(t.clip_layers), tuple(t.group_factors), t.cross_ratio,
                                  t.intra_ratio)
        tempme.plan_layers(temporal, 1 + (d.image_size // dims["patch_size"]) ** 2, dims["vision_layers"])
    except ValueError as e:
        errors.append(f"temporal: {e}")
    if config.checkpoint.best_metric.split("/", 1)[-1] not in ("rsum", *(f"{x}_{k}" for x in ("t2v", "v2t")
                                                                           for k in METRIC_NAMES)):
        errors.append(f"checkpoint.best_metric={config.checkpoint.best_metric!r} is not a metric of this task; "
                      "use 'val/rsum' or e.g. 'val/t2v_R1'.")
    return errors

