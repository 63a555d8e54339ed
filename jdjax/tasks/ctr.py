"""CTR prediction with user-behaviour models (KFAtt and its baselines) on the generic loop.

    python -m jdjax.main --config=configs/kfatt.py:smoke                 # one model
    python -m jdjax.tasks.ctr --config=configs/kfatt.py --workdir=runs/kfatt-compare   # model set x seeds

Loss: logloss (sigmoid cross-entropy). `predict` returns per-example probabilities, labels, user
ids and slice flags; `summarize` computes AUC, gAUC (grouped by raw user id, never by the
encoded id, which maps every unseen user to the one OOV row) and logloss over the split and
per slice ('new', 'repeat', 'infreq'). The vocabularies are built once over the whole training
split (or loaded from `data.feature_map`) and written to `<workdir>/feature_map.json`.

The comparison command (`compare`) trains every model of `compare.models` with every seed of
`compare.seeds` (the data set stays fixed: `data.seed`), each in `<workdir>/<model>/seed<k>`
(rerunning skips finished runs and resumes unfinished ones), and writes compare.md and
compare.json: mean and standard deviation over seeds of the test metrics of the checkpoint
selected on validation AUC, with RelaImpr against the first model.
"""

from __future__ import annotations

import copy
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdjax.data.pipeline import ArraySource
from jdjax.metrics import ctr as ctr_metrics
from jdjax.models.din import MODELS, BehaviourCTR
from jdjax.nn.ctr.features import FeatureMap
from jdjax.tasks.base import Task
from jdjax.train import sharding as shd

SLICES = ("new", "repeat", "infreq")
DATA_SOURCES = ("clicklog", "amazon")
REPORTED = ("auc", "gauc", "logloss", "new/auc", "repeat/auc", "infreq/auc")


def load_splits(data_cfg) -> tuple[tuple, dict]:
    """(feature declarations, {'train', 'val', 'test'} -> raw arrays) for `data_cfg.name`."""
    if data_cfg.name == "clicklog":
        from jdjax.data import clicklog

        splits = clicklog.generate(data_cfg.size, seed=data_cfg.seed, split=data_cfg.split)
        maxlen = splits["train"]["hist_item"].shape[1]
        return clicklog.features(data_cfg.embedding_dim, maxlen), splits
    if data_cfg.name == "amazon":
        from jdjax.data import amazon

        splits = amazon.load(data_cfg.data_dir, maxlen=data_cfg.maxlen, seed=data_cfg.seed)
        return amazon.features(data_cfg.embedding_dim, data_cfg.maxlen), splits
    raise ValueError(f"data.name must be one of {DATA_SOURCES}, got {data_cfg.name!r}.")


def encode_split(fmap: FeatureMap, raw: dict) -> ArraySource:
    """Model inputs plus what the metrics need: label, group (raw user id as int32) and slice flags."""
    names = [f.name for f in fmap.features]
    enc = fmap.encode({k: raw[k] for k in names})
    _, group = np.unique(raw["user"], return_inverse=True)
    arrays = {k: enc[k] for k in names}
    arrays["label"] = raw["label"].astype(np.float32)
    arrays["group"] = group.reshape(-1).astype(np.int32)
    for s in SLICES:
        if s in raw:
            arrays[s] = raw[s].astype(bool)
    return ArraySource(arrays)


def build_model(model_cfg, fmap: FeatureMap) -> BehaviourCTR:
    return BehaviourCTR(
        features=fmap.features,
        tables=fmap.tables(),
        model=model_cfg.name,
        mlp_hidden=tuple(model_cfg.mlp_hidden),
        activation=model_cfg.activation,
        dropout=model_cfg.dropout,
        din_hidden=tuple(model_cfg.din_hidden),
        num_heads=model_cfg.num_heads,
        head_dim=model_cfg.head_dim,
        prior_hidden=model_cfg.prior_hidden,
        prior=model_cfg.prior,
        row_multiple=model_cfg.table_row_multiple,
        dtype=jnp.dtype(model_cfg.dtype),
    )


