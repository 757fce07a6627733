"""Generation metrics against hand-checked answers (mosld.evaluation.metrics)."""

import pytest

from mosld.evaluation import METRICS, extract_final_number, score_generations
from mosld.evaluation.metrics import (
    exact_match,
    final_number,
    normalize_answer,
    rouge_l,
    set_match,
    squad_exact_match,
    token_f1,
)

# (prediction, references, SQuAD v1.1 F1, SQuAD v1.1 EM), each worked out by hand
SQUAD_CASES = [
    ("the cat", ["cat"], 1.0, 1.0),  # article dropped
    ("A cat sat.", ["the cat sat"], 1.0, 1.0),  # article and punctuation
    ("cat sat on mat", ["the cat sat"], 2 / 3, 0.0),  # P 2/4, R 2/2
    ("Paris", ["London", "paris"], 1.0, 1.0),  # several references: the best
    ("", ["Paris"], 0.0, 0.0),  # empty prediction
    ("the", ["a"], 0.0, 1.0),  # both normalise to "": v1.1's EM is 1, its F1 0 (no tokens)
    ("New York City", ["new york"], 0.8, 0.0),  # P 2/3, R 1
    ("one two three four", ["two four six"], 4 / 7, 0.0),  # P 1/2, R 2/3
    ("the the cat cat", ["cat"], 2 / 3, 0.0),  # multiset: one "cat" shared, P 1/2, R 1
    ("cat cat dog", ["cat dog dog"], 2 / 3, 0.0),  # overlap min(2,1) + min(1,2) = 2 of 3
    ("U.S.A.", ["USA"], 1.0, 1.0),  # punctuation removed inside words
    ("don't", ["dont"], 1.0, 1.0),
    ("blue whale", ["whale", "the blue whale", "shark"], 1.0, 1.0),
    ("blue", ["blue whale", "blue shark fin"], 2 / 3, 0.0),  # best of 2/3 and 1/2
    ("well-known", ["well known"], 0.0, 0.0),  # the hyphen is removed, not made a space
    ("An answer", ["answer"], 1.0, 1.0),
    ("the anthem", ["anthem"], 1.0, 1.0),  # "an" inside a word stays
    ("  Barack   Obama \n", ["barack obama"], 1.0, 1.0),  # whitespace
    ("1,000", ["1000"], 1.0, 1.0),
    ("Denver Broncos", ["Denver Broncos", "The Denver Broncos", "Broncos"], 1.0, 1.0),
    ("Carolina Panthers won", ["Carolina Panthers"], 0.8, 0.0),  # P 2/3, R 1
    ("Broncos", ["Denver Broncos"], 2 / 3, 0.0),  # P 1, R 1/2
    ("Santa Clara, California", ["Levi's Stadium", "Santa Clara"], 0.8, 0.0),  # P 2/3, R 1 on the second
    ("nothing in common", ["completely different"], 0.0, 0.0),
]


@pytest.mark.parametrize(("prediction", "references", "f1", "em"), SQUAD_CASES)
def test_squad_token_f1_and_exact_match(prediction, references, f1, em):
    assert token_f1(prediction, references) == pytest.approx(f1)
    assert squad_exact_match(prediction, references) == em


def test_enough_hand_checked_squad_cases():
    assert len(SQUAD_CASES) >= 20


def test_normalize_answer_as_squad():
    assert normalize_answer("The  Quick, brown-fox!  an apple") == "quick brownfox apple"


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Bathroom.", "bathroom", 1.0),  # case and a trailing period
        ("  hallway \n", "hallway", 1.0),
        ("the bathroom", "bathroom", 0.0),  # exact match keeps articles
        ("kitchen garden", "kitchen  garden", 1.0),
        ("kitchen, garden", "kitchen,garden", 0.0),  # a list only matches as a set (set_match)
        ("yes", "no", 0.0),
    ],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, [reference]) == expected


