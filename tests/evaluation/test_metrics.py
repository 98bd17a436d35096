"""The metric modules shipped under ``evals/metrics``, checked against hand-computed values."""

import math
import sys

import numpy as np
import pytest
from hf_prune.evals.metrics import load_metric, shipped_metric_names

SHIPPED = ["accuracy", "exact_match", "perplexity", "retained_performance", "vqa_accuracy"]

# evaluate's own length check runs before the module's, with its own wording.
MISMATCH = r"Mismatch in the number of|one .* per "


def module_of(metric):
    """The Python module evaluate imported a metric script as (for its helper functions)."""
    return sys.modules[type(metric).__module__]


# --- loading -----------------------------------------------------------------------------------


def test_all_metrics_are_shipped():
    assert shipped_metric_names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_load_metric_finds_each_shipped_metric(name):
    metric = load_metric(name)
    assert metric.name == name
    assert metric.info.description.strip()
    assert metric.info.inputs_description.strip()
    assert metric.info.features


def test_unknown_metric_lists_all_shipped_ones():
    with pytest.raises(ValueError, match="shipped metrics: " + ", ".join(SHIPPED)):
        load_metric("bleu")


# --- accuracy ----------------------------------------------------------------------------------


def test_accuracy_matches_hand_computation():
    result = load_metric("accuracy").compute(predictions=[0, 1, 2, 1, 3], references=[0, 1, 1, 1, 2])
    assert result == {"accuracy": pytest.approx(3 / 5), "num_examples": 5}


def test_accuracy_extremes_and_numpy_input():
    metric = load_metric("accuracy")
    assert metric.compute(predictions=[4, 4], references=[4, 4])["accuracy"] == 1.0
    assert metric.compute(predictions=np.array([0, 1]), references=np.array([1, 0]))["accuracy"] == 0.0


def test_accuracy_accumulates_batches():
    metric = load_metric("accuracy")
    metric.add_batch(predictions=[1, 0], references=[1, 1])
    metric.add_batch(predictions=[2], references=[2])
    assert metric.compute() == {"accuracy": pytest.approx(2 / 3), "num_examples": 3}


def test_accuracy_rejects_empty_and_mismatched_input():
    metric = load_metric("accuracy")
    with pytest.raises(ValueError, match="at least one example"):
        metric.compute(predictions=[], references=[])
    with pytest.raises(ValueError, match=MISMATCH):
        load_metric("accuracy").compute(predictions=[1, 2], references=[1])
    with pytest.raises(ValueError, match="one reference per prediction"):
        load_metric("accuracy")._compute(predictions=[1, 2], references=[1])


# --- exact_match -------------------------------------------------------------------------------


def test_exact_match_normalises_by_default():
    predictions = ["Paris.", "  New \t York ", '"Blue!"', "rock-and-roll", "3.5", "cat"]
    references = ["paris", "new york", "blue", "rock and roll", "3.5", "dog"]
    result = load_metric("exact_match").compute(predictions=predictions, references=references)
    # Matches: Paris./paris, New York, "Blue!"/blue, 3.5; inner hyphens and cat/dog do not.
    assert result == {"exact_match": pytest.approx(4 / 6), "num_examples": 6}


def test_exact_match_without_normalisation_is_verbatim():
    metric = load_metric("exact_match")
    result = metric.compute(
        predictions=["Paris.", "paris", " x"], references=["paris", "paris", "x"], normalize=False
    )
    assert result == {"exact_match": pytest.approx(1 / 3), "num_examples": 3}


def test_exact_match_normalise_helper():
    normalize = module_of(load_metric("exact_match")).normalize_answer
    assert normalize("  ¿Qué   PASA?  ") == "qué pasa"
    assert normalize("...the end...") == "the end"
    assert normalize("U.S.") == "u.s"
    assert normalize("!!!") == ""


def test_exact_match_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one example"):
        load_metric("exact_match").compute(predictions=[], references=[])
    with pytest.raises(ValueError, match=MISMATCH):
        load_metric("exact_match").compute(predictions=["a"], references=["a", "b"])
    with pytest.raises(ValueError, match="one reference per prediction"):
        load_metric("exact_match")._compute(predictions=["a"], references=["a", "b"])
    with pytest.raises(ValueError, match="normalize must be True or False"):
        load_metric("exact_match").compute(predictions=["a"], references=["a"], normalize="yes")
    with pytest.raises(ValueError, match="None in predictions at index 1"):
        load_metric("exact_match").compute(predictions=["a", None], references=["a", "b"])


