"""The README's support matrix says what the registry and the adapters do: a cell starting with "no" is
a method the adapter refuses for every model type of that column, any other cell one it accepts for the
types the cell names (or all of the column's)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hf_prune.adapters import TEXT_ARCHITECTURES, ModelAdapter
from hf_prune.adapters.table import IMAGE_CLASSIFIER, image_classifier_types
from hf_prune.registry import registered_methods

README = Path(__file__).resolve().parents[2] / "README.md"
#: Column header → (README name, model_type, language model type) of each family it covers.
COLUMNS = {
    "Llama / Mistral / Qwen2 / Qwen3": [
        ("Llama", "llama"),
        ("Mistral", "mistral"),
        ("Qwen2", "qwen2"),
        ("Qwen3", "qwen3"),
    ],
    "Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE": [
        ("Mixtral", "mixtral"),
        ("Qwen2-MoE", "qwen2_moe"),
        ("Qwen3-MoE", "qwen3_moe"),
        ("OLMoE", "olmoe"),
    ],
    "Gemma2 / Gemma3 / OLMo2": [("Gemma2", "gemma2"), ("Gemma3", "gemma3_text"), ("OLMo2", "olmo2")],
    "LLaVA / LLaVA-NeXT": [("LLaVA", "llava:llama"), ("LLaVA-NeXT", "llava_next:llama")],
    "Qwen2-VL / Qwen2.5-VL": [
        ("Qwen2-VL", "qwen2_vl:qwen2_vl_text"),
        ("Qwen2.5-VL", "qwen2_5_vl:qwen2_5_vl_text"),
    ],
    "BERT / RoBERTa / DistilBERT": [("BERT", "bert"), ("RoBERTa", "roberta"), ("DistilBERT", "distilbert")],
    "image classifiers (ViT / ResNet / ConvNeXt / …)": [
        ("ViT", "vit"),
        ("ResNet", "resnet"),
        ("ConvNeXt", "convnext"),
    ],
}


def adapter_for(model_type: str) -> ModelAdapter:
    if model_type in image_classifier_types():
        return ModelAdapter(model_type, model_type, IMAGE_CLASSIFIER, False)
    outer, _, text = model_type.partition(":")
    return ModelAdapter(outer, text or outer, TEXT_ARCHITECTURES[text or outer], bool(text))


def matrix() -> tuple[list[str], dict[str, list[str]]]:
    lines = README.read_text(encoding="utf-8").split("### Support matrix", 1)[1].strip().splitlines()
    table = lines[: next(i for i, line in enumerate(lines) if not line.startswith("|"))]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    header, body = rows[0], rows[2:]
    return header[1:], {row[0].strip("`"): row[1:] for row in body}


def test_matrix_covers_every_method_and_column():
    columns, rows = matrix()
    assert columns == list(COLUMNS)
    assert sorted(rows) == sorted(registered_methods())


@pytest.mark.parametrize("method", sorted(registered_methods()))
def test_matrix_row_matches_the_registry(method):
    columns, rows = matrix()
    spec = registered_methods()[method]
    for column, cell in zip(columns, rows[method], strict=True):
        families = COLUMNS[column]
        named = [family for family in families if re.search(rf"\b{re.escape(family[0])}\b", cell)]
        applies = not cell.startswith("no")
        for name, model_type in families:
            expected = applies and (not named or (name, model_type) in named)
            reason = spec.applicability(adapter_for(model_type))
            assert (reason is None) == expected, (
                f"{method} on {name} ({model_type}): README says {cell!r}, got {reason}"
            )
