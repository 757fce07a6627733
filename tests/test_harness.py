"""The lm-evaluation-harness bridge: a routed mosld adapter scored by the harness, offline, on local tasks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import EXAMPLE_TASK, REPO, write_routed_run

import mosld
from mosld.data.datamodule import eval_loader
from mosld.data.prompts import FAMILY_TEMPLATES, encode_examples, get_template
from mosld.data.tasks import load_task, task_family
from mosld.evaluation import score_batch
from mosld.tools.harness_tasks import export_task, harness_row
from mosld.training.run_folder import spec_from_adapter, spec_from_run

pytest.importorskip("lm_eval")
from lm_eval.api.registry import get_model  # noqa: E402

from mosld.tools.harness import MosldLM, main  # noqa: E402  (registers "mosld"; needs lm_eval)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished run as fit leaves it: config.yaml naming the tiny base, and a routed MoSLD adapter/."""
    return write_routed_run(tiny_model_dir, tmp_path_factory.mktemp("run"))


def harness_samples(lm, tasks: Path, name: str) -> list[dict]:
    """lm-eval's own Python API on an ``LM`` object, zero-shot, on the local task ``name`` under ``tasks``."""
    from lm_eval import simple_evaluate  # imports datasets: after the offline fixture has set its variables
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(tasks)])
    results = simple_evaluate(model=lm, tasks=[name], num_fewshot=0, log_samples=True, task_manager=manager,
                              bootstrap_iters=0)  # fmt: skip
    return sorted(results["samples"][name], key=lambda s: s["doc_id"]), results["results"][name]


@torch.inference_mode()
def mosld_choice_logprobs(model, tokenizer) -> list[list[float]]:
    """mosld's summed log-likelihood of every choice of the example task's test items, in file order."""
    template = FAMILY_TEMPLATES[task_family(EXAMPLE_TASK)]  # passages where the items have them, as export_task
    items = encode_examples(load_task(EXAMPLE_TASK, "test"), tokenizer, template, 256)
    scores: list = [None] * len(items)
    for batch in eval_loader(items, 0, tokenizer.pad_token_id, 4):
        out = score_batch(model.eval(), batch)
        for k, item_id in enumerate(batch["item_ids"]):
            scores[int(item_id)] = out["choice_logprob"][batch["item_index"] == k].tolist()
    return scores


def test_bridge_scores_a_run_on_a_local_task_yaml(run_dir, tmp_path, monkeypatch):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    config = {
        "task": "example_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(EXAMPLE_TASK) / "test.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    (tasks / "example_mc.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    args = ["--model", "mosld", "--model_args", f"run={run_dir}", "--tasks", "example_mc", "--include_path", str(tasks)]
    args += ["--output_path", str(out), "--log_samples", "--batch_size", "4"]  # no --device: the CPU without a GPU
    monkeypatch.setattr(sys, "argv", ["python -m mosld.tools.harness", *args])
    main()  # lm-eval's own command line, with "mosld" registered
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert 0.0 <= results["results"]["example_mc"]["acc,none"] <= 1.0
    assert results["config"]["model"] == "mosld"
    assert torch.cuda.is_available() or results["config"]["device"] == "cpu"
    assert results["config"]["mosld"]["adapter"] == str(run_dir / "adapter")
    (samples_file,) = out.rglob("samples_example_mc_*.jsonl")
    samples = samples_file.read_text().splitlines()
    assert len(samples) == len(load_task(EXAMPLE_TASK, "test"))
    assert json.loads(samples[0])["arguments"]["gen_args_0"]["arg_0"] == "Q: Which of these is the largest?\nA:"


def test_harness_logliks_are_mosld_scores_with_routing(run_dir, tiny_model_dir, tmp_path):
    spec = spec_from_adapter(run_dir / "adapter")
    assert spec == spec_from_run(run_dir)  # the adapter's config names the same base
    lm = get_model("mosld")(adapter=str(run_dir / "adapter"), batch_size=4)  # as simple_evaluate(model="mosld")
    assert isinstance(lm, MosldLM) and lm.spec == spec
    model, tokenizer = lm.model, lm.tokenizer
    assert mosld.adapter_layers(model) and all(m.num_experts > 1 for m in mosld.adapter_layers(model).values())
    name = export_task(EXAMPLE_TASK, tmp_path)
    samples, metrics = harness_samples(lm, tmp_path, name)
    harness = [[r[0] for r in s["filtered_resps"]] for s in samples]
    ours = mosld_choice_logprobs(model, tokenizer)
    for h, m in zip(harness, ours, strict=True):
        assert h == pytest.approx(m, abs=1e-4)
    base_samples, _ = harness_samples(MosldLM(base=str(tiny_model_dir), batch_size=4), tmp_path, name)
    base = [[r[0] for r in s["filtered_resps"]] for s in base_samples]
    assert max(abs(a - b) for h, b_ in zip(harness, base, strict=True) for a, b in zip(h, b_, strict=True)) > 1e-2
    # Same scores and the same length normalisation: the harness's acc / acc_norm are mosld's sum / norm.
    ours_acc = mosld.evaluate(model, tokenizer, [EXAMPLE_TASK], split="test", max_length=256)["metrics"]
    assert metrics["acc,none"] == pytest.approx(ours_acc["example_task"]["accuracy_sum"])
    assert metrics["acc_norm,none"] == pytest.approx(ours_acc["example_task"]["accuracy_norm"])


def test_export_task_writes_mosld_prompts_and_harness_choices(tmp_path):
    name = export_task(EXAMPLE_TASK, tmp_path, limit=5)
    config = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
    rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert name == "mosld_example_task" and config["target_delimiter"] == " " and len(rows) == 5
    example = load_task(EXAMPLE_TASK, "test")[0]
    assert harness_row(example, get_template("science")) == {
        "prompt": "Q: Which of these is the largest?\nA:",
        "choices": example.choices,
        "label": example.label,
    }
    # A passage task's prompt carries the passage, as mosld renders it.
    passage = type(example)("t", "Once upon a time.", "Who?", ["a", "b"], 0)
    assert harness_row(passage, get_template("passage"))["prompt"] == "Once upon a time.\n\nQ: Who?\nA:"


def test_export_task_refuses_a_generation_task_by_name(tmp_path):
    with pytest.raises(ValueError, match="'.*example_instructions' is a generation task: harness_tasks exports"):
        export_task(str(REPO / "data" / "example_instructions"), tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def mosld_lm(model_args: str) -> MosldLM:
    """The ``mosld`` model as ``simple_evaluate(model="mosld", model_args=...)`` builds it."""
    return get_model("mosld").create_from_arg_string(model_args)


def test_bad_run_path_names_the_option_and_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        mosld_lm(f"run={tmp_path / 'version_9'}")
    assert "--run" in str(err.value) and "config.yaml" in str(err.value) and "version_9" in str(err.value)


def test_run_and_adapter_together_are_refused(run_dir):
    with pytest.raises(ValueError, match="give one"):
        mosld_lm(f"run={run_dir},adapter={run_dir / 'adapter'}")


def test_a_run_config_the_command_line_refuses_is_refused_with_its_message(run_dir, tmp_path):
    run = tmp_path / "version_1"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text((run_dir / "adapter" / "adapter_config.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(config | {"data": {"batch_size": 0}}))
    with pytest.raises(ValueError) as err:
        mosld_lm(f"run={run}")
    assert str(err.value).startswith(f"--run {run}: {run / 'config.yaml'}: ")
    refused = 'Parser key "data.batch_size":\n  Not of type PositiveInt: 0 does not conform to restriction v>0'
    assert refused in str(err.value)
