"""The token selection rules of text / prompt token pruning against references computed independently of
the code under test: the stock model run with eager attention and ``output_attentions=True``, the score the
docs define (docs/methods/text_tokens.md) and the top-k taken by hand.

- causal LMs, ``attention``: a key's score is the attention it receives at layer ``layer − 1``, averaged over
  heads and over the real queries at or after it; the first and the last real token are always kept, plus
  the ⌈keep_ratio·n⌉ best of the other n real tokens;
- BERT classifiers, ``attention``: the attention a token receives at layer ``layer − 1``, averaged over
  heads and over all real queries (padding never counts); [CLS] and [SEP] are always kept, plus the
  ⌈keep_ratio·n⌉ best of the other n real tokens.
"""

import math

import pytest
import torch
import transformers
from tiny_models import build_tiny_model, build_tokenizer

import hf_prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAUSAL_PROMPTS = [
    "The for statement iterates over the items of any sequence, in order, as they appear in it.",
    "Modules can import other modules.",
    "A function definition associates a name with code; calling it runs the code with new arguments.",
]


def top_k_by_hand(scores: list[float], candidates: list[int], count: int) -> set[int]:
    """The ``count`` best ``candidates`` by ``scores``; asserts the cut is not a near-tie."""
    ranked = sorted(candidates, key=lambda i: -scores[i])
    if 0 < count < len(ranked):
        assert scores[ranked[count - 1]] - scores[ranked[count]] > 1e-6, "near-tie at the cut"
    return set(ranked[:count])


# ---- causal LMs: prompt pruning with ``attention`` ----


@pytest.fixture(scope="module")
def left_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


def causal_reference(stock, input_ids, mask, positions, layer: int, keep_ratio: float) -> list[set[int]]:
    """Per row, the kept positions by the documented rule, from the stock model's eager attentions."""
    stock.set_attn_implementation("eager")
    with torch.no_grad():
        out = stock(input_ids=input_ids, attention_mask=mask, position_ids=positions, output_attentions=True)
    weights = out.attentions[layer - 1]  # [B, heads, query, key]
    kept = []
    for row in range(input_ids.shape[0]):
        real = [i for i in range(input_ids.shape[1]) if mask[row, i]]
        scores = [0.0] * input_ids.shape[1]
        for key in real:
            queries = [q for q in real if q >= key]
            total = sum(float(weights[row, h, q, key]) for h in range(weights.shape[1]) for q in queries)
            scores[key] = total / (weights.shape[1] * len(queries))
        others = real[1:-1]
        count = math.ceil(keep_ratio * len(others) - 1e-9)
        kept.append({real[0], real[-1]} | top_k_by_hand(scores, others, count))
    return kept


@pytest.mark.parametrize(
    ("family", "layer", "keep_ratio"), [("llama", 1, 0.4), ("llama", 3, 0.25), ("qwen2", 2, 0.5)]
)
def test_prompt_attention_keeps_the_most_attended_tokens_by_hand(left_tokenizer, family, layer, keep_ratio):
    """Planted bugs caught: averaging over all real queries (not those at or after the key), taking one
    head or the sum over heads' argmax, scoring at ``layer`` instead of ``layer − 1``, dropping the first or
    last token, rounding the count down."""
    stock = build_tiny_model(family, left_tokenizer)
    model = hf_prune.prune(
        build_tiny_model(family, left_tokenizer),
        {
            "stages": [
                {
                    "method": "text_token_pruning",
                    "algorithm": "attention",
                    "layer": layer,
                    "keep_ratio": keep_ratio,
                }
            ]
        },
        progress=False,
    ).model.eval()
    inputs = left_tokenizer(CAUSAL_PROMPTS, return_tensors="pt", padding=True)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert (mask == 0).any()  # a padded batch
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    expected = causal_reference(stock, ids, mask, positions, layer, keep_ratio)
    with torch.no_grad():
        kept = model(**inputs, position_ids=positions, use_cache=True).kept_tokens
    assert [set(torch.nonzero(row).flatten().tolist()) for row in kept] == expected
    # Each prompt alone (no padding, positions 0..n-1) keeps the same tokens, shifted.
    for row, prompt in enumerate(CAUSAL_PROMPTS):
        alone = left_tokenizer([prompt], return_tensors="pt")
        pad = int((mask[row] == 0).sum())
        alone_expected = causal_reference(
            stock, alone["input_ids"], alone["attention_mask"], None, layer, keep_ratio
        )
        assert alone_expected == [{i - pad for i in expected[row]}]
        with torch.no_grad():
            kept = model(**alone, use_cache=True).kept_tokens
        assert set(torch.nonzero(kept[0]).flatten().tolist()) == alone_expected[0]


