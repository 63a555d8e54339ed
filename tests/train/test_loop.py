"""The training loop end to end: device-count equality, resume, preemption, NaN stop, eval padding."""

import json
import os
import shutil
import signal
import subprocess
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vit
from jdjax import testing
from jdjax.data.pipeline import ArraySource
from jdjax.train import loop
from jdjax.train import sharding as shd
from jdjax.train.checkpoint import read_state, saved_steps
from jdjax.train.task import Task

SMOKE = "configs/vit.py:smoke"
# Speed only, for every child run alike. The runs are dominated by process start-up and XLA compilation, not
# by their few steps, and no test here checks model quality, TensorBoard events or how fast the compiled
# code is. So: one transformer block instead of two (every parameter kind and sharding rule still occurs,
# dropout included; half the program to compile); no TensorBoard writer (tensorboardX imports torch,
# seconds per run; metrics.jsonl, which the tests read, is written either way); and XLA's backend at
# optimization level 0 with the elemental fusion emitter (the programs compile ~3x faster; the same HLO,
# partitioned and fused the same way, with less optimized machine code).
FAST_RUN = ("--config.model.depth=1", "--config.logging.tensorboard=False")
# Adam divides by sqrt(v) + eps. The attention key bias has a true gradient of exactly 0 (softmax
# ignores it), so its gradient is float noise whose sign differs between device counts; with the
# default eps=1e-8 Adam turns that noise into learning-rate-sized steps. A larger eps keeps the
# comparison about the arithmetic, not about amplified noise.
DEVICE_COMPARISON = ("--config.num_train_steps=10", "--config.optimizer.eps=1e-6")


def smoke_config(**overrides):
    cfg = vit.get_config("smoke")
    cfg.checkpoint.async_save = False
    cfg.update_from_flattened_dict(overrides)
    return cfg


def child_command(config: str, workdir: str, *overrides: str) -> list[str]:
    """testing.main_command with FAST_RUN."""
    return testing.main_command(config, workdir, *FAST_RUN, *overrides)


