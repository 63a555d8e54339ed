"""Image classification: a ViT trained with cross-entropy; accuracy over whole splits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from jdjax.data import images
from jdjax.nn.vit import ViT
from jdjax.train.task import Task


def image_splits(data_cfg) -> dict:
    """{'train', 'val', 'test'} sources for `data_cfg.name` in {'digits', 'shapes', 'tfds'}."""
    if data_cfg.name == "digits":
        return images.digits_splits(data_cfg.image_size, seed=0, classes=digit_classes(data_cfg))
    if data_cfg.name == "shapes":
        sizes = {"train": data_cfg.num_train, "val": data_cfg.num_eval, "test": data_cfg.num_eval}
        return images.shapes_splits(sizes, data_cfg.image_size, seed=data_cfg.shapes_seed)
    if data_cfg.name == "vtab":
        from jdjax.data.vtab import vtab_splits

        return vtab_splits(data_cfg.vtab_task, data_cfg.data_dir, data_cfg.image_size)
    if data_cfg.name == "tfds":
        from jdjax.data.tfds_source import tfds_image_splits

        splits = {"train": data_cfg.train_split, "val": data_cfg.val_split, "test": data_cfg.test_split}
        return tfds_image_splits(data_cfg.tfds_name, data_cfg.data_dir, splits, data_cfg.image_size, data_cfg.normalization)
    raise ValueError(f"data.name must be 'digits', 'shapes', 'tfds' or 'vtab', got {data_cfg.name!r}.")


def build_vit(model_cfg, num_classes: int) -> ViT:
    return ViT(
        num_classes=num_classes,
        patch_size=model_cfg.patch_size,
        width=model_cfg.width,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
        mlp_dim=model_cfg.mlp_dim,
        dropout=model_cfg.dropout,
        dtype=jnp.dtype(model_cfg.dtype),
    )


def classification_task(model, splits: dict, image_size: int, **task_kwargs) -> Task:
    """A Task for any module mapping images [B, S, S, 3] to logits [B, K] (`train` kwarg, dropout rng)."""

    def init(rng):
        return model.init({"params": rng}, jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]

    def loss(params, batch, rng):
        logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return ce, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    def predict(params, batch):
        logits = model.apply({"params": params}, batch["image"], train=False)  # [B, K]
        return {
            "correct": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]),
        }

    def summarize(out: dict[str, np.ndarray]) -> dict[str, float]:
        return {"accuracy": float(np.mean(out["correct"])), "loss": float(np.mean(out["loss"])), "count": float(len(out["correct"]))}

    return Task(
        init=init, loss=loss, predict=predict, summarize=summarize,
        train_source=splits["train"], eval_sources={k: v for k, v in splits.items() if k != "train"}, **task_kwargs,
    )


def build(config) -> Task:
    splits = image_splits(config.data)
    model = build_vit(config.model, config.data.num_classes)
    augment = images.random_shift(config.data.augment_shift) if config.data.augment_shift else None
    return classification_task(model, splits, config.data.image_size, augment=augment, trainable=config.trainable)


def validate(config) -> list[str]:
    """Config problems this task can see before anything is built."""
    errors = []
    if config.model.width % config.model.num_heads:
        errors.append(f"model.width={config.model.width} is not divisible by model.num_heads={config.model.num_heads}.")
    if config.data.image_size % config.model.patch_size:
        errors.append(f"data.image_size={config.data.image_size} is not divisible by model.patch_size={config.model.patch_size}.")
    return errors + data_errors(config.data)


def digit_classes(data_cfg) -> list[int] | None:
    """The digits kept by `data.classes` ('5,6,7' -> [5, 6, 7]; '' -> None, all ten)."""
    return [int(c) for c in data_cfg.classes.split(",") if c.strip()] or None


def data_errors(data_cfg, prefix: str = "data") -> list[str]:
    """Problems of an image data section (`prefix` names it in the messages)."""
    errors = []
    if data_cfg.name in ("tfds", "vtab") and not data_cfg.data_dir:
        errors.append(f"{prefix}.name={data_cfg.name!r} reads prepared TFDS data: set --config.{prefix}.data_dir.")
    if data_cfg.name == "digits":
        if data_cfg.image_size % 8:
            errors.append(f"{prefix}.image_size={data_cfg.image_size}: the digits are 8x8, use a multiple of 8.")
        try:
            classes = digit_classes(data_cfg) or list(range(10))
        except ValueError:
            return errors + [f"{prefix}.classes={data_cfg.classes!r} must be comma-separated digits, e.g. '5,6,7,8,9'."]
        if len(classes) != data_cfg.num_classes:
            errors.append(f"{prefix}.classes keeps {len(classes)} digits; set {prefix}.num_classes={len(classes)}.")
    if data_cfg.name == "vtab":
        from jdjax.data import vtab

        if data_cfg.vtab_task not in vtab.TASKS:
            errors.append(f"{prefix}.vtab_task={data_cfg.vtab_task!r} is not a VTAB-1k task; known: {', '.join(vtab.TASKS)}.")
        elif data_cfg.num_classes != vtab.TASKS[data_cfg.vtab_task].num_classes:
            errors.append(f"{prefix}.num_classes={data_cfg.num_classes}, but VTAB task {data_cfg.vtab_task!r} has "
                          f"{vtab.TASKS[data_cfg.vtab_task].num_classes} classes; set --config.{prefix}.num_classes to that.")
    return errors
