"""Runs a config on every VTAB-1k task and writes the table with the group means and the average.

    python -m jdjax.tools.vtab_sweep --config=configs/pyra.py:vit_b16,high \\
        --config.init_from=imagenet21k_ViT-B_16.npz --data_dir=$HOME/tfds \\
        --workdir=runs/vtab-pyra-b16-high [--tasks=dtd,cifar100] [--config.x=y ...]

`--config` and its `--config.x=y` overrides work as for jdjax.main; `--data_dir` is short for
`--config.data.data_dir`. Each task trains in workdir/<task>, in this process, with
data.name=vtab and the task's name and class count set. A task that fails (missing data, NaN
loss) is reported and the sweep goes on; a rerun skips finished tasks (their results.json or
comparison.json) and resumes interrupted ones from their checkpoints.

The table (workdir/vtab_results.md and .json) lists the test accuracy of the checkpoint chosen on
the task's 200 validation images (`checkpoint.best_metric` must be a val metric) per task and per
run of the config (configs/pyra.py may train several: lora, tome-low, ...), the three group means
and the VTAB average (mean of the group means). The JSON also keeps the val accuracy and the
selected step of every run.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from jdjax import main as jmain  # defines --config (with overrides) and --workdir
from jdjax.data import vtab

_TASKS = flags.DEFINE_list("tasks", list(vtab.TASKS), "VTAB-1k tasks to run (default: all 19).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared TFDS ArrayRecord directory (sets config.data.data_dir).")


def task_results(workdir: str) -> dict[str, dict] | None:
    """{run: {'test', 'val', 'selected_step'}} of a finished task directory (comparison.json of
    configs/pyra.py, or results.json of a single-run config); None if it has not finished."""
    comparison = os.path.join(workdir, "comparison.json")
    if os.path.exists(comparison):
        with open(comparison) as f:
            return {
                row["run"]: {"test": row["test_accuracy"], "val": row.get("val_accuracy"),
                             "selected_step": row.get("selected_step")}
                for row in json.load(f)
            }
    results = os.path.join(workdir, "results.json")
    if os.path.exists(results):
        with open(results) as f:
            r = json.load(f)
        if r.get("status") == "completed" and "test/accuracy" in r:
            return {"model": {"test": r["test/accuracy"], "val": r.get("val/accuracy"),
                              "selected_step": r.get("selected_step")}}
    return None


def table(per_task: dict[str, dict[str, dict]]) -> tuple[str, dict]:
    """Markdown table (tasks as rows, runs as columns, test accuracy in %) and its JSON form."""
    runs = sorted({r for res in per_task.values() for r in res})
    summary = {
        run: vtab.vtab_average({t: 100 * res[run]["test"] for t, res in per_task.items() if run in res}) for run in runs
    }
    lines = ["| task | group | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for name, task in vtab.TASKS.items():
        if name in per_task:
            cells = [f"{100 * per_task[name][r]['test']:.2f}" if r in per_task[name] else "-" for r in runs]
            lines.append(f"| {name} | {task.group} | " + " | ".join(cells) + " |")
    for key in (*vtab.GROUPS, "average"):
        cells = [f"{summary[r][key]:.2f}" if key in summary[r] else "-" for r in runs]
        lines.append(f"| **{key}** | | " + " | ".join(cells) + " |")
    note = ("\nTest accuracy (%) of the checkpoint chosen on the 200 validation images (train on 800); group "
            "means over the tasks present; the average (mean of the three group means) only when every group "
            "has a task.\n")
    return "\n".join(lines) + "\n" + note, {"tasks": per_task, "summary": summary}


def task_config(base, name: str):
    config = base.copy_and_resolve_references()
    config.data.update(name="vtab", vtab_task=name, num_classes=vtab.TASKS[name].num_classes)
    return config


def usage_errors(base, tasks: list[str]) -> list[str]:
    """Problems of the sweep's arguments (after --data_dir is applied), found before anything runs."""
    errors = [] if tasks else ["--tasks is empty; name VTAB-1k tasks or leave it out for all 19."]
    unknown = [t for t in tasks if t not in vtab.TASKS]
    if unknown:
        errors.append(f"--tasks: unknown VTAB-1k tasks {unknown}; known: {', '.join(vtab.TASKS)}.")
    if "data" not in base or "vtab_task" not in base.data:
        errors.append("the config's data section has no `vtab_task`; use an image classification config "
                      "(configs/vit.py, configs/pyra.py).")
        return errors
    if not base.data.data_dir or not os.path.isdir(base.data.data_dir):
        errors.append(f"data_dir {base.data.data_dir!r} does not exist: pass --data_dir=DIR, a directory prepared "
                      "with `tfds build <builder> --data_dir=DIR --file_format=array_record` (jdjax/data/vtab.py "
                      "lists the builders).")
    if not base.checkpoint.best_metric.startswith("val/"):
        errors.append(f"checkpoint.best_metric={base.checkpoint.best_metric!r}: VTAB selects the checkpoint on the "
                      "validation split, never on test; use a val/ metric such as val/accuracy.")
    return errors


def main(argv):
    if len(argv) > 1:
        jmain.fail(f"unexpected arguments {argv[1:]}; pass everything as --flags.")
    base, workdir = jmain._CONFIG.value, jmain._WORKDIR.value
    if base is None or not workdir:
        jmain.fail("--config and --workdir are required, e.g. --config=configs/pyra.py:vit_b16 --workdir=runs/vtab.")
    if _DATA_DIR.value is not None and "data" in base:
        base.data.data_dir = _DATA_DIR.value
    errors = usage_errors(base, _TASKS.value)
    if errors:
        jmain.fail("\n  - ".join(["invalid sweep:", *errors]))
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    jmain.maybe_initialize_distributed(base)
    from jdjax import tasks

    try:  # config problems every task would hit (e.g. no init_from): say so once, before any training
        errors = jmain.validate(task_config(base, _TASKS.value[0]), tasks.get_task_module(base.task))
    except KeyError:
        errors = [f"config.task={base.task!r} is not a known task; known tasks: {sorted(tasks.TASKS)}."]
    if errors:
        jmain.fail("\n  - ".join(["invalid config:", *errors]))
    from jdjax.train.logging import is_main_process

    main_process = is_main_process()
    per_task, failed = {}, []
    for name in _TASKS.value:
        sub = os.path.join(workdir, name)
        done = task_results(sub)
        if done is None:
            print(f"[vtab_sweep] {name} -> {sub}", flush=True)
            try:
                jmain.run(task_config(base, name), sub)
            except Exception as e:  # noqa: BLE001 - one bad task (missing data, NaN loss) must not end the sweep
                print(f"[vtab_sweep] {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            done = task_results(sub)
        if done is None:
            failed.append(name)
        else:
            per_task[name] = done
    md, js = table(per_task)
    if main_process:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "vtab_results.md"), "w") as f:
            f.write(md)
        with open(os.path.join(workdir, "vtab_results.json"), "w") as f:
            json.dump({**js, "failed": failed}, f, indent=2)
        print(md, flush=True)
    if failed:
        print(f"[vtab_sweep] failed or unfinished: {', '.join(failed)}; rerun the same command to retry them.",
              flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=jmain.parse_flags)