# --- vqa_accuracy ------------------------------------------------------------------------------


def vqa_score(prediction, answers):
    return load_metric("vqa_accuracy").compute(predictions=[prediction], references=[answers])["vqa_accuracy"]


def test_vqa_leave_one_out_scores_by_hand():
    # Ten answers, m of them equal to the prediction. Leaving out one of the m matching answers
    # leaves m - 1 matches, leaving out one of the 10 - m others leaves m; each subset scores
    # min(1, matches / 3) and the ten subsets are averaged.
    others = ["cat"] * 10
    assert vqa_score("dog", others) == 0.0
    # m = 1: (1 * 0 + 9 * 1/3) / 10
    assert vqa_score("dog", ["dog"] + others[:9]) == pytest.approx(0.3)
    # m = 2: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 0.6
    assert vqa_score("dog", ["dog"] * 2 + others[:8]) == pytest.approx(0.6)
    # m = 3: (3 * 2/3 + 7 * 1) / 10 = 0.9 -- the leave-one-out average falls short of 1.0 here
    assert vqa_score("dog", ["dog"] * 3 + others[:7]) == pytest.approx(0.9)
    # m = 4: every subset of nine keeps at least three matches
    assert vqa_score("dog", ["dog"] * 4 + others[:6]) == 1.0
    assert vqa_score("dog", ["dog"] * 10) == 1.0


def test_vqa_fewer_answers_use_the_same_average():
    # Three answers, two matching: (2 * min(1, 1/3) + 1 * min(1, 2/3)) / 3 = (2/3 + 2/3) / 3
    assert vqa_score("dog", ["dog", "dog", "cat"]) == pytest.approx(4 / 9)
    # Five answers, four matching: (4 * 1 + 1 * 1) / 5
    assert vqa_score("dog", ["dog"] * 4 + ["cat"]) == 1.0


def test_vqa_single_answer_is_normalised_exact_match():
    assert vqa_score("Dog!", ["dog"]) == 1.0
    assert vqa_score("cat", ["dog"]) == 0.0


def test_vqa_normalisation_by_hand():
    # Each prediction matches 4 of the 10 answers only after normalisation.
    cases = [
        ("Two", "2"),  # digit words
        ("2", "two"),
        ("a dog", "dog"),  # articles
        ("The Dog", "dog"),
        ("dog.", "dog"),  # trailing period
        ("yes!", "yes"),  # punctuation
        ("t-shirt", "t shirt"),
        ("1,000", "1000"),  # thousands separator
        ("dont", "don't"),  # contraction
        ("don\u2019t", "don't"),
        ("  Red\tcar\n", "red car"),
    ]
    for prediction, answer in cases:
        assert vqa_score(prediction, [answer] * 4 + ["other"] * 6) == 1.0, (prediction, answer)
    # A decimal point is not punctuation, and numbers are not rounded.
    assert vqa_score("3.5", ["35"] * 10) == 0.0
    assert vqa_score("3.5", ["3.5"] * 10) == 1.0


def test_vqa_normalise_helper():
    normalize = module_of(load_metric("vqa_accuracy")).normalize_vqa_answer
    assert normalize("The TWO Dogs.") == "2 dogs"
    assert normalize("an apple, a pear") == "apple pear"
    assert normalize("none") == "0"
    assert normalize(".5") == ".5"
    assert normalize("u.s.a.") == "usa"
    assert normalize("10:30") == "10:30"
    assert normalize("\u201cyes\u201d") == "yes"
    assert normalize("'yes'") == "yes"
    assert normalize("dog's bowl") == "dog's bowl"


def test_vqa_mean_over_questions():
    metric = load_metric("vqa_accuracy")
    result = metric.compute(
        predictions=["Two", "a dog", "cat"],
        references=[["2"] * 4 + ["3"] * 6, ["dog"] * 2 + ["cat"] * 8, ["dog"]],
    )
    assert result == {"vqa_accuracy": pytest.approx((1.0 + 0.6 + 0.0) / 3), "num_examples": 3}


