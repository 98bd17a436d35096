"""Visual token pruning on Qwen2-VL and Qwen2.5-VL: 3-D rotary positions stay consistent with the kept tokens.

The stock Qwen2-VL processor needs a video processor that needs torchvision (not installed here), so the
inputs are built from the image processor and the tokenizer the way the processor does it.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from tiny_models import build_tokenizer, sample_image

import hf_prune
from hf_prune.adapters import get_adapter
from hf_prune.errors import RecipeError, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QUESTIONS = ["what is this?", "what colour is the top row of the picture?"]
SIZES = [(32, 32), (32, 48)]  # 4×4 and 4×6 merged tokens


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    return tokenizer


FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
VISION = {  # patch 4, 2×2 merger: a 32×32 image gives 4×4 merged tokens
    "qwen2_vl": dict(
        depth=2,
        embed_dim=32,
        hidden_size=32,
        num_heads=4,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        mlp_ratio=2,
    ),
    "qwen2_5_vl": dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        out_hidden_size=32,
        window_size=16,
        fullatt_block_indexes=[1],
    ),
}


def build_qwen2_vl(tokenizer, family: str = "qwen2_vl", seed: int = 0):
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    config_class, model_class = {
        "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
    }[family]
    config = config_class(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        ),
        vision_config=VISION[family],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return model_class(config).eval()


def image_processor():
    return transformers.Qwen2VLImageProcessorPil(
        min_pixels=32 * 32, max_pixels=64 * 64, patch_size=4, merge_size=2, temporal_patch_size=2
    )


def qwen_inputs(tokenizer, questions=QUESTIONS, sizes=SIZES) -> dict:
    """Left-padded batch: <|vision_start|> + one <|image_pad|> per merged token + <|vision_end|> + question."""
    images = image_processor()(
        images=[sample_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)], return_tensors="pt"
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    rows = []
    for grid, question in zip(images["image_grid_thw"], questions, strict=True):
        count = int(grid.prod()) // 4
        rows.append(
            [
                ids["<|vision_start|>"],
                *[ids["<|image_pad|>"]] * count,
                ids["<|vision_end|>"],
                *tokenizer(question)["input_ids"],
            ]
        )
    width = max(map(len, rows))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "mm_token_type_ids": (input_ids == ids["<|image_pad|>"]).int(),
        **images,
    }


def prune_copy(model, tokenizer, **fields):
    stage = {"method": "visual_token_pruning", "budget": 6, **fields}
    return hf_prune.prune(model, {"stages": [stage]}, tokenizer=tokenizer, progress=False).model.eval()


def test_budget_at_or_above_the_token_count_changes_nothing(tokenizer):
    stock = build_qwen2_vl(tokenizer)
    model = prune_copy(stock, tokenizer, budget=100)
    inputs = qwen_inputs(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, stock(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("family", "algorithm"), [(f, a) for f in FAMILIES for a in ["cdpruner", "pooling", "fastv", "random"]]
)
def test_kept_tokens_keep_their_rotary_positions(tokenizer, family, algorithm):
    model = prune_copy(build_qwen2_vl(tokenizer, family), tokenizer, algorithm=algorithm, fastv_layer=1)
    inputs = qwen_inputs(tokenizer)
    with torch.no_grad():
        out = model(**inputs)
        full, _ = model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        features = list(
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        )
        cut = model.prune_visual_tokens(
            inputs["input_ids"],
            inputs["attention_mask"],
            features,
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        assert cut["kept_tokens"] == [6, 6]
        for row in range(2):
            kept = cut["position_ids"][:, row][:, cut["attention_mask"][row].bool()]
            original = full[:, row][:, cut["keep"][row] & inputs["attention_mask"][row].bool()]
            assert torch.equal(kept, original)  # every kept token, visual or text, at its original position
        embeds = model.get_input_embeddings()(cut["input_ids"])
        image_mask = (cut["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, torch.cat(cut["features"]))
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=cut["attention_mask"], position_ids=cut["position_ids"]
        ).last_hidden_state
        torch.testing.assert_close(out.logits, model.lm_head(hidden), rtol=1e-5, atol=1e-5)
    assert torch.equal(cut["mm_token_type_ids"].bool(), cut["input_ids"] == model.config.image_token_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_the_pruned_forward_step_by_step(tokenizer, family):
    model = prune_copy(build_qwen2_vl(tokenizer, family), tokenizer, algorithm="cdpruner")
    inputs = qwen_inputs(tokenizer)
    instruction = [tokenizer(q, return_tensors="pt")["input_ids"][0] for q in QUESTIONS]
    with torch.no_grad():
        generated = model.generate(**inputs, instruction_ids=instruction, max_new_tokens=5, do_sample=False)
        ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
        vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}
        for _ in range(5):
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                mm_token_type_ids=types,
                instruction_ids=instruction,
                **vision,
            ).logits
            step = logits[:, -1].argmax(dim=-1, keepdim=True)
            ids, mask = torch.cat([ids, step], dim=1), torch.cat([mask, torch.ones_like(step)], dim=1)
            types = torch.cat([types, torch.zeros_like(step, dtype=types.dtype)], dim=1)
    assert torch.equal(generated, ids)


def test_depth_pruning_refuses_qwen2_vl(tokenizer):
    model = build_qwen2_vl(tokenizer)
    assert get_adapter(model.config).spec.token_pruning_only
    with pytest.raises(UnsupportedModelError, match="only visual token pruning supports it"):
        hf_prune.prune(model, {"stages": [{"method": "layer_drop", "layers": [1, 1]}]}, progress=False)


def test_a_clip_text_tower_is_refused_for_qwen2_vl(tokenizer, tmp_path):
    with pytest.raises(RecipeError, match=r"stages\[0\].text_tower: qwen2_vl has no CLIP vision tower"):
        hf_prune.prune(
            build_qwen2_vl(tokenizer),
            {"stages": [{"method": "visual_token_pruning", "budget": 4, "text_tower": str(tmp_path)}]},
            progress=False,
        )


RELOAD = r"""
import json, sys, torch
folder, mode = sys.argv[1], sys.argv[2]
inputs = json.loads(open(sys.argv[3]).read())
if mode == "hf_prune":
    import hf_prune
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=mode == "remote").eval()
inputs = {k: torch.tensor(v, dtype=torch.float32 if k == "pixel_values" else torch.long) for k, v in inputs.items()}
with torch.no_grad():
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
print(json.dumps({"class": type(model).__name__, "logits": logits.tolist(), "generated": generated.tolist(),
                  "hf_prune_imported": "hf_prune" in sys.modules}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_reloads_in_fresh_processes(tokenizer, tmp_path, family):
    result = hf_prune.prune(
        build_qwen2_vl(tokenizer, family),
        {
            "output": str(tmp_path / "out"),
            "stages": [{"method": "visual_token_pruning", "algorithm": "pooling", "budget": 4}],
        },
        tokenizer=tokenizer,
        progress=False,
    )
    saved = sorted(p.name for p in result.output.glob("*.py"))
    assert saved == [
        "clip_relevance.py",
        "patch_classes.py",
        "qwen2_vl_token_pruning.py",
        "token_selection.py",
        "visual_pruning_mixin.py",
        "visual_token_scoring.py",
    ]
    inputs = qwen_inputs(tokenizer)
    with torch.no_grad():
        logits = result.model(**inputs).logits
        generated = result.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    payload = tmp_path / "inputs.json"
    payload.write_text(json.dumps({k: v.tolist() for k, v in inputs.items()}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for mode in ("hf_prune", "remote"):
        done = subprocess.run(
            [sys.executable, "-c", RELOAD, str(result.output), mode, str(payload)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        reloaded = json.loads(done.stdout.strip().splitlines()[-1])
        assert (
            reloaded["class"]
            == {
                "qwen2_vl": "HfPruneQwen2VLForConditionalGeneration",
                "qwen2_5_vl": "HfPruneQwen2_5_VLForConditionalGeneration",
            }[family]
        )
        assert reloaded["hf_prune_imported"] == (mode == "hf_prune")
        torch.testing.assert_close(torch.tensor(reloaded["logits"]), logits, atol=1e-5, rtol=0)
        assert reloaded["generated"] == generated.tolist()
