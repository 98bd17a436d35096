"""The token-pruned encoder classifiers' forward against the stock model: the inputs it passes on
(token types, positions, embeddings), its refusals, its outputs (loss, ratio logits) and adtp's choice at
inference, each checked by hand or by the stock class with the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from hf_prune.model_patches import text_token_pruning
from test_token_selection import BERT_TEXTS, encoder_classifier, kept_by_hand

import hf_prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bert_tokenizer():
    from test_token_selection import WORDS

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})


def pruned(family, tokenizer, monkeypatch=None, **stage):
    if monkeypatch is not None:
        monkeypatch.setattr(
            "hf_prune.methods.tokens.encoder_retainer_training.train_token_retainer", lambda *a, **k: {}
        )
    stage = {"method": "text_token_pruning", **stage}
    model = encoder_classifier(family, len(tokenizer))
    return hf_prune.prune(model, {"stages": [stage]}, tokenizer=tokenizer, progress=False).model.eval()


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_forward_passes_positions_types_and_embeddings_on(bert_tokenizer, family):
    """Nothing dropped (keep_ratio 1): with explicit token types, shifted positions or given input
    embeddings the logits are the stock model's on the same inputs."""
    model = pruned(family, bert_tokenizer, algorithm="random", layer=2, keep_ratio=1.0)
    stock = encoder_classifier(family, len(bert_tokenizer))
    inputs = dict(bert_tokenizer(BERT_TEXTS, padding=True, return_tensors="pt"))
    types = inputs.pop("token_type_ids")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cases = [{"position_ids": torch.arange(ids.shape[1]).expand_as(ids) + 3}]
    embeddings = stock.get_input_embeddings()(ids) * 1.5
    cases.append({"inputs_embeds": embeddings})
    if family == "bert":  # DistilBERT has no token types
        cases.append({"token_type_ids": (torch.arange(ids.shape[1]) > 4).long().expand_as(types)})
    with torch.no_grad():
        plain = stock(**inputs).logits
        for extra in cases:
            expected = stock(
                **({"attention_mask": mask, **extra} if "inputs_embeds" in extra else {**inputs, **extra})
            )
            got = model(**inputs, **extra)
            torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(expected.logits, plain, atol=1e-4), extra  # the input mattered
            assert got.loss is None  # no labels, no loss
            assert got.kept_fraction.tolist() == [1.0] * len(ids)


def test_forward_refusals(bert_tokenizer):
    inputs = dict(bert_tokenizer(BERT_TEXTS, padding=True, return_tensors="pt"))
    for algorithm in ("random", "attention"):
        model = pruned("bert", bert_tokenizer, algorithm=algorithm, layer=1, keep_ratio=0.5)
        with pytest.raises(ValueError, match=f"keep_ratios: {algorithm} has no retainer saliency"):
            model(**inputs, keep_ratios=torch.full((4,), 0.5))
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="token pruning needs input_ids"):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    # The attention algorithm runs one layer eagerly, and leaves the model's setting as it found it.
    before = model.config._attn_implementation
    model(**inputs)
    assert model.config._attn_implementation == before


