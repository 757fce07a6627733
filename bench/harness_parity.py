"""Parity of mosld's multiple-choice scorer with lm-evaluation-harness's, item by item, on the embedded model.

The same items (mosld's seeded evaluation sample of each task's test split) and the same prompts
(``mosld.tools.harness_tasks`` writes mosld's rendered prompts into the harness's task files) are scored by
``mosld.evaluation.score_batch`` and by the harness's ``HFLM`` wrapping the same model object. Per item it
compares the chosen answer under the summed log-likelihood (mosld ``accuracy_sum`` / harness ``acc``) and the
length-normalised one (mosld ``accuracy_norm`` / harness ``acc_norm``), and classifies each disagreement:
different continuation tokens, or log-likelihoods that differ only by float rounding near a tie, or a
different length normalisation. Results: docs/harness.md.

    MOSLD_DATA_DIR=../shared/data HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 \
        python -m bench.harness_parity --limit 300 --out docs/harness_parity.json
    python -m bench.harness_parity --adapter experiments/results/cpu/mosld-mixture-seed0/adapter --tasks openbookqa \
        --out /tmp/parity_trained.json      # a trained, routed adapter
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import mosld
from mosld.data.datamodule import eval_loader
from mosld.data.prompts import FAMILY_TEMPLATES, encode_examples, get_template
from mosld.data.tasks import EVAL_SAMPLE_SEED, load_task, seeded_sample, task_family
from mosld.evaluation import score_batch, supports_prompt_sharing
from mosld.models import load_base_model, load_tokenizer
from mosld.tools.harness_tasks import export_task

TASKS = ("arc_easy", "arc_challenge", "openbookqa", "commonsense_qa")
TIE = 1e-3  # log-likelihood gaps below this are float rounding between two forward passes, not a real preference


@torch.inference_mode()
def mosld_scores(model, tokenizer, task: str, limit: int, batch_size: int) -> tuple[list, list]:
    """Per item: each choice's summed log-likelihood, the tokens mosld scores, and its normalising lengths."""
    examples = seeded_sample(load_task(task, "test"), limit, EVAL_SAMPLE_SEED)
    items = encode_examples(examples, tokenizer, FAMILY_TEMPLATES[task_family(task)], 512)
    lls: list = [None] * len(items)
    share = supports_prompt_sharing(model)
    for batch in eval_loader(items, 0, tokenizer.pad_token_id, batch_size):
        out = score_batch(model, batch, share_prompt=share)
        for k, item_id in enumerate(batch["item_ids"]):
            mine = batch["item_index"] == k
            lls[int(item_id)] = out["choice_logprob"][mine].double().tolist()
    return lls, [(item.prompt, item.choices, item.choice_chars) for item in items]


def harness_tokens(lm, args: list) -> tuple[list, list]:
    """The harness's own (context, continuation) token split of one item's requests."""
    pairs = [lm._encode_pair(context, continuation) for context, continuation in args]
    return pairs[0][0], [cont for _, cont in pairs]


def cause(m: np.ndarray, h: np.ndarray, same_tokens: bool, pick_m: int, pick_h: int, scale: np.ndarray) -> str:
    """Why mosld's pick differs from the harness's on one item."""
    if not same_tokens:
        return "tokens"
    gap_m = abs(m[pick_m] / scale[pick_m] - m[pick_h] / scale[pick_h])
    return "tie" if gap_m < TIE and np.abs(m - h).max() < TIE else "loglik"


