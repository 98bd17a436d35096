"""VQA accuracy: agreement of a predicted answer with the answers given by human annotators.

Each question comes with several human answers (ten in VQAv2). An answer counts as fully correct
once at least three annotators gave it, so for one question with human answers ``a_1 .. a_n``
(all normalised, see below) and normalised prediction ``p``:

    acc(p) = (1 / n) * sum_{i=1..n} min(1, #{j != i : a_j == p} / 3)

i.e. the score min(1, matches / 3) is computed against each of the ``n`` leave-one-out subsets of
the human answers (for n = 10, the 10-choose-9 subsets of the VQAv2 evaluation) and averaged.
Writing ``m`` for the number of human answers equal to ``p``, this is

    acc(p) = (m * min(1, (m - 1) / 3) + (n - m) * min(1, m / 3)) / n

so with ten answers: m = 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0. The same
leave-one-out average is used for any n >= 2 (with fewer than four answers a question cannot reach
1.0). With a single human answer there is nothing left after leaving one out, so the score is the
exact match of the normalised strings: 1.0 or 0.0. The metric is the mean of acc over questions.

Normalisation follows the VQAv2 evaluation and is always applied, to the prediction and to every
human answer alike (the official script skips it altogether when all human answers are identical,
a quirk that would score ``"Two"`` against ten ``"2"`` as 0; this module does not reproduce it):

1. lowercase; tabs and newlines become spaces; typographic quotes become ASCII ``'`` and ``"``;
2. a comma between two digits is dropped (``1,000`` -> ``1000``); a period is dropped unless a
   digit follows it (``3.5`` and ``.5`` keep theirs, ``dog.`` and ``u.s.`` lose them);
3. the punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` becomes a word break
   (``t-shirt`` -> ``t shirt``); other symbols (``:``, ``%``, ``$``, ``&``, ...) are kept;
4. per word: number words ``zero`` .. ``ten`` (and ``none``, as VQAv2 does for counting) become
   digits, the articles ``a``, ``an``, ``the`` are dropped, apostrophes at the ends of a word are
   trimmed, and common contractions written without their apostrophe are restored
   (``dont`` -> ``don't``, ``isnt`` -> ``isn't``, ...);
5. words are joined by single spaces.
"""

import re

import datasets
import evaluate

_DESCRIPTION = """\
Standard VQA accuracy: each prediction is scored against the human answers for its question as
the average, over leaving each human answer out in turn, of min(1, number of remaining human
answers equal to the prediction / 3), after VQAv2-style normalisation of all answers (lowercase,
punctuation handling, number words to digits, articles dropped, contractions restored). With a
single human answer the score is the exact match of the normalised strings. The result is the
mean over questions.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `str`): predicted answer of each question.
    references (`list` of `list` of `str`): the human answers of each question, in the same
        order as the predictions (ten per question in VQAv2; at least one).
Returns:
    vqa_accuracy (`float`): mean per-question VQA accuracy, in [0, 1].
    num_examples (`int`): number of questions scored.
Raises:
    ValueError: when there are no questions, predictions and references differ in length, or a
        question has no human answers.
Examples:
    >>> metric = evaluate.load("path/to/evals/metrics/vqa_accuracy")
    >>> answers = ["2"] * 4 + ["3"] * 6
    >>> metric.compute(predictions=["Two"], references=[answers])
    {'vqa_accuracy': 1.0, 'num_examples': 1}
"""

# Annotators needed for full credit.
_FULL_CREDIT_MATCHES = 3

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions as annotators often type them, without the apostrophe.
_CONTRACTIONS = {
    word.replace("'", ""): word
    for word in (
        "aren't can't couldn't didn't doesn't don't hadn't hasn't haven't isn't mightn't mustn't "
        "shouldn't wasn't weren't won't wouldn't i'm i've you're you've we're we've they're they've "
        "he's she's that's there's what's where's who's let's y'all"
    ).split()
}
# "wont" and "hes"/"shes"/"lets" are real words too, but in VQA answers they are typos far more
# often than not; "its"/"were"/"well" are left alone because they are common words.

_WORD_BREAKS = ';/[]"{}()=+\\_-><@`,?!'
_WORD_BREAK_TABLE = str.maketrans({char: " " for char in _WORD_BREAKS})
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"\.(?!\d)")
_TYPOGRAPHIC_QUOTES = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"'}
)


def normalize_vqa_answer(text: str) -> str:
    """Normalise one answer the VQAv2 way (see the module docstring for the steps)."""
    text = text.lower().translate(_TYPOGRAPHIC_QUOTES)
    text = _DIGIT_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    words = []
    for word in text.translate(_WORD_BREAK_TABLE).split():
        word = word.strip("'")
        if not word or word in _ARTICLES:
            continue
        word = _NUMBER_WORDS.get(word, word)
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def question_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one already-normalised prediction against its normalised human answers."""
    num_answers = len(answers)
    matches = sum(answer == prediction for answer in answers)
    if num_answers == 1:
        return float(matches)
    # Leaving out a matching answer leaves matches - 1 matches, leaving out another one leaves all.
    total = sum(min(1.0, (matches - (answer == prediction)) / _FULL_CREDIT_MATCHES) for answer in answers)
    return total / num_answers


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.List(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references):
        num_examples = len(predictions)
        if num_examples != len(references):
            raise ValueError(
                f"vqa_accuracy needs one list of human answers per prediction; got {num_examples} "
                f"prediction(s) and {len(references)} answer list(s)"
            )
        if num_examples == 0:
            raise ValueError("vqa_accuracy needs at least one question; got empty predictions and references")
        total = 0.0
        for index, (prediction, answers) in enumerate(zip(predictions, references, strict=True)):
            if prediction is None:
                raise ValueError(f"vqa_accuracy got None as the prediction of question {index}")
            if not answers:
                raise ValueError(
                    f"vqa_accuracy needs at least one human answer per question; question {index} has none"
                )
            if any(answer is None for answer in answers):
                raise ValueError(f"vqa_accuracy got None among the human answers of question {index}")
            total += question_accuracy(
                normalize_vqa_answer(prediction), [normalize_vqa_answer(answer) for answer in answers]
            )
        return {"vqa_accuracy": total / num_examples, "num_examples": num_examples}
