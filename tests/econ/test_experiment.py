"""Online experiment API: estimates, restart equality, atomic saves and bad events (spec P1)."""

import json
import math
import os

import numpy as np
import pytest

from jdjax import io
from jdjax.econ.experiment import Click, Conversion, Experiment

ARMS = ("a", "b", "c")
CVR = {"a": 0.5, "b": 0.3, "c": 0.2}
MEAN_DELAY = {"a": 300.0, "b": 200.0, "c": 100.0}


def traffic(exp, rng, start, batches, batch=100, pending=None):
    """Requests at one per time unit, all clicked at once; conversions arrive late and are
    delivered (out of order) once their time has passed. Returns the assignments and the
    conversions still pending."""
    pending = [] if pending is None else pending
    assigned = []
    for j in range(batches):
        now = float(start + j * batch)
        due = [p for p in pending if p[1] <= now]
        pending = [p for p in pending if p[1] > now]
        rng.shuffle(due)
        exp.record([Conversion(c, t) for c, t in due])
        ids = [f"r{int(now) + i}" for i in range(batch)]
        arms = exp.assign(ids, now)
        assigned += arms
        exp.record([Click("c" + r[1:], r, now, arm) for r, arm in zip(ids, arms)])
        for r, arm in zip(ids, arms):
            if rng.uniform() < CVR[arm]:
                pending.append(("c" + r[1:], now + rng.exponential(MEAN_DELAY[arm])))
    return assigned, pending


def test_estimates_and_recommendation():
    exp = Experiment(ARMS, delay_rate_init=0.01, seed=1)
    assigned, _ = traffic(exp, np.random.default_rng(0), 0, 30)
    est = exp.estimates(now=3000.0)
    assert sum(e["requests"] for e in est.values()) == 3000 and sum(e["clicks"] for e in est.values()) == 3000
    assert est["a"]["cvr"] == pytest.approx(0.5, abs=0.06)
    assert est["a"]["delay_rate"] == pytest.approx(1 / 300, rel=0.3)
    assert est["a"]["naive_cvr"] < est["a"]["cvr"]  # pending conversions make the naive rate low
    assert sum(e["prob_best"] for e in est.values()) == pytest.approx(1.0)
    assert assigned.count("a") > assigned.count("c")
    rec = exp.recommendation(now=3000.0)
    assert rec["decided"] and rec["arm"] == "a" and rec["prob_best"] >= 0.95 and rec["rule"] == "prob_best"
    assert exp.estimates(now=3000.0) == est  # reports do not change the state


def test_fresh_experiment_reports_without_nan():
    exp = Experiment(ARMS)
    est = exp.estimates(now=0.0)
    for e in est.values():
        assert e["cvr"] == 0.0 and e["delay_rate"] is None and e["clicks"] == 0
    assert sum(e["prob_best"] for e in est.values()) == pytest.approx(1.0)
    assert not exp.recommendation(now=0.0)["decided"]
    exp.assign(["r1"], now=1.0)
    exp.record([Click("c1", "r1", 2.0)])
    assert all(math.isfinite(v["cvr"]) for v in exp.estimates(now=5.0).values())


def test_restart_continues_exactly(tmp_path):
    path = str(tmp_path / "exp.json")
    straight = Experiment(ARMS, seed=3)
    arms_straight, _ = traffic(straight, np.random.default_rng(5), 0, 12)

    first = Experiment(ARMS, seed=3)
    rng = np.random.default_rng(5)
    arms_first, pending = traffic(first, rng, 0, 6)
    first.save(path)
    del first
    restored = Experiment.load(path)
    arms_second, _ = traffic(restored, rng, 600, 6, pending=pending)

    assert arms_first + arms_second == arms_straight
    assert json.dumps(restored.to_json()) == json.dumps(straight.to_json())
    assert restored.estimates(now=1200.0) == straight.estimates(now=1200.0)
    # An event the platform re-sends after the restart is refused, not counted twice.
    with pytest.raises(ValueError, match="duplicate click"):
        restored.record([Click("c5", "r5", 0.0)])
    assert json.dumps(restored.to_json()) == json.dumps(straight.to_json())


def saved_experiment(tmp_path):
    """An experiment with every kind of record, saved to tmp_path / 'exp.json'; (experiment, path, bytes)."""
    path = tmp_path / "exp.json"
    exp = Experiment(ARMS)
    exp.assign(["r1", "r2"], now=1.0)
    exp.record([Click("c1", "r1", 2.0), Conversion("c1", 3.0)])
    exp.save(str(path))
    return exp, path, path.read_bytes()


