"""Helpers for tests that run whole jobs: subprocess launches and checkpoint reading."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(config: str, workdir: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "jdjax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


def subprocess_env(num_devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment for a child JAX process with `num_devices` fake CPU devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
        JAX_PLATFORMS="cpu",
        JDJAX_NO_PROGRESS="1",
        PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def run_main(config: str, workdir: str, *overrides: str, num_devices: int = 1, timeout: float = 300, **env):
    """Runs `python -m jdjax.main` in a child process; returns the CompletedProcess."""
    return subprocess.run(
        main_command(config, workdir, *overrides),
        cwd=REPO_ROOT,
        env=subprocess_env(num_devices, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_trees_close(a, b, rtol: float, atol: float) -> None:
    """Two pytrees have the same number of leaves and all of them are close."""
    import jax

    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
