"""The training application: LightningModule, callbacks and the LightningCLI entry point."""

# The callbacks configs name as mosld.training.<Class>: what a fit logs and shows (callbacks.py) and the files a
# run leaves (records.py); safety.py's guards are added by the command line itself (training/cli.py).
from .callbacks import ParameterCountCallback, RouterStatsCallback, StepTimeProgressBar
from .fsdp import AdapterFSDPStrategy
from .module import MoSLDModule
from .records import AdapterExport, EvalSummary, ItemPredictionWriter, PredictionWriter, TrainRecord

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
