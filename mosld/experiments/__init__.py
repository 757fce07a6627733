"""Experiments: protocols (methods x settings x seeds), the sweep that runs them, statistics and the
results page (``python -m mosld.experiments``)."""

from .aggregate import aggregate
from .protocol import Protocol, Run, load_protocol
from .stats import (
    Comparison,
    binomial_two_sided,
    compare,
    detectable_difference,
    hierarchical_bootstrap,
    mcnemar_exact,
    mean_sd,
    paired_bootstrap,
)
from .sweep import Sweep

__all__ = ["Comparison", "Protocol", "Run", "Sweep", "aggregate", "binomial_two_sided", "compare",
           "detectable_difference", "hierarchical_bootstrap", "load_protocol", "mcnemar_exact", "mean_sd",
           "paired_bootstrap"]  # fmt: skip
