import json

import pytest
import torch
from helpers import EMBEDDED, EXAMPLE_TASK, SHARED_DATA, TEST_TOKENIZER
from transformers import AutoModelForCausalLM, LlamaConfig

from mosld.data import MultiTaskDataModule, encode_examples, load_task
from mosld.data.datamodule import eval_loader
from mosld.data.generation import GenerationSpec, encode_generation_examples
from mosld.data.prompts import FAMILY_TEMPLATES
from mosld.data.tasks import Example, TaskDataError, task_family
from mosld.evaluation import (
    evaluate,
    extract_choice,
    generate_batch,
    score_batch,
    supports_prompt_sharing,
)
from mosld.evaluation.decoding import DecodeOptions
from mosld.evaluation.generation_scoring import left_pad
from mosld.models import load_tokenizer

DATA_DIR = SHARED_DATA
TOKENIZER = TEST_TOKENIZER


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def reference_logprob(model, ids: list[int], labels: list[int]) -> float:
    """Answer log-likelihood of one unpadded sequence, computed on its own."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100)


def passage_items(tokenizer):
    examples = load_task(EXAMPLE_TASK, "test")
    examples.append(Example("t", "A long story. " * 40, "What is long?", ["the story", "nothing at all"], 0))
    return examples, encode_examples(examples, tokenizer, "passage", 96)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_score_batch_matches_scoring_each_sequence_alone(tiny_model, tokenizer, share_prompt):
    examples, items = passage_items(tokenizer)
    assert supports_prompt_sharing(tiny_model)
    checked = 0
    for batch in eval_loader(items, 0, tokenizer.pad_token_id, batch_size=4):
        out = score_batch(tiny_model, batch, share_prompt=share_prompt)
        for i in range(len(batch["gold"])):
            rows = (batch["item_index"] == i).nonzero().squeeze(1).tolist()
            logps, tokens, chars = [], [], []
            for r in rows:
                keep = batch["attention_mask"][r] == 1
                ids, labels = batch["input_ids"][r][keep].tolist(), batch["labels"][r][keep].tolist()
                logps.append(reference_logprob(tiny_model, ids, labels))
                tokens.append(sum(label != -100 for label in labels))
                chars.append(int(batch["choice_chars"][r]))
            assert out["choice_logprob"][rows].tolist() == pytest.approx(logps, rel=1e-4, abs=1e-4)
            gold = int(batch["gold"][i])
            assert out["gold_loss_sum"][i].item() == pytest.approx(-logps[gold], rel=1e-4, abs=1e-4)
            assert out["gold_tokens"][i].item() == tokens[gold]
            norm = [lp / c for lp, c in zip(logps, chars, strict=True)]
            assert out["choice_logprob_norm"][rows].tolist() == pytest.approx(norm, rel=1e-4, abs=1e-4)
            assert out["pred"][i].item() == max(range(len(rows)), key=norm.__getitem__)
            assert out["correct_norm"][i].item() == float(max(range(len(rows)), key=norm.__getitem__) == gold)
            assert out["correct_sum"][i].item() == float(max(range(len(rows)), key=logps.__getitem__) == gold)
            assert torch.equal(out["correct"], out["correct_norm"])
            checked += 1
    assert checked == len(examples)


def test_scores_do_not_depend_on_the_batch_an_item_is_in(tiny_model, tokenizer):
    _, items = passage_items(tokenizer)
    together = score_batch(tiny_model, next(iter(eval_loader(items, 0, tokenizer.pad_token_id, batch_size=13))))
    ordered = sorted(items, key=len, reverse=True)  # the loader's order
    for k in (0, 7, 12):
        alone = score_batch(tiny_model, next(iter(eval_loader([ordered[k]], 0, tokenizer.pad_token_id, 1))))
        assert alone["gold_loss_sum"][0].item() == pytest.approx(together["gold_loss_sum"][k].item(), rel=1e-4)


def test_unlabelled_items_score_but_are_never_correct(tiny_model, tokenizer):
    _, items = passage_items(tokenizer)
    batch = next(iter(eval_loader(items[:3], 0, tokenizer.pad_token_id, batch_size=3)))
    batch["gold"] = torch.full_like(batch["gold"], -1)
    out = score_batch(tiny_model, batch)
    assert out["correct"].tolist() == [0.0] * 3 and out["gold_tokens"].tolist() == [0.0] * 3
    assert out["pred"].min() >= 0


def test_sum_and_length_normalised_scoring_differ_as_documented(tokenizer):
    # A model with a zero LM head gives every token the same probability 1/V: the summed log-likelihood
    # prefers the answer with the fewest tokens, the per-character one the answer with the most characters.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    torch.nn.init.zeros_(model.lm_head.weight)
    example = Example("t", None, "Pick one.", ["cat", "internationalization"], 1)
    item = encode_examples([example], tokenizer, "science", 64)[0]
    assert len(item.choices[0]) < len(item.choices[1])
    out = score_batch(model, next(iter(eval_loader([item], 0, tokenizer.pad_token_id, 1))))
    assert out["correct_sum"].item() == 0.0
    assert out["correct_norm"].item() == 1.0


def test_evaluate_reports_per_task_accuracy_and_the_macro_average(tiny_model, tokenizer, tmp_path):
    story = tmp_path / "story" / "test.jsonl"
    story.parent.mkdir()
    story.write_text('{"context": "Ann has a red ball.", "question": "What colour is the ball?", '
                     '"choices": ["red", "blue"], "label": 0}\n' * 3)  # fmt: skip
    tiny_model.train()
    result = evaluate(tiny_model, tokenizer, [EXAMPLE_TASK, str(story.parent)], split="test", limit=5)
    assert tiny_model.training  # restored
    assert set(result["accuracy"]) == {"example_task", "story"}
    assert result["metrics"]["example_task"]["num_items"] == 5
    assert result["metrics"]["story"]["num_items"] == 3
    assert result["accuracy"]["story"] in (0.0, 1.0)  # three copies of one item
    assert result["macro_accuracy"] == pytest.approx(sum(result["accuracy"].values()) / 2)
    for metrics in result["metrics"].values():
        for key in ("accuracy_sum", "accuracy_norm", "accuracy_token_norm"):
            assert 0.0 <= metrics[key] <= 1.0
    assert result["headline"] == "accuracy_norm"


def test_evaluate_agrees_with_the_datamodule_loaders(tiny_model, tokenizer, tmp_path):
    dm = MultiTaskDataModule([EXAMPLE_TASK], model_name_or_path=TOKENIZER, eval_batch_size=3, max_eval_examples=10,
                             max_length=512, cache_dir=str(tmp_path))  # fmt: skip
    correct = [score_batch(tiny_model, batch)["correct"] for batch in dm.test_dataloader()[0]]
    result = evaluate(tiny_model, tokenizer, [EXAMPLE_TASK], limit=10, share_prompt=True)
    assert result["accuracy"]["example_task"] == pytest.approx(torch.cat(correct).mean().item())


def test_generation_mode_extracts_an_answer(tiny_model, tokenizer):
    result = evaluate(tiny_model, tokenizer, [EXAMPLE_TASK], split="validation", method="generate", max_new_tokens=4)
    assert result["headline"] == "accuracy_generate"
    assert 0.0 <= result["accuracy"]["example_task"] <= 1.0
    assert result["metrics"]["example_task"]["num_items"] == 12


def test_generation_mode_picks_what_transformers_generate_picks(tiny_model, tokenizer):
    """The generation mode decodes with mosld's one decoder; its answers are those of ``model.generate``
    (greedy, the first line of the continuation), which it used before."""
    examples = load_task(EXAMPLE_TASK, "validation")
    items = encode_examples(examples, tokenizer, FAMILY_TEMPLATES[task_family(EXAMPLE_TASK)], 512)
    batch = left_pad([item.prompt for item in items], tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = tiny_model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    texts = [tokenizer.decode(row, skip_special_tokens=True).split("\n")[0] for row in out[:, width:].tolist()]
    assert len({t.strip() for t in texts}) > 1  # the random model says different things
    preds = [extract_choice(t, e.choices) for t, e in zip(texts, examples, strict=True)]
    expected = sum(float(p == e.label) for p, e in zip(preds, examples, strict=True)) / len(examples)
    result = evaluate(tiny_model, tokenizer, [EXAMPLE_TASK], split="validation", method="generate", max_new_tokens=6,
                      batch_size=5)  # fmt: skip
    assert result["accuracy"]["example_task"] == pytest.approx(expected)
    assert generate_batch(tiny_model, {**batch, "generation": DecodeOptions(6, ("\n",))}, tokenizer) == [
        t.strip() for t in texts
    ]


def write_rows(folder, rows) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluate_decodes_generation_tasks_beside_multiple_choice(tiny_model, tokenizer, tmp_path):
    folder = tmp_path / "qa"
    rows = [{"prompt": f"Question {i}: where is it?", "response": f"r{i}"} for i in range(5)]
    write_rows(folder, rows)
    spec = GenerationSpec(metric="exact_match", max_new_tokens=3, stop=())
    items = encode_generation_examples(load_task(str(folder), "test"), tokenizer, spec, 512)
    texts = generate_batch(tiny_model, {**left_pad([i.prompt for i in items], tokenizer.pad_token_id),
                                        "generation": spec}, tokenizer)  # fmt: skip
    answered = [i for i, t in enumerate(texts) if t.strip()][:1]
    for i in answered:  # one item answered right, whatever the random model says (the prompt is unchanged)
        rows[i]["response"] = texts[i]
    write_rows(folder, rows)
    result = evaluate(tiny_model, tokenizer, [EXAMPLE_TASK, str(folder)], limit=5, batch_size=2,
                      generation={"qa": {"max_new_tokens": 3, "metric": "exact_match"}})  # fmt: skip
    mc_only = evaluate(tiny_model, tokenizer, [EXAMPLE_TASK], limit=5, batch_size=2)
    assert result["metrics"]["example_task"] | {"seconds": 0} == mc_only["metrics"]["example_task"] | {"seconds": 0}
    qa = result["metrics"]["qa"]
    assert qa["num_items"] == 5 and qa["seconds"] > 0
    assert qa["exact_match"] == pytest.approx(
        sum(float(t == r["response"]) for t, r in zip(texts, rows, strict=True)) / 5
    )
    assert qa["exact_match"] == len(answered) / 5
    assert result["headlines"] == {"example_task": "accuracy_norm", "qa": "exact_match"}
    assert result["accuracy"] == {"example_task": mc_only["accuracy"]["example_task"], "qa": qa["exact_match"]}
    assert result["macro_accuracy"] == pytest.approx(sum(result["accuracy"].values()) / 2)
    assert result["macro"]["exact_match"] == qa["exact_match"]
    assert result["macro"]["accuracy_norm"] == mc_only["macro"]["accuracy_norm"]
    assert "headlines" not in mc_only  # multiple choice alone: the result as before
    assert "item_scores" not in result
    per_item = evaluate(tiny_model, tokenizer, [EXAMPLE_TASK, str(folder)], limit=5, batch_size=2, item_scores=True,
                        generation={"qa": {"max_new_tokens": 3, "metric": "exact_match"}})  # fmt: skip
    assert per_item["item_scores"]["qa"] == [float(t == r["response"]) for t, r in zip(texts, rows, strict=True)]
    mc = per_item["item_scores"]["example_task"]
    assert len(mc) == 5 and set(mc) <= {0.0, 1.0} and sum(mc) / 5 == pytest.approx(result["accuracy"]["example_task"])


def test_empty_split_is_an_error(tiny_model, tokenizer, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "test.jsonl").write_text("\n")
    with pytest.raises(TaskDataError, match="split 'test' is empty"):
        evaluate(tiny_model, tokenizer, [str(tmp_path / "empty")])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("honey", 1),
        (" Honey.", 1),
        ("honey bees make it", 1),
        ("the milk of bees", 0),
        ("B", 1),
        ("(A) milk", 0),
        ("nothing like it", -1),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, ["milk", "honey", "royal honey jelly"], lettered=True) == expected


def test_extract_choice_prefers_the_longest_matching_choice():
    assert extract_choice("royal honey jelly, of course", ["royal", "royal honey jelly"]) == 1


@pytest.mark.slow
@pytest.mark.skipif(not (DATA_DIR / "allenai__ai2_arc").is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
def test_embedded_smollm2_zero_shot_arc_easy_cloze_is_well_above_chance_and_lettered_is_not():
    from mosld.models import load_base_model

    model, tokenizer = load_base_model(EMBEDDED), load_tokenizer(EMBEDDED)
    run = dict(data_dir=str(DATA_DIR), limit=200)
    cloze = evaluate(model, tokenizer, ["arc_easy"], **run)["accuracy"]["arc_easy"]
    lettered = evaluate(model, tokenizer, ["arc_easy"], templates={"arc_easy": "science_lettered"}, **run)
    # On the full test split the headline is 0.511 (docs/zero_shot.md: 20+ min on 2 cores, too long for a test);
    # on this fixed 200-item sample 0.47. Chance is 0.25; the lettered prompt sits at chance for a 135M model.
    assert cloze >= 0.45
    assert lettered["accuracy"]["arc_easy"] <= 0.35
