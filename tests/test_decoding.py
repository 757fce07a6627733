"""The decoder's per-row options (mosld.evaluation.decoding): sampling, budgets, stop strings, streamed text,
cancellation; each row decoding as it would alone. Greedy decoding itself: tests/test_generation.py."""

import pytest
import torch
from test_generation import EOS, PAD, PROMPTS, TOKENIZER, build, reference_greedy

from mosld.evaluation.decoding import DecodeOptions, decode_steps, final_prefix, left_pad


def decode(model, prompts, options, **kw) -> tuple[list[str], list[str], list[str], list[int]]:
    """(texts, streamed texts, finish reasons, tokens) of each row."""
    batch = left_pad(prompts, PAD)
    n = len(prompts)
    texts, streamed, reasons, tokens = [None] * n, [""] * n, [None] * n, [0] * n
    for updates in decode_steps(model, TOKENIZER, batch["input_ids"], batch["attention_mask"], options, **kw):
        for u in updates:
            assert reasons[u.row] is None, "an update after the row's last one"
            streamed[u.row] += u.delta
            if u.finish_reason is not None:
                texts[u.row], reasons[u.row], tokens[u.row] = u.text, u.finish_reason, u.tokens
    return texts, streamed, reasons, tokens


def test_sampling_with_a_seed_repeats_and_does_not_depend_on_the_batch():
    model = build("mosld")
    sampled = DecodeOptions(12, temperature=1.5, seed=7)
    alone = decode(model, PROMPTS[:1], [sampled])[0]
    assert decode(model, PROMPTS[:1], [sampled])[0] == alone
    others = [DecodeOptions(5), DecodeOptions(12, temperature=1.0, seed=1), DecodeOptions(3, temperature=0.7)]
    batched = decode(model, PROMPTS, [sampled, *others])[0]
    assert batched[0] == alone[0]
    greedy = TOKENIZER.decode(reference_greedy(model, PROMPTS[0], 12))
    other_seed = decode(model, PROMPTS[:1], [DecodeOptions(12, temperature=1.5, seed=8)])[0]
    assert greedy != alone[0] or greedy != other_seed[0]  # sampling does sample (T = 1.5 on a near-flat model)
    assert alone != other_seed


def test_top_p_that_keeps_one_token_is_greedy():
    model = build("mosld")
    greedy = [TOKENIZER.decode(reference_greedy(model, p, 10)) for p in PROMPTS]
    texts = decode(model, PROMPTS, [DecodeOptions(10, temperature=1.0, top_p=1e-6, seed=s) for s in range(4)])[0]
    assert texts == greedy


def test_rows_with_their_own_budgets_and_stops_decode_as_alone():
    model = build("mosld")
    full = TOKENIZER.decode(reference_greedy(model, PROMPTS[2], 12))
    stop = full[5:7]
    cut = full.index(stop)
    options = [DecodeOptions(3), DecodeOptions(12), DecodeOptions(12, stop=(stop,)), DecodeOptions(7)]
    texts, _, reasons, tokens = decode(model, PROMPTS, options)
    alone = [decode(model, [p], [o])[0][0] for p, o in zip(PROMPTS, options, strict=True)]
    assert texts == alone
    assert texts[2] == full[:cut] and reasons[2] == "stop" and tokens[2] == cut + 2
    assert reasons[0] == "length" and tokens[0] == 3 and len(texts[0]) == 3


def test_streamed_deltas_add_up_to_the_text_and_never_show_a_stop_string():
    model = build("mosld")
    full = TOKENIZER.decode(reference_greedy(model, PROMPTS[0], 12))
    stop = full[6:9]
    cut = full.index(stop)
    seen = []
    batch = left_pad(PROMPTS[:1], PAD)
    steps = decode_steps(model, TOKENIZER, batch["input_ids"], batch["attention_mask"], [DecodeOptions(12, (stop,))],
                         text_deltas=True)  # fmt: skip
    for updates in steps:
        seen.extend(u.delta for u in updates)
    assert "".join(seen) == full[:cut]
    assert all(d == "" or len(d) == 1 for d in seen[:-1])  # a character per step while no stop string is near
    assert not any(stop in "".join(seen[: i + 1]) for i in range(len(seen)))


def test_cancelled_rows_stop_and_the_others_go_on():
    model = build("mosld")
    steps = []
    texts, _, reasons, _ = decode(model, PROMPTS[:2], [DecodeOptions(12)] * 2,
                                  cancelled=lambda row: row == 0 and len(steps.append(row) or steps) > 2)  # fmt: skip
    assert reasons == ["cancelled", "length"]
    assert texts[1] == TOKENIZER.decode(reference_greedy(model, PROMPTS[1], 12))
    assert 0 < len(texts[0]) < 12


def test_eos_counts_as_a_token_but_is_not_text():
    model = build("bare")
    full = reference_greedy(model, PROMPTS[2], 12)
    model.generation_config.eos_token_id = [EOS, full[3]]
    texts, _, reasons, tokens = decode(model, [PROMPTS[2]], [DecodeOptions(12)])
    assert texts == [TOKENIZER.decode(full[:3])] and reasons == ["stop"] and tokens == [4]


def test_ignore_eos_decodes_the_whole_budget_past_an_eos():
    model = build("bare")
    full = reference_greedy(model, PROMPTS[2], 12)
    model.generation_config.eos_token_id = [EOS, full[3]]  # the greedy path's 4th token is an EOS
    texts, _, reasons, tokens = decode(model, [PROMPTS[2]], [DecodeOptions(12, ignore_eos=True)])
    assert reasons == ["length"] and tokens == [12]
    # the row goes on as if there were no EOS: its text is the 12 greedy tokens' (the token that is an EOS here
    # is an ordinary character to the tokenizer, so it is in the text)
    assert texts == [TOKENIZER.decode(reference_greedy(model, PROMPTS[2], 12, eos=()), skip_special_tokens=True)]


def test_options_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        DecodeOptions(4, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        DecodeOptions(4, top_p=0)
    assert DecodeOptions(4, stop=("", "x")).stop == ("x",)


def test_final_prefix_holds_back_what_may_still_change():
    assert final_prefix("hello wor", ("world",)) == "hello "
    assert final_prefix("caf\ufffd", ()) == "caf"
    assert final_prefix("abc", ("x",)) == "abc"
    assert final_prefix("ab\n", ("\n\n", "b\nc")) == "a"


def test_no_model_call_without_tokens_to_generate():
    model = build("mosld")
    model.register_forward_pre_hook(lambda *_: pytest.fail("the model was called"))
    assert decode(model, PROMPTS[:2], [DecodeOptions(0)] * 2)[2] == ["length", "length"]
    assert torch.is_grad_enabled()
