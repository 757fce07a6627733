"""The training side of generation tasks and of the router scalars, on fakes: the module's per-task sums,
metrics and rows, the item records, the printed summary, and which router scalars TensorBoard gets.

Decoding and scoring themselves (``mosld.evaluation.generation_scoring``, tested in test_generation.py) are replaced by a
stand-in here; the end-to-end runs through them are in test_instruct.py."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from helpers import adapted

from mosld.adapters import router_stats, set_router_stats
from mosld.evaluation.sums import add_generation, add_multiple_choice, eval_metrics, new_sums
from mosld.training.callbacks import RouterStatsCallback
from mosld.training.module import MoSLDModule
from mosld.training.records import ItemPredictionWriter, eval_summary_text


# ---------------------------------------------------------------------------- router scalars
class Recorder:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_metrics(self, metrics, step) -> None:
        self.logged |= metrics


def logged_router_scalars(**options) -> dict[str, float]:
    model = adapted("llama", "mosld")  # experts 4/3/3/2 by depth, top-2: the last layer has no choice
    set_router_stats(model, True)
    model(input_ids=torch.randint(0, 64, (2, 6)), attention_mask=torch.ones(2, 6, dtype=torch.long))
    stats = router_stats(model)
    logger = Recorder()
    callback = RouterStatsCallback(heatmap=False, **options)
    callback._log(SimpleNamespace(global_step=0), SimpleNamespace(loggers=[logger]), stats, "router", reduce=False)
    return logger.logged


def test_router_scalars_are_summaries_unless_per_layer_or_per_expert_ones_are_asked_for():
    default = logged_router_scalars()
    assert set(default) == {"router/entropy", "router/load_max", "router/load_min"}
    assert 0 <= default["router/load_min"] <= 2 / 3 <= default["router/load_max"] <= 1  # top-2 of 3 or 4 experts
    layers = 4 * 3  # decoder layers x adapted projections (q, v, up)
    per_layer = logged_router_scalars(per_layer_scalars=True)
    assert len(per_layer) == 3 + 2 * layers and "router/entropy/L00.q_proj" in per_layer
    assert not any(k.startswith("router/load/") for k in per_layer)
    per_expert = logged_router_scalars(per_expert_scalars=True)
    assert len(per_expert) == 3 + 3 * (4 + 3 + 3 + 2)  # one per expert per layer
    assert "router/load/L00.q_proj/e3" in per_expert and "router/entropy/L00.q_proj" not in per_expert
    assert per_expert["router/entropy"] == pytest.approx(default["router/entropy"])


# ---------------------------------------------------------------------------- sums and metrics
MC_KEYS = {"acc", "acc_ci95", "acc_sum", "acc_norm", "acc_token_norm", "items", "answer_loss"}


def mc_scores(correct: list[int]) -> dict[str, torch.Tensor]:
    c = torch.tensor(correct, dtype=torch.bool)
    return {"correct": c, "correct_sum": c, "correct_norm": c, "correct_token_norm": c,
            "gold_loss_sum": torch.ones(len(correct)), "gold_tokens": 2 * torch.ones(len(correct))}  # fmt: skip


def test_multiple_choice_only_runs_keep_their_keys():
    sums = new_sums(2)
    add_multiple_choice(sums, 0, mc_scores([1, 0, 1, 1]))
    add_multiple_choice(sums, 1, mc_scores([0, 0]))
    metrics = eval_metrics("val", ["a", "b"], sums, {})
    expected = {f"val/{t}/{k}" for t in "ab" for k in MC_KEYS} | {"val/acc_avg", "val/acc_avg_ci95", "val/answer_loss"}
    assert set(metrics) == expected
    assert metrics["val/a/acc"] == 0.75 and metrics["val/a/acc_ci95"] == pytest.approx(
        1.96 * math.sqrt(0.75 * 0.25 / 4)
    )
    assert metrics["val/acc_avg"] == 0.375 and metrics["val/answer_loss"] == 0.5


def test_generation_metrics_intervals_and_the_score_average():
    sums = new_sums(3)
    add_multiple_choice(sums, 0, mc_scores([1, 0, 1, 1]))
    add_generation(sums, 1, torch.tensor([1.0, 0.0, 1.0, 1.0]))  # exact match: 0/1
    add_generation(sums, 2, torch.tensor([0.5, 0.25]))
    add_generation(sums, 2, torch.tensor([1.0]))  # a second batch of the same task
    metrics = eval_metrics("test", ["mc", "em", "f1"], sums, {1: "exact_match", 2: "token_f1"})
    assert set(k for k in metrics if k.startswith("test/em/")) == {"test/em/exact_match", "test/em/exact_match_ci95",
                                                                    "test/em/items"}  # fmt: skip
    # 0/1 scores: the same binomial interval as multiple-choice accuracy
    assert metrics["test/em/exact_match"] == metrics["test/mc/acc"]
    assert metrics["test/em/exact_match_ci95"] == pytest.approx(metrics["test/mc/acc_ci95"])
    f1 = [0.5, 0.25, 1.0]
    mean = sum(f1) / 3
    assert metrics["test/f1/token_f1"] == pytest.approx(mean) and metrics["test/f1/items"] == 3
    variance = sum((x - mean) ** 2 for x in f1) / 3
    assert metrics["test/f1/token_f1_ci95"] == pytest.approx(1.96 * math.sqrt(variance / 3))
    # acc_avg over the multiple-choice tasks; score_avg over every task's headline
    assert metrics["test/acc_avg"] == 0.75 and metrics["test/answer_loss"] == 0.5
    assert metrics["test/score_avg"] == pytest.approx((0.75 + 0.75 + mean) / 3)
    cis = [metrics["test/mc/acc_ci95"], metrics["test/em/exact_match_ci95"], metrics["test/f1/token_f1_ci95"]]
    assert metrics["test/score_avg_ci95"] == pytest.approx(math.sqrt(sum(c * c for c in cis)) / 3)
    with pytest.raises(RuntimeError, match="task 'x' has no evaluation items"):
        eval_metrics("val", ["x"], new_sums(1), {0: "exact_match"})


def test_the_printed_summary_of_a_generation_only_run():
    sums = new_sums(1)
    add_generation(sums, 0, torch.tensor([1.0, 0.0]))
    text = eval_summary_text(eval_metrics("val", ["qa1"], sums, {0: "exact_match"}), "val", "step 3")
    assert text.splitlines()[0] == "val (step 3): score_avg 0.500 ± 0.693"
    assert text.splitlines()[1] == "               qa1: exact_match 0.500 ± 0.693 (n=2)"


# ---------------------------------------------------------------------------- the module on generation batches
@dataclass(frozen=True)
class Spec:
    metric: str = "exact_match"
    max_new_tokens: int = 4
    stop: tuple[str, ...] = ("\n",)
    template: str = "plain"


@pytest.fixture
def fake_generation(monkeypatch):
    """Stand-in for the decoder and scorer the module calls (``mosld.evaluation.generation_scoring``, tested on its own):
    'generates' each reference's first word, or "?" without any; exact match is 1 when the text is a reference."""
    module = SimpleNamespace()
    module.calls = []

    def generate_batch(model, batch, tokenizer):
        module.calls.append((model, tokenizer))
        return [refs[0].split()[0] if refs else "?" for refs in batch["references"]]

    def score_generations(texts, references, metric):
        assert metric in ("exact_match", "token_f1")
        return [float(t in refs) if metric == "exact_match" else 0.5 for t, refs in zip(texts, references, strict=True)]

    module.generate_batch, module.score_generations = generate_batch, score_generations
    monkeypatch.setattr("mosld.evaluation.generation_scoring.generate_batch", generate_batch)  # evaluation steps
    monkeypatch.setattr("mosld.evaluation.generation_scoring.score_generations", score_generations)
    monkeypatch.setattr("mosld.training.module.generate_batch", generate_batch)  # predict
    return module


