"""Learned prompt pruning in causal LMs (``adtp`` / ``fixed``): the retainer trains through ``hf_prune.prune``
on a plain text file, keep_ratio 1 is the stock model, generate = the pruned forward step by step, the ratio
head gives prompts their own ratios, the retainer reloads in a fresh process, and bad input names its key."""

import pytest
import torch
from fresh_process import generate_after_reload
from hf_prune.model_patches.prompt_retainer import PromptRetainer, chosen_ratios
from test_prompt_token_pruning import PROMPTS
from tiny_models import NUM_LAYERS, build_tiny_model, build_tokenizer

import hf_prune
from hf_prune.errors import DataError, RecipeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINING = {
    "train_steps": 4,
    "batch_size": 4,
    "max_length": 24,
    "continuation_length": 8,
    "ig_steps": 2,
    "target_ratio": 0.5,
    "learning_rate": 1e-2,
}


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def stock(tokenizer):
    return build_tiny_model("llama", tokenizer)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(" ".join(PROMPTS * 12))
    return path


def pruned(stock, tokenizer, text_file, **settings):
    stage = {"method": "text_token_pruning", "train_data": str(text_file), **TRAINING, **settings}
    return hf_prune.prune(stock, {"stages": [stage]}, tokenizer=tokenizer, progress=False)


def kept_count(n: int, ratio: float) -> int:
    """First and last real token plus ⌈ratio·(n − 2)⌉ of the others."""
    return 2 + int(torch.ceil(torch.tensor(ratio * (n - 2) - 1e-6)))


def test_training_through_prune_changes_the_retainer(stock, tokenizer, text_file):
    result = pruned(stock, tokenizer, text_file, algorithm="adtp", layer=1)
    training = result.report["stages"][0]["training"]
    assert (
        training["steps"] == 4
        and training["windows"] >= 4
        and set(training["final"]) >= {"task", "distill", "flops"}
    )
    torch.manual_seed(0)  # the stage's seed: the retainer it starts from
    untrained = PromptRetainer(stock.config.hidden_size, 6, 64)
    trained = result.model.retainer.state_dict()
    assert set(trained) == set(untrained.state_dict())
    assert any(not torch.equal(trained[k], v) for k, v in untrained.state_dict().items())
    backbone = {k: v for k, v in result.model.state_dict().items() if not k.startswith("retainer.")}
    assert all(torch.equal(v, stock.state_dict()[k]) for k, v in backbone.items())  # frozen
    assert result.model.config.token_pruning["algorithm"] == "adtp"


def test_fixed_keep_ratio_one_is_the_stock_model(stock, tokenizer, text_file):
    model = pruned(stock, tokenizer, text_file, algorithm="fixed", keep_ratio=1.0, layer=2).model
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs, use_cache=True).logits[real], stock(**inputs).logits[real], rtol=1e-5, atol=1e-5
        )
        assert torch.equal(
            model.generate(**inputs, max_new_tokens=6, do_sample=False),
            stock.generate(**inputs, max_new_tokens=6, do_sample=False),
        )


