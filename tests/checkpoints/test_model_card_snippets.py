"""The model card's loading snippet runs as printed, for every kind of checkpoint.

Each kind is pruned from a tiny random model into ``out/<kind>`` (relative, as a user would write it),
the python block of its README.md is cut out verbatim and run in a fresh process from the folder where
the prune ran, with stdin closed (a trust_remote_code prompt gets no answer instead of waiting, and is
caught) and without hf_prune ever imported. The loaded classes are named by hand, not read back from the
code under test.
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import build_processor, build_tiny_model, build_tokenizer, write_calibration_file

import hf_prune
from hf_prune.checkpoint import build_model_card
from hf_prune.model_card import PROMPT_PRUNING_SCORING, VISUAL_PRUNING_NOTE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Appended to every snippet: what it loaded, and proof that hf_prune stayed out of the process.
REPORT = """
import json as _json, sys as _sys
assert "hf_prune" not in _sys.modules, "the snippet imported hf_prune"
_loaded = {"model": type(model).__name__, "model_type": model.config.model_type}
for _name in ("tokenizer", "processor"):
    if _name in globals():
        _loaded[_name] = type(globals()[_name]).__name__
print("LOADED", _json.dumps(_loaded))
"""


@dataclass
class Kind:
    build: object  # () -> (model, tokenizer or processor)
    stage: dict
    model_class: str  # what the snippet must load, by name
    preprocessor: str  # "tokenizer" or "processor": the snippet's variable
    preprocessor_classes: tuple  # acceptable class names of what it loads
    note: str | None = None  # the usage paragraph the card must carry
    calibration: bool = False
    remote: bool = True
    extra: dict = field(default_factory=dict)


def _text(model_type):
    tokenizer = build_tokenizer()
    return build_tiny_model(model_type, tokenizer, damped_layer=None), tokenizer


def _llava():
    tokenizer = build_tokenizer(image_token=True)
    return build_tiny_model("llava", tokenizer, damped_layer=None), build_processor("llava", tokenizer)


def _qwen2_vl():
    """A tiny Qwen2-VL saved with its tokenizer only (the stock processor needs torchvision)."""
    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    ids = dict(zip(special, tokenizer.convert_tokens_to_ids(special), strict=True))
    config = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        ),
        vision_config=dict(
            depth=1, embed_dim=16, hidden_size=16, num_heads=2, patch_size=4, spatial_merge_size=2
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    return transformers.Qwen2VLForConditionalGeneration(config).eval(), tokenizer


def _bert(tmp_path):
    words = sorted(set(re.findall(r"[a-z]+", "the quick brown fox jumps over a lazy dog and runs away")))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval(), tokenizer


TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend", "LlamaTokenizer", "LlamaTokenizerFast")
BERT_TOKENIZERS = ("BertTokenizer", "BertTokenizerFast")
EXPERTS = {"method": "expert_pruning", "algorithm": "router_weight"}

KINDS = {
    "layer_drop": Kind(
        lambda _: _text("llama"),
        {"method": "layer_drop", "layers": [1, 1]},
        "LlamaForCausalLM",
        "tokenizer",
        TOKENIZERS,
        remote=False,
    ),
    "uniform_experts": Kind(
        lambda _: _text("mixtral"),
        {**EXPERTS, "keep_experts": 3},
        "MixtralForCausalLM",
        "tokenizer",
        TOKENIZERS,
        calibration=True,
        remote=False,
    ),
    "nonuniform_experts": Kind(
        lambda _: _text("mixtral"),
        {**EXPERTS, "uniform": False, "keep_ratio": 0.75},
        "HfPruneMixtralForCausalLM",
        "tokenizer",
        TOKENIZERS,
        calibration=True,
    ),
    "llava_visual_tokens": Kind(
        lambda _: _llava(),
        {"method": "visual_token_pruning", "algorithm": "random", "budget": 4},
        "HfPruneLlavaForConditionalGeneration",
        "processor",
        ("LlavaProcessor",),
        note=VISUAL_PRUNING_NOTE,
    ),
    "qwen2_vl_visual_tokens": Kind(
        lambda _: _qwen2_vl(),
        {"method": "visual_token_pruning", "algorithm": "random", "budget": 4},
        "HfPruneQwen2VLForConditionalGeneration",
        "processor",
        TOKENIZERS,  # AutoProcessor returns the tokenizer when only that was saved
        note=VISUAL_PRUNING_NOTE,
    ),
    "bert_text_tokens": Kind(
        _bert,
        {"method": "text_token_pruning", "algorithm": "random", "keep_ratio": 0.5},
        "HfPruneBertForSequenceClassification",
        "tokenizer",
        BERT_TOKENIZERS,
    ),
    "llama_prompt_tokens": Kind(
        lambda _: _text("llama"),
        {"method": "text_token_pruning", "algorithm": "random", "keep_ratio": 0.5},
        "HfPruneLlamaForCausalLM",
        "tokenizer",
        TOKENIZERS,
        note=PROMPT_PRUNING_SCORING,
    ),
}


def python_blocks(card: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", card, flags=re.DOTALL | re.MULTILINE)


def run_snippet(code: str, cwd: Path) -> subprocess.Popen:
    """The snippet as printed, plus REPORT, in a fresh interpreter that cannot answer a prompt."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)
    return subprocess.Popen(
        [sys.executable, "-c", code + REPORT],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_every_kind_of_checkpoint_loads_with_its_card_snippet_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs are given relative, as `output: out/<kind>` in a recipe
    calibration = write_calibration_file(tmp_path / "calib.txt", num_chars=6000)
    cards = {}
    for name, kind in KINDS.items():
        model, preprocessor = kind.build(tmp_path)
        recipe = {"output": f"out/{name}", "stages": [kind.stage]}
        if kind.calibration:
            recipe["calibration"] = {"data": str(calibration), "num_samples": 4, "seq_len": 16}
        result = hf_prune.prune(model, recipe, tokenizer=preprocessor, progress=False)
        assert result.output == tmp_path / "out" / name
        saved_type = json.loads((result.output / "config.json").read_text())["model_type"]
        assert saved_type.startswith("hf_prune_") == kind.remote, saved_type
        card = (result.output / "README.md").read_text()
        blocks = python_blocks(card)
        assert len(blocks) == 1, card
        assert f'.from_pretrained("out/{name}"' in blocks[0]
        for note in (PROMPT_PRUNING_SCORING, VISUAL_PRUNING_NOTE):
            assert (note in card) == (note == kind.note), (name, note)
        cards[name] = (blocks[0], saved_type)

    # As printed, and for remote-code kinds also with the tokenizer / processor loaded first: alone in a
    # fresh process it needs trust_remote_code too (the model's line no longer registers the config).
    runs = {(name, False): code for name, (code, _) in cards.items()}
    runs.update(
        {(name, True): preprocessor_first(cards[name][0]) for name, kind in KINDS.items() if kind.remote}
    )
    keys = list(runs)
    for start in range(0, len(keys), 2):  # two at a time: the interpreters spend their time importing
        running = {key: run_snippet(runs[key], tmp_path) for key in keys[start : start + 2]}
        for (name, swapped), process in running.items():
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, f"{name}:\n{runs[name, swapped]}\n{stderr[-3000:]}"
            # With stdin closed transformers takes the prompt's answer as "no" and may load on regardless.
            assert "wish to run the custom code" not in stdout + stderr, (
                f"{name} prompted:\n{runs[name, swapped]}"
            )
            loaded = json.loads(stdout.rpartition("LOADED ")[2])
            kind = KINDS[name]
            assert loaded["model"] == kind.model_class and loaded["model_type"] == cards[name][1], name
            assert loaded.get(kind.preprocessor) in kind.preprocessor_classes, (name, loaded)


def preprocessor_first(code: str) -> str:
    """The snippet with its last line (the tokenizer / processor) moved before the model's line."""
    lines = code.rstrip("\n").splitlines()
    assert lines[-2].startswith("model = ") and "from_pretrained(" in lines[-1]
    return "\n".join([*lines[:-2], lines[-1], lines[-2]]) + "\n"


def test_the_loading_target_is_a_parameter_for_a_hub_repo_id():
    report = {
        "recipe": {"model": "org/base", "output": "out/pruned"},
        "stages": [{"method": "text_token_pruning"}],
        "params_before": 100,
        "params_after": 90,
    }
    local = build_model_card(report, model_type="hf_prune_qwen2", token_pruning=True)
    hub = build_model_card(
        report, model_type="hf_prune_qwen2", token_pruning=True, load_from="someone/pruned"
    )
    assert python_blocks(local) == [
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("out/pruned", trust_remote_code=True)\n'
        'tokenizer = AutoTokenizer.from_pretrained("out/pruned", trust_remote_code=True)\n'
    ]
    assert python_blocks(hub) == [python_blocks(local)[0].replace('"out/pruned"', '"someone/pruned"')]
    assert "relative to where it ran" in local and "relative to where it ran" not in hub
    assert PROMPT_PRUNING_SCORING in local and "# pruned" in hub  # the title stays the folder's name
    stock = build_model_card(report, preprocessor_class=None)  # nothing saved: no tokenizer line
    assert python_blocks(stock) == [
        'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("out/pruned")\n'
    ]
