import json
from types import SimpleNamespace

import pytest
import torch
from helpers import EXAMPLE_TASK, SHARED_DATA, TEST_TOKENIZER

import mosld.data.datamodule as datamodule_module
from mosld.data import MultiTaskDataModule, encode_examples, load_task
from mosld.data.prompts import TEMPLATES, get_template
from mosld.data.tasks import Example

DATA_DIR = SHARED_DATA
TOKENIZER = TEST_TOKENIZER


@pytest.fixture
def story_task(tmp_path) -> str:
    """A user task with long passages and no validation file (so 10% of train is held out)."""
    folder = tmp_path / "stories"
    folder.mkdir()
    for split, n in (("train", 30), ("test", 9)):
        rows = [
            {
                "context": f"Story {i}. " + "The fox walked along the river and looked at the hills. " * (3 + i % 5),
                "question": f"Where did fox {i} walk?",
                "choices": ["along the river", "into town", "up a tree"],
                "label": 0,
            }
            for i in range(n)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def make_dm(tmp_path, tasks, **kwargs) -> MultiTaskDataModule:
    return MultiTaskDataModule(tasks=tasks, model_name_or_path=TOKENIZER, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_encoding_masks_the_prompt_and_keeps_the_answer_text(tokenizer):
    example = Example("t", None, "What do bees make?", ["milk", "honey"], 1)
    item = encode_examples([example], tokenizer, "science", 64)[0]
    assert tokenizer.decode(item.prompt) == "Q: What do bees make?\nA:"
    assert [tokenizer.decode(c) for c in item.choices] == [" milk", " honey"]
    # "milk", "honey": lm-eval's acc_norm divides by the choice without its target_delimiter (docs/harness.md)
    assert item.choice_chars == [4, 5]
    ids, labels = item.train_sequence(tokenizer.eos_token_id)
    answer = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
    assert tokenizer.decode(answer) == " honey" + tokenizer.eos_token
    assert labels[: len(item.prompt)] == [-100] * len(item.prompt)
    # Scoring sees exactly the training sequence without its EOS.
    assert item.choice_sequence(1) == (ids[:-1], labels[:-1])


def test_lettered_template_lists_the_choices_and_targets_the_letter(tokenizer):
    example = Example("t", None, "What do bees make?", ["milk", "honey"], 1)
    item = encode_examples([example], tokenizer, "science_lettered", 64)[0]
    assert tokenizer.decode(item.prompt) == "Question: What do bees make?\nA. milk\nB. honey\nAnswer:"
    assert [tokenizer.decode(c) for c in item.choices] == [" A", " B"]


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        get_template("nope")
    assert all(name in str(err.value) for name in TEMPLATES)


def test_long_passages_are_cut_so_question_and_answers_fit(tokenizer):
    passage = "word " * 400
    example = Example("t", passage, "Which choice is right?", ["the first one", "a much longer second choice here"], 0)
    for max_length in (40, 64, 300):
        item = encode_examples([example], tokenizer, "passage", max_length)[0]
        assert len(item) <= max_length  # prompt + longest answer + EOS
        text = tokenizer.decode(item.prompt)
        assert text.startswith("word word") and text.endswith("word\n\nQ: Which choice is right?\nA:")
        assert [tokenizer.decode(c) for c in item.choices] == [" the first one", " a much longer second choice here"]
    short = encode_examples([Example("t", "Short.", "Q?", ["a", "b"], 0)], tokenizer, "passage", 300)[0]
    assert tokenizer.decode(short.prompt) == "Short.\n\nQ: Q?\nA:"


def test_train_batches_are_dynamically_padded_with_answer_only_labels(tmp_path, tokenizer, story_task):
    dm = make_dm(tmp_path, [EXAMPLE_TASK, story_task], batch_size=4, max_length=256, seed=1)
    assert dm.task_names == ["example_task", "stories"]
    dm.setup("fit")
    answers = {0: {c for e in load_task(EXAMPLE_TASK, "train") for c in e.choices}, 1: {"along the river"}}
    loader = dm.train_dataloader()
    assert len(loader.sampler) == 12 + 27
    widths = []
    for batch in loader:
        assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids"}
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.dtype == labels.dtype == batch["task_ids"].dtype == torch.long
        assert ids.shape == mask.shape == labels.shape and batch["task_ids"].shape == (ids.shape[0],)
        assert ids.shape[1] == int(mask.sum(1).max())  # padded to the longest, not to max_length
        assert (labels[mask == 0] == -100).all()
        widths.append(ids.shape[1])
        for row, label_row, task_id in zip(ids, labels, batch["task_ids"].tolist(), strict=True):
            answer = tokenizer.decode(row[label_row != -100])
            assert answer.endswith(tokenizer.eos_token)
            assert answer[: -len(tokenizer.eos_token)].strip() in answers[task_id]
    assert min(widths) < max(widths) < 256


def test_eval_batches_hold_whole_items_and_agree_with_training(tmp_path, tokenizer, story_task):
    dm = make_dm(tmp_path, [EXAMPLE_TASK, story_task], eval_batch_size=5, max_length=256)
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert len(loaders) == 2
    examples = load_task(EXAMPLE_TASK, "test")
    seen = 0
    for batch in loaders[0]:
        items = len(batch["gold"])
        seen += items
        assert batch["task_ids"].tolist() == [0] * items
        assert batch["item_index"].max() == items - 1
        for i in range(items):
            rows = (batch["item_index"] == i).nonzero().squeeze(1)
            assert batch["choice_index"][rows].tolist() == list(range(len(rows)))  # all choices, in this batch
            texts = [tokenizer.decode(batch["input_ids"][r][batch["labels"][r] != -100]).strip() for r in rows]
            example = next(e for e in examples if e.choices == texts)
            assert batch["gold"][i] == example.label
            assert batch["choice_chars"][rows].tolist() == [len(c) for c in example.choices]
            # The gold row is the training sequence of the same item, minus its EOS.
            gold_row = rows[example.label]
            seq = batch["input_ids"][gold_row][batch["attention_mask"][gold_row] == 1].tolist()
            item = encode_examples([example], tokenizer, dm.templates[0], 256)[0]
            assert seq == item.train_sequence(tokenizer.eos_token_id)[0][:-1]
    assert seen == 12


@pytest.mark.parametrize("group_batches", [1, 2])
def test_shards_are_disjoint_and_complete_across_ranks(tmp_path, story_task, group_batches):
    dm = make_dm(
        tmp_path, [EXAMPLE_TASK, story_task], eval_batch_size=2, num_samples_per_epoch=39,
        length_group_batches=group_batches,
    )  # fmt: skip
    dm.setup()
    shards, train = [], []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        rows = [tuple(r[m == 1].tolist()) for b in dm.val_dataloader()[1] for r, m in
                zip(b["input_ids"], b["attention_mask"], strict=True)]  # fmt: skip
        shards.append(rows)
        sampler = dm.train_dataloader().sampler
        sampler.set_epoch(3)
        train.append(list(sampler))
    dm.trainer = None
    single = [tuple(r[m == 1].tolist()) for b in dm.val_dataloader()[1] for r, m in
              zip(b["input_ids"], b["attention_mask"], strict=True)]  # fmt: skip
    assert sorted(shards[0] + shards[1]) == sorted(single) and not set(shards[0]) & set(shards[1])
    assert len(train[0]) == len(train[1]) == 19
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(3)
    if group_batches == 1:  # rank r takes every second draw from r on
        assert [i for pair in zip(*train, strict=True) for i in pair] == list(sampler)[:38]
    else:  # the ranks share out the same draws (a multiset: examples can repeat within an epoch)
        assert sorted(train[0] + train[1]) == sorted(sampler.global_indices()[:38])


def test_training_order_depends_on_seed_and_epoch_only(tmp_path, story_task):
    first, second = (make_dm(tmp_path, [EXAMPLE_TASK, story_task], seed=4) for _ in range(2))
    orders = []
    for dm in (first, second):
        sampler = dm.train_dataloader().sampler
        orders.append([list(sampler)])
        sampler.set_epoch(1)
        orders[-1].append(list(sampler))
    assert orders[0] == orders[1] and orders[0][0] != orders[0][1]


def test_caps_use_the_training_seed_for_train_and_a_fixed_seed_for_eval(tmp_path, story_task):
    runs = [make_dm(tmp_path, [story_task], max_train_examples=5, max_eval_examples=4, seed=s) for s in (0, 1)]
    train = [[tuple(i.prompt) for i in dm.encoded(0, "train")] for dm in runs]
    test = [[tuple(i.prompt) for i in dm.encoded(0, "test")] for dm in runs]
    assert len(train[0]) == 5 and len(test[0]) == 4
    assert train[0] != train[1]
    assert test[0] == test[1]


def test_tokenised_splits_are_cached(tmp_path, story_task, monkeypatch):
    items = make_dm(tmp_path, [story_task]).encoded(0, "test")
    assert list((tmp_path / "cache").glob("stories-*.pt"))

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(datamodule_module, "encode_examples", fail)
    assert make_dm(tmp_path, [story_task]).encoded(0, "test") == items
    with pytest.raises(AssertionError, match="tokenised again"):  # another max_length is another cache entry
        make_dm(tmp_path, [story_task], max_length=100).encoded(0, "test")


def test_options_are_checked(tmp_path, story_task):
    with pytest.raises(ValueError, match="setting='single' trains on exactly one task; got 2"):
        make_dm(tmp_path, [EXAMPLE_TASK, story_task], setting="single")
    with pytest.raises(ValueError, match="setting: expected 'mixture' or 'single'"):
        make_dm(tmp_path, [story_task], setting="both")
    with pytest.raises(ValueError, match=r"templates: \['arc'\] are not among the tasks \['stories'\]"):
        make_dm(tmp_path, [story_task], templates={"arc": "science"})
    with pytest.raises(ValueError, match="distinct"):
        make_dm(tmp_path, [story_task, story_task])
    dm = make_dm(tmp_path, [story_task], setting="single", templates={"stories": "passage_lettered"})
    assert dm.templates == ["passage_lettered"]


@pytest.mark.skipif(not (DATA_DIR / "google__boolq").is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
def test_evaluation_only_tasks_get_eval_loaders_but_no_training_batches(tmp_path):
    dm = make_dm(tmp_path, ["arc_easy", "boolq"], data_dir=str(DATA_DIR), max_train_examples=16, max_eval_examples=6)
    assert {b for batch in dm.train_dataloader() for b in batch["task_ids"].tolist()} == {0}
    assert [sum(len(b["gold"]) for b in loader) for loader in dm.val_dataloader()] == [6, 6]
    only_boolq = make_dm(tmp_path, ["boolq"], data_dir=str(DATA_DIR), max_eval_examples=6)
    with pytest.raises(ValueError, match="evaluation-only.*train_eval_only=True"):
        only_boolq.train_dataloader()
    assert sum(len(b["gold"]) for b in only_boolq.test_dataloader()[0]) == 6


@pytest.mark.skipif(not (DATA_DIR / "cais__mmlu").is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
def test_per_task_eval_caps_and_mmlu_items_are_never_cut(tmp_path):
    dm = make_dm(tmp_path, ["boolq", "mmlu"], data_dir=str(DATA_DIR), max_eval_examples=6, max_length=64,
                 eval_examples_by_task={"mmlu": 40})  # fmt: skip
    assert [len(dm.encoded(i, "test")) for i in (0, 1)] == [6, 40]
    # MMLU keeps its whole question at any max_length (its min_length), BoolQ's passage is cut to fit
    assert max(len(item) for item in dm.encoded(1, "test")) > 64
    assert max(len(item) for item in dm.encoded(0, "test")) <= 64
    assert all(c == [c[0]] for item in dm.encoded(1, "test") for c in item.choices)  # " A": one token
    with pytest.raises(ValueError, match="eval_examples_by_task: expected task name -> an integer >= 1"):
        make_dm(tmp_path, ["boolq"], eval_examples_by_task={"boolq": 0})


@pytest.fixture
def qa_task(tmp_path) -> str:
    """A user generation task (prompt/response rows) with passages of varied length."""
    folder = tmp_path / "qa"
    folder.mkdir()
    for split, n in (("train", 30), ("test", 11)):
        rows = [{"prompt": "Story: " + "The fox ran. " * (1 + i % 7) + f"How far did fox {i} run?",
                 "response": "far" if i % 2 else "very far indeed"} for i in range(n)]  # fmt: skip
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_a_mixture_trains_multiple_choice_and_generation_items_together(tmp_path, tokenizer, qa_task):
    from mosld.data.datamodule import TrainDataset

    dm = make_dm(tmp_path, [EXAMPLE_TASK, qa_task], batch_size=4, max_length=128, seed=2)
    dataset = dm.train_dataset()
    assert isinstance(dataset, TrainDataset) and dataset.sizes == [12, 27]
    assert dataset.lengths == [len(dataset[i][0]) for i in range(len(dataset))]  # train_length of either kind
    loader = dm.train_dataloader()
    targets = {0: {c for e in load_task(EXAMPLE_TASK, "train") for c in e.choices}, 1: {"far", "very far indeed"}}
    seen = set()
    for batch in loader:
        for row, label_row, task_id in zip(
            batch["input_ids"], batch["labels"], batch["task_ids"].tolist(), strict=True
        ):
            answer = tokenizer.decode(row[label_row != -100])
            assert (
                answer.endswith(tokenizer.eos_token) and answer[: -len(tokenizer.eos_token)].strip() in targets[task_id]
            )
            seen.add(task_id)
    assert seen == {0, 1}
    # the temperature sampler, its length grouping and DDP sharding see one dataset of both kinds
    shards = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        shards.append(list(dm.train_dataloader().sampler))
    dm.trainer = None
    assert sorted(shards[0] + shards[1]) == sorted(dm.train_dataloader().sampler.global_indices()[:38])


def test_generation_eval_batches_are_left_padded_prompts_with_references(tmp_path, tokenizer, qa_task):
    dm = make_dm(tmp_path, [EXAMPLE_TASK, qa_task], eval_batch_size=4, generation={"qa": {"metric": "token_f1"}})
    dm.setup("test")
    mc, gen = dm.test_dataloader()
    assert "gold" in next(iter(mc)) and "references" not in next(iter(mc))
    items, ids = dm.encoded(1, "test"), dm.item_ids(1, "test")
    by_id = dict(zip(ids, items, strict=True))
    lengths, seen = [], []
    for batch in gen:
        assert set(batch) == {"input_ids", "attention_mask", "task_ids", "item_ids", "references", "generation"}
        assert batch["generation"] is dm.generation_spec(1) and batch["generation"].metric == "token_f1"
        assert batch["task_ids"].tolist() == [1] * len(batch["item_ids"])
        ids_, mask = batch["input_ids"], batch["attention_mask"]
        assert ids_.shape == mask.shape and (mask[:, -1] == 1).all()  # left padding: every prompt ends at the right
        assert (ids_[mask == 0] == tokenizer.pad_token_id).all()
        for row, m, item_id, refs in zip(ids_, mask, batch["item_ids"], batch["references"], strict=True):
            assert m.tolist() == sorted(m.tolist())  # zeros, then ones
            assert row[m == 1].tolist() == by_id[item_id].prompt and refs == by_id[item_id].references
            lengths.append(int(m.sum()))
        seen += batch["item_ids"]
    assert sorted(seen) == sorted(ids) and lengths == sorted(lengths, reverse=True)  # longest first
    shards = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        shards.append([i for b in dm.test_dataloader()[1] for i in b["item_ids"]])
    dm.trainer = None
    assert sorted(shards[0] + shards[1]) == sorted(ids) and not set(shards[0]) & set(shards[1])


def test_generation_items_are_cached_by_template(tmp_path, qa_task, monkeypatch):
    items = make_dm(tmp_path, [qa_task]).encoded(0, "test")

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(datamodule_module, "encode_generation_examples", fail)
    assert make_dm(tmp_path, [qa_task], generation={"qa": {"max_new_tokens": 3}}).encoded(0, "test") == items
    with pytest.raises(AssertionError, match="tokenised again"):
        make_dm(tmp_path, [qa_task], templates={"qa": "chat"}).encoded(0, "test")


@pytest.mark.skipif(not (DATA_DIR / "babi").is_dir(), reason=f"bAbI not found at {DATA_DIR}")
def test_babi_stories_are_cut_from_their_start_to_fit(tmp_path, tokenizer):
    dm = make_dm(tmp_path, ["babi_qa3", "babi_qa1"], data_dir=str(DATA_DIR), max_length=96, max_eval_examples=50)
    examples = {e.prompt + e.context: e for e in load_task("babi_qa3", "test", DATA_DIR)}
    items = dm.encoded(0, "test")
    assert len(items) == 50 and max(len(item) for item in items) <= 96
    cut = 0
    for item in items:
        text = tokenizer.decode(item.prompt)
        story, _, question = text.rpartition("\n")[0].rpartition("\n")
        assert question.startswith("Q: ") and text.endswith("?\nA:") and question.endswith("?")
        question = question.removeprefix("Q: ")
        # whole sentences: what is kept is a suffix of the story at a line break
        full = next(e for e in examples.values() if e.prompt == question and ("\n" + e.context).endswith("\n" + story))
        cut += story != full.context
        assert tokenizer.decode(item.target) == " " + full.target
    assert cut > 0
    assert dm.generation_spec(1).metric == "exact_match" and dm.generation_spec(0).max_new_tokens == 8
