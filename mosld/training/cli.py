"""The command line: ``python main.py fit|validate|test|predict --config ...`` (LightningCLI)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..adapters import AdapterConfig
from ..adapters.inject import check_targets
from ..data import KNOWN_TASKS, MultiTaskDataModule, TaskDataError
from ..models import meta_model
from ..quantization import INSTALL_HINT, QuantizationConfig, bitsandbytes_available, dtype_error
from .module import MoSLDModule
from .precision import AutoPrecisionTrainer, announce, resolve_precision
from .resume import checkpoint_batch_size, compare_with_checkpoint
from .safety import PREEMPTED_EXIT_CODE, FiniteGuard, NonFiniteError, PreemptionCheckpoint

TRAINER_DEFAULTS = {
    # The data module shards its own temperature sampler and evaluation sets across ranks.
    "use_distributed_sampler": False,
}


def option_errors(config, subcommand: str | None) -> list[str]:
    """Mistakes across options that their types cannot show (those jsonargparse refused already), by option name."""
    errors = []
    tasks = config.get("data.tasks") or []
    if not tasks:
        errors.append("data.tasks: expected at least one task")
    if config.get("data.setting") == "single" and len(tasks) != 1:
        errors.append(f"data.setting: 'single' trains on exactly one task, but data.tasks has {len(tasks)}: {tasks}")
    errors += quantization_errors(config)
    if subcommand == "predict":
        predict_file = config.get("data.predict_file")
        if not predict_file:
            errors.append("data.predict_file: predict needs a JSONL file of questions (--data.predict_file)")
        elif not Path(predict_file).is_file():
            errors.append(f"data.predict_file: {predict_file} is not a file")
    return errors


def quantization_errors(config) -> list[str]:
    """A quantized base that cannot load or train as configured, with what to do instead."""
    value = config.get("model.quantization")
    if not value:
        return []
    try:
        quantization = QuantizationConfig.from_value(dict(value))
    except (TypeError, ValueError) as err:
        return [f"model.quantization.{err}"]
    if not quantization.enabled:
        return []
    errors = []
    if not bitsandbytes_available():
        errors.append(f"model.quantization: a {quantization.describe()} base needs bitsandbytes; {INSTALL_HINT}")
    strategy = config.get("trainer.strategy")
    strategy_name = strategy if isinstance(strategy, str) else str(getattr(strategy, "class_path", strategy) or "")
    if "fsdp" in strategy_name.lower():
        errors.append(
            f"model.quantization: FSDP cannot shard a {quantization.describe()} base here (bitsandbytes' packed "
            "weights and FSDP's flat parameters do not mix); use DDP (configs/presets/ddp.yaml), which keeps one "
            "quantized copy per GPU, or drop model.quantization"
        )
    dtype = dtype_error(quantization, config.get("model.dtype"))
    return errors + ([f"model.dtype: {dtype}"] if dtype else [])


class MoSLDCLI(LightningCLI):
    """LightningCLI with the base model linked to the tokenizer, and early config checks."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` against the config instead of loading its hyperparameters over it.

        LightningCLI's version replaces the parsed model options by the checkpoint's, dropping what the
        user wrote. Here the given config is what runs: a structural difference is refused (the
        checkpoint's tensors would not fit), any other difference takes effect and is listed.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):  # resolved by Lightning later
            return
        if not Path(ckpt_path).is_file():
            self.parser.error(f"ckpt_path: {ckpt_path} is not a file")
        try:
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except Exception as err:  # any unreadable file: say which and why, before anything loads
            self.parser.error(f"ckpt_path: {ckpt_path} is not a readable checkpoint ({type(err).__name__}: {err})")
        if not isinstance(checkpoint, dict):
            return
        trained_batch, batch_size = checkpoint_batch_size(checkpoint), config.get("data", {}).get("batch_size")
        if subcommand == "fit" and trained_batch is not None and batch_size is not None and trained_batch != batch_size:
            self.parser.error(
                f"data.batch_size: {ckpt_path} was trained with batch size {trained_batch}, the config gives "
                f"{batch_size}; a resumed run continues the same sample order, so give --data.batch_size "
                f"{trained_batch}, or start a new run without --ckpt_path"
            )
        saved = checkpoint.get("hyper_parameters")
        if not saved:
            return
        given = config.model.as_dict()
        try:
            AdapterConfig(**dict(given.get("adapter") or {}))
        except (TypeError, ValueError):
            return  # the config's own mistake, reported by before_instantiate_classes
        try:
            structural, other = compare_with_checkpoint(saved, given)
        except (TypeError, ValueError) as err:
            self.parser.error(f"ckpt_path: {ckpt_path}: hyperparameters do not form an adapter config ({err})")
        if structural:
            self.parser.error(
                f"ckpt_path: {ckpt_path} was trained with another adapter or base model than the config gives:\n  "
                + "\n  ".join(structural)
                + "\nResume with the run's own config (its config.yaml) or pass the checkpoint's values above; to "
                "train another adapter, start a new run without --ckpt_path."
            )
        if other and subcommand == "fit":
            print(
                f"resuming from {ckpt_path} with options that differ from the checkpoint (the given ones take "
                "effect):\n  " + "\n  ".join(other),
                file=sys.stderr,
            )

    def instantiate_classes(self) -> None:
        if self.precision_choice is not None:
            announce(self.precision_choice.message())
        super().instantiate_classes()
        self.trainer.precision_choice = self.precision_choice  # why, for the run record (mosld.training.records)

    def before_instantiate_classes(self) -> None:
        """Refuse a bad adapter config or task list before any model or data is loaded."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        # `auto` resolved here like any option: the classes and the run's config.yaml get the precision it chose
        self.precision_choice = resolve_precision(config.trainer.precision, config.trainer.get("accelerator"))
        if self.precision_choice is not None:
            config.trainer.precision = self.precision_choice.precision
        adapter = config.model.get("adapter")
        if adapter is not None:
            try:
                AdapterConfig(**dict(adapter))
            except (TypeError, ValueError) as err:
                self.parser.error(f"model.adapter.{err}")
        if adapter is not None and config.model.get("model_name_or_path"):
            skeleton = meta_model(config.model.model_name_or_path, bool(config.model.get("trust_remote_code")))
            if skeleton is not None:
                try:
                    check_targets(skeleton, AdapterConfig(**dict(adapter)).target_modules)
                except ValueError as err:
                    self.parser.error(f"model.adapter.{err}")
        errors = option_errors(config, self.subcommand)
        if errors:
            self.parser.error("; ".join(errors))
        for task in config.data.tasks or []:
            if task not in KNOWN_TASKS and not Path(task).exists():
                self.parser.error(
                    f"data.tasks: {task!r} is neither a known task ({', '.join(KNOWN_TASKS)}) "
                    "nor an existing task file or folder"
                )
        if self.subcommand in ("validate", "test", "predict") and not config.get("ckpt_path"):
            print(
                untrained_notice(self.subcommand, [Path(str(c)) for c in config.get("config") or []]), file=sys.stderr
            )


def untrained_notice(subcommand: str, config_files: list[Path]) -> str:
    """What ``test`` (or ``validate``, ``predict``) without ``--ckpt_path`` evaluates, and the checkpoints at hand."""
    lines = [
        f"{subcommand}: no --ckpt_path given: evaluating the untrained adapter, i.e. the base model "
        "(pass --ckpt_path to evaluate a trained one)"
    ]
    found = sorted({p for c in config_files for p in (c.parent / "checkpoints").glob("*.ckpt")})
    if found:
        lines.append("checkpoints of this run: " + ", ".join(str(p) for p in found))
    elif config_files:
        lines.append(f"no checkpoints found in {', '.join(str(c.parent / 'checkpoints') for c in config_files)}")
    return "\n".join(lines)


def end_distributed() -> None:
    """Tear down the process group Lightning leaves up after a multi-process run.

    Left to the interpreter's exit, gloo's threads can be destroyed while still joinable, which aborts
    the process (``terminate called without an active exception``, exit -6) after a run that succeeded.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cli_arguments(args: list[str] | None) -> dict:
    """The arguments of ``MoSLDCLI`` for a run of ``args``: the classes, trainer and defaults of the command line."""
    return dict(
        model_class=MoSLDModule,
        datamodule_class=MultiTaskDataModule,
        trainer_class=AutoPrecisionTrainer,
        # fresh callbacks each run: they hold per-run state
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [FiniteGuard(), PreemptionCheckpoint()]},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )


