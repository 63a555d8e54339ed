"""The contract between a task (model + data + loss + metrics) and the generic training loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Task:
    """Everything the loop needs to train and evaluate one method.

    A stateless task (no `init_model_state`) has
      loss(params, batch, rng) -> (scalar loss, dict of scalar metrics)
      predict(params, batch) -> dict of per-example arrays [B, ...]
    A task with mutable model state (BatchNorm statistics, Dice running averages: any non-param
    Flax collection) sets `init_model_state` and takes the state:
      loss(params, model_state, batch, rng) -> (scalar loss, dict of scalar metrics, new model_state)
      predict(params, model_state, batch) -> dict of per-example arrays [B, ...]
    `loss` runs the model in training mode (batch statistics, updated running averages), `predict`
    in eval mode (running averages, so an example's output does not depend on its batch).

    Attributes:
      init: rng -> parameter pytree whose leaves carry logical axis names (boxed).
      loss, predict: as above.
      summarize: dict of per-example NumPy arrays over a whole split (padding removed)
        -> dict of float metrics.
      train_source: a source (see jdjax.data.pipeline) of training examples.
      eval_sources: split name -> source; 'val' is used for checkpoint selection, 'test' only
        for the final report of the selected checkpoint.
      init_model_state: optional rng -> {collection name: pytree} (e.g. {'batch_stats': ...}); leaves
        may carry logical axis names like the parameters' or be plain arrays (replicated). The loop
        calls it with the same key as `init`.
      augment: optional (batch, np.random.Generator) -> batch, applied to training batches.
      trainable: regex of trainable parameter paths ('' = all).
      lr_multipliers: (regex, factor) pairs for parameter groups with their own learning rate.
      load_pretrained: optional variables -> variables, variables = {'params': params, **model_state}
        (bare NumPy trees), applied once at the start of a fresh run (e.g. `config.init_from`).
      report: optional (workdir, results) -> None, called on process 0 at the end.
    """

    init: Callable[[Any], Any]
    loss: Callable[..., tuple]
    predict: Callable[..., dict]
    summarize: Callable[[dict[str, np.ndarray]], dict[str, float]]
    train_source: Any
    eval_sources: dict[str, Any]
    init_model_state: Callable[[Any], dict] | None = None
    augment: Callable | None = None
    trainable: str = ""
    lr_multipliers: tuple = ()
    load_pretrained: Callable | None = None
    report: Callable | None = None
