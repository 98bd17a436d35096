"""The README.md model card written into every output folder: card data, what changed, and a loading
snippet that runs as printed.

The snippet loads from ``load_from``: the output folder as given in the recipe (so it runs from where
``hf-prune prune`` ran), or a Hub repo id once the folder is published; re-render the card with
``build_model_card(report, ..., load_from=repo_id)`` to switch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .output_safety import REPORT_FILE

#: How a prompt-pruned causal LM is scored (the eval commands and the refusal live with the evaluation).
PROMPT_PRUNING_SCORING = (
    "The prompt (context) is pruned at prefill and the continuation is scored through the KV cache, "
    "unpruned — what `generate` does. Score it with `hf-prune eval` or `lm_eval --model hf-prune`; a plain "
    "full-sequence forward without a cache is refused, because the logits at pruned positions do not exist."
)
VISUAL_PRUNING_NOTE = (
    "The checkpoint prunes visual tokens by itself inside `forward` / `generate` "
    "(the `token_pruning` settings in config.json)."
)


def build_model_card(
    report: dict[str, Any],
    *,
    model_type: str | None = None,
    auto_class: str = "AutoModelForCausalLM",
    preprocessor_class: str | None = "AutoTokenizer",
    load_from: str | None = None,
    token_pruning: bool = False,
) -> str:
    """A ``huggingface_hub.ModelCard`` with base_model, tags and evaluation results as model-index.

    ``auto_class`` loads the model, ``preprocessor_class`` (``AutoTokenizer`` / ``AutoProcessor``, None
    when none was saved) its inputs; ``load_from`` is the snippet's path or repo id (default: the
    recipe's output folder); ``token_pruning``: the config holds ``token_pruning`` settings."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    source = report["recipe"].get("model") or "in-memory model"
    is_hub_id = not Path(source).expanduser().exists() and source.count("/") == 1
    methods = [stage["method"] for stage in report["stages"]]
    output = report["recipe"].get("output") or "pruned-model"
    name = Path(output).name
    eval_results = [
        EvalResult(
            task_type=entry["task_type"],
            dataset_type=Path(entry["data"]).stem,
            dataset_name=Path(entry["data"]).name,
            metric_type=entry["metric"],
            metric_value=round(entry["pruned"][entry["metric"]], 4),
        )
        for entry in report.get("evaluation", [])
    ]
    data = ModelCardData(
        base_model=source if is_hub_id else None,
        library_name="transformers",
        tags=["hf-prune", "pruned", *methods],
        model_name=name,
        eval_results=eval_results or None,
    )
    lines = [
        f"# {name}",
        "",
        f"Pruned from `{source}` with [hf-prune](https://pypi.org/project/hf-prune/) ({', '.join(methods)}).",
        "",
        f"- parameters: {report['params_before']:,} → {report['params_after']:,} "
        f"({report['params_after'] / report['params_before']:.1%})",
        *_stage_lines(report),
        *_evaluation_table(report),
        "",
        *loading_section(
            load_from if load_from is not None else os.path.expanduser(output),
            model_type=model_type,
            auto_class=auto_class,
            preprocessor_class=preprocessor_class,
            local=load_from is None,
        ),
        *_usage_notes(auto_class, token_pruning),
        "",
        f"The full report (recipe, per-stage details, timings) is in `{REPORT_FILE}`.",
        "",
    ]
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines)))


