"""The sweep runner: several jobs in one workdir, finished ones skipped, interrupted ones resumed.

Every comparison (PYRA's runs, the CTR model x seed table, the VTAB-1k tasks, the ad-blending
click models, the multi-seed benchmarks) is a list of `Job`s run by `run_sweep`.

On-disk contract:

    <workdir>/<job.name>/                the job's own workdir (a loop run resumes from its ckpt/)
    <workdir>/<job.name>/results.json    what the job returned, with "status":
                                           "completed"  final: a rerun skips the job and reads this
                                           "preempted"  stopped by SIGTERM; a rerun resumes it
                                           "failed"     raised ("error" says what); a rerun retries it

A job is `run(job_workdir) -> dict` holding "status" ("completed", "preempted", or "failed" for a
nested sweep whose own jobs failed; a loop run's `train_and_evaluate` results qualify as they are). A job that raises is recorded as failed, its
error is printed, and the sweep goes on with the next job. SIGTERM (a preempted pod) lets the
running job save and stop (the loop's own handler), then the sweep starts no further job. The
sweep's status is "preempted" if it was stopped, else "failed" if any job failed, else
"completed".

In multi-process runs every process runs every job (jobs are collective); process 0 writes.
"""

from __future__ import annotations

import dataclasses
import sys
import traceback
from collections.abc import Callable

import jax

from jdjax.io import as_path, read_json, write_json, write_text
from jdjax.train.logging import is_main_process
from jdjax.train.loop import Preemption

RESULTS_FILE = "results.json"
COMPLETED, PREEMPTED, FAILED = "completed", "preempted", "failed"


@dataclasses.dataclass(frozen=True)
class Job:
    """One run of a sweep: `run(workdir/<name>) -> results dict with "status"`."""

    name: str
    run: Callable[[str], dict]


@dataclasses.dataclass
class SweepResult:
    status: str  # completed | preempted | failed
    results: dict[str, dict]  # job name -> results, for the completed jobs, in job order
    failed: dict[str, str]  # job name -> error


def run_names(value) -> list[str]:
    """A config's comma-separated list of runs ('dense, tempme' -> ['dense', 'tempme'])."""
    return [w.strip() for w in str(value).split(",") if w.strip()]


def run_name_errors(field: str, value, known) -> list[str]:
    """The config error for a run list `value` (config field `field`) holding a word outside `known`
    (an empty list is one)."""
    if run_names(value) and all(w in known for w in run_names(value)):
        return []
    return [f"{field}={value!r}: each of its comma-separated words must be one of {tuple(known)}."]


def read_results(workdir) -> dict | None:
    """The results.json in `workdir` (str, pathlib or epath path) if its job completed, else None."""
    path = as_path(workdir) / RESULTS_FILE
    if not path.exists():
        return None
    results = read_json(path)
    return results if results.get("status") == COMPLETED else None


def write_results(workdir, results: dict) -> None:
    """Writes results.json atomically, on process 0."""
    if is_main_process():
        as_path(workdir).mkdir(parents=True, exist_ok=True)
        write_json(as_path(workdir) / RESULTS_FILE, results)


def run_sweep(workdir, jobs: list[Job], log: Callable[[str], None] | None = None, desc: str = "sweep") -> SweepResult:
    """Runs `jobs` in order in workdir/<job.name>; see the module docstring for the contract."""
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique, got {names}.")
    log = log or (print if is_main_process() else (lambda *_: None))
    root = as_path(workdir)
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    status = COMPLETED
    with Preemption() as stop:
        for job in jobs:
            sub = root / job.name
            done = read_results(sub)
            if done is not None:
                results[job.name] = done
                continue
            if stop.agreed():
                status = PREEMPTED
                break
            log(f"[jdjax] {desc}: {job.name} -> {sub}")
            try:
                out = job.run(str(sub))
            except Exception as e:  # noqa: BLE001 - one failed job must not end the sweep
                error = f"{type(e).__name__}: {e}"
                print(f"[jdjax] {desc}: {job.name} failed: {error}", file=sys.stderr, flush=True)
                traceback.print_exc(file=sys.stderr)
                write_results(sub, {"status": FAILED, "error": error})
                failed[job.name] = error
                continue
            write_results(sub, out)
            if out.get("status") == FAILED:  # a nested sweep whose own jobs failed
                failed[job.name] = str(out.get("error") or out.get("failed"))
                continue
            if out.get("status") != COMPLETED:  # the job saved its state and stopped (SIGTERM)
                status = PREEMPTED
                break
            results[job.name] = out
            if stop.agreed():
                status = PREEMPTED
                break
    if status == PREEMPTED:
        log(f"[jdjax] {desc}: stopped; rerun the same command to resume.")
    elif failed:
        status = FAILED
    return SweepResult(status, results, failed)


def run_from_backbone(workdir, init_from: str, pretrain: Job, export: Callable[[str, dict], str],
                      jobs: Callable[[str], list[Job]], desc: str = "sweep") -> SweepResult:
    """The two-stage recipe of the transfer methods (PYRA, TempMe): without `init_from`, the `pretrain`
    job runs first and `export(its workdir, its results) -> backbone path` (process 0 writes; every
    process waits for it); then `jobs(backbone)` run as one sweep. Returns the failed or preempted
    pretraining sweep as it is, else the second sweep."""
    backbone = init_from
    if not backbone:
        pre = run_sweep(workdir, [pretrain], desc=desc)
        if pre.status != COMPLETED:
            return pre
        backbone = export(str(as_path(workdir) / pretrain.name), pre.results[pretrain.name])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"{desc}_backbone_exported")
    return run_sweep(workdir, jobs(backbone), desc=desc)


def write_comparison(workdir, rows: list[dict], table: str) -> None:
    """comparison.md (the table) and comparison.json (the rows) in `workdir`, and the table printed (process 0)."""
    if is_main_process():
        write_text(as_path(workdir) / "comparison.md", table)
        write_json(as_path(workdir) / "comparison.json", rows)
        print("\n" + table, flush=True)