class ConfigReader(MoSLDCLI):
    """The CLI's parsing and checks, and nothing after them: no seed set, no class instantiated, nothing run."""

    def _set_seed(self) -> None:  # LightningCLI seeds every RNG here: reading a config must not
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def read_config(args: list[str], subcommand: str = "fit"):
    """The options of ``python main.py <subcommand> <args>``, parsed and checked by the CLI's own parser (its
    defaults, types and checks); nothing is loaded or run.

    Raises:
        jsonargparse.ArgumentError: what the command line refuses, with the message it prints.
    """
    kwargs = cli_arguments([subcommand, *args])
    kwargs["parser_kwargs"] = {"exit_on_error": False, subcommand: {"exit_on_error": False}}
    with warnings.catch_warnings():  # args given from Python beside a command line of their own (mosld.tools.memory's)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return ConfigReader(**kwargs).config[subcommand]


def main(args: list[str] | None = None) -> MoSLDCLI:
    """Run the CLI. A run stopped by SIGTERM exits with status 143 (a resumable checkpoint written);
    a diverged fit or bad task data exits with status 1 and a one-paragraph error, without a traceback."""
    try:
        return MoSLDCLI(**cli_arguments(args))
    except SIGTERMException:
        sys.exit(PREEMPTED_EXIT_CODE)
    except (NonFiniteError, TaskDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
