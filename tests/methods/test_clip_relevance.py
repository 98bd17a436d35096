"""CDPruner's instruction relevance from a CLIP text tower supplied by the recipe (tiny LLaVA / LLaVA-NeXT)."""

import copy

import pytest
import torch
from test_visual_tokens import batch, greedy_by_log_det, pruned_model, unit
from tiny_models import CLIP_CONTEXT, build_tiny_model, build_tokenizer, save_tiny_clip

from hf_prune.errors import ConfigFieldError, RecipeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Long enough that the CLIP tokenizer (one token per character here) needs several chunks.
LONG_PROMPTS = [
    "USER: <image>\nwhat is in the picture, and where is it? ASSISTANT:",
    "USER: <image>\nname the colours ASSISTANT:",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(image_token=True)


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory, tokenizer):
    """A tiny CLIP sharing the tiny LLaVA's vision weights (as LLaVA's real CLIP does), and one that does not."""
    root = tmp_path_factory.mktemp("clip")
    tower = build_tiny_model("llava", tokenizer).model.vision_tower
    return {
        "matching": save_tiny_clip(root / "matching", tower),
        "other": save_tiny_clip(root / "other", seed=7),
    }


def reference_keep(model, clip_dir, inputs, texts: list[str], budget: int) -> list[list[int]]:
    """The visual tokens CDPruner keeps per image, computed from the CLIP checkpoint itself with plain torch:
    patch features of layer -2 through CLIP's post-layernorm and visual projection, text chunks through its
    text tower; relevance, kernel and the greedy selection by hand (no token_selection function)."""
    from transformers import AutoTokenizer, CLIPModel

    clip, clip_tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        hidden = clip.vision_model(
            pixel_values=inputs["pixel_values"], output_hidden_states=True
        ).hidden_states[-2]
        patches = clip.visual_projection(clip.vision_model.post_layernorm(hidden[:, 1:]))
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        kept = []
        for image, text in enumerate(texts):
            ids = clip_tokenizer(text, add_special_tokens=False)["input_ids"]
            step = CLIP_CONTEXT - 2
            chunks = [ids[i : i + step] for i in range(0, len(ids), step)]
            text_embeds = torch.cat(
                [
                    clip.text_projection(
                        clip.text_model(
                            input_ids=torch.tensor(
                                [[clip_tokenizer.bos_token_id, *c, clip_tokenizer.eos_token_id]]
                            )
                        ).pooler_output
                    )
                    for c in chunks
                ]
            )
            # By hand (METHODS.md, CDPruner step 3-4): mean cosine over the chunks, min-max normalised; the
            # kernel diag(r)·S·diag(r) on the cosines of the projected features; greedy MAP by log det.
            cosine = (unit(patches[image]) @ unit(text_embeds).T).mean(dim=-1)
            relevance = (cosine - cosine.min()) / (cosine.max() - cosine.min())
            similarity = unit(features[image]) @ unit(features[image]).T
            kernel = relevance[:, None] * similarity * relevance[None]
            kept.append(sorted(greedy_by_log_det(kernel, budget)))
    return kept


def kept_visual_indices(model, cut, inputs) -> list[list[int]]:
    image = inputs["input_ids"] == model.config.image_token_id
    return [torch.nonzero(cut["keep"][row][image[row]]).squeeze(1).tolist() for row in range(image.shape[0])]


def instruction_texts(tokenizer, inputs) -> list[str]:
    texts = []
    for ids in inputs["input_ids"]:
        after = ids[int(torch.nonzero(ids == tokenizer.convert_tokens_to_ids("<image>"))[-1]) + 1 :]
        texts.append(tokenizer.decode(after.tolist(), skip_special_tokens=True))
    return texts


def test_clip_relevance_follows_the_paper(tokenizer, clip_dirs):
    model, report = pruned_model("llava", tokenizer, text_tower=str(clip_dirs["matching"]))
    assert report.details["relevance"] == "clip_text_tower"
    assert report.details["text_tower_matches_vision_tower"] is True
    inputs = batch("llava", tokenizer, prompts=LONG_PROMPTS)
    texts = instruction_texts(tokenizer, inputs)
    assert len(texts[0]) > 2 * CLIP_CONTEXT  # several chunks
    with torch.no_grad():
        features, relevance_features = model._image_features(inputs["pixel_values"], None, {})
        cut = model.prune_visual_tokens(
            inputs["input_ids"], inputs["attention_mask"], features, relevance_features=relevance_features
        )
        overridden = model.prune_visual_tokens(
            inputs["input_ids"],
            inputs["attention_mask"],
            features,
            relevance_features=relevance_features,
            instruction_text=["a red square", "blue"],
        )
        logits = model(**inputs).logits
    assert kept_visual_indices(model, cut, inputs) == reference_keep(
        model, clip_dirs["matching"], inputs, texts, 4
    )
    assert kept_visual_indices(model, overridden, inputs) == reference_keep(
        model, clip_dirs["matching"], inputs, ["a red square", "blue"], 4
    )
    assert logits.shape[1] == cut["input_ids"].shape[1]


