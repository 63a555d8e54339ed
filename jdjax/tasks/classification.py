"""Image classification: a ViT trained with cross-entropy; accuracy over whole splits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from jdjax.data import images
from jdjax.nn.vit import ViT
from jdjax.tasks.base import Task


def image_splits(data_cfg) -> dict:
    """{'train', 'val', 'test'} sources for `data_cfg.name` in {'digits', 'shapes', 'tfds'}."""
    if data_cfg.name == "digits":
        return images.digits_splits(data_cfg.image_size, seed=0)
    if data_cfg.name == "shapes":
        sizes = {"train": data_cfg.num_train, "val": data_cfg.num_eval, "test": data_cfg.num_eval}
        return images.shapes_splits(sizes, data_cfg.image_size, seed=data_cfg.shapes_seed)
    if data_cfg.name == "tfds":
        from jdjax.data.tfds_source import tfds_image_splits

        splits = {"train": data_cfg.train_split, "val": data_cfg.val_split, "test": data_cfg.test_split}
        return tfds_image_splits(data_cfg.tfds_name, data_cfg.data_dir, splits, data_cfg.image_size, data_cfg.normalization)
    raise ValueError(f"data.name must be 'digits', 'shapes' or 'tfds', got {data_cfg.name!r}.")


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
    if config.data.name == "digits" and config.data.image_size % 8:
        errors.append(f"data.image_size={config.data.image_size}: the digits are 8x8, use a multiple of 8.")
    return errors
