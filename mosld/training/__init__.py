"""The training application: LightningModule, callbacks and the LightningCLI entry point."""

from .callbacks import (
    AdapterExport,
    EvalSummary,
    ParameterCountCallback,
    PredictionWriter,
    RouterStatsCallback,
    StepTimeProgressBar,
)
from .fsdp import AdapterFSDPStrategy
from .module import MoSLDModule
from .records import ItemPredictionWriter, TrainRecord

__all__ = [
    "AdapterExport",
    "AdapterFSDPStrategy",
    "EvalSummary",
    "MoSLDModule",
    "ParameterCountCallback",
    "PredictionWriter",
    "RouterStatsCallback",
    "ItemPredictionWriter",
    "TrainRecord",
    "StepTimeProgressBar",
]