# ---- BERT classifiers with ``attention`` ----

WORDS = "the a of to in is it for on with as by at from that this be are or an not can".split() + [
    f"w{i}" for i in range(40)
]
BERT_TEXTS = [
    "the w1 w2 of to w3 in is w4 it for w5 on",
    "a w7 w8",
    "w9 w10 w11 w12 the of w13 w14 w15 to in w16 w17 is w18 w19 it w20 w21 for",
    "w22 on with w23 as by w24",
]


@pytest.fixture(scope="module")
def bert_tokenizer():
    # ``vocab=`` (a dict): with ``vocab_file=`` this transformers version keeps only the special tokens, and
    # every word would be [UNK].
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    assert tokenizer.unk_token_id not in tokenizer(BERT_TEXTS)["input_ids"][0]
    return tokenizer


def tiny_bert(tokenizer):
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.mark.parametrize(("layer", "keep_ratio"), [(1, 0.3), (2, 0.4), (2, 0.15)])
def test_bert_attention_keeps_the_most_attended_tokens_by_hand(bert_tokenizer, layer, keep_ratio):
    """The hidden states entering layer ``layer`` of the pruned model are the stock model's at the kept
    positions, in order. Planted bugs caught: [CLS]-only attention, padding queries counted, [SEP] not kept,
    scoring at ``layer`` instead of ``layer − 1``, rounding the count down."""
    stock = tiny_bert(bert_tokenizer)
    stock.set_attn_implementation("eager")
    inputs = bert_tokenizer(BERT_TEXTS, padding=True, return_tensors="pt")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        out = stock(**inputs, output_attentions=True, output_hidden_states=True)
    weights = out.attentions[layer - 1]  # [B, heads, query, key]
    specials = {bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id}
    expected = []
    for row in range(ids.shape[0]):
        real = [i for i in range(ids.shape[1]) if mask[row, i]]
        scores = [
            sum(float(weights[row, h, q, key]) for h in range(weights.shape[1]) for q in real)
            / (weights.shape[1] * len(real))
            for key in range(ids.shape[1])
        ]
        others = [i for i in real if int(ids[row, i]) not in specials]
        count = math.ceil(keep_ratio * len(others) - 1e-9)
        kept = {i for i in real if int(ids[row, i]) in specials} | top_k_by_hand(scores, others, count)
        expected.append(sorted(kept))

    model = hf_prune.prune(
        tiny_bert(bert_tokenizer),
        {
            "stages": [
                {
                    "method": "text_token_pruning",
                    "algorithm": "attention",
                    "layer": layer,
                    "keep_ratio": keep_ratio,
                }
            ]
        },
        tokenizer=bert_tokenizer,
        progress=False,
    ).model.eval()
    captured = {}
    hook = model.bert.encoder.layer[layer].register_forward_pre_hook(
        lambda module, args: captured.update(hidden=args[0])
    )
    try:
        with torch.no_grad():
            pruned = model(**inputs)
    finally:
        hook.remove()
    assert captured["hidden"].shape[1] == max(len(k) for k in expected)
    for row, kept in enumerate(expected):
        assert float(pruned.kept_fraction[row]) == pytest.approx(len(kept) / int(mask[row].sum()))
        torch.testing.assert_close(
            captured["hidden"][row, : len(kept)], out.hidden_states[layer][row, kept], rtol=1e-4, atol=1e-5
        )


def hidden_entering(model, layer: int, inputs) -> tuple:
    """(the pruned model's output, the hidden states entering encoder layer ``layer``)."""
    captured = {}
    hook = model.bert.encoder.layer[layer].register_forward_pre_hook(
        lambda module, args: captured.update(hidden=args[0])
    )
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        hook.remove()
    return out, captured["hidden"]


