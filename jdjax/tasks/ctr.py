"""CTR prediction on the generic loop: user-behaviour models (KFAtt and its baselines),
multi-scene models (DADNN and its baselines) and image CTR models (CSCNN and its baselines).

    python -m jdjax.main --config=configs/kfatt.py:smoke                 # one model
    python -m jdjax.main --config=configs/dadnn.py:smoke
    python -m jdjax.main --config=configs/cscnn.py:smoke
    python -m jdjax.tools.ctr_compare --config=configs/kfatt.py --workdir=runs/kfatt-compare   # model set x seeds

The model family follows from `model.name`: a key of jdjax.models.din.MODELS (behaviour, data
'clicklog' or 'amazon'), of jdjax.models.dadnn.MODELS (multi-scene, data 'scenes' (embedded) or
'scene_files' (CSV / Parquet files in data.data_dir, jdjax.data.clicklog.load_scene_files)) or
of jdjax.models.cscnn.MODELS (image, data 'ads').

Loss: logloss (sigmoid cross-entropy) plus any auxiliary loss the model returns (DADNN's
knowledge transfer). With `model.activation='dice'` (behaviour and image models) Dice's running
averages ride in the train state's 'batch_stats': training updates them, evaluation reads them.
`predict` returns per-example probabilities, labels, user ids and slice flags; `summarize`
computes AUC, gAUC (grouped by raw user id, never by the encoded id, which maps every unseen
user to the one OOV row) and logloss over the split and per slice (every boolean column of the
data: 'new', 'repeat', 'infreq' for click logs, 'scene<k>' for scenes).
The vocabularies are built once over the whole training split (or loaded from
`data.feature_map`, which must be this data's map: FeatureMap.check_data) and written to
`<workdir>/feature_map.json`; `data.oov_rate` of the training ids are encoded as out of
vocabulary so that unseen val/test ids read a trained row (jdjax/data/features.py).

The comparison command (`compare`) trains every model of `compare.models` with every seed of
`compare.seeds` (the data set stays fixed: `data.seed`), each in `<workdir>/<model>/seed<k>`
(rerunning skips finished runs and resumes unfinished ones), and writes compare.md and
compare.json: mean and standard deviation over seeds of the test metrics of the checkpoint
selected on validation AUC, with RelaImpr against the first model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdjax.data.features import FeatureMap
from jdjax.data.pipeline import ArraySource
from jdjax.io import as_path, write_json, write_text
from jdjax.metrics import ctr as ctr_metrics
from jdjax.models import cscnn, dadnn, din
from jdjax.train import sharding as shd
from jdjax.train import sweep
from jdjax.train.logging import is_main_process
from jdjax.train.task import Task
from jdjax.train.validation import UsageError

FAMILIES = {"behaviour": din.MODELS, "scenes": dadnn.MODELS, "images": cscnn.MODELS}
DATA_SOURCES = {"behaviour": ("clicklog", "amazon"), "scenes": ("scenes", "scene_files"), "images": ("ads",)}
ACTIVATIONS = ("relu", "prelu", "sigmoid", "dice")


def model_family(name: str) -> str:
    for family, models in FAMILIES.items():
        if name in models:
            return family
    known = sorted(m for models in FAMILIES.values() for m in models)
    raise ValueError(f"model.name={name!r} is not a CTR model; choose one of {known}.")


def load_splits(data_cfg) -> tuple[tuple, dict, np.ndarray | None]:
    """(feature declarations, {'train', 'val', 'test'} -> raw arrays, image bank or None) for
    `data_cfg.name`."""
    from jdjax.data import clicklog

    if data_cfg.name == "clicklog":
        splits = clicklog.generate(data_cfg.size, seed=data_cfg.seed, split=data_cfg.split)
        maxlen = splits["train"]["hist_item"].shape[1]
        return clicklog.features(data_cfg.embedding_dim, maxlen), splits, None
    if data_cfg.name == "amazon":
        from jdjax.data import amazon

        splits = amazon.load(data_cfg.data_dir, maxlen=data_cfg.maxlen, seed=data_cfg.seed,
                             infreq_threshold=data_cfg.infreq_threshold, negatives=data_cfg.negatives,
                             dedup_category_level=data_cfg.dedup_category_level, with_id_names=True)
        return amazon.features(data_cfg.embedding_dim, data_cfg.maxlen), splits, None
    if data_cfg.name in ("scenes", "scene_files"):
        if data_cfg.name == "scenes":
            splits = clicklog.generate_scenes(data_cfg.size, seed=data_cfg.seed,
                                              tail_relatedness=data_cfg.get("tail_relatedness", 0.8))
            features = clicklog.scene_features(data_cfg.embedding_dim)
        else:
            dense = tuple(c for c in data_cfg.dense_columns.split(",") if c)
            features, splits = clicklog.load_scene_files(data_cfg.data_dir, data_cfg.embedding_dim, data_cfg.label_column,
                                                         data_cfg.scene_column, data_cfg.user_column, dense)
        for raw in splits.values():
            raw["scene_index"] = raw["scene"].astype(np.int32)
        return features, splits, None
    if data_cfg.name == "ads":
        splits, images = clicklog.generate_ads(data_cfg.size, seed=data_cfg.seed)
        return clicklog.ad_features(data_cfg.embedding_dim), splits, images
    known = sorted(d for names in DATA_SOURCES.values() for d in names)
    raise ValueError(f"data.name must be one of {known}, got {data_cfg.name!r}.")


PASSTHROUGH = ("scene_index", "ad_index", "hist_dedup")  # raw integer inputs the models read besides the features


class ImageBankSource:
    """A source whose batches add `image` [B, S, S, 3] = images[ad_index]: one copy of each ad image
    in memory however many impressions show it."""

    def __init__(self, rows: ArraySource, images: np.ndarray):
        self.rows, self.images = rows, images

    def __len__(self) -> int:
        return len(self.rows)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        batch = self.rows.get_batch(indices)
        batch["image"] = self.images[batch["ad_index"]]
        return batch


def encode_split(fmap: FeatureMap, raw: dict, images: np.ndarray | None = None, train: bool = False, seed: int = 0,
                 id_names: dict | None = None):
    """Model inputs plus what the metrics need: label, group (raw user id as int32) and slice flags
    (every boolean column); with an image bank, batches also carry the ad images. `train` encodes
    the map's oov_rate of known ids as out of vocabulary; `id_names` as in FeatureMap.fit."""
    names = [f.name for f in fmap.features]
    enc = fmap.encode({k: raw[k] for k in names}, train=train, seed=seed, id_names=id_names)
    _, group = np.unique(raw["user"], return_inverse=True)
    arrays = {k: enc[k] for k in names}
    arrays["label"] = raw["label"].astype(np.float32)
    arrays["group"] = group.reshape(-1).astype(np.int32)
    arrays.update({k: raw[k].astype(np.int32) for k in PASSTHROUGH if k in raw})
    arrays.update({k: v for k, v in raw.items() if v.dtype == bool})
    return ArraySource(arrays) if images is None else ImageBankSource(ArraySource(arrays), images)