def test_regression_head_loss_is_mse(bert_tokenizer):
    config = transformers.BertConfig(
        vocab_size=len(bert_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    stage = {"method": "text_token_pruning", "algorithm": "random", "layer": 1, "keep_ratio": 0.5}
    model = hf_prune.prune(
        transformers.BertForSequenceClassification(config).eval(),
        {"stages": [stage]},
        tokenizer=bert_tokenizer,
        progress=False,
    ).model.eval()
    inputs = dict(bert_tokenizer(BERT_TEXTS, padding=True, return_tensors="pt"))
    labels = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = model(**inputs, labels=labels)
    expected = sum((float(out.logits.detach()[b, 0]) - float(labels[b])) ** 2 for b in range(4)) / 4
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)


def test_adtp_at_inference_prunes_hard_at_the_cheapest_ratio(bert_tokenizer, monkeypatch):
    """Eval mode: each row takes the candidate ratio with the lowest predicted cost + price·ratio (ratio
    logits = −that), keeps ⌈ρ·n⌉ tokens by saliency; a retainer without a price is refused."""
    ratios = [0.3, 0.6, 1.0]
    model = pruned(
        "bert",
        bert_tokenizer,
        monkeypatch,
        algorithm="adtp",
        layer=1,
        candidate_ratios=ratios,
        train_data="unused.jsonl",
    )
    inputs = dict(bert_tokenizer(BERT_TEXTS, padding=True, return_tensors="pt"))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        model.retainer.price.fill_(float("nan"))
        with pytest.raises(ValueError, match="never trained; train it again"):
            model(**inputs)
        for p in model.retainer.ratio.parameters():
            p.mul_(20)
        model.retainer.price.fill_(0.0)  # read the costs, then pick a price at which the rows differ
        costs = model(**inputs).predicted_costs

        def choice(price, b):
            return min(range(3), key=lambda r: float(costs[b, r]) + price * ratios[r])

        price = next(p / 4 for p in range(400) if len({choice(p / 4, b) for b in range(4)}) >= 2)
        model.retainer.price.fill_(price)
        out = model(**inputs)
    expected_logits = -(costs + price * torch.tensor(ratios))
    torch.testing.assert_close(out.ratio_logits, expected_logits, rtol=1e-5, atol=1e-5)
    chosen = [ratios[choice(price, b)] for b in range(4)]
    assert out.chosen_ratio.tolist() == pytest.approx(chosen)
    specials = {bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id}
    expected = kept_by_hand(ids, mask, out.saliency, chosen, specials)
    for b, kept in enumerate(expected):
        assert float(out.kept_fraction[b]) == pytest.approx(len(kept) / int(mask[b].sum()))
        assert len(kept) < int(mask[b].sum()) or math.isclose(chosen[b], 1.0)


def test_settings_are_checked_against_the_layer_count():
    shared = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    )
    bad = {"algorithm": "random", "layer": 3, "keep_ratio": 0.5}
    with pytest.raises(
        ValueError, match="token_pruning.layer: must be an integer >= 0 and below the 3 layers"
    ):
        text_token_pruning.HfPruneBertConfig(token_pruning=bad, **shared)
    config = text_token_pruning.HfPruneBertConfig(
        token_pruning={"algorithm": "random", "layer": 1, "keep_ratio": 0.5}, **shared
    )
    config.token_pruning = bad  # changed after the config was built: the model refuses it
    with pytest.raises(ValueError, match="below the 3 layers"):
        text_token_pruning.HfPruneBertForSequenceClassification(config)


def test_a_fresh_patched_model_is_initialised_like_the_stock_one():
    config = text_token_pruning.HfPruneBertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        token_pruning={"algorithm": "random", "layer": 1, "keep_ratio": 0.5},
    )
    model = text_token_pruning.HfPruneBertForSequenceClassification(config)
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    assert float(weight.std()) == pytest.approx(config.initializer_range, rel=0.1)  # normal(0, 0.02)
    assert torch.isnan(model.retainer.price)  # "not trained yet"


def test_bfloat16_model_prunes_like_the_float32_one(bert_tokenizer):
    """The attention bias follows the model's dtype: a bfloat16 copy keeps the same tokens and gives
    logits close to float32's."""
    model = pruned("bert", bert_tokenizer, algorithm="random", layer=1, keep_ratio=0.4)
    inputs = dict(bert_tokenizer(BERT_TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        full = model(**inputs)
        half = model.to(torch.bfloat16)(**inputs)
    assert half.logits.dtype == torch.bfloat16
    assert half.kept_fraction.tolist() == full.kept_fraction.tolist()
    torch.testing.assert_close(half.logits.float(), full.logits, rtol=0.05, atol=0.02)
