"""User generation row formats (Alpaca, prompt/response, chat) end to end, format detection, the ``generation``
option, predict files of generation rows and the hub bAbI converter."""

import copy
import json
from pathlib import Path

import pytest
from helpers import EXAMPLE_TASK, TEST_TOKENIZER

from mosld.data import GenerationExample, GenerationItem, GenerationSpec, MultiTaskDataModule, TaskDataError, load_task
from mosld.data.formats import babi_hub_rows
from mosld.data.tasks import load_predict_examples, read_jsonl, task_kind


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def alpaca(i: int, **kw) -> dict:
    return {"instruction": f"Name colour {i}.", "input": "" if i % 2 else f"Hint {i}", "output": f"blue {i}"} | kw


def prompt_response(i: int, **kw) -> dict:
    return {"prompt": f"Say {i}.", "response": f"{i}"} | kw


def chat(i: int, **kw) -> dict:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Hi {i}"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": f"What is {i} + 1?"},
        {"role": "assistant", "content": f"{i + 1}"},
    ]
    return {"messages": messages} | kw


def task_folder(root: Path, name: str, make, n_train: int = 20, n_test: int = 6) -> str:
    write_jsonl(root / name / "train.jsonl", [make(i) for i in range(n_train)])
    write_jsonl(root / name / "test.jsonl", [make(100 + i) for i in range(n_test)])
    return str(root / name)


def make_dm(tmp_path, tasks, **kwargs) -> MultiTaskDataModule:
    kwargs.setdefault("model_name_or_path", TEST_TOKENIZER)
    return MultiTaskDataModule(tasks=tasks, cache_dir=str(tmp_path / "cache"), **kwargs)


def no_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def test_alpaca_rows_end_to_end(tmp_path, tokenizer):
    task = task_folder(tmp_path, "colours", alpaca)
    assert task_kind(task) == "generation"
    first = load_task(task, "test")[0]
    assert first == GenerationExample("colours", None, "Name colour 100.\n\nHint 100", "blue 100", ["blue 100"])
    assert load_task(task, "test")[1].prompt == "Name colour 101."  # an empty input adds nothing
    dm = make_dm(tmp_path, [task])
    assert dm.generation_spec(0) == GenerationSpec("rouge_l", 128, (), "plain") and dm.templates == ["plain"]
    item = dm.encoded(0, "test")[0]
    assert isinstance(item, GenerationItem) and item.references == ["blue 100"]
    assert tokenizer.decode(item.prompt) == "Q: Name colour 100.\n\nHint 100\nA:"
    assert tokenizer.decode(item.target) == " blue 100"
    ids, labels = item.train_sequence(tokenizer.eos_token_id)
    assert ids == item.prompt + item.target + [tokenizer.eos_token_id] and len(ids) == item.train_length() == len(item)
    assert labels == [-100] * len(item.prompt) + item.target + [tokenizer.eos_token_id]
    assert (len(dm.encoded(0, "train")), len(dm.encoded(0, "validation"))) == (18, 2)  # 10% of train held out


def test_prompt_response_rows_end_to_end(tmp_path, tokenizer):
    task = task_folder(tmp_path, "echo", prompt_response)
    item = make_dm(tmp_path, [task]).encoded(0, "test")[0]
    assert tokenizer.decode(item.prompt) == "Q: Say 100.\nA:" and tokenizer.decode(item.target) == " 100"
    assert item.references == ["100"]


