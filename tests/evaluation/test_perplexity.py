import json
import math
import random
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_asset
from hf_prune.evals.metrics import load_metric, shipped_metric_names
from hf_prune.evals.perplexity import DEFAULT_DOCUMENT_SEPARATOR, default_seq_len, evaluate_perplexity
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = [f"w{i}" for i in range(40)]
SEQ_LEN = 16
# 1 BOS + 73 words = 74 tokens: four full windows of 16 and a partial one of 10.
NUM_WORDS = 73


# --- metric module -----------------------------------------------------------------------------


def test_shipped_metric_matches_hand_computation():
    metric = load_metric("perplexity")
    result = metric.compute(nll_sum=[2.0, 3.0], num_tokens=[1, 2])
    assert result["perplexity"] == pytest.approx(math.exp(5 / 3), rel=1e-12)
    assert result["mean_nll"] == pytest.approx(5 / 3, rel=1e-12)
    assert result["num_tokens"] == 3


def test_shipped_metric_accumulates_batches():
    metric = load_metric("perplexity")
    metric.add_batch(nll_sum=[2.0], num_tokens=[1])
    metric.add_batch(nll_sum=[3.0, 0.5], num_tokens=[2, 4])
    assert metric.compute()["perplexity"] == pytest.approx(math.exp(5.5 / 7), rel=1e-12)


def test_shipped_metric_rejects_no_tokens():
    metric = load_metric("perplexity")
    with pytest.raises(ValueError, match="at least one predicted token"):
        metric.compute(nll_sum=[0.0], num_tokens=[0])


def test_unknown_metric_lists_shipped_ones():
    assert "perplexity" in shipped_metric_names()
    with pytest.raises(ValueError, match="shipped metrics: .*perplexity"):
        load_metric("no-such-metric")


# --- evaluate_perplexity on a tiny random Llama --------------------------------------------------


@pytest.fixture(scope="module")
def word_tokenizer():
    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Prepend BOS like Llama tokenizers do, so the evaluator's "text as the tokenizer encodes it"
    # path is exercised with a special token in front.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


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
def corpus_text():
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(NUM_WORDS))


@pytest.fixture
def corpus_file(tmp_path, corpus_text):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


