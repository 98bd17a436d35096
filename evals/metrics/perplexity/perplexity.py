"""Corpus perplexity from per-window negative log-likelihood sums.

The model forward pass happens elsewhere (see ``hf_prune.evals.perplexity``); this module only
aggregates, so that the figure is token-weighted across windows of unequal length rather than an
average of per-window perplexities.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """\
Perplexity of a causal language model over a corpus, aggregated from per-window statistics.

Each prediction is one evaluation window (or one batch of windows, since the statistics are
additive): the summed negative log-likelihood (natural log, nats) of the tokens the model predicted
in it, and the number of those tokens. The corpus
perplexity is exp(sum of nll_sum / sum of num_tokens), i.e. every predicted token weighs the same
regardless of which window it came from.
"""

_KWARGS_DESCRIPTION = """\
Args:
    nll_sum (`list` of `float`): summed negative log-likelihood, in nats, over the predicted
        tokens of each window.
    num_tokens (`list` of `int`): number of predicted tokens in each window (for a causal LM
        with shifted labels this is the window length minus one).
Returns:
    perplexity (`float`): exp(total nll / total tokens).
    mean_nll (`float`): total nll / total tokens, in nats per token.
    num_tokens (`int`): total predicted tokens.
Examples:
    >>> metric = evaluate.load("path/to/evals/metrics/perplexity")
    >>> result = metric.compute(nll_sum=[2.0, 3.0], num_tokens=[1, 2])
    >>> round(result["perplexity"], 4)
    5.2945
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "nll_sum": datasets.Value("float64"),
                    "num_tokens": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, nll_sum, num_tokens):
        total_tokens = int(sum(num_tokens))
        if total_tokens <= 0:
            raise ValueError(
                f"perplexity needs at least one predicted token; got {len(num_tokens)} window(s) "
                f"with {total_tokens} tokens in total"
            )
        # math.fsum keeps the total exact-ish even over many windows.
        mean_nll = math.fsum(float(value) for value in nll_sum) / total_tokens
        return {
            "perplexity": math.exp(mean_nll),
            "mean_nll": mean_nll,
            "num_tokens": total_tokens,
        }