def kept_by_hand(ids, mask, scores, keep_ratios, specials) -> list[list[int]]:
    kept = []
    for row in range(ids.shape[0]):
        real = [i for i in range(ids.shape[1]) if mask[row, i]]
        others = [i for i in real if i > 0 and int(ids[row, i]) not in specials]
        count = math.ceil(float(keep_ratios[row]) * len(others) - 1e-9)
        always = [i for i in real if i == 0 or int(ids[row, i]) in specials]
        kept.append(sorted(set(always) | top_k_by_hand(scores[row].tolist(), others, count)))
    return kept


@pytest.mark.parametrize(("algorithm", "layer"), [("random", 0), ("random", 2), ("fixed", 1)])
def test_bert_random_and_saliency_selection_by_hand(bert_tokenizer, monkeypatch, algorithm, layer):
    """``random``: the scores are ``torch.rand`` of the batch's shape from a generator seeded with ``seed``;
    ``fixed`` (and ``forward(keep_ratios=...)``): the retainer's saliency, here with per-row ratios. The top
    ⌈ρ·n⌉ by hand, [CLS] and [SEP] kept; the pruned layers see the stock hidden states at those positions."""
    monkeypatch.setattr(
        "hf_prune.methods.tokens.encoder_retainer_training.train_token_retainer", lambda *a, **k: {}
    )
    stage = {
        "method": "text_token_pruning",
        "algorithm": algorithm,
        "layer": layer,
        "keep_ratio": 0.3,
        "seed": 5,
    }
    if algorithm == "fixed":
        stage["train_data"] = "unused.jsonl"  # the retainer keeps its seeded initialisation
    model = hf_prune.prune(
        tiny_bert(bert_tokenizer), {"stages": [stage]}, tokenizer=bert_tokenizer, progress=False
    ).model.eval()
    stock = tiny_bert(bert_tokenizer)
    inputs = bert_tokenizer(BERT_TEXTS, padding=True, return_tensors="pt")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        reference = stock(**inputs, output_hidden_states=True).hidden_states[layer]
    specials = {bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id}
    if algorithm == "random":
        scores = torch.rand(ids.shape, generator=torch.Generator().manual_seed(5))
        ratios = [0.3] * ids.shape[0]
        out, hidden = hidden_entering(model, layer, inputs)
    else:
        ratios = [0.3, 1.0, 0.1, 0.5]
        inputs = {**inputs, "keep_ratios": torch.tensor(ratios)}
        out, hidden = hidden_entering(model, layer, inputs)
        scores = out.saliency
        assert out.chosen_ratio.tolist() == pytest.approx(ratios)
    expected = kept_by_hand(ids, mask, scores, ratios, specials)
    assert hidden.shape[1] == max(len(k) for k in expected)
    for row, kept in enumerate(expected):
        assert float(out.kept_fraction[row]) == pytest.approx(len(kept) / int(mask[row].sum()))
        torch.testing.assert_close(hidden[row, : len(kept)], reference[row, kept], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_other_encoder_families_attention_selection_by_hand(bert_tokenizer, family):
    """DistilBERT (``transformer.layer``, attention without ``.self``) and RoBERTa: the same rule as BERT,
    against the stock model's eager attentions and hidden states."""
    shared = dict(vocab_size=len(bert_tokenizer), num_labels=3, pad_token_id=0, max_position_embeddings=64)
    if family == "distilbert":
        config = transformers.DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, **shared)
        build = transformers.DistilBertForSequenceClassification
    else:
        config = transformers.RobertaConfig(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, **shared
        )
        build = transformers.RobertaForSequenceClassification

    def fresh():
        torch.manual_seed(0)
        return build(config).eval()

    stock = fresh()
    stock.set_attn_implementation("eager")
    inputs = bert_tokenizer(BERT_TEXTS, padding=True, return_tensors="pt")
    inputs.pop("token_type_ids")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        out = stock(**inputs, output_attentions=True, output_hidden_states=True)
    weights = out.attentions[0]
    scores = torch.zeros(ids.shape)
    for row in range(ids.shape[0]):
        real = [q for q in range(ids.shape[1]) if mask[row, q]]
        for key in range(ids.shape[1]):
            scores[row, key] = sum(
                float(weights[row, h, q, key]) for h in range(weights.shape[1]) for q in real
            ) / (weights.shape[1] * len(real))
    specials = {bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id}
    expected = kept_by_hand(ids, mask, scores, [0.3] * ids.shape[0], specials)
    stage = {"method": "text_token_pruning", "algorithm": "attention", "layer": 1, "keep_ratio": 0.3}
    model = hf_prune.prune(
        fresh(), {"stages": [stage]}, tokenizer=bert_tokenizer, progress=False
    ).model.eval()
    layers = model.distilbert.transformer.layer if family == "distilbert" else model.roberta.encoder.layer
    captured = {}
    hook = layers[1].register_forward_pre_hook(lambda module, args: captured.update(hidden=args[0]))
    try:
        with torch.no_grad():
            pruned = model(**inputs)
    finally:
        hook.remove()
    for row, kept in enumerate(expected):
        assert float(pruned.kept_fraction[row]) == pytest.approx(len(kept) / int(mask[row].sum()))
        torch.testing.assert_close(
            captured["hidden"][row, : len(kept)], out.hidden_states[1][row, kept], rtol=1e-4, atol=1e-5
        )


