"""Data side of mosld: task registry, prompts, temperature sampling and the multi-task DataModule.

Data code knows nothing of adapters: it turns tasks into token sequences and evaluation batches.
"""

from mosld.data.datamodule import MultiTaskDataModule
from mosld.data.generation import (
    METRIC_NAMES,
    GenerationCollator,
    GenerationItem,
    GenerationSpec,
    encode_generation_examples,
)
from mosld.data.prompts import TEMPLATES, EncodedItem, PromptTemplate, encode_examples
from mosld.data.sampling import TemperatureSampler, temperature_probabilities
from mosld.data.tasks import (
    KNOWN_TASKS,
    PAPER_TASKS,
    TASKS,
    Example,
    GenerationExample,
    TaskDataError,
    TaskSpec,
    load_task,
    split_plan,
    task_kind,
)

__all__ = [
    "KNOWN_TASKS",
    "METRIC_NAMES",
    "PAPER_TASKS",
    "TASKS",
    "TEMPLATES",
    "EncodedItem",
    "Example",
    "GenerationCollator",
    "GenerationExample",
    "GenerationItem",
    "GenerationSpec",
    "MultiTaskDataModule",
    "PromptTemplate",
    "TaskDataError",
    "TaskSpec",
    "TemperatureSampler",
    "encode_examples",
    "encode_generation_examples",
    "load_task",
    "split_plan",
    "task_kind",
    "temperature_probabilities",
]
