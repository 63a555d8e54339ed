"""Task registry: config.task -> module. A module exposes either `build(config) -> Task` (run by
the generic loop in jdjax.train.loop) or `run(config, workdir) -> dict` (simulations), and
optionally `validate(config) -> list[str]`. Modules are imported lazily."""

import importlib

TASKS = {
    "ad_blending": "jdjax.tasks.ad_blending",
    "classification": "jdjax.tasks.classification",
    "contrastive": "jdjax.tasks.contrastive",
    "ctr": "jdjax.tasks.ctr",
    "delayed_feedback": "jdjax.tasks.delayed_feedback",
    "page_click": "jdjax.tasks.page_click",
    "pyra": "jdjax.tasks.pyra",
}


def get_task_module(name: str):
    if name not in TASKS:
        raise KeyError(name)
    return importlib.import_module(TASKS[name])
