"""Retained performance: how much of the original model's score a pruned model keeps, per task.

For a task where a higher score is better (accuracy, F1, ...) the retained fraction is
``pruned / original``; where a lower score is better (perplexity, loss, error rate) it is
``original / pruned``, so that in both cases 1.0 means "as good as before", values below 1.0 mean
a loss and values above 1.0 an improvement. The headline figure is the unweighted mean over tasks.
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Retained performance of a pruned model relative to the original model, averaged over tasks.

Each row is one task: the pruned model's score and the original model's score on it. The
per-task retained fraction is pruned / original when a higher score is better and
original / pruned when a lower score is better (e.g. perplexity); 1.0 means no change. The
result is the arithmetic mean of the per-task fractions, every task weighing the same. Scores
must be finite and non-negative, and the denominator of each ratio must be non-zero.
"""

_KWARGS_DESCRIPTION = """\
Args:
    pruned (`list` of `float`): score of the pruned model on each task.
    original (`list` of `float`): score of the original model on each task, in the same order.
    higher_is_better (`bool` or `list` of `bool`, defaults to `True`): whether a higher score is
        better, for all tasks at once or one flag per task (in the order the rows were added).
Returns:
    retained (`float`): mean over tasks of the retained fraction.
    per_task (`list` of `float`): the retained fraction of each task, in row order.
    num_tasks (`int`): number of tasks.
Raises:
    ValueError: when there are no tasks, pruned and original differ in length, the flags do not
        match the tasks, a score is negative or not finite, an original score is 0, or a pruned
        score is 0 on a task where lower is better.
Examples:
    >>> metric = evaluate.load("path/to/evals/metrics/retained_performance")
    >>> metric.compute(pruned=[0.6, 12.0], original=[0.8, 10.0], higher_is_better=[True, False])
    {'retained': 0.7916666666666666, 'per_task': [0.7499999999999999, 0.8333333333333334], 'num_tasks': 2}
"""


def _is_flag(value) -> bool:
    # numpy booleans are not ``bool`` instances but carry the same meaning.
    return isinstance(value, (bool, np.bool_))


def _per_task_flags(higher_is_better, num_tasks: int) -> list[bool]:
    if _is_flag(higher_is_better):
        return [bool(higher_is_better)] * num_tasks
    not_a_list = ValueError(f"higher_is_better must be a bool or a list of bools, got {higher_is_better!r}")
    if isinstance(higher_is_better, (str, bytes, dict)):
        raise not_a_list
    try:
        flags = list(higher_is_better)
    except TypeError:
        raise not_a_list from None
    if len(flags) != num_tasks:
        raise ValueError(
            f"higher_is_better has {len(flags)} flag(s) but there are {num_tasks} task(s); "
            "pass one bool per task, or a single bool for all of them"
        )
    for index, flag in enumerate(flags):
        if not _is_flag(flag):
            raise ValueError(f"higher_is_better[{index}] must be a bool, got {flag!r}")
    return [bool(flag) for flag in flags]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetainedPerformance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "pruned": datasets.Value("float64"),
                    "original": datasets.Value("float64"),
                }
            ),
        )

    def _compute(self, pruned, original, higher_is_better=True):
        num_tasks = len(pruned)
        if num_tasks != len(original):
            raise ValueError(
                f"retained_performance needs one original score per pruned score; got {num_tasks} "
                f"pruned and {len(original)} original score(s)"
            )
        if num_tasks == 0:
            raise ValueError("retained_performance needs at least one task; got empty pruned and original")
        flags = _per_task_flags(higher_is_better, num_tasks)
        per_task = []
        for index, (pruned_score, original_score, higher) in enumerate(
            zip(pruned, original, flags, strict=True)
        ):
            for name, score in (("pruned", pruned_score), ("original", original_score)):
                if score is None or not math.isfinite(score) or score < 0:
                    raise ValueError(
                        f"retained_performance needs finite, non-negative scores; task {index} has "
                        f"{name}={score!r}"
                    )
            if original_score == 0:
                raise ValueError(
                    f"original score of task {index} is 0: retained performance is undefined relative "
                    "to a zero baseline"
                )
            if higher:
                per_task.append(pruned_score / original_score)
            else:
                if pruned_score == 0:
                    raise ValueError(
                        f"pruned score of task {index} is 0 where lower is better: original / pruned is "
                        "undefined"
                    )
                per_task.append(original_score / pruned_score)
        return {"retained": math.fsum(per_task) / num_tasks, "per_task": per_task, "num_tasks": num_tasks}
