"""Batched greedy decoding with the KV cache (mosld.evaluation.generation_scoring) on tiny random models."""

from types import SimpleNamespace

import pytest
import torch
from helpers import ALL_METHODS, adapted, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

import mosld
from mosld.data.generation import GenerationCollator, GenerationItem, GenerationSpec
from mosld.evaluation import generate_batch
from mosld.evaluation.generation_scoring import cut_at_stop, generate_items, left_pad

EOS, PAD, NEWLINE = 0, 1, 10
# One character per id of the tiny models' 64-token vocabulary, so that texts compare token for token.
CHARS = [chr(ord("0") + i) for i in range(64)]
CHARS[NEWLINE] = "\n"


class CharTokenizer:
    """The tokenizer interface generate_batch uses: one character per token, id 0 the (special) EOS."""

    eos_token_id, pad_token_id = EOS, PAD

    def decode(self, ids, skip_special_tokens=False):
        return "".join(CHARS[i] for i in ids if not (skip_special_tokens and i == EOS))

    def batch_decode(self, rows, skip_special_tokens=False):
        return [self.decode(row, skip_special_tokens) for row in rows]


TOKENIZER = CharTokenizer()
PROMPTS = [[5, 9, 33, 12, 7, 40, 2, 18, 22, 3, 60, 11], [8, 14, 3], [50, 20, 31, 44, 9, 17, 26], [4]]


def spec(max_new_tokens=12, stop=()):
    return SimpleNamespace(metric="exact_match", max_new_tokens=max_new_tokens, stop=tuple(stop))


def batch_of(prompts, **kw):
    return {**left_pad(prompts, PAD), "generation": spec(**kw)}


