"""A visual-token-pruned LLaVA / LLaVA-NeXT checkpoint reloads in fresh processes and prunes by itself."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_model, sample_image, save_tiny_clip, save_tiny_model

import hf_prune

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PROMPTS = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nname the colours ASSISTANT:"]

RELOAD = r"""
import json, sys, numpy as np, torch
from PIL import Image
folders, mode = json.loads(sys.argv[1]), sys.argv[2]
if mode == "hf_prune":
    import hf_prune
from transformers import AutoModelForImageTextToText, AutoProcessor
out = {"hf_prune_imported": "hf_prune" in sys.modules}
for name, (folder, prompts, images) in folders.items():
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=mode == "remote").eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    pictures = [Image.fromarray(np.array(i, dtype=np.uint8)) for i in images]
    inputs = processor(images=pictures, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    out[name] = {"class": type(model).__name__, "token_pruning": model.config.token_pruning,
                 "relevance_tokenizers": sorted(getattr(model, "relevance_tokenizers", None) or []),
                 "logits": logits.tolist(), "generated": generated.tolist()}
print(json.dumps(out))
"""


def test_pruned_checkpoints_reload_in_fresh_processes(tmp_path):
    images = [sample_image(seed=5), sample_image(seed=6)]
    cases, expected = {}, {}
    clip = save_tiny_clip(tmp_path / "clip", build_tiny_model("llava").model.vision_tower)
    types = {}
    for name, model_type, algorithm, extra in (
        ("llava", "llava", "cdpruner", {}),
        ("llava_next", "llava_next", "fastv", {}),
        ("llava_clip", "llava", "cdpruner", {"text_tower": str(clip)}),
    ):
        source = save_tiny_model(model_type, tmp_path / f"{name}-src")
        stage = {
            "method": "visual_token_pruning",
            "algorithm": algorithm,
            "budget": 4,
            "fastv_layer": 1,
            **extra,
        }
        result = hf_prune.prune(
            {"model": str(source), "output": str(tmp_path / name), "stages": [stage]}, progress=False
        )
        types[name] = model_type
        assert (result.output / "visual_token_pruning.py").is_file() and (
            result.output / "clip_relevance.py"
        ).is_file()
        assert (result.output / "processor_config.json").is_file()
        saved = json.loads((result.output / "config.json").read_text())
        assert saved["model_type"] == f"hf_prune_{model_type}" and saved["token_pruning"]["budget"] == 4
        assert "AutoModelForImageTextToText" in saved["auto_map"]
        processor = result.tokenizer
        processor.tokenizer.padding_side = "left"
        inputs = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            expected[name] = (
                result.model(**inputs).logits,
                result.model.generate(**inputs, max_new_tokens=5, do_sample=False),
            )
        assert expected[name][0].shape[1] < inputs["input_ids"].shape[1]  # it did prune
        cases[name] = (str(result.output), PROMPTS, [np.asarray(i).tolist() for i in images])  # H×W×3 lists
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    for mode in ("hf_prune", "remote"):
        done = subprocess.run(
            [sys.executable, "-c", RELOAD, json.dumps(cases), mode],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        reloaded = json.loads(done.stdout.strip().splitlines()[-1])
        assert reloaded.pop("hf_prune_imported") == (mode == "hf_prune")
        for name, (logits, generated) in expected.items():
            got, model_type = reloaded[name], types[name]
            assert got["relevance_tokenizers"] == (["clip", "language"] if name == "llava_clip" else [])
            assert (
                got["class"]
                == f"HfPrune{'LlavaNext' if model_type == 'llava_next' else 'Llava'}ForConditionalGeneration"
            )
            torch.testing.assert_close(torch.tensor(got["logits"]), logits, atol=1e-5, rtol=0)
            assert got["generated"] == generated.tolist()
