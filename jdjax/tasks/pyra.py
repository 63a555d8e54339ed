"""PYRA end to end: dense LoRA, ToMe + LoRA and PYRA transfer runs on one backbone, and their comparison.

Spec `vision_token_merging.md` §3. Workdir layout (every stage resumes; a finished one is skipped):

    pretrain/                 only without `init_from`: a dense ViT fully trained on
                              `config.pretrain.data`; pretrain/backbone holds its val-selected
                              parameters in the converter's format (tools.convert.save_converted).
    lora/  tome-low/  pyra-high/ ...
                              one transfer run per (method, compression): frozen backbone,
                              trainable LoRA on qkv + PYRA weights + new head (train.loop).
    comparison.md, comparison.json
                              accuracy of the val-selected checkpoint (val and test), inference
                              images/s measured here in one interleaved run, analytic GMACs,
                              trainable parameters and the final token count per run.
"""

from __future__ import annotations

import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from jdjax.data import images
from jdjax.merging import flops, schedules
from jdjax.nn.lora import lora_trainable_pattern
from jdjax.nn.vit import ViT, vit_config
from jdjax.train.task import Task
from jdjax.tasks.classification import classification_task, data_errors, image_splits
from jdjax.timing import time_call
from jdjax.train.logging import is_main_process

METHODS = ("lora", "tome", "pyra")
COMPRESSIONS = ("low", "high")
# LoRA, PYRA weights and the classifier head; everything else is frozen (no optimizer state).
TRAINABLE = lora_trainable_pattern(("head", "pyra"))
PYRA_PARAMS = r"(^|/)pyra_"


def _words(value: str) -> list[str]:
    return [w.strip() for w in str(value).split(",") if w.strip()]


def runs(config) -> list[tuple[str, str]]:
    """The (method, compression) pairs to train, in order; dense 'lora' has compression 'dense'."""
    methods = _words(config.method)
    out = [("lora", "dense")] if "lora" in methods else []
    for compression in _words(config.compression):
        out += [(m, compression) for m in methods if m != "lora"]
    return out


def run_name(method: str, compression: str) -> str:
    return method if method == "lora" else f"{method}-{compression}"


def model_dims(model_cfg) -> dict:
    """patch_size, width, depth, num_heads, mlp_dim: from a ViT name ('B/16') or the config's numbers."""
    if model_cfg.name:
        return vit_config(model_cfg.name)
    return {k: model_cfg[k] for k in ("patch_size", "width", "depth", "num_heads", "mlp_dim")}


def build_model(config, method: str, compression: str, num_classes: int, lora: bool = True) -> ViT:
    """The ViT of one run: LoRA (rank model.lora_rank), and for tome/pyra the compression's schedule."""
    m = config.model
    merge_r = [] if method == "lora" else list(config.schedules[compression])
    return ViT(
        num_classes=num_classes, **model_dims(m), image_size=config.data.image_size,
        dropout=m.dropout, drop_path=m.drop_path, dtype=jnp.dtype(m.dtype),
        lora_rank=m.lora_rank if lora else 0, lora_dropout=m.lora_dropout,
        merge_r=merge_r, merge_mode="pyra" if method == "pyra" else "tome", prop_attn=True,
    )


def lr_multipliers(config) -> tuple:
    """PYRA's own learning rate as a multiplier of the base one (none when it equals the base)."""
    if config.pyra_learning_rate <= 0:
        return ()
    return ((PYRA_PARAMS, config.pyra_learning_rate / config.optimizer.learning_rate),)


def transfer_task(config, method: str, compression: str, backbone: str, log=None) -> Task:
    """One transfer run: the backbone at `backbone` loaded into a ViT with LoRA (+ merging), head fresh."""
    from jdjax.tools.convert import make_load_pretrained

    model = build_model(config, method, compression, config.data.num_classes)
    return classification_task(
        model, image_splits(config.data), config.data.image_size, trainable=TRAINABLE,
        lr_multipliers=lr_multipliers(config), load_pretrained=make_load_pretrained(backbone, exclude=r"^head/", log=log),
        augment=images.random_shift(config.data.augment_shift) if config.data.augment_shift else None,
    )


def build(config) -> Task:
    """The first transfer run of `config` from `config.init_from` (the loop's entry; `run` does them all)."""
    method, compression = runs(config)[0]
    return transfer_task(config, method, compression, config.init_from)


# ----------------------------------------------------------------------------- pretraining


