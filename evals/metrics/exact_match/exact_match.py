"""Exact string match between generated answers and reference answers, after light normalisation.

Normalisation (on by default) makes the comparison insensitive to case, to surrounding or repeated
whitespace and to punctuation wrapped around the answer, so ``"Paris."`` matches ``"paris"``;
punctuation inside the answer (``"3.5"``, ``"rock-and-roll"``) still has to match.
"""

import unicodedata

import datasets
import evaluate

_DESCRIPTION = """\
Exact match: the fraction of examples whose predicted string equals the reference string.

With `normalize=True` (the default) both strings are first normalised: lowercased (Unicode case
folding), every run of whitespace collapsed to a single space, and leading and trailing
whitespace and punctuation (any Unicode punctuation character) removed. With `normalize=False`
the strings are compared verbatim.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `str`): predicted answer of each example.
    references (`list` of `str`): reference answer of each example, in the same order.
    normalize (`bool`, defaults to `True`): normalise both strings before comparing them.
Returns:
    exact_match (`float`): fraction of examples whose (normalised) strings are equal, in [0, 1].
    num_examples (`int`): number of examples scored.
Raises:
    ValueError: when there are no examples, or predictions and references differ in length.
Examples:
    >>> metric = evaluate.load("path/to/evals/metrics/exact_match")
    >>> metric.compute(predictions=["Paris.", "  New   York"], references=["paris", "new york city"])
    {'exact_match': 0.5, 'num_examples': 2}
"""


def _is_edge_junk(char: str) -> bool:
    """Whitespace or punctuation, which normalisation trims from both ends of an answer."""
    return char.isspace() or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """Case-fold, collapse whitespace and trim surrounding whitespace and punctuation."""
    collapsed = " ".join(text.casefold().split())
    start, end = 0, len(collapsed)
    while start < end and _is_edge_junk(collapsed[start]):
        start += 1
    while end > start and _is_edge_junk(collapsed[end - 1]):
        end -= 1
    return collapsed[start:end]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, predictions, references, normalize=True):
        num_examples = len(predictions)
        if num_examples != len(references):
            raise ValueError(
                f"exact_match needs one reference per prediction; got {num_examples} prediction(s) "
                f"and {len(references)} reference(s)"
            )
        if num_examples == 0:
            raise ValueError("exact_match needs at least one example; got empty predictions and references")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        for name, values in (("predictions", predictions), ("references", references)):
            missing = [index for index, value in enumerate(values) if value is None]
            if missing:
                raise ValueError(f"exact_match got None in {name} at index {missing[0]}; expected strings")

        def prepare(text):
            return normalize_answer(text) if normalize else text

        matches = sum(
            prepare(pred) == prepare(ref) for pred, ref in zip(predictions, references, strict=True)
        )
        return {"exact_match": matches / num_examples, "num_examples": num_examples}
