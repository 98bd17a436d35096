"""The README.md model card written into every output folder: card data, what changed, and a loading
snippet that runs as printed.

The snippet loads from ``load_from``: the output folder as given in the recipe (so it runs from where
``hf-prune prune`` ran), or a Hub repo id once the folder is published; re-render the card with
``build_model_card(report, ..., load_from=repo_id)`` to switch. Nothing else in a card names a local path:
a local source model is named by its folder name, and the recipe is shown as ``public_recipe`` leaves it
(every local path reduced to its base name), so the Hub rendering carries no path of the machine at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .output_safety import REPORT_FILE
from .recipe_sections import repo_id_problem

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
#: Why a remote-code checkpoint needs ``trust_remote_code=True`` (the card says it under the snippet).
REMOTE_CODE_NOTE = (
    "Why `trust_remote_code=True`: pruning changed the architecture, so stock transformers has no class for "
    "it; the modeling file saved beside the weights (named in `auto_map` in config.json) defines it, and "
    "transformers runs that file only when you pass `trust_remote_code=True` (read it first). With hf-prune "
    "installed, `import hf_prune` registers the same classes and no remote code runs."
)
#: Tag of a checkpoint healed (fine-tuned) after pruning; the Hub's ``base_model_relation`` has no "pruned".
FINETUNE_TAG = "finetune"


def build_model_card(
    report: dict[str, Any],
    *,
    model_type: str | None = None,
    auto_class: str = "AutoModelForCausalLM",
    preprocessor_class: str | None = "AutoTokenizer",
    load_from: str | None = None,
    token_pruning: bool = False,
    base_model: str | None = None,
) -> str:
    """A ``huggingface_hub.ModelCard`` with base_model, tags, the recipe and evaluation results as
    model-index.

    ``auto_class`` loads the model, ``preprocessor_class`` (``AutoTokenizer`` / ``AutoProcessor``, None
    when none was saved) its inputs; ``load_from`` is the snippet's path or repo id (default: the
    recipe's output folder); ``token_pruning``: the config holds ``token_pruning`` settings;
    ``base_model``: the Hub id it was pruned from (default: the recipe's ``publish.base_model``, else its
    ``model`` when that is a Hub id)."""
    import yaml
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    recipe = report["recipe"]
    source = recipe.get("model")
    base_model = base_model or (recipe.get("publish") or {}).get("base_model") or _hub_id_or_none(source)
    methods = [stage["method"] for stage in report["stages"]]
    output = recipe.get("output") or "pruned-model"
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
        base_model=base_model,
        library_name="transformers",
        tags=card_tags(report),
        model_name=name,
        eval_results=eval_results or None,
    )
    lines = [
        f"# {name}",
        "",
        f"Pruned from {_source_phrase(source, base_model)} with [hf-prune](https://pypi.org/project/hf-prune/) "
        f"({', '.join(dict.fromkeys(methods))}).",
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
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(public_recipe(recipe), sort_keys=False, allow_unicode=True).rstrip("\n"),
        "```",
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
    snippet = ["```python", *loading_snippet(target, auto_class, preprocessor_class, remote), "```"]
    return [*intro, "", *snippet, *(["", REMOTE_CODE_NOTE] if remote else [])]


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
        elif "member_domains" in stage:  # cards: a deck of lottery tickets
            rewind = "LRR" if stage["rewind"] == "learning_rate" else "LTR"
            lines.append(
                f"- `{stage['method']}`: a CARD-Deck of {len(stage['member_domains'])} lottery tickets ({rewind}, "
                f"{stage['final_sparsity']:.1%} sparse each, {stage['rounds']} rounds) trained with the "
                f"augmentations {', '.join(stage['member_domains'])}; gating `{stage['gating']}`; each member "
                "alone, as a stock checkpoint, in `cards/member-<i>-<domain>/`"
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


def card_tags(report: dict[str, Any]) -> list[str]:
    """``hf-prune``, ``pruned``, each method once, and ``finetune`` when a stage healed the model."""
    methods = list(dict.fromkeys(stage["method"] for stage in report["stages"]))
    return ["hf-prune", "pruned", *methods, *([FINETUNE_TAG] if "heal" in methods else [])]


def _hub_id_or_none(source: str | None) -> str | None:
    """``source`` when it names a Hub model (ORG/NAME, and no such local path), else None."""
    if not source or repo_id_problem(source) is not None or _is_local_path(source):
        return None
    return source


def _source_phrase(source: str | None, base_model: str | None) -> str:
    if not source:
        return f"`{base_model}` (a model in memory)" if base_model else "a model in memory"
    if _hub_id_or_none(source):
        return f"`{source}`"
    folder = f"`{_base_name(source)}`"
    return (
        f"`{base_model}` (a local copy, folder {folder})"
        if base_model
        else f"the local model folder {folder}"
    )


# ---- no local path leaves the machine ----------------------------------------------------------------------

#: Recipe and report keys whose string is always a local path (reduced to its base name).
_PATH_KEYS = frozenset({"output", "output_dir", "logging_dir", "resume_from_checkpoint", "source_file"})
#: Keys whose string is a local path or a Hub id (datasets / models): a path is reduced, an id kept.
_PATH_OR_ID_KEYS = frozenset({"model", "data", "train_data", "eval_data", "text_tower"})
_FILE_SUFFIXES = frozenset({".txt", ".jsonl", ".json", ".parquet", ".csv", ".yaml", ".yml", ".safetensors"})


def public_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe with every local filesystem path reduced to its base name (a local source model to its
    folder name); Hub ids and every other value are kept."""
    return public_value(recipe)


def public_value(value: Any, key: str | None = None) -> Any:
    """``value`` (JSON-like) with local paths reduced to base names, recursively: strings under a path key,
    strings under a path-or-id key that are not Hub ids, and any string shaped like a path (absolute,
    ``~``, ``./``, ``../``) or naming an existing local file or folder."""
    if isinstance(value, dict):
        return {k: public_value(v, k if isinstance(k, str) else None) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_value(item, key) for item in value]
    if not isinstance(value, str) or not value:
        return value
    if key in _PATH_KEYS or _is_local_path(value):
        return _base_name(value)
    if key in _PATH_OR_ID_KEYS and "/" in value:
        # A relative path no Hub id could be (a/b/c), or a file by its suffix (data/calib.txt).
        if repo_id_problem(value) is not None or Path(value).suffix.lower() in _FILE_SUFFIXES:
            return _base_name(value)
    return value


def _is_local_path(text: str) -> bool:
    if text.startswith(("/", "~", "./", "../", ".\\", "..\\")) or (
        len(text) > 2 and text[1:3] in (":\\", ":/")
    ):
        return True
    if len(text) > 4096 or "\n" in text or ("/" not in text and os.sep not in text):
        return False  # a bare word (an algorithm, a column name) is no path even if such a file exists here
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):
        return False


def _base_name(path: str) -> str:
    return Path(os.path.expanduser(path.rstrip("/\\"))).name or path
