"""``python -m mosld.experiments compare``: two runs' item predictions, paired, on known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mosld.experiments.__main__ import main
from mosld.experiments.compare import compare_runs


def write_run(folder: Path, correct: dict[str, list[int]], extra: int = 0) -> Path:
    folder.mkdir(parents=True)
    rows = [{"task": task, "item": f"{task}-{i}", "pred": 0, "gold": 0, "correct": bool(c), "correct_sum": True,
             "correct_norm": bool(c), "correct_token_norm": bool(c)}
            for task, values in correct.items() for i, c in enumerate(values)]  # fmt: skip
    rows += [{"task": "t1", "item": f"extra-{i}", "correct": True} for i in range(extra)]
    (folder / "val_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_known_differences_intervals_and_mcnemar(tmp_path, capsys):
    a = write_run(tmp_path / "a", {"t1": [1] * 10, "t2": [1, 0] * 5}, extra=3)
    b = write_run(tmp_path / "b", {"t1": [1] * 6 + [0] * 4, "t2": [1, 0] * 5})
    result = compare_runs(a, b)
    assert result["items"] == 20 and result["only_a"] == 3 and result["only_b"] == 0
    t1, t2, avg = (result["tasks"][k] for k in ("t1", "t2", "average"))
    assert (t1["acc_a"], t1["acc_b"], t1["diff"]) == (100.0, 60.0, 40.0)
    assert (t1["a_only_right"], t1["b_only_right"]) == (4, 0) and t1["mcnemar_p"] == pytest.approx(2 / 16)
    assert t1["low"] > 0 and t1["high"] <= 70  # every resample keeps A ahead
    assert (t2["diff"], t2["low"], t2["high"], t2["mcnemar_p"]) == (0.0, 0.0, 0.0, 1.0)  # identical: zero width
    assert avg["diff"] == pytest.approx(20.0) and avg["items"] == 20
    assert compare_runs(a, b, scoring="correct_sum")["tasks"]["average"]["diff"] == 0.0
    assert main(["compare", str(a), str(b)]) == 0
    assert "| t1 | 10 | 100.0 | 60.0 | +40.0 [" in capsys.readouterr().out


def test_missing_or_broken_prediction_files_are_named(tmp_path, capsys):
    a = write_run(tmp_path / "a", {"t1": [1, 0]})
    assert main(["compare", str(a), str(tmp_path / "absent")]) == 2
    assert "absent/val_predictions.jsonl is missing" in capsys.readouterr().err
    broken = write_run(tmp_path / "broken", {"t1": [1]})
    (broken / "val_predictions.jsonl").write_text('{"task": "t1", "item": "t1-0", "correct": true}\n{"oops"\n')
    assert main(["compare", str(a), str(broken)]) == 2
    assert "broken/val_predictions.jsonl:2: not a prediction row" in capsys.readouterr().err


def write_generation_run(folder: Path, scores: dict[str, list[float]]) -> Path:
    """A run's val_predictions.jsonl of generation rows (ItemPredictionWriter's: correct = score)."""
    folder.mkdir(parents=True)
    rows = [{"task": task, "item": f"{task}-{i}", "generated": "g", "references": ["r"], "score": s, "correct": s}
            for task, values in scores.items() for i, s in enumerate(values)]  # fmt: skip
    (folder / "val_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_generation_scores_fractional_ones_without_mcnemar(tmp_path, capsys):
    a = write_generation_run(tmp_path / "a", {"em": [1, 1, 0, 1], "f1": [0.5, 1.0, 0.25, 0.75]})
    b = write_generation_run(tmp_path / "b", {"em": [0, 1, 0, 1], "f1": [0.5, 0.5, 0.25, 0.25]})
    result = compare_runs(a, b)
    em, f1, avg = (result["tasks"][k] for k in ("em", "f1", "average"))
    assert (em["acc_a"], em["acc_b"], em["a_only_right"], em["b_only_right"]) == (75.0, 50.0, 1, 0)
    assert em["mcnemar_p"] == 1.0  # 0/1 exact-match scores: McNemar applies
    assert (f1["acc_a"], f1["acc_b"], f1["diff"]) == (62.5, 37.5, 25.0)
    assert f1["mcnemar_p"] is None and avg["mcnemar_p"] is None  # fractions: the bootstrap only
    assert f1["low"] >= 0 and avg["diff"] == pytest.approx(25.0)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| f1 | 4 | 62.5 | 37.5 | +25.0 [" in out and out.count("| – | – | – |") == 2
    assert "f1, average: scores are fractions (generation metric), not 0/1: the paired bootstrap only" in out
    with pytest.raises(ValueError, match="generation task: use scoring correct"):
        compare_runs(a, b, scoring="correct_norm")
