"""Classification accuracy (tiny BERT) and VQA (tiny LLaVA on real Fashion-MNIST images) tasks."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import shared_asset
from hf_prune.evals.classification import evaluate_classification
from hf_prune.evals.harness import TaskModelMismatch, check_task_fits, run_task
from hf_prune.evals.testbeds.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist, write_vqa_set
from hf_prune.evals.vqa import FALLBACK_PROMPT, build_prompt, evaluate_vqa
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import hf_prune
from hf_prune.errors import DataError
from hf_prune.recipe import EvaluationTask

WORDS = [f"w{i}" for i in range(30)]
MAX_POSITIONS = 24
LABELS = ("negative", "positive")
NUM_ROWS = 11
MAX_NEW_TOKENS = 6
# Questions of different lengths, so that batches need (left) padding.
QUESTIONS = [
    "what is this?",
    "what kind of garment or shoe is shown in this small grey picture?",
    "name it",
    "what is this?",
    "which of the ten fashion classes is this item?",
]


def _write_jsonl(path, rows, *, blank_after=()):
    with open(path, "w", encoding="utf-8") as handle:
        for index, row in enumerate(rows):
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
            if index in blank_after:
                handle.write("\n")
    return path


def _read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def _tiny_llama():
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


# --- classification ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert():
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]"
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
        pad_token_id=vocab["[PAD]"],
        initializer_range=0.5,
    )
    model = BertForSequenceClassification(config).eval()
    return model, tokenizer


def _texts(seed, count=NUM_ROWS):
    rng = np.random.default_rng(seed)
    # Lengths from 1 word to past the model's 24 positions, so padding and truncation both matter.
    lengths = [1, 40, *rng.integers(2, 15, size=count - 2).tolist()]
    return [" ".join(rng.choice(WORDS, size=length).tolist()) for length in lengths]


def _direct_predictions(model, tokenizer, texts, pairs=None):
    """Argmax by hand, one example at a time (no padding), truncated to the model's positions."""
    predictions = []
    with torch.no_grad():
        for index, text in enumerate(texts):
            args = (text,) if pairs is None else (text, pairs[index])
            encoded = tokenizer(*args, truncation=True, max_length=MAX_POSITIONS, return_tensors="pt")
            predictions.append(int(model(**encoded).logits[0].argmax()))
    return predictions


@pytest.fixture(scope="module")
def cls_case(bert, tmp_path_factory):
    """Rows whose labels are the hand-computed predictions except at FLIPPED, so accuracy is known exactly."""
    model, tokenizer = bert
    texts = _texts(1)
    predictions = _direct_predictions(model, tokenizer, texts)
    assert 0 < sum(predictions) < len(predictions), "the random model should predict both classes"
    flipped = {0, 1, 4, 7}
    labels = [1 - p if i in flipped else p for i, p in enumerate(predictions)]
    folder = tmp_path_factory.mktemp("cls")
    ints = _write_jsonl(
        folder / "ints.jsonl",
        [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)],
        blank_after={2},
    )
    names = _write_jsonl(
        folder / "names.jsonl", [{"text": t, "label": LABELS[y]} for t, y in zip(texts, labels, strict=True)]
    )
    return {
        "ints": ints,
        "names": names,
        "texts": texts,
        "labels": labels,
        "expected": 1 - len(flipped) / len(texts),
    }


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_classification_equals_direct_computation_for_any_batch_size(bert, cls_case, batch_size):
    model, tokenizer = bert
    result = evaluate_classification(
        model, tokenizer, cls_case["ints"], batch_size=batch_size, progress=False
    )
    assert set(result) == {"accuracy", "num_examples", "data", "seconds"}
    assert result["accuracy"] == pytest.approx(cls_case["expected"], abs=1e-12)
    assert result["num_examples"] == NUM_ROWS
    assert result["data"] == str(cls_case["ints"])
    assert not model.training