def test_chat_rows_use_the_tokenizers_chat_template(tmp_path, tokenizer):
    if not tokenizer.chat_template:
        pytest.skip("the test tokenizer has no chat template")
    task = task_folder(tmp_path, "talk", chat)
    example = load_task(task, "test")[0]
    assert example.prompt == "What is 100 + 1?" and example.target == "101" and example.references == ["101"]
    assert example.history == [("system", "Be brief."), ("user", "Hi 100"), ("assistant", "Hello.")]
    dm = make_dm(tmp_path, [task])
    assert dm.generation_spec(0).template == "chat" and dm.templates == ["chat"]
    item = dm.encoded(0, "test")[0]
    messages = chat(100)["messages"]
    expected = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(item.prompt) == expected
    assert tokenizer.decode(item.target) == "101"
    # the target ends in the tokenizer's EOS, which closes an assistant turn (SmolLM2: <|im_end|>)
    ids, labels = item.train_sequence(tokenizer.eos_token_id)
    assert (
        tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100]) == "101" + tokenizer.eos_token
    )
    # the plain template on request: history turns as "User:"/"Assistant:" lines
    plain = make_dm(tmp_path, [task], templates={"talk": "plain"}).encoded(0, "test")[0]
    assert (
        tokenizer.decode(plain.prompt)
        == "System: Be brief.\nUser: Hi 100\nAssistant: Hello.\nUser: What is 100 + 1?\nAssistant:"
    )


def test_chat_template_fallback_and_refusal_without_one(tmp_path, tokenizer):
    task = task_folder(tmp_path, "talk", chat)
    dm = make_dm(tmp_path, [task])
    dm._tokenizer = no_chat_template(tokenizer)
    assert dm.generation_spec(0).template == "plain"  # chat rows' default falls back
    assert tokenizer.decode(dm.encoded(0, "test")[0].prompt).endswith("User: What is 100 + 1?\nAssistant:")
    asked = make_dm(tmp_path, [task], templates={"talk": "chat"})
    asked._tokenizer = no_chat_template(tokenizer)
    with pytest.raises(ValueError, match="task 'talk': template 'chat' .*data.templates.* has none"):
        asked.encoded(0, "test")


def test_a_context_is_cut_from_its_start_and_targets_never(tokenizer):
    from mosld.data import encode_generation_examples

    story = "\n".join(f"Sentence {i} of the story." for i in range(60))
    example = GenerationExample("t", story, "Where is Mary?", "in the kitchen", ["in the kitchen"])
    for template in ("plain", "chat") if tokenizer.chat_template else ("plain",):
        for max_length in (60, 100, 2000):
            item = encode_generation_examples([example], tokenizer, GenerationSpec(template=template), max_length)[0]
            assert len(item) <= max_length
            text = tokenizer.decode(item.prompt)
            assert "Sentence 59 of the story.\n" in text and "Where is Mary?" in text  # the latest sentences kept
            assert ("Sentence 0 of" in text) == (max_length == 2000)
            assert tokenizer.decode(item.target).strip() == "in the kitchen"
            if max_length < 2000:  # whole sentences: the kept part starts at a sentence
                kept = text[text.index("Sentence") :]
                assert kept.startswith("Sentence ") and " of the story." in kept.split("\n")[0]
    too_long = GenerationExample("t", story, "Why? " * 40, "because", ["because"])
    with pytest.raises(
        TaskDataError, match=r"data.max_length = 30 is too small for task 't': 1 of 2 items .* at least"
    ):
        encode_generation_examples([example, too_long], tokenizer, GenerationSpec(), 30)


def test_formats_are_detected_per_file_and_must_match_line_one(tmp_path):
    mixed = tmp_path / "mixed"
    write_jsonl(mixed / "train.jsonl", [alpaca(i) for i in range(10)])
    write_jsonl(mixed / "test.jsonl", [prompt_response(i) for i in range(3)])
    assert [type(e) for e in load_task(str(mixed), "test")] == [GenerationExample] * 3
    bad = write_jsonl(tmp_path / "bad" / "test.jsonl", [alpaca(0), alpaca(1), prompt_response(2)])
    with pytest.raises(TaskDataError) as err:
        load_task(str(bad.parent), "test")
    message = str(err.value)
    assert f"{bad}:3: missing column(s) ['instruction', 'output']" in message
    assert "Alpaca" in message and "detected at line 1" in message and "looks like a prompt/response row" in message
    kinds = tmp_path / "kinds"
    write_jsonl(kinds / "train.jsonl", [alpaca(i) for i in range(10)])
    write_jsonl(kinds / "test.jsonl", [{"question": "Q?", "choices": ["a", "b"], "label": 0}])
    with pytest.raises(TaskDataError, match="must hold the same kind of item.*Alpaca rows.*multiple choice rows"):
        load_task(str(kinds), "train")
    unknown = write_jsonl(tmp_path / "odd" / "test.jsonl", [{"text": "hello"}])
    with pytest.raises(TaskDataError, match=rf"{unknown}:1: cannot tell the row format .*Alpaca"):
        load_task(str(unknown), "test")