@pytest.mark.parametrize(("family", "layer"), [("llama", 0), ("qwen2", 1), ("mistral", 2)])
def test_adtp_generate_equals_the_pruned_forward_step_by_step(stock, tokenizer, text_file, family, layer):
    """Trained on each family (Mistral: a sliding window shorter than the prompts), then decoded."""
    base = stock if family == "llama" else build_tiny_model(family, tokenizer)
    model = pruned(base, tokenizer, text_file, algorithm="adtp", layer=layer).model
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        out = model(**inputs, position_ids=positions, use_cache=True)
        ratios = (
            None
            if layer
            else chosen_ratios(
                model.settings,
                model.retainer(
                    model.model.embed_tokens(inputs["input_ids"]), inputs["attention_mask"].bool()
                )[1],
            )
        )
        assert ratios is None or out.kept_tokens.sum(1).tolist() == [
            kept_count(int(n), float(r)) for n, r in zip(inputs["attention_mask"].sum(1), ratios, strict=True)
        ]
        cache, mask, steps = out.cache, inputs["attention_mask"], [out.logits[:, -1]]
        for _ in range(4):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=steps[-1].argmax(-1, keepdim=True), attention_mask=mask, cache=cache)
            steps.append(out.logits[:, -1])
    assert torch.equal(generated.sequences[:, :length], inputs["input_ids"])
    assert torch.equal(generated.sequences[:, length:], torch.stack([s.argmax(-1) for s in steps], dim=1))
    for expected, got in zip(generated.logits, steps, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_sharp_ratio_head_gives_prompts_their_own_ratios(stock, tokenizer, text_file):
    model = pruned(stock, tokenizer, text_file, algorithm="adtp", layer=0, train_steps=1).model
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    candidates = model.settings["candidate_ratios"]
    mask = inputs["attention_mask"].bool()
    embeddings = model.model.embed_tokens(inputs["input_ids"]).detach()
    means = (embeddings * mask[..., None]).sum(1) / mask.sum(
        1, keepdim=True
    )  # the pooled mean the head reads
    dim = int((means.amax(0) * -means.amin(0)).argmax())  # a coordinate of both signs
    with torch.no_grad():  # ratio 0.2 where the prompt's mean coordinate is positive, else 0.7
        first, second = model.retainer.ratio[0], model.retainer.ratio[2]
        for parameter in (*first.parameters(), *second.parameters()):
            parameter.zero_()
        first.weight[0, dim] = 1000.0
        second.weight[candidates.index(0.2), 0] = 1.0
        second.bias[candidates.index(0.7)] = 0.1
        expected = [0.2 if float(m[dim]) * 1000 > 0.1 else 0.7 for m in means]
        assert len(set(expected)) == 2
        out = model(**inputs, use_cache=True)  # a prefill
        for row, prompt in enumerate(PROMPTS):
            n = int(inputs["attention_mask"][row].sum())
            assert int(out.kept_tokens[row].sum()) == kept_count(n, expected[row])
            alone = tokenizer([prompt], return_tensors="pt")
            assert torch.equal(
                model.generate(**alone, max_new_tokens=4, do_sample=False)[0, alone["input_ids"].shape[1] :],
                model.generate(**inputs, max_new_tokens=4, do_sample=False)[
                    row, inputs["input_ids"].shape[1] :
                ],
            )


@pytest.mark.slow
def test_save_and_reload_in_a_fresh_process(stock, tokenizer, text_file, tmp_path):
    stage = {
        "method": "text_token_pruning",
        "algorithm": "adtp",
        "layer": 1,
        "train_data": str(text_file),
        **TRAINING,
    }
    result = hf_prune.prune(
        stock, {"output": str(tmp_path / "out"), "stages": [stage]}, tokenizer=tokenizer, progress=False
    )
    assert "prompt_retainer.py" in {p.name for p in result.output.iterdir()}
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    model = result.model.eval()
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=6, do_sample=False).tolist()
    retainer_sum = sum(float(p.detach().double().sum()) for p in model.retainer.parameters())
    for mode, got in generate_after_reload(result.output, inputs, tmp_path).items():
        assert got["class"] == "HfPruneLlamaForCausalLM" and got["hf_prune"] == (mode == "hf_prune")
        assert got["retainer"] == pytest.approx(
            retainer_sum, abs=1e-9
        )  # the trained weights, not a fresh init
        assert got["tokens"] == expected


def test_bad_input_names_the_key(stock, tokenizer, text_file, tmp_path):
    with pytest.raises(RecipeError, match=r"stages\[0\]\.train_data: adtp learns its saliency"):
        hf_prune.prune(
            stock, {"stages": [{"method": "text_token_pruning", "algorithm": "adtp"}]}, progress=False
        )
    with pytest.raises(RecipeError, match=r"stages\[0\]\.train_data: file not found: .*missing\.txt"):
        pruned(stock, tokenizer, tmp_path / "missing.txt", algorithm="adtp")
    short = tmp_path / "short.txt"
    short.write_text(PROMPTS[1])
    with pytest.raises(
        DataError, match=r"train_data: .*short\.txt gives 1 windows of 24 tokens, fewer than one batch"
    ):
        pruned(stock, tokenizer, short, algorithm="fixed", keep_ratio=0.5)
    with pytest.raises(RecipeError, match=r"stages\[0\]\.keep_ratio"):
        pruned(stock, tokenizer, text_file, algorithm="fixed")
    with pytest.raises(
        RecipeError, match=rf"stages\[0\]\.layer: must be below the model's {NUM_LAYERS} layers"
    ):
        pruned(stock, tokenizer, text_file, algorithm="adtp", layer=NUM_LAYERS)