def generation_batch(task: int, references: list[list[str]], spec: Spec) -> dict:
    n = len(references)
    return {"input_ids": torch.ones(n, 3, dtype=torch.long), "attention_mask": torch.ones(n, 3, dtype=torch.long),
            "task_ids": torch.full((n,), task), "item_ids": [f"t{task}-{i}" for i in range(n)],
            "references": references, "generation": spec}  # fmt: skip


def fake_module(tmp_path, specs: dict[int, Spec]) -> MoSLDModule:
    module = MoSLDModule()
    module.model = adapted("llama", "mosld", dtype=torch.float32)
    datamodule = SimpleNamespace(task_names=["qa", "chat"], tokenizer="TOKENIZER", generation_spec=specs.get)
    module.trainer = SimpleNamespace(datamodule=datamodule, strategy=SimpleNamespace(reduce=lambda v, reduce_op: v),
                                     log_dir=str(tmp_path), sanity_checking=False)  # fmt: skip
    return module


def test_generation_batches_are_decoded_scored_summed_and_recorded(tmp_path, fake_generation):
    em, f1 = Spec(), Spec(metric="token_f1")
    module = fake_module(tmp_path, {0: em, 1: f1})
    writer = ItemPredictionWriter(stages=("test",))
    module.on_test_epoch_start()
    writer.on_test_epoch_start(module.trainer, module)
    batches = [(0, generation_batch(0, [["Paris is"], ["no", "nope"], ["x"]], em)),
               (1, generation_batch(1, [["a b"], ["c"]], f1))]  # fmt: skip
    for task, batch in batches:
        outputs = module.test_step(batch, 0, task)
        assert outputs["generated"] == [refs[0].split()[0] for refs in batch["references"]]
        writer.on_test_batch_end(module.trainer, module, outputs, batch, 0, task)
    assert fake_generation.calls[0] == (module.model, "TOKENIZER")
    metrics = module.eval_metrics("test")
    assert metrics["test/qa/exact_match"] == pytest.approx(2 / 3) and metrics["test/qa/items"] == 3
    assert metrics["test/chat/token_f1"] == 0.5 and metrics["test/chat/token_f1_ci95"] == pytest.approx(
        1.96 * 1e-6 / 2**0.5
    )
    assert metrics["test/score_avg"] == pytest.approx((2 / 3 + 0.5) / 2) and "test/acc_avg" not in metrics
    assert "test/answer_loss" not in metrics
    writer.on_test_epoch_end(module.trainer, module)
    rows = [json.loads(line) for line in (tmp_path / "test_predictions.jsonl").read_text().splitlines()]
    assert rows[0] == {"task": "chat", "item": "t1-0", "generated": "a", "references": ["a b"], "score": 0.5,
                       "correct": 0.5}  # fmt: skip
    assert [r["correct"] for r in rows if r["task"] == "qa"] == [0.0, 1.0, 1.0]  # "Paris" is not "Paris is"
    assert [r["item"] for r in rows] == ["t1-0", "t1-1", "t0-0", "t0-1", "t0-2"]  # sorted by task, item


def test_metric_names_come_from_the_batches_without_a_data_module_spec(tmp_path, fake_generation):
    module = fake_module(tmp_path, {})
    module.trainer.datamodule = SimpleNamespace(task_names=["qa"], tokenizer=None)  # no generation_spec method
    module.on_validation_epoch_start()
    module.validation_step(generation_batch(0, [["yes"]], Spec()), 0, 0)
    assert module.eval_metrics("val") == {"val/qa/exact_match": 1.0, "val/qa/exact_match_ci95": pytest.approx(1.96e-6),
                                          "val/qa/items": 1.0, "val/score_avg": 1.0,
                                          "val/score_avg_ci95": pytest.approx(1.96e-6)}  # fmt: skip


def test_predict_rows_of_a_generation_batch(tmp_path, fake_generation):
    module = fake_module(tmp_path, {0: Spec()})
    rows = module.predict_step(generation_batch(0, [["Rome"], []], Spec()), 0)
    assert rows == [{"generated": "Rome", "references": ["Rome"]}, {"generated": "?"}]