@pytest.mark.parametrize(
    ("row", "field"),
    [
        (alpaca(0, output=""), "'output' is empty"),
        (alpaca(0, instruction="  \n"), "'instruction' is empty"),
        (alpaca(0, input=["x"]), "'input' should be a string"),
        (alpaca(0, output=7), "'output' should be a string, got int"),
        (prompt_response(0, prompt=None), "'prompt' should be a string, got NoneType"),
        ({"messages": []}, "'messages' should be a non-empty list"),
        ({"messages": "hi"}, "'messages' should be a non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "'messages': the last turn should be the assistant's"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "'messages': the turn before the assistant's reply"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "'messages[1].role'"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
         "'messages[1].content' is empty"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                       {"role": "assistant", "content": "b"}]}, "'messages[1].role': a system turn may only come"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "'messages[0]' should be an object"),
    ],
)  # fmt: skip
def test_bad_generation_rows_are_refused_with_file_line_and_field(tmp_path, row, field):
    first = {"messages": chat(0)["messages"]} if "messages" in row else alpaca(0) if "output" in row else None
    rows = [first or prompt_response(0), row]
    path = write_jsonl(tmp_path / "t" / "train.jsonl", rows)
    with pytest.raises(TaskDataError) as err:
        load_task(str(path), "train")
    assert f"task 't': {path}:2: field {field}" in str(err.value)


