import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mosld.data import KNOWN_TASKS, Example, TaskDataError, load_task, split_plan, task_kind
from mosld.data.tasks import is_eval_only, read_jsonl

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DATA_DIR = Path(os.environ.get("MOSLD_DATA_DIR") or SHARED_DATA)
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "allenai__ai2_arc").is_dir(),
    reason=f"benchmark data not found at {DATA_DIR} (clone the repo beside shared/ or set MOSLD_DATA_DIR)",
)
EXAMPLE_TASK = REPO / "data" / "example_task"

# Row counts of SOURCES.md. Where the validation split serves as test (CommonsenseQA; RACE, whose local
# copy has no test split; BoolQ) 10% of train is held out for validation, so train + validation = the file.
COUNTS = {
    "arc_easy": (2251, 570, 2376),
    "arc_challenge": (1119, 299, 1172),
    "openbookqa": (4957, 500, 500),
    "mctest": (280 + 1200, 120 + 200, 240 + 600),
    "commonsense_qa": (9741 - 974, 974, 1221),
    "race": (10083 - 1008, 1008, 4887),
    "boolq": (9427 - 943, 943, 3270),
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def user_row(i: int, **overrides) -> dict:
    row = {"question": f"question {i}?", "choices": [f"yes {i}", f"no {i}", "maybe"], "label": i % 3}
    row.update(overrides)
    return row


@needs_data
# mmlu has no train split (its own test below); the generation tasks have theirs further down
@pytest.mark.parametrize("task", [t for t in KNOWN_TASKS if t != "mmlu" and task_kind(t) == "multiple_choice"])
def test_real_tasks_load_with_the_documented_row_counts(task):
    splits = {s: load_task(task, s, DATA_DIR) for s in ("train", "validation", "test")}
    assert tuple(len(v) for v in splits.values()) == COUNTS[task]
    for examples in splits.values():
        for e in examples:
            assert isinstance(e, Example) and e.task == task
            assert len(e.choices) >= 2 and all(isinstance(c, str) and c for c in e.choices)
            assert 0 <= e.label < len(e.choices)
            assert e.question.strip()
    passages = [e.context for e in splits["test"]]
    if task in ("race", "mctest", "boolq"):
        assert all(passages), "passage tasks need a passage on every test item"
    else:
        assert not any(passages)


@needs_data
@pytest.mark.parametrize("task", ["commonsense_qa", "race", "boolq"])
def test_held_out_validation_is_disjoint_from_train_and_the_test_split_is_the_official_validation(task):
    train, validation, test = (load_task(task, s, DATA_DIR) for s in ("train", "validation", "test"))
    key = lambda e: (e.context, e.question, tuple(e.choices))  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in validation}
    assert split_plan(task, DATA_DIR) == {"train": "train minus 10% held out", "validation": "10% of train",
                                          "test": "validation"}  # fmt: skip
    # The same items every call: a fixed seed, not the training seed.
    assert [key(e) for e in load_task(task, "validation", DATA_DIR)] == [key(e) for e in validation]
    assert len(test) == len(read_jsonl(DATA_DIR / TASK_DIRS[task] / "validation.jsonl"))


TASK_DIRS = {
    "commonsense_qa": "tau__commonsense_qa/default",
    "race": "ehovy__race/all",
    "boolq": "google__boolq/default",
}


@needs_data
def test_race_says_it_uses_validation_as_test(caplog):
    with caplog.at_level(logging.WARNING, logger="mosld.data.tasks"):
        load_task("race", "test", DATA_DIR)
    assert "race: no 'test' split" in caplog.text and "ehovy__race/all/test.jsonl not found" in caplog.text
    assert "using the validation split as the test split" in caplog.text


@needs_data
def test_mctest_combines_both_configs_and_unescapes_newlines():
    examples = load_task("mctest", "validation", DATA_DIR)
    assert len(examples) == 120 + 200
    assert all("\\newline" not in e.context for e in examples)
    assert any("\n" in e.context for e in examples)