def summarize(out: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC, gAUC, logloss and counts over the split, and AUC/logloss/count per slice present."""
    y, p = out["label"], out["prob"]
    metrics = {
        "auc": ctr_metrics.auc(y, p),
        "gauc": ctr_metrics.gauc(y, p, out["group"]),
        "logloss": ctr_metrics.logloss(y, p),
        "ctr": float(np.mean(y)) if len(y) else float("nan"),
        "count": float(len(y)),
    }
    for s in SLICES:
        if s in out:
            sel = out[s].astype(bool)
            metrics.update({f"{s}/auc": ctr_metrics.auc(y[sel], p[sel]), f"{s}/logloss": ctr_metrics.logloss(y[sel], p[sel]),
                            f"{s}/count": float(sel.sum())})
    return metrics


def ctr_task(model, fmap: FeatureMap, sources: dict, **task_kwargs) -> Task:
    """A Task for a module mapping an encoded batch to (logits [B], aux) (`train` kwarg, dropout rng)."""
    sample = sources["train"].get_batch(np.arange(2))

    def init(rng):
        return model.init({"params": rng}, {k: jnp.asarray(v) for k, v in sample.items()})["params"]

    def loss(params, batch, rng):
        logits, _ = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
        return optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean(), {}

    def predict(params, batch):
        logits, _ = model.apply({"params": params}, batch, train=False)  # [B]
        out = {"prob": jax.nn.sigmoid(logits), "label": batch["label"], "group": batch["group"]}
        out.update({s: batch[s] for s in SLICES if s in batch})
        return out

    def report(workdir, results):
        fmap.save(os.path.join(workdir, "feature_map.json"))

    return Task(
        init=init, loss=loss, predict=predict, summarize=summarize, train_source=sources["train"],
        eval_sources={k: v for k, v in sources.items() if k != "train"}, report=report, **task_kwargs,
    )


def build(config) -> Task:
    features, splits = load_splits(config.data)
    fmap = FeatureMap.load(config.data.feature_map) if config.data.feature_map else FeatureMap.fit(features, splits["train"])
    sources = {name: encode_split(fmap, raw) for name, raw in splits.items()}
    model = build_model(config.model, fmap)
    task = ctr_task(model, fmap, sources, trainable=config.trainable)
    check_shardable(task.init, config)
    return task


def check_shardable(init, config) -> None:
    """Raises ValueError naming every parameter whose sharded dimension does not divide its mesh axes."""
    rules = shd.rules_from_config(config.sharding_rules)
    sizes = dict(zip(shd.MESH_AXES, shd.resolve_mesh_shape(dict(config.mesh), jax.device_count())))
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init, jax.random.key(0))
    problems = []

    def check(path, leaf):
        if not isinstance(leaf, nn.Partitioned):
            return
        spec = nn.logical_to_mesh_axes(leaf.names, rules)
        for dim, axes in zip(leaf.value.shape, spec):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            split = math.prod(sizes[a] for a in axes)
            if dim % split:
                problems.append(f"{jax.tree_util.keystr(path)} dimension {dim} over mesh axes {axes} of size {split}")

    jax.tree_util.tree_map_with_path(check, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    if problems:
        raise ValueError(
            "parameters cannot be split evenly under sharding_rules=" f"{config.sharding_rules!r}: " + "; ".join(problems[:5])
            + ". Make those widths multiples of the mesh axis sizes (tables: --config.model.table_row_multiple) "
            "or use other rules."
        )


def validate(config) -> list[str]:
    """Config problems visible before anything is built."""
    errors = []
    if config.model.name not in MODELS:
        errors.append(f"model.name={config.model.name!r} is not a behaviour model; choose one of {sorted(MODELS)}.")
    if config.data.name not in DATA_SOURCES:
        errors.append(f"data.name must be one of {DATA_SOURCES}, got {config.data.name!r}.")
    if config.data.name == "amazon" and not config.data.data_dir:
        errors.append("data.name='amazon' needs --config.data.data_dir (the directory with the reviews and meta files).")
    if config.data.name == "clicklog":
        from jdjax.data.clicklog import SIZES

        if config.data.size not in SIZES:
            errors.append(f"data.size={config.data.size!r} is unknown; choose one of {sorted(SIZES)}.")
        if config.data.split not in ("time", "user"):
            errors.append(f"data.split must be 'time' or 'user', got {config.data.split!r}.")
    if config.model.activation not in ("relu", "prelu", "sigmoid"):
        hint = (" Dice needs running statistics (a mutable 'batch_stats' collection), which the generic loop's "
                "TrainState does not carry;" if config.model.activation == "dice" else "")
        errors.append(f"model.activation={config.model.activation!r} is not supported by the CTR task.{hint} use 'prelu'.")
    if config.model.prior not in ("learned", "unit"):
        errors.append(f"model.prior must be 'learned' or 'unit', got {config.model.prior!r}.")
    if config.data.feature_map and not os.path.exists(config.data.feature_map):
        errors.append(f"data.feature_map={config.data.feature_map!r} does not exist; leave it empty to build one.")
    if config.model.table_row_multiple <= 0:
        errors.append(f"model.table_row_multiple must be positive, got {config.model.table_row_multiple}.")
    return errors


def compare(config, workdir: str, models: list[str] | None = None, seeds: list[int] | None = None) -> dict:
    """Trains each model with each seed and writes compare.md / compare.json into `workdir`.

    Returns {'rows': [{'model', 'runs', '<metric>_mean', '<metric>_std', 'relaimpr'}], 'base': model}.
    """
    from jdjax import main as jmain

    models = models or [m for m in config.compare.models.split(",") if m]
    seeds = seeds or [int(s) for s in config.compare.seeds.split(",") if s]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise jmain.UsageError(f"compare.models names unknown models {unknown}; choose from {sorted(MODELS)}.")
    runs: dict[str, list[dict]] = {}
    for model in models:
        for seed in seeds:
            run_dir = os.path.join(workdir, model, f"seed{seed}")
            done = os.path.join(run_dir, "results.json")
            if not os.path.exists(done):
                cfg = copy.deepcopy(config)
                with cfg.unlocked():
                    cfg.model.name, cfg.seed = model, seed
                jmain.run(cfg, run_dir)
            with open(done) as f:
                runs.setdefault(model, []).append(json.load(f))
    table = comparison_table(runs, [f"test/{m}" for m in REPORTED])
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "compare.json"), "w") as f:
        json.dump({**table, "seeds": seeds, "data": config.data.to_dict(), "num_train_steps": config.num_train_steps}, f, indent=2)
    with open(os.path.join(workdir, "compare.md"), "w") as f:
        f.write(comparison_markdown(table, config, seeds))
    return table


def comparison_table(runs: dict[str, list[dict]], metrics: list[str]) -> dict:
    """Mean/std over runs per model; RelaImpr of the mean AUC against the first model."""
    rows = []
    for model, results in runs.items():
        row = {"model": model, "runs": len(results)}
        for m in metrics:
            values = np.array([r.get(m, float("nan")) for r in results], np.float64)
            row[f"{m}_mean"] = float(np.mean(values))
            row[f"{m}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    base = rows[0]["model"] if rows else ""
    for row in rows:
        row["relaimpr"] = ctr_metrics.rela_impr(row["test/auc_mean"], rows[0]["test/auc_mean"]) if rows[0]["test/auc_mean"] != 0.5 else float("nan")
    return {"rows": rows, "base": base, "metrics": metrics}


def comparison_markdown(table: dict, config, seeds: list[int]) -> str:
    metrics = table["metrics"]
    head = "| model | " + " | ".join(m.removeprefix("test/") for m in metrics) + f" | RelaImpr vs {table['base']} |"
    lines = [
        f"# CTR comparison: {config.data.name} ({config.data.get('size', '')}), {len(seeds)} seeds {seeds}, "
        f"{config.num_train_steps} steps",
        "",
        "Test metrics of the checkpoint selected on val/auc, mean ± std over seeds.",
        "",
        head,
        "|" + "---|" * (len(metrics) + 2),
    ]
    for row in table["rows"]:
        cells = [f"{row[f'{m}_mean']:.4f} ± {row[f'{m}_std']:.4f}" for m in metrics]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {100 * row['relaimpr']:+.2f} % |")
    return "\n".join(lines) + "\n"


def _cli():
    """`python -m jdjax.tasks.ctr --config=... --workdir=...`: the flags of jdjax.main, then `compare`."""
    from absl import app, flags, logging

    from jdjax import main as jmain  # defines --config and --workdir

    def main(argv):
        if len(argv) > 1:
            jmain.fail(f"unexpected arguments {argv[1:]}; pass everything as --flags.")
        config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
        if config is None or not workdir:
            jmain.fail("--config and --workdir are required, e.g. --config=configs/kfatt.py --workdir=runs/kfatt-compare")
        logging.set_verbosity(logging.WARNING)
        try:
            compare(config, workdir)
        except jmain.UsageError as e:
            jmain.fail(str(e))
        with open(os.path.join(workdir, "compare.md")) as f:
            print(f.read(), end="")

    app.run(main, flags_parser=jmain.parse_flags)


if __name__ == "__main__":
    _cli()