def compare(task: str, lls_m: list, toks_m: list, samples: list, lm) -> dict:
    """Agreement of the chosen answers, and the disagreements with their causes, for one task."""
    rows = sorted(samples, key=lambda s: s["doc_id"])
    counts = {"sum": 0, "norm": 0, "norm_space": 0}
    disagreements, max_diff, token_mismatch, margins = [], 0.0, 0, {"sum": np.inf, "norm": np.inf}
    non_ascii, byte_vs_char = 0, 0
    for i, row in enumerate(rows):
        m, h = np.array(lls_m[i]), np.array([r[0] for r in row["filtered_resps"]], dtype=float)
        choices = row["doc"]["choices"]
        ctx, conts = harness_tokens(lm, row["arguments"])
        same = ctx == toks_m[i][0] and conts == toks_m[i][1]
        chars_m = np.array(toks_m[i][2], dtype=float)  # mosld's accuracy_norm lengths (EncodedItem.choice_chars)
        token_mismatch += not same
        max_diff = max(max_diff, float(np.abs(m - h).max()))
        chars_h = np.array([len(c) for c in choices], dtype=float)  # harness acc_norm: the choice, no delimiter
        chars_space = chars_h + 1  # mosld's lengths before the fix: the continuation with its leading space
        ones = np.ones_like(m)
        for name, scale in (("sum", ones), ("norm", chars_m)):  # how close mosld's top two came
            top = np.sort(m / scale)[-2:]
            margins[name] = min(margins[name], float(top[1] - top[0]))
        utf8 = np.array([len(c.encode("utf-8")) for c in choices], dtype=float)
        non_ascii += not all(c.isascii() for c in choices)
        byte_vs_char += int(np.argmax(h / utf8)) != int(np.argmax(h / chars_h))  # harness acc_bytes vs acc_norm
        scorings = {"sum": (ones, ones), "norm": (chars_m, chars_h), "norm_space": (chars_space, chars_h)}
        for name, (scale_m, scale_h) in scorings.items():
            pick_m, pick_h = int(np.argmax(m / scale_m)), int(np.argmax(h / scale_h))
            counts[name] += pick_m == pick_h
            if pick_m != pick_h:
                why = "normalisation" if int(np.argmax(h / scale_m)) == pick_m and name == "norm_space" else None
                disagreements.append({
                    "item": i, "scoring": name, "mosld": pick_m, "harness": pick_h, "gold": row["target"],
                    "cause": why or cause(m, h, same, pick_m, pick_h, scale_m),
                    "mosld_ll": m.round(5).tolist(), "harness_ll": h.round(5).tolist(), "choices": choices,
                })  # fmt: skip
        # The log-likelihoods and lengths read here are the ones the harness scored with.
        assert row["acc"] == float(int(np.argmax(h)) == row["target"])
        assert row["acc_norm"] == float(int(np.argmax(h / chars_h)) == row["target"])
    n = len(rows)
    return {
        "items": n,
        "agree_sum": counts["sum"] / n,
        "agree_norm": counts["norm"] / n,
        "agree_norm_space": counts["norm_space"] / n,
        "token_mismatch_items": token_mismatch,
        "max_abs_loglik_diff": max_diff,
        "min_margin_sum": margins["sum"],
        "min_margin_norm": margins["norm"],
        "non_ascii_items": non_ascii,
        "byte_vs_char_pick_items": byte_vs_char,
        "disagreements": disagreements,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default="docs/harness_parity.json")
    parser.add_argument("--adapter", default=None, help="a mosld adapter folder to load onto the base (routed)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_base_model("embedded:smollm2-135m").eval()
    if args.adapter:
        model = mosld.load_adapter(model, args.adapter).eval()
    tokenizer = load_tokenizer("embedded:smollm2-135m")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    report = {"limit": args.limit, "threads": torch.get_num_threads(), "adapter": args.adapter, "tasks": {}}
    with tempfile.TemporaryDirectory() as folder:
        for task in args.tasks.split(","):
            assert get_template(FAMILY_TEMPLATES[task_family(task)]).delimiter == " "
            name = export_task(task, folder, limit=args.limit)
            started = time.perf_counter()
            lls_m, toks_m = mosld_scores(model, tokenizer, task, args.limit, args.batch_size)
            seconds_m = time.perf_counter() - started
            started = time.perf_counter()
            results = simple_evaluate(
                model=lm, tasks=[name], num_fewshot=0, log_samples=True, bootstrap_iters=0,
                task_manager=TaskManager(include_path=[folder]),
            )  # fmt: skip
            seconds_h = time.perf_counter() - started
            result = compare(task, lls_m, toks_m, results["samples"][name], lm)
            result |= {"seconds_mosld": round(seconds_m, 1), "seconds_harness": round(seconds_h, 1)}
            result["harness_metrics"] = {k: v for k, v in results["results"][name].items() if "stderr" not in k}
            report["tasks"][task] = result
            print(f"{task}: " + ", ".join(f"{k}={v}" for k, v in result.items() if k != "disagreements"), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))


def table(report: dict) -> str:
    lines = [
        "| task | items | agree: sum (acc) | agree: per char (acc_norm) | agree: per char incl. space (old mosld) "
        "| token splits differ | max abs log-lik diff | closest top-two gap, sum / per char | mosld s | harness s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, r in report["tasks"].items():
        lines.append(
            f"| {task} | {r['items']} | {r['agree_sum']:.3f} | {r['agree_norm']:.3f} | {r['agree_norm_space']:.3f} | "
            f"{r['token_mismatch_items']} | {r['max_abs_loglik_diff']:.1e} | "
            f"{r['min_margin_sum']:.1e} / {r['min_margin_norm']:.1e} | {r['seconds_mosld']} | {r['seconds_harness']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
