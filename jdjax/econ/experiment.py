"""Online experiment with delayed conversions: the API a serving platform calls (D-TS, spec P1).

    exp = Experiment(["creative_a", "creative_b", "creative_c"], delay_rate_init=1 / 3600)
    arms = exp.assign(["req-1", "req-2"], now=120.0)            # one D-TS update, one draw per request
    exp.record([Click("clk-9", "req-2", time=130.0),            # events arrive late and out of order
                Conversion("clk-9", time=4000.0)])
    exp.estimates(now=5000.0)       # per arm: CVR, delay rate, clicks, conversions, P(best)
    exp.recommendation(now=5000.0)  # the stopping rule (ours, not the paper's)
    exp.save("exp.json"); exp = Experiment.load("exp.json")

Units are clicks: a click belongs to one assigned request (at most one click per request), a
conversion to one click. Times are numbers in one unit of your choice (e.g. seconds); the delay
rate is per that unit, so set delay_rate_init to about 1 / (a guess of the mean delay).

Every call checks all its input before changing anything, so a ValueError leaves the experiment
exactly as it was; re-sending an event that was already recorded raises instead of counting it
twice. `save` writes through `jdjax.io` (a local path or a gs://... URI): a temporary file renamed
over the target, so a failed save leaves the previous state file as it was; `load` restores the
state exactly (a restored experiment continues with the same draws as one that never stopped) and
refuses a truncated, edited or otherwise corrupt file with a ValueError that names the path. The experiment is a small mutable object (appending events to a log in place
is what a platform needs); the statistics are the pure functions of `delayed_feedback`.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdjax import io
from jdjax.econ import delayed_feedback as df

FORMAT = "jdjax.econ.experiment/1"


class Click(NamedTuple):
    click_id: str
    request_id: str
    time: float
    arm: str | None = None  # the arm the platform served; checked against the assignment if given


class Conversion(NamedTuple):
    click_id: str
    time: float


_em_fit = jax.jit(df.em_fit, static_argnames="cycles")
_ts_assign = jax.jit(df.ts_assign, static_argnames="num_requests")
_decision_stats = jax.jit(df.decision_stats, static_argnames="num_draws")


def _bucket(n: int) -> int:
    """Padded size (power of two, >= 64) so that jitted functions compile for few shapes."""
    return max(64, 1 << max(n - 1, 0).bit_length())


def _check_time(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_id(value, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}.")
    return value


class Experiment:
    """A D-TS experiment over named arms.

    prior: Beta prior (a, b) of each arm's CVR, one pair for all arms or {arm: (a, b)};
    cvr_init, delay_rate_init: where the EM starts (scalar, [K] or {arm: value}); em_cycles: EM rounds
    per update; seed: drives every posterior draw; stop_rule / stop_threshold: our stopping rule,
    'prob_best' (stop when max P(best) >= threshold) or 'value_remaining' (stop when the 95th
    percentile of the relative value remaining <= threshold); draws: Monte-Carlo draws for P(best).
    """

    def __init__(
        self,
        arms: Sequence[str],
        *,
        prior=(1.0, 1.0),
        cvr_init=df.CVR_INIT,
        delay_rate_init=df.DELAY_RATE_INIT,
        em_cycles: int = df.EM_CYCLES,
        seed: int = 0,
        stop_rule: str = "prob_best",
        stop_threshold: float = 0.95,
        draws: int = 10_000,
    ):
        arms = tuple(_check_id(a, "arm name") for a in arms)
        if len(arms) < 2 or len(set(arms)) != len(arms):
            raise ValueError(f"an experiment needs at least two distinct arm names, got {list(arms)}.")
        self.arms = arms
        self._index = {a: k for k, a in enumerate(arms)}
        pairs = np.asarray(self._per_arm(prior, "prior", pair=True), float)
        if pairs.shape != (len(arms), 2) or not np.all(np.isfinite(pairs) & (pairs > 0)):
            raise ValueError(f"prior must be one (a, b) pair or {{arm: (a, b)}} with finite a, b > 0; got {prior!r}.")
        cvr = self._per_arm(cvr_init, "cvr_init")
        rate = self._per_arm(delay_rate_init, "delay_rate_init")
        if not all(0 < c <= 1 for c in cvr) or not all(0 < r < math.inf for r in rate):
            raise ValueError(f"need 0 < cvr_init <= 1 and 0 < delay_rate_init < inf, got {cvr} and {rate}.")
        if not _is_int(em_cycles) or em_cycles < 1 or not _is_int(draws) or draws < 1:
            raise ValueError(f"em_cycles and draws must be integers >= 1, got {em_cycles!r} and {draws!r}.")
        if not _is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        if stop_rule not in df.STOP_RULES:
            raise ValueError(f"unknown stopping rule {stop_rule!r}; use one of {df.STOP_RULES}.")
        if isinstance(stop_threshold, bool) or not isinstance(stop_threshold, numbers.Real) or not 0 < stop_threshold < math.inf:
            raise ValueError(f"stop_threshold must be a finite number > 0, got {stop_threshold!r}.")
        self.settings = {
            "seed": int(seed),
            "em_cycles": int(em_cycles),
            "stop_rule": stop_rule,
            "stop_threshold": float(stop_threshold),
            "draws": int(draws),
        }
        self._prior = pairs  # [K, 2]
        self._delay_rate = np.asarray(rate, float)  # [K] EM warm start
        self._cvr = np.asarray(cvr, float)  # [K]
        self._n_updates = 0
        self._requests: dict[str, tuple[int, float]] = {}  # request id -> (arm, time), in arrival order
        self._clicks: dict[str, tuple[str, float]] = {}  # click id -> (request id, time)
        self._click_of_request: dict[str, str] = {}
        self._conversions: dict[str, float] = {}  # click id -> time
        self._latest = 0.0  # latest time of any recorded event

    def _per_arm(self, value, what: str, pair: bool = False) -> list:
        if isinstance(value, dict):
            unknown = set(value) - set(self.arms)
            if unknown:
                raise ValueError(f"{what} names unknown arm(s) {sorted(unknown)}; arms are {list(self.arms)}.")
            missing = set(self.arms) - set(value)
            if missing:
                raise ValueError(f"{what} has no value for arm(s) {sorted(missing)}.")
            return [value[a] for a in self.arms]
        if pair or np.ndim(value) == 0:
            return [value] * len(self.arms)
        if len(value) != len(self.arms):
            raise ValueError(f"{what} has {len(value)} values for {len(self.arms)} arms.")
        return list(value)

    # ------------------------------------------------------------------------- events

    def assign(self, request_ids: Sequence[str], now: float) -> list[str]:
        """One update (EM warm-started from the last one) then one posterior draw per request.
        now: the requests' time, not earlier than any recorded event. Returns the arm names."""
        now = _check_time(now, "now")
        ids = [_check_id(r, "request id") for r in request_ids]
        if not ids:
            raise ValueError("assign needs at least one request id.")
        seen = set()
        for r in ids:
            if r in self._requests or r in seen:
                raise ValueError(f"request {r!r} was already assigned; request ids must be unique.")
            seen.add(r)
        self._check_now(now)
        with jax.enable_x64(True):
            state = self._fit(now)
            a, b = df.ts_params(state.conversions, state.exposure, (self._prior[:, 0], self._prior[:, 1]))
            arms = np.asarray(_ts_assign(self._key(0), a, b, num_requests=_bucket(len(ids))))[: len(ids)]
            self._delay_rate, self._cvr = np.asarray(state.delay_rate), np.asarray(state.cvr)
        for r, k in zip(ids, arms):
            self._requests[r] = (int(k), now)
        self._n_updates += 1
        self._latest = now
        return [self.arms[k] for k in arms]

    def record(self, events: Iterable[Click | Conversion]) -> None:
        """Records clicks and conversions, in the given order; all or nothing."""
        clicks, click_of_request, conversions = {}, {}, {}
        latest = self._latest
        for event in events:
            if isinstance(event, Click):
                cid, rid = _check_id(event.click_id, "click id"), _check_id(event.request_id, "request id")
                t = _check_time(event.time, f"time of click {cid!r}")
                if cid in self._clicks or cid in clicks:
                    raise ValueError(f"duplicate click {cid!r}: it was already recorded.")
                if rid not in self._requests:
                    raise ValueError(f"click {cid!r} is for unknown request {rid!r}; assign requests before their clicks.")
                if rid in self._click_of_request or rid in click_of_request:
                    clicked = self._click_of_request.get(rid) or click_of_request[rid]
                    raise ValueError(f"request {rid!r} already has click {clicked!r}; one click per request.")
                arm, request_time = self._requests[rid]
                if event.arm is not None:
                    if event.arm not in self._index:
                        raise ValueError(f"click {cid!r} names unknown arm {event.arm!r}; arms are {list(self.arms)}.")
                    if self._index[event.arm] != arm:
                        raise ValueError(f"click {cid!r} says arm {event.arm!r} but request {rid!r} was assigned {self.arms[arm]!r}.")
                if t < request_time:
                    raise ValueError(f"click {cid!r} at {t} is before its request {rid!r} at {request_time}.")
                clicks[cid] = (rid, t)
                click_of_request[rid] = cid
            elif isinstance(event, Conversion):
                cid = _check_id(event.click_id, "click id")
                t = _check_time(event.time, f"time of the conversion of click {cid!r}")
                click = self._clicks.get(cid) or clicks.get(cid)
                if click is None:
                    raise ValueError(f"conversion for unknown click {cid!r}; record the click first.")
                if cid in self._conversions or cid in conversions:
                    raise ValueError(f"duplicate conversion for click {cid!r}: it was already recorded.")
                if t < click[1]:
                    raise ValueError(f"conversion of click {cid!r} at {t} is before the click at {click[1]}.")
                conversions[cid] = t
            else:
                raise TypeError(f"events must be Click or Conversion, got {event!r}.")
            latest = max(latest, t)
        self._clicks.update(clicks)
        self._click_of_request.update(click_of_request)
        self._conversions.update(conversions)
        self._latest = latest

    # ------------------------------------------------------------------------- reports

    def estimates(self, now: float) -> dict:
        """Estimates at `now` (an EM update from the current warm start, not stored):
        {arm: {requests, clicks, conversions, cvr, naive_cvr, delay_rate, effective_exposure, prob_best}}.
        delay_rate is None while an arm has no conversion (it is not identified yet)."""
        now = _check_time(now, "now")
        self._check_now(now)
        with jax.enable_x64(True):
            state = self._fit(now)
            prob_best, _ = self._decision(state)
        requests = np.bincount(np.array([k for k, _ in self._requests.values()], int), minlength=len(self.arms))
        out = {}
        for k, arm in enumerate(self.arms):
            conversions, clicks = float(state.conversions[k]), float(state.clicks[k])
            out[arm] = {
                "requests": int(requests[k]),
                "clicks": int(clicks),
                "conversions": int(conversions),
                "cvr": float(state.cvr[k]),
                "naive_cvr": conversions / clicks if clicks else 0.0,
                "delay_rate": float(state.delay_rate[k]) if conversions else None,
                "effective_exposure": float(state.exposure[k]),
                "prob_best": float(prob_best[k]),
            }
        return out

    def recommendation(self, now: float) -> dict:
        """Our stopping rule (not the paper's) on the D-TS posterior at `now`:
        {decided, arm (the leader), prob_best, value_remaining, rule, threshold}."""
        now = _check_time(now, "now")
        self._check_now(now)
        with jax.enable_x64(True):
            prob_best, value_remaining = self._decision(self._fit(now))
        decided = bool(df.stop_decision(prob_best, value_remaining, self.settings["stop_rule"], self.settings["stop_threshold"]))
        leader = int(np.argmax(prob_best))
        return {
            "decided": decided,
            "arm": self.arms[leader],
            "prob_best": float(prob_best[leader]),
            "value_remaining": float(value_remaining),
            "rule": self.settings["stop_rule"],
            "threshold": self.settings["stop_threshold"],
        }

    # ------------------------------------------------------------------------- internals

    def _check_now(self, now: float) -> None:
        if now < self._latest:
            raise ValueError(f"now={now} is earlier than the latest recorded event ({self._latest}); pass the current time.")

    def _key(self, stream: int):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.settings["seed"]), self._n_updates), stream)

    def _observation(self, now: float) -> df.Observation:
        n = len(self._clicks)
        size = _bucket(n)
        arm = np.full(size, -1, np.int32)
        elapsed, delay = np.zeros(size), np.zeros(size)
        converted = np.zeros(size, bool)
        for i, (cid, (rid, t)) in enumerate(self._clicks.items()):
            arm[i] = self._requests[rid][0]
            elapsed[i] = now - t
            if cid in self._conversions:
                converted[i], delay[i] = True, self._conversions[cid] - t
        return df.Observation(jnp.asarray(arm), jnp.asarray(elapsed), jnp.asarray(converted), jnp.asarray(delay), jnp.asarray(now))

    def _fit(self, now: float) -> df.ArmState:
        state = df.init_state(len(self.arms), self._delay_rate, self._cvr)
        return jax.tree.map(np.asarray, _em_fit(self._observation(now), state, cycles=self.settings["em_cycles"]))

    def _decision(self, state: df.ArmState):
        a, b = df.ts_params(state.conversions, state.exposure, (self._prior[:, 0], self._prior[:, 1]))
        prob_best, value_remaining = _decision_stats(self._key(1), jnp.asarray(a), jnp.asarray(b), num_draws=self.settings["draws"])
        return np.asarray(prob_best), np.asarray(value_remaining)

    # ------------------------------------------------------------------------- persistence

    def to_json(self) -> dict:
        """The whole state as JSON-serialisable data (floats round-trip exactly)."""
        return {
            "format": FORMAT,
            "arms": list(self.arms),
            "settings": dict(self.settings),
            "prior": self._prior.tolist(),
            "estimator": {"delay_rate": self._delay_rate.tolist(), "cvr": self._cvr.tolist()},
            "n_updates": self._n_updates,
            "requests": [[r, k, t] for r, (k, t) in self._requests.items()],
            "clicks": [[c, r, t] for c, (r, t) in self._clicks.items()],
            "conversions": [[c, t] for c, t in self._conversions.items()],
        }

    @classmethod
    def from_json(cls, data: dict) -> Experiment:
        """Inverse of `to_json`; every event is validated again. Raises ValueError on bad data."""
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            arms, prior = data["arms"], data["prior"]
            if not isinstance(arms, list) or not isinstance(prior, list) or len(prior) != len(arms):
                raise ValueError(f"arms and prior must be lists of the same length, got {arms!r} and {prior!r}")
            if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for pair in prior for v in pair):
                raise ValueError(f"prior must hold (a, b) number pairs, got {prior!r}")
            s = data["settings"]
            exp = cls(  # the EM start is overwritten by the saved warm start below
                arms,
                prior={a: tuple(p) for a, p in zip(arms, prior)},
                em_cycles=s["em_cycles"],
                seed=s["seed"],
                stop_rule=s["stop_rule"],
                stop_threshold=s["stop_threshold"],
                draws=s["draws"],
            )
            for r, k, t in data["requests"]:
                _check_id(r, "request id")
                t = _check_time(t, f"time of request {r!r}")
                if r in exp._requests or not (_is_int(k) and 0 <= k < len(arms)) or t < exp._latest:
                    raise ValueError(f"bad request record {[r, k, t]!r}")
                exp._requests[r] = (int(k), t)
                exp._latest = t
            exp.record([Click(c, r, t) for c, r, t in data["clicks"]])
            exp.record([Conversion(c, t) for c, t in data["conversions"]])
            rate, cvr = data["estimator"]["delay_rate"], data["estimator"]["cvr"]
            numbers_ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in [*rate, *cvr])
            # The EM gives delay_rate = inf to an arm whose conversions all came with zero delay.
            if not (numbers_ok and len(rate) == len(cvr) == len(arms) and all(0 < v <= math.inf for v in rate)
                    and all(0 <= v <= 1 for v in cvr)):
                raise ValueError("estimator state must hold one delay_rate in (0, inf] and one cvr in [0, 1] per arm, "
                                 f"got {rate!r} and {cvr!r}")
            exp._delay_rate, exp._cvr = np.asarray(rate, float), np.asarray(cvr, float)
            n_updates = data["n_updates"]
            if not _is_int(n_updates) or n_updates < 0:
                raise ValueError(f"n_updates must be an integer >= 0, got {n_updates!r}")
            exp._n_updates = n_updates
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not a valid experiment state ({type(e).__name__}: {e}).") from None
        return exp

    def save(self, path) -> None:
        """Writes the state to `path` (a local path or a URI that `jdjax.io` opens) atomically:
        readers, and a later `load`, see the previous file or the new one, never a part."""
        path = io.as_path(path)
        if not io.is_remote(path) and not path.parent.is_dir():
            raise FileNotFoundError(f"cannot save the experiment state to {str(path)!r}: directory {str(path.parent)!r} "
                                    "does not exist; create it first.")
        io.write_text(path, json.dumps(self.to_json()))

    @classmethod
    def load(cls, path) -> Experiment:
        """Restores an experiment written by `save`. A missing file raises FileNotFoundError; a
        file that is not a saved state (truncated, edited, not UTF-8, another format) ValueError;
        both name the path."""
        try:
            raw = io.as_path(path).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"experiment state {str(path)!r} not found; create the experiment with Experiment(arms).") from None
        except IsADirectoryError:
            raise ValueError(f"{path} is a directory, not an experiment state file; pass the file `save` wrote.") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not a valid experiment state: not UTF-8 text ({e.reason} at byte {e.start}); "
                             "restore a backup.") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a valid experiment state: broken JSON ({e}); restore a backup.") from None
        try:
            return cls.from_json(data)
        except ValueError as e:
            raise ValueError(f"{path} is {e} Restore a backup or start a new experiment.") from None
