"""SCPNet end to end: multi-label recognition from incomplete labels on a CLIP backbone.

Spec `ctr_and_multilabel.md` §4; the model, prior and losses are `jdjax.models.scpnet`. Workdir
layout (every stage resumes; a finished one is skipped):

    pretrain/              only without `init_from`: a small CLIP (ResNet image tower, BatchNorm)
                           trained contrastively on the captioned 'pretrain' split of the generated
                           scenes (fully labelled, disjoint from train); pretrain/backbone holds its
                           val-selected weights and BatchNorm statistics (converter format).
    relation.npy           the relation matrix R used by every run (see `relation_matrix`).
    scpnet/ no_gcn/ no_pessl/ no_prior/ assume_negative/
                           one run per method (below), each from the same backbone.
    comparison.md, comparison.json
                           mAP / CF1 / OF1 on test of the checkpoint (raw or EMA weights) chosen on
                           val mAP, and the hidden-label mAP (generated data): how well each model
                           ranks the training labels it never saw.

Methods (`--config.method`, comma list):
    scpnet           the full model: prompter + GCN over G + SPLC + PESSL (consistency and
                     structure-aware distillation through S).
    no_gcn           z* = T: a CoOp classifier; PESSL and its distillation through S kept.
    no_pessl         supervised SPLC loss only (GCN kept).
    no_prior         [R] G = S = I: the same network and losses without any label-to-label prior.
    assume_negative  the plain baseline: CoOp classifier, every unobserved label a negative, BCE
                     (no margin, focal weight, SPLC or PESSL).

Training follows the official code (§4.3-4.4): one forward over the concatenated weak / second
weak / strong views (3B images), SPLC from epoch `splc_start_epoch`, BatchNorm in eval mode
through epoch 0 and training mode from `bn_train_start_epoch`, Adam with coupled L2 decay, the
OneCycle schedule with its beta1 cycling over `total_epochs` (training stops at `epochs`), the
GCN's own learning rate, and an EMA of the weights (decay 0.82 ** (1 / steps per epoch)) evaluated
beside the raw weights. The official code keeps the better of the two on the *test* split; here
both are compared on val and only the winner is evaluated on test.

Two [R] options, on in the embedded recipe and off in the paper variants (the released code):
`scpnet.gcn_center` (the GCN output minus its mean over classes) and
`scpnet.gcn_from_unobserved=False` (the supervised view's unobserved entries, negatives by
assumption, train the image tower and the prompt but not the GCN). Under single
positive labels a fast GCN (lr 1e-3) otherwise grows one shift common to every class embedding
(2-3 times |T|; its unit rows' mean has norm 0.99) and the ranking collapses (README, SCPNet).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jdjax.data import multilabel
from jdjax.data.pipeline import ArraySource
from jdjax.data.video import clip_normalize
from jdjax.io import as_path
from jdjax.metrics import multilabel as ml_metrics
from jdjax.models import scpnet as scp
from jdjax.nn.clip import CLIP, l2_normalize
from jdjax.tasks import contrastive
from jdjax.train import sweep
from jdjax.train.logging import is_main_process
from jdjax.train.task import Task

TRAINABLE = r"^(visual|prompt_ctx|gcn|logit_scale)"  # the text tower stays frozen (official code)
RELATIONS = ("cooccurrence", "clip_text")  # or a path to a [C, C] .npy file


@dataclasses.dataclass(frozen=True)
class Method:
    """Switches of one comparison run (see the module docstring)."""

    gcn: bool = True
    pessl: bool = True
    prior: bool = True
    splc: bool = True


METHODS = {
    "scpnet": Method(),
    "no_gcn": Method(gcn=False),
    "no_pessl": Method(pessl=False),
    "no_prior": Method(prior=False),
    "assume_negative": Method(gcn=False, pessl=False, splc=False),
}



# ----------------------------------------------------------------------------- data and tokens


def load_data(data_cfg) -> multilabel.MultiLabelData:
    """The generated scenes ('shape_scenes') or a public data set read from `data.data_dir`."""
    d = data_cfg
    if d.name == "shape_scenes":
        sizes = {"pretrain": d.num_pretrain, "train": d.num_train, "val": d.num_eval, "test": d.num_eval}
        return multilabel.shape_scene_data(sizes, d.image_size, d.num_classes, d.num_cliques, d.seed, d.faint)
    kwargs = {"year": d.voc_year} if d.name == "voc" else {}
    return multilabel.load_multilabel(d.name, d.data_dir, val_fraction=d.val_fraction, seed=d.seed,
                                      skip_missing=d.skip_missing, **kwargs)


def make_tokenizer(data_cfg, data: multilabel.MultiLabelData, ctx_init: str):
    """CLIP's BPE tokenizer when `data.bpe_path` is set, else a word vocabulary of the captions,
    the class names and the prompt context."""
    if data_cfg.bpe_path:
        from jdjax.data.clip_tokenizer import CLIPTokenizer

        return CLIPTokenizer.from_file(data_cfg.bpe_path)
    pretrain = data.splits.get("pretrain")
    texts = [*(pretrain.captions if pretrain is not None and pretrain.captions else ()), *data.class_names,
             f"{ctx_init} ."]
    return contrastive.WordTokenizer(texts)


def sources(config, data: multilabel.MultiLabelData) -> dict:
    """{'train' (raw uint8, annotated by the config's protocol), 'val', 'test'} and, for generated
    data, 'hidden' (the train images, eval preprocessing, to score the labels training never saw)."""
    d = config.data
    out = multilabel.multilabel_sources(data, d.image_size, d.protocol, d.known_proportion, d.seed,
                                        num_threads=d.decode_threads)
    if d.name == "shape_scenes":
        train = out["train"]
        out["hidden"] = multilabel.MultiLabelSource(train.images, train.labels, train.annotations, d.image_size)
        if d.faint > 0:  # the faint test objects ranked against the absent classes (salient positives left out)
            test = data.splits["test"]
            out["faint"] = multilabel.MultiLabelSource(test.images, test.labels, test.salient, d.image_size)
    return out


# ----------------------------------------------------------------------------- prior


def relation_matrix(config, data: multilabel.MultiLabelData, backbone: str | None) -> np.ndarray:
    """R [C, C]: `scpnet.relation` = a .npy file, 'cooccurrence' (cosine of the label columns of the
    fully labelled 'pretrain' split, which training never sees: the embedded stand-in for CLIP's
    world knowledge), or 'clip_text' (cosine of the backbone's text features of "a photo of a {name}.",
    the official recipe [R: the template is not released])."""
    r = config.scpnet.relation
    c = len(data.class_names)
    if r == "cooccurrence":
        if "pretrain" not in data.splits:
            raise ValueError("scpnet.relation='cooccurrence' needs a fully labelled split apart from training "
                             "(the generated data's 'pretrain'); use 'clip_text' or a .npy file for this data set.")
        return multilabel.cooccurrence_relation(data.splits["pretrain"].labels)
    if r == "clip_text":
        return scp.text_relation(class_text_features(config, data, backbone))
    return multilabel.load_relation(r, c)


def class_text_features(config, data, backbone: str) -> np.ndarray:
    """[C, E] CLIP text features of the class prompts, from the backbone's text tower."""
    from jdjax.train.pretrained import make_load_pretrained

    tokenizer = make_tokenizer(config.data, data, config.model.ctx_init)
    clip = CLIP(**clip_kwargs(config, tokenizer.vocab_size))
    prompts = scp.class_prompts(tokenizer, data.class_names, config.model.ctx_init, config.model.n_ctx,
                                clip.context_length)
    images = jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.float32)
    variables = jax.jit(clip.init)(jax.random.key(0), images, jnp.asarray(prompts[:1]))
    variables = make_load_pretrained(backbone, exclude=None, format=_format(config, backbone))(
        jax.tree.map(np.asarray, dict(variables)))
    return np.asarray(jax.jit(lambda v, t: clip.apply(v, t, method=CLIP.encode_text))(variables, prompts))


def _format(config, backbone: str) -> str | None:
    return (config.init_format or None) if backbone == config.init_from else None


def prior_matrices(config, relation: np.ndarray, method: Method) -> tuple[np.ndarray, np.ndarray]:
    """(G, S) of the structured prior; identities for the 'no_prior' ablation."""
    s = config.scpnet
    if not method.prior:
        eye = np.eye(len(relation), dtype=np.float32)
        return eye, eye
    g = scp.adjacency(relation, s.topk, s.reweight_p)
    return g, scp.calibration(g, s.topk, s.temperature)


# ----------------------------------------------------------------------------- model and task


def clip_kwargs(config, vocab_size: int) -> dict:
    """CLIP shapes (a published model's for `model.name`) at data.image_size."""
    dims = contrastive.model_dims(config.model)
    return {**dims, "image_size": config.data.image_size, "vocab_size": dims["vocab_size"] or vocab_size,
            "dtype": jnp.dtype(config.model.dtype)}


def build_model(config, method: Method, tokenizer, class_names, adjacency: np.ndarray) -> scp.SCPNet:
    m = config.model
    visual, text = CLIP(**clip_kwargs(config, tokenizer.vocab_size)).towers()
    prompts = scp.class_prompts(tokenizer, class_names, m.ctx_init, m.n_ctx, text.context_length)
    return scp.SCPNet(visual=visual, text=text, prompt_ids=prompts, adjacency=adjacency, n_ctx=m.n_ctx,
                      scale="clip" if m.clip_scale else float(m.scale), use_gcn=method.gcn,
                      gcn_center=config.scpnet.gcn_center)


def steps_per_epoch(config, num_train: int) -> int:
    return max(1, num_train // config.batch_size)


def scpnet_task(config, model: scp.SCPNet, sources: dict, method: Method, calib: np.ndarray, **task_kwargs) -> Task:
    """A Task training `model` on sources with 'image' (raw train / normalised eval), 'labels',
    'annotations' and 'index' (see jdjax.data.multilabel), as the module docstring says."""
    s, d = config.scpnet, config.data
    train = sources["train"]
    num_train, num_classes = train.labels.shape
    per_epoch = steps_per_epoch(config, num_train)
    known_only = d.protocol == "partial"
    calib = jnp.asarray(calib, jnp.float32)
    probe = jnp.zeros((1, d.image_size, d.image_size, 3), jnp.float32)

    def init(rng):
        return model.init({"params": rng}, probe)["params"]

    def init_model_state(rng):
        state = {k: v for k, v in model.init({"params": rng}, probe).items() if k != "params"}
        # The PESSL memory bank (pseudo-label vector per training image) and the step count that
        # turns SPLC and BatchNorm's training mode on at their epochs.
        state["pessl"] = {"bank": jnp.zeros((num_train, num_classes), jnp.int8), "step": jnp.zeros((), jnp.int32)}
        return state

    def forward(params, model_state, images, bn_train, gcn_grad):
        """logits [N, C] and the new batch_stats ({} without BatchNorm). BatchNorm trains (batch
        statistics, running ones updated) when `bn_train` (a traced bool), else it runs on its running
        statistics, which stay as they are (the ResNet tower takes the traced switch; see clip_resnet).
        gcn_grad: [N, C] bool or None (SCPNet.__call__)."""
        stats = {k: v for k, v in model_state.items() if k == "batch_stats"}
        if not stats:
            return model.apply({"params": params}, images, train=True, gcn_grad=gcn_grad), {}
        logits, updates = model.apply({"params": params, **stats}, images, train=bn_train, gcn_grad=gcn_grad,
                                      mutable=["batch_stats"])
        return logits, jax.tree.map(lambda new, old: jnp.where(bn_train, new, old), dict(updates), stats)

    def loss(params, model_state, batch, rng):
        del rng  # no dropout
        step = model_state["pessl"]["step"]
        epoch = step // per_epoch
        use_splc = jnp.logical_and(method.splc, epoch >= s.splc_start_epoch)
        ann = batch["annotations"]
        views = ([batch["image"], batch["image_w"], batch["image_s"]] if method.pessl else [batch["image"]])
        gcn_grad = None
        if not s.gcn_from_unobserved:  # [R] the supervised view's unobserved entries do not train the GCN
            gcn_grad = jnp.concatenate([ann != 0] + [jnp.ones_like(ann, bool)] * (len(views) - 1))
        logits, stats = forward(params, model_state, jnp.concatenate(views), epoch >= s.bn_train_start_epoch,
                                gcn_grad)
        bank = model_state["pessl"]["bank"]
        if method.pessl:
            lb, weak, strong = jnp.split(logits, 3)
            tau = scp.class_thresholds(bank, s.hard_k)
            total, aux = scp.scpnet_loss(lb, weak, strong, ann, tau, calib, use_splc=use_splc, hard_k=s.hard_k,
                                         kappa=s.kappa, lambda_u=s.lambda_u, known_only=known_only)
            bank = scp.pessl_state_update(bank, batch["index"], aux["pseudo_labels"])
            metrics = {"sup": aux["sup"], "cst": aux["cst"], "dstl": aux["dstl"],
                       "pseudo_mask": jnp.mean(aux["mask"].astype(jnp.float32)), "tau_mean": jnp.mean(tau)}
        else:
            lb = logits
            if method.splc:
                total = scp.splc_loss(lb, ann, use_splc, s.splc_margin, s.splc_tau, s.focal_gamma, known_only)
            else:  # assume negative: plain BCE
                total = scp.splc_loss(lb, ann, False, 0.0, 1.0, 0.0, known_only)
            metrics = {"sup": total}
        new_state = {**stats, "pessl": {"bank": bank, "step": step + 1}}
        metrics["observed_positive_prob"] = jnp.sum(jax.nn.sigmoid(lb) * (ann > 0)) / jnp.maximum(jnp.sum(ann > 0), 1)
        return total, metrics, new_state

    def predict(params, model_state, batch):
        stats = {k: v for k, v in model_state.items() if k == "batch_stats"}
        logits = model.apply({"params": params, **stats}, batch["image"], train=False)  # [B, C]
        return {"logits": logits, "labels": batch["labels"], "annotations": batch["annotations"]}

    return Task(init=init, loss=loss, predict=predict, summarize=summarize, train_source=train,
                eval_sources={k: v for k, v in sources.items() if k != "train"}, init_model_state=init_model_state,
                augment=multilabel.train_view_augment(d.image_size, tuple(d.crop_scale), method.pessl),
                trainable=TRAINABLE,
                lr_multipliers=((r"^gcn/", s.gcn_lr / config.optimizer.learning_rate),), **task_kwargs)


def summarize(out: dict[str, np.ndarray]) -> dict[str, float]:
    """mAP, CF1, OF1 (jdjax.metrics.multilabel) over the split's full labels; where the split holds
    unobserved entries (annotation 0: the 'hidden' train split), `hidden_mAP` = mAP over those
    entries only (how well the model finds the positives training never saw)."""
    metrics = ml_metrics.summarize({"logits": out["logits"], "labels": out["labels"]})
    unknown = out["annotations"] == 0
    if unknown.any():
        ap = ml_metrics.average_precision(out["logits"], out["labels"], known=unknown)
        metrics["hidden_mAP"] = 100.0 * float(np.mean(ap))
    metrics["count"] = float(len(out["labels"]))
    return metrics


def transfer_task(config, method_name: str, backbone: str, data=None, relation=None, log=None) -> Task:
    """One SCPNet run: the backbone at `backbone` loaded, the prompt context reset to its "a photo of a"."""
    from jdjax.train.pretrained import make_load_pretrained

    data = data if data is not None else load_data(config.data)
    relation = relation if relation is not None else relation_matrix(config, data, backbone)
    method = METHODS[method_name]
    tokenizer = make_tokenizer(config.data, data, config.model.ctx_init)
    g, s = prior_matrices(config, relation, method)
    model = build_model(config, method, tokenizer, data.class_names, g)
    load = make_load_pretrained(backbone, exclude=None, log=log, format=_format(config, backbone)) if backbone else None

    def load_pretrained(variables):
        variables = load(variables)
        return {**variables, "params": scp.init_prompt_context(variables["params"], model.prompt_ids, model.n_ctx)}

    return scpnet_task(config, model, sources(config, data), method, s,
                       load_pretrained=load_pretrained if load is not None else None)


# ----------------------------------------------------------------------------- pretraining


def pretrain_config(config):
    """The embedded pretraining stage: a CLIP trained contrastively, every parameter, cosine schedule."""
    c = config.copy_and_resolve_references()
    p = config.pretrain
    with c.unlocked():
        c.trainable = ""
        c.init_from = ""
        c.ema_decay = 0.0
        c.batch_size = p.batch_size
        c.num_train_steps = p.num_train_steps
        c.eval_every_steps = p.eval_every_steps
        c.checkpoint.every_steps = p.eval_every_steps
        c.checkpoint.update(best_metric="val/mAP", best_mode="max")
        c.optimizer.update(name="adamw", schedule="cosine", schedule_steps=0, learning_rate=p.learning_rate,
                           weight_decay=p.weight_decay, warmup_steps=p.num_train_steps // 10, b1=0.9)
    return c


def pretrain_task(model: CLIP, data: multilabel.MultiLabelData, tokenizer, image_size: int, prompts) -> Task:
    """CLIP trained with the symmetric InfoNCE on (scene, caption) pairs of the 'pretrain' split (each
    caption names a random subset of the scene's salient objects, `multilabel.subset_captions`);
    validation: zero-shot mAP of the class prompts on the val scenes (BatchNorm statistics carried)."""
    pre, val = data.splits["pretrain"], data.splits["val"]
    captions = multilabel.subset_captions(pre.salient, data.class_names)  # faint objects go unmentioned
    train = ArraySource({"image": clip_normalize(pre.images), "text": tokenizer(captions, model.context_length)})
    val_source = multilabel.MultiLabelSource(val.images, val.labels, multilabel.full_annotations(val.labels),
                                             image_size)
    prompts = jnp.asarray(prompts)
    probe = (jnp.zeros((1, image_size, image_size, 3), jnp.float32), prompts[:1])

    def init(rng):
        return model.init({"params": rng}, *probe)["params"]

    def init_model_state(rng):
        return {k: v for k, v in model.init({"params": rng}, *probe).items() if k != "params"}

    def loss(params, model_state, batch, rng):
        out, updates = model.apply({"params": params, **model_state}, batch["image"], batch["text"], train=True,
                                   mutable=list(model_state))
        logits = contrastive.clip_logits(out["image_embeds"], out["text_embeds"], out["logit_scale"])
        r1 = jnp.mean(jnp.argmax(logits, 1) == jnp.arange(logits.shape[0]))
        return contrastive.contrastive_loss(logits), {"image_to_text_r1": r1}, dict(updates)

    def predict(params, model_state, batch):
        variables = {"params": params, **model_state}
        image = l2_normalize(model.apply(variables, batch["image"], method=CLIP.encode_image))
        classes = l2_normalize(model.apply(variables, prompts, method=CLIP.encode_text))
        return {"logits": image @ classes.T, "labels": batch["labels"], "annotations": batch["annotations"]}

    return Task(init=init, loss=loss, predict=predict, summarize=summarize, train_source=train,
                eval_sources={"val": val_source}, init_model_state=init_model_state)


def pretrain_job(config, data) -> sweep.Job:
    from jdjax.train.loop import train_and_evaluate

    c = pretrain_config(config)

    def run(workdir: str) -> dict:
        tokenizer = make_tokenizer(c.data, data, c.model.ctx_init)
        model = CLIP(**clip_kwargs(c, tokenizer.vocab_size))
        prompts = scp.class_prompts(tokenizer, data.class_names, c.model.ctx_init, c.model.n_ctx, model.context_length)
        return train_and_evaluate(c, workdir, pretrain_task(model, data, tokenizer, c.data.image_size, prompts))

    return sweep.Job("pretrain", run)


def export_backbone(config, data, workdir: str, results: dict) -> str:
    """The val-selected CLIP of the pretraining run (weights and BatchNorm statistics) as workdir/backbone."""
    from jdjax.nn import convert
    from jdjax.train.checkpoint import read_state

    backbone = os.path.join(workdir, "backbone")
    if is_main_process() and not (as_path(backbone) / convert.MODEL_JSON).exists():
        state = read_state(workdir, kind="best")
        kwargs = clip_kwargs(config, make_tokenizer(config.data, data, config.model.ctx_init).vocab_size)
        kwargs.pop("dtype")
        convert.save_converted(
            convert.Converted(state["params"], "CLIP", kwargs, source_format="jdjax",
                              batch_stats=state["model_state"].get("batch_stats")),
            backbone, overwrite=True,
            source=f"{workdir} (val-selected step {results['selected_step']}, zero-shot val mAP "
                   f"{results['val/mAP']:.2f})",
        )
    return backbone


def pretrained_backbone(config, data, workdir: str, desc: str) -> str:
    """Runs (or reuses) the pretraining stage in workdir/pretrain and returns the exported backbone's
    directory; a pretraining that does not complete is a SystemExit naming its status (rerun resumes)."""
    pre = sweep.run_sweep(workdir, [pretrain_job(config, data)], desc=desc)
    if pre.status != sweep.COMPLETED:
        raise SystemExit(f"{desc}: pretraining {pre.status} {pre.failed or ''}; rerun to resume.")
    return export_backbone(config, data, os.path.join(workdir, "pretrain"), pre.results["pretrain"])


# ----------------------------------------------------------------------------- comparison and entry


def comparison(config, results: dict[str, dict]) -> list[dict]:
    rows = []
    for name in sweep.run_names(config.method):
        r = results[name]
        rows.append({"run": name, "selected_step": r.get("selected_step"), "selected_weights": r.get("selected_weights"),
                     "trainable_params": r.get("trainable_params"),
                     **{f"{split}/{k}": r.get(f"{split}/{k}") for split in ("val", "test", "hidden", "faint")
                        for k in ("mAP", "CF1", "OF1", "hidden_mAP")}})
    return rows


def format_table(config, rows: list[dict]) -> str:
    def num(v):
        return "-" if v is None else f"{v:.1f}"

    d = config.data
    protocol = "a single positive label per image" if d.protocol == "single_positive" else (
        f"{100 * d.known_proportion:.0f} % of the labels known")
    faint = d.name == "shape_scenes" and d.faint > 0
    lines = ["| run | test mAP | test CF1 | test OF1 | hidden-label mAP |" + (" faint-object mAP |" if faint else "")
             + " val mAP | weights | step |", "|" + "---|" * (9 if faint else 8)]
    for r in rows:
        lines.append(f"| {r['run']} | {num(r['test/mAP'])} | {num(r['test/CF1'])} | {num(r['test/OF1'])} "
                     f"| {num(r['hidden/hidden_mAP'])} |" + (f" {num(r['faint/hidden_mAP'])} |" if faint else "")
                     + f" {num(r['val/mAP'])} | {r['selected_weights']} | {r['selected_step']} |")
    return "\n".join(lines) + (
        f"\n\nTrained with {protocol}; evaluated with full labels. mAP, CF1, OF1 in % on test, of the weights "
        "(raw or EMA) and step chosen on val mAP. hidden-label mAP (generated data): mAP over the training labels "
        "the run never saw (the train images' unobserved entries, ranked by the chosen model)."
        + (" faint-object mAP: mAP of the faint test objects ranked against the absent classes (the salient "
           "objects left out)." if faint else "") + "\n")


def run(config, workdir: str) -> dict:
    """Pretrains if needed, writes relation.npy, trains every method, writes and prints the comparison."""
    from jdjax.train.loop import train_and_evaluate

    data = load_data(config.data)
    names = sweep.run_names(config.method)
    log = print if is_main_process() else None

    def jobs(backbone: str) -> list[sweep.Job]:
        relation = relation_matrix(config, data, backbone)
        if is_main_process():
            np.save(os.path.join(workdir, "relation.npy"), relation)
        return [sweep.Job(name, lambda wd, n=name: train_and_evaluate(
            loop_config(config, data), wd, transfer_task(config, n, backbone, data, relation, log=log)))
            for name in names]

    os.makedirs(workdir, exist_ok=True)
    out = sweep.run_from_backbone(workdir, config.init_from, pretrain_job(config, data),
                                  lambda d, r: export_backbone(config, data, d, r), jobs, desc="scpnet")
    if out.status != sweep.COMPLETED:
        return {"status": out.status, "failed": out.failed}
    rows = comparison(config, out.results)
    sweep.write_comparison(workdir, rows, format_table(config, rows))
    return {"status": "completed", "runs": rows}


def loop_config(config, data=None):
    """The config a method run hands to the loop: steps, schedule length, evals and the EMA decay
    follow from the epochs and the training-set size (one eval and checkpoint per epoch)."""
    s = config.scpnet
    if data is not None:
        num_train = len(data.splits["train"])
    else:  # before the data is read (config checks): the generated size, else one step per epoch
        num_train = config.data.num_train if config.data.name == "shape_scenes" else config.batch_size
    per_epoch = steps_per_epoch(config, num_train)
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.num_train_steps = s.epochs * per_epoch
        c.optimizer.schedule_steps = s.total_epochs * per_epoch
        c.eval_every_steps = per_epoch * s.eval_every_epochs
        c.checkpoint.every_steps = c.eval_every_steps
        c.ema_decay = s.ema_epoch_decay ** (1.0 / per_epoch) if s.ema_epoch_decay else 0.0
    return c


def loop_configs(config) -> list:
    """The method runs' config and, without init_from, the pretraining stage's."""
    runs = loop_config(config)
    return [runs] if config.init_from else [runs, pretrain_config(config)]


# ----------------------------------------------------------------------------- validation


def validate(config) -> list[str]:
    errors = sweep.run_name_errors("method", config.method, sorted(METHODS))
    d, s, m = config.data, config.scpnet, config.model
    if d.name != "shape_scenes" and d.name not in multilabel.READERS:
        errors.append(f"data.name={d.name!r}: use 'shape_scenes' (generated) or one of {sorted(multilabel.READERS)}.")
    if d.name in multilabel.READERS:
        if not d.data_dir:
            errors.append(f"data.name={d.name!r} reads a local copy: set --config.data.data_dir.")
        if not config.init_from:
            errors.append(f"data.name={d.name!r} needs a pretrained CLIP: set --config.init_from (e.g. OpenAI's "
                          "RN50.pt with --config.init_format=openai_clip).")
        if not d.bpe_path:
            errors.append("real class names need CLIP's BPE vocabulary: set --config.data.bpe_path.")
        if s.relation == "cooccurrence":
            errors.append("scpnet.relation='cooccurrence' needs the generated data's fully labelled 'pretrain' "
                          "split; use 'clip_text' or the official relation .npy file.")
    if s.relation not in RELATIONS and not os.path.isfile(s.relation):
        errors.append(f"scpnet.relation={s.relation!r} must be one of {RELATIONS} or an existing .npy file.")
    if not 0 <= d.faint < 1:
        errors.append(f"data.faint={d.faint} must be a probability in [0, 1) (the share of faint generated objects).")
    if d.protocol not in ("single_positive", "partial"):
        errors.append(f"data.protocol={d.protocol!r} must be 'single_positive' or 'partial'.")
    if d.protocol == "partial" and not 0 < d.known_proportion <= 1:
        errors.append(f"data.known_proportion={d.known_proportion} must be in (0, 1].")
    if m.scale <= 0:
        errors.append(f"model.scale={m.scale} must be positive.")
    if not 1 <= s.topk:
        errors.append(f"scpnet.topk={s.topk} must be >= 1.")
    if d.name == "shape_scenes" and s.topk > d.num_classes:
        errors.append(f"scpnet.topk={s.topk} exceeds the {d.num_classes} classes.")
    if s.temperature <= 0 or not 0 <= s.reweight_p < 1:
        errors.append("scpnet.temperature must be > 0 and scpnet.reweight_p in [0, 1).")
    if s.epochs < 1 or s.total_epochs < s.epochs:
        errors.append(f"scpnet.epochs={s.epochs} must be >= 1 and <= scpnet.total_epochs={s.total_epochs}.")
    if not 0 <= s.ema_epoch_decay < 1:
        errors.append(f"scpnet.ema_epoch_decay={s.ema_epoch_decay} must be in [0, 1) (0 = no EMA).")
    if len(tuple(d.crop_scale)) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        errors.append(f"data.crop_scale={tuple(d.crop_scale)} must be (low, high) with 0 < low <= high <= 1.")
    try:
        dims = contrastive.model_dims(m)
    except ValueError as e:
        return errors + [str(e)]
    if m.name and not config.init_from:
        errors.append(f"model.name={m.name!r} needs pretrained weights: set --config.init_from.")
    if isinstance(dims["vision_layers"], (tuple, list)):
        if d.image_size % 32:
            errors.append(f"data.image_size={d.image_size}: CLIP's ResNet tower downsamples by 32; use a multiple "
                          "of 32.")
    elif d.image_size % dims["patch_size"]:
        errors.append(f"data.image_size={d.image_size} is not divisible by the patch size {dims['patch_size']}.")
    if d.bpe_path and not os.path.isfile(d.bpe_path):
        errors.append(f"data.bpe_path={d.bpe_path!r} does not exist.")
    if config.checkpoint.best_metric not in ("val/mAP", "val/CF1", "val/OF1"):
        errors.append(f"checkpoint.best_metric={config.checkpoint.best_metric!r}: use 'val/mAP' (or val/CF1, val/OF1).")
    return errors