def encoder_classifier(family: str, vocab_size: int):
    """A tiny random classifier of ``family`` (3 layers, hidden 32), the same weights at every call."""
    shared = dict(vocab_size=vocab_size, num_labels=3, pad_token_id=0, max_position_embeddings=64)
    if family == "distilbert":
        config = transformers.DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, **shared)
    else:
        kind = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[family]
        config = kind(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, **shared
        )
    build = {
        "bert": transformers.BertForSequenceClassification,
        "roberta": transformers.RobertaForSequenceClassification,
        "distilbert": transformers.DistilBertForSequenceClassification,
    }[family]
    torch.manual_seed(0)
    return build(config).eval()


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_encoder_logits_are_the_stock_models_on_the_kept_tokens(bert_tokenizer, family):
    """Pruning at the embeddings (``layer: 0``) is the stock model run on the kept tokens alone at their
    original positions: the logits and the loss must be the stock model's on those short sequences. With
    ``keep_ratio: 1`` at a later layer nothing is dropped: the stock logits on the padded batch."""
    inputs = dict(bert_tokenizer(BERT_TEXTS, padding=True, return_tensors="pt"))
    inputs.pop("token_type_ids")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = torch.tensor([0, 1, 2, 1])
    stock = encoder_classifier(family, len(bert_tokenizer))
    stage = {"method": "text_token_pruning", "algorithm": "random", "layer": 0, "keep_ratio": 0.4, "seed": 3}
    pruned = hf_prune.prune(
        encoder_classifier(family, len(bert_tokenizer)),
        {"stages": [stage]},
        tokenizer=bert_tokenizer,
        progress=False,
    ).model.eval()
    with torch.no_grad():
        out = pruned(**inputs, labels=labels)
    scores = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3))
    specials = {bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id}
    expected = kept_by_hand(ids, mask, scores, [0.4] * ids.shape[0], specials)
    reference = []
    for row, kept in enumerate(expected):
        positions = torch.tensor([kept])
        if family == "roberta":  # RoBERTa numbers real tokens from padding_idx + 1
            positions = positions + stock.config.pad_token_id + 1
        # attention_mask given: with position_ids alone, transformers 5 reads a jump in positions as the
        # start of another packed sequence and masks across it.
        short = {
            "input_ids": ids[row, kept][None],
            "position_ids": positions,
            "attention_mask": torch.ones_like(positions),
        }
        with torch.no_grad():
            reference.append(stock(**short).logits[0])
        assert float(out.kept_fraction[row]) == pytest.approx(len(kept) / int(mask[row].sum()))
    reference = torch.stack(reference)
    torch.testing.assert_close(out.logits, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        out.loss, torch.nn.functional.cross_entropy(reference, labels), rtol=1e-4, atol=1e-5
    )
    assert out.chosen_ratio.tolist() == pytest.approx([0.4] * ids.shape[0])

    whole = {**stage, "layer": 2, "keep_ratio": 1.0}
    unpruned = hf_prune.prune(
        encoder_classifier(family, len(bert_tokenizer)),
        {"stages": [whole]},
        tokenizer=bert_tokenizer,
        progress=False,
    ).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(unpruned(**inputs).logits, stock(**inputs).logits, rtol=1e-4, atol=1e-5)
        assert unpruned(**inputs).kept_fraction.tolist() == [1.0] * ids.shape[0]