def half_written_open(real_open):
    """An epath open() whose files fail half-way through a write, as on a full disk."""

    def open_(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        if "w" not in mode:
            return f

        class HalfWritten:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                f.write(data[: len(data) // 2])
                f.flush()
                raise OSError(28, "No space left on device")

        return HalfWritten()

    return open_


@pytest.mark.parametrize("failure", ["disk full mid-write", "rename fails"])
def test_failed_save_keeps_the_previous_state_file(tmp_path, monkeypatch, failure):
    exp, path, before = saved_experiment(tmp_path)
    exp.record([Click("c2", "r2", 4.0)])
    gpath = type(io.as_path(path))
    if failure == "disk full mid-write":
        monkeypatch.setattr(gpath, "open", half_written_open(gpath.open))
        message = "No space left"
    else:
        def broken_replace(self, target):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(gpath, "replace", broken_replace)
        message = "Permission denied"
    with pytest.raises(OSError, match=message):
        exp.save(str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["exp.json"]  # no temporary file left behind
    assert "c2" not in [c for c, _, _ in Experiment.load(str(path)).to_json()["clicks"]]


def test_save_takes_path_objects_and_refuses_missing_directories(tmp_path):
    exp, path, _ = saved_experiment(tmp_path)
    exp.save(path)  # a pathlib.Path works as a str
    assert json.dumps(Experiment.load(path).to_json()) == json.dumps(exp.to_json())
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        exp.save(str(tmp_path / "no" / "exp.json"))
    assert os.listdir(tmp_path) == ["exp.json"]


def test_zero_delay_conversions_round_trip(tmp_path):
    """All of an arm's conversions at the click time give delay_rate = inf; its saved state loads."""
    exp = Experiment(ARMS)
    ids = [f"r{i}" for i in range(9)]
    exp.assign(ids, now=1.0)
    exp.record([Click("c" + r[1:], r, 1.0) for r in ids] + [Conversion("c" + r[1:], 1.0) for r in ids])
    exp.assign(["r9"], now=1.0)
    assert math.inf in exp.to_json()["estimator"]["delay_rate"]
    exp.save(str(tmp_path / "exp.json"))
    restored = Experiment.load(str(tmp_path / "exp.json"))
    assert json.dumps(restored.to_json()) == json.dumps(exp.to_json())
    assert restored.assign(["r10", "r11"], now=2.0) == exp.assign(["r10", "r11"], now=2.0)


def test_load_rejects_missing_files_and_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Experiment.load(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="is a directory"):
        Experiment.load(str(tmp_path))
    assert os.listdir(tmp_path) == []


def edit(key, value):
    def change(data):
        data[key] = value
        return json.dumps(data).encode()

    return change


def edit_settings(key, value):
    def change(data):
        data["settings"][key] = value
        return json.dumps(data).encode()

    return change


def edit_estimator(key, value):
    def change(data):
        data["estimator"][key] = value
        return json.dumps(data).encode()

    return change


def first_arm_index_true(data):
    data["requests"][0][1] = True  # JSON true, which Python reads as 1
    return json.dumps(data).encode()


BROKEN_FILES = [
    ("not UTF-8", lambda data: json.dumps(data).encode().replace(b'"r1"', b'"r\xff1"'),
     "not a valid experiment state: not UTF-8 text"),
    ("truncated", lambda data: json.dumps(data).encode()[:150], "not a valid experiment state: broken JSON"),
    ("empty", lambda data: b"", "not a valid experiment state: broken JSON"),
    ("arm index true", first_arm_index_true, r"not a valid experiment state.*bad request record \['r1', True"),
    ("unknown request", edit("clicks", [["c1", "r-unknown", 2.0]]), "not a valid experiment state.*unknown request"),
    ("other format", edit("format", "jdjax.econ.experiment/0"), "not a valid experiment state.*format"),
    ("not an object", lambda data: b"[]", "not a valid experiment state"),
    ("arms a string", edit("arms", "abc"), "arms and prior must be lists"),
    ("prior true", edit("prior", [[True, 1.0], [1.0, 1.0], [1.0, 1.0]]), "prior must hold"),
    ("n_updates true", edit("n_updates", True), "n_updates must be an integer"),
    ("em_cycles true", edit_settings("em_cycles", True), "em_cycles and draws must be integers"),
    ("seed a string", edit_settings("seed", "7"), "seed must be an integer"),
    ("threshold a string", edit_settings("stop_threshold", "0.9"), "stop_threshold must be a finite number"),
    ("delay rate true", edit_estimator("delay_rate", [True, 0.01, 0.01]), "estimator state"),
    ("cvr above 1", edit_estimator("cvr", [1.5, 0.2, 0.2]), "estimator state"),
    ("nan cvr", edit_estimator("cvr", [math.nan, 0.2, 0.2]), "estimator state"),
]


@pytest.mark.parametrize("name,corrupt,message", BROKEN_FILES, ids=[c[0] for c in BROKEN_FILES])
def test_load_rejects_broken_files(tmp_path, name, corrupt, message):
    _, path, saved = saved_experiment(tmp_path)
    bad = corrupt(json.loads(saved))
    path.write_bytes(bad)
    with pytest.raises(ValueError, match=message) as err:
        Experiment.load(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == bad and os.listdir(tmp_path) == ["exp.json"]  # nothing written


def bad_event_cases():
    return [
        ("click for unknown request", [Click("c9", "nope", 5.0)], "unknown request"),
        ("unknown arm", [Click("c9", "r2", 5.0, arm="zzz")], "unknown arm"),
        ("wrong arm", [Click("c9", "r2", 5.0, arm="WRONG")], None),
        ("unknown click", [Conversion("nope", 9.0)], "unknown click"),
        ("conversion before click", [Conversion("c1", 1.5)], "before the click"),
        ("click before request", [Click("c9", "r2", 0.5)], "before its request"),
        ("negative time", [Click("c9", "r2", -1.0)], ">= 0"),
        ("nan time", [Conversion("c1", float("nan"))], "finite"),
        ("duplicate click id", [Click("c1", "r2", 5.0)], "duplicate click"),
        ("second click on a request", [Click("c9", "r1", 5.0)], "already has click"),
        ("duplicate conversion", [Conversion("c1", 9.0), Conversion("c1", 9.5)], "duplicate conversion"),
        ("good then bad", [Click("c9", "r2", 5.0), Conversion("c9", 6.0), Conversion("c404", 7.0)], "unknown click"),
    ]


@pytest.mark.parametrize("name,events,message", bad_event_cases(), ids=[c[0] for c in bad_event_cases()])
def test_bad_events_raise_and_leave_state_unchanged(name, events, message):
    exp = Experiment(ARMS, seed=0)
    arms = exp.assign(["r1", "r2", "r3"], now=1.0)
    exp.record([Click("c1", "r1", 2.0)])
    if name == "wrong arm":
        wrong = next(a for a in ARMS if a != arms[1])
        events, message = [Click("c9", "r2", 5.0, arm=wrong)], "was assigned"
    before = json.dumps(exp.to_json())
    with pytest.raises(ValueError, match=message):
        exp.record(events)
    assert json.dumps(exp.to_json()) == before


def test_bad_calls_raise_and_leave_state_unchanged():
    exp = Experiment(ARMS)
    exp.assign(["r1", "r2"], now=10.0)
    exp.record([Click("c1", "r1", 12.0)])
    before = json.dumps(exp.to_json())
    with pytest.raises(TypeError, match="Click or Conversion"):
        exp.record([Click("c2", "r2", 13.0), ("c1", 14.0)])
    assert json.dumps(exp.to_json()) == before
    for call, message in [
        (lambda: exp.assign(["r1"], now=20.0), "already assigned"),
        (lambda: exp.assign(["r3", "r3"], now=20.0), "already assigned"),
        (lambda: exp.assign([], now=20.0), "at least one"),
        (lambda: exp.assign(["r3"], now=11.0), "earlier than the latest"),
        (lambda: exp.assign(["r3"], now=-3.0), ">= 0"),
        (lambda: exp.assign([""], now=20.0), "non-empty string"),
        (lambda: exp.estimates(now=11.0), "earlier than the latest"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
        assert json.dumps(exp.to_json()) == before


def test_bad_experiment_definitions():
    with pytest.raises(ValueError, match="two distinct"):
        Experiment(["a", "a"])
    with pytest.raises(ValueError, match="unknown arm"):
        Experiment(ARMS, prior={"a": (1, 1), "b": (1, 1), "c": (1, 1), "d": (1, 1)})
    with pytest.raises(ValueError, match="no value"):
        Experiment(ARMS, cvr_init={"a": 0.1})
    with pytest.raises(ValueError, match="stopping rule"):
        Experiment(ARMS, stop_rule="gut feeling")
    exp = Experiment(ARMS, prior={"a": (2, 5), "b": (1, 1), "c": (1, 1)}, delay_rate_init=[0.1, 0.01, 0.001])
    assert exp.to_json()["prior"][0] == [2.0, 5.0]