def pretrain_config(config):
    """The config of the embedded pretraining stage: dense ViT, every parameter trained."""
    c = config.copy_and_resolve_references()
    p = config.pretrain
    with c.unlocked():
        c.data = p.data
        c.trainable = ""
        c.init_from = ""
        c.batch_size = p.batch_size
        c.num_train_steps = p.num_train_steps
        c.eval_every_steps = p.eval_every_steps
        c.checkpoint.every_steps = p.eval_every_steps
        c.optimizer.update(learning_rate=p.learning_rate, weight_decay=p.weight_decay)
    return c


def pretrain(config, workdir: str) -> str:
    """Trains (or resumes, or reuses) the embedded backbone; returns its converted directory."""
    from jdjax.tools import convert
    from jdjax.train.checkpoint import read_state
    from jdjax.train.loop import train_and_evaluate

    backbone = os.path.join(workdir, "backbone")
    if os.path.exists(os.path.join(backbone, convert.MODEL_JSON)):
        return backbone
    c = pretrain_config(config)
    model = build_model(c, "lora", "dense", c.data.num_classes, lora=False)
    task = classification_task(
        model, image_splits(c.data), c.data.image_size,
        augment=images.random_shift(c.data.augment_shift) if c.data.augment_shift else None,
    )
    results = train_and_evaluate(c, workdir, task)
    if results["status"] != "completed":
        raise Interrupted(workdir)
    if is_main_process():
        params = read_state(workdir, kind="best")["params"]
        kwargs = dict(num_classes=c.data.num_classes, image_size=c.data.image_size, **model_dims(c.model))
        convert.save_converted(
            convert.Converted(params, "ViT", kwargs, source_format="jdjax"), backbone, overwrite=True,
            source=f"{workdir} (val-selected step {results['selected_step']}, val accuracy {results['val/accuracy']:.4f})",
        )
    _sync("pretrain_exported")
    return backbone


class Interrupted(Exception):
    """A stage stopped early (SIGTERM); rerunning the same command resumes it."""


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- comparison


