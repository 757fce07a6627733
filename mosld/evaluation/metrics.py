"""Scores of generated text against references, each ``(prediction, references) -> float`` in [0, 1].

``METRICS`` maps a metric's name (a generation task's ``GenerationSpec.metric``) to its function; each is the
maximum over the references of a per-reference score:

- ``exact_match``: equal after lower-casing, collapsing whitespace and dropping a trailing period.
- ``set_match``: comma-separated lists equal as sets, each item normalised as ``exact_match`` (bAbI qa8's
  ``apple,football``).
- ``squad_exact_match`` / ``token_f1``: as the SQuAD v1.1 evaluation script computes them (lower-case, strip
  punctuation and the articles a/an/the, collapse whitespace; F1 over the multiset of shared tokens).
- ``rouge_l``: torchmetrics' ROUGE-L F-measure (longest common subsequence of the lower-cased alphanumeric
  tokens; no stemming).
- ``final_number``: the last number of the prediction (the one after ``####`` when present) equals the
  reference's numerically; commas, ``$`` and a trailing ``.0`` are tolerated (GSM8K).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation

Metric = Callable[[str, Sequence[str]], float]


def _best(score: Callable[[str, str], float], prediction: str, references: Sequence[str]) -> float:
    """The maximum of ``score(prediction, reference)`` over the references (0 when there are none)."""
    return max((score(prediction, ref) for ref in references), default=0.0)


# ------------------------------------------------------------------ exact match and sets
def normalize_text(text: str) -> str:
    """Lower-case, collapse whitespace, strip it and a trailing period (``exact_match``'s normalisation)."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction equals a reference after ``normalize_text``."""
    return _best(lambda p, r: float(normalize_text(p) == normalize_text(r)), prediction, references)


def _items(text: str) -> set[str]:
    items = {normalize_text(item) for item in normalize_text(text).split(",")}
    return items - {""}


def set_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the comma-separated items of the prediction and of a reference are the same set."""
    return _best(lambda p, r: float(_items(p) == _items(r)), prediction, references)


# ------------------------------------------------------------------ SQuAD v1.1
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's ``normalize_answer``: lower-case, remove punctuation, articles and extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, reference: str) -> float:
    pred_tokens, ref_tokens = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = collections.Counter(pred_tokens) & collections.Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD v1.1 F1: harmonic mean of token precision and recall after ``normalize_answer``."""
    return _best(_f1, prediction, references)


def squad_exact_match(prediction: str, references: Sequence[str]) -> float:
    """SQuAD v1.1 exact match: equal after ``normalize_answer``."""
    return _best(lambda p, r: float(normalize_answer(p) == normalize_answer(r)), prediction, references)


# ------------------------------------------------------------------ ROUGE-L
def _rouge_l(prediction: str, reference: str) -> float:
    if not prediction.strip() or not reference.strip():
        return float(prediction.strip() == reference.strip())
    # The functional form: the same numbers as the ``ROUGEScore`` module, without its per-call state
    # (the module keeps every score it has seen) and about 20x faster per pair.
    from torchmetrics.functional.text.rouge import rouge_score  # imported on first use: it loads slowly

    return float(rouge_score(prediction, reference, rouge_keys="rougeL")["rougeL_fmeasure"])


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (torchmetrics ``rouge_score``, ``rougeL``): the longest common token subsequence."""
    return _best(_rouge_l, prediction, references)


# ------------------------------------------------------------------ final number (GSM8K)
_NUMBER = re.compile(r"(?<![\w.])-?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def extract_final_number(text: str) -> str | None:
    """The final number of a text as a canonical string (``"1234"``, ``"-5"``, ``"18"``, ``"0.5"``), or None.

    The first number after the last ``####`` when the text has one (GSM8K's solutions end in ``#### 72``),
    else the last number in the text. Commas and ``$`` are dropped, and trailing zeros of the fraction
    (``18.00`` is ``18``); a ``-`` right after a letter or digit is a hyphen, not a sign (``5-3`` is 5 and 3).
    """
    after = text.rsplit("####", 1)[1] if "####" in text else ""
    found = _NUMBER.findall(after)
    if found:
        raw = found[0]
    else:
        found = _NUMBER.findall(text)
        if not found:
            return None
        raw = found[-1]
    raw = re.sub(r"[\s$,]", "", raw)
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    canonical = format(value.normalize(), "f")
    return "0" if canonical == "-0" else canonical


def final_number(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction's final number equals a reference's (numerically)."""
    predicted = extract_final_number(prediction)
    if predicted is None:
        return 0.0
    return _best(lambda _p, r: float(predicted == extract_final_number(r)), prediction, references)


METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "set_match": set_match,
    "token_f1": token_f1,
    "squad_exact_match": squad_exact_match,
    "rouge_l": rouge_l,
    "final_number": final_number,
}
