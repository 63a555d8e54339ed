"""Tasks: config.task -> the module that trains or simulates it, and the one way to run a config.

A task module exposes `build(config) -> Task` (trained by the generic loop,
`jdjax.train.loop.train_and_evaluate`) or `run(config, workdir) -> dict` (several runs,
simulations), optionally `validate(config) -> list[str]` (its own checks) and, for a `run`
module that trains with the loop, `loop_configs(config) -> list[ConfigDict]` (every config it
will hand to the loop, so that their loop checks happen before anything is written). Modules
are imported lazily.
"""

from __future__ import annotations

import importlib

from jdjax.train.validation import UsageError, loop_config_errors

TASKS = {
    "ad_blending": "jdjax.tasks.ad_blending",
    "classification": "jdjax.tasks.classification",
    "contrastive": "jdjax.tasks.contrastive",
    "ctr": "jdjax.tasks.ctr",
    "delayed_feedback": "jdjax.tasks.delayed_feedback",
    "dialog_cl": "jdjax.tasks.dialog_cl",
    "page_click": "jdjax.tasks.page_click",
    "prodgen": "jdjax.tasks.prodgen",
    "pyra": "jdjax.tasks.pyra",
    "scpnet": "jdjax.tasks.scpnet",
    "tempme": "jdjax.tasks.tempme",
}


def get_task_module(name: str):
    if name not in TASKS:
        raise UsageError(f"config.task={name!r} is not a known task; known tasks: {sorted(TASKS)}.")
    return importlib.import_module(TASKS[name])


def loop_configs(config, module) -> list:
    """The configs `module` trains with the loop: `module.loop_configs(config)`, else [config] for
    a `build` module and [] for a simulation."""
    if hasattr(module, "loop_configs"):
        return list(module.loop_configs(config))
    return [config] if hasattr(module, "build") else []


def validate(config) -> list[str]:
    """Every problem visible before compiling: the task's own checks and the loop checks of each
    config it trains; empty when the config is good."""
    module = get_task_module(config.task)
    errors = list(module.validate(config)) if hasattr(module, "validate") else []
    seen = set()
    for c in loop_configs(config, module):
        for e in loop_config_errors(c):
            if e not in seen:
                seen.add(e)
                errors.append(e)
    return errors


def check(config) -> None:
    """Raises UsageError listing every problem `validate` finds."""
    errors = validate(config)
    if errors:
        raise UsageError("invalid config:\n  - " + "\n  - ".join(errors))


def run(config, workdir: str) -> dict:
    """Validates `config`, then trains (or simulates) it in `workdir`; raises UsageError on bad
    input, before anything is written when the problem is visible in the config."""
    from jdjax.train.checkpoint import CheckpointError
    from jdjax.train.loop import train_and_evaluate

    check(config)
    module = get_task_module(config.task)
    try:
        if hasattr(module, "run"):
            return module.run(config, workdir)
        try:
            task = module.build(config)
        except ValueError as e:
            raise UsageError(str(e)) from e
        return train_and_evaluate(config, workdir, task)
    except (FileNotFoundError, CheckpointError) as e:  # data or checkpoint files named in the config
        raise UsageError(str(e)) from e