def test_classification_label_names_and_limit(bert, cls_case):
    model, tokenizer = bert
    by_name = evaluate_classification(model, tokenizer, cls_case["names"], batch_size=4, progress=False)
    assert by_name["accuracy"] == pytest.approx(cls_case["expected"], abs=1e-12)
    # Rows 0 and 1 are flipped, 2 is not: 1 of 3 right.
    first = evaluate_classification(model, tokenizer, cls_case["names"], limit=3, progress=False)
    assert (first["num_examples"], first["accuracy"]) == (3, pytest.approx(1 / 3))


def test_classification_text_pairs(bert, tmp_path):
    model, tokenizer = bert
    texts, pairs = _texts(2, 6), _texts(3, 6)
    predictions = _direct_predictions(model, tokenizer, texts, pairs)
    rows = [
        {"premise": t, "hypothesis": p, "y": y} for t, p, y in zip(texts, pairs, predictions, strict=True)
    ]
    rows[0]["y"] = 1 - rows[0]["y"]
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = evaluate_classification(
        model,
        tokenizer,
        data,
        text_field="premise",
        text_pair_field="hypothesis",
        label_field="y",
        batch_size=4,
        progress=False,
    )
    assert result["accuracy"] == pytest.approx(5 / 6)


def test_classification_errors(bert, tmp_path):
    model, tokenizer = bert
    good = {"text": "w1 w2", "label": 0}
    data = _write_jsonl(tmp_path / "data.jsonl", [good])
    with pytest.raises(ValueError, match="needs a sequence-classification model.*LlamaForCausalLM"):
        evaluate_classification(_tiny_llama(), tokenizer, data, progress=False)

    class FakeForSequenceClassification(BertForTokenClassification):  # per-token logits [B, T, L]
        pass

    fake = FakeForSequenceClassification(model.config).eval()
    with pytest.raises(ValueError, match=r"needs a sequence-classification model.*shape \(1, 4, 2\)"):
        evaluate_classification(fake, tokenizer, data, progress=False)

    unknown = _write_jsonl(tmp_path / "unknown.jsonl", [good, good, {"text": "w3", "label": "neutral"}])
    with pytest.raises(DataError, match=r"unknown\.jsonl:3: unknown label 'neutral'.*'negative', 'positive'"):
        evaluate_classification(model, tokenizer, unknown, progress=False)
    out_of_range = _write_jsonl(tmp_path / "range.jsonl", [{"text": "w3", "label": 2}])
    with pytest.raises(DataError, match=r"range\.jsonl:1: label 2 is out of range"):
        evaluate_classification(model, tokenizer, out_of_range, progress=False)
    # The blank line after row 1 counts: the unlabelled row is on line 3.
    unlabelled = _write_jsonl(tmp_path / "unlabelled.jsonl", [good, {"text": "w3"}], blank_after={0})
    with pytest.raises(DataError, match=r"unlabelled\.jsonl:3: missing field 'label'"):
        evaluate_classification(model, tokenizer, unlabelled, progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        evaluate_classification(model, tokenizer, tmp_path / "nowhere.jsonl", progress=False)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        evaluate_classification(model, tokenizer, tmp_path / "empty.jsonl", progress=False)


# --- Fashion-MNIST --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_dir():
    return shared_asset("images/fashion-mnist")


def test_read_fashion_mnist(fashion_dir):
    images, labels = read_fashion_mnist(fashion_dir, limit=10)
    assert images.shape == (10, 28, 28) and images.dtype == np.uint8
    # The first test labels as published: ankle boot, pullover, trouser, trouser, shirt, ...
    assert labels.tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    everything, all_labels = read_fashion_mnist(fashion_dir)
    assert everything.shape == (10_000, 28, 28)
    assert np.array_equal(everything[:10], images)
    assert np.bincount(all_labels).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10


def test_write_vqa_set(fashion_dir, tmp_path):
    data = write_vqa_set(tmp_path / "images", tmp_path / "set" / "vqa.jsonl", n=3, seed=7, source=fashion_dir)
    rows = _read_jsonl(data)
    assert len(rows) == 3
    for row in rows:
        assert not row["image"].startswith("/")
        with Image.open(data.parent / row["image"]) as image:
            assert image.size == (32, 32)
        assert row["question"] == "what is this?"
        assert row["answers"] == [FASHION_MNIST_CLASSES[row["label"]]]
    again = write_vqa_set(tmp_path / "images2", tmp_path / "vqa2.jsonl", n=3, seed=7, source=fashion_dir)
    assert [r["answers"] for r in _read_jsonl(again)] == [r["answers"] for r in rows]


# --- VQA ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from tiny_models import save_tiny_model

    folder = save_tiny_model("llava", tmp_path_factory.mktemp("llava") / "model")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def vqa_case(fashion_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa")
    data = write_vqa_set(
        folder / "images", folder / "vqa.jsonl", n=len(QUESTIONS), seed=0, source=fashion_dir
    )
    rows = _read_jsonl(data)
    for row, question in zip(rows, QUESTIONS, strict=True):
        row["question"] = question
    _write_jsonl(data, rows)
    return data, rows


def _direct_answer(model, processor, image_path, question):
    """Unbatched greedy generation: no padding at all."""
    prompt = f"USER: <image>\n{question} ASSISTANT:"
    with Image.open(image_path) as image:
        inputs = processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return processor.tokenizer.decode(
        output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    ).strip()


@pytest.fixture(scope="module")
def direct_answers(llava, vqa_case):
    model, processor = llava
    data, rows = vqa_case
    return [_direct_answer(model, processor, data.parent / row["image"], row["question"]) for row in rows]


def test_vqa_end_to_end_matches_unbatched_generation(llava, vqa_case, direct_answers):
    model, processor = llava
    data, rows = vqa_case
    assert processor.chat_template is None  # the fallback prompt is in use
    padding_side = processor.tokenizer.padding_side
    result = evaluate_vqa(model, processor, data, batch_size=3, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert set(result) == {"vqa_accuracy", "exact_match", "num_examples", "data", "seconds", "examples"}
    assert result["num_examples"] == len(rows) == 5
    assert 0.0 <= result["vqa_accuracy"] <= 1.0 and 0.0 <= result["exact_match"] <= 1.0
    assert [e["question"] for e in result["examples"]] == QUESTIONS
    assert [e["answers"] for e in result["examples"]] == [row["answers"] for row in rows]
    # Batches of 3 mix question lengths: left padding must leave every answer unchanged.
    assert [e["prediction"] for e in result["examples"]] == direct_answers
    assert processor.tokenizer.padding_side == padding_side


def test_vqa_scores_through_metrics(llava, vqa_case, direct_answers, tmp_path):
    model, processor = llava
    data, rows = vqa_case
    rescored = []
    for index, (row, answer) in enumerate(zip(rows, direct_answers, strict=True)):
        row = {**row, "image": str(data.parent / row["image"])}  # absolute paths work too
        if index == 0:
            row["answers"] = [answer]
        elif index == 1:  # the single-answer form
            del row["answers"]
            row["answer"] = answer
        elif index == 2:  # 1 match in 2 answers: leave-one-out VQA accuracy 0.5 * 1/3; majority is answer
            row["answers"] = [answer, "zzz"]
        rescored.append(row)
    path = _write_jsonl(tmp_path / "rescored.jsonl", rescored)
    result = evaluate_vqa(model, processor, path, batch_size=2, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    # Rows 3 and 4 keep their class-name answers, which random-model gibberish does not match.
    assert result["vqa_accuracy"] == pytest.approx((1 + 1 + 1 / 6) / 5)
    assert result["exact_match"] == pytest.approx(3 / 5)
    assert result["examples"][1]["answers"] == [direct_answers[1]]
    limited = evaluate_vqa(model, processor, path, limit=2, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert (limited["num_examples"], limited["vqa_accuracy"], limited["exact_match"]) == (2, 1.0, 1.0)


def test_vqa_chat_template_prompt(llava, vqa_case, direct_answers):
    model, processor = llava
    data, _ = vqa_case
    assert build_prompt(processor, "why?") == FALLBACK_PROMPT.format(image="<image>", question="why?")
    # A template that writes the BOS itself: the tokenizer must not add a second one.
    processor.chat_template = (
        "<s>{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    try:
        assert build_prompt(processor, "why?") == "<s>USER: <image>\nwhy? ASSISTANT:"
        result = evaluate_vqa(
            model, processor, data, batch_size=5, max_new_tokens=MAX_NEW_TOKENS, progress=False
        )
    finally:
        processor.chat_template = None
    assert [e["prediction"] for e in result["examples"]] == direct_answers


def test_vqa_errors(llava, vqa_case, tmp_path):
    model, processor = llava
    data, rows = vqa_case
    with pytest.raises(ValueError, match="vqa needs a vision-language model; llama has no vision tower"):
        evaluate_vqa(_tiny_llama(), processor, data, progress=False)
    with pytest.raises(ValueError, match="needs the model's processor"):
        evaluate_vqa(model, processor.tokenizer, data, progress=False)

    def write(name, changed):
        return _write_jsonl(data.parent / name, changed)

    missing = write("missing.jsonl", [rows[0], {**rows[1], "image": "images/nope.png"}])
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl:2: image not found: images/nope\.png"):
        evaluate_vqa(model, processor, missing, progress=False)
    no_question = write(
        "no_question.jsonl", [rows[0], rows[1], {k: v for k, v in rows[2].items() if k != "question"}]
    )
    with pytest.raises(DataError, match=r"no_question\.jsonl:3: missing field 'question'"):
        evaluate_vqa(model, processor, no_question, progress=False)
    no_answers = write("no_answers.jsonl", [{k: v for k, v in rows[0].items() if k != "answers"}])
    with pytest.raises(DataError, match=r"no_answers\.jsonl:1: missing field 'answers'"):
        evaluate_vqa(model, processor, no_answers, progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        evaluate_vqa(model, processor, tmp_path / "empty.jsonl", progress=False)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        evaluate_vqa(model, processor, tmp_path / "absent.jsonl", progress=False)


# --- token-pruned models (issue 13): the tasks score them as they run -------------------------------


def test_classification_of_a_text_token_pruned_bert(bert, cls_case):
    model, tokenizer = bert
    stage = {"method": "text_token_pruning", "algorithm": "attention", "layer": 1, "keep_ratio": 0.5}
    pruned = hf_prune.prune(model, {"stages": [stage]}, tokenizer=tokenizer, progress=False).model.eval()
    assert pruned.config.token_pruning["keep_ratio"] == 0.5
    # By hand: each text alone (no padding) through the pruned model, against the rows' labels.
    expected = _direct_predictions(pruned, tokenizer, cls_case["texts"])
    accuracy = sum(p == y for p, y in zip(expected, cls_case["labels"], strict=True)) / NUM_ROWS
    task = EvaluationTask(task="classification", data=str(cls_case["ints"]), batch_size=4)
    for batch_size in (1, 4):
        result = run_task(pruned, tokenizer, dataclasses.replace(task, batch_size=batch_size), progress=False)
        assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    for name in ("perplexity", "multiple_choice"):
        with pytest.raises(
            TaskModelMismatch, match=rf"task '{name}' needs a language-model head.*encoder classifier"
        ):
            run_task(pruned, tokenizer, dataclasses.replace(task, task=name), progress=False)


def test_vqa_of_a_visual_token_pruned_llava(llava, vqa_case):
    model, processor = llava
    data, rows = vqa_case
    stages = {"stages": [{"method": "visual_token_pruning", "budget": 4}]}
    pruned = hf_prune.prune(model, stages, tokenizer=processor, progress=False).model.eval()
    assert pruned.config.token_pruning is not None
    direct = [_direct_answer(pruned, processor, data.parent / row["image"], row["question"]) for row in rows]
    task = EvaluationTask(task="vqa", data=str(data), batch_size=3, max_new_tokens=MAX_NEW_TOKENS)
    result = run_task(pruned, processor, task, progress=False)
    assert [e["prediction"] for e in result["examples"]] == direct
    with pytest.raises(TaskModelMismatch, match="a visual-token-pruned vision-language model"):
        check_task_fits("classification", pruned.config, type(pruned).__name__)