def run_child(config: str, workdir: str, *overrides: str, num_devices: int = 1, **env: str):
    """testing.run_main with FAST_RUN and FAST_COMPILE."""
    return testing.run_main(config, workdir, *FAST_RUN, *overrides, num_devices=num_devices, fast_compile=True, **env)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """The smoke ViT trained for 10 steps on a single device, in a child process."""
    workdir = str(tmp_path_factory.mktemp("one_device"))
    proc = run_child(SMOKE, workdir, *DEVICE_COMPARISON, num_devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.parametrize("variant", ["", "fsdp", "tensor_parallel"])
def test_eight_devices_match_one(one_device_run, tmp_path, variant):
    config = SMOKE + ("," + variant if variant else "")
    proc = run_child(config, str(tmp_path), *DEVICE_COMPARISON, num_devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = read_state(one_device_run)
    eight = read_state(str(tmp_path))
    assert int(eight["step"]) == 10
    chex.assert_trees_all_close(eight["params"], one["params"], rtol=2e-4, atol=2e-5)
    chex.assert_trees_all_close(eight["opt_state"], one["opt_state"], rtol=2e-3, atol=1e-6)


def test_resume_is_bit_identical(tmp_path):
    full = str(tmp_path / "full")
    loop.train_and_evaluate(_small_config(), full, _build(_small_config()))
    assert saved_steps(full) == [20, 40]

    # A run "interrupted" after step 20: its workdir as it was when step 20 was written.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "ckpt", "40"))
    for d in saved_steps(resumed, "best"):
        if d > 20:
            shutil.rmtree(os.path.join(resumed, "best", str(d)))
    results = loop.train_and_evaluate(_small_config(), resumed, _build(_small_config()))
    assert results["step"] == 40
    a, b = read_state(full, 40), read_state(resumed, 40)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def _small_config():
    """smoke_config with the model of FAST_RUN (one block)."""
    return smoke_config(**{"model.depth": 1})


def _build(cfg):
    from jdjax.tasks import classification

    return classification.build(cfg)


def test_sigterm_saves_and_resume_continues(tmp_path):
    workdir = str(tmp_path)
    cmd = child_command(SMOKE, workdir, "--config.num_train_steps=100000", "--config.checkpoint.every_steps=100000",
                        "--config.eval_every_steps=100000", "--config.logging.every_steps=5")
    proc = subprocess.Popen(cmd, cwd=testing.REPO_ROOT, env=testing.subprocess_env(1, fast_compile=True), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and '"train/loss"' in open(metrics).read()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in out
    saved = saved_steps(workdir)
    assert len(saved) == 1 and saved[0] >= 5
    assert f"saved step {saved[0]}" in out
    assert not os.path.exists(os.path.join(workdir, "results.json"))

    rerun = run_child(SMOKE, workdir, f"--config.num_train_steps={saved[0] + 5}",
                      "--config.checkpoint.every_steps=100000", "--config.eval_every_steps=100000")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {workdir} at step {saved[0]}" in rerun.stdout
    assert json.load(open(os.path.join(workdir, "results.json")))["step"] == saved[0] + 5


def _log_task() -> Task:
    """loss = log(w) under SGD(lr=1) from w=3: w runs 3, 2.667, 2.292, 1.855, 1.316, 0.557, -1.240, so the
    loss is finite for steps 1-6 and NaN at step 7."""
    source = ArraySource({"x": np.zeros((64, 1), np.float32)})
    return Task(
        init=lambda rng: {"w": jnp.array(3.0)},
        loss=lambda params, batch, rng: (jnp.log(params["w"]) + 0.0 * batch["x"].sum(), {}),
        predict=lambda params, batch: {"w": jnp.broadcast_to(params["w"], batch["x"].shape[:1])},
        summarize=lambda out: {"accuracy": float(-np.mean(out["w"]))},
        train_source=source,
        eval_sources={"val": source},
    )


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = smoke_config(**{"num_train_steps": 20, "checkpoint.every_steps": 2, "eval_every_steps": 100,
                          "optimizer.name": "sgd", "optimizer.momentum": 0.0, "optimizer.learning_rate": 1.0,
                          "optimizer.warmup_steps": 0, "optimizer.schedule": "constant",
                          "optimizer.grad_clip_norm": 0.0, "optimizer.weight_decay": 0.0})
    with pytest.raises(loop.NonFiniteLossError, match="at step 7.*Lower the learning rate.*last good checkpoint \\(step 6\\)") as info:
        loop.train_and_evaluate(cfg, str(tmp_path), _log_task())
    assert "inputs" not in str(info.value)  # the batch was finite: the optimization is at fault
    assert saved_steps(str(tmp_path)) == [4, 6]
    w = read_state(str(tmp_path), 6)["params"]["w"]
    np.testing.assert_allclose(w, -1.2400, atol=1e-3)  # the hand-computed iterate above, still finite


def test_non_finite_inputs_are_named_and_no_checkpoint_is_promised(tmp_path):
    """A NaN in the training data stops step 1 with a message about the data (not the learning rate),
    and says that no checkpoint exists instead of promising 'step None'."""
    x = np.ones((64, 1), np.float32)
    x[:, 0] = np.nan  # every row: whatever the shuffle, the first batch holds NaN
    source = ArraySource({"x": x})
    task = Task(
        init=lambda rng: {"w": jnp.array(1.0)},
        loss=lambda params, batch, rng: (jnp.mean(params["w"] * batch["x"]), {}),
        predict=lambda params, batch: {"w": jnp.broadcast_to(params["w"], batch["x"].shape[:1])},
        summarize=lambda out: {"accuracy": 0.0},
        train_source=source,
        eval_sources={"val": source},
    )
    cfg = smoke_config(**{"num_train_steps": 20, "checkpoint.every_steps": 5, "eval_every_steps": 100})
    with pytest.raises(loop.NonFiniteLossError) as info:
        loop.train_and_evaluate(cfg, str(tmp_path), task)
    message = str(info.value)
    assert "at step 1." in message and "batch of step 1 itself holds NaN or infinite inputs" in message
    assert f"'x': {cfg.batch_size}" in message and "not the learning rate" in message
    assert "No checkpoint was saved" in message and "None" not in message and "resumes from" not in message
    assert saved_steps(str(tmp_path)) == [] and not os.path.exists(tmp_path / "results.json")
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():  # the input counts are not logged
        assert not any(k.startswith(loop.NONFINITE_INPUTS) for k in json.loads(line))


def test_eval_covers_every_example_once_with_padding():
    mesh = shd.make_mesh({"data": -1})
    n = 37  # not a multiple of the global batch 16 nor of 8 devices
    values = np.arange(n, dtype=np.float32)
    source = ArraySource({"v": values})
    predict = jax.jit(lambda params, batch: {"v2": batch["v"] * params}, out_shardings=shd.batch_sharding(mesh))
    seen = {}

    def summarize(out):
        seen.update(out)
        return {"sum": float(out["v2"].sum()), "count": float(len(out["v2"]))}

    metrics = loop.evaluate(predict, jnp.float32(2.0), source, 16, mesh, summarize)
    assert metrics == {"sum": float(2 * values.sum()), "count": float(n)}
    np.testing.assert_array_equal(np.sort(seen["v2"]), 2 * values)


@pytest.mark.multiprocess
def test_two_processes_train_in_step_with_one(tmp_path):
    """2 JAX processes (1 CPU device each, gloo over loopback) vs 1 process with 2 devices."""
    import portpicker

    single = str(tmp_path / "single")
    proc = run_child(SMOKE, single, *DEVICE_COMPARISON, num_devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = str(tmp_path / "multi")
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(
            child_command(SMOKE, multi, *DEVICE_COMPARISON, "--config.distributed.initialize=True",
                          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                          "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
            cwd=testing.REPO_ROOT, env=testing.subprocess_env(1, fast_compile=True), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 devices on 2 process(es)" in outs[0][0]
    a, b = read_state(single), read_state(multi)
    assert int(b["step"]) == 10
    chex.assert_trees_all_close(b["params"], a["params"], rtol=1e-5, atol=1e-6)