@needs_data
def test_boolq_is_yes_no_and_evaluation_only():
    assert is_eval_only("boolq") and not is_eval_only("race")
    test = load_task("boolq", "test", DATA_DIR)
    assert {tuple(e.choices) for e in test} == {("no", "yes")}
    assert {e.label for e in test} == {0, 1}
    assert all(e.question.endswith("?") for e in test)
    assert all(e.context is None for e in load_task("boolq", "train", DATA_DIR))  # the local train lacks passages


@needs_data
def test_data_dir_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOSLD_DATA_DIR", str(DATA_DIR))
    assert len(load_task("openbookqa", "test")) == 500


def test_user_task_folder_loads_like_a_builtin_one():
    splits = {s: load_task(str(EXAMPLE_TASK), s) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 12, "validation": 12, "test": 12}
    first = splits["train"][0]
    assert first == Example(
        "example_task", None, "Which of these is a fruit?", ["carrot", "apple", "potato", "onion"], 1
    )
    assert any(e.context for e in splits["test"]) and any(e.context is None for e in splits["test"])


def test_user_task_without_validation_holds_out_ten_percent_of_train(tmp_path):
    write_jsonl(tmp_path / "mine" / "train.jsonl", [user_row(i) for i in range(50)])
    write_jsonl(tmp_path / "mine" / "test.jsonl", [user_row(i) for i in range(7)])
    train = load_task(str(tmp_path / "mine"), "train")
    validation = load_task(str(tmp_path / "mine"), "validation")
    assert (len(train), len(validation)) == (45, 5)
    assert {e.question for e in train} | {e.question for e in validation} == {f"question {i}?" for i in range(50)}
    assert train[0].task == "mine"


def test_single_user_file_is_its_named_split(tmp_path):
    path = write_jsonl(tmp_path / "quiz.jsonl", [user_row(i) for i in range(20)])
    assert len(load_task(str(path), "train")) == 18
    with pytest.raises(TaskDataError, match="no test split"):
        load_task(str(path), "test")
    test_file = write_jsonl(tmp_path / "other" / "test.jsonl", [user_row(i) for i in range(3)])
    examples = load_task(str(test_file), "test")
    assert len(examples) == 3 and examples[0].task == "other"


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(TaskDataError) as err:
        load_task("arc_medium", "test")
    assert "arc_medium" in str(err.value)
    assert all(name in str(err.value) for name in KNOWN_TASKS)


def test_unknown_split_is_refused():
    with pytest.raises(TaskDataError, match="'dev'.*train"):
        load_task(str(EXAMPLE_TASK), "dev")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "t" / "test.jsonl", [user_row(0), user_row(1), '{"question": "broken", ', user_row(3)]
    )
    with pytest.raises(TaskDataError, match=rf"{path}:3: malformed JSON"):
        load_task(str(path.parent), "test")


def test_missing_column_names_task_file_and_expected_columns(tmp_path):
    row = user_row(1)
    del row["choices"]
    path = write_jsonl(tmp_path / "t" / "test.jsonl", [user_row(0), row])
    with pytest.raises(TaskDataError) as err:
        load_task(str(path.parent), "test")
    message = str(err.value)
    assert "task 't'" in message and f"{path}:2" in message and "['choices']" in message
    assert "['question', 'choices', 'label']" in message


@pytest.mark.parametrize("label", [3, -1, True, "1"])
def test_label_outside_the_choices_is_refused(tmp_path, label):
    path = write_jsonl(tmp_path / "t" / "test.jsonl", [user_row(0, label=label)])
    with pytest.raises(TaskDataError, match=rf"{path}:1: field 'label'"):
        load_task(str(path.parent), "test")


def test_builtin_label_outside_the_choice_letters_is_refused(tmp_path):
    row = {"id": "x", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}
    path = write_jsonl(tmp_path / "allenai__ai2_arc" / "ARC-Easy" / "test.jsonl", [row])
    with pytest.raises(TaskDataError, match=rf"task 'arc_easy': {path}:1: label 'answerKey' = 'C'"):
        load_task("arc_easy", "test", tmp_path)


