"""Delayed-feedback adaptive experimentation: the paper's simulation study (jdjax.econ)."""

from jdjax.econ.simulate import config_errors as validate  # noqa: F401
from jdjax.econ.simulate import run_delayed_feedback as run  # noqa: F401