def test_llava_next_packs_clip_embeddings_like_its_features(tokenizer, clip_dirs):
    model, _ = pruned_model("llava_next", tokenizer, text_tower=str(clip_dirs["matching"]), budget=2)
    inputs = batch("llava_next", tokenizer)
    with torch.no_grad():
        features, relevance_features = model._image_features(
            inputs["pixel_values"], None, {"image_sizes": inputs["image_sizes"]}
        )
        logits = model(**inputs).logits
    newline = model.model.image_newline
    for image, clip_space in zip(features, relevance_features, strict=True):
        assert clip_space.shape == (image.shape[0], 16)
        is_newline = (image == newline).all(-1)
        assert is_newline.any() and torch.equal(
            clip_space[is_newline].abs().sum(-1), torch.zeros(int(is_newline.sum()))
        )
        assert (clip_space[~is_newline].abs().sum(-1) > 0).all()
    assert logits.shape[1] < inputs["input_ids"].shape[1]


def test_generate_with_clip_relevance_equals_the_pruned_forward(tokenizer, clip_dirs):
    model, _ = pruned_model("llava", tokenizer, text_tower=str(clip_dirs["matching"]))
    inputs = batch("llava", tokenizer)
    texts = instruction_texts(
        tokenizer, inputs
    )  # fixed, as the step-by-step forward sees generated tokens too
    with torch.no_grad():
        generated = model.generate(**inputs, instruction_text=texts, max_new_tokens=4, do_sample=False)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(4):
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=inputs["pixel_values"],
                instruction_text=texts,
            ).logits
            step = logits[:, -1].argmax(dim=-1, keepdim=True)
            ids, mask = torch.cat([ids, step], dim=1), torch.cat([mask, torch.ones_like(step)], dim=1)
    assert torch.equal(generated, ids)


def test_a_clip_with_other_vision_weights_is_reported(tokenizer, clip_dirs):
    _, report = pruned_model("llava", tokenizer, text_tower=str(clip_dirs["other"]))
    assert report.details["text_tower_matches_vision_tower"] is False
    assert "two embedding spaces" in report.details["text_tower_note"]


def test_clip_relevance_bad_input(tokenizer, clip_dirs, tmp_path):
    with pytest.raises(
        RecipeError, match="stage.text_tower: only cdpruner scores instruction relevance, not random"
    ):
        pruned_model("llava", tokenizer, text_tower=str(clip_dirs["matching"]), algorithm="random")
    with pytest.raises(ConfigFieldError, match="text_tower.*cannot load a CLIP model"):
        pruned_model("llava", tokenizer, text_tower=str(tmp_path / "missing"))
    save_tiny_clip(tmp_path / "narrow", vision_width=16)
    with pytest.raises(ConfigFieldError, match="text_tower.*vision width 16 does not match"):
        pruned_model("llava", tokenizer, text_tower=str(tmp_path / "narrow"))
    model, _ = pruned_model("llava", tokenizer)  # no text tower: instruction_text has nothing to embed it
    inputs = batch("llava", tokenizer)
    with pytest.raises(ValueError, match="instruction_text needs a checkpoint with a CLIP text tower"):
        model(**inputs, instruction_text=["a", "b"])
    model, _ = pruned_model("llava", tokenizer, text_tower=str(clip_dirs["matching"]))
    with pytest.raises(ValueError, match="instruction_text has 1 rows for a batch of 2"):
        model(**inputs, instruction_text=["a"])
    model.relevance_tokenizers = None
    with pytest.raises(ValueError, match="set_relevance_tokenizers"):
        model(**inputs)