def build_model(model_cfg, fmap: FeatureMap, num_scenes: int = 0):
    dtype = jnp.dtype(model_cfg.dtype)
    if model_family(model_cfg.name) == "images":
        return cscnn.ImageCTR(
            features=fmap.features, tables=fmap.tables(), model=model_cfg.name, channels=tuple(model_cfg.channels),
            visual_dim=model_cfg.visual_dim, prior_channels=model_cfg.prior_channels, reduction=model_cfg.reduction,
            mlp_hidden=tuple(model_cfg.mlp_hidden), activation=model_cfg.activation,
            max_unique_images=model_cfg.max_unique_images, row_multiple=model_cfg.table_row_multiple, dtype=dtype,
        )
    if model_family(model_cfg.name) == "scenes":
        return dadnn.DADNN(
            features=fmap.features, tables=fmap.tables(), model=model_cfg.name, num_scenes=num_scenes,
            scene="scene_index", bottom_hidden=tuple(model_cfg.bottom_hidden), head_hidden=tuple(model_cfg.head_hidden),
            num_experts=model_cfg.num_experts, cross_layers=model_cfg.get("cross_layers", 3),
            activation=model_cfg.activation, kt_weight=model_cfg.kt_weight,
            kt_stop_gradient=model_cfg.kt_stop_gradient, row_multiple=model_cfg.table_row_multiple, dtype=dtype,
        )
    return din.BehaviourCTR(
        features=fmap.features, tables=fmap.tables(), model=model_cfg.name, mlp_hidden=tuple(model_cfg.mlp_hidden),
        activation=model_cfg.activation, dropout=model_cfg.dropout, din_hidden=tuple(model_cfg.din_hidden),
        num_heads=model_cfg.num_heads, head_dim=model_cfg.head_dim, prior_hidden=model_cfg.prior_hidden,
        prior=model_cfg.prior, row_multiple=model_cfg.table_row_multiple, dtype=dtype,
    )


