"""PYRA end to end: dense LoRA, ToMe + LoRA and PYRA transfer runs on one backbone, and their comparison.

Spec `vision_token_merging.md` §3. Workdir layout (every stage resumes; a finished one is skipped):

    pretrain/                 only without `init_from`: a dense ViT fully trained on
                              `config.pretrain.data`; pretrain/backbone holds its val-selected
                              parameters in the converter's format (nn.convert.save_converted).
    lora/  tome-low/  pyra-high/ ...
                              one transfer run per (method, compression): frozen backbone,
                              trainable LoRA on qkv + PYRA weights + new head (train.loop).
    comparison.md, comparison.json
                              accuracy of the val-selected checkpoint (val and test), analytic
                              GMACs, trainable parameters and the final token count per run.

Each stage is a job of the sweep runner (`jdjax.train.sweep`: results.json with a status per
run directory). Speed is measured by `python -m benchmarks.pyra_accuracy` (the same models,
interleaved, in one run) and `python -m benchmarks.pyra` (ViT-B/16), not inside training.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from jdjax.data import images
from jdjax.io import as_path
from jdjax.merging import flops, schedules
from jdjax.nn.lora import LoRAConfig, lora_trainable_pattern
from jdjax.nn.vit import MergeConfig, ViT, vit_config
from jdjax.tasks.classification import classification_task, data_errors, image_splits
from jdjax.train import sweep
from jdjax.train.logging import is_main_process
from jdjax.train.task import Task

METHODS = ("lora", "tome", "pyra")
COMPRESSIONS = ("low", "high")
# LoRA, PYRA weights and the classifier head; everything else is frozen (no optimizer state).
TRAINABLE = lora_trainable_pattern(("head", "pyra"))
PYRA_PARAMS = r"(^|/)pyra_"



def runs(config) -> list[tuple[str, str]]:
    """The (method, compression) pairs to train, in order; dense 'lora' has compression 'dense'."""
    methods = sweep.run_names(config.method)
    out = [("lora", "dense")] if "lora" in methods else []
    for compression in sweep.run_names(config.compression):
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
    merge_r = [] if method == "lora" else merge_schedule(config, compression)
    return ViT(
        num_classes=num_classes, **model_dims(m), image_size=config.data.image_size,
        dropout=m.dropout, drop_path=m.drop_path, dtype=jnp.dtype(m.dtype), remat=m.remat,
        remat_policy=m.remat_policy,
        lora=LoRAConfig(rank=m.lora_rank, dropout=m.lora_dropout) if lora else LoRAConfig(),
        merge=MergeConfig(r=merge_r, mode="pyra" if method == "pyra" else "tome", prop_attn=True),
    )


def merge_schedule(config, compression: str) -> list[int]:
    """r per layer of `compression`: `config.schedules[compression]`, or when that is empty the
    paper's schedule for `model.name` (jdjax.merging.schedules.PAPER_SCHEDULES)."""
    schedule = list(config.schedules[compression])
    if schedule or not config.model.name:
        return schedule
    key = (config.model.name, compression)
    if key not in schedules.PAPER_SCHEDULES:
        raise ValueError(f"no paper schedule for model.name={config.model.name!r}; set --config.schedules.{compression}.")
    return list(schedules.PAPER_SCHEDULES[key])


def lr_multipliers(config) -> tuple:
    """PYRA's own learning rate as a multiplier of the base one (none when it equals the base)."""
    if config.pyra_learning_rate <= 0:
        return ()
    return ((PYRA_PARAMS, config.pyra_learning_rate / config.optimizer.learning_rate),)


def transfer_task(config, method: str, compression: str, backbone: str, log=None) -> Task:
    """One transfer run: the backbone at `backbone` loaded into a ViT with LoRA (+ merging), head fresh."""
    from jdjax.train.pretrained import make_load_pretrained

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


