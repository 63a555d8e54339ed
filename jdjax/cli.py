"""The command line shared by `jdjax.main`, the tools and the benchmarks.

Flags: `--config` (a config file with an optional `:variant` and `--config.a.b=value` overrides;
the config is locked, so a misspelt key or a wrong type is rejected) and `--workdir`. A script
defines its own extra flags, then calls `run_app(body)`; `body(config, workdir)` runs with one
error style: a UsageError (or a bad flag) prints one message and exits with status 2, a
non-finite loss exits with status 1.

    python -m jdjax.main --config=configs/vit.py:smoke --config.seed=1 --workdir=runs/x

From code, `load_config('configs/vit.py:smoke', '--config.seed=1')` parses the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from jdjax.train.validation import UsageError

EXIT_USAGE = 2
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit.py:smoke.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config>-<variant>).")


def fail(message: str) -> None:
    """Prints `jdjax: error: message` and exits with status 2."""
    print(f"jdjax: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def default_workdir(config_arg: str) -> str:
    """runs/<config file>-<variant> ('configs/pyra.py:vit_b16,high' -> runs/pyra-vit_b16_high)."""
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}-{variant.replace(',', '_').replace('=', '') or 'default'}")


def config_arg() -> str:
    """The --config value as given ('configs/pyra.py:smoke'), without the overrides."""
    return flags.FLAGS["config"].serialize().partition("=")[2]


def load_config(spec: str, *overrides: str):
    """The locked config of `spec` ('configs/vit.py:smoke') with `--config.a.b=value` overrides,
    parsed exactly as on the command line; raises UsageError on a bad file, key or value."""
    argv = ["jdjax", f"--config={spec}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(_flag_message(list(overrides), e)) from e
    return fv.config


def _flag_message(args, e: Exception) -> str:
    bad = [a for a in args if a.startswith("--config.")]
    return (f"could not apply the flags {bad or args}: {type(e).__name__}: {e}\nConfig overrides must name "
            "existing keys (the config is locked) with values of the same type, e.g. "
            "--config.optimizer.learning_rate=3e-4; `--helpfull` lists the flags.")


def parse_flags(argv):
    """absl's flags parser with jdjax's error style (exit 2, one message)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        fail(_flag_message(argv[1:], e))


def maybe_initialize_distributed(config) -> None:
    """jax.distributed.initialize when config.distributed.initialize or JDJAX_DISTRIBUTED=1."""
    d = config.get("distributed")
    if not ((d is not None and d.initialize) or os.environ.get("JDJAX_DISTRIBUTED") == "1"):
        return
    import jax

    # Collectives between CPU devices of different processes (tests, local runs); no effect on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if d is not None:  # empty fields: auto-detected (TPU pods, SLURM)
        if d.coordinator_address:
            kwargs["coordinator_address"] = d.coordinator_address
        if d.num_processes > 0:
            kwargs["num_processes"] = d.num_processes
        if d.process_id >= 0:
            kwargs["process_id"] = d.process_id
    jax.distributed.initialize(**kwargs)


def run_app(body: Callable, example: str = "--config=configs/vit.py:smoke", workdir_required: bool = False,
            workdir_default: str | None = None) -> None:
    """Parses the flags and runs `body(config, workdir)` with jdjax's error handling and exit codes.

    `workdir` is --workdir, else `workdir_default`, else runs/<config>-<variant> (an error if
    `workdir_required`); `example` is shown when a required flag is missing."""

    def main(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}; pass everything as --flags.")
        config = _CONFIG.value
        if config is None or (workdir_required and not _WORKDIR.value):
            fail(f"--config{' and --workdir are' if workdir_required else ' is'} required, e.g. {example}")
        if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
            logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
        maybe_initialize_distributed(config)
        from jdjax.train.loop import NonFiniteLossError

        try:
            body(config, _WORKDIR.value or workdir_default or default_workdir(config_arg()))
        except UsageError as e:
            fail(str(e))
        except NonFiniteLossError as e:
            print(f"jdjax: stopped: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(main, flags_parser=parse_flags)
