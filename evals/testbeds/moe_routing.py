"""Routing diagnostics for a Mixtral-style MoE: how tokens spread over experts, and whether usage means importance.

Used by ``moe_testbed`` to decide whether a trained testbed is fit for expert pruning: per-layer load
and router entropy per domain (:func:`routing_report`), perplexity after masking the most- vs the
least-used experts out of routing (:func:`ablation_check`), and the pass/fail thresholds
(:func:`usability_checks`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..perplexity import perplexity_of_tokens

#: Window length of every forward pass here (the testbed's training length).
SEQ_LEN = 128

# Usability checks recorded in testbed.json.
MAX_EXPERT_LOAD = 0.40
MIN_NORMALISED_LOAD_ENTROPY = 0.75  # load entropy / ln(num_experts)
MIN_ABLATION_RATIO = 1.10  # perplexity(most-used removed) / perplexity(least-used removed), every domain


def token_stream(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """BOS + the tokens of ``text`` (encoded line by line: fast, and identical for a byte-level BPE)."""
    backend = tokenizer.backend_tokenizer
    lines = text.split("\n")
    pieces = [line + "\n" for line in lines[:-1]] + [lines[-1]]
    ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0]
    for encoding in backend.encode_batch(pieces, add_special_tokens=False):
        ids.extend(encoding.ids)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


def _moe_blocks(model: Any) -> list[Any]:
    """The MoE blocks (``layer.mlp`` with a ``gate`` router) of a Mixtral-style model, in layer order."""
    blocks = [layer.mlp for layer in model.model.layers]
    if not all(hasattr(block, "gate") and hasattr(block.gate, "top_k") for block in blocks):
        raise TypeError(
            f"{type(model).__name__}: expected Mixtral-style MoE layers (layer.mlp.gate with top_k)"
        )
    return blocks


def _windows(tokens: torch.Tensor, seq_len: int, batch_size: int = 16) -> list[torch.Tensor]:
    """Non-overlapping windows of ``tokens`` (the shorter tail alone), batched by equal length."""
    full = len(tokens) // seq_len
    batches = [
        tokens[: full * seq_len].view(full, seq_len)[i : i + batch_size] for i in range(0, full, batch_size)
    ]
    if len(tokens) - full * seq_len >= 2:
        batches.append(tokens[full * seq_len :][None])
    return batches


@torch.no_grad()
def _routing_counts(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per layer: top-k assignment counts per expert, summed router entropy, and the token count."""
    blocks = _moe_blocks(model)
    num_experts = blocks[0].gate.weight.shape[0]
    counts = torch.zeros(len(blocks), num_experts, dtype=torch.float64)
    entropy = torch.zeros(len(blocks), dtype=torch.float64)

    def make_hook(index: int):
        def hook(module, args, output):
            logits, _, indices = output
            log_probs = logits.float().log_softmax(dim=-1)
            entropy[index] += -(log_probs.exp() * log_probs).nan_to_num().sum(dim=-1).double().sum()
            counts[index] += torch.bincount(indices.reshape(-1), minlength=num_experts).double()

        return hook

    handles = [block.gate.register_forward_hook(make_hook(i)) for i, block in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for batch in _windows(tokens, SEQ_LEN):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return counts, entropy, len(tokens)


def _entropy(distribution: torch.Tensor) -> float:
    p = distribution[distribution > 0]
    return float(-(p * p.log()).sum())


def routing_report(model: Any, tokenizer: Any, texts: Mapping[str, str], *, max_tokens: int = 4096) -> dict:
    """How a Mixtral-style model routes the first ``max_tokens`` tokens of each text.

    Returns ``{"num_experts", "top_k", "tokens": {domain: n}, "layers": [...]}`` with, per layer:
    ``load`` (fraction of all top-k assignments per expert, over every domain's tokens; sums to 1),
    ``max_load``, ``min_load``, ``load_entropy`` (nats, entropy of ``load``; ln E when uniform),
    ``normalised_load_entropy`` (divided by ln E), ``router_entropy`` (mean over tokens of the entropy of
    the router's softmax over all experts, nats), ``per_domain_load`` ({domain: load on that domain}),
    ``per_domain_top_experts`` (the top-k experts of each domain) and ``domain_load_distance``
    ({domain: total-variation distance between its load and the overall load}: 0 = no specialisation).
    """
    blocks = _moe_blocks(model)
    num_experts = blocks[0].gate.weight.shape[0]
    top_k = int(blocks[0].gate.top_k)
    per_domain: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for domain, text in texts.items():
        per_domain[domain] = _routing_counts(model, token_stream(tokenizer, text, max_tokens))
    total_counts = sum(counts for counts, _, _ in per_domain.values())
    total_entropy = sum(entropy for _, entropy, _ in per_domain.values())
    total_tokens = sum(n for _, _, n in per_domain.values())
    layers = []
    for index in range(len(blocks)):
        load = total_counts[index] / total_counts[index].sum()
        domain_load = {d: counts[index] / counts[index].sum() for d, (counts, _, _) in per_domain.items()}
        load_entropy = _entropy(load)
        layers.append(
            {
                "layer": index,
                "load": [round(float(x), 4) for x in load],
                "max_load": round(float(load.max()), 4),
                "min_load": round(float(load.min()), 4),
                "load_entropy": round(load_entropy, 4),
                "normalised_load_entropy": round(load_entropy / math.log(num_experts), 4),
                "router_entropy": round(float(total_entropy[index]) / total_tokens, 4),
                "per_domain_load": {d: [round(float(x), 4) for x in p] for d, p in domain_load.items()},
                "per_domain_top_experts": {
                    d: sorted(p.topk(top_k).indices.tolist()) for d, p in domain_load.items()
                },
                "domain_load_distance": {
                    d: round(0.5 * float((p - load).abs().sum()), 4) for d, p in domain_load.items()
                },
            }
        )
    return {
        "num_experts": num_experts,
        "top_k": top_k,
        "max_tokens": max_tokens,
        "tokens": {d: n for d, (_, _, n) in per_domain.items()},
        "layers": layers,
    }


@torch.no_grad()
def _perplexity_without(model: Any, tokens: torch.Tensor, removed: Mapping[int, list[int]]) -> float:
    """Perplexity with the experts in ``removed`` ({layer: [expert, ...]}) masked out of routing.

    Their router logits become -inf before the softmax and top-k, so each token is routed to its best
    remaining experts with Mixtral's renormalised top-k weights; the weights themselves are untouched.
    """
    blocks = _moe_blocks(model)

    def make_hook(experts: list[int]):
        def hook(module, args, output):
            logits = output[0]
            masked = logits.clone()
            masked[..., experts] = float("-inf")
            probs = masked.float().softmax(dim=-1)
            weights, indices = probs.topk(module.top_k, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            return masked, weights.to(output[1].dtype), indices

        return hook

    handles = [
        blocks[layer].gate.register_forward_hook(make_hook(list(experts)))
        for layer, experts in removed.items()
        if experts
    ]
    try:
        return perplexity_of_tokens(model, tokens, seq_len=SEQ_LEN, batch_size=16)["perplexity"]
    finally:
        for handle in handles:
            handle.remove()


def ablation_check(
    model: Any,
    tokenizer: Any,
    eval_texts: Mapping[str, str],
    *,
    usage_texts: Mapping[str, str] | None = None,
    num_removed: int = 2,
    max_tokens: int | None = None,
) -> dict:
    """Perplexity per domain after removing the ``num_removed`` most-used vs least-used experts per layer.

    Removing means masking the experts' router logits to -inf (see ``_perplexity_without``). Usage is
    the top-k assignment count on ``usage_texts`` (default: ``eval_texts``; the build passes the
    calibration splits, so the experts are chosen on other text than they are judged on). Returns
    ``removed`` ({"most_used"|"least_used": {layer: experts}}), ``perplexity`` ({"baseline"|
    "most_used_removed"|"least_used_removed": {domain: ppl}}), ``ratio_to_baseline`` (the same, divided by
    the baseline), ``most_vs_least`` ({domain: ppl most-used removed / ppl least-used removed}: above 1
    when the most-used experts matter more) and ``per_domain`` (the same comparison with usage counted on
    each domain alone: {domain: {"most_used", "least_used", "most_used_removed", "least_used_removed",
    "most_vs_least"}}).
    """
    usage_texts = eval_texts if usage_texts is None else usage_texts
    report = routing_report(model, tokenizer, usage_texts, max_tokens=max_tokens or 1 << 30)
    num_layers = len(report["layers"])

    def pick(load_of_layer, most: bool) -> dict[int, list[int]]:
        chosen = {}
        for index in range(num_layers):
            load = torch.tensor(load_of_layer(index))
            # Stable order: ties go to the lower expert index.
            order = sorted(range(len(load)), key=lambda e: (-load[e].item() if most else load[e].item(), e))
            chosen[index] = sorted(order[:num_removed])
        return chosen

    removed = {
        "most_used": pick(lambda i: report["layers"][i]["load"], True),
        "least_used": pick(lambda i: report["layers"][i]["load"], False),
    }
    streams = {domain: token_stream(tokenizer, text, max_tokens) for domain, text in eval_texts.items()}
    perplexity = {
        "baseline": {d: _perplexity_without(model, tokens, {}) for d, tokens in streams.items()},
        "most_used_removed": {
            d: _perplexity_without(model, tokens, removed["most_used"]) for d, tokens in streams.items()
        },
        "least_used_removed": {
            d: _perplexity_without(model, tokens, removed["least_used"]) for d, tokens in streams.items()
        },
    }
    per_domain = {}
    for domain, tokens in streams.items():
        if domain not in report["layers"][0]["per_domain_load"]:
            continue
        most = pick(lambda i, d=domain: report["layers"][i]["per_domain_load"][d], True)
        least = pick(lambda i, d=domain: report["layers"][i]["per_domain_load"][d], False)
        most_ppl, least_ppl = (
            _perplexity_without(model, tokens, most),
            _perplexity_without(model, tokens, least),
        )
        per_domain[domain] = {
            "most_used": most,
            "least_used": least,
            "most_used_removed": round(most_ppl, 4),
            "least_used_removed": round(least_ppl, 4),
            "most_vs_least": round(most_ppl / least_ppl, 4),
        }
    return {
        "num_removed": num_removed,
        "usage_measured_on": sorted(usage_texts),
        "removed": removed,
        "perplexity": {
            kind: {d: round(v, 4) for d, v in values.items()} for kind, values in perplexity.items()
        },
        "ratio_to_baseline": {
            kind: {d: round(v / perplexity["baseline"][d], 4) for d, v in values.items()}
            for kind, values in perplexity.items()
            if kind != "baseline"
        },
        "most_vs_least": {
            d: round(perplexity["most_used_removed"][d] / perplexity["least_used_removed"][d], 4)
            for d in streams
        },
        "per_domain": per_domain,
    }


def usability_checks(routing: Mapping[str, Any], ablation: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the routing is spread and the most-used experts matter clearly more than the least-used."""
    max_load = max(layer["max_load"] for layer in routing["layers"])
    min_entropy = min(layer["normalised_load_entropy"] for layer in routing["layers"])
    min_ratio = min(ablation["most_vs_least"].values())
    min_own_ratio = min((own["most_vs_least"] for own in ablation["per_domain"].values()), default=math.inf)
    checks = {
        "max_expert_load": max_load,
        "max_expert_load_limit": MAX_EXPERT_LOAD,
        "min_normalised_load_entropy": min_entropy,
        "min_normalised_load_entropy_limit": MIN_NORMALISED_LOAD_ENTROPY,
        "min_most_vs_least_ratio": min_ratio,
        "min_own_domain_most_vs_least_ratio": min_own_ratio,
        "min_most_vs_least_ratio_limit": MIN_ABLATION_RATIO,
    }
    checks["load_spread"] = max_load <= MAX_EXPERT_LOAD and min_entropy >= MIN_NORMALISED_LOAD_ENTROPY
    # Both with usage counted on all domains together and on each domain alone.
    checks["ablation"] = min(min_ratio, min_own_ratio) >= MIN_ABLATION_RATIO
    checks["passed"] = checks["load_spread"] and checks["ablation"]
    return checks
