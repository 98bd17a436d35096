"""The model card and the recipe's ``publish:`` section, without a model: the card never names a local path
(a local source by its folder name), sets ``base_model`` from a Hub id or from what the user names, tags
the methods (``finetune`` after healing); ``publish:`` keys are checked at load, naming the key."""

from __future__ import annotations

import pytest
import yaml

from hf_prune.errors import RecipeError
from hf_prune.model_card import build_model_card, public_recipe
from hf_prune.recipe import load_recipe

STAGES = [{"method": "layer_drop", "layers": [1, 1]}]


def report(model, *, output="out/pruned", stages=({"method": "layer_drop"},), **recipe):
    return {
        "recipe": {"model": model, "output": output, **recipe},
        "stages": list(stages),
        "params_before": 100,
        "params_after": 80,
    }


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_a_local_source_is_named_by_its_folder_name_only(tmp_path):
    source = tmp_path / "models" / "my-llama"
    source.mkdir(parents=True)
    data = tmp_path / "calib.txt"
    data.write_text("x")
    card = build_model_card(
        report(str(source), output=str(tmp_path / "out"), calibration={"data": str(data)}),
        load_from="me/pruned",
    )
    assert str(tmp_path) not in card
    assert "Pruned from the local model folder `my-llama`" in card
    assert "base_model" not in front_matter(card)
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert (
        recipe["model"] == "my-llama"
        and recipe["output"] == "out"
        and recipe["calibration"]["data"] == "calib.txt"
    )


def test_a_hub_source_sets_base_model_and_a_given_one_overrides_it():
    assert front_matter(build_model_card(report("org/llama")))["base_model"] == "org/llama"
    assert (
        front_matter(build_model_card(report("org/llama"), base_model="org/other"))["base_model"]
        == "org/other"
    )
    named = report("/abs/copy/of/llama", publish={"repo_id": "me/x", "base_model": "org/llama"})
    card = build_model_card(named, load_from="me/x")
    assert front_matter(card)["base_model"] == "org/llama" and "/abs/" not in card
    assert "Pruned from `org/llama` (a local copy, folder `llama`)" in card


def test_tags_name_each_method_once_and_finetune_after_healing():
    stages = [{"method": "replaceme"}, {"method": "replaceme"}, {"method": "heal", "perplexity_before": 9.0}]
    tags = front_matter(build_model_card(report("org/llama", stages=stages)))["tags"]
    assert tags == ["hf-prune", "pruned", "replaceme", "heal", "finetune"]
    plain = front_matter(build_model_card(report("org/llama")))["tags"]
    assert plain == ["hf-prune", "pruned", "layer_drop"]


def test_evaluation_results_keep_the_model_name():
    entry = {
        "task": "perplexity",
        "metric": "perplexity",
        "task_type": "text-generation",
        "data": "/home/someone/eval.txt",
        "original": {"perplexity": 10.0},
        "pruned": {"perplexity": 12.0},
        "retained": 0.8,
    }
    card = build_model_card({**report("org/llama"), "evaluation": [entry]}, load_from="me/x")
    index = front_matter(card)["model-index"][0]
    assert index["name"] == "pruned" and index["results"][0]["metrics"][0]["value"] == 12.0
    assert "/home/someone" not in card


def test_public_recipe_reduces_paths_and_keeps_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "retain.jsonl").write_text("{}")
    recipe = {
        "model": "org/llama",
        "output": "runs/out",
        "calibration": {"data": "wikitext/wikitext-2-raw-v1", "text_field": "text"},
        "stages": [{"method": "text_token_pruning", "train_data": "data/retain.jsonl", "algorithm": "adtp"}],
        "evaluate": [
            {"task": "perplexity", "data": "~/eval/valid.txt"},
            {"task": "perplexity", "data": "./v.txt"},
        ],
        "train": {"data": "/srv/train.jsonl", "arguments": {"output_dir": "/scratch/ckpt", "max_steps": 3}},
    }
    public = public_recipe(recipe)
    assert public["model"] == "org/llama" and public["output"] == "out"
    assert public["calibration"] == recipe["calibration"]  # a datasets hub id and a column name stay
    assert public["stages"][0] == {**recipe["stages"][0], "train_data": "retain.jsonl"}
    assert [e["data"] for e in public["evaluate"]] == ["valid.txt", "v.txt"]
    assert public["train"] == {"data": "train.jsonl", "arguments": {"output_dir": "ckpt", "max_steps": 3}}


def recipe_with(publish, **top):
    return {"model": "org/llama", "output": "out", "stages": STAGES, "publish": publish, **top}


def test_a_publish_section_is_read_and_written_back():
    recipe = load_recipe(recipe_with({"repo_id": "me/x", "private": True, "revision": "v2"}))
    assert recipe.publish.repo_id == "me/x" and recipe.publish.private and recipe.publish.revision == "v2"
    assert recipe.to_dict()["publish"]["repo_id"] == "me/x"
    assert (
        "publish" not in load_recipe({k: v for k, v in recipe_with(None).items() if k != "publish"}).to_dict()
    )


@pytest.mark.parametrize(
    ("publish", "pattern"),
    [
        ({"repo_id": "me/x", "privat": True}, r"publish\.privat: unknown key .*did you mean 'private'"),
        ({"repo_id": "no-namespace"}, r"publish\.repo_id: must be a Hub repo id ORG/NAME"),
        ({"repo_id": "me/a--b"}, r"publish\.repo_id: must be a Hub repo id"),
        ({"private": True}, r"publish\.repo_id: missing required key"),
        ({"repo_id": "me/x", "private": "yes"}, r"publish\.private: expected bool"),
        ({"repo_id": "me/x", "base_model": "./local"}, r"publish\.base_model: must be a Hub model id"),
        ({"repo_id": "me/x", "endpoint": "hub.local"}, r"publish\.endpoint: must be an http\(s\) URL"),
        ("me/x", r"publish: expected a mapping"),
    ],
)
def test_bad_publish_sections_name_the_key(publish, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(recipe_with(publish))


def test_publish_without_output_is_refused():
    with pytest.raises(RecipeError, match=r"^publish: needs output"):
        load_recipe({"stages": STAGES, "publish": {"repo_id": "me/x"}}, model_in_memory=True)
