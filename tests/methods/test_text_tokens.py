"""Text token pruning on BERT, RoBERTa and DistilBERT classifiers: the contract (ratio 1 is the unpruned
model, ratios adapt, padding never counts, specials always kept), training through the pipeline,
fresh-process reloads and bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from tiny_models import pydoc_text

import hf_prune
from hf_prune.errors import DataError, RecipeError, UnsupportedModelError
from hf_prune.recipe import build_dataclass
from hf_prune.registry import get_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = sorted(set(pydoc_text(20_000).lower().replace("\n", " ").split()))[:400]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(vocab))


FAMILIES = ["bert", "roberta", "distilbert"]
STOCK_NAMES = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}


def tiny_bert(tokenizer, seed: int = 0, family: str = "bert"):
    """A random 3-layer, hidden-32 classifier of ``family`` over the test vocabulary."""
    shared = {
        "vocab_size": len(tokenizer),
        "num_labels": 3,
        "id2label": {0: "a", 1: "b", 2: "c"},
        "label2id": {"a": 0, "b": 1, "c": 2},
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": 128,
    }
    if family == "distilbert":  # its own names for the sizes
        config = transformers.DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, **shared)
    else:
        config = getattr(transformers, f"{STOCK_NAMES[family]}Config")(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, **shared
        )
    torch.manual_seed(seed)
    return getattr(transformers, f"{STOCK_NAMES[family]}ForSequenceClassification")(config).eval()


def sentences(count: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=generator))
        for n in torch.randint(4, 30, (count,), generator=generator)
    ]


def pruned(model, tokenizer, **fields):
    result = hf_prune.prune(
        model, {"stages": [{"method": "text_token_pruning", **fields}]}, tokenizer=tokenizer, progress=False
    )
    return result.model.eval()


def batch(tokenizer, texts):
    return tokenizer(texts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "fields",
    [
        {"algorithm": "fixed", "keep_ratio": 1.0, "train_data": "unused.jsonl"},
        {"algorithm": "random", "keep_ratio": 1.0},
        {"algorithm": "attention", "keep_ratio": 1.0, "layer": 2},
        {"algorithm": "random", "keep_ratio": 1.0, "layer": 1},
    ],
)
def test_ratio_one_is_the_unpruned_model(tokenizer, fields, family, monkeypatch):
    monkeypatch.setattr(
        "hf_prune.methods.tokens.encoder_retainer_training.train_token_retainer", lambda *a, **k: {}
    )
    stock = tiny_bert(tokenizer, family=family)
    model = pruned(stock, tokenizer, **fields)
    inputs = batch(tokenizer, sentences(6))
    with torch.no_grad():
        out = model(**inputs)
        torch.testing.assert_close(out.logits, stock(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert out.kept_fraction.tolist() == [1.0] * 6


@pytest.mark.parametrize("family", FAMILIES)
def test_specials_always_kept_and_padding_never_counts(tokenizer, family):
    model = pruned(
        tiny_bert(tokenizer, family=family), tokenizer, algorithm="random", keep_ratio=0.2, layer=1
    )
    texts = sentences(5, seed=3)
    inputs = batch(tokenizer, texts)
    with torch.no_grad():
        together = model(**inputs)
        for row, text in enumerate(texts):
            alone = model(**batch(tokenizer, [text]))
            real = int(inputs["attention_mask"][row].sum())
            assert together.kept_fraction[row] * real == pytest.approx(
                2 + -(-(real - 2) * 2 // 10)
            )  # CLS, SEP + ⌈0.2·n⌉
            assert torch.equal(alone.kept_fraction, together.kept_fraction[row : row + 1])
    # Different lengths in one batch: the padded rows keep the same tokens as alone (random scores are per
    # position, so compare the attention baseline, which depends on the content only).
    attention = pruned(
        tiny_bert(tokenizer, family=family), tokenizer, algorithm="attention", keep_ratio=0.3, layer=1
    )
    with torch.no_grad():
        together = attention(**inputs)
        for row, text in enumerate(texts):
            alone = attention(**batch(tokenizer, [text]))
            torch.testing.assert_close(alone.logits[0], together.logits[row], rtol=1e-4, atol=1e-5)
            assert alone.kept_fraction[0] == together.kept_fraction[row]


def majority_teacher(tokenizer):
    """A hand-built 1-layer BERT answering "more `up` than `down`?", whatever the sequence's length:
    [CLS], [SEP] and padding embed to 0, `up` to +e0 and `down` to −e0 (no positions); attention with zero
    queries and keys is uniform, so [CLS] gets the mean of the tokens; LayerNorm keeps only its sign."""
    size = 8
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=size,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=4,
        num_labels=2,
        id2label={0: "down", 1: "up"},
        label2id={"down": 0, "up": 1},
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    layer = model.bert.encoder.layer[0]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in (
            model.bert.embeddings.LayerNorm,
            layer.attention.output.LayerNorm,
            layer.output.LayerNorm,
        ):
            norm.weight.fill_(1.0)
        up, down = tokenizer.convert_tokens_to_ids(["up", "down"])
        model.bert.embeddings.word_embeddings.weight[up, 0] = 1.0
        model.bert.embeddings.word_embeddings.weight[down, 0] = -1.0
        layer.attention.self.value.weight.copy_(torch.eye(size))
        layer.attention.output.dense.weight.copy_(torch.eye(size))
        model.bert.pooler.dense.weight.copy_(torch.eye(size))
        model.classifier.weight[1, 0], model.classifier.weight[0, 0] = 10.0, -10.0
    return model


def majority_rows(count: int, generator: torch.Generator) -> list[tuple[str, str, str]]:
    """(text, label, kind): even rows "flat" (one word repeated: any subset has the same majority), odd rows
    "close" (a majority of one: dropping tokens flips it about half the time); 11 to 23 words each."""
    rows = []
    for index in range(count):
        n = 2 * int(torch.randint(5, 12, (1,), generator=generator)) + 1
        up = bool(torch.randint(0, 2, (1,), generator=generator))
        if index % 2 == 0:
            kind, words = "flat", ["up" if up else "down"] * n
        else:
            kind, words = "close", ["up"] * (n // 2 + up) + ["down"] * (n // 2 + (not up))
            words = [words[int(i)] for i in torch.randperm(n, generator=generator)]
        rows.append((" ".join(words), "up" if up else "down", kind))
    return rows


@pytest.mark.slow
def test_trained_adtp_ratio_follows_what_each_sequence_needs(tmp_path):
    """The real adtp training (``hf_prune.prune``, no mocks, 20 steps, ~10 s) on a task built so that
    sequences need different ratios: the teacher answers by majority, so a sequence of one repeated word
    keeps its answer at any ratio, while a majority of one needs every token. The trained ratio head gives
    every held-out "flat" sequence the lowest candidate and every "close" one the highest; the budget
    (target 0.5, half of each kind) holds on the training rows. Planted bug caught: the choice taking the
    highest predicted cost (or regressing 1 − cost)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "up", "down"]
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    teacher = majority_teacher(tokenizer)
    generator = torch.Generator().manual_seed(0)
    train = majority_rows(64, generator)
    with torch.no_grad():  # the teacher is right on every row, confidently
        probs = teacher(**batch(tokenizer, [t for t, _, _ in train])).logits.softmax(-1)
    assert probs.argmax(-1).tolist() == [int(label == "up") for _, label, _ in train]
    assert float(probs.max(-1).values.min()) > 0.99
    with open(tmp_path / "train.jsonl", "w") as f:
        for text, label, _ in train:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    stage = {
        "method": "text_token_pruning",
        "algorithm": "adtp",
        "train_data": str(tmp_path / "train.jsonl"),
        "train_steps": 20,
        "batch_size": 16,
        "target_ratio": 0.5,
        "candidate_ratios": [0.1, 0.5, 1.0],
        "seed": 0,
    }
    result = hf_prune.prune(teacher, {"stages": [stage]}, tokenizer=tokenizer, progress=False)
    assert result.report["stages"][0]["training"]["ratio_choice"]["mean_ratio"] == pytest.approx(0.5, abs=0.1)
    test = majority_rows(40, generator)
    with torch.no_grad():
        out = result.model.eval()(**batch(tokenizer, [t for t, _, _ in test]))
    chosen = {
        kind: sorted(
            {round(float(r), 4) for r, (_, _, k) in zip(out.chosen_ratio, test, strict=True) if k == kind}
        )
        for kind in ("flat", "close")
    }
    assert chosen == {"flat": [0.1], "close": [1.0]}, out.chosen_ratio.tolist()