def test_clip_tower_and_tokenizers_save_and_reload_in_process(tokenizer, clip_dirs, tmp_path):
    """``save_pretrained`` writes both relevance tokenizers beside the weights; ``from_pretrained`` rebuilds the
    text tower from the config, reloads them (also with ``output_loading_info``), and prunes the same way."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model, _ = pruned_model("llava", tokenizer, text_tower=str(clip_dirs["matching"]))
    model.save_pretrained(tmp_path / "pruned")
    for name in ("language", "clip"):
        assert (tmp_path / "pruned" / "relevance_tokenizers" / name / "tokenizer_config.json").is_file()
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "pruned").eval()
    again, info = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "pruned", output_loading_info=True, local_files_only=True
    )
    assert not info["missing_keys"]
    clip_tokenizer = AutoTokenizer.from_pretrained(clip_dirs["matching"])
    for loaded in (reloaded, again):
        assert sorted(loaded.relevance_tokenizers) == ["clip", "language"]
        assert (
            loaded.relevance_tokenizers["clip"]("a red square")["input_ids"]
            == clip_tokenizer("a red square")["input_ids"]
        )
        assert loaded.relevance_tokenizers["language"].get_vocab() == tokenizer.get_vocab()
    for key, value in model.relevance_text_tower.state_dict().items():
        assert torch.equal(reloaded.relevance_text_tower.state_dict()[key], value), key
    assert torch.equal(reloaded.relevance_visual_projection.weight, model.relevance_visual_projection.weight)
    inputs = batch("llava", tokenizer, prompts=LONG_PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    # Without the tokenizer folder the model loads, without tokenizers (prune then asks for them).
    import shutil

    shutil.rmtree(tmp_path / "pruned" / "relevance_tokenizers")
    bare = AutoModelForImageTextToText.from_pretrained(tmp_path / "pruned")
    assert bare.has_clip_text_tower() and bare.relevance_tokenizers is None


def test_post_layernorm_finds_the_towers_final_norm():
    from hf_prune.model_patches.clip_relevance import post_layernorm
    from tiny_models import tiny_vision_config
    from torch import nn
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel(tiny_vision_config())
    norm = getattr(tower, "vision_model", tower).post_layernorm
    assert post_layernorm(tower) is norm
    wrapper = nn.Module()
    wrapper.vision_model = nn.Module()
    wrapper.vision_model.post_layernorm = nn.LayerNorm(4)
    wrapper.post_layernorm = nn.LayerNorm(4)  # the inner vision_model's comes first
    assert post_layernorm(wrapper) is wrapper.vision_model.post_layernorm
    with pytest.raises(
        ValueError,
        match="^CLIP text-tower relevance needs a CLIP-style vision tower with a post_layernorm; "
        "Linear has none$",
    ):
        post_layernorm(nn.Linear(2, 2))


def test_clip_text_embeddings_chunk_count_and_empty_text(tokenizer, clip_dirs):
    from hf_prune.model_patches.clip_relevance import clip_text_embeddings

    model, _ = pruned_model("llava", tokenizer, text_tower=str(clip_dirs["matching"]))
    tower, clip_tokenizer = model.relevance_text_tower, model.relevance_tokenizers["clip"]
    assert clip_text_embeddings(tower, clip_tokenizer, "").shape == (0, 16)
    for length in (1, CLIP_CONTEXT - 2, CLIP_CONTEXT - 1, 2 * (CLIP_CONTEXT - 2) + 1):
        text = "ab" * length
        ids = clip_tokenizer(text, add_special_tokens=False)["input_ids"]
        chunks = -(-len(ids) // (CLIP_CONTEXT - 2))
        assert clip_text_embeddings(tower, clip_tokenizer, text).shape == (chunks, 16)


def test_save_pretrained_passes_its_arguments_on(tokenizer, clip_dirs, tmp_path):
    """The CLIP mix-in's ``save_pretrained`` hands positional and keyword arguments to transformers': a
    shard size gives an index, ``is_main_process=False`` (positional) writes no config; a pruned model
    without a CLIP tower (no relevance tokenizers) saves too."""
    model, _ = pruned_model("llava", tokenizer, text_tower=str(clip_dirs["matching"]))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    with pytest.raises(TypeError):  # extra model arguments reach the model class, which takes none
        type(model).from_pretrained(tmp_path / "sharded", "unexpected")
    with pytest.raises(TypeError):
        type(model).from_pretrained(tmp_path / "sharded", unexpected_argument=1)
    model.save_pretrained(tmp_path / "worker", False)
    assert not (tmp_path / "worker" / "config.json").exists()
    plain, _ = pruned_model("llava", tokenizer)
    plain.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "config.json").is_file()
    assert not (tmp_path / "plain" / "relevance_tokenizers").exists()
    # The patched class builds from a config that never had a CLIP tower key, and then has no tower.
    config = copy.deepcopy(plain.config)
    if hasattr(config, "relevance_text_tower"):
        delattr(config, "relevance_text_tower")
    assert not type(plain)(config).has_clip_text_tower()


def test_relevance_tokenizers_never_run_code_from_the_checkpoint(tokenizer, clip_dirs, tmp_path):
    """A checkpoint whose saved CLIP tokenizer names remote code (``auto_map``) loads without running it."""
    import json

    from transformers import AutoModelForImageTextToText

    model, _ = pruned_model("llava", tokenizer, text_tower=str(clip_dirs["matching"]))
    model.save_pretrained(tmp_path / "pruned")
    folder = tmp_path / "pruned" / "relevance_tokenizers" / "clip"
    marker = tmp_path / "ran"
    for where in (folder, tmp_path / "pruned"):  # wherever transformers would look for the module
        (where / "evil_tokenizer.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
            "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
        )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "pruned")
    assert not marker.exists()
    assert sorted(loaded.relevance_tokenizers) == ["clip", "language"]  # loaded with the stock class
