"""mosld: mixture of shared LoRA experts with dropout (MoSLD, COLING 2025) for Hugging Face causal LMs.

The public API::

    import mosld
    cfg = mosld.AdapterConfig(method="mosld", r=8, alpha=16, num_experts=(8, 6, 4, 2))
    model = mosld.inject_adapters(model, cfg)
    mosld.save_adapter(model, "out/adapter")
    model = mosld.load_adapter(base_model, "out/adapter")
    mosld.export_peft(model, "out/peft", mosld.mean_gates(model, batches))  # a plain LoRA (docs/serving.md)
"""

from . import adapters as _adapters
from .adapters import *  # noqa: F403 - the adapter floor's public API is the package's, listed once there

__version__ = "0.1.0"


def evaluate(*args, **kwargs):
    """Multiple-choice accuracy per task; see ``mosld.evaluation.evaluate``."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = [*_adapters.__all__, "evaluate"]
