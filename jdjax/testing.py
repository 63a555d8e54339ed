"""Helpers for tests: subprocess launches of whole jobs, random inputs, and PyTorch reference models."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA options for tests, which run a few steps of many programs: the same HLO, partitioned and fused the same
# way, compiled about 3x faster into less optimized machine code.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
FAST_COMPILE_FLAGS = " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items())


def compiled(fn, *args):
    """fn(*args), jit-compiled with FAST_COMPILE."""
    import jax

    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def main_command(config: str, workdir: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "jdjax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


def subprocess_env(num_devices: int = 1, fast_compile: bool = False, **extra: str) -> dict[str, str]:
    """The environment for a child JAX process with `num_devices` fake CPU devices (and FAST_COMPILE)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}"
        + (" " + FAST_COMPILE_FLAGS if fast_compile else ""),
        JAX_PLATFORMS="cpu",
        JDJAX_NO_PROGRESS="1",
        PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def run_module(module: str, *args: str, num_devices: int = 1, timeout: float = 300, fast_compile: bool = False,
               **env):
    """Runs `python -m module *args` from the repository root in a child process; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=subprocess_env(num_devices, fast_compile, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(config: str, workdir: str, *overrides: str, **kwargs):
    """Runs `python -m jdjax.main` in a child process (run_module's options); returns the CompletedProcess."""
    return run_module("jdjax.main", f"--config={config}", f"--workdir={workdir}", *overrides, **kwargs)


def random_images(shape, seed: int = 0) -> np.ndarray:
    """[B, H, W, 3] float32 images uniform in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def randomize_torch(model, seed: int = 0, scale: float = 0.2):
    """The torch module with N(0, scale^2) noise added to every parameter (no weight keeps its
    structured init), in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def torch_numpy(t) -> np.ndarray:
    """A torch tensor -> a float32 NumPy array."""
    return t.detach().float().numpy()


def torch_nchw(images: np.ndarray):
    """[B, H, W, 3] NumPy images -> a [B, 3, H, W] torch tensor."""
    import torch

    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