def reference_greedy(model, prompt, max_new_tokens, eos=(EOS,)) -> list[int]:
    """Greedy decoding without a KV cache: the whole sequence again at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            if token in eos:
                break
            ids.append(token)
    return ids[len(prompt) :]


def build(kind: str, arch: str = "llama") -> torch.nn.Module:
    model = tiny_model(arch) if kind == "bare" else adapted(arch, kind).eval()
    model.generation_config.eos_token_id = EOS  # the tiny configs say 2, an ordinary token of CHARS
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["bare", *ALL_METHODS])
def test_left_padded_batch_equals_one_at_a_time_and_a_plain_loop(kind, arch):
    model = build(kind, arch)
    model.config.use_cache = False  # as the training module leaves it
    batched = generate_batch(model, batch_of(PROMPTS), TOKENIZER)
    alone = [generate_batch(model, batch_of([p]), TOKENIZER)[0] for p in PROMPTS]
    reference = [TOKENIZER.decode(reference_greedy(model, p, 12)) for p in PROMPTS]
    assert batched == alone == reference
    assert sum(len(text) for text in batched) > 2 * len(PROMPTS)  # they do generate


def test_real_tokenizer_and_stop_string(tokenizer):
    config = tiny_config("llama", vocab_size=len(tokenizer), max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts = [tokenizer("Mary went to the kitchen. Where is Mary?")["input_ids"], tokenizer("Hi")["input_ids"]]
    batch = {**left_pad(prompts, tokenizer.pad_token_id), "generation": spec(8, ("\n",))}
    texts = generate_batch(model, batch, tokenizer)
    eos = (tokenizer.eos_token_id,)
    expected = [tokenizer.decode(reference_greedy(model, p, 8, eos), skip_special_tokens=True) for p in prompts]
    assert texts == [cut_at_stop(text, ("\n",)).strip() for text in expected]


class CallCounter:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self.count)

    def count(self, *_):
        self.calls += 1


def test_max_new_tokens_is_honoured():
    model = build("mosld")
    full = TOKENIZER.decode(reference_greedy(model, PROMPTS[0], 12))
    assert len(full) == 12  # no EOS in the first 12 tokens: the test needs it
    counter = CallCounter(model)
    assert generate_batch(model, batch_of(PROMPTS[:1], max_new_tokens=5), TOKENIZER) == [full[:5]]
    assert counter.calls == 5  # the prompt, then 4 steps: the 5th token needs no further call
    assert generate_batch(model, batch_of(PROMPTS[:1], max_new_tokens=0), TOKENIZER) == [""]


def test_stop_strings_cut_the_text_and_end_decoding_early():
    model = build("mosld")
    full = TOKENIZER.decode(reference_greedy(model, PROMPTS[0], 12))
    stop = full[4:6]  # a stop string spanning two tokens
    cut = full.index(stop)
    counter = CallCounter(model)
    out = generate_batch(model, batch_of(PROMPTS[:1], stop=("zz", stop)), TOKENIZER)
    assert out == [full[:cut]]
    assert counter.calls == cut + 2  # stopped once the stop string was complete, not after 12 tokens


def test_eos_ids_of_the_generation_config_stop_a_row():
    model = build("bare")
    full = reference_greedy(model, PROMPTS[2], 12)
    model.generation_config.eos_token_id = [EOS, full[3]]
    expected = TOKENIZER.decode(full[: full.index(full[3])])
    assert generate_batch(model, batch_of([PROMPTS[2]]), TOKENIZER) == [expected]


def test_routing_statistics_count_only_real_tokens():
    """Padding and the steps of rows that already stopped are masked: the statistics of a padded batch
    are the sums of those of its prompts run one at a time."""
    model = build("mosld")
    stop = ("\n", TOKENIZER.decode(reference_greedy(model, PROMPTS[1], 12))[2])  # row 1 stops early
    mosld.set_router_stats(model, True)
    generate_batch(model, batch_of(PROMPTS, stop=stop), TOKENIZER)
    batched = mosld.router_stats(model)
    alone = []
    for p in PROMPTS:
        generate_batch(model, batch_of([p], stop=stop), TOKENIZER)
        alone.append(mosld.router_stats(model))
    assert batched
    for name, stats in batched.items():
        tokens = sum(a[name]["tokens"] for a in alone)
        assert stats["tokens"] == tokens
        prob_sum = sum(a[name]["mean_prob"] * a[name]["tokens"] for a in alone)
        torch.testing.assert_close(stats["mean_prob"] * stats["tokens"], prob_sum)


def test_generate_items_keeps_the_items_order():
    model = build("mosld")
    items = [SimpleNamespace(prompt=p, references=["x"]) for p in PROMPTS]
    texts = generate_items(model, TOKENIZER, items, spec(), batch_size=3)
    assert texts == [generate_batch(model, batch_of([p]), TOKENIZER)[0] for p in PROMPTS]


def test_cut_at_stop():
    assert cut_at_stop("ab\ncd.ef", ("\n",)) == "ab"
    assert cut_at_stop("ab\ncd.ef", (".", "\n")) == "ab"
    assert cut_at_stop("abc", ()) == "abc"


def test_left_pad_is_the_tokenizers_left_padding_and_the_generation_collators(tokenizer):
    """left_pad (token ids and a pad id, no tokenizer needed) pads as tokenizer.pad(padding_side="left") does, and
    the data floor's GenerationCollator pads its prompts the same way."""
    prompts = [[5, 17, 300], [9], [4, 4, 8, 15, 16], [7, 7, 7, 7, 7]]
    ours = left_pad(prompts, tokenizer.pad_token_id)
    theirs = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
    ids = [[tokenizer.pad_token_id] * (5 - len(p)) + p for p in prompts]
    mask = [[0] * (5 - len(p)) + [1] * len(p) for p in prompts]
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist() == ids
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist() == mask
    assert ours["input_ids"].dtype == ours["attention_mask"].dtype == torch.long
    items = [(GenerationItem(p, [], []), 0, str(i)) for i, p in enumerate(prompts)]
    collated = GenerationCollator(tokenizer.pad_token_id, GenerationSpec())(items)
    assert torch.equal(collated["input_ids"], ours["input_ids"])
    assert torch.equal(collated["attention_mask"], ours["attention_mask"])
    # the pad id is the caller's: serving pads with EOS where the tokenizer has none
    assert left_pad([[3, 4], [5]], EOS)["input_ids"].tolist() == [[3, 4], [EOS, 5]]