def test_exact_match_max_over_references():
    assert exact_match("north", ["south", "North"]) == 1.0
    assert exact_match("north", []) == 0.0


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("football, apple", "apple,football", 1.0),  # bAbI qa8: any order
        ("apple,football", "apple,football", 1.0),
        ("Apple, Football.", "apple,football", 1.0),
        ("milk,apple,football", "football,milk,apple", 1.0),
        ("apple", "apple,football", 0.0),
        ("apple, football, milk", "apple,football", 0.0),
        ("nothing", "nothing", 1.0),  # bAbI's empty list
        ("football", "nothing", 0.0),
    ],
)
def test_set_match_babi_lists(prediction, reference, expected):
    assert set_match(prediction, [reference]) == expected


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("1,234", "1234"),
        ("-5", "-5"),
        ("18.0", "18"),
        ("18.00", "18"),
        ("$18", "18"),
        ("The answer is 18.", "18"),
        ("#### 72", "72"),
        ("She pays 3 + 4 = 7 dollars.\n#### 7", "7"),
        ("48/2 = 24 clips in May. 48+24 = 72 clips.", "72"),  # no ####: the last number
        ("It costs $1,234,567.", "1234567"),
        ("The temperature is -3.50 degrees", "-3.5"),
        ("5-3=2", "2"),  # a hyphen after a digit is not a sign
        ("#### 1,000.00 then 3 more", "1000"),  # the number right after ####
        ("0.5", "0.5"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_final_number_gsm8k(text, number):
    assert extract_final_number(text) == number


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The answer is 18.", "18", 1.0),
        ("18.0", "18", 1.0),
        ("$1,234", "1234", 1.0),
        ("so -5", "-5", 1.0),
        ("5", "-5", 0.0),
        ("17", "18", 0.0),
        ("I don't know", "18", 0.0),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", 1.0),
    ],
)
def test_final_number(prediction, reference, expected):
    assert final_number(prediction, [reference]) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS 5 of 6 both ways
        ("a b c d", "a c", 2 / 3),  # LCS 2: P 2/4, R 2/2
        ("a b c", "c b a", 1 / 3),  # LCS 1
        ("x y", "a b", 0.0),
        ("The Cat!", "the cat", 1.0),  # lower-cased, punctuation dropped
        ("", "a b", 0.0),
    ],
)
def test_rouge_l_known_values(prediction, reference, expected):
    assert rouge_l(prediction, [reference]) == pytest.approx(expected, abs=1e-4)


def test_rouge_l_max_over_references():
    assert rouge_l("a b c d", ["x", "a c", "a b c d"]) == pytest.approx(1.0)


GOLD = {
    "exact_match": ["bathroom", "Denver Broncos", "The cat sat on the mat.", "42"],
    "set_match": ["apple,football", "nothing", "milk"],
    "token_f1": ["Denver Broncos", "The cat sat on the mat.", "42", "U.S.A."],
    "squad_exact_match": ["Denver Broncos", "The cat sat on the mat.", "42", "the"],
    "rouge_l": ["Denver Broncos", "The cat sat on the mat.", "42"],
    "final_number": ["42", "1,234", "-5", "Natalia sold 48/2 = 24 clips in May.\n#### 72", "0.5"],
}


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_gold_as_prediction_scores_one(metric):
    golds = GOLD[metric]
    assert score_generations(golds, [[g] for g in golds], metric) == [1.0] * len(golds)


def test_score_generations_checks_its_arguments():
    with pytest.raises(ValueError, match="unknown generation metric 'bleu'"):
        score_generations(["a"], [["a"]], "bleu")
    with pytest.raises(ValueError, match="1 texts but 2"):
        score_generations(["a"], [["a"], ["b"]], "exact_match")
    assert score_generations(["B", "c"], [["b"], ["d"]], "exact_match") == [1.0, 0.0]


def test_every_floor_names_the_same_metrics():
    # the data floor checks names without importing evaluation; the records rank the same names as headlines
    from mosld.data.generation import METRIC_NAMES
    from mosld.evaluation.metrics import METRICS
    from mosld.experiments.metrics import GENERATION_METRICS

    assert set(METRIC_NAMES) == set(METRICS) == set(GENERATION_METRICS)
