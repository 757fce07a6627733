"""Experiments: protocols (methods x settings x seeds), the sweep that runs them, statistics and the
results page (``python -m mosld.experiments``)."""

from .aggregate import aggregate
from .protocol import Protocol, Run, load_protocol
from .stats import binomial_two_sided, mcnemar_exact, mean_sd, paired_bootstrap
from .sweep import Sweep

__all__ = ["Protocol", "Run", "Sweep", "aggregate", "binomial_two_sided", "load_protocol", "mcnemar_exact",
           "mean_sd", "paired_bootstrap"]  # fmt: skip
