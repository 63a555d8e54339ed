"""The contract between a task (model + data + loss + metrics) and the generic training loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Task:
    """Everything the loop needs to train and evaluate one method.

    Attributes:
      init: rng -> parameter pytree whose leaves carry logical axis names (boxed).
      loss: (params, batch, rng) -> (scalar loss, dict of scalar metrics); training mode.
      predict: (params, batch) -> dict of per-example arrays [B, ...] (eval mode).
      summarize: dict of per-example NumPy arrays over a whole split (padding removed)
        -> dict of float metrics.
      train_source: a source (see jdjax.data.pipeline) of training examples.
      eval_sources: split name -> source; 'val' is used for checkpoint selection, 'test' only
        for the final report of the selected checkpoint.
      augment: optional (batch, np.random.Generator) -> batch, applied to training batches.
      trainable: regex of trainable parameter paths ('' = all).
      lr_multipliers: (regex, factor) pairs for parameter groups with their own learning rate.
      load_pretrained: optional params -> params applied once at the start of a fresh run
        (e.g. `config.init_from`).
      report: optional (workdir, results) -> None, called on process 0 at the end.
    """

    init: Callable[[Any], Any]
    loss: Callable[..., tuple[Any, dict]]
    predict: Callable[..., dict]
    summarize: Callable[[dict[str, np.ndarray]], dict[str, float]]
    train_source: Any
    eval_sources: dict[str, Any]
    augment: Callable | None = None
    trainable: str = ""
    lr_multipliers: tuple = ()
    load_pretrained: Callable | None = None
    report: Callable | None = None