def test_empty_split_is_an_error_not_zero_accuracy(tmp_path):
    path = write_jsonl(tmp_path / "t" / "test.jsonl", [])
    with pytest.raises(TaskDataError, match=rf"task 't': split 'test' is empty \({path}\)"):
        load_task(str(path.parent), "test")


def test_missing_user_path_is_reported(tmp_path):
    with pytest.raises(TaskDataError, match="no such file or folder"):
        load_task(str(tmp_path / "nowhere" / "train.jsonl"), "train")


def test_without_a_local_copy_the_hub_error_names_the_path_tried_and_the_hub_dataset(tmp_path):
    # A fresh interpreter, so the offline switches are read when `datasets` is imported; no network is used.
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("MOSLD_DATA_DIR", None)
    code = (
        "from mosld.data import load_task\n"
        f"try:\n    load_task('openbookqa', 'test', {str(tmp_path)!r})\n"
        "except Exception as err:\n    print(type(err).__name__, err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("TaskDataError")
    assert str(tmp_path / "allenai__openbookqa" / "main") in out
    assert "'allenai/openbookqa'" in out and "config 'main'" in out


@needs_data
def test_mmlu_is_evaluation_only_with_the_harness_prompt():
    from mosld.data.prompts import get_template

    test = load_task("mmlu", "test", DATA_DIR)
    assert len(test) == 14042 and len(load_task("mmlu", "validation", DATA_DIR)) == 1531
    assert is_eval_only("mmlu") and split_plan("mmlu", DATA_DIR) == {"validation": "validation", "test": "test"}
    first = test[0]
    context, body, answers = get_template("mmlu").render(first)
    # lm-evaluation-harness's zero-shot mmlu: description + question + lettered choices + "Answer:", " A".." D"
    expected = (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        f"{first.question}\nA. {first.choices[0]}\nB. {first.choices[1]}\nC. {first.choices[2]}\n"
        f"D. {first.choices[3]}\nAnswer:"
    )
    assert context + body == expected and answers == [" A", " B", " C", " D"]


@needs_data
def test_mmlu_sample_is_stratified_by_subject_and_other_samples_are_unchanged():
    import random
    from collections import Counter

    from mosld.data.tasks import seeded_sample

    test = load_task("mmlu", "test", DATA_DIR)
    sample = seeded_sample(test, 1000, 0)
    assert len(sample) == 1000 and seeded_sample(test, 1000, 0) == sample
    population, drawn = Counter(e.context for e in test), Counter(e.context for e in sample)
    assert set(drawn) == set(population)  # all 57 subjects
    for subject, n in population.items():  # proportional allocation: within one item of the exact share
        assert abs(drawn[subject] - 1000 * n / len(test)) < 1
    positions = {id(e): i for i, e in enumerate(test)}
    assert [positions[id(e)] for e in sample] == sorted(positions[id(e)] for e in sample)  # file order kept
    # a task without strata: the plain seeded sample, as before (earlier records' items still pair)
    boolq = load_task("boolq", "test", DATA_DIR)
    keep = sorted(random.Random(0).sample(range(len(boolq)), 300))
    assert seeded_sample(boolq, 300, 0) == [boolq[i] for i in keep]


def test_mmlu_rows_with_a_bad_answer_are_refused(tmp_path):
    folder = tmp_path / "cais__mmlu" / "all"
    row = {"question": "q", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 4}
    write_jsonl(folder / "test.jsonl", [row])
    write_jsonl(folder / "validation.jsonl", [row])
    with pytest.raises(TaskDataError, match=r"test.jsonl:1: field 'answer' = 4 is not a choice index 0-3"):
        load_task("mmlu", "test", tmp_path)


needs_babi = pytest.mark.skipif(not (DATA_DIR / "babi" / "en").is_dir(), reason=f"bAbI not found at {DATA_DIR}")
needs_gsm8k = pytest.mark.skipif(not (DATA_DIR / "openai__gsm8k").is_dir(), reason=f"GSM8K not found at {DATA_DIR}")


@needs_babi
def test_babi_tasks_are_generation_tasks_with_a_held_out_validation_split():
    from mosld.data import TASKS, GenerationExample, GenerationSpec

    for n in range(1, 21):
        name = f"babi_qa{n}"
        splits = {s: load_task(name, s, DATA_DIR) for s in ("train", "validation", "test")}
        assert tuple(len(v) for v in splits.values()) == (900, 100, 1000), name
        assert task_kind(name) == "generation" and not is_eval_only(name)
        assert all(isinstance(e, GenerationExample) and e.task == name and e.references == [e.target] for e in
                   splits["test"])  # fmt: skip
        # the hold-out splits the file by position (bAbI repeats some items, so compare multisets)
        key = lambda e: (e.context, e.prompt, e.target)  # noqa: E731
        folder = next((DATA_DIR / "babi" / "en").glob(f"qa{n}_*"))
        rows = [("\n".join(r.data["story"]) or None, r.data["question"], r.data["answer"]) for r in
                read_jsonl(folder / "train.jsonl")]  # fmt: skip
        assert Counter(map(key, splits["train"] + splits["validation"])) == Counter(rows)
        metric = "set_match" if n == 8 else "exact_match"
        assert TASKS[name].generation == GenerationSpec(metric, 8, ("\n",), "plain")
    assert split_plan("babi_qa1", DATA_DIR) == {"train": "train minus 10% held out", "validation": "10% of train",
                                               "test": "test"}  # fmt: skip
    first = load_task("babi_qa1", "test", DATA_DIR)[0]
    row = read_jsonl(next((DATA_DIR / "babi" / "en").glob("qa1_*")) / "test.jsonl")[0].data
    assert first == GenerationExample("babi_qa1", "\n".join(row["story"]), row["question"], row["answer"],
                                      [row["answer"]])  # fmt: skip
    assert first.context.split("\n")[0] == "John travelled to the hallway." and first.prompt == "Where is John?"
    # qa10 has no qa1 mix-up: the folder is found by its "qa1_" / "qa10_" prefix
    assert load_task("babi_qa10", "test", DATA_DIR)[0].target in ("yes", "no", "maybe")
    assert {"," in e.target for e in load_task("babi_qa8", "test", DATA_DIR)} == {True, False}


@needs_gsm8k
def test_gsm8k_trains_on_the_worked_solution_and_scores_the_final_number():
    from mosld.data import TASKS, GenerationSpec

    splits = {s: load_task("gsm8k", s, DATA_DIR) for s in ("train", "validation", "test")}
    assert tuple(len(v) for v in splits.values()) == (7473 - 747, 747, 1319)
    assert TASKS["gsm8k"].generation == GenerationSpec("final_number", 256, (), "plain")
    assert split_plan("gsm8k", DATA_DIR)["validation"] == "10% of train"
    natalia = next(e for e in splits["train"] + splits["validation"] if e.prompt.startswith("Natalia sold clips"))
    assert natalia.target == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    )
    assert natalia.references == ["72"] and natalia.context is None
    every = [e for split in splits.values() for e in split]
    assert not any("<<" in e.target for e in every) and all(e.target.endswith(f"#### {e.references[0]}") for e in every)


def test_gsm8k_row_without_a_final_number_is_refused(tmp_path):
    folder = tmp_path / "openai__gsm8k" / "main"
    write_jsonl(folder / "test.jsonl", [{"question": "1+1?", "answer": "It is 2.\n#### 2"},
                                        {"question": "2+2?", "answer": "It is 4."}])  # fmt: skip
    with pytest.raises(TaskDataError, match=rf"task 'gsm8k': {folder / 'test.jsonl'}:2: field 'answer' should end in"):
        load_task("gsm8k", "test", tmp_path)


def test_multiple_choice_item_ids_are_unchanged():
    """The committed experiment records pair items by these ids: they must not change."""
    from mosld.data.datamodule import item_ids

    assert item_ids(load_task(str(EXAMPLE_TASK), "test"))[:3] == ["0a56ba106cc3", "c968bd4333be", "313622b76148"]
    made = [Example("t", "A passage.", "Q?", ["a", "b"], 1), Example("t", None, "Q?", ["a", "b"], 1)]
    assert item_ids(made + made[1:]) == ["f4888452ab4e", "94f6594e50f2", "94f6594e50f2#2"]
