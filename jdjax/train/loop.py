"""The one training loop: sharded, checkpointed, resumable, used by every trainable task.

Sections: mesh and shardings -> optimizer -> state (restored or born sharded) -> compiled steps
-> the step loop (logging, eval, checkpoints, preemption, non-finite guard) -> final report
(the checkpoint chosen on the validation split, evaluated on test).

The state carries the task's mutable model state (BatchNorm statistics, Dice running averages)
and, with `config.ema_decay` > 0, a moving average of parameters and model state; every eval
scores the raw weights (val/...) and the average (val_ema/...) and the better one on
`checkpoint.best_metric` competes for the best checkpoint; results.json names the winner
('selected_weights').
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jdjax.data import pipeline
from jdjax.io import as_path, write_json
from jdjax.train import sharding as shd
from jdjax.train.checkpoint import Checkpointer, abstract_with_shardings
from jdjax.train.logging import (
    Chrono,
    MetricWriter,
    is_main_process,
    progress_bar,
    save_config,
)
from jdjax.train.optim import count_params, make_optimizer, trainable_mask
from jdjax.train.state import TrainState
from jdjax.train.task import Task
from jdjax.train.validation import check_loop_config

# Steps dispatched ahead of the host. Enough to hide dispatch latency; unbounded queues of
# collectives have hung XLA's in-process CPU all-reduce with 8 fake devices on 2 cores.
MAX_STEPS_IN_FLIGHT = 4
# The initial state is computed once, so its compile time is all that matters: on CPU, LLVM's
# expensive passes take a third of it (SCPNet's embedded model, about 100 threefry draws: 11.0 s ->
# 7.1 s on 2 quiet cores), for bit-identical values (tests/train/test_model_state.py).
CPU_INIT_COMPILER_OPTIONS = {"xla_llvm_disable_expensive_passes": True}


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss. The message says whether that step's batch held
    non-finite inputs (then the data is at fault) and which checkpoint, if any, a rerun resumes from."""


# Train-step metrics under this prefix count the non-finite values of each floating input of the
# batch; the loop reads them for its NonFiniteLossError message and does not log them.
NONFINITE_INPUTS = "nonfinite_inputs/"


class Preemption:
    """Turns SIGTERM into a flag that the loop (and the sweep runner, between runs) polls; the
    loop then saves and exits cleanly. A context manager: the previous handler comes back on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption support
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """True on every process if any process was asked to stop (one collective when multi-host)."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))


def stateful_functions(task: Task) -> tuple:
    """(init_model_state, loss, predict) of `task` in the stateful form (see Task): a stateless task's
    state is {} and passes through its loss unchanged. The loop calls only these."""
    if task.init_model_state is not None:
        return task.init_model_state, task.loss, task.predict

    def loss(params, model_state, batch, rng):
        return (*task.loss(params, batch, rng), model_state)

    return (lambda rng: {}), loss, lambda params, model_state, batch: task.predict(params, batch)


def ema_update(ema, new, decay: float):
    """The moving average one step on: ema + (1 - decay) (new - ema) for floating leaves (equal to
    decay * ema + (1 - decay) * new, and exactly ema where new == ema, e.g. frozen parameters);
    other leaves (counters) take `new`."""
    return jax.tree.map(lambda e, x: e + (1 - decay) * (x - e) if jnp.issubdtype(x.dtype, jnp.inexact) else x, ema, new)


def make_train_step(task: Task, tx, schedule, mask, ema_decay: float = 0.0):
    """train_step(state, batch, rng) -> (state, metrics); rng is the run's base key as raw uint32 data.
    The model state comes out of the loss; the EMA (when `state.ema` is set) follows the new weights."""
    _, task_loss, _ = stateful_functions(task)

    def train_step(state: TrainState, batch, rng):
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(rng), state.step)
        # Frozen parameters get no gradient at all (XLA drops their backward pass).
        def loss_fn(params):
            params = jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)
            loss, aux, model_state = task_loss(params, state.model_state, batch, step_rng)
            return loss, (aux, model_state)

        (loss, (aux, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = ema_update(ema, {"params": params, "model_state": model_state}, ema_decay)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step), **aux}
        metrics.update(_count_nonfinite(batch))
        return TrainState(state.step + 1, params, opt_state, model_state, ema), metrics

    return train_step