def summarize(out: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC, gAUC, logloss and counts over the split, and AUC/logloss/count per slice flag present."""
    y, p = out["label"], out["prob"]
    metrics = {
        "auc": ctr_metrics.auc(y, p),
        "gauc": ctr_metrics.gauc(y, p, out["group"]),
        "logloss": ctr_metrics.logloss(y, p),
        "ctr": float(np.mean(y)) if len(y) else float("nan"),
        "count": float(len(y)),
    }
    for s, flag in out.items():
        if flag.dtype == bool:
            metrics.update({f"{s}/auc": ctr_metrics.auc(y[flag], p[flag]), f"{s}/logloss": ctr_metrics.logloss(y[flag], p[flag]),
                            f"{s}/count": float(flag.sum())})
    return metrics


def ctr_task(model, fmap: FeatureMap, sources: dict, **task_kwargs) -> Task:
    """A Task for a module mapping an encoded batch to (logits [B], aux) (`train` kwarg, dropout rng);
    aux['losses'] (optional) holds weighted auxiliary loss terms added to the logloss. A model with
    mutable collections (Dice's 'batch_stats') gives a stateful Task: training updates the running
    averages, prediction reads them."""
    sample = sources["train"].get_batch(np.arange(2))
    slices = tuple(k for k, v in sample.items() if v.dtype == bool)

    def init_variables(rng):
        return model.init({"params": rng}, {k: jnp.asarray(v) for k, v in sample.items()})

    collections = sorted(set(jax.eval_shape(init_variables, jax.random.key(0))) - {"params"})

    def loss(params, model_state, batch, rng):
        (logits, aux), model_state = model.apply({"params": params, **model_state}, batch, train=True,
                                                 rngs={"dropout": rng}, mutable=collections)
        logloss = optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean()
        extra = aux.get("losses", {})
        return logloss + sum(extra.values()), {"logloss": logloss, **extra}, model_state

    def predict(params, model_state, batch):
        logits, _ = model.apply({"params": params, **model_state}, batch, train=False)  # [B]
        out = {"prob": jax.nn.sigmoid(logits), "label": batch["label"], "group": batch["group"]}
        out.update({s: batch[s] for s in slices})
        return out

    def report(workdir, results):
        fmap.save(as_path(workdir) / "feature_map.json")

    if collections:
        functions = dict(loss=loss, predict=predict,
                         init_model_state=lambda rng: {k: v for k, v in init_variables(rng).items() if k != "params"})
    else:
        functions = dict(loss=lambda params, batch, rng: loss(params, {}, batch, rng)[:2],
                         predict=lambda params, batch: predict(params, {}, batch))
    return Task(
        init=lambda rng: init_variables(rng)["params"], summarize=summarize, train_source=sources["train"],
        eval_sources={k: v for k, v in sources.items() if k != "train"}, report=report, **functions, **task_kwargs,
    )


def build(config) -> Task:
    features, splits, images = load_splits(config.data)
    # A reader that keeps integer codes instead of raw ids adds splits['id_names'] = {table: raw ids}
    # (code k of a table is its raw id k), so the feature map stores raw ids (FeatureMap.fit).
    id_names = splits.pop("id_names", None)
    oov_rate = config.data.get("oov_rate", 0.0)
    if config.data.feature_map:  # reused: it must be this data's map (FeatureMap.check_data)
        fmap = dataclasses.replace(FeatureMap.load(config.data.feature_map), oov_rate=oov_rate)
        data = f"data.data_dir={config.data.data_dir!r}" if config.data.data_dir else f"data.name={config.data.name!r}"
        fmap.check_data(features, splits["train"], config.data.feature_map, data=data, id_names=id_names)
    else:
        fmap = FeatureMap.fit(features, splits["train"], oov_rate=oov_rate, id_names=id_names)
    sources = {name: encode_split(fmap, raw, images, train=name == "train", seed=config.data.seed, id_names=id_names)
               for name, raw in splits.items()}
    num_scenes = int(splits["train"]["scene_index"].max()) + 1 if "scene_index" in splits["train"] else 0
    model = build_model(config.model, fmap, num_scenes)
    if "hist_dedup" in splits["train"]:  # amazon's data.dedup_category_level: KFAtt-freq groups by these ids
        model = model.clone(dedup="hist_dedup")
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
            f"parameters cannot be split evenly under sharding_rules={config.sharding_rules!r}: "
            + "; ".join(problems[:5])
            + ". Make those widths multiples of the mesh axis sizes (tables: --config.model.table_row_multiple) "
            "or use other rules."
        )


def validate(config) -> list[str]:
    """Config problems visible before anything is built."""
    try:
        family = model_family(config.model.name)
    except ValueError as e:
        return [str(e)]
    if config.data.name not in DATA_SOURCES[family]:
        message = (f"model.name={config.model.name!r} needs data.name in {DATA_SOURCES[family]}, got "
                   f"{config.data.name!r} (use the config file of that model family).")
        return [message]
    errors = []
    if config.data.name == "amazon" and not config.data.data_dir:
        errors.append("data.name='amazon' needs --config.data.data_dir (the directory with the reviews and meta files).")
    if config.data.name == "amazon":
        from jdjax.data import amazon

        errors += amazon.check_options(config.data.maxlen, config.data.infreq_threshold, config.data.negatives,
                                       config.data.dedup_category_level)
    if config.data.name == "scene_files" and not config.data.data_dir:
        errors.append("data.name='scene_files' needs --config.data.data_dir (a directory with train, val and test "
                      ".parquet / .csv / .csv.gz files).")
    if config.data.name in ("clicklog", "scenes", "ads"):
        from jdjax.data.clicklog import AD_SIZES, SCENE_SIZES, SIZES

        sizes = {"clicklog": SIZES, "scenes": SCENE_SIZES, "ads": AD_SIZES}[config.data.name]
        if config.data.size not in sizes:
            errors.append(f"data.size={config.data.size!r} is unknown; choose one of {sorted(sizes)}.")
    if config.data.name == "clicklog" and config.data.split not in ("time", "user"):
        errors.append(f"data.split must be 'time' or 'user', got {config.data.split!r}.")
    if config.model.activation not in ACTIVATIONS:
        errors.append(f"model.activation={config.model.activation!r} is not supported by the CTR task; choose one "
                      f"of {ACTIVATIONS}.")
    elif config.model.activation == "dice" and family == "scenes":
        errors.append("model.activation='dice' is not supported by the multi-scene models: their per-scene towers "
                      "(and MMoE experts) are vmapped and Dice's running statistics are not; use 'prelu'.")
    if family == "behaviour" and config.model.prior not in ("learned", "unit"):
        errors.append(f"model.prior must be 'learned' or 'unit', got {config.model.prior!r}.")
    if family == "images" and config.model.max_unique_images < 0:
        errors.append(f"model.max_unique_images must be >= 0 (0 = off), got {config.model.max_unique_images}.")
    if family == "scenes" and config.model.kt_weight < 0:
        errors.append(f"model.kt_weight must be >= 0, got {config.model.kt_weight}.")
    if config.data.feature_map and not os.path.exists(config.data.feature_map):
        errors.append(f"data.feature_map={config.data.feature_map!r} does not exist; leave it empty to build one.")
    if not 0.0 <= config.data.get("oov_rate", 0.0) < 1.0:
        errors.append(f"data.oov_rate must be in [0, 1) (0 = off), got {config.data.oov_rate}.")
    if config.model.table_row_multiple <= 0:
        errors.append(f"model.table_row_multiple must be positive, got {config.model.table_row_multiple}.")
    return errors


def compare(config, workdir: str, models: list[str] | None = None, seeds: list[int] | None = None) -> dict:
    """Trains each model with each seed (jobs `<model>/seed<k>` of the sweep runner) and writes
    compare.md / compare.json into `workdir`.

    Returns {'status', 'failed', 'rows': [{'model', 'runs', '<metric>_mean', '<metric>_std',
    'relaimpr'}], 'base': model}; the table covers the completed runs only.
    """
    from jdjax import tasks

    models = models or [m for m in config.compare.models.split(",") if m]
    seeds = seeds or [int(s) for s in config.compare.seeds.split(",") if s]
    known = {m for family in FAMILIES.values() for m in family}
    unknown = [m for m in models if m not in known]
    if unknown:
        raise UsageError(f"compare.models names unknown models {unknown}; choose from {sorted(known)}.")
    jobs = []
    for model in models:
        for seed in seeds:
            cfg = copy.deepcopy(config)
            with cfg.unlocked():
                cfg.model.name, cfg.seed = model, seed
            tasks.check(cfg)  # every run's problems before the first one trains
            jobs.append(sweep.Job(f"{model}/seed{seed}", lambda sub, cfg=cfg: tasks.run(cfg, sub)))
    out = sweep.run_sweep(workdir, jobs, desc="ctr compare")
    runs: dict[str, list[dict]] = {}
    for name, results in out.results.items():
        runs.setdefault(name.split("/")[0], []).append(results)
    if not runs:
        return {"status": out.status, "failed": out.failed, "rows": [], "base": ""}
    first = next(iter(runs.values()))[0]
    slices = [k for k in first if k.startswith("test/") and k.endswith("/auc") and k.count("/") == 2]
    table = comparison_table(runs, ["test/auc", "test/gauc", "test/logloss", *slices])
    if is_main_process():
        root = as_path(workdir)
        write_json(root / "compare.json", {**table, "seeds": seeds, "data": config.data.to_dict(),
                                           "num_train_steps": config.num_train_steps})
        write_text(root / "compare.md", comparison_markdown(table, config, seeds))
    return {"status": out.status, "failed": out.failed, **table}


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
    title = (f"# CTR comparison: {config.data.name} ({config.data.get('size', '')}), {len(seeds)} seeds {seeds}, "
             f"{config.num_train_steps} steps")
    lines = [
        title,
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