def loading_section(
    target: str,
    *,
    model_type: str | None,
    auto_class: str,
    preprocessor_class: str | None,
    local: bool = True,
) -> list[str]:
    """The card's "load it" paragraph and its python block, loading model and tokenizer / processor."""
    remote = bool(model_type and model_type.startswith("hf_prune_"))
    if remote:
        intro = [
            f"Its architecture changed (`model_type: {model_type}`): load it after `import hf_prune`, or",
            "without hf_prune through the modeling code saved beside the weights:",
        ]
    else:
        intro = ["Loads with plain `transformers`:"]
    if local and os.path.isabs(target):
        intro += ["", f"(`{target}` is this folder as given to hf-prune; once moved, put its new path.)"]
    elif local:
        intro += [
            "",
            f"(`{target}` is this folder as given to hf-prune, relative to where it ran; from anywhere else,",
            "put this folder's path.)",
        ]
    return [*intro, "", "```python", *loading_snippet(target, auto_class, preprocessor_class, remote), "```"]


def loading_snippet(target: str, auto_class: str, preprocessor_class: str | None, remote: bool) -> list[str]:
    """Python lines that load the model (and its tokenizer / processor) from ``target``; remote-code
    checkpoints pass ``trust_remote_code=True`` to every loader, so transformers never prompts."""
    arguments = json.dumps(target) + (", trust_remote_code=True" if remote else "")
    classes = [auto_class] + ([preprocessor_class] if preprocessor_class else [])
    lines = [f"from transformers import {', '.join(classes)}", ""]
    lines.append(f"model = {auto_class}.from_pretrained({arguments})")
    if preprocessor_class:
        variable = "processor" if preprocessor_class == "AutoProcessor" else "tokenizer"
        lines.append(f"{variable} = {preprocessor_class}.from_pretrained({arguments})")
    return lines


def _stage_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for stage in report["stages"]:
        removed = stage.get("removed_layers")
        if removed is not None:
            lines.append(
                f"- `{stage['method']}`: removed decoder layers {removed} "
                f"({stage['layers_before']} → {stage['layers_after']})"
            )
        elif "experts_after" in stage:
            lines.append(
                f"- `{stage['method']}` ({stage.get('algorithm')}): experts {stage['experts_before']} → "
                f"{stage['experts_after']}"
            )
        elif "perplexity_after" in stage:  # heal: a LoRA fine-tune merged into the weights
            lines.append(
                f"- `{stage['method']}`: LoRA fine-tune merged into the weights "
                f"({stage['adapted_modules'] + stage['adapted_expert_parameters']} projections adapted, "
                f"{stage['train_windows']} windows of training text); perplexity on {stage['eval_data']}: "
                f"{stage['perplexity_before']:.4g} before healing → {stage['perplexity_after']:.4g} after"
            )
        elif "targeted_weights" in stage:  # training-time sparsity: zeros in dense tensors
            how = ", ".join(str(stage[k]) for k in ("pattern", "scope") if k in stage)
            lines.append(
                f"- `{stage['method']}`{f' ({how})' if how else ''}: {stage['sparsity']:.1%} of the targeted "
                f"weights are zero ({stage['pruned_weights']:,} of {stage['targeted_weights']:,}); the tensors "
                "stay dense"
            )
    return lines


def _evaluation_table(report: dict[str, Any]) -> list[str]:
    if not report.get("evaluation"):
        return []
    lines = ["", "| task | metric | data | original | pruned | retained |", "|---|---|---|---|---|---|"]
    for entry in report["evaluation"]:
        metric = entry["metric"]
        original = entry["original"][metric]
        retained = entry.get("retained")
        lines.append(
            f"| {entry['task']} | {metric} | {Path(entry['data']).name} | {original:.4g} | "
            f"{entry['pruned'][metric]:.4g} | {'' if retained is None else format(retained, '.1%')} |"
        )
    return lines


def _usage_notes(auto_class: str, token_pruning: bool) -> list[str]:
    """How to run a token-pruned checkpoint: prompt-pruned causal LMs are scored through the cache,
    visual-token-pruned ones prune by themselves."""
    if not token_pruning:
        return []
    if auto_class == "AutoModelForCausalLM":
        return ["", PROMPT_PRUNING_SCORING]
    if auto_class == "AutoModelForImageTextToText":
        return ["", VISUAL_PRUNING_NOTE]
    return []