def _count_nonfinite(batch) -> dict:
    """{NONFINITE_INPUTS + key: number of NaN/inf values} for every floating leaf of `batch`."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    return {
        NONFINITE_INPUTS + jax.tree_util.keystr(path, simple=True, separator="/"): jnp.sum(~jnp.isfinite(x))
        for path, x in leaves
        if jnp.issubdtype(x.dtype, jnp.inexact)
    }


def _nonfinite_message(loss: float, step: int, bad_inputs: dict[str, int], latest_step, workdir, every_steps) -> str:
    """The NonFiniteLossError message: the cause (the batch's inputs, or the optimization) and what a
    rerun resumes from (a checkpoint only when one was saved)."""
    if bad_inputs:
        counts = ", ".join(f"{k!r}: {n}" for k, n in sorted(bad_inputs.items()))
        cause = (f"The batch of step {step} itself holds NaN or infinite inputs (non-finite values per input: {counts}): "
                 "the training data is at fault, not the learning rate. Find and fix or drop those values in the "
                 "training data (the CSV/Parquet readers name the file, row and column), then rerun.")
    else:
        cause = ("Lower the learning rate or enable gradient clipping (--config.optimizer.grad_clip_norm), then rerun.")
    if latest_step is None:
        saved = f"No checkpoint was saved before it (one is saved every {every_steps} steps): a rerun starts from step 0."
    else:
        saved = f"The last good checkpoint (step {latest_step}) is kept in {workdir}/ckpt: a rerun resumes from it."
    return f"the training loss became {loss} at step {step}. Training stopped. {cause} {saved}"


def evaluate(predict_step, weights, source, global_batch: int, mesh, summarize) -> dict[str, float]:
    """Metrics over every example of `source` (last batch padded, padding masked out), with
    `predict_step(weights, batch)` (in the loop, weights = {'params': ..., 'model_state': ...}).

    Outputs stay on device until the split is done, so batches are dispatched back to back.
    """
    outputs: dict[str, list] = {}
    for local in pipeline.eval_batches(source, global_batch, jax.process_index(), jax.process_count()):
        batch = shd.global_batch_from_local(local, mesh)
        out = predict_step(weights, batch)
        out["mask"] = batch["mask"]
        for k, v in out.items():
            outputs.setdefault(k, []).append(v)
    cat = {k: np.concatenate([_to_host(x) for x in v]) for k, v in outputs.items()}
    keep = cat.pop("mask") > 0
    return summarize({k: v[keep] for k, v in cat.items()})


def weights_of(state: TrainState, which: str) -> dict:
    """The weights {'params', 'model_state'} that eval runs on: 'raw' (the trained ones) or 'ema'."""
    return {"params": state.params, "model_state": state.model_state} if which == "raw" else state.ema


def _to_host_tree(tree):
    """A sharded pytree as full NumPy arrays on every process."""
    return jax.tree.map(_to_host, tree)


def _to_host(x) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass
class Compiled:
    """A task's mesh, shardings and jitted functions, ready to run (see `compile_task`)."""

    mesh: Mesh
    state_sh: TrainState
    param_sh: object
    abstract_state: TrainState  # ShapeDtypeStruct leaves with shardings
    init_state: object  # () -> TrainState, born sharded (pretrained weights applied)
    train_step: object  # (state, batch, rng) -> (state, metrics); donates state
    predict_step: object  # ({'params', 'model_state'}, batch) -> per-example outputs
    rng: jax.Array  # the base training key (raw uint32 data), replicated
    num_params: int
    num_trainable: int


def compile_task(config, task: Task) -> Compiled:
    """Builds the mesh, optimizer, shardings and jitted steps for `task` under `config`."""
    mesh = shd.make_mesh(dict(config.mesh))
    rules = shd.rules_from_config(config.sharding_rules)
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    tx, schedule = make_optimizer(config.optimizer, int(config.num_train_steps), task.trainable, task.lr_multipliers)
    init_model_state, _, predict = stateful_functions(task)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(task.init, init_rng)
        param_sh = shd.logical_shardings(boxed, mesh, rules)
        model_state_sh = shd.logical_shardings(jax.eval_shape(init_model_state, init_rng), mesh, rules)
    abstract_params = nn.meta.unbox(boxed)
    mask = trainable_mask(abstract_params, task.trainable)
    opt_sh = _opt_state_shardings(tx, jax.eval_shape(tx.init, abstract_params), param_sh, mesh)
    weights_sh = {"params": param_sh, "model_state": model_state_sh}
    with_ema = config.ema_decay > 0
    state_sh = TrainState(step=shd.replicated(mesh), params=param_sh, opt_state=opt_sh, model_state=model_state_sh,
                          ema=weights_sh if with_ema else None)

    def state_from(step, params, model_state):
        """A state at `step` whose optimizer starts afresh and whose EMA (if any) starts at the weights."""
        # A copy: the state is donated to the train step, so no two of its leaves may share a buffer.
        ema = jax.tree.map(jnp.copy, {"params": params, "model_state": model_state}) if with_ema else None
        return TrainState(step, params, tx.init(params), model_state, ema)

    def fresh_state(key):
        return state_from(jnp.zeros((), jnp.int32), nn.meta.unbox(task.init(key)), nn.meta.unbox(init_model_state(key)))

    def init_state() -> TrainState:
        with nn.logical_axis_rules(rules):
            options = CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
            state = jax.jit(fresh_state, out_shardings=state_sh).lower(init_rng).compile(options)(init_rng)
        if task.load_pretrained is None:
            return state
        variables = task.load_pretrained(_to_host_tree({"params": state.params, **state.model_state}))
        params = shd.put_global(variables["params"], param_sh)
        model_state = shd.put_global({k: variables[k] for k in model_state_sh}, model_state_sh)
        return jax.jit(lambda p, m: state_from(state.step, p, m), out_shardings=state_sh)(params, model_state)

    batch_sh, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
    return Compiled(
        mesh=mesh,
        state_sh=state_sh,
        param_sh=param_sh,
        abstract_state=abstract_with_shardings(jax.eval_shape(fresh_state, init_rng), state_sh),
        init_state=init_state,
        train_step=jax.jit(
            make_train_step(task, tx, schedule, mask, float(config.ema_decay)),
            in_shardings=(state_sh, batch_sh, rep),
            out_shardings=(state_sh, rep),
            donate_argnums=(0,),
        ),
        predict_step=jax.jit(lambda w, batch: predict(w["params"], w["model_state"], batch),
                             in_shardings=(weights_sh, batch_sh), out_shardings=batch_sh),
        rng=shd.put_global(jax.random.key_data(train_rng), rep),
        num_params=count_params(abstract_params),
        num_trainable=count_params(abstract_params, mask),
    )


def async_checkpointing(config) -> bool:
    """config.checkpoint.async_save, except for several processes on CPU (gloo collectives): there,
    orbax's background commit raced the other process's metadata (a hang or 'ArrayMetadata Store
    contains metadata from just one process' in about half the 2-process test runs), so saves are
    synchronous. Accelerator pods keep asynchronous saves."""
    return bool(config.checkpoint.async_save) and not (jax.process_count() > 1 and jax.default_backend() == "cpu")


def train_and_evaluate(config, workdir: epath.PathLike, task: Task) -> dict:
    """Trains `task` as `config` says, in `workdir`; returns the final results dict. A config the loop
    cannot run raises UsageError before anything is written."""
    check_loop_config(config)
    as_path(workdir).mkdir(parents=True, exist_ok=True)
    save_config(config, workdir)
    main = is_main_process()
    num_steps = int(config.num_train_steps)
    c = compile_task(config, task)
    mesh = c.mesh

    ckpt = Checkpointer(
        workdir, config.checkpoint.keep, config.checkpoint.best_metric, config.checkpoint.best_mode,
        async_checkpointing(config),
    )
    restored = ckpt.restore(c.abstract_state)
    ds = pipeline.train_dataset(
        task.train_source, config.batch_size, config.seed, jax.process_index(), jax.process_count(), task.augment
    )
    it = pipeline.train_iterator(
        ds, prefetch=config.data.prefetch, to_device=lambda b: shd.global_batch_from_local(b, mesh)
    )
    if restored is None:
        state, start_step = c.init_state(), 0
    else:
        state, data_state = restored
        it.set_state(data_state)
        start_step = int(jax.device_get(state.step))
        if main:
            print(f"[jdjax] resumed from {workdir} at step {start_step}", flush=True)
    if main:
        print(f"[jdjax] {config.task}: {c.num_params:,} parameters, {c.num_trainable:,} trainable; mesh "
              f"{dict(mesh.shape)}; {jax.device_count()} devices on {jax.process_count()} process(es); "
              f"workdir {workdir}", flush=True)
    train_step, train_rng = c.train_step, c.rng

    def run_eval(weights, split):
        return evaluate(c.predict_step, weights, task.eval_sources[split], config.eval_batch_size, mesh, task.summarize)

    candidates = ("raw", "ema") if config.ema_decay > 0 else ("raw",)

    writer = MetricWriter(workdir, tensorboard=config.logging.tensorboard)
    bar = progress_bar(num_steps, start_step, desc=config.task)
    chrono = Chrono()
    history: list[dict] = []
    # Metrics stay on device and are fetched in one transfer every log interval (or second), at
    # evals, checkpoints and the end: the host never waits for a step it does not need.
    pending: list[tuple[int, dict]] = []
    last_flush = time.perf_counter()
    every = config.logging.every_steps
    status = "completed"

    def flush():
        """Fetches pending metrics; raises at the first non-finite loss; logs finished intervals."""
        nonlocal last_flush
        fetched = jax.device_get([m for _, m in pending])
        for (step, _), metrics in zip(pending, fetched):
            host = {k: float(v) for k, v in metrics.items() if not k.startswith(NONFINITE_INPUTS)}
            if not math.isfinite(host["loss"]):
                bad = {k.removeprefix(NONFINITE_INPUTS): int(v) for k, v in metrics.items()
                       if k.startswith(NONFINITE_INPUTS) and int(v)}
                raise NonFiniteLossError(_nonfinite_message(host["loss"], step, bad, ckpt.latest_step(), workdir,
                                                            config.checkpoint.every_steps))
            history.append(host)
            if step % every == 0 or step == num_steps:
                mean = {f"train/{k}": float(np.mean([h[k] for h in history])) for k in history[0]}
                mean["train/steps_per_second"] = chrono.rate(len(history))
                history.clear()
                writer.write(step, mean)
                bar.set_postfix(loss=f"{mean['train/loss']:.4f}", refresh=False)
        bar.update(len(pending))
        pending.clear()
        last_flush = time.perf_counter()

    with Preemption() as preemption:
        try:
            for step in range(start_step + 1, num_steps + 1):
                state, metrics = train_step(state, next(it), train_rng)
                pending.append((step, metrics))
                if len(pending) > MAX_STEPS_IN_FLIGHT:  # bound the dispatch queue without draining it
                    jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1][1])
                if chrono.compile_seconds is None:
                    chrono.compile_seconds = chrono.first_step(metrics)
                    writer.write(step, {"compile_seconds": chrono.compile_seconds})
                if step % every == 0 or len(pending) >= every or time.perf_counter() - last_flush > 1.0:
                    flush()
                if step % config.eval_every_steps == 0 or step == num_steps:
                    flush()
                    # Raw and EMA weights on validation, selected by the checkpoint metric (test never looked at).
                    val = {w: {f"val/{k}": v for k, v in run_eval(weights_of(state, w), "val").items()}
                           for w in candidates}
                    writer.write(step, {**val["raw"], **{k.replace("val/", "val_ema/", 1): v
                                                         for k, v in val.get("ema", {}).items()}})
                    weights = ckpt.best_of(val)
                    if ckpt.improves(val[weights]):
                        ckpt.save_best(step, state, val[weights], weights)
                    chrono.start()
                if step % config.checkpoint.every_steps == 0 or step == num_steps:
                    flush()
                    ckpt.save(step, state, it.get_state())
                if (step % every == 0 or jax.process_count() == 1) and preemption.agreed():
                    flush()
                    ckpt.save(step, state, it.get_state())
                    status = "preempted"
                    if main:
                        print(f"\n[jdjax] SIGTERM: saved step {step} to {workdir}/ckpt; rerun the same command to resume.", flush=True)
                    break
            flush()
        finally:
            bar.close()
            ckpt.wait()

    results = {"status": status, "step": int(jax.device_get(state.step)), "params": c.num_params,
               "trainable_params": c.num_trainable}
    if status == "completed":
        results.update(_final_report(ckpt, c.abstract_state, run_eval, task, writer))
        if main:
            write_json(as_path(workdir) / "results.json", results)
            if task.report is not None:
                task.report(workdir, results)
    writer.close()
    ckpt.close()
    return results


