"""lm-evaluation-harness on a mosld run or adapter, its routing intact: a ``mosld`` model in lm-eval's registry.

Importing this module registers ``mosld`` with ``lm_eval.api.registry.register_model``. ``MosldLM`` loads the
base model, injects the adapter with ``mosld.load_adapter`` (routers and all experts: nothing is collapsed to
fixed gates) and is the harness's ``HFLM`` on that model object, so the harness's own log-likelihood and
generation code score it. Its model arguments: ``run`` (a run folder: its base, dtype and ``adapter/``),
``adapter`` (an adapter folder), ``base`` (overrides the run's or adapter's base; alone, the base without an
adapter), ``dtype``, ``trust_remote_code``, ``device`` (lm-eval's ``--device``: its command line defaults to
``cuda:0``; ``python -m mosld.tools.harness`` gives ``cpu`` when there is no GPU and no ``--device``); any
other goes to ``HFLM`` (``max_length``, ...).
Everything else is lm-eval's own: its command line and ``lm_eval.simple_evaluate``. Needs the optional extra
``pip install -e ".[harness]"``. Offline, give the harness local tasks (``dataset_path: json``; see
``mosld.tools.harness_tasks`` for mosld's own) and set ``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1``. How the
harness's scores compare with mosld's: docs/harness.md.

From Python::

    import mosld.tools.harness  # registers "mosld"
    from lm_eval import simple_evaluate

    simple_evaluate(model="mosld", model_args="run=lightning_logs/version_0", tasks=["arc_easy"], num_fewshot=0)

From the command line, lm-eval's own (``python -m mosld.tools.harness --help`` is ``lm-eval --help``)::

    python -m mosld.tools.harness --model mosld --model_args run=lightning_logs/version_0 --tasks arc_easy,mmlu
    python -m mosld.tools.harness --model mosld --model_args adapter=out/adapter --tasks my_task \\
        --include_path my_tasks --output_path out/eval --log_samples
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from mosld.models import load_tokenizer
from mosld.training.run_folder import load_model, resolve_spec

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # the optional extra: say how to get it rather than a bare ModuleNotFoundError
    raise ImportError(
        'mosld.tools.harness needs lm-evaluation-harness: pip install -e ".[harness]" (or pip install lm-eval)'
    ) from err


@register_model("mosld")
class MosldLM(HFLM):
    """A mosld run, adapter folder or plain base as lm-eval's ``HFLM``, the adapter routed per token."""

    def __init__(
        self,
        run: str | None = None,
        adapter: str | None = None,
        base: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.spec = resolve_spec(run, adapter, base, dtype, trust_remote_code)
        # lm-eval's command line always passes one (cuda:0 by default); from Python, as HFLM without a device
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = load_tokenizer(self.spec.base, self.spec.trust_remote_code)
        super().__init__(pretrained=load_model(self.spec, device), tokenizer=tokenizer, **kwargs)

    def get_model_info(self) -> dict:
        """HFLM's model information plus what mosld loaded (lm-eval writes it into the results' ``config``)."""
        spec = self.spec
        loaded = {"base": spec.base, "adapter": str(spec.adapter) if spec.adapter else None, "dtype": spec.dtype}
        return super().get_model_info() | {"mosld": loaded}


def main() -> None:
    """lm-eval's own command line, with ``mosld`` registered first.

    Kept because lm-eval's ``lm-eval`` command finds models only in its own package (no plugin entry points),
    so it cannot see ``mosld`` unless this module is imported first. One default differs: without a GPU and
    without ``--device``, the device is the CPU (lm-eval's default, ``cuda:0``, would fail there).
    """
    from lm_eval.__main__ import cli_evaluate

    if not torch.cuda.is_available() and not any(a == "--device" or a.startswith("--device=") for a in sys.argv):
        sys.argv += ["--device", "cpu"]
    cli_evaluate()


if __name__ == "__main__":
    main()
