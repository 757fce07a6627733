"""Serve a mosld run, adapter folder or base model behind an OpenAI-compatible API.

Examples::

    python -m mosld.serve --run lightning_logs/version_0                    # the routed mixture, port 8000
    python -m mosld.serve --run lightning_logs/version_0 --static-gates mixture   # the collapsed adapter
    python -m mosld.serve --adapter out/adapter --port 8001
    python -m mosld.serve --peft lightning_logs/version_0/peft/mixture           # the exported LoRA, run by peft
    python -m mosld.serve --base embedded:smollm2-135m --name smollm2

Then: ``curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json'
-d '{"model": "mosld", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .model import PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mosld.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = parser.add_argument_group("what to serve (one of --run, --adapter, --peft, --base)")
    what.add_argument("--run", type=Path, help="a finished run folder (lightning_logs/version_N)")
    what.add_argument("--adapter", type=Path, help="a mosld adapter folder (its base from its config, or --base)")
    what.add_argument("--base", help="base model: hub id, folder or embedded:smollm2-135m (overrides the run's)")
    what.add_argument("--static-gates", metavar="TASK|mixture", help="serve the collapsed adapter: fixed gates of "
                      "a training task or of the mixture, from RUN/peft/gates.json (scripts/export_peft.py)")  # fmt: skip
    what.add_argument("--gates", type=Path, help="the gates.json for --static-gates (default RUN/peft/gates.json)")
    what.add_argument("--peft", type=Path, help="a peft LoRA folder (scripts/export_peft.py), run by peft, unmerged")
    what.add_argument("--merge-peft", action="store_true", help="merge the --peft LoRA into the base weights")
    what.add_argument("--no-adapter", action="store_true", help="serve the run's (or adapter's) base without the "
                      "adapter, with the run's dtype, precision and quantization: the baseline")  # fmt: skip
    how = parser.add_argument_group("how")
    how.add_argument("--name", default="mosld", help="the model name clients ask for (default: mosld)")
    how.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), help="base weights' dtype "
                     "(default: the run's)")  # fmt: skip
    how.add_argument("--precision", choices=("auto", *PRECISIONS), default=None,
                     help="Lightning precision (default: the run's, as its config.yaml records it; else auto)")  # fmt: skip
    how.add_argument("--quantization-bits", "--model.quantization.bits", dest="quantization_bits", type=int,
                     choices=(4, 8), help="quantize the base at load with bitsandbytes (default: the run's)")  # fmt: skip
    how.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    how.add_argument("--context-length", type=int, help="prompt + answer tokens (default: the model's)")
    how.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for")
    how.add_argument("--max-batch", type=int, default=16, help="most requests decoded together")
    how.add_argument("--batch-window-ms", type=float, default=10.0,
                     help="how long a batch waits after its first request for others to join")  # fmt: skip
    how.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core; on a 2-core CPU "
                     "the routed mixture decoded twice as fast with 1, docs/serving.md)")  # fmt: skip
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        parser.error("the server needs its extra: pip install 'mosld[serve]' (FastAPI and uvicorn)")
    import torch

    from .app import Server, create_app
    from .engine import Engine
    from .model import load_served_model

    if args.threads:
        torch.set_num_threads(args.threads)
    # By hand: a plain argparse parser, where type=PositiveInt would say "invalid PositiveInt value: '0'"
    for option in ("max_tokens", "max_batch"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')}: expected a positive number, got {getattr(args, option)}")
    try:
        served = load_served_model(
            run=args.run, adapter=args.adapter, base=args.base, dtype=args.dtype, precision=args.precision,
            quantization_bits=args.quantization_bits, device=args.device, static_gates=args.static_gates,
            gates_file=args.gates, peft=args.peft, merge_peft=args.merge_peft, no_adapter=args.no_adapter,
            context_length=args.context_length,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    engine = Engine(served.model, served.tokenizer, max_batch=args.max_batch,
                    batch_window=args.batch_window_ms / 1000, autocast=served.autocast)  # fmt: skip
    server = Server(engine, args.name, served.context_length, args.max_tokens, served.description)
    print(f"serving {args.name!r}: {served.description}; context {served.context_length} tokens", file=sys.stderr)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