def test_generation_option_overrides_a_tasks_spec_and_is_checked(tmp_path):
    task = task_folder(tmp_path, "colours", alpaca)
    dm = make_dm(tmp_path, [EXAMPLE_TASK, task], generation={"colours": {"metric": "token_f1", "max_new_tokens": 64,
                                                                          "stop": ["\n\n"]}})  # fmt: skip
    assert dm.generation_spec(0) is None
    assert dm.generation_spec(1) == GenerationSpec("token_f1", 64, ("\n\n",), "plain")
    assert dm.generation_specs == {1: dm.generation_spec(1)}
    for bad, message in [
        ({"nope": {}}, r"generation: \['nope'\] are not among the tasks"),
        ({"example_task": {"metric": "exact_match"}}, "generation: 'example_task' is a multiple-choice task"),
        ({"colours": {"temperature": 0.5}}, r"generation: task 'colours': unknown field\(s\) \['temperature'\]"),
        ({"colours": {"metric": "bleu"}}, "generation: task 'colours': metric 'bleu': unknown; known metrics: exact"),
        ({"colours": {"max_new_tokens": 0}}, "generation: task 'colours': max_new_tokens: expected a positive"),
        ({"colours": {"template": "fancy"}}, "generation: task 'colours': template 'fancy'"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_dm(tmp_path, [EXAMPLE_TASK, task], generation=bad)
    with pytest.raises(ValueError, match="templates: 'colours' is a generation task"):
        make_dm(tmp_path, [task], templates={"colours": "science"})


def test_predict_file_of_generation_rows_gives_generation_batches(tmp_path, tokenizer):
    task = task_folder(tmp_path, "colours", alpaca)
    rows = [{"instruction": "Name a colour."}, alpaca(3), {"instruction": "Name a fruit.", "input": "red"}]
    path = write_jsonl(tmp_path / "ask.jsonl", rows)
    examples = load_predict_examples(path)
    assert [e.references for e in examples] == [[], ["blue 3"], []]
    dm = make_dm(tmp_path, [EXAMPLE_TASK, task], predict_file=str(path), eval_batch_size=2,
                 generation={"colours": {"max_new_tokens": 9}})  # fmt: skip
    batches = list(dm.predict_dataloader())
    assert [b["item_ids"] for b in batches] == [["0", "1"], ["2"]]  # file order
    assert batches[0]["references"] == [[], ["blue 3"]] and batches[0]["generation"].max_new_tokens == 9
    assert batches[0]["task_ids"].tolist() == [1, 1]
    last = batches[1]["input_ids"][0][batches[1]["attention_mask"][0] == 1]
    assert tokenizer.decode(last) == "Q: Name a fruit.\n\nred\nA:"
    # multiple-choice predict rows still come in multiple-choice batches
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Q?", "choices": ["a", "b"]}])
    assert "gold" in next(iter(make_dm(tmp_path, [task, EXAMPLE_TASK], predict_file=str(mc)).predict_dataloader()))


def hub_story() -> dict:
    """A ``facebook/babi_qa`` row as ``datasets`` loads it: one story, a struct of lists."""
    return {
        "story": {
            "id": ["1", "2", "3", "4", "5", "6"],
            "type": [0, 0, 1, 0, 0, 1],
            "text": ["Mary moved to the bathroom.", "John went to the hallway.", "Where is Mary? ",
                     "Daniel went back to the hallway.", "Sandra moved to the garden.", "Where is Daniel?"],
            "supporting_ids": [[], [], ["1"], [], [], ["4"]],
            "answer": ["", "", "bathroom", "", "", "hallway"],
        }
    }  # fmt: skip


def test_babi_hub_rows_become_one_row_per_question(tmp_path):
    path = write_jsonl(tmp_path / "hub.jsonl", [hub_story()])
    rows = [r for row in read_jsonl(path) for r in babi_hub_rows(row.data)]
    assert rows == [
        {"story": ["Mary moved to the bathroom.", "John went to the hallway."], "question": "Where is Mary?",
         "answer": "bathroom", "supporting_facts": [1]},
        {"story": ["Mary moved to the bathroom.", "John went to the hallway.", "Daniel went back to the hallway.",
                   "Sandra moved to the garden."], "question": "Where is Daniel?", "answer": "hallway",
         "supporting_facts": [3]},
    ]  # fmt: skip
    # the same story as a list of per-line records (another way datasets may give a sequence of structs)
    story = hub_story()["story"]
    lines = [dict(zip(story, values, strict=True)) for values in zip(*story.values(), strict=True)]
    assert babi_hub_rows({"story": lines}) == rows


def test_babi_falls_back_to_the_hub_through_the_converter(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [hub_story()] * 10

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    test = load_task("babi_qa1", "test", tmp_path)  # no local copy under tmp_path
    assert calls == [("facebook/babi_qa", "en-qa1", "test")]
    assert len(test) == 20 and test[1].context == "\n".join(hub_story()["story"]["text"][i] for i in (0, 1, 3, 4))
    assert (test[1].prompt, test[1].target, test[1].references) == ("Where is Daniel?", "hallway", ["hallway"])
    assert len(load_task("babi_qa1", "validation", tmp_path)) == 2  # 10% of train


def test_the_example_generation_tasks_mix_with_the_multiple_choice_one(tmp_path, tokenizer):
    from helpers import REPO

    tasks = [EXAMPLE_TASK, str(REPO / "data" / "example_instructions"), str(REPO / "data" / "example_chat")]
    dm = make_dm(tmp_path, tasks, batch_size=4, num_samples_per_epoch=24)
    assert dm.kinds == ["multiple_choice", "generation", "generation"]
    assert dm.templates[1:] == ["plain", "chat" if tokenizer.chat_template else "plain"]
    assert sorted({t for b in dm.train_dataloader() for t in b["task_ids"].tolist()}) == [0, 1, 2]
    loaders = dm.val_dataloader()
    assert "gold" in next(iter(loaders[0])) and all("references" in next(iter(loader)) for loader in loaders[1:])