def direct_perplexity(model, token_ids, seq_len):
    """Reference figure: cross-entropy over each window's shifted logits, token-weighted."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(token_ids), seq_len):
        window = torch.tensor([token_ids[start : start + seq_len]])
        if window.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=window).logits
        nll = F.cross_entropy(logits[0, :-1].double(), window[0, 1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += window.shape[1] - 1
    return math.exp(total_nll / total_tokens), total_tokens


def test_matches_direct_computation(tiny_llama, word_tokenizer, corpus_file, corpus_text):
    token_ids = word_tokenizer(corpus_text)["input_ids"]
    assert len(token_ids) == NUM_WORDS + 1 and len(token_ids) % SEQ_LEN >= 2
    expected, expected_tokens = direct_perplexity(tiny_llama, token_ids, SEQ_LEN)

    one = evaluate_perplexity(
        tiny_llama, word_tokenizer, corpus_file, seq_len=SEQ_LEN, batch_size=1, progress=False
    )
    three = evaluate_perplexity(
        tiny_llama, word_tokenizer, str(corpus_file), seq_len=SEQ_LEN, batch_size=3, progress=False
    )
    for result in (one, three):
        assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert result["mean_nll"] == pytest.approx(math.log(expected), rel=1e-5)
        assert result["num_tokens"] == expected_tokens == len(token_ids) - 5
        assert result["num_windows"] == 5
        assert result["seq_len"] == SEQ_LEN
        assert result["data"] == str(corpus_file)
        assert result["seconds"] >= 0
    assert one["perplexity"] == pytest.approx(three["perplexity"], rel=1e-5)


def test_limit_and_default_seq_len(tiny_llama, word_tokenizer, corpus_file, corpus_text):
    token_ids = word_tokenizer(corpus_text)["input_ids"]
    limited = evaluate_perplexity(
        tiny_llama, word_tokenizer, corpus_file, seq_len=SEQ_LEN, limit=2, progress=False
    )
    expected, _ = direct_perplexity(tiny_llama, token_ids[: 2 * SEQ_LEN], SEQ_LEN)
    assert limited["num_windows"] == 2
    assert limited["num_tokens"] == 2 * (SEQ_LEN - 1)
    assert limited["perplexity"] == pytest.approx(expected, rel=1e-5)

    # Default window: the config's 64 positions; the whole 74-token text needs two windows.
    whole = evaluate_perplexity(tiny_llama, word_tokenizer, corpus_file, progress=False)
    assert whole["seq_len"] == 64
    assert whole["num_windows"] == 2


def test_drops_one_token_tail(tiny_llama, word_tokenizer, tmp_path, corpus_text):
    # 1 BOS + 32 words = 33 tokens: two windows of 16 and a 1-token tail that predicts nothing.
    path = tmp_path / "tail.txt"
    path.write_text(" ".join(corpus_text.split()[:32]), encoding="utf-8")
    result = evaluate_perplexity(tiny_llama, word_tokenizer, path, seq_len=SEQ_LEN, progress=False)
    assert result["num_windows"] == 2
    assert result["num_tokens"] == 2 * (SEQ_LEN - 1)


def test_restores_training_mode(tiny_llama, word_tokenizer, corpus_file):
    tiny_llama.train()
    try:
        evaluate_perplexity(tiny_llama, word_tokenizer, corpus_file, seq_len=SEQ_LEN, progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()
    evaluate_perplexity(tiny_llama, word_tokenizer, corpus_file, seq_len=SEQ_LEN, progress=False)
    assert not tiny_llama.training


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_structured_files_join_text_field(tiny_llama, word_tokenizer, tmp_path, corpus_text, suffix):
    words = corpus_text.split()
    records = [{"body": " ".join(words[i : i + 20]), "id": i} for i in range(0, len(words), 20)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))
    joined = tmp_path / "joined.txt"
    joined.write_text("\n\n".join(record["body"] for record in records), encoding="utf-8")

    structured = evaluate_perplexity(
        tiny_llama, word_tokenizer, path, seq_len=SEQ_LEN, text_field="body", progress=False
    )
    plain = evaluate_perplexity(tiny_llama, word_tokenizer, joined, seq_len=SEQ_LEN, progress=False)
    assert structured["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)
    assert structured["num_tokens"] == plain["num_tokens"]


def test_document_separator_is_removed(tiny_llama, word_tokenizer, tmp_path, corpus_text):
    words = corpus_text.split()
    plain = tmp_path / "plain.txt"
    plain.write_text(" ".join(words[:30]) + "\n\n" + " ".join(words[30:]), encoding="utf-8")
    marked = tmp_path / "marked.txt"
    marked.write_text(" ".join(words[:30]) + "\n<|endoftext|>\n" + " ".join(words[30:]), encoding="utf-8")
    expected = evaluate_perplexity(tiny_llama, word_tokenizer, plain, seq_len=SEQ_LEN, progress=False)
    stripped = evaluate_perplexity(
        tiny_llama,
        word_tokenizer,
        marked,
        seq_len=SEQ_LEN,
        progress=False,
        document_separator=DEFAULT_DOCUMENT_SEPARATOR,
    )
    assert stripped["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    kept = evaluate_perplexity(tiny_llama, word_tokenizer, marked, seq_len=SEQ_LEN, progress=False)
    assert kept["num_tokens"] == expected["num_tokens"] + 1  # the marker is one <unk> word here


def test_default_seq_len_from_config():
    class NestedConfig:
        def get_text_config(self):
            return SimpleNamespace(max_position_embeddings=256)

    assert default_seq_len(SimpleNamespace(config=LlamaConfig(max_position_embeddings=4096))) == 1024
    assert default_seq_len(SimpleNamespace(config=LlamaConfig(max_position_embeddings=128))) == 128
    assert default_seq_len(SimpleNamespace(config=NestedConfig())) == 256
    assert default_seq_len(SimpleNamespace(config=SimpleNamespace())) == 1024
    assert default_seq_len(SimpleNamespace()) == 1024


# --- errors ------------------------------------------------------------------------------------


def test_missing_file(tiny_llama, word_tokenizer, tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        evaluate_perplexity(tiny_llama, word_tokenizer, missing, progress=False)


def test_empty_file(tiny_llama, word_tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        evaluate_perplexity(tiny_llama, word_tokenizer, empty, progress=False)


def test_too_few_tokens(tiny_llama, tmp_path):
    # A tokenizer without BOS turns a one-word file into a single token: nothing to predict.
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "w0": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    short = tmp_path / "short.txt"
    short.write_text("w0", encoding="utf-8")
    with pytest.raises(ValueError, match="short.txt"):
        evaluate_perplexity(tiny_llama, tokenizer, short, progress=False)


def test_jsonl_without_text_field(tiny_llama, word_tokenizer, tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"body": "w1 w2 w3"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"records\.jsonl: no text field 'text'") as excinfo:
        evaluate_perplexity(tiny_llama, word_tokenizer, path, progress=False)
    assert "body" in str(excinfo.value)  # lists the columns that do exist


def test_empty_jsonl(tiny_llama, word_tokenizer, tmp_path):
    path = tmp_path / "nothing.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="nothing.jsonl"):
        evaluate_perplexity(tiny_llama, word_tokenizer, path, progress=False)


def test_hub_id_offline_explains(tiny_llama, word_tokenizer):
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("only checked offline, where the Hub lookup fails at once")
    with pytest.raises(FileNotFoundError, match="not found.*network"):
        evaluate_perplexity(tiny_llama, word_tokenizer, "no-such-user/no-such-dataset", progress=False)


# --- the real stories260K model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def stories260k():
    model_dir = shared_asset("models/stories260K")
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def test_stories260k_tinystories_perplexity(stories260k):
    model, tokenizer = stories260k
    sample = shared_asset("text/tinystories/sample.txt")
    result = evaluate_perplexity(
        model,
        tokenizer,
        sample,
        seq_len=512,
        limit=1,
        progress=False,
        document_separator=DEFAULT_DOCUMENT_SEPARATOR,
    )
    # ../shared/assets/README.md quotes 4.06 for the first 512 tokens of this in-domain text, with
    # the literal <|endoftext|> markers between stories removed (the tokenizer spells them out).
    assert 3.8 <= result["perplexity"] <= 4.3, result
    raw = evaluate_perplexity(model, tokenizer, sample, seq_len=512, limit=1, progress=False)
    assert raw["perplexity"] > result["perplexity"] + 0.5, (raw, result)
    assert result["num_windows"] == 1
    assert result["num_tokens"] == 511
