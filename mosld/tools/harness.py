"""Score a mosld run or adapter with lm-evaluation-harness, its routing intact.

The base model is loaded, the adapter injected with ``mosld.load_adapter`` (routers and all experts: nothing
is collapsed to fixed gates), and the model object handed to the harness's ``HFLM``. The harness's options
pass through: tasks, few-shot, limit, batch size, ``--include_path`` (local task YAMLs; see
``mosld.tools.harness_tasks`` for mosld's own tasks), output path, sample logging. Needs the optional extra
``pip install -e ".[harness]"``. Offline, give the harness local tasks (``dataset_path: json``) and set
``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1``. How the harness's scores compare with mosld's: docs/harness.md.

Examples::

    python -m mosld.tools.harness --run lightning_logs/version_0 --tasks arc_easy,mmlu --num_fewshot 0
    python -m mosld.tools.harness --adapter out/adapter --tasks my_task --include_path my_tasks --output_path out/eval
    python -m mosld.tools.harness --base embedded:smollm2-135m --tasks mosld_arc_easy --include_path harness_tasks
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mosld.models import DTYPES, load_tokenizer
from mosld.training.run_folder import ModelSpec, load_model, spec_from_adapter, spec_from_run

RESULTS_NAME = "results.json"


def resolve_spec(args: argparse.Namespace) -> ModelSpec:
    """The model to score, from ``--run`` / ``--adapter`` / ``--base`` / ``--dtype``."""
    if args.run and args.adapter:
        raise ValueError("--run and --adapter: give one (a run folder holds its adapter in adapter/)")
    if args.run:
        spec = spec_from_run(args.run)
    elif args.adapter:
        spec = spec_from_adapter(args.adapter)
    elif args.base:
        spec = ModelSpec(base=args.base, adapter=None)
    else:
        raise ValueError("give --run, --adapter or --base (the model to score)")
    base = args.base or spec.base
    if not base:
        raise ValueError(f"--adapter {args.adapter}: its config does not name the base model; give --base")
    return ModelSpec(base, spec.adapter, args.dtype or spec.dtype, args.trust_remote_code or spec.trust_remote_code)


def harness_lm(model: torch.nn.Module, tokenizer: Any, batch_size: int | str = 1, max_length: int | None = None):
    """The model object wrapped as the harness's ``HFLM`` (its log-likelihood and generation code)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def run_harness(lm: Any, args: argparse.Namespace) -> dict:
    """``lm_eval.simple_evaluate`` with the pass-through options."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = [t for t in args.tasks.split(",") if t]
    include = [str(Path(p).resolve()) for p in args.include_path] if args.include_path else None
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        log_samples=args.log_samples,
        task_manager=TaskManager(include_path=include),
        bootstrap_iters=args.bootstrap_iters,
        apply_chat_template=args.apply_chat_template,
        gen_kwargs=args.gen_kwargs,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
    )


def write_results(results: dict, out: Path) -> Path:
    """``<out>/results.json`` and, with logged samples, ``<out>/samples_<task>.jsonl``."""
    from lm_eval.utils import handle_non_serializable

    out.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None) or {}
    file = out / RESULTS_NAME
    file.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    for task, rows in samples.items():
        with open(out / f"samples_{task}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=handle_non_serializable) + "\n")
    return file


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive count or fraction, got {text}")
    return value if value < 1 else int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mosld.tools.harness", description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--run", help="run folder (lightning_logs/version_N): its base model, dtype and adapter/")
    model.add_argument("--adapter", help="adapter folder (adapter_model.safetensors + adapter_config.json)")
    model.add_argument("--base", help="base model (hub id, folder, embedded:...); overrides the run's or adapter's")
    model.add_argument("--dtype", choices=sorted(DTYPES), help="base model dtype (default: the run's, else float32)")
    model.add_argument("--trust_remote_code", action="store_true")
    model.add_argument("--device", default="cpu", help="torch device (default cpu)")
    harness = parser.add_argument_group("lm-evaluation-harness options (passed through)")
    harness.add_argument("--tasks", required=True, help="comma-separated harness task names")
    harness.add_argument("--num_fewshot", type=int, default=None)
    harness.add_argument("--limit", type=_limit, default=None, help="items per task (a count, or a fraction < 1)")
    harness.add_argument("--batch_size", default="1", help="an integer, or auto")
    harness.add_argument("--max_length", type=int, default=None, help="model context length (default: its config)")
    harness.add_argument("--include_path", action="append", help="folder of local task YAMLs (repeatable)")
    harness.add_argument("--output_path", help=f"folder for {RESULTS_NAME} (and samples_<task>.jsonl)")
    harness.add_argument("--log_samples", action="store_true", help="keep per-item requests and scores")
    harness.add_argument("--bootstrap_iters", type=int, default=100000, help="0 skips the standard errors")
    harness.add_argument("--apply_chat_template", action="store_true")
    harness.add_argument("--gen_kwargs", default=None, help="generation options, e.g. temperature=0,max_gen_toks=64")
    harness.add_argument("--seed", type=int, default=0, help="sampling seed of the harness (few-shot order etc.)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        parser.error('lm-evaluation-harness is not installed: pip install -e ".[harness]" (or pip install lm-eval)')
    if args.log_samples and not args.output_path:
        parser.error("--log_samples needs --output_path (where samples_<task>.jsonl go)")
    try:
        spec = resolve_spec(args)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    batch_size = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)
    model = load_model(spec, args.device)
    lm = harness_lm(model, load_tokenizer(spec.base, spec.trust_remote_code), batch_size, args.max_length)
    results = run_harness(lm, args)
    results["mosld"] = {"base": spec.base, "adapter": str(spec.adapter) if spec.adapter else None, "dtype": spec.dtype}
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output_path:
        print(f"wrote {write_results(results, Path(args.output_path))}")
    return results


if __name__ == "__main__":
    main()