def pretrain_job(config) -> sweep.Job:
    """The embedded backbone: a dense ViT fully trained on `config.pretrain.data` (job 'pretrain')."""
    from jdjax.train.loop import train_and_evaluate

    c = pretrain_config(config)

    def run(workdir: str) -> dict:
        model = build_model(c, "lora", "dense", c.data.num_classes, lora=False)
        task = classification_task(
            model, image_splits(c.data), c.data.image_size,
            augment=images.random_shift(c.data.augment_shift) if c.data.augment_shift else None,
        )
        return train_and_evaluate(c, workdir, task)

    return sweep.Job("pretrain", run)


def export_backbone(config, workdir: str, results: dict) -> str:
    """The val-selected parameters of the pretraining run in `workdir`, saved (once) in the
    converter's format as workdir/backbone; returns that directory."""
    from jdjax.nn import convert
    from jdjax.train.checkpoint import read_state

    backbone = os.path.join(workdir, "backbone")
    if is_main_process() and not (as_path(backbone) / convert.MODEL_JSON).exists():
        c = pretrain_config(config)
        params = read_state(workdir, kind="best")["params"]
        kwargs = dict(num_classes=c.data.num_classes, image_size=c.data.image_size, **model_dims(c.model))
        convert.save_converted(
            convert.Converted(params, "ViT", kwargs, source_format="jdjax"), backbone, overwrite=True,
            source=f"{workdir} (val-selected step {results['selected_step']}, val accuracy {results['val/accuracy']:.4f})",
        )
    return backbone


# ----------------------------------------------------------------------------- comparison


def comparison(config, results: dict[str, dict]) -> list[dict]:
    """One row per run: accuracy (val, and test of the val-selected checkpoint), GMACs, trainable
    params, final tokens."""
    rows = []
    for m, c in runs(config):
        name = run_name(m, c)
        model = build_model(config, m, c, config.data.num_classes)
        r = results[name]
        rows.append({
            "run": name,
            "val_accuracy": r.get("val/accuracy"),
            "test_accuracy": r.get("test/accuracy"),
            "gmacs": flops.count_model(model).gmacs,
            "trainable_params": r["trainable_params"],
            "final_tokens": model.token_counts()[-1],
            "selected_step": r.get("selected_step"),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    lines = [
        "| run | val acc % | test acc % | GMACs | trainable | tokens out |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {pct(r['val_accuracy'])} | {pct(r['test_accuracy'])} "
            f"| {r['gmacs']:.4g} | {r['trainable_params']:,} | {r['final_tokens']} |"
        )
    return "\n".join(lines) + ("\n\nAccuracy: checkpoint chosen on val, then evaluated on test. GMACs per image "
                               "(analytic). Speed: python -m benchmarks.pyra_accuracy.\n")


# ----------------------------------------------------------------------------- entry point


def transfer_job(config, method: str, compression: str, backbone: str) -> sweep.Job:
    from jdjax.train.loop import train_and_evaluate

    log = print if is_main_process() else None
    return sweep.Job(run_name(method, compression), lambda workdir: train_and_evaluate(
        config, workdir, transfer_task(config, method, compression, backbone, log=log)))


def run(config, workdir: str) -> dict:
    """Pretrains if needed, trains every (method, compression) run, writes and prints the comparison."""
    out = sweep.run_from_backbone(
        workdir, config.init_from, pretrain_job(config), lambda d, r: export_backbone(config, d, r),
        lambda backbone: [transfer_job(config, m, c, backbone) for m, c in runs(config)], desc="pyra")
    if out.status != sweep.COMPLETED:
        return {"status": out.status, "failed": out.failed}
    rows = comparison(config, out.results)
    sweep.write_comparison(workdir, rows, format_table(rows))
    return {"status": "completed", "runs": rows}


def loop_configs(config) -> list:
    """The transfer runs' config and, without init_from, the pretraining stage's."""
    return [config] if config.init_from else [config, pretrain_config(config)]


# ----------------------------------------------------------------------------- validation


def validate(config) -> list[str]:
    errors = sweep.run_name_errors("method", config.method, METHODS)
    for compression in sweep.run_names(config.compression) or [""]:
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
            errors += schedule_errors(merge_schedule(config, compression), n0, dims["depth"], compression)
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
