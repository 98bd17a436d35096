"""Prompt token pruning inside causal LMs (Llama, Qwen2, Mistral): layers before ``layer`` see every prompt
token, the rest only the kept ones; the KV cache holds the kept tokens in every layer, and decoding continues
from it. Contract: generate = the pruned forward step by step, a padded batch = each prompt alone, keep_ratio 1
= the stock model, layer 0 = the stock model on the cut prompt, original rotary positions, sampling, fresh-
process reloads and bad settings."""

import pytest
import torch
from fresh_process import generate_after_reload
from hf_prune.model_patches import prompt_token_pruning
from hf_prune.model_patches.patch_classes import cut_rows
from tiny_models import NUM_LAYERS, build_tiny_model, build_tokenizer

import hf_prune
from hf_prune.errors import RecipeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "The for statement iterates over the items of any sequence, in order, as they appear.",
    "Modules can import other modules.",
    "A function definition associates a name with code.",
]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def stock_models(tokenizer):
    return {family: build_tiny_model(family, tokenizer) for family in prompt_token_pruning.FAMILIES}


def pruned(stock, **settings):
    stage = {"method": "text_token_pruning", **settings}
    return hf_prune.prune(stock, {"stages": [stage]}, progress=False).model.eval()


def generation_positions(mask: torch.Tensor) -> torch.Tensor:
    """The rotary positions ``generate`` gives a left-padded prompt."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize(
    ("family", "algorithm", "layer"),
    [("llama", "attention", 1), ("qwen2", "random", 3), ("mistral", "attention", 2)],
)
def test_generate_equals_the_pruned_forward_step_by_step(stock_models, tokenizer, family, algorithm, layer):
    model = pruned(stock_models[family], algorithm=algorithm, keep_ratio=0.4, layer=layer)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        out = model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=True)
        width = out.logits.shape[1]
        assert out.kept_tokens.sum(1).tolist() == [
            2 + -(-(int(n) - 2) * 4 // 10) for n in inputs["attention_mask"].sum(1)
        ]
        assert width == int(out.kept_tokens.sum(1).max())
        # Every layer's cache holds exactly the kept prompt tokens.
        assert [entries.get_seq_length() for entries in out.cache.layers] == [width] * NUM_LAYERS
        cache, mask, steps = out.cache, inputs["attention_mask"], [out.logits[:, -1]]
        for _ in range(5):  # the caller's mask over its whole sequence; positions left to the model
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=steps[-1].argmax(-1, keepdim=True), attention_mask=mask, cache=cache)
            steps.append(out.logits[:, -1])
    assert torch.equal(generated.sequences[:, :length], inputs["input_ids"])  # the caller's own prompt
    assert torch.equal(generated.sequences[:, length:], torch.stack([s.argmax(-1) for s in steps], dim=1))
    for expected, got in zip(generated.logits, steps, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "algorithm"), [("llama", "attention"), ("qwen2", "attention"), ("llama", "random")]
)
def test_a_padded_batch_generates_as_each_prompt_alone(stock_models, tokenizer, family, algorithm):
    model = pruned(stock_models[family], algorithm=algorithm, keep_ratio=0.5, layer=2)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = model.generate(**inputs, max_new_tokens=6, do_sample=False)[
            :, inputs["input_ids"].shape[1] :
        ]
        for row, prompt in enumerate(PROMPTS):
            alone = tokenizer([prompt], return_tensors="pt")
            assert torch.equal(
                model.generate(**alone, max_new_tokens=6, do_sample=False)[0, alone["input_ids"].shape[1] :],
                together[row],
            )


@pytest.mark.parametrize("family", list(prompt_token_pruning.FAMILIES))
def test_keep_ratio_one_is_the_stock_model(stock_models, tokenizer, family):
    stock = stock_models[family]
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = stock(**inputs).logits[real]
        expected_tokens = stock.generate(**inputs, max_new_tokens=6, do_sample=False)
        for settings in ({"algorithm": "attention", "layer": 2}, {"algorithm": "random", "layer": 0}):
            model = pruned(stock, keep_ratio=1.0, **settings)
            # Padding rows differ (eager and SDPA fill fully masked rows differently); real tokens do not.
            prefill = model(**inputs, use_cache=True).logits[real]
            torch.testing.assert_close(prefill, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected_tokens)


def test_layer_zero_is_the_stock_model_on_the_cut_prompt(stock_models, tokenizer):
    stock = stock_models["llama"]
    model = pruned(stock, algorithm="random", keep_ratio=0.4, layer=0, seed=3)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # No label on padding, nor on the first real token (padding would predict it, and padding differs).
    labels = ids.masked_fill((mask == 0) | ((mask.cumsum(-1) == 1) & (mask == 1)), -100)
    with torch.no_grad():
        out = model(**inputs, labels=labels, use_cache=True)  # a prefill
        keep = out.kept_tokens
        # Which tokens: the first and last real ones and the best ⌈0.4·n⌉ others by seeded random scores,
        # the i-th draw going to a row's i-th real token.
        draws = torch.rand(ids.shape[1], generator=torch.Generator().manual_seed(3))
        for row in range(len(PROMPTS)):
            real = mask[row].nonzero().flatten()
            others = real[1:-1][
                draws[1 : len(real) - 1].argsort(descending=True)[: -(-(len(real) - 2) * 4 // 10)]
            ]
            assert set(keep[row].nonzero().flatten().tolist()) == {
                int(real[0]),
                int(real[-1]),
                *others.tolist(),
            }
        # The same as the stock model fed the cut prompt at the kept tokens' original positions.
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        cut = {
            "input_ids": cut_rows(ids, keep, 0),
            "attention_mask": cut_rows(mask, keep, 0),
            "position_ids": cut_rows(positions, keep, 0),
            "labels": cut_rows(labels, keep, -100),
        }
        expected = stock(**cut)
        real = cut["attention_mask"].bool()
        torch.testing.assert_close(out.logits[real], expected.logits[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        reference = stock.generate(
            input_ids=cut["input_ids"],
            attention_mask=cut["attention_mask"],
            max_new_tokens=6,
            position_ids=cut_rows(generation_positions(mask), keep, 0),
            do_sample=False,
        )
    assert torch.equal(generated[:, ids.shape[1] :], reference[:, cut["input_ids"].shape[1] :])


def test_kept_tokens_keep_their_rotary_positions_and_cache_entries(stock_models, tokenizer):
    stock, split = stock_models["llama"], 2
    model = pruned(stock, algorithm="attention", keep_ratio=0.5, layer=split)
    ids = tokenizer([PROMPTS[0]], return_tensors="pt")["input_ids"]
    decoder = stock.model

    def by_hand(keep: torch.Tensor, renumber: bool = False) -> torch.Tensor:
        """Layers < split on every token at 0..L-1, then only the kept tokens, each at its own position."""
        hidden, positions = decoder.embed_tokens(ids), torch.arange(ids.shape[1])[None]
        for index, layer in enumerate(decoder.layers):
            if index == split:
                hidden, positions = hidden[:, keep], positions[:, keep]
                positions = torch.arange(positions.shape[1])[None] if renumber else positions
            causal = torch.full((hidden.shape[1],) * 2, float("-inf")).triu(1)[None, None]
            hidden = layer(
                hidden,
                attention_mask=causal,
                position_embeddings=decoder.rotary_emb(hidden, positions),
                position_ids=positions,
            )
        return stock.lm_head(decoder.norm(hidden))

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        keep = out.kept_tokens[0]
        assert 0 < int(keep.sum()) < ids.shape[1]
        torch.testing.assert_close(out.logits, by_hand(keep), rtol=1e-5, atol=1e-5)
        assert (out.logits - by_hand(keep, renumber=True)).abs().max() > 1e-3  # positions matter here
        full = stock(input_ids=ids, use_cache=True).cache
        for index in range(split):  # the layers before the cut: their full-prompt entries, cropped
            torch.testing.assert_close(out.cache.layers[index].keys, full.layers[index].keys[:, :, keep])
            torch.testing.assert_close(out.cache.layers[index].values, full.layers[index].values[:, :, keep])
        # Decoding without position_ids continues at the original prompt length.
        step = model(input_ids=ids[:, -1:], cache=out.cache).logits
        hand_cache = stock(input_ids=ids, use_cache=True).cache
        for index, entries in enumerate(hand_cache.layers):
            entries.keys, entries.values = (
                out.cache.layers[index].keys[:, :, :-1],
                out.cache.layers[index].values[:, :, :-1],
            )
        expected = stock(
            input_ids=ids[:, -1:],
            cache=hand_cache,
            position_ids=torch.tensor([[ids.shape[1]]]),
            attention_mask=torch.ones(1, int(keep.sum()) + 1, dtype=torch.long),
        ).logits
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)


def test_sampling_works(stock_models, tokenizer):
    model = pruned(stock_models["mistral"], algorithm="attention", keep_ratio=0.5, layer=1)
    inputs = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            runs.append(
                model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=20, num_return_sequences=2)
            )
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (4, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(runs[0][::2, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert len({tuple(row) for row in runs[0][:, inputs["input_ids"].shape[1] :].tolist()}) > 1


@pytest.mark.slow
def test_save_and_reload_in_a_fresh_process(stock_models, tokenizer, tmp_path):
    result = hf_prune.prune(
        stock_models["qwen2"],
        {
            "output": str(tmp_path / "out"),
            "stages": [
                {"method": "text_token_pruning", "algorithm": "attention", "keep_ratio": 0.4, "layer": 2}
            ],
        },
        tokenizer=tokenizer,
        progress=False,
    )
    assert {"prompt_token_pruning.py", "prompt_prefill.py", "patch_classes.py"} <= {
        p.name for p in result.output.iterdir()
    }
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = result.model.eval().generate(**inputs, max_new_tokens=6, do_sample=False).tolist()
    for mode, got in generate_after_reload(result.output, inputs, tmp_path).items():
        assert got["class"] == "HfPruneQwen2ForCausalLM" and got["hf_prune"] == (mode == "hf_prune")
        assert got["tokens"] == expected


def test_bad_settings_name_the_key(stock_models):
    llama = stock_models["llama"]
    with pytest.raises(RecipeError, match=r"stages\[0\]\.layer: attention scores come from the layer before"):
        pruned(llama, algorithm="attention", keep_ratio=0.5, layer=0)
    with pytest.raises(
        RecipeError, match=rf"stages\[0\]\.layer: must be below the model's {NUM_LAYERS} layers"
    ):
        pruned(llama, algorithm="random", keep_ratio=0.5, layer=NUM_LAYERS)
    with pytest.raises(RecipeError, match=r"stages\[0\]\.train_data: adtp learns its saliency"):
        pruned(llama, algorithm="adtp")
    config_class = prompt_token_pruning.CLASSES["llama"][0]
    with pytest.raises(
        ValueError, match=r"token_pruning\.layer: attention scores come from the layer before"
    ):
        config_class(
            num_hidden_layers=2, token_pruning={"algorithm": "attention", "keep_ratio": 0.5, "layer": 0}
        )
    with pytest.raises(
        ValueError, match=r"token_pruning\.layer: must be an integer >= 0 and below the 2 layers, got 2"
    ):
        config_class(
            num_hidden_layers=2, token_pruning={"algorithm": "random", "keep_ratio": 0.5, "layer": 2}
        )


def test_prefill_flops_count_all_tokens_before_the_layer():
    from hf_prune.evals.flops import analytic_flops_per_token

    stock = build_tiny_model("llama").config  # 4 identical layers
    config_class = prompt_token_pruning.CLASSES["llama"][0]

    def prefill(config, n):  # whole prefill, not per token
        return analytic_flops_per_token(config, n)["prefill_flops_per_token"] * n

    kept = 2 + -(-(16 - 2) // 2)  # 9 of 16 at keep_ratio 0.5
    for layer in range(NUM_LAYERS):
        config = config_class.from_dict(
            {**stock.to_dict(), "token_pruning": {"algorithm": "random", "keep_ratio": 0.5, "layer": layer}}
        )
        got = analytic_flops_per_token(config, 16)
        assert got["language_model_tokens"] == kept
        # layer of the 4 layers on 16 tokens, the rest on 9, one head (the last token's logits)
        expected = (layer * prefill(stock, 16) + (NUM_LAYERS - layer) * prefill(stock, kept)) / NUM_LAYERS
        assert got["prefill_flops_per_token"] * 16 == pytest.approx(expected, rel=1e-12)
        assert (
            got["decode_flops_per_token"] == analytic_flops_per_token(stock, kept)["decode_flops_per_token"]
        )
