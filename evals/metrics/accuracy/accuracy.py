"""Classification accuracy: the fraction of examples whose predicted label equals the reference.

Labels are integer class ids; every example weighs the same.
"""

import datasets
import evaluate

_DESCRIPTION = """\
Accuracy of a classifier: the number of examples whose predicted class id equals the reference
class id, divided by the number of examples. Both inputs are integer class ids, one per example.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `int`): predicted class id of each example.
    references (`list` of `int`): true class id of each example, in the same order.
Returns:
    accuracy (`float`): mean of (prediction == reference) over the examples, in [0, 1].
    num_examples (`int`): number of examples scored.
Raises:
    ValueError: when there are no examples, or predictions and references differ in length.
Examples:
    >>> metric = evaluate.load("path/to/evals/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75, 'num_examples': 4}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references):
        num_examples = len(predictions)
        if num_examples != len(references):
            raise ValueError(
                f"accuracy needs one reference per prediction; got {num_examples} prediction(s) "
                f"and {len(references)} reference(s)"
            )
        if num_examples == 0:
            raise ValueError("accuracy needs at least one example; got empty predictions and references")
        correct = sum(int(pred) == int(ref) for pred, ref in zip(predictions, references, strict=True))
        return {"accuracy": correct / num_examples, "num_examples": num_examples}
