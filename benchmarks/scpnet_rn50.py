"""SCPNet's image tower: one training step of CLIP's RN50 (`jdjax.nn.clip_resnet.ModifiedResNet`) at 224 px,
batch 8, float32, against open_clip's RN50 tower in PyTorch in the same run (issue #13).

    python -m benchmarks.scpnet_rn50                     # RN50 at 224, batch 8; records to benchmarks/RESULTS.md
    python -m benchmarks.scpnet_rn50 --repeats=5 --norss # fewer rounds, no child processes for RSS
    python -m benchmarks.scpnet_rn50 --notorch           # jdjax only
    python -m benchmarks.scpnet_rn50 --norecord          # print the rows, write nothing
    python -m benchmarks.scpnet_rn50 --smoke             # a tiny ResNet, seconds, records nothing

The step, the same in both frameworks: the tower in training mode (BatchNorm on batch statistics, the
running ones updated), features [B, E] L2-normalised, loss = mean squared distance to fixed random unit
targets, gradients of every parameter, Adam (lr 1e-4, betas 0.9 / 0.999, eps 1e-8) update. Each framework
initialises its own weights. jdjax: `ModifiedResNet(layers=(3, 4, 6, 3), width=64, heads=32, output_dim=1024)`
(the image tower of `CLIP(**clip_config('RN50'))`), one jitted step with parameters, Adam state and
batch_stats donated and fed back, compiled ahead of time (compile_s). PyTorch: open_clip's `ModifiedResNet`
with the same arguments (the `visual` of `open_clip.create_model('RN50')`), NCHW, `torch.optim.Adam`,
`zero_grad(set_to_none=True)`, `torch.set_num_threads(os.cpu_count())`.

Timing: every step runs once as warm-up (warmup_s), then --repeats interleaved rounds
(`harness.interleaved`: each step once per round, rotated order); medians. images_per_s = B / median;
vs_torch = PyTorch median / case median (> 1: faster than PyTorch).

Memory, two measures:
- mem_peak_mb (jdjax only): argument + output + temp - alias bytes of the compiled step
  (`memory_analysis()`: parameters, Adam state, batch statistics, the batch, activations kept for the
  backward pass, workspace; donated buffers counted once); mem_temp_mb = temp alone.
- rss_peak_mb (both; --rss): one child process per framework builds the same model, optimiser and batch
  and runs --rss_steps steps; the figure is its peak resident set size during the steps (Linux VmHWM,
  reset through /proc/self/clear_refs just before them; where that is impossible, the lifetime peak
  ru_maxrss) minus its resident size right after importing the framework and the model code. It counts parameters,
  gradients, optimiser state, activations and allocator overhead, and for jdjax what the compiler
  leaves resident (the compile happens before the steps). tracemalloc would miss torch's CPU tensors.

Target (printed, never asserted): jdjax ahead of PyTorch in images/s (vs_torch > 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

BENCHMARK = "scpnet_rn50"
LR = 1e-4
# --smoke compiles faster with XLA's backend optimisation off; its timings mean nothing anyway.
SMOKE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
NOTES = (
    "One training step of CLIP's RN50 image tower ({size} px, batch {batch}, float32): BatchNorm in training mode, "
    "L2-normalised features, MSE to fixed random unit targets, all gradients, Adam lr 1e-4. jdjax = "
    "jdjax.nn.clip_resnet.ModifiedResNet, one jitted step (params, Adam state, batch_stats donated), compiled "
    "ahead of time (compile_s); torch = open_clip.modified_resnet.ModifiedResNet (open_clip.create_model('RN50')"
    ".visual), NCHW, torch.optim.Adam, {threads} threads. Each framework's own random init. One warm-up step "
    "each (warmup_s), then interleaved rounds (each step once per round, rotated order); medians. images_per_s = "
    "batch / median step; vs_torch = torch median / case median (target: jdjax > 1). mem_peak_mb = XLA "
    "memory_analysis of the compiled step: argument + output + temp - alias (mem_temp_mb = temp). rss_peak_mb = a "
    "child process per framework: peak RSS during {rss_steps} steps (VmHWM reset before them) minus RSS after "
    "importing the framework (parameters, grads, optimiser state, activations, allocator and, for jdjax, compiler "
    "leftovers). params = trainable parameters. load1 = 1-minute load average (2 shared cores)."
)


def paper_dims() -> dict:
    """RN50 (clip_config('RN50')) at 224 px, batch 8."""
    return {"layers": (3, 4, 6, 3), "width": 64, "heads": 32, "output_dim": 1024, "image_size": 224, "batch": 8}


def smoke_dims() -> dict:
    """A tiny ModifiedResNet: one Bottleneck per stage, stem width 8, 64 px images (2x2 attention-pool grid)."""
    return {"layers": (1, 1, 1, 1), "width": 8, "heads": 4, "output_dim": 16, "image_size": 64, "batch": 2}


def batch(dims: dict, seed: int = 0):
    """(images [B, S, S, 3] uniform in [-1, 1], targets [B, E] unit rows), NumPy float32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, s = dims["batch"], dims["image_size"]
    images = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
    targets = rng.standard_normal((b, dims["output_dim"])).astype(np.float32)
    return images, targets / np.linalg.norm(targets, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- the two steps


def jax_step(dims: dict, compiler_options: dict | None = None):
    """(run() -> loss, info): the jitted jdjax step on the batch of `dims`; info has compile_s, memory
    (XLA bytes: temp, argument, output, alias, peak), xla_gflop per image and the parameter count."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from benchmarks import harness
    from benchmarks.tempme import memory_bytes
    from jdjax.nn.clip import l2_normalize
    from jdjax.nn.clip_resnet import ModifiedResNet

    model = ModifiedResNet(layers=dims["layers"], output_dim=dims["output_dim"], heads=dims["heads"],
                           image_size=dims["image_size"], width=dims["width"])
    images, targets = (jnp.asarray(a) for a in batch(dims))
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images[:1]))
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(LR)
    opt_state = tx.init(params)

    def step(params, opt_state, stats, images, targets):
        def loss_fn(p):
            feats, new = model.apply({"params": p, "batch_stats": stats}, images, train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.sum((l2_normalize(feats) - targets) ** 2, axis=-1)), new["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats, loss

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(params, opt_state, stats, images, targets).compile(
        compiler_options)
    compile_s = time.perf_counter() - t0
    state = [params, opt_state, stats]

    def run():
        *new_state, loss = compiled(*state, images, targets)
        state[:] = new_state
        return float(jax.block_until_ready(loss))

    info = {"compile_s": compile_s, "memory": memory_bytes(compiled),
            "xla_gflop": harness.xla_flops(compiled) / dims["batch"] / 1e9,
            "params": sum(int(v.size) for v in jax.tree.leaves(params))}
    return run, info


def torch_step(dims: dict):
    """(run() -> loss, info): open_clip's ModifiedResNet training step on the batch of `dims`; info has the
    parameter count and torch's thread count."""
    import numpy as np
    import torch
    from open_clip.modified_resnet import ModifiedResNet

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = ModifiedResNet(layers=list(dims["layers"]), output_dim=dims["output_dim"], heads=dims["heads"],
                           image_size=dims["image_size"], width=dims["width"]).train()
    images, targets = batch(dims)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # [B, 3, S, S]
    t = torch.from_numpy(targets)
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def run():
        opt.zero_grad(set_to_none=True)
        feats = torch.nn.functional.normalize(model(x), dim=-1)
        loss = ((feats - t) ** 2).sum(-1).mean()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return run, {"params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- resident memory (child processes)


def _status_mb(field: str) -> float:
    """A /proc/self/status size (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_child(framework: str, dims: dict, steps: int, compiler_options: dict | None = None) -> dict:
    """In this process: RSS after importing `framework` and the model code, then its model, optimiser and batch,
    then the peak RSS over `steps` training steps; {'rss_base_mb', 'rss_peak_mb' (peak minus base), 'peak_source'}."""
    import importlib
    import resource

    for module in (("optax", "jdjax.nn.clip_resnet") if framework == "jdjax" else ("open_clip.modified_resnet",)):
        importlib.import_module(module)
    if framework == "jdjax":
        importlib.import_module("jax").devices()  # the CPU client starts lazily: part of the import, as torch's
    base = _status_mb("VmRSS")
    run, _ = jax_step(dims, compiler_options) if framework == "jdjax" else torch_step(dims)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        source = "VmHWM"
    except OSError:
        source = "ru_maxrss"
    for _ in range(steps):
        run()
    peak = _status_mb("VmHWM") if source == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss_base_mb": base, "rss_peak_mb": peak - base, "peak_source": source}


def measure_rss(framework: str, smoke: bool, steps: int) -> dict:
    """rss_child in a fresh `python -m benchmarks.scpnet_rn50 --rss_child=...` process."""
    cmd = [sys.executable, "-m", "benchmarks.scpnet_rn50", f"--rss_child={framework}", f"--rss_steps={steps}"]
    proc = subprocess.run(cmd + (["--smoke"] if smoke else []), cwd=os.path.dirname(os.path.dirname(__file__)),
                          capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the {framework} RSS child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- measurement


def measure(dims: dict, repeats: int = 10, torch: bool = True, rss: bool = True, rss_steps: int = 3,
            smoke: bool = False, compiler_options: dict | None = None, log=print) -> tuple[dict[str, dict], dict]:
    """({case: row}, run info): builds and times the steps (cases 'jdjax b{B}', 'torch b{B}'); no recording."""
    from benchmarks import harness

    b = dims["batch"]
    fns, info = {}, {}
    fns[f"jdjax b{b}"], info[f"jdjax b{b}"] = jax_step(dims, compiler_options)
    log(f"  jdjax: compiled in {info[f'jdjax b{b}']['compile_s']:.1f} s, "
        f"XLA peak {info[f'jdjax b{b}']['memory']['peak'] / 2**20:.0f} MiB", flush=True)
    if torch:
        fns[f"torch b{b}"], info[f"torch b{b}"] = torch_step(dims)
        log(f"  torch: {info[f'torch b{b}']['threads']} threads", flush=True)
    first = {}  # the first step of each (after the compile): its loss and seconds
    for case, fn in fns.items():
        t0 = time.perf_counter()
        first[case] = (fn(), time.perf_counter() - t0)
    log(f"  {repeats} interleaved rounds of {len(fns)} steps", flush=True)
    timing = harness.interleaved(fns, repeats)
    rows = {}
    for case, tm in timing.items():
        framework = case.split(" ")[0]
        row = {
            "framework": framework,
            "batch": b,
            "image_size": dims["image_size"],
            "step_ms": 1e3 * tm["median_s"],
            "p10_p90_ms": f"{1e3 * tm['p10_s']:.4g}-{1e3 * tm['p90_s']:.4g}",
            "images_per_s": b / tm["median_s"],
            "vs_torch": timing[f"torch b{b}"]["median_s"] / tm["median_s"] if torch else None,
            "params": info[case]["params"],
            "first_loss": first[case][0],
            "warmup_s": first[case][1],
        }
        if framework == "jdjax":
            mem = info[case]["memory"]
            row.update(mem_peak_mb=mem["peak"] / 2**20, mem_temp_mb=mem["temp"] / 2**20,
                       mem_argument_mb=mem["argument"] / 2**20, mem_output_mb=mem["output"] / 2**20,
                       mem_alias_mb=mem["alias"] / 2**20, xla_train_gflop=info[case]["xla_gflop"],
                       compile_s=info[case]["compile_s"])
        rows[case] = row
    if rss:
        for case, row in rows.items():
            log(f"  {case}: RSS child ({rss_steps} steps)", flush=True)
            r = measure_rss(row["framework"], smoke, rss_steps)
            row.update(rss_peak_mb=r["rss_peak_mb"], rss_base_mb=r["rss_base_mb"], rss_source=r["peak_source"])
    run_info = {"torch_threads": info[f"torch b{b}"]["threads"] if torch else None, "rss_steps": rss_steps}
    return rows, run_info


def targets(rows: dict[str, dict]) -> list[str]:
    """The target line: jdjax ahead of PyTorch in images/s (met / not met; nothing asserted)."""
    case = next((c for c in rows if c.startswith("jdjax")), None)
    if case is None or rows[case].get("vs_torch") is None:
        return ["target jdjax ahead of PyTorch: not measured (--notorch)"]
    r = rows[case]["vs_torch"]
    return [f"target jdjax ahead of PyTorch in training images/s: {r:.2f}x {'met' if r > 1 else 'NOT MET'}"]


def summary(rows: dict[str, dict], with_targets: bool = True) -> str:
    """A short text table of the rows and the target."""
    lines = [f"{'case':<10} {'step ms':>9} {'images/s':>9} {'x torch':>8} {'XLA peak MiB':>13} {'RSS peak MiB':>13} "
             f"{'params':>11} {'compile s':>9}"]
    for case, r in rows.items():
        def cell(key, fmt, width, r=r):
            return format(r[key], fmt).rjust(width) if r.get(key) is not None else "-".rjust(width)

        lines.append(f"{case:<10} {r['step_ms']:>9.0f} {r['images_per_s']:>9.2f} {cell('vs_torch', '.2f', 7)}x "
                     f"{cell('mem_peak_mb', '.0f', 13)} {cell('rss_peak_mb', '.0f', 13)} {r['params']:>11,} "
                     f"{cell('compile_s', '.1f', 9)}")
    return "\n".join(lines + (targets(rows) if with_targets else []))


def record_rows(rows: dict[str, dict], name: str, run_info: dict | None = None, write: bool = True) -> list[dict]:
    """One harness.record line per case (None values dropped), printed as JSON; with write=False nothing goes
    to benchmarks/results.jsonl or RESULTS.md."""
    from benchmarks import harness

    run_info = run_info or {}
    first = next(iter(rows.values()))
    notes = NOTES.format(size=first["image_size"], batch=first["batch"], threads=run_info.get("torch_threads") or "-",
                         rss_steps=run_info.get("rss_steps", "-"))
    out = []
    for case, row in rows.items():
        metrics = {k: v for k, v in row.items() if v is not None}
        metrics.update(load1=os.getloadavg()[0], loadavg=_loadavg(), notes=notes)
        out.append(harness.record(BENCHMARK, f"{name} {case}", metrics, smoke=not write))
    return out


def _loadavg() -> str:
    """/proc/loadavg (1, 5, 15-minute loads, running/total tasks) when the row is written."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:4])
    except OSError:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())


# ----------------------------------------------------------------------------- entry point


def _define_flags():
    """Flags are defined only when run as a script, so importing this module (tests) defines none."""
    from absl import flags

    flags.DEFINE_integer("repeats", 10, "Interleaved rounds (one step per framework each; medians).")
    flags.DEFINE_bool("torch", True, "Also time open_clip's RN50 tower in PyTorch in the same rounds.")
    flags.DEFINE_bool("rss", True, "Also measure each framework's peak RSS in a child process.")
    flags.DEFINE_integer("rss_steps", 3, "Training steps the RSS children run.")
    flags.DEFINE_bool("record", True, "Append to benchmarks/results.jsonl and regenerate RESULTS.md.")
    flags.DEFINE_bool("smoke", False, "A tiny ResNet (64 px, batch 2), two rounds, XLA backend optimisation off; "
                      "records nothing.")
    flags.DEFINE_enum("rss_child", None, ["jdjax", "torch"], "Internal: run as the RSS child of this framework.")


def run(smoke: bool = False, repeats: int = 10, torch: bool = True, rss: bool = True, rss_steps: int = 3,
        record: bool = True, compiler_options: dict | None = None, log=print) -> dict[str, dict]:
    """The body of main: measure, record (never for smoke), print the summary; returns the rows."""
    if smoke:
        dims, repeats = smoke_dims(), 2
        compiler_options = SMOKE_COMPILER_OPTIONS if compiler_options is None else compiler_options
        name = "smoke ResNet"
    else:
        dims = paper_dims()
        name = f"RN50@{dims['image_size']}"
    log(f"{name}: batch {dims['batch']}, {repeats} rounds; load {_loadavg()}", flush=True)
    rows, run_info = measure(dims, repeats, torch=torch, rss=rss, rss_steps=rss_steps, smoke=smoke,
                             compiler_options=compiler_options, log=log)
    record_rows(rows, name, run_info, write=record and not smoke)
    log(summary(rows, with_targets=not smoke), flush=True)
    return rows


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if f.rss_child:
        dims = smoke_dims() if f.smoke else paper_dims()
        print(json.dumps(rss_child(f.rss_child, dims, f.rss_steps, SMOKE_COMPILER_OPTIONS if f.smoke else None)))
        return
    run(smoke=f.smoke, repeats=f.repeats, torch=f.torch, rss=f.rss, rss_steps=f.rss_steps, record=f.record)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
