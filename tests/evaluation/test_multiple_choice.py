import json
import random

import pytest
import torch
from conftest import shared_asset
from hf_prune.evals.cloze import build_cloze_items, write_jsonl
from hf_prune.evals.cloze import main as cloze_main
from hf_prune.evals.multiple_choice import (
    default_max_length,
    evaluate_multiple_choice,
    split_context_continuation,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from hf_prune.errors import DataError

WORDS = [f"w{i}" for i in range(30)]


# Tiny models: one intra-op thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- a tiny random Llama with a word-level tokenizer that adds BOS ------------------------------


def make_word_tokenizer(*, bos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def word_tokenizer():
    return make_word_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama(word_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(word_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def rows():
    """Questions of 1-12 words, 2-5 choices of 1-4 words each: batches need real padding."""
    rng = random.Random(0)
    result = []
    for _ in range(12):
        num_choices = rng.randint(2, 5)
        choices = []
        while len(choices) < num_choices:
            choice = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            if choice not in choices:
                choices.append(choice)
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        result.append({"question": question, "choices": choices, "answer": rng.randrange(num_choices)})
    return result


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def direct_loglik(model, tokenizer, question, choice, *, max_length=None):
    """Reference: one unpadded forward per choice, log-softmax, sum over the continuation tokens."""
    context_ids = tokenizer(question)["input_ids"]  # with BOS
    whole_ids = tokenizer(question + " " + choice)["input_ids"]
    num_continuation = len(whole_ids) - len(context_ids)
    if max_length is not None:
        whole_ids = whole_ids[-(max_length + 1) :]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole_ids[:-1]])).logits[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    total = 0.0
    for position in range(len(whole_ids) - num_continuation, len(whole_ids)):
        total += log_probs[position - 1, whole_ids[position]].item()
    return total


def argmax(values):
    return max(range(len(values)), key=lambda index: (values[index], -index))


def test_matches_direct_computation(tiny_llama, word_tokenizer, rows, tmp_path):
    path = write_rows(tmp_path / "mc.jsonl", rows)
    result = evaluate_multiple_choice(
        tiny_llama, word_tokenizer, path, batch_size=4, progress=False, return_details=True
    )
    assert result["num_examples"] == len(rows)
    assert result["data"] == str(path)
    assert result["seconds"] >= 0
    correct = correct_norm = 0
    for row, detail in zip(rows, result["per_example"], strict=True):
        expected = [
            direct_loglik(tiny_llama, word_tokenizer, row["question"], choice) for choice in row["choices"]
        ]
        assert detail["loglik"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert all(value < 0 for value in detail["loglik"])
        assert detail["pred"] == argmax(expected)
        byte_lengths = [len((" " + choice).encode("utf-8")) for choice in row["choices"]]
        assert detail["pred_norm"] == argmax([v / n for v, n in zip(expected, byte_lengths, strict=True)])
        assert detail["answer"] == row["answer"]
        correct += detail["pred"] == row["answer"]
        correct_norm += detail["pred_norm"] == row["answer"]
    assert result["accuracy"] == pytest.approx(correct / len(rows))
    assert result["accuracy_norm"] == pytest.approx(correct_norm / len(rows))
    # The norm can pick differently from the raw sum: choices here have 1 to 4 words.
    assert any(d["pred"] != d["pred_norm"] for d in result["per_example"])
    assert "per_example" not in evaluate_multiple_choice(tiny_llama, word_tokenizer, path, progress=False)


def test_batch_size_does_not_change_results(tiny_llama, word_tokenizer, rows):
    one = evaluate_multiple_choice(
        tiny_llama, word_tokenizer, rows, batch_size=1, progress=False, return_details=True
    )
    five = evaluate_multiple_choice(
        tiny_llama, word_tokenizer, rows, batch_size=5, progress=False, return_details=True
    )
    assert one["accuracy"] == five["accuracy"]
    assert one["accuracy_norm"] == five["accuracy_norm"]
    for a, b in zip(one["per_example"], five["per_example"], strict=True):
        assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
        assert a["loglik"] == pytest.approx(b["loglik"], rel=1e-6, abs=1e-6)


def test_padding_does_not_change_scores(tiny_llama, word_tokenizer):
    short = {"question": "w1 w2", "choices": ["w3", "w4 w5"], "answer": 0}
    long = {"question": " ".join(WORDS[:20]), "choices": ["w6", "w7"], "answer": 1}
    alone = evaluate_multiple_choice(tiny_llama, word_tokenizer, [short], progress=False, return_details=True)
    # With the long row in the same batch, the short requests are right-padded by ~20 positions.
    padded = evaluate_multiple_choice(
        tiny_llama, word_tokenizer, [long, short], batch_size=8, progress=False, return_details=True
    )
    assert padded["per_example"][1]["loglik"] == pytest.approx(alone["per_example"][0]["loglik"], rel=1e-6)
    # Whatever the pad id, masked positions do not matter.
    tokenizer = make_word_tokenizer()
    tokenizer.pad_token = "w9"
    other_pad = evaluate_multiple_choice(
        tiny_llama, tokenizer, [long, short], batch_size=8, progress=False, return_details=True
    )
    for a, b in zip(padded["per_example"], other_pad["per_example"], strict=True):
        assert a["loglik"] == pytest.approx(b["loglik"], rel=1e-6)


def test_tokenizer_without_bos(tiny_llama):
    tokenizer = make_word_tokenizer(bos=False)
    row = {"question": "w1 w2 w3", "choices": ["w4", "w5 w6"], "answer": 1}
    result = evaluate_multiple_choice(tiny_llama, tokenizer, [row], progress=False, return_details=True)
    expected = []
    for choice in row["choices"]:
        ids = tokenizer(row["question"] + " " + choice)["input_ids"]
        num_context = len(tokenizer(row["question"])["input_ids"])
        with torch.no_grad():
            log_probs = torch.log_softmax(tiny_llama(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        expected.append(sum(log_probs[p - 1, ids[p]].item() for p in range(num_context, len(ids))))
    assert result["per_example"][0]["loglik"] == pytest.approx(expected, rel=1e-5)
    # An empty question: the continuation is scored after the BOS token, as lm-eval does.
    empty = evaluate_multiple_choice(
        tiny_llama,
        tokenizer,
        [{"question": "", "choices": ["w4", "w5"], "answer": 0}],
        progress=False,
        return_details=True,
    )
    with torch.no_grad():
        log_probs = torch.log_softmax(tiny_llama(input_ids=torch.tensor([[1]])).logits[0, 0].double(), -1)
    assert empty["per_example"][0]["loglik"] == pytest.approx(
        [log_probs[7].item(), log_probs[8].item()], rel=1e-5
    )


def test_left_truncation_to_max_length(tiny_llama, word_tokenizer):
    row = {"question": " ".join(WORDS[:25]), "choices": ["w1 w2 w3", "w4"], "answer": 0}
    result = evaluate_multiple_choice(
        tiny_llama, word_tokenizer, [row], max_length=8, progress=False, return_details=True
    )
    expected = [
        direct_loglik(tiny_llama, word_tokenizer, row["question"], choice, max_length=8)
        for choice in row["choices"]
    ]
    assert result["per_example"][0]["loglik"] == pytest.approx(expected, rel=1e-5)
    untruncated = [
        direct_loglik(tiny_llama, word_tokenizer, row["question"], choice) for choice in row["choices"]
    ]
    assert result["per_example"][0]["loglik"] != pytest.approx(untruncated, rel=1e-5)
    assert default_max_length(tiny_llama) == 64


def test_answer_as_text_limit_and_training_mode(tiny_llama, word_tokenizer, rows):
    by_text = [{**row, "answer": row["choices"][row["answer"]]} for row in rows]
    tiny_llama.train()
    try:
        result = evaluate_multiple_choice(
            tiny_llama, word_tokenizer, by_text, limit=5, progress=False, return_details=True
        )
        assert tiny_llama.training
    finally:
        tiny_llama.eval()
    assert result["num_examples"] == 5
    assert [d["answer"] for d in result["per_example"]] == [row["answer"] for row in rows[:5]]
    by_index = evaluate_multiple_choice(tiny_llama, word_tokenizer, rows[:5], progress=False)
    assert (result["accuracy"], result["accuracy_norm"]) == (by_index["accuracy"], by_index["accuracy_norm"])


def test_separator_rule():
    assert split_context_continuation("Q:", "yes") == ("Q:", " yes")
    assert split_context_continuation("Q:", " yes") == ("Q:", " yes")
    assert split_context_continuation("Q:", "\nyes") == ("Q:", "\nyes")
    # Trailing whitespace of the question moves to the continuation; no second space is added.
    assert split_context_continuation("Answer: ", "yes") == ("Answer:", " yes")


# --- bad input -----------------------------------------------------------------------------------


def test_missing_file(tiny_llama, word_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        evaluate_multiple_choice(tiny_llama, word_tokenizer, tmp_path / "nowhere.jsonl", progress=False)


def test_empty_file(tiny_llama, word_tokenizer, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file holds no records"):
        evaluate_multiple_choice(tiny_llama, word_tokenizer, path, progress=False)


GOOD = {"question": "w1 w2", "choices": ["w3", "w4"], "answer": 0}


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"question": "w1", "choices": ["w3", "w4"]}, "missing field 'answer'"),
        ({"question": "w1", "answer": 0}, "missing field 'choices'"),
        ({"choices": ["w3", "w4"], "answer": 0}, "missing field 'question'"),
        ({"question": "w1", "choices": ["w3"], "answer": 0}, "at least 2"),
        ({"question": "w1", "choices": ["w3", "w4"], "answer": 2}, "index 2 is out of range"),
        ({"question": "w1", "choices": ["w3", "w4"], "answer": -1}, "index -1 is out of range"),
        ({"question": "w1", "choices": ["w3", "w4"], "answer": "w5"}, "'w5' is not one of the choices"),
        ({"question": "w1", "choices": "w3 w4", "answer": 0}, "list of strings"),
    ],
)
def test_bad_rows_name_file_and_line(tiny_llama, word_tokenizer, tmp_path, bad_row, message):
    path = tmp_path / "bad.jsonl"
    # Line 2 is blank, so the bad row is on line 4 although it is the third record.
    path.write_text(
        "\n".join([json.dumps(GOOD), "", json.dumps(GOOD), json.dumps(bad_row)]) + "\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match=rf"bad\.jsonl:4: .*{message}"):
        evaluate_multiple_choice(tiny_llama, word_tokenizer, path, progress=False)


def test_bad_in_memory_row_names_index(tiny_llama, word_tokenizer):
    with pytest.raises(DataError, match=r"data\[1\]: 'choices' needs at least 2"):
        evaluate_multiple_choice(
            tiny_llama, word_tokenizer, [GOOD, {**GOOD, "choices": ["w3"]}], progress=False
        )


# --- the cloze builder ---------------------------------------------------------------------------

STORY = (
    "Tom had a red ball. He liked to play with the ball in the park every day. One day the ball went "
    "over the fence and Tom was sad. His friend Sue came to help him. She climbed the fence and got "
    "the ball back. Tom was happy and said thank you. They played together until the sun went down."
    "\n<|endoftext|>\n"
    "Lily saw a big cat in the garden. The cat was hungry, so Lily gave it some milk. The cat purred "
    "and rubbed against her legs. Lily smiled and named the cat Fluffy. From that day on, Fluffy "
    "came to the garden every morning, and Lily always had milk ready for her new friend."
)


def test_cloze_items_are_well_formed_and_deterministic():
    items = build_cloze_items(STORY, num_items=30, num_choices=4, seed=3, context_words=8)
    assert items == build_cloze_items(STORY, num_items=30, num_choices=4, seed=3, context_words=8)
    assert items != build_cloze_items(STORY, num_items=30, num_choices=4, seed=4, context_words=8)
    documents = STORY.split("<|endoftext|>")
    for item in items:
        assert len(item["question"].split()) == 8
        assert "<|endoftext|>" not in item["question"]
        choices, answer = item["choices"], item["choices"][item["answer"]]
        assert len(choices) == 4 and len({choice.lower() for choice in choices}) == 4
        assert answer.isalpha() and all(choice.isalpha() for choice in choices)
        # The answer is the word that really follows the passage, within one document.
        assert any(
            item["question"] + " " + answer in document or item["question"] + "\n" + answer in document
            for document in documents
        )
    assert len({item["answer"] for item in items}) == 4  # the answer position varies


def test_cloze_builder_errors():
    with pytest.raises(ValueError, match="allows only"):
        build_cloze_items(STORY, num_items=10_000)
    with pytest.raises(ValueError, match="num_choices must be >= 2"):
        build_cloze_items(STORY, num_items=1, num_choices=1)
    with pytest.raises(ValueError, match="distinct alphabetic word"):
        build_cloze_items("a a a a a a", num_items=1, context_words=2)


def test_cloze_cli_writes_jsonl(tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text(STORY, encoding="utf-8")
    out = tmp_path / "sets" / "cloze.jsonl"
    assert cloze_main([str(text), str(out), "--num-items", "12", "--seed", "1", "--context-words", "10"]) == 0
    assert "wrote 12 items" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == build_cloze_items(STORY, num_items=12, seed=1, context_words=10)
    with pytest.raises(SystemExit):
        cloze_main([str(tmp_path / "missing.txt"), str(out)])


# --- the real stories260K model ------------------------------------------------------------------

NUM_ITEMS = 200
NUM_CHOICES = 4


@pytest.fixture(scope="module")
def stories260k():
    model_dir = shared_asset("models/stories260K")
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def cloze_accuracy(stories260k, text_path, tmp_path):
    model, tokenizer = stories260k
    items = build_cloze_items(
        text_path.read_text(encoding="utf-8"), num_items=NUM_ITEMS, num_choices=NUM_CHOICES, seed=0
    )
    path = write_jsonl(items, tmp_path / f"cloze-{text_path.parent.name}.jsonl")
    return evaluate_multiple_choice(model, tokenizer, path, batch_size=32, progress=False)


@pytest.mark.slow
def test_stories260k_cloze_in_domain_beats_out_of_domain(stories260k, tmp_path):
    # Measured (seed 0, 200 items, 4 choices, chance 0.25): TinyStories 0.875 (norm 0.875),
    # wikitext-2 valid 0.445 (norm 0.415); seeds 1 and 2 give 0.86/0.91 and 0.51/0.475.
    in_domain = cloze_accuracy(stories260k, shared_asset("text/tinystories/sample.txt"), tmp_path)
    out_of_domain = cloze_accuracy(stories260k, shared_asset("text/wikitext-2/valid.txt"), tmp_path)
    assert in_domain["num_examples"] == out_of_domain["num_examples"] == NUM_ITEMS
    assert in_domain["accuracy"] >= 0.7, in_domain
    assert in_domain["accuracy_norm"] >= 0.7, in_domain
    assert out_of_domain["accuracy"] <= in_domain["accuracy"] - 0.2, (in_domain, out_of_domain)
    assert out_of_domain["accuracy_norm"] <= in_domain["accuracy_norm"] - 0.2, (in_domain, out_of_domain)
