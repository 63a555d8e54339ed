"""Runs a config on every VTAB-1k task and writes the table with the group means and the average.

    python -m jdjax.tools.vtab_sweep --config=configs/pyra.py:vit_b16,high \
        --config.init_from=imagenet21k_ViT-B_16.npz --config.data.data_dir=$HOME/tfds \
        --workdir=runs/vtab-pyra-b16-high [--tasks=dtd,cifar100]

`--config` and its `--config.x=y` overrides work as for jdjax.main. Each task trains in
workdir/<task> with data.name=vtab, the task and its class count set; a rerun skips finished
tasks and resumes interrupted ones; a task that fails is reported and the sweep goes on. The
table (workdir/vtab_results.md and .json) lists the test accuracy of the checkpoint chosen on
the task's 200 validation images, per task and per run of the config (PYRA's config may train
several: lora, tome-low, ...), the three group means and the VTAB average (mean of the group
means).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from jdjax import main as jmain  # defines --config (with overrides) and --workdir
from jdjax.data import vtab

_TASKS = flags.DEFINE_list("tasks", list(vtab.TASKS), "VTAB-1k tasks to run (default: all 19).")


def task_results(workdir: str) -> dict[str, float] | None:
    """{run: test accuracy} of a finished task directory (comparison.json of configs/pyra.py, or
    results.json of a single-run config); None if it has not finished."""
    comparison = os.path.join(workdir, "comparison.json")
    if os.path.exists(comparison):
        with open(comparison) as f:
            return {row["run"]: row["test_accuracy"] for row in json.load(f)}
    results = os.path.join(workdir, "results.json")
    if os.path.exists(results):
        with open(results) as f:
            r = json.load(f)
        if r.get("status") == "completed" and "test/accuracy" in r:
            return {"model": r["test/accuracy"]}
    return None


def table(per_task: dict[str, dict[str, float]]) -> tuple[str, dict]:
    """Markdown table (tasks as rows, runs as columns, accuracies in %) and its JSON form."""
    runs = sorted({r for accs in per_task.values() for r in accs})
    summary = {run: vtab.vtab_average({t: 100 * a[run] for t, a in per_task.items() if run in a}) for run in runs}
    lines = ["| task | group | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for name, task in vtab.TASKS.items():
        if name in per_task:
            cells = [f"{100 * per_task[name][r]:.2f}" if r in per_task[name] else "-" for r in runs]
            lines.append(f"| {name} | {task.group} | " + " | ".join(cells) + " |")
    for key in (*vtab.GROUPS, "average"):
        cells = [f"{summary[r][key]:.2f}" if key in summary[r] else "-" for r in runs]
        lines.append(f"| **{key}** | | " + " | ".join(cells) + " |")
    note = ("\nTest accuracy (%) of the checkpoint chosen on the 200 validation images; group means over the tasks "
            "present; the average (mean of the three group means) only when every group has a task.\n")
    return "\n".join(lines) + "\n" + note, {"tasks": per_task, "summary": summary}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass everything as --flags.")
    base, workdir = jmain._CONFIG.value, jmain._WORKDIR.value
    if base is None or not workdir:
        raise app.UsageError("--config and --workdir are required.")
    for name in _TASKS.value:
        vtab.get_task(name)
    per_task, failed = {}, []
    for name in _TASKS.value:
        sub = os.path.join(workdir, name)
        done = task_results(sub)
        if done is None:
            print(f"[vtab_sweep] {name} -> {sub}", flush=True)
            config = base.copy_and_resolve_references()
            config.data.update(name="vtab", vtab_task=name, num_classes=vtab.TASKS[name].num_classes)
            try:
                jmain.run(config, sub)
            except Exception as e:  # one bad task (missing data, NaN) must not end the sweep
                print(f"[vtab_sweep] {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            done = task_results(sub)
        if done is None:
            failed.append(name)
        else:
            per_task[name] = done
    md, js = table(per_task)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "vtab_results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(workdir, "vtab_results.json"), "w") as f:
        json.dump({**js, "failed": failed}, f, indent=2)
    print(md, flush=True)
    if failed:
        print(f"[vtab_sweep] failed or unfinished: {', '.join(failed)}; rerun the same command to retry them.", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=jmain.parse_flags)
