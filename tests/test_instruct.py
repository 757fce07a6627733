"""Generation tasks end to end through the real entry point: a tiny model on a mixture of a multiple-choice task
and the three generation row formats (Alpaca, prompt/response, chat with the tokenizer's template): fit, test,
predict, and what each writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, tiny_run_args

from main import main

EXAMPLE_INSTRUCTIONS = str(REPO / "data" / "example_instructions")
EXAMPLE_CHAT = str(REPO / "data" / "example_chat")


def prompt_response_task(folder: Path) -> str:
    folder.mkdir(parents=True)
    for split, numbers in (("train", range(12)), ("test", range(100, 105))):
        rows = [{"prompt": f"Say {n}.", "response": str(n)} for n in numbers]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def mixture_args(tiny_model_dir: str, root: Path, *extra: str) -> list[str]:
    echo = prompt_response_task(root / "echo")
    tasks = f"[{REPO / 'data' / 'example_task'}, {EXAMPLE_INSTRUCTIONS}, {EXAMPLE_CHAT}, {echo}]"
    generation = '{example_instructions: {max_new_tokens: 6}, example_chat: {max_new_tokens: 5, metric: token_f1}, ' \
        'echo: {max_new_tokens: 4, metric: exact_match}}'  # fmt: skip
    return tiny_run_args(
        tiny_model_dir, root, "--data.tasks", tasks, "--data.generation", generation, "--data.max_length", "256",
        "--trainer.max_steps", "2", *extra,
    )  # fmt: skip


@pytest.mark.slow
def test_mixed_multiple_choice_and_generation_fit_test_and_predict(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level("INFO"):
        cli = main(mixture_args(tiny_model_dir, tmp_path))
    run = Path(cli.trainer.log_dir)
    printed = caplog.text
    # before and after training, each task's headline with its interval
    for line in ("example_task: acc", "example_instructions: rouge_l", "example_chat: token_f1", "echo: exact_match"):
        assert printed.count(line) == 2, line
    history = json.loads((run / "eval_metrics.json").read_text())
    after = history[-1]
    assert after["val/example_task/acc"] >= 0 and "val/acc_avg" in after and "val/score_avg" in after
    for task, metric in (("example_instructions", "rouge_l"), ("example_chat", "token_f1"), ("echo", "exact_match")):
        assert 0 <= after[f"val/{task}/{metric}"] <= 1 and f"val/{task}/{metric}_ci95" in after
        assert f"val/{task}/acc" not in after and f"val/{task}/answer_loss" not in after
    assert after["val/echo/items"] == 1  # 10% of 12 training rows held out (no validation file): fixed, seeded

    tested = main([a if a != "fit" else "test" for a in mixture_args(tiny_model_dir, tmp_path / "t")]
                  + ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")])  # fmt: skip
    rows = [json.loads(line) for line in (Path(tested.trainer.log_dir) / "test_predictions.jsonl").read_text().split("\n")
            if line]  # fmt: skip
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    # data.max_eval_examples 4: the same seeded 4 test items per task
    assert {t: len(r) for t, r in by_task.items()} == dict.fromkeys(("example_task", "example_instructions",
                                                                     "example_chat", "echo"), 4)  # fmt: skip
    for row in by_task["echo"]:
        assert row.keys() == {"task", "item", "generated", "references", "score", "correct"}
        assert row["score"] == float(row["generated"].strip().lower() == row["references"][0])
    assert {r["references"][0] for r in by_task["echo"]} < {"100", "101", "102", "103", "104"}
    assert "gold" in by_task["example_task"][0]
    # the test metrics are the mean of the recorded item scores
    metrics = json.loads((Path(tested.trainer.log_dir) / "eval_metrics.json").read_text())[-1]
    for task, metric in (("example_chat", "token_f1"), ("echo", "exact_match")):
        scores = [r["score"] for r in by_task[task]]
        assert metrics[f"test/{task}/{metric}"] == pytest.approx(sum(scores) / len(scores))

    # predict on a file of generation rows writes the generated text (references when the row has them)
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"prompt": "Say 7."}\n{"prompt": "Say 8.", "response": "8"}\n')
    predicted = main([a if a != "fit" else "predict" for a in mixture_args(tiny_model_dir, tmp_path / "p")]
                     + ["--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--data.predict_file", str(questions)])  # fmt: skip
    out = [json.loads(line) for line in (Path(predicted.trainer.log_dir) / "predictions.jsonl").read_text().split("\n")
           if line]  # fmt: skip
    assert len(out) == 2 and all(isinstance(r["generated"], str) for r in out)
    assert "references" not in out[0] and out[1]["references"] == ["8"]
