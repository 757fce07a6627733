"""The command line: ``python main.py fit|validate|test|predict --config ...`` (LightningCLI)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from lightning.pytorch.cli import LightningCLI

from ..adapters import AdapterConfig
from ..data import KNOWN_TASKS, MultiTaskDataModule
from .module import MoSLDModule

TRAINER_DEFAULTS = {
    # The data module shards its own temperature sampler and evaluation sets across ranks.
    "use_distributed_sampler": False,
}


class MoSLDCLI(LightningCLI):
    """LightningCLI with the base model linked to the tokenizer, and early config checks."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")

    def before_instantiate_classes(self) -> None:
        """Refuse a bad adapter config or task list before any model or data is loaded."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        adapter = config.model.get("adapter")
        if adapter is not None:
            try:
                AdapterConfig(**dict(adapter))
            except (TypeError, ValueError) as err:
                self.parser.error(f"model.adapter.{err}")
        for task in config.data.tasks or []:
            if task not in KNOWN_TASKS and not Path(task).exists():
                self.parser.error(
                    f"data.tasks: {task!r} is neither a known task ({', '.join(KNOWN_TASKS)}) "
                    "nor an existing task file or folder"
                )


def end_distributed() -> None:
    """Tear down the process group Lightning leaves up after a multi-process run.

    Left to the interpreter's exit, gloo's threads can be destroyed while still joinable, which aborts
    the process (``terminate called without an active exception``, exit -6) after a run that succeeded.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(args: list[str] | None = None) -> MoSLDCLI:
    return MoSLDCLI(
        MoSLDModule,
        MultiTaskDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )
