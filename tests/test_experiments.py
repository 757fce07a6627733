"""The sweep, its records and the results page, end to end on a tiny random model; the statistics on
inputs with known answers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import EXAMPLE_TASK, REPO, copy_of_example_task

from mosld.experiments import binomial_two_sided, load_protocol, mcnemar_exact, mean_sd, paired_bootstrap
from mosld.experiments.__main__ import main as experiments_main
from mosld.experiments.aggregate import aggregate
from mosld.experiments.protocol import parse_only
from mosld.experiments.routing import depth_quartiles, routing_top_k, specialisation_verdict, task_routing_distances
from mosld.experiments.stats import compare, detectable_difference, hierarchical_bootstrap


# ---------------------------------------------------------------------------- statistics
def test_mean_and_sample_sd():
    assert mean_sd([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2))
    assert mean_sd([0.4]) == (0.4, 0.0)


def test_exact_mcnemar_matches_the_binomial_tail():
    # 10 discordant pairs one way, 2 the other: p = 2 * P(X <= 2 | n = 12, 1/2) = 2 * 79 / 4096
    a = {"t": np.array([[1] * 10 + [0] * 2 + [1] * 5])}
    b = {"t": np.array([[0] * 10 + [1] * 2 + [1] * 5])}
    assert mcnemar_exact(a, b) == (10, 2, pytest.approx(158 / 4096))
    assert binomial_two_sided(3, 6) == 1.0  # a perfectly balanced split
    assert binomial_two_sided(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(a, a)[2] == 1.0


# (smaller count k, discordant pairs n): none at all, none one way, balanced splits, odd n, and n large enough
# that 2**n is no float
BINOMIAL_CASES = [(0, 0), (0, 1), (0, 2), (1, 2), (0, 5), (2, 5), (2, 12), (3, 6), (7, 15), (40, 100),
                  (470, 1000), (1000, 2001), (4900, 10_000)]  # fmt: skip


@pytest.mark.parametrize(("k", "n"), BINOMIAL_CASES)
def test_binomial_two_sided_is_the_exact_tail_correctly_rounded(k, n):
    from fractions import Fraction

    exact = min(Fraction(1), Fraction(2 * sum(math.comb(n, i) for i in range(k + 1)), 2**n))
    assert binomial_two_sided(k, n) == float(exact)  # to the last bit


@pytest.mark.parametrize(("k", "n"), [(k, n) for k, n in BINOMIAL_CASES if n > 0])
def test_binomial_two_sided_agrees_with_scipys_binomtest(k, n):
    stats = pytest.importorskip("scipy.stats")  # not a dependency: only the dev extras bring it
    assert binomial_two_sided(k, n) == pytest.approx(stats.binomtest(k, n, 0.5).pvalue, rel=1e-12, abs=0)


def test_paired_bootstrap_of_identical_and_shifted_methods():
    rng = np.random.default_rng(1)
    a = {"x": rng.integers(0, 2, (3, 200)).astype(float), "y": rng.integers(0, 2, (3, 100)).astype(float)}
    assert paired_bootstrap(a, a, resamples=200) == (0.0, 0.0, 0.0)
    # b is a with 20 more items right in task x (of 200, in every seed): +0.1 on x, +0.05 on the macro average
    b = {k: v.copy() for k, v in a.items()}
    wrong = np.flatnonzero(a["x"][0] == 0)[:20]
    b["x"][:, wrong] = 1
    diff, low, high = paired_bootstrap(b, a, resamples=2000)
    assert diff == pytest.approx((b["x"].mean() - a["x"].mean()) / 2)
    assert low < diff < high and low > 0  # every resample is a gain: it can only add changed items
    # the interval's half-width is about 1.96 sd of a resampled mean of the per-item differences
    per_item = (b["x"] - a["x"]).mean(0)
    sd = per_item.std() / math.sqrt(len(per_item)) / 2
    assert (high - low) / 2 == pytest.approx(1.96 * sd, rel=0.15)


def test_paired_bootstrap_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="different tasks"):
        paired_bootstrap({"x": np.ones((1, 3))}, {"y": np.ones((1, 3))})


def test_hierarchical_bootstrap_of_identical_methods_has_zero_width():
    rng = np.random.default_rng(2)
    a = {"x": rng.integers(0, 2, (3, 300)).astype(float), "y": rng.integers(0, 2, (3, 50)).astype(float)}
    assert hierarchical_bootstrap(a, a, resamples=300) == (0.0, 0.0, 0.0)
    # one seed: the seed draw is trivial, so the interval is the item-only one (up to resampling noise)
    one = {k: v[:1] for k, v in a.items()}
    shifted = {k: v.copy() for k, v in one.items()}
    shifted["x"][0, np.flatnonzero(one["x"][0] == 0)[:30]] = 1
    _, low, high = hierarchical_bootstrap(shifted, one, resamples=4000)
    _, item_low, item_high = paired_bootstrap(shifted, one, resamples=4000)
    assert high - low == pytest.approx(item_high - item_low, rel=0.1)


def test_hierarchical_interval_is_wider_when_seeds_disagree():
    # the same items in every seed; seed 0 gains 30 items, seed 1 loses 30, seed 2 neither: the mean gain is 0
    # and the item-only interval (per-item means over seeds) is narrow, but the seeds disagree
    rng = np.random.default_rng(3)
    b = {"x": np.tile(rng.integers(0, 2, 300).astype(float), (3, 1))}
    a = {"x": b["x"].copy()}
    a["x"][0, np.flatnonzero(b["x"][0] == 0)[:30]] = 1
    a["x"][1, np.flatnonzero(b["x"][0] == 1)[:30]] = 0
    diff, low, high = hierarchical_bootstrap(a, b, resamples=4000)
    _, item_low, item_high = paired_bootstrap(a, b, resamples=4000)
    assert diff == pytest.approx(0.0)
    assert high - low > 2 * (item_high - item_low)
    assert low <= -0.05 and high >= 0.05  # a resample of seeds {0, 0, 0} gains 10 points, {1, 1, 1} loses 10


def test_hierarchical_interval_matches_a_known_seed_variance():
    # 40 seeds whose difference is u_s on every item (no item-to-item variation): the item-only interval has
    # zero width; the seed bootstrap's half-width is 1.96 sd(u) sqrt((S - 1) / S) / sqrt(S)
    rng = np.random.default_rng(4)
    u = rng.normal(0.0, 0.05, 40)
    b = {"x": np.zeros((40, 200))}
    a = {"x": np.repeat(u[:, None], 200, axis=1)}
    diff, low, high = hierarchical_bootstrap(a, b, resamples=4000)
    assert diff == pytest.approx(u.mean())
    expected = 1.96 * u.std(ddof=0) / math.sqrt(40)
    assert (high - low) / 2 == pytest.approx(expected, rel=0.1)
    _, item_low, item_high = paired_bootstrap(a, b)
    assert item_high - item_low == pytest.approx(0.0, abs=1e-12)


def test_compare_against_one_reference_run_and_the_power_line():
    assert detectable_difference(1.0) == pytest.approx(2.8016, abs=1e-3)
    rng = np.random.default_rng(5)
    base = {"x": rng.integers(0, 2, (1, 400)).astype(float)}  # the base model: one deterministic run
    runs = {"x": np.tile(base["x"], (3, 1))}
    runs["x"][:, np.flatnonzero(base["x"][0] == 0)[:40]] = 1  # every seed gains the same 40 items: +10 points
    result = compare(runs, base, resamples=2000)
    assert result.diff == pytest.approx(0.1)
    assert result.seeds[0] > 0 and result.items[0] > 0 and result.verdict() == "holds"
    assert result.detectable == pytest.approx(2.8016 * result.se, rel=1e-3)
    assert compare(base, runs).verdict() == "is reversed"
    with pytest.raises(ValueError, match=r"task 'x' has shapes \(3, 5\) and \(2, 5\)"):
        compare({"x": np.ones((3, 5))}, {"x": np.ones((2, 5))})


def test_depth_quartiles_match_the_expert_grouping():
    quartile = depth_quartiles(list(range(30)))
    assert [sum(1 for q in quartile.values() if q == g) for g in range(4)] == [8, 8, 7, 7]


def test_task_routing_distances_leave_out_layers_without_a_choice():
    # Top-2 of 4 experts in layer 0: task a uses experts 0-1, task b experts 2-3 (disjoint halves, so each
    # is 0.5 from the mean); layer 1 has 2 experts, both always chosen, and must not dilute that.
    routing = {
        "a": {"layers.0.q": {"load": [1.0, 1.0, 0.0, 0.0]}, "layers.1.q": {"load": [1.0, 1.0]}},
        "b": {"layers.0.q": {"load": [0.0, 0.0, 1.0, 1.0]}, "layers.1.q": {"load": [1.0, 1.0]}},
    }
    assert routing_top_k(routing) == 2
    assert task_routing_distances(routing) == pytest.approx({"a": 0.5, "b": 0.5})
    routing["b"]["layers.0.q"]["load"] = [1.0, 1.0, 0.0, 0.0]
    assert task_routing_distances(routing) == pytest.approx({"a": 0.0, "b": 0.0})
    only_full_layers = {t: {"layers.1.q": layers["layers.1.q"]} for t, layers in routing.items()}
    assert task_routing_distances(only_full_layers) == {}


# ---------------------------------------------------------------------------- protocols
def test_shipped_protocols_parse():
    names = {p.stem: load_protocol(p) for p in sorted((REPO / "configs" / "experiments").glob("*.yaml"))}
    assert {"cpu", "gpu", "paper"} <= set(names)
    assert set(names["paper"].methods) == {"lora", "mola", "mosl", "mosld", "share_b"}
    assert set(names["paper"].settings) == {"mixture", "single"}
    assert len(names["cpu"].runs()) >= 12 and names["cpu"].test["data.max_eval_examples"] >= 300
    assert "boolq" in names["cpu"].test["data.tasks"]


def test_cpu_single_trains_each_task_on_its_share_of_the_mixture(shared_data_dir):
    from mosld.data.sampling import temperature_probabilities
    from mosld.data.tasks import load_task

    single, mixture = (load_protocol(REPO / "configs" / "experiments" / f"{n}.yaml") for n in ("cpu_single", "cpu"))
    data = yaml.safe_load((REPO / "configs" / "mosld.yaml").read_text())["data"]
    tasks = data["tasks"]
    assert single.settings == ["single"] and set(single.single_args) == set(tasks)
    sizes = [len(load_task(t, "train", shared_data_dir)) for t in tasks]
    # the mixture's 200 steps shared out in proportion to p_i, largest remainders first (Hamilton's method)
    quotas = [mixture.args["trainer.max_steps"] * p for p in temperature_probabilities(sizes, data["temperature"])]
    steps = [math.floor(q) for q in quotas]
    for i in sorted(range(len(tasks)), key=lambda i: steps[i] - quotas[i])[: round(sum(quotas)) - sum(steps)]:
        steps[i] += 1
    for task, n in zip(tasks, steps, strict=True):
        assert single.single_args[task] == {
            "trainer.max_steps": n,
            "data.num_samples_per_epoch": n * data["batch_size"],
        }
    assert sum(a["trainer.max_steps"] for a in single.single_args.values()) == mixture.args["trainer.max_steps"]
    assert single.test["data.max_eval_examples"] == mixture.test["data.max_eval_examples"]


def test_protocol_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "config": [str(REPO / "configs" / "mosld.yaml")],
                                    "methods": ["lora", "moe"], "seeds": [0]}))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"bad.yaml: Parser key \"methods\":\s+Expected a typing.Literal\['lora', 'mola'"
    ):
        load_protocol(path)
    with pytest.raises(ValueError, match="--only: expected"):
        parse_only("lr=3")
    fields = {"name": "x", "config": [str(REPO / "configs" / "mosld.yaml")], "methods": ["lora"], "seeds": [0]}
    for bad, message in [
        ({"results": ["a"]}, r"Parser key \"results\":\s+Expected a <class 'str'>"),
        (
            {"seeds": [-1]},
            r"Parser key \"seeds\":\s+Not of type NonNegativeInt: -1 does not conform to restriction v>=0",
        ),
        ({"seeds": []}, "seeds: expected a non-empty list"),
        ({"settings": ["both"]}, r"Parser key \"settings\":\s+Expected a typing.Literal\['mixture', 'single'\]"),
        ({"single_args": {"arc_easy": 3}}, r"Parser key \"single_args\":\s+Expected a <class 'dict'>"),
        (
            {"compare_with": ["no/such.yaml"]},
            r"compare_with: expected a list of protocol files, got \['no/such.yaml'\]",
        ),
        ({"config": "no/such.yaml"}, "config: 'no/such.yaml' is not a file"),
        ({"test": {"data.tasks": []}}, "test: data.tasks: expected a non-empty list of task names"),
        ({"lr": 3}, "Option 'lr' is not accepted"),
        ({"source": "x"}, "Option 'source' is not accepted"),  # set by load_protocol, not a field of the file
    ]:
        path.write_text(yaml.safe_dump(fields | bad))
        with pytest.raises(ValueError, match="protocol .*bad.yaml: " + message):
            load_protocol(path)
    path.write_text(yaml.safe_dump({k: v for k, v in fields.items() if k != "seeds"}))
    with pytest.raises(ValueError, match="bad.yaml: the following arguments are required: seeds"):
        load_protocol(path)


def test_a_protocol_names_its_results_folder(tmp_path):
    path = tmp_path / "p.yaml"
    fields = {"name": "x", "config": [str(REPO / "configs" / "mosld.yaml")], "methods": ["lora"], "seeds": [0]}
    path.write_text(yaml.safe_dump(fields))
    assert load_protocol(path).results_dir == Path("experiments/results/x")
    path.write_text(yaml.safe_dump(fields | {"results": "experiments/results/x-v2"}))
    assert load_protocol(path).results_dir == Path("experiments/results/x-v2")


# ---------------------------------------------------------------------------- the sweep, end to end
def write_tiny_protocol(tmp_path: Path, model_dir: str, args: dict, **fields) -> Path:
    """A protocol file for a few-second sweep of the tiny model on the example task (``args`` add to or replace
    the common options; ``fields``: methods, seeds, test, ...)."""
    common = {
        "model.model_name_or_path": model_dir,
        "data.tasks": [EXAMPLE_TASK],
        "data.batch_size": 4,
        "data.cache_dir": str(tmp_path / "cache"),
        "trainer.precision": "32-true",
        "trainer.limit_val_batches": 0,
        "trainer.num_sanity_val_steps": 0,
    }
    protocol = {"name": "tiny", "config": [str(REPO / "configs" / "mosld.yaml")], "args": common | args,
                "commit_adapters": [0], **fields}  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(protocol))
    return path


@pytest.mark.slow
def test_two_method_sweep_records_and_aggregates(tiny_model_dir, tmp_path, capsys):
    path = write_tiny_protocol(
        tmp_path,
        tiny_model_dir,
        {"data.num_samples_per_epoch": 16, "data.max_eval_examples": 4, "trainer.max_steps": 4},
        methods=["lora", "mosld"],
        seeds=[0],
        test={"data.max_eval_examples": 10},
    )
    results, work = tmp_path / "results", tmp_path / "work"
    args = ["--results-dir", str(results)]
    assert experiments_main(["sweep", str(path), *args, "--work-dir", str(work)]) == 0
    for run in ("lora-mixture-seed0", "mosld-mixture-seed0", "zero_shot"):
        metrics = json.loads((results / run / "metrics.json").read_text())
        assert metrics["tasks"]["example_task"]["items"] == 10
        rows = [json.loads(line) for line in (results / run / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 10 and {r["task"] for r in rows} == {"example_task"}
        assert set(rows[0]) >= {"task", "item", "pred", "gold", "correct"}
        assert sum(r["correct"] for r in rows) == round(10 * metrics["tasks"]["example_task"]["acc"])
    lora = json.loads((results / "lora-mixture-seed0" / "metrics.json").read_text())
    mosld = json.loads((results / "mosld-mixture-seed0" / "metrics.json").read_text())
    assert lora["steps"] == mosld["steps"] == 4 and lora["tokens_seen"] == mosld["tokens_seen"] > 0  # same batches
    assert lora["precision"] == mosld["precision"] in {"32-true", "bf16-mixed"}  # what auto chose, kept per run
    assert 0 < mosld["trainable_parameters"] and lora["trainable_parameters"] < mosld["trainable_parameters"]
    assert (results / "mosld-mixture-seed0" / "adapter" / "adapter_config.json").is_file()
    routing = json.loads((results / "mosld-mixture-seed0" / "routing.json").read_text())
    loads = routing["example_task"]
    assert len(loads) == 8 and all(
        sum(s["load"]) == pytest.approx(2.0) for s in loads.values()
    )  # 4 layers x q, v; top-2
    # the labelled per-task heat-map went to TensorBoard beside the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / "mosld-mixture-seed0" / "test")).Reload()
    assert "test_router/load_by_task" in events.Tags()["images"]
    # the same items in the same runs: item ids agree
    ids = [{json.loads(x)["item"] for x in (results / r / "predictions.jsonl").read_text().splitlines()}
           for r in ("lora-mixture-seed0", "mosld-mixture-seed0", "zero_shot")]  # fmt: skip
    assert ids[0] == ids[1] == ids[2]
    # a run folder rebuilt from the record: the fit's configuration and the kept adapter, for tools taking --run
    restored = tmp_path / "restored"
    assert experiments_main(["restore", str(path), "mosld-mixture-seed0", *args, "--out", str(restored)]) == 0
    fit_config = yaml.safe_load((work / "mosld-mixture-seed0" / "fit" / "config.yaml").read_text())
    config = yaml.safe_load((restored / "config.yaml").read_text())
    assert config["model"] == fit_config["model"] and config["data"] == fit_config["data"]
    assert config["seed_everything"] == 0 and config["trainer"]["max_steps"] == 4
    kept = results / "mosld-mixture-seed0" / "adapter"
    assert all((restored / "adapter" / f.name).read_bytes() == f.read_bytes() for f in kept.iterdir())
    assert experiments_main(["restore", str(path), "mosld-mixture-seed0", *args, "--out", str(restored)]) == 2
    assert experiments_main(["restore", str(path), "mosld-mixture-seed7", *args, "--out", str(tmp_path / "x")]) == 2
    assert "not a run of" in capsys.readouterr().err
    # a second sweep finds everything recorded and runs nothing
    capsys.readouterr()
    assert experiments_main(["sweep", str(path), *args, "--work-dir", str(work)]) == 0
    assert capsys.readouterr().out.count("recorded, skipped") == 2
    # the results page, twice: the same bytes
    out = tmp_path / "docs" / "results.md"
    assert experiments_main(["aggregate", str(path), *args, "--out", str(out)]) == 0
    first = out.read_text()
    assert experiments_main(["aggregate", str(path), *args, "--out", str(out)]) == 0
    assert out.read_text() == first
    assert "| MoSLD − LoRA | mixture | 1 |" in first and "McNemar" in first
    for figure in ("accuracy.png", "train_loss.png", "routing.png"):
        assert (tmp_path / "docs" / "results_tiny" / figure).stat().st_size > 1000


@pytest.mark.slow
def test_a_sweep_of_a_generation_and_multiple_choice_mixture_records_scores_and_aggregates(tiny_model_dir, tmp_path):
    instructions = str(REPO / "data" / "example_instructions")
    path = write_tiny_protocol(
        tmp_path,
        tiny_model_dir,
        {"data.tasks": [EXAMPLE_TASK, instructions], "data.num_samples_per_epoch": 8, "trainer.max_steps": 2,
         "data.max_length": 256, "data.generation": {"example_instructions": {"max_new_tokens": 4, "metric": "token_f1"}}},
        methods=["lora", "mosld"],
        seeds=[0],
        test={"data.max_eval_examples": 5},
    )  # fmt: skip
    results = tmp_path / "results"
    args = ["--results-dir", str(results)]
    assert experiments_main(["sweep", str(path), *args, "--work-dir", str(tmp_path / "work")]) == 0
    for run in ("lora-mixture-seed0", "mosld-mixture-seed0", "zero_shot"):
        metrics = json.loads((results / run / "metrics.json").read_text())
        task = metrics["tasks"]["example_instructions"]
        assert task["items"] == 5 and 0 <= task["token_f1"] <= 1 and "acc" not in task
        rows = [json.loads(x) for x in (results / run / "predictions.jsonl").read_text().splitlines()]
        generated = [r for r in rows if r["task"] == "example_instructions"]
        assert len(generated) == 5 and all(isinstance(r["generated"], str) and r["references"] for r in generated)
        assert task["token_f1"] == pytest.approx(sum(r["score"] for r in generated) / 5)
    out = tmp_path / "docs" / "results.md"
    assert experiments_main(["aggregate", str(path), *args, "--out", str(out)]) == 0
    page = out.read_text()
    assert experiments_main(["aggregate", str(path), *args, "--out", str(out)]) == 0
    assert out.read_text() == page and "token_f1" in page and "| MoSLD − LoRA | mixture | 1 |" in page


def _strip_task(record, task: str) -> None:
    """Make ``record`` look as if its run had never been tested on ``task`` (an older protocol's record)."""
    metrics = json.loads((record / "metrics.json").read_text())
    del metrics["tasks"][task]
    metrics["out_of_domain"].remove(task)
    (record / "metrics.json").write_text(json.dumps(metrics))
    lines = (record / "predictions.jsonl").read_text().splitlines()
    (record / "predictions.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["task"] != task))


@pytest.mark.slow
def test_a_record_lacking_a_test_task_is_topped_up_from_its_adapter(tiny_model_dir, tmp_path, capsys):
    # an out-of-domain task: a user task that is only tested, never trained on
    quiz = copy_of_example_task(tmp_path / "quiz")
    path = write_tiny_protocol(
        tmp_path,
        tiny_model_dir,
        {"data.num_samples_per_epoch": 8, "trainer.max_steps": 2},
        methods=["mosld"],
        seeds=[0, 1],
        test={"data.tasks": [EXAMPLE_TASK, str(quiz)], "data.eval_examples_by_task": {"quiz": 8}},
    )
    results, work = tmp_path / "results", tmp_path / "work"
    args = ["--results-dir", str(results), "--work-dir", str(work)]
    assert experiments_main(["sweep", str(path), *args]) == 0
    full = {r: (results / r / "predictions.jsonl").read_text() for r in ("mosld-mixture-seed0", "zero_shot")}
    assert json.loads((results / "mosld-mixture-seed0" / "metrics.json").read_text())["tasks"]["quiz"]["items"] == 8
    for run in ("mosld-mixture-seed0", "mosld-mixture-seed1", "zero_shot"):
        _strip_task(results / run, "quiz")
    # seed 0 keeps only its adapter (no checkpoint), seed 1 has neither: it cannot be topped up
    (work / "mosld-mixture-seed0" / "fit").rename(tmp_path / "old-fit")
    (work / "mosld-mixture-seed1").rename(tmp_path / "old-seed1")
    capsys.readouterr()
    assert experiments_main(["sweep", str(path), *args]) == 0
    log = capsys.readouterr().out
    assert "mosld-mixture-seed0: recorded; topping up quiz" in log and "zero_shot: recorded; topping up quiz" in log
    assert "mosld-mixture-seed1: cannot top up quiz: no adapter kept" in log
    assert not (work / "mosld-mixture-seed0" / "fit").exists()  # no retraining
    for run, before in full.items():
        # the same predictions as the run's own test pass gave, in the merged record
        rows = sorted((results / run / "predictions.jsonl").read_text().splitlines())
        assert rows == sorted(before.splitlines())
        metrics = json.loads((results / run / "metrics.json").read_text())
        assert set(metrics["tasks"]) == {"example_task", "quiz"} and metrics["out_of_domain"] == ["quiz"]
        assert metrics["topped_up"][0]["tasks"] == ["quiz"]
        assert metrics["topped_up"][0]["from"] == ("kept adapter" if run != "zero_shot" else "base model")
    assert "quiz" not in json.loads((results / "mosld-mixture-seed1" / "metrics.json").read_text())["tasks"]
    routing = json.loads((results / "mosld-mixture-seed0" / "routing.json").read_text())
    assert set(routing) == {"example_task", "quiz"}


@pytest.mark.slow
def test_local_launcher_runs_jobs_side_by_side_reports_a_failing_one_and_resumes(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("submitit")
    quiz = copy_of_example_task(tmp_path / "quiz")
    # two experts suit MoSLD but LoRA refuses them: one job fails, the others must finish
    path = write_tiny_protocol(
        tmp_path,
        tiny_model_dir,
        {
            "data.num_samples_per_epoch": 8,
            "trainer.max_steps": 2,
            "model.adapter.num_experts": 2,
            "data.tasks": [EXAMPLE_TASK, str(quiz)],
        },  # fmt: skip
        methods=["lora", "mosld"],
        settings=["single"],
        seeds=[0],
        test={"data.max_eval_examples": 6},
        single_args={"quiz": {"trainer.max_steps": 1}},
    )
    results, work = tmp_path / "results", tmp_path / "work"
    args = ["--results-dir", str(results), "--work-dir", str(work), "--launcher", "local", "--jobs", "2"]
    assert experiments_main(["sweep", str(path), *args]) == 1
    out, err = capsys.readouterr()
    assert "3 job(s) to run, 0 run(s) already recorded; local launcher, 2 at a time" in out
    assert "1 job(s) failed" in err and "lora-single-seed0: fit failed" in err
    log = Path(err.split("log: ")[1].split()[0])
    assert log.is_file() and "num_experts: method 'lora' has exactly one expert" in log.read_text()
    mosld = json.loads((results / "mosld-single-seed0" / "metrics.json").read_text())
    assert set(mosld["tasks"]) == {"example_task", "quiz"} and mosld["setting"] == "single"
    assert mosld["steps"] == 2 + 1  # single_args: the quiz model trains one step
    assert all(mosld["tasks"][t]["items"] == 6 for t in ("example_task", "quiz"))
    assert (work / "mosld-single-seed0" / "quiz" / "fit" / "train_record.json").is_file()  # a task path's own folder
    assert not (quiz / "fit").exists()
    assert (results / "zero_shot" / "metrics.json").is_file() and not (results / "lora-single-seed0").exists()
    # resumable: what is recorded is not run again
    assert experiments_main(["sweep", str(path), *args]) == 1
    assert "1 job(s) to run, 1 run(s) already recorded" in capsys.readouterr().out


def test_single_args_must_name_training_tasks(tiny_model_dir, tmp_path):
    from mosld.experiments import Sweep
    from mosld.experiments.sweep import SweepError

    path = write_tiny_protocol(tmp_path, tiny_model_dir, {}, methods=["lora"], seeds=[0], settings=["single"],
                               single_args={"arc_easy": {"trainer.max_steps": 3}})  # fmt: skip
    with pytest.raises(SweepError, match=r"single_args: \['arc_easy'\] are not training tasks"):
        Sweep(load_protocol(path))


def _write_record(root, run: str, method: str, seed: int, correct: dict[str, list[int]], preds: dict,
                  setting: str = "mixture", in_domain: tuple[str, ...] = ("arc",)) -> None:  # fmt: skip
    """A finished run's record as the sweep writes it, from per-task 0/1 results and predicted answers."""
    folder = root / run
    folder.mkdir(parents=True)
    rows, tasks = [], {}
    for task, values in correct.items():
        for k, (c, pred) in enumerate(zip(values, preds[task], strict=True)):
            gold = pred if c else 1 - pred if task == "boolq" else (pred + 1) % 4
            rows.append({"task": task, "item": f"{task}{k:03d}", "pred": pred, "gold": gold, "correct": bool(c)})
        acc = float(np.mean(values))
        tasks[task] = {"acc": acc, "acc_sum": acc, "acc_token_norm": acc, "items": len(values)}
    metrics = {"protocol": "synthetic", "run": run, "method": method, "setting": setting if seed >= 0 else "none",
               "seed": max(seed, 0), "tasks": tasks, "in_domain": list(in_domain),
               "out_of_domain": [t for t in tasks if t not in in_domain]}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_results_page_ood_section_from_records_some_lacking_mmlu(tmp_path):
    # BoolQ (gold: 60 yes, 40 no): the base says yes to everything (60% right, balanced 50%); LoRA and MoSLD
    # say no to everything in every seed (40% right, balanced 50%), except that MoSLD gets 10 more "yes"
    # items right: it loses less. MMLU only in the base and seed 0 of both methods.
    rng = np.random.default_rng(0)
    gold_yes = np.array([1] * 60 + [0] * 40)
    arc = {m: rng.integers(0, 2, (2, 50)) for m in ("lora", "mosld")}
    results = tmp_path / "results"
    base_mmlu = rng.integers(0, 2, 40).tolist()
    _write_record(results, "zero_shot", "base", -1, {"arc": [0] * 50, "boolq": gold_yes.tolist(),
                  "mmlu": base_mmlu}, {"arc": [0] * 50, "boolq": [1] * 100, "mmlu": [0] * 40})  # fmt: skip
    for method in ("lora", "mosld"):
        for seed in (0, 1):
            boolq = (1 - gold_yes).tolist()
            if method == "mosld":
                boolq[:10] = [1] * 10  # right on 10 yes items, by answering yes
            correct = {"arc": arc[method][seed].tolist(), "boolq": boolq}
            preds = {"arc": [0] * 50, "boolq": [0] * 100}
            for k in range(10 if method == "mosld" else 0):
                preds["boolq"][k] = 1
            if seed == 0:
                correct["mmlu"], preds["mmlu"] = base_mmlu, [k % 4 for k in range(40)]
            _write_record(results, f"{method}-mixture-seed{seed}", method, seed, correct, preds)
    out = tmp_path / "results.md"
    page = aggregate(results, out, resamples=500, test_tasks=["arc", "boolq", "mmlu"])
    assert aggregate(results, out, resamples=500, test_tasks=["arc", "boolq", "mmlu"]) == page  # same bytes
    boolq = page[page.index("### boolq") : page.index("### mmlu")]
    assert "gold labels: 60.0% yes" in boolq
    assert "| base (zero-shot) | 1 | 60.0 | 50.0 | 100.0% yes |" in boolq
    assert "| LoRA | 2 | 40.0 ± 0.0 | 50.0 ± 0.0 | 0.0% yes |" in boolq
    # MoSLD - LoRA: +10 points in both seeds (the seeds agree), the interval over the drawn items stays above 0
    row = next(line for line in boolq.splitlines() if line.startswith("| MoSLD − LoRA |"))
    assert row.split(" | ")[1] == "+10.00" and row.split(" | ")[2].startswith("[+")
    assert "| LoRA − base (zero-shot) | -20.00 |" in boolq
    mmlu = page[page.index("### mmlu") : page.index("### What the paper claims out of domain")]
    assert "Tested in 3 of 5 records; lacking it (left out below): lora-mixture-seed1, mosld-mixture-seed1." in mmlu
    assert "A 25.0 / B 25.0 / C 25.0 / D 25.0 |" in mmlu  # the letters MoSLD predicted
    claims = page[page.index("### What the paper claims out of domain") :]
    assert "- boolq: *MoSLD forgets less than LoRA* **holds**" in claims
    assert "- mmlu: *MoSLD forgets less than LoRA* **is within noise**" in claims  # identical results on MMLU
    assert "| avg | boolq | mmlu |" in page  # the table's columns
    assert "| LoRA | mixture | 2 | 0 |" in page and "(1 of 2) |" in page  # the mmlu cell: how many seeds have it


def test_results_page_sets_the_single_setting_against_the_mixture_of_another_protocol(tmp_path):
    # Two paper tasks, 40 items each, 2 seeds. LoRA: the same results in both settings. MoSLD: the mixture gets
    # 8 more openbookqa items right than the single adapter in both seeds (+20 points there, +10 on average);
    # in the single setting the two methods have the same results.
    rng = np.random.default_rng(1)
    tasks = ("openbookqa", "arc_easy")
    single_dir, mixture_dir = tmp_path / "single", tmp_path / "mixture"
    base = {t: [0] * 40 for t in tasks}
    _write_record(single_dir, "zero_shot", "base", -1, base, base, in_domain=tasks)
    drawn = {seed: {t: rng.integers(0, 2, 40).tolist() for t in tasks} for seed in (0, 1)}  # both methods' single
    for method in ("lora", "mosld"):
        for seed in (0, 1):
            single = {t: list(v) for t, v in drawn[seed].items()}
            single["openbookqa"][:8] = [0] * 8
            mixture = {t: list(v) for t, v in single.items()}
            if method == "mosld":
                mixture["openbookqa"][:8] = [1] * 8
            zeros = {t: [0] * 40 for t in tasks}
            _write_record(single_dir, f"{method}-single-seed{seed}", method, seed, single, zeros, "single", tasks)
            _write_record(mixture_dir, f"{method}-mixture-seed{seed}", method, seed, mixture, zeros, "mixture", tasks)
    for run, field in [("lora-single-seed0", {"precision": "32-true"}), ("mosld-single-seed0", {"precision": "32-true"}),
                       ("lora-single-seed1", {"precision": "bf16-mixed"}), ("mosld-single-seed1", {})]:  # fmt: skip
        record = json.loads((single_dir / run / "metrics.json").read_text())
        (single_dir / run / "metrics.json").write_text(
            json.dumps(record | field | {"machine": {"cpu_native_bf16": True}})
        )
    out = tmp_path / "results.md"
    page = aggregate(single_dir, out, resamples=500, test_tasks=list(tasks), compare_with=[mixture_dir])
    assert ("runs of one protocol can differ): 32-true: lora-single-seed0, mosld-single-seed0; bf16-mixed: "
            "lora-single-seed1; not recorded: lora-mixture-seed0, lora-mixture-seed1, mosld-mixture-seed0, "
            "mosld-mixture-seed1; not recorded (a CPU with native bf16): mosld-single-seed1.") in page  # fmt: skip
    assert aggregate(single_dir, out, resamples=500, test_tasks=list(tasks), compare_with=[mixture_dir]) == page
    section = page[page.index("## Single task against the mixture") :]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")[4:]
            for line in section.splitlines() if line.startswith("| ")}  # fmt: skip
    assert rows[("LoRA: mixture − single", "average")][0].strip() == "+0.00"
    assert rows[("MoSLD: mixture − single", "openbookqa")][0].strip() == "+20.00"
    assert rows[("MoSLD: mixture − single", "arc_easy")][0].strip() == "+0.00"
    # the paper's Table 1: MoSLD mixture − single on openbookqa 78.80 − 78.40, far below this interval
    assert [c.strip() for c in rows[("MoSLD: mixture − single", "openbookqa")][3:5]] == ["+0.40", "below"]
    assert rows[("MoSLD − LoRA (single)", "openbookqa")][0].strip() == "+0.00"  # the same single results...
    assert rows[("MoSLD − LoRA (mixture)", "openbookqa")][0].strip() == "+20.00"  # ...but not the same mixture
    claims = page[page.index("## What the paper claims") :]
    assert "*MoSLD gains from training on the mixture* **holds**" in claims
    assert "*LoRA gains from training on the mixture* **is within noise**" in claims
    assert "*MoSLD gains more from the mixture than LoRA* **holds**" in claims
    assert "Holm over the page's" in claims


def test_hierarchical_standard_error_errs_on_the_wide_side_in_a_crossed_simulation():
    # 3 seeds x 300 items of 0/1 results, as the cpu protocol: items of varied difficulty shared by both
    # methods, method a shifted by a seed effect of s.d. 3 points. Over fresh draws of items and seeds, the
    # s.d. of the mean difference is the true standard error; the hierarchical one is above it (it counts
    # the seed x item noise about three times), the item-only one below it (it ignores the seed effect).
    rng = np.random.default_rng(0)
    truth, hierarchical, item_only = [], [], []
    for rep in range(200):
        p = rng.uniform(0.1, 0.9, 300)
        a = (rng.random((3, 300)) < np.clip(p + rng.normal(0, 0.03, (3, 1)), 0, 1)).astype(float)
        b = (rng.random((3, 300)) < p).astype(float)
        truth.append(a.mean() - b.mean())
        if rep < 40:
            hierarchical.append(compare({"x": a}, {"x": b}, resamples=500, seed=rep).se)
            item_only.append((a - b).mean(0).std() / math.sqrt(300))
    true_se = np.std(truth)
    assert true_se < np.mean(hierarchical) < 1.6 * true_se
    assert np.mean(item_only) < true_se


# ---------------------------------------------------------------------------- generation tasks
def test_headline_metric_and_record_average():
    from mosld.experiments.metrics import headline, headline_metric, item_score, record_average

    assert headline_metric({"acc": 0.5, "acc_sum": 0.4, "items": 3}) == "acc"
    assert headline_metric({"token_f1": 0.2, "exact_match": 0.1, "items": 3}) == "exact_match"  # the listed order
    assert headline_metric({"rouge_l": 0.3, "rouge_l_ci95": 0.1, "items": 3}) == "rouge_l"
    assert headline({"final_number": 0.25, "items": 4}) == 0.25
    with pytest.raises(ValueError, match="no headline metric"):
        headline_metric({"items": 3, "answer_loss": 1.0})
    assert item_score({"correct": True}) == 1.0 and item_score({"correct": 0.5, "score": 0.5}) == 0.5
    mc = {
        "a": {"acc": 0.5, "acc_sum": 0.25, "acc_token_norm": 0.0},
        "b": {"acc": 1.0, "acc_sum": 0.75, "acc_token_norm": 1.0},
    }
    assert record_average(mc, ["a", "b"]) == {"acc": 0.75, "acc_sum": 0.5, "acc_token_norm": 0.5}  # as before
    assert record_average(mc | {"g": {"token_f1": 0.0}}, ["a", "b", "g"]) == {"score": 0.5}


def _write_generation_record(root: Path, run: str, method: str, seed: int, scores: dict[str, list[float]],
                             metrics: dict[str, str], in_domain: list[str]) -> None:  # fmt: skip
    """A finished record as the sweep writes it, from per-item scores; a task in ``metrics`` is a generation
    task (rows with generated text, references and score), any other one multiple choice."""
    folder = root / run
    folder.mkdir(parents=True)
    rows, tasks = [], {}
    for task, values in scores.items():
        mean = float(np.mean(values))
        for k, v in enumerate(values):
            item = f"{task}{k:03d}"
            if task in metrics:
                rows.append(
                    {"task": task, "item": item, "generated": "x", "references": ["y"], "score": v, "correct": v}
                )
            else:
                rows.append({"task": task, "item": item, "pred": 0, "gold": 0 if v else 1, "correct": bool(v)})
        tasks[task] = ({metrics[task]: mean, f"{metrics[task]}_ci95": 0.1} if task in metrics
                       else {"acc": mean, "acc_sum": mean, "acc_token_norm": mean}) | {"items": len(values)}  # fmt: skip
    record = {"protocol": "gen", "run": run, "method": method, "setting": "mixture" if seed >= 0 else "none",
              "seed": max(seed, 0), "tasks": tasks, "in_domain": in_domain,
              "out_of_domain": [t for t in tasks if t not in in_domain]}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(record))
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _generation_records(tmp_path: Path, summary: bool) -> Path:
    """Base, LoRA and MoSLD (2 seeds) on an MC task, an exact-match task (0/1) and, if ``summary``, a ROUGE-L
    task (fractions); an out-of-domain final-number task in every record. MoSLD gets 8 more qa items right."""
    rng = np.random.default_rng(0)
    metrics = {"qa": "exact_match", "gsm": "final_number"} | ({"summ": "rouge_l"} if summary else {})
    in_domain = ["arc", "qa", *(["summ"] if summary else [])]
    results = tmp_path / "results"
    qa = rng.integers(0, 2, 40)
    for run, method, seed, shift in [("zero_shot", "base", -1, 0), *[(f"{m}-mixture-seed{s}", m, s, 8 * (m == "mosld"))
                                     for m in ("lora", "mosld") for s in (0, 1)]]:  # fmt: skip
        scores = {"arc": rng.integers(0, 2, 30).tolist(), "qa": np.r_[np.ones(shift), qa[shift:]].tolist(),
                  "gsm": rng.integers(0, 2, 20).tolist()}  # fmt: skip
        if summary:
            scores["summ"] = rng.uniform(0, 1, 25).round(3).tolist()
        _write_generation_record(results, run, method, seed, scores, metrics, in_domain)
    return results


def test_results_page_of_generation_tasks(tmp_path):
    results = _generation_records(tmp_path, summary=True)
    out = tmp_path / "results.md"
    page = aggregate(results, out, resamples=300, test_tasks=["arc", "qa", "summ", "gsm"])
    assert aggregate(results, out, resamples=300, test_tasks=["arc", "qa", "summ", "gsm"]) == page  # same bytes
    assert "their cells being the task's metric in % (qa: exact_match, gsm: final_number, summ: rouge_l)" in page
    assert "| method | setting | seeds | trainable params | arc | qa | summ | avg | gsm |" in page
    base = json.loads((results / "zero_shot" / "metrics.json").read_text())["tasks"]
    cells = [f"{100 * base[t][m]:.1f}" for t, m in (("arc", "acc"), ("qa", "exact_match"), ("summ", "rouge_l"))]
    average = f"{100 * np.mean([base['arc']['acc'], base['qa']['exact_match'], base['summ']['rouge_l']]):.1f}"
    assert f"| base (zero-shot) | none | 1 | 0 | {' | '.join(cells)} | **{average}** |" in page
    # fractional ROUGE-L scores in the in-domain average: the bootstrap p-value takes them as they are
    row = next(line for line in page.splitlines() if line.startswith("| MoSLD − LoRA | mixture |"))
    p = float(row.rstrip(" |").rsplit("| ", 1)[1])
    assert 0 < p <= 1 and f"bootstrap p = {p:.2g}" in page
    assert "McNemar" not in page.split("## Paired comparisons")[1].split("## Figures")[0].replace("McNemar's test", "")
    assert "over the multiple-choice tasks only" in page  # the other scorings: arc only
    # the out-of-domain generation task: its score and comparisons, no label prior
    gsm = page[page.index("### gsm") : page.index("### What the paper claims out of domain")]
    assert "scored on the generated text" in gsm and "| LoRA − base (zero-shot) |" in gsm
    assert "- gsm: *MoSLD forgets less than LoRA* **" in page


def test_results_page_p_values_agree_with_the_seed_aware_intervals(tmp_path):
    results = _generation_records(tmp_path, summary=False)
    page = aggregate(results, tmp_path / "results.md", resamples=2000, test_tasks=["arc", "qa", "gsm"])
    # the comparison tables' rows: "| label | ... | [low, high] | [items] | detectable | p |"
    rows = re.findall(r"^\| \S+ − .*?\| \[([-+.\d]+), ([-+.\d]+)\][^|]*\|.*\| ([<\d. ]+) \|$", page, re.M)
    assert len(rows) >= 3
    for low, high, p in rows:
        excludes_zero = float(low) > 0 or float(high) < 0
        assert (p.startswith("<") or float(p) < 0.05) == excludes_zero or abs(float(p) - 0.05) < 0.01


def test_specialisation_verdict_against_the_untrained_router():
    assert specialisation_verdict([0.04, 0.05], 0.06).startswith(
        "below the untrained router's 0.060 in every seed, by 0.010-0.020"
    )
    assert specialisation_verdict([0.07, 0.08], 0.06).startswith(
        "above the untrained router's 0.060 in every seed, by 0.010-0.020"
    )
    assert specialisation_verdict([0.05, 0.07], 0.06).endswith("no consistent specialisation")


def _routing(tasks: list[str], disjoint: bool) -> dict:
    """Top-2 of 4 experts in one layer: every task on experts 0-1, or (disjoint) alternate tasks on 2-3."""
    return {t: {"model.layers.0.q_proj": {"load": [0.0, 0.0, 1.0, 1.0] if disjoint and k % 2 else [1.0, 1.0, 0.0, 0.0],
                                          "tokens": 10}} for k, t in enumerate(tasks)}  # fmt: skip


def test_results_page_of_many_generation_tasks_splits_the_table_and_judges_routing(tmp_path):
    # 12 exact-match tasks and one set-match task; the untrained router (zero-shot record) splits the tasks
    # between disjoint experts, the trained MoSLD runs route every task alike: routing less task-specific.
    rng = np.random.default_rng(1)
    tasks = [f"qa{k}" for k in range(1, 14)]
    metrics = {t: "set_match" if t == "qa8" else "exact_match" for t in tasks}
    results = tmp_path / "results"
    for run, method, seed in [("zero_shot", "base", -1), ("lora-mixture-seed0", "lora", 0),
                              ("mosld-mixture-seed0", "mosld", 0), ("mosld-mixture-seed1", "mosld", 1)]:  # fmt: skip
        scores = {t: rng.integers(0, 2, 10).tolist() for t in tasks}
        _write_generation_record(results, run, method, seed, scores, metrics, tasks)
        if method != "lora":
            routing = _routing(tasks, disjoint=method == "base")
            (results / run / "routing.json").write_text(json.dumps(routing))
    page = aggregate(results, tmp_path / "results.md", resamples=200, test_tasks=tasks)
    assert "Scores in %: each task's metric on the greedy continuation;" in page and "headline scoring" not in page
    assert "(set_match: qa8; exact_match: the other 12)" in page and "instead" not in page
    assert "| method | setting | seeds | trainable params | avg |" in page  # no task columns
    assert "| task | base (zero-shot) | LoRA (mixture) | MoSLD (mixture) |" in page
    mosld_qa1 = [json.loads((results / f"mosld-mixture-seed{k}" / "metrics.json").read_text())["tasks"]["qa1"]
                 for k in (0, 1)]  # fmt: skip
    qa1_row = next(line for line in page.splitlines() if line.startswith("| qa1 | "))
    assert qa1_row.split(" | ")[-1].startswith(
        f"{50 * (mosld_qa1[0]['exact_match'] + mosld_qa1[1]['exact_match']):.1f} ± "
    )
    assert "out-of-domain claims" not in page  # no out-of-domain task
    # 7 tasks on experts 0-1 and 6 on 2-3: distances 12/26 and 14/26 from the mean load, 0.497 on average
    assert "| untrained router (`zero_shot` record) | 0.497 | 0.462 (qa1) | 0.538 (qa2) |" in page
    assert "| `mosld-mixture-seed1` | 0.000 | 0.000 (qa1) | 0.000 (qa1) |" in page
    assert (
        "below the untrained router's 0.497 in every seed, by 0.497-0.497" in page and "decoded, which differ" in page
    )


def test_the_routing_reference_leaves_out_tasks_a_top_up_added_to_the_base(tmp_path):
    # The base's first pass routed qa1-qa4 alike; a later top-up of qa5 ran with another router initialisation
    # (disjoint experts). The reference and the trained runs are measured on qa1-qa4 only.
    tasks = [f"qa{k}" for k in range(1, 6)]
    metrics = dict.fromkeys(tasks, "exact_match")
    results = tmp_path / "results"
    for run, method, seed in [("zero_shot", "base", -1), ("mosld-mixture-seed0", "mosld", 0)]:
        _write_generation_record(results, run, method, seed, {t: [1, 0] for t in tasks}, metrics, tasks)
        routing = _routing(tasks, disjoint=False)
        if method == "base":
            routing["qa5"]["model.layers.0.q_proj"]["load"] = [0.0, 0.0, 1.0, 1.0]
            record = json.loads((results / run / "metrics.json").read_text())
            record["topped_up"] = [{"tasks": ["qa5"], "from": "base model"}]
            (results / run / "metrics.json").write_text(json.dumps(record))
        (results / run / "routing.json").write_text(json.dumps(routing))
    page = aggregate(results, tmp_path / "results.md", resamples=100, test_tasks=tasks)
    assert "leaving out qa5 (topped up in another pass of the base)" in page
    assert "| untrained router (`zero_shot` record) | 0.000 | 0.000 (qa1) | 0.000 (qa1) |" in page  # not 0.32
    assert "| `mosld-mixture-seed0` | 0.000 |" in page


# ---------------------------------------------------------------------------- verdicts that survive a re-roll
def test_balanced_accuracy_is_resampled_as_a_ratio():
    # a constant "yes" answer against a perfect model on 70 yes / 30 no items: balanced accuracy 0.5 against 1.0
    # in every resample, whatever its label counts, so the interval has zero width at exactly -0.5 (weights fixed
    # from the whole sample, as before, gave every resample with other label counts another value)
    gold = np.array([1] * 70 + [0] * 30)
    constant = {"b": (gold == 1).astype(float)[None, :]}  # right on the yes items only
    perfect = {"b": np.ones((1, 100))}
    c = compare(constant, perfect, resamples=2000, gold={"b": gold})
    assert c.diff == pytest.approx(-0.5) and c.seeds == (pytest.approx(-0.5), pytest.approx(-0.5))
    assert compare(constant, perfect, resamples=2000).diff == pytest.approx(-0.3)  # plain accuracy: 0.7 vs 1.0
    # one class only: balanced accuracy is accuracy, and the same draws give the same interval
    rng = np.random.default_rng(7)
    a, b = ({"x": rng.integers(0, 2, (3, 80)).astype(float)} for _ in range(2))
    plain = compare(a, b, resamples=500, escalate_to=500)
    balanced = compare(a, b, resamples=500, gold={"x": np.zeros(80, dtype=int)}, escalate_to=500)
    assert balanced.diff == pytest.approx(plain.diff) and balanced.seeds == pytest.approx(plain.seeds)


def test_balanced_point_estimate_is_the_mean_recall_difference():
    gold = np.array([0, 0, 0, 1, 1, 2])
    a = {"t": np.array([[1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 1, 1]], dtype=float)}
    b = {"t": np.zeros((2, 6))}
    # recalls of a: seed 0 (1/3, 1, 0), seed 1 (2/3, 1/2, 1): means over seeds (1/2, 3/4, 1/2) -> 7/12
    assert compare(a, b, resamples=200, gold={"t": gold}).diff == pytest.approx(7 / 12)


def test_holm_adjustment_matches_a_worked_example():
    from mosld.experiments.stats import holm

    # sorted 0.01, 0.03, 0.04: x3, x2, x1 -> 0.03, 0.06, then max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5] and holm([0.4, 0.9]) == pytest.approx([0.8, 0.9])


def test_monte_carlo_band_of_a_quantile_covers_the_true_one():
    from mosld.experiments.stats import quantile_band

    rng = np.random.default_rng(8)
    true = -1.959964  # the 2.5% quantile of N(0, 1)
    covered = sum(
        low <= true <= high
        for low, high in (quantile_band(np.sort(rng.standard_normal(10_000)), 0.025) for _ in range(300))
    )
    assert covered >= 0.97 * 300  # a 99% band


def test_bootstrap_p_value_and_its_band():
    from mosld.experiments.stats import bootstrap_p

    p, band = bootstrap_p(np.linspace(-1, 1, 10_001))
    assert p == pytest.approx(1.0, abs=1e-3) and band[1] == 1.0
    p, band = bootstrap_p(np.full(9_999, 0.3))  # every resample above 0: the smallest p a Monte Carlo test gives
    assert p == pytest.approx(2 / 10_000) and band[0] == 0.0 and band[1] > p


def test_a_borderline_verdict_is_drawn_again_with_more_resamples():
    # one seed, 400 items, 40 gained and 24 lost: z = 16 / sqrt(64) = 2.0, the 2.5% quantile sits at 0 itself,
    # so its Monte Carlo band holds 0 whatever the bootstrap seed (borderline under 40 of 40 seeds tried)
    d = np.zeros(400)
    d[:40], d[40:64] = 1, -1
    a, b = {"x": np.clip(d, 0, 1)[None, :]}, {"x": np.clip(-d, 0, 1)[None, :]}
    for seed in range(3):
        few = compare(a, b, resamples=1000, seed=seed, escalate_to=1000)
        assert few.verdict() == "is borderline" and few.unsettled_end() == "lower"
        assert few.low_band[0] <= 0 < few.low_band[1]
    assert compare(a, b, resamples=1000, escalate_to=40_000).resamples == 40_000
    clear = {"x": np.ones((1, 400))}
    assert compare(clear, b, resamples=1000, escalate_to=40_000).resamples == 1000  # "holds" at once


def test_a_papers_effect_at_the_edge_is_placed_again_with_more_resamples():
    rng = np.random.default_rng(3)
    a, b = {"x": rng.integers(0, 2, (3, 200)).astype(float)}, {"x": rng.integers(0, 2, (3, 200)).astype(float)}
    few = compare(a, b, resamples=500, escalate_to=500)
    at_edge = sum(few.high_band) / 2
    assert few.place(at_edge) == "at the edge" and few.verdict() == "is within noise"
    assert compare(a, b, resamples=500, escalate_to=20_000, reference=at_edge).resamples == 20_000
    assert compare(a, b, resamples=500, escalate_to=20_000, reference=few.high_band[1] + 0.05).resamples == 500
    assert compare(a, b, resamples=500, escalate_to=20_000).resamples == 500  # no reference: the verdict decides


def test_comparison_places_the_papers_effect():
    from mosld.experiments.stats import Comparison

    c = Comparison(0.0, (-0.01, 0.01), (-0.01, 0.01), 0.005, 0.014, low_band=(-0.012, -0.008),
                   high_band=(0.008, 0.012))  # fmt: skip
    assert c.verdict() == "is within noise"
    assert (c.place(0.0241), c.place(-0.02), c.place(0.0), c.place(0.0095)) == ("above", "below", "inside",
                                                                                "at the edge")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["cpu", "cpu_babi", "cpu_single"])
def test_page_verdicts_are_the_same_under_twenty_bootstrap_seeds(protocol):
    from mosld.data.tasks import task_name
    from mosld.experiments.aggregate import load_page, page_claims
    from mosld.experiments.stats import Bootstrap

    spec = load_protocol(REPO / "configs" / "experiments" / f"{protocol}.yaml")
    runs = [run.name for run in spec.runs()]
    if not all((REPO / spec.results_dir / name / "metrics.json").is_file() for name in runs):
        pytest.skip(f"{protocol}: not every run is recorded yet")
    page = load_page(REPO / spec.results_dir, [task_name(t) for t in spec.test_tasks or []],
                     [REPO / load_protocol(REPO / other).results_dir for other in spec.compare_with])  # fmt: skip

    def verdicts(seed: int) -> list[tuple]:
        claims = page_claims(page, Bootstrap(seed=seed))
        return [(c.where, c.label, c.comparison.verdict(), c.holm_verdict(),
                 c.paper is not None and c.comparison.place(c.paper)) for c in claims]  # fmt: skip

    first = verdicts(0)
    assert first and all(verdicts(seed) == first for seed in range(1, 20))