def measure_throughput(models: dict[str, ViT], image_size: int, batch: int, rounds: int = 3) -> dict[str, float]:
    """Inference images/s of each model (random weights, jit, float32) at `batch`, measured in
    interleaved rounds (median of per-round medians) so load drift hits every model alike."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, image_size, image_size, 3)), jnp.float32)
    fns = {}
    for name, model in models.items():
        params = model.init(jax.random.key(0), x[:1])["params"]
        params = jax.tree.map(lambda p: p + 0.01, params)  # non-zero PYRA W_D: no constant shortcut
        apply = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
        fns[name] = lambda apply=apply, params=params: jax.block_until_ready(apply(params, x))
        fns[name]()  # compile
    medians = {name: [] for name in models}
    for _ in range(rounds):
        for name, fn in fns.items():
            medians[name].append(time_call(fn, warmup=1, repeats=3)["median_s"])
    return {name: batch / statistics.median(times) for name, times in medians.items()}


def comparison(config, results: dict[str, dict], batch: int) -> list[dict]:
    """One row per run: accuracy, images/s and speed-up over dense LoRA, GMACs, trainable params, tokens."""
    models = {run_name(m, c): build_model(config, m, c, config.data.num_classes) for m, c in runs(config)}
    speed = measure_throughput(models, config.data.image_size, batch)
    dense = speed.get("lora")
    rows = []
    for name, model in models.items():
        r = results[name]
        macs = flops.count_model(model)
        tokens = model.token_counts()
        rows.append({
            "run": name,
            "val_accuracy": r.get("val/accuracy"),
            "test_accuracy": r.get("test/accuracy"),
            "images_per_s": speed[name],
            "speedup": speed[name] / dense if dense else None,
            "gmacs": macs.gmacs,
            "trainable_params": r["trainable_params"],
            "final_tokens": tokens[-1],
            "selected_step": r.get("selected_step"),
        })
    return rows


def format_table(rows: list[dict], batch_note: str) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    lines = [
        "| run | val acc % | test acc % | images/s | speed-up | GMACs | trainable | tokens out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(
            f"| {r['run']} | {pct(r['val_accuracy'])} | {pct(r['test_accuracy'])} | {r['images_per_s']:.0f} | {speedup} "
            f"| {r['gmacs']:.4g} | {r['trainable_params']:,} | {r['final_tokens']} |"
        )
    return "\n".join(lines) + f"\n\nAccuracy: checkpoint chosen on val, then evaluated on test. {batch_note}\n"


# ----------------------------------------------------------------------------- entry point


def run(config, workdir: str) -> dict:
    """Pretrains if needed, trains every (method, compression) run, writes and prints the comparison."""
    from jdjax.train.loop import completed_results, train_and_evaluate

    os.makedirs(workdir, exist_ok=True)
    main = is_main_process()
    log = print if main else (lambda *_: None)
    try:
        backbone = config.init_from or pretrain(config, os.path.join(workdir, "pretrain"))
        results = {}
        for method, compression in runs(config):
            name = run_name(method, compression)
            sub = os.path.join(workdir, name)
            done = completed_results(sub)
            if done is None:
                log(f"[jdjax] pyra: {name} from {backbone}")
                done = train_and_evaluate(config, sub, transfer_task(config, method, compression, backbone, log=log))
                if done["status"] != "completed":
                    raise Interrupted(sub)
            results[name] = done
    except Interrupted as stopped:
        log(f"[jdjax] pyra: stopped in {stopped}; rerun the same command to resume.")
        return {"status": "preempted"}
    batch = min(int(config.eval_batch_size), 64)
    rows = comparison(config, results, batch)
    table = format_table(rows, f"images/s: inference at batch {batch} on {jax.devices()[0].platform}, "
                                f"{config.data.image_size}px, measured in this run; GMACs per image (analytic).")
    if main:
        with open(os.path.join(workdir, "comparison.md"), "w") as f:
            f.write(table)
        with open(os.path.join(workdir, "comparison.json"), "w") as f:
            json.dump(rows, f, indent=2)
        print("\n" + table, flush=True)
    return {"status": "completed", "runs": rows}


# ----------------------------------------------------------------------------- validation


def validate(config) -> list[str]:
    errors = []
    for method in _words(config.method) or [""]:
        if method not in METHODS:
            errors.append(f"method={config.method!r}: each of its comma-separated words must be one of {METHODS}.")
    for compression in _words(config.compression) or [""]:
        if compression not in COMPRESSIONS:
            errors.append(f"compression={config.compression!r}: use 'low', 'high' or 'low,high'.")
    try:
        dims = model_dims(config.model)
    except ValueError as e:
        return errors + [str(e)]
    if dims["width"] % dims["num_heads"]:
        errors.append(f"model width {dims['width']} is not divisible by num_heads {dims['num_heads']}.")
    if config.data.image_size % dims["patch_size"]:
        errors.append(f"data.image_size={config.data.image_size} is not divisible by the patch size {dims['patch_size']}.")
    if not config.init_from and config.model.name:
        errors.append(
            f"model.name={config.model.name!r} needs a pretrained backbone: set --config.init_from to a Google ViT "
            ".npz (e.g. imagenet21k_ViT-B_16.npz) or a directory written by `python -m jdjax.tools.convert`."
        )
    errors += data_errors(config.data)
    if not config.init_from:
        errors += data_errors(config.pretrain.data, "pretrain.data")
    if config.model.lora_rank <= 0:
        errors.append("model.lora_rank must be positive (every method here trains LoRA on qkv).")
    if config.pyra_learning_rate < 0:
        errors.append(f"pyra_learning_rate must be >= 0 (0: the base rate), got {config.pyra_learning_rate}.")
    if not errors and config.data.image_size % dims["patch_size"] == 0:
        n0 = 1 + (config.data.image_size // dims["patch_size"]) ** 2
        for compression in COMPRESSIONS:
            errors += schedule_errors(list(config.schedules[compression]), n0, dims["depth"], compression)
    return errors


def schedule_errors(schedule: list[int], num_tokens: int, depth: int, name: str) -> list[str]:
    """PYRA has one W_r row per merged pair, so a schedule must fit the depth and never hit the 50% clamp."""
    if len(schedule) > depth:
        return [f"schedules.{name} has {len(schedule)} entries for a {depth}-layer model."]
    try:
        clamped = schedules.clamp_schedule(schedule, num_tokens)
    except ValueError as e:
        return [f"schedules.{name}: {e}"]
    if list(clamped) != list(schedule):
        return [f"schedules.{name}={schedule} hits the 50% clamp with {num_tokens} tokens (it would merge {clamped}); "
                "PYRA needs r_l <= (N_l - 1) // 2 in every layer."]
    return []
