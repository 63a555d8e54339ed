"""The ad-blending click model (spec P2) on the generic loop: per-slot click prediction on the logs
of the synthetic page environment (jdjax.econ.page_env), with or without the displayed context.

    python -m jdjax.main --config=configs/page_click.py[:no_context]   # one model (configs/page_click.py)
    train_and_evaluate(config, workdir, page_click.click_model_task(config, context=True))  # from code

Data: `page_env.click_log(data.seed, env, n, stream)` with one stream per split (train 0, val 1,
test 2), so the splits are different pages of one environment (data.seed fixes the category
centres: an allocation that uses the trained model must use pages of the same data.seed). The
logging policy is random, so neighbour externalities are identifiable.

Loss: sigmoid cross-entropy averaged over every slot of every page. `predict` returns per-slot
probabilities, clicks, the ad flag and the true CTR; `summarize` reports over all impressions
auc, logloss, ad_auc, organic_auc (and their loglosses), ctr_rmse (distance of the predicted to
the true click probabilities), mean_prob / mean_label (calibration), and the same metrics of the
ground truth as oracle_* (the best any model can do on this log). Validation AUC selects the
checkpoint (the loop evaluates 'val' during training and 'test' for the selected checkpoint).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdjax.data.pipeline import ArraySource
from jdjax.econ import page_env
from jdjax.metrics import ctr as ctr_metrics
from jdjax.models.page_click import PageClickModel
from jdjax.nn.ctr.layers import ACTIVATIONS
from jdjax.train.task import Task

SPLITS = {"train": 0, "val": 1, "test": 2}  # split -> click_log stream
LOG_KEYS = ("user", "x", "cat", "is_ad", "label", "ctr")


def validate(config) -> list[str]:
    """Problems with a click config (empty when valid); the loop's own keys are checked by
    jdjax.tasks.config_errors."""
    errors = list(page_env.env_errors(config.env))
    for split in SPLITS:
        n = config.data[f"{split}_pages"]
        if n < 1:
            errors.append(f"data.{split}_pages={n} must be >= 1.")
    if config.data.train_pages < config.batch_size:
        errors.append(f"data.train_pages={config.data.train_pages} is smaller than batch_size={config.batch_size} "
                      "(pages per step); raise data.train_pages or lower batch_size.")
    m = config.model
    if m.width < 1 or m.num_heads < 1 or m.width % m.num_heads:
        errors.append(f"model.width={m.width} must be a positive multiple of model.num_heads={m.num_heads}.")
    if any(w < 1 for w in m.mlp_hidden):
        errors.append(f"model.mlp_hidden={tuple(m.mlp_hidden)} must hold positive widths.")
    if m.activation not in ACTIVATIONS or m.activation == "dice":
        errors.append(f"model.activation={m.activation!r}: choose one of relu, prelu, sigmoid "
                      "(the page click task does not carry model state, which dice's running statistics need; "
                      "the CTR task does).")
    if not 0.0 <= m.dropout < 1.0:
        errors.append(f"model.dropout={m.dropout} must be in [0, 1).")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        errors.append(f"model.dtype={m.dtype!r} must be float32, bfloat16 or float16.")
    return errors


def build_model(config, env=None, context: bool | None = None) -> PageClickModel:
    """The PageClickModel of `config.model` for the environment `env` (default config.env)."""
    p = page_env.EnvParams.from_config(env if env is not None else config.env)
    m = config.model
    return PageClickModel(
        context=bool(m.context if context is None else context), num_slots=p.num_slots,
        num_categories=p.num_categories, width=m.width, num_heads=m.num_heads, mlp_hidden=tuple(m.mlp_hidden),
        activation=m.activation, dropout=m.dropout, dtype=jnp.dtype(m.dtype),
    )


def load_logs(config, env=None) -> dict[str, dict[str, np.ndarray]]:
    """{'train', 'val', 'test'} -> click_log arrays (different streams of one environment)."""
    p = page_env.EnvParams.from_config(env if env is not None else config.env)
    return {split: page_env.click_log(config.data.seed, p, int(config.data[f"{split}_pages"]), stream)
            for split, stream in SPLITS.items()}


def summarize(out: dict[str, np.ndarray]) -> dict[str, float]:
    """Metrics over all impressions of a split: out has prob, label, is_ad, ctr ([N, S] or [N])."""
    y, p, t = out["label"].reshape(-1), out["prob"].reshape(-1), out["ctr"].reshape(-1)
    ad = out["is_ad"].reshape(-1).astype(bool)
    metrics = {"count": float(y.size), "ad_count": float(ad.sum()),
               "mean_label": float(np.mean(y)) if y.size else float("nan"),
               "mean_prob": float(np.mean(p)) if y.size else float("nan"),
               "ctr_rmse": float(np.sqrt(np.mean((p - t) ** 2))) if y.size else float("nan")}
    for prefix, score in (("", p), ("oracle_", t)):
        metrics[f"{prefix}auc"] = ctr_metrics.auc(y, score)
        metrics[f"{prefix}logloss"] = ctr_metrics.logloss(y, score)
        for name, sel in (("ad", ad), ("organic", ~ad)):
            metrics[f"{prefix}{name}_auc"] = ctr_metrics.auc(y[sel], score[sel])
            metrics[f"{prefix}{name}_logloss"] = ctr_metrics.logloss(y[sel], score[sel])
    return metrics


def click_task_from_logs(model: PageClickModel, logs: dict[str, dict[str, np.ndarray]], **task_kwargs) -> Task:
    """A Task training `model` on click logs: split -> arrays of page_env.click_log (user [N, D],
    x [N, S, D], cat [N, S], is_ad [N, S], label [N, S], ctr [N, S]); 'train' is trained on, the
    other splits are evaluated ('val' selects the checkpoint)."""
    if "train" not in logs or "val" not in logs:
        raise ValueError(f"click logs need 'train' and 'val' splits, got {sorted(logs)}.")
    sources = {}
    for split, log in logs.items():
        missing = [k for k in LOG_KEYS if k not in log]
        if missing:
            raise ValueError(f"click log {split!r} lacks {missing}; page_env.click_log gives {list(LOG_KEYS)}.")
        sources[split] = ArraySource({
            "user": np.asarray(log["user"], np.float32), "x": np.asarray(log["x"], np.float32),
            "cat": np.asarray(log["cat"], np.int32), "is_ad": np.asarray(log["is_ad"], bool),
            "label": np.asarray(log["label"], np.float32), "ctr": np.asarray(log["ctr"], np.float32),
        })
    sample = {k: jnp.asarray(v) for k, v in sources["train"].get_batch(np.arange(2)).items()}

    def init(rng):
        return model.init({"params": rng}, sample)["params"]

    def loss(params, batch, rng):
        logits, _ = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})  # [B, S]
        logloss = optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean()
        return logloss, {"logloss": logloss}

    def predict(params, batch):
        logits, _ = model.apply({"params": params}, batch, train=False)  # [B, S]
        return {"prob": jax.nn.sigmoid(logits), "label": batch["label"], "is_ad": batch["is_ad"], "ctr": batch["ctr"]}

    return Task(init=init, loss=loss, predict=predict, summarize=summarize, train_source=sources["train"],
                eval_sources={k: v for k, v in sources.items() if k != "train"}, **task_kwargs)


def click_model_task(config, context: bool, env=None) -> Task:
    """The click-model Task of `config` (configs/page_click.py): the context-aware model (context=True)
    or the no-context baseline, on logs of the environment `env` (default config.env)."""
    errors = validate(config) if env is None else validate(config) + page_env.env_errors(env)
    if errors:
        raise ValueError("invalid click config: " + "; ".join(errors))
    model = build_model(config, env, context)
    return click_task_from_logs(model, load_logs(config, env), trainable=config.get("trainable", ""))


def build(config) -> Task:
    """The click model of `config.model.context`."""
    return click_model_task(config, bool(config.model.context))