def write_labelled(path, tokenizer, rows: int, with_labels: bool = True):
    texts = sentences(rows, seed=9)
    with open(path, "w") as f:
        for text in texts:
            row = {"text": text, **({"label": ["a", "b", "c"][len(text.split()) % 3]} if with_labels else {})}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_training_through_the_pipeline_and_fresh_reload(tokenizer, tmp_path, family):
    data = write_labelled(tmp_path / "train.jsonl", tokenizer, 64)
    stage = {
        "method": "text_token_pruning",
        "algorithm": "adtp",
        "train_data": str(data),
        "train_steps": 6,
        "batch_size": 8,
        "target_ratio": 0.3,
        "learning_rate": 5e-3,
    }
    source = tiny_bert(tokenizer, family=family)
    result = hf_prune.prune(
        source, {"stages": [stage], "output": str(tmp_path / "out")}, tokenizer=tokenizer, progress=False
    )
    training = result.report["stages"][0]["training"]
    assert training["steps"] == 6 and training["examples"] == 64
    assert set(training["final"]) == {
        "task",
        "distill",
        "kept",
        "ratio",
        "price",
        "chosen_ratio",
        "chosen_cost",
    }
    assert training["ratio_choice"]["mean_ratio"] == pytest.approx(0.3, abs=0.1)
    stock_name = STOCK_NAMES[family]
    assert type(source).__name__ == f"{stock_name}ForSequenceClassification"  # the source is untouched
    saved = json.loads((result.output / "config.json").read_text())
    assert saved["model_type"] == f"hf_prune_{family}" and saved["token_pruning"]["algorithm"] == "adtp"
    assert (result.output / "text_token_pruning.py").is_file()
    card = (result.output / "README.md").read_text()  # the card shows the class that loads a classifier
    assert (
        "AutoModelForSequenceClassification.from_pretrained(" in card and "AutoModelForCausalLM" not in card
    )
    inputs = batch(tokenizer, sentences(4, seed=11))
    with torch.no_grad():
        expected = result.model(**inputs)
    script = r"""
import json, sys, torch
if sys.argv[2] == "hf_prune":
    import hf_prune
from transformers import AutoModelForSequenceClassification
remote = sys.argv[2] == "remote"
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=remote).eval()
inputs = {k: torch.tensor(v) for k, v in json.loads(sys.argv[3]).items()}
with torch.no_grad():
    out = model(**inputs)
print(json.dumps({"logits": out.logits.tolist(), "kept": out.kept_fraction.tolist(), "class": type(model).__name__,
                  "hf_prune_imported": "hf_prune" in sys.modules}))
"""
    payload = json.dumps({k: v.tolist() for k, v in inputs.items()})
    for mode in ("hf_prune", "remote"):
        done = subprocess.run(
            [sys.executable, "-c", script, str(result.output), mode, payload],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            cwd=tmp_path,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        got = json.loads(done.stdout.strip().splitlines()[-1])
        assert got["class"] == f"HfPrune{stock_name}ForSequenceClassification"
        assert got["hf_prune_imported"] == (mode == "hf_prune")
        torch.testing.assert_close(torch.tensor(got["logits"]), expected.logits, atol=1e-5, rtol=0)
        assert got["kept"] == expected.kept_fraction.tolist()


def test_candidate_costs_at_ratio_one_are_the_teachers(tokenizer, monkeypatch):
    from hf_prune.methods.tokens.encoder_retainer_training import candidate_costs

    monkeypatch.setattr(
        "hf_prune.methods.tokens.encoder_retainer_training.train_token_retainer", lambda *a, **k: {}
    )
    stock = tiny_bert(tokenizer)
    model = pruned(stock, tokenizer, algorithm="adtp", train_data="unused.jsonl")
    inputs = batch(tokenizer, sentences(8, seed=2))
    with torch.no_grad():
        probs = stock(**inputs).logits.softmax(-1)
    costs = candidate_costs(
        model, inputs["input_ids"], inputs["attention_mask"], probs.argmax(-1), [0.1, 0.5, 1.0]
    )
    assert costs.shape == (8, 3) and bool(((costs >= 0) & (costs <= 1)).all())
    torch.testing.assert_close(
        costs[:, 2], 1 - probs.max(-1).values, atol=1e-5, rtol=0
    )  # ratio 1 is the teacher
    assert not torch.equal(costs[:, 0], costs[:, 2])


@pytest.mark.slow
def test_short_training_makes_the_ratio_adapt(tokenizer, tmp_path):
    """After a short training on a tiny model the ratio head picks different ratios for different
    sentences, and the price meets the budget on the training sentences. (Deterministic for these seeds on
    one thread; over 12 model / training seeds, 11 gave 2-4 distinct ratios on these sentences.)"""
    data = write_labelled(tmp_path / "train.jsonl", tokenizer, 96)
    stage = {
        "method": "text_token_pruning",
        "algorithm": "adtp",
        "train_data": str(data),
        "train_steps": 24,
        "batch_size": 16,
        "target_ratio": 0.3,
        "seed": 0,
    }
    result = hf_prune.prune(
        tiny_bert(tokenizer, seed=1), {"stages": [stage]}, tokenizer=tokenizer, progress=False
    )
    choice = result.report["stages"][0]["training"]["ratio_choice"]
    assert choice["mean_ratio"] == pytest.approx(0.3, abs=0.05)
    assert sum(share > 0 for share in choice["share"].values()) >= 2
    with torch.no_grad():
        out = result.model.eval()(**batch(tokenizer, sentences(64, seed=21)))
    assert len({round(r, 6) for r in out.chosen_ratio.tolist()}) >= 2, out.chosen_ratio.tolist()


def test_a_checkpoint_without_a_price_is_refused(tokenizer, tmp_path, monkeypatch):
    """adtp checkpoints from before ratio heads predicted costs have no ``retainer.price``: a clear error,
    not ratios chosen by a head that means something else."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(
        "hf_prune.methods.tokens.encoder_retainer_training.train_token_retainer", lambda *a, **k: {}
    )
    model = pruned(tiny_bert(tokenizer), tokenizer, algorithm="adtp", train_data="unused.jsonl")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["retainer.price"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    old = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with pytest.raises(ValueError, match=r"adtp: the retainer has no price"):
        old(**batch(tokenizer, sentences(2)))


def test_training_without_labels_is_refused(tokenizer, tmp_path):
    data = write_labelled(tmp_path / "unlabelled.jsonl", tokenizer, 16, with_labels=False)
    with pytest.raises(DataError, match="label"):
        hf_prune.prune(
            tiny_bert(tokenizer),
            {
                "stages": [
                    {
                        "method": "text_token_pruning",
                        "algorithm": "fixed",
                        "keep_ratio": 0.5,
                        "train_data": str(data),
                    }
                ]
            },
            tokenizer=tokenizer,
            progress=False,
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"algorithm": "random", "keep_ratio": 0}, r"keep_ratio: must be in \(0, 1\], got 0"),
        ({"algorithm": "random", "keep_ratio": 1.5}, r"keep_ratio: must be in \(0, 1\], got 1.5"),
        ({"algorithm": "random"}, r"keep_ratio: random needs a retention ratio in \(0, 1\]"),
        (
            {"candidate_ratios": [0.5, 2.0]},
            r"candidate_ratios: must be a non-empty list of ratios in \(0, 1\]",
        ),
    ],
)
def test_bad_settings_name_the_key(fields, message):
    with pytest.raises(RecipeError, match=r"stages\[0\]\." + message):
        build_dataclass(get_method("text_token_pruning").config_cls, fields, "stages[0]")


def test_unsupported_models_and_missing_training_data(tokenizer):
    from tiny_models import build_tiny_model, build_tokenizer

    mixtral = build_tiny_model("mixtral", build_tokenizer())
    with pytest.raises(UnsupportedModelError, match="supports BERT-family classifiers .* mixtral is neither"):
        hf_prune.prune(
            mixtral,
            {"stages": [{"method": "text_token_pruning", "algorithm": "random", "keep_ratio": 0.5}]},
            progress=False,
        )
    with pytest.raises(RecipeError, match=r"stages\[0\]\.train_data: adtp learns its saliency"):
        hf_prune.prune(
            tiny_bert(tokenizer),
            {"stages": [{"method": "text_token_pruning"}]},
            tokenizer=tokenizer,
            progress=False,
        )
    with pytest.raises(RecipeError, match=r"stages\[0\]\.layer: attention scores come from the layer before"):
        hf_prune.prune(
            tiny_bert(tokenizer),
            {
                "stages": [
                    {"method": "text_token_pruning", "algorithm": "attention", "keep_ratio": 0.5, "layer": 0}
                ]
            },
            progress=False,
        )
    with pytest.raises(RecipeError, match=r"stages\[0\]\.layer: must be below the model's 3 layers"):
        hf_prune.prune(
            tiny_bert(tokenizer),
            {
                "stages": [
                    {"method": "text_token_pruning", "algorithm": "random", "keep_ratio": 0.5, "layer": 3}
                ]
            },
            progress=False,
        )


def test_a_classifier_is_refused_by_the_sequential_engine_before_loading(tokenizer, tmp_path):
    """The stage adds a retainer's weights to a BERT-family classifier: in memory only (encoders are small)."""
    source = tmp_path / "bert"
    tiny_bert(tokenizer).save_pretrained(source)
    tokenizer.save_pretrained(source)
    stage = {"method": "text_token_pruning", "algorithm": "attention", "layer": 1, "keep_ratio": 0.5}
    recipe = {
        "model": str(source),
        "output": str(tmp_path / "out"),
        "engine": "sequential",
        "stages": [stage],
    }
    refusal = r"stages\[0\]\.method: text_token_pruning \(algorithm attention\) has no layer-by-layer"
    with pytest.raises(RecipeError, match=refusal):
        hf_prune.prune(recipe, progress=False)
    assert not (tmp_path / "out").exists()