def test_vqa_accumulates_batches():
    metric = load_metric("vqa_accuracy")
    metric.add_batch(predictions=["yes"], references=[["yes"] * 10])
    metric.add_batch(predictions=["no"], references=[["no"] + ["yes"] * 9])
    assert metric.compute() == {"vqa_accuracy": pytest.approx((1.0 + 0.3) / 2), "num_examples": 2}


def test_vqa_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one question"):
        load_metric("vqa_accuracy").compute(predictions=[], references=[])
    with pytest.raises(ValueError, match=MISMATCH):
        load_metric("vqa_accuracy").compute(predictions=["a", "b"], references=[["a"]])
    with pytest.raises(ValueError, match="one list of human answers per prediction"):
        load_metric("vqa_accuracy")._compute(predictions=["a", "b"], references=[["a"]])
    with pytest.raises(ValueError, match="question 1 has none"):
        load_metric("vqa_accuracy").compute(predictions=["a", "b"], references=[["a"], []])


# --- retained_performance ----------------------------------------------------------------------


def test_retained_higher_is_better_by_default():
    result = load_metric("retained_performance").compute(pruned=[0.6, 0.9], original=[0.8, 0.9])
    assert result["per_task"] == pytest.approx([0.75, 1.0])
    assert result["retained"] == pytest.approx(0.875)
    assert result["num_tasks"] == 2


def test_retained_lower_is_better_inverts_the_ratio():
    # Perplexity 10 -> 12.5 keeps 10 / 12.5 = 0.8 of the performance.
    result = load_metric("retained_performance").compute(
        pruned=[12.5], original=[10.0], higher_is_better=False
    )
    assert result == {"retained": pytest.approx(0.8), "per_task": [pytest.approx(0.8)], "num_tasks": 1}


def test_retained_per_task_flags():
    metric = load_metric("retained_performance")
    result = metric.compute(
        pruned=[0.6, 12.0, 0.0], original=[0.8, 10.0, 0.5], higher_is_better=[True, False, True]
    )
    assert result["per_task"] == pytest.approx([0.75, 10 / 12, 0.0])
    assert result["retained"] == pytest.approx((0.75 + 10 / 12 + 0.0) / 3)
    assert result["num_tasks"] == 3
    numpy_flags = metric.compute(
        pruned=[0.6, 12.0], original=[0.8, 10.0], higher_is_better=np.array([True, False])
    )
    assert numpy_flags["per_task"] == pytest.approx([0.75, 10 / 12])


def test_retained_accumulates_batches_in_row_order():
    metric = load_metric("retained_performance")
    metric.add_batch(pruned=[1.0], original=[2.0])
    metric.add_batch(pruned=[20.0, 3.0], original=[10.0, 3.0])
    result = metric.compute(higher_is_better=[True, False, True])
    assert result["per_task"] == pytest.approx([0.5, 0.5, 1.0])
    assert result["retained"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("pruned", "original", "kwargs", "message"),
    [
        ([], [], {}, "at least one task"),
        ([1.0, 2.0], [1.0], {}, MISMATCH),
        ([1.0], [0.0], {}, "original score of task 0 is 0"),
        ([1.0, 1.0], [1.0, 0.0], {"higher_is_better": False}, "original score of task 1 is 0"),
        ([0.0], [5.0], {"higher_is_better": False}, "pruned score of task 0 is 0 where lower is better"),
        ([1.0], [-2.0], {}, "non-negative"),
        ([math.nan], [1.0], {}, "finite"),
        ([1.0], [math.inf], {}, "finite"),
        ([1.0, 1.0], [1.0, 1.0], {"higher_is_better": [True]}, "1 flag.* 2 task"),
        ([1.0], [1.0], {"higher_is_better": "yes"}, "bool or a list of bools"),
        ([1.0], [1.0], {"higher_is_better": None}, "bool or a list of bools"),
        ([1.0], [1.0], {"higher_is_better": [1]}, r"higher_is_better\[0\] must be a bool"),
    ],
)
def test_retained_rejects_bad_input(pruned, original, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_metric("retained_performance").compute(pruned=pruned, original=original, **kwargs)


def test_retained_own_length_check():
    with pytest.raises(ValueError, match="one original score per pruned score"):
        load_metric("retained_performance")._compute(pruned=[1.0, 2.0], original=[1.0])