def _final_report(ckpt: Checkpointer, abstract_state, run_eval, task: Task, writer) -> dict:
    """Evaluates the checkpoint chosen on validation, with the weights (raw or EMA) chosen there: on val
    again and, if present, on test."""
    best = ckpt.restore(abstract_state, best=True)
    if best is None:
        return {}
    state, _ = best
    out = {"selected_step": ckpt.best_step, "selected_by": ckpt.best_metric, "selected_weights": ckpt.best_weights}
    weights = weights_of(state, ckpt.best_weights)
    for split in task.eval_sources:
        metrics = run_eval(weights, split)
        out.update({f"{split}/{k}": v for k, v in metrics.items()})
    writer.write(ckpt.best_step, {f"final/{k}": v for k, v in out.items() if isinstance(v, float)})
    if is_main_process():
        print(f"[jdjax] checkpoint selected on {ckpt.best_metric} (step {ckpt.best_step}, "
              f"{ckpt.best_weights} weights): "
              + ", ".join(f"{k}={v:.4f}" for k, v in out.items() if isinstance(v, float)), flush=True)
    return out


def _opt_state_shardings(tx, abstract_opt, param_shardings, mesh):
    """Optimizer-state leaves shaped like a parameter take its sharding; the rest are replicated.

    Parameter groups of `optax.multi_transform` hold an empty `optax.MaskedNode` for parameters
    outside the group (e.g. frozen ones); those stay as they are."""
    rep = shd.replicated(mesh)
    return optax.tree_map_params(
        tx, lambda p, s: p if isinstance(p, optax.MaskedNode) else s, abstract_opt, param_shardings,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, (jax.sharding.Sharding, optax.MaskedNode)),
    )
