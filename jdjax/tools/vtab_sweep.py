"""Runs a config on every VTAB-1k task and writes the table with the group means and the average.

    python -m jdjax.tools.vtab_sweep --config=configs/pyra.py:vit_b16,high \\
        --config.init_from=imagenet21k_ViT-B_16.npz --data_dir=$HOME/tfds \\
        --workdir=runs/vtab-pyra-b16-high [--tasks=dtd,cifar100] [--config.x=y ...]

`--config` and its `--config.x=y` overrides work as for jdjax.main; `--data_dir` is short for
`--config.data.data_dir`. Each task is a job of the sweep runner (jdjax.train.sweep) in
workdir/<task>, in this process, with data.name=vtab and the task's name and class count set.
A task that fails (missing data, NaN loss) is reported and the sweep goes on; a rerun skips
finished tasks, resumes interrupted ones from their checkpoints and retries failed ones.

The table (workdir/vtab_results.md and .json) lists the test accuracy of the checkpoint chosen on
the task's 200 validation images (`checkpoint.best_metric` must be a val metric) per task and per
run of the config (configs/pyra.py may train several: lora, tome-low, ...), the three group means
and the VTAB average (mean of the group means). The JSON also keeps the val accuracy and the
selected step of every run.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from jdjax import cli, tasks
from jdjax.data import vtab
from jdjax.io import as_path, write_json, write_text
from jdjax.train import sweep
from jdjax.train.logging import is_main_process

_TASKS = flags.DEFINE_list("tasks", list(vtab.TASKS), "VTAB-1k tasks to run (default: all 19).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared TFDS ArrayRecord directory (sets config.data.data_dir).")


def task_results(results: dict) -> dict[str, dict]:
    """{run: {'test', 'val', 'selected_step'}} of a finished task's results: the runs of a
    comparison (configs/pyra.py) or the single run of a plain config ('model')."""
    if "runs" in results:
        return {row["run"]: {"test": row["test_accuracy"], "val": row.get("val_accuracy"),
                             "selected_step": row.get("selected_step")} for row in results["runs"]}
    return {"model": {"test": results["test/accuracy"], "val": results.get("val/accuracy"),
                      "selected_step": results.get("selected_step")}}


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


def main(base, workdir: str) -> None:
    if _DATA_DIR.value is not None and "data" in base:
        base.data.data_dir = _DATA_DIR.value
    errors = usage_errors(base, _TASKS.value)
    if errors:
        raise tasks.UsageError("\n  - ".join(["invalid sweep:", *errors]))
    tasks.check(task_config(base, _TASKS.value[0]))  # problems every task would hit: once, before any training
    jobs = [sweep.Job(name, lambda sub, name=name: tasks.run(task_config(base, name), sub)) for name in _TASKS.value]
    out = sweep.run_sweep(workdir, jobs, desc="vtab_sweep")
    per_task = {name: task_results(r) for name, r in out.results.items()}
    unfinished = [name for name in _TASKS.value if name not in per_task]
    md, js = table(per_task)
    if is_main_process():
        write_text(as_path(workdir) / "vtab_results.md", md)
        write_json(as_path(workdir) / "vtab_results.json", {**js, "failed": out.failed, "unfinished": unfinished})
        print(md, flush=True)
    if unfinished:
        print(f"[vtab_sweep] failed or unfinished: {', '.join(unfinished)}; rerun the same command to retry them.",
              flush=True)
        sys.exit(1)


def cli_main() -> None:
    """The command line (sys.argv): the flags above plus --config and --workdir."""
    cli.run_app(main, example="--config=configs/pyra.py:vit_b16 --workdir=runs/vtab", workdir_required=True)


if __name__ == "__main__":
    cli_main()
