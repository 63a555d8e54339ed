"""The sweep runner's on-disk contract: skip the finished, resume the interrupted, report the
failed and go on, stop cleanly on SIGTERM."""

import json
import os
import signal

import pytest

from jdjax.train import sweep


class Recorder:
    """Jobs that log their calls; `behaviour[name]` is 'ok', 'raise', 'preempt' or 'sigterm'."""

    def __init__(self, **behaviour):
        self.behaviour = behaviour
        self.calls = []

    def job(self, name):
        def run(workdir):
            self.calls.append(name)
            assert workdir.endswith(os.path.join("", name))
            what = self.behaviour.get(name, "ok")
            if what == "raise":
                raise RuntimeError(f"{name} broke")
            if what == "preempt":
                return {"status": "preempted", "step": 3}
            if what == "nested_failure":
                return {"status": "failed", "failed": {"inner": "RuntimeError: x"}}
            if what == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            return {"status": "completed", "value": name}

        return sweep.Job(name, run)

    def jobs(self, *names):
        return [self.job(n) for n in names]


def status_of(workdir, name):
    with open(os.path.join(workdir, name, "results.json")) as f:
        return json.load(f)["status"]


def test_completed_jobs_are_skipped_on_rerun(tmp_path):
    rec = Recorder()
    first = sweep.run_sweep(tmp_path, rec.jobs("a", "b"))
    assert first.status == "completed" and list(first.results) == ["a", "b"]
    assert first.results["b"] == {"status": "completed", "value": "b"}
    again = sweep.run_sweep(tmp_path, rec.jobs("a", "b", "c"))
    assert rec.calls == ["a", "b", "c"]
    assert again.status == "completed" and list(again.results) == ["a", "b", "c"]
    assert sweep.read_results(tmp_path / "a") == {"status": "completed", "value": "a"}


def test_preempted_job_stops_the_sweep_and_resumes(tmp_path):
    rec = Recorder(b="preempt")
    out = sweep.run_sweep(tmp_path, rec.jobs("a", "b", "c"))
    assert out.status == "preempted" and rec.calls == ["a", "b"]
    assert status_of(tmp_path, "b") == "preempted" and sweep.read_results(tmp_path / "b") is None
    rec.behaviour = {}
    out = sweep.run_sweep(tmp_path, rec.jobs("a", "b", "c"))
    assert rec.calls == ["a", "b", "b", "c"] and out.status == "completed"


def test_failed_job_is_reported_and_the_rest_go_on(tmp_path, capsys):
    rec = Recorder(b="raise")
    out = sweep.run_sweep(tmp_path, rec.jobs("a", "b", "c"))
    assert rec.calls == ["a", "b", "c"]
    assert out.status == "failed" and list(out.results) == ["a", "c"]
    assert out.failed == {"b": "RuntimeError: b broke"}
    assert "b failed: RuntimeError: b broke" in capsys.readouterr().err
    assert status_of(tmp_path, "b") == "failed"
    rec.behaviour = {}  # fixed: the rerun retries only the failed job
    out = sweep.run_sweep(tmp_path, rec.jobs("a", "b", "c"))
    assert rec.calls == ["a", "b", "c", "b"] and out.status == "completed"


def test_a_nested_sweep_with_failures_counts_as_failed_and_the_rest_go_on(tmp_path):
    rec = Recorder(b="nested_failure")
    out = sweep.run_sweep(tmp_path, rec.jobs("a", "b", "c"))
    assert rec.calls == ["a", "b", "c"] and out.status == "failed" and list(out.failed) == ["b"]
    assert status_of(tmp_path, "b") == "failed"


def test_sigterm_lets_the_running_job_finish_and_starts_no_other(tmp_path):
    rec = Recorder(b="sigterm")
    previous = signal.getsignal(signal.SIGTERM)
    out = sweep.run_sweep(tmp_path, rec.jobs("a", "b", "c"))
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is restored
    assert out.status == "preempted" and rec.calls == ["a", "b"]
    assert status_of(tmp_path, "b") == "completed" and not (tmp_path / "c").exists()
    rec.behaviour = {}
    assert sweep.run_sweep(tmp_path, rec.jobs("a", "b", "c")).status == "completed"
    assert rec.calls == ["a", "b", "c"]


def test_job_names_must_be_unique(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        sweep.run_sweep(tmp_path, Recorder().jobs("a", "a"))


def test_results_json_is_never_half_written(tmp_path):
    sweep.write_results(tmp_path / "a", {"status": "completed"})
    assert sorted(os.listdir(tmp_path / "a")) == ["results.json"]