def test_bert_adtp_training_forward_is_the_soft_mask_by_hand(bert_tokenizer, monkeypatch):
    """In training mode adtp keeps every token and weighs each key by p = σ((s − q)/T) in attention (an
    additive log p), q the saliency at rank ρ·n among the eligible tokens (interpolated), ρ the candidate
    with the lowest predicted cost + price·ratio. Everything rebuilt here from the retainer's Linear
    layers and the stock layers, dropout off."""
    monkeypatch.setattr(
        "hf_prune.methods.tokens.encoder_retainer_training.train_token_retainer", lambda *a, **k: {}
    )
    ratios, layer, temperature = [0.3, 0.6, 1.0], 1, 2.0  # ranks ρ·n − 1 between integers, and not at ½
    stage = {
        "method": "text_token_pruning",
        "algorithm": "adtp",
        "layer": layer,
        "candidate_ratios": ratios,
        "temperature": temperature,
        "train_data": "unused.jsonl",
    }
    stock = tiny_bert(bert_tokenizer)
    for config in (stock.config,):
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    model = hf_prune.prune(
        tiny_bert(bert_tokenizer), {"stages": [stage]}, tokenizer=bert_tokenizer, progress=False
    ).model
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        for p in model.retainer.ratio.parameters():  # a spread of predicted costs
            p.mul_(20)
        for p in model.retainer.saliency.parameters():  # saliencies spread around 3, not around 0
            p.mul_(4)
        model.retainer.saliency[2].bias.add_(3.0)
    inputs = dict(bert_tokenizer(BERT_TEXTS, padding=True, return_tensors="pt"))
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    with torch.no_grad():
        hidden = stock.eval()(**inputs, output_hidden_states=True).hidden_states[layer]
        head = model.retainer
        saliency = head.saliency[2](torch.nn.functional.gelu(head.saliency[0](hidden))).squeeze(-1)
        mean = torch.stack([hidden[b, mask[b]].mean(0) for b in range(len(ids))])
        costs = head.ratio[2](torch.nn.functional.gelu(head.ratio[0](torch.cat([hidden[:, 0], mean], -1))))

    # A price at which the rows choose different ratios, at least one below 1 (the soft mask then bites).
    def choices(price):
        return [min(range(3), key=lambda r: float(costs[b, r]) + price * ratios[r]) for b in range(len(ids))]

    price = next(p / 4 for p in range(400) if len(set(choices(p / 4))) >= 2 and min(choices(p / 4)) < 2)
    with torch.no_grad():
        model.retainer.price.fill_(price)
        out = model.train()(**inputs)
    torch.testing.assert_close(out.saliency, saliency, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.predicted_costs, costs, rtol=1e-4, atol=1e-5)
    specials = {bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id}
    keep = torch.zeros(ids.shape)
    for b in range(len(ids)):
        rho = ratios[choices(price)[b]]
        assert float(out.chosen_ratio[b]) == pytest.approx(rho)
        eligible = [i for i in range(ids.shape[1]) if mask[b, i] and i > 0 and int(ids[b, i]) not in specials]
        ranked = sorted((float(saliency[b, i]) for i in eligible), reverse=True)
        position = max(rho * len(eligible) - 1, 0.0)
        low = min(math.floor(position), len(ranked) - 1)
        high = min(low + 1, len(ranked) - 1)
        q = (1 - (position - low)) * ranked[low] + (position - low) * ranked[high]
        for i in range(ids.shape[1]):
            if i in eligible:
                keep[b, i] = (
                    1.0 if rho >= 1 else 1 / (1 + math.exp(-(float(saliency[b, i]) - q) / temperature))
                )
            else:
                keep[b, i] = float(mask[b, i])
    assert len(set(out.chosen_ratio.tolist())) >= 2, out.chosen_ratio  # rows pick different ratios
    assert out.kept_fraction.tolist() == pytest.approx((keep.sum(1) / mask.sum(1)).tolist(), rel=1e-4)
    bias = torch.log(keep.clamp_min(torch.finfo(torch.float32).tiny))
    bias = (bias + torch.zeros_like(bias).masked_fill(~mask, torch.finfo(torch.float32).min))[:, None, None]
    h = hidden
    with torch.no_grad():
        for block in stock.bert.encoder.layer[layer:]:
            h = block(h, bias)
            h = h[0] if isinstance(h, tuple) else h
        logits = stock.classifier(stock.bert.pooler(h))
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-4)
