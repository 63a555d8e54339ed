"""Delayed-feedback adaptive experimentation: the paper's simulation study (jdjax.econ)."""

from jdjax.econ.simulate import CriteoLogError, run_delayed_feedback
from jdjax.econ.simulate import config_errors as validate  # noqa: F401
from jdjax.train.validation import UsageError


def run(config, workdir: str) -> dict:
    """The simulations of `config`; a malformed Criteo log is a usage error (file:line, exit 2)."""
    try:
        return run_delayed_feedback(config, workdir)
    except CriteoLogError as e:
        raise UsageError(str(e)) from e
