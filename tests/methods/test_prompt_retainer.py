"""Learned prompt pruning in causal LMs (``adtp`` / ``fixed``): the retainer trains through ``hf_prune.prune``
on a plain text file, keep_ratio 1 is the stock model, generate = the pruned forward step by step, the ratio
head gives prompts their own ratios, the retainer reloads in a fresh process, and bad input names its key."""

import copy
import math
from collections import Counter

import pytest
import torch
from fresh_process import generate_after_reload
from hf_prune.model_patches.prompt_retainer import PromptRetainer, chosen_ratios, expected_ratios, soft_keep
from test_prompt_token_pruning import PROMPTS
from tiny_models import NUM_LAYERS, build_tiny_model, build_tokenizer

import hf_prune
from hf_prune.errors import DataError, RecipeError
from hf_prune.methods.tokens.prompt_retainer_training import (
    add_retainer_gradients,
    text_windows,
    train_prompt_retainer,
)
from hf_prune.methods.tokens.text_tokens import TextTokenPruningConfig, apply_prompt_token_pruning

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


def reference_loss(model, stock, input_ids, stage, teacher_weight):
    """The loss of one batch (prompt_retainer_training's docstring) as one autograd graph, pruning at layer 0
    through the stock model: its 4-D float attention mask carries log p of each key (the soft pruning), the
    retainer reads the token embeddings, and the self IG is a second backward through the same graph."""
    settings, prompt = model.settings, stage["max_length"] - stage["continuation_length"]
    embeds = stock.model.embed_tokens(input_ids).detach().requires_grad_(True)
    batch, length = input_ids.shape

    def nll_after(inputs_embeds, attention_mask=None):
        logits = stock(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
        return torch.nn.functional.cross_entropy(
            logits[:, prompt - 1 : -1].flatten(0, 1), input_ids[:, prompt:].flatten(), reduction="sum"
        )

    saliency, ratio_logits = model.retainer(embeds[:, :prompt], torch.ones(batch, prompt, dtype=torch.bool))
    expected = expected_ratios(settings, ratio_logits)
    ratio = expected + (chosen_ratios(settings, ratio_logits) - expected).detach()
    eligible = torch.zeros(batch, length, dtype=torch.bool)
    eligible[:, 1 : prompt - 1] = True  # the prompt's first and last tokens are always kept
    scores = torch.cat([saliency, saliency.new_zeros(batch, length - prompt)], dim=1)
    keep = soft_keep(scores, eligible, ratio, settings["temperature"])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    window = getattr(stock.config, "sliding_window", None)
    if window is not None:  # Mistral: each query sees its last `window` keys
        causal &= ~torch.ones(length, length, dtype=torch.bool).tril(-window)
    bias = torch.where(causal, 0.0, torch.finfo(torch.float32).min)[None, None] + keep.log()[:, None, None, :]
    nll = nll_after(embeds, bias)
    (grad,) = torch.autograd.grad(nll, embeds, retain_graph=True)
    self_ig = (embeds * grad).sum(-1)[:, :prompt].detach()
    teacher_ig = torch.zeros(batch, prompt)
    for k in range(1, stage["ig_steps"] + 1):
        point = (embeds[:, :prompt].detach() * k / stage["ig_steps"]).requires_grad_(True)
        (grad,) = torch.autograd.grad(nll_after(torch.cat([point, embeds[:, prompt:].detach()], 1)), point)
        teacher_ig += (embeds[:, :prompt].detach() * grad).sum(-1) / stage["ig_steps"]
    eligible = eligible[:, :prompt]
    log_q = saliency.masked_fill(~eligible, float("-inf")).log_softmax(1).masked_fill(~eligible, 0)

    def kl(ig):
        target = ig.abs() * eligible
        target = target / target.norm(dim=1, keepdim=True)
        target = target / target.sum(1, keepdim=True)
        return (target * (target.clamp_min(1e-12).log() - log_q)).sum(1).mean()

    distill = teacher_weight * kl(teacher_ig) + (1 - teacher_weight) * kl(self_ig)
    flops = (ratio.mean() - stage["target_ratio"]) ** 2 if settings["algorithm"] == "adtp" else 0.0
    targets = batch * (length - prompt)
    return nll / targets + stage.get("distill_weight", 1.0) * distill + stage.get("flops_weight", 4.0) * flops


@pytest.mark.parametrize(
    ("algorithm", "checkpointed", "family"),
    [
        ("adtp", False, "llama"),
        ("adtp", True, "llama"),
        ("fixed", False, "llama"),
        ("fixed", True, "llama"),
        ("adtp", False, "mistral"),
    ],
    ids=["adtp-plain", "adtp-checkpointed", "fixed-plain", "fixed-checkpointed", "adtp-mistral-window"],
)
def test_retainer_gradients_equal_autograd_of_the_whole_loss(
    stock, tokenizer, algorithm, checkpointed, family
):
    """One backward through the model (plus the retainer's own terms), with or without activation
    checkpointing, gives the gradient autograd gives on the loss built as one graph on the stock model
    (Mistral: a sliding window of 8 inside the 24-token windows); gradients add to those already there."""
    stage = {**TRAINING, "algorithm": algorithm, "layer": 0, "distill_weight": 0.7, "flops_weight": 3.0}
    stage["keep_ratio"] = 0.5 if algorithm == "fixed" else None
    config = TextTokenPruningConfig(**stage)
    stock = stock if family == "llama" else build_tiny_model(family, tokenizer)
    model = copy.deepcopy(stock)
    apply_prompt_token_pruning(model, config)
    with torch.no_grad():  # a retainer that scores tokens apart (the untrained one is near uniform)
        for parameter in model.retainer.parameters():
            parameter.normal_(0, 0.5)
    input_ids = tokenizer(" ".join(PROMPTS), return_tensors="pt")["input_ids"][:, :48].view(2, 24)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in model.retainer.parameters():
        parameter.requires_grad_(True)
    earlier = {name: torch.full_like(p, 0.25) for name, p in model.retainer.named_parameters()}
    for name, parameter in model.retainer.named_parameters():
        parameter.grad = earlier[name].clone()
    terms = add_retainer_gradients(model, input_ids, config, 0.3, checkpointed=checkpointed)
    got = {name: p.grad - earlier[name] for name, p in model.retainer.named_parameters()}
    got = {name: grad for name, grad in got.items() if algorithm == "adtp" or not name.startswith("ratio.")}
    model.retainer.zero_grad(set_to_none=True)
    expected_loss = reference_loss(model, stock, input_ids, stage, 0.3)
    expected_loss.backward()
    expected = {name: p.grad for name, p in model.retainer.named_parameters() if p.grad is not None}
    assert set(got) == set(expected) and (algorithm == "adtp") == any(k.startswith("ratio.") for k in got)
    torch.testing.assert_close(terms["loss"], expected_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in expected.items():
        assert grad.abs().sum() > 0 or name == "saliency.2.bias", name  # a shift moves no threshold
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_only_a_causal_lms_retainer_trains_data_parallel():
    """A causal LM's retainer all-reduces its gradients; a classifier's trains with Trainer in one process;
    attention / random calibrate nothing."""
    import transformers

    from hf_prune.adapters import get_adapter

    llama = get_adapter(transformers.LlamaConfig())
    bert = get_adapter(transformers.BertConfig(architectures=["BertForSequenceClassification"]))
    assert bert.is_encoder and not llama.is_encoder
    learned = TextTokenPruningConfig(algorithm="fixed", keep_ratio=0.5, train_data="x.txt")
    free = TextTokenPruningConfig(algorithm="random", keep_ratio=0.5)
    assert learned.supports_data_parallel_on(llama) and not learned.supports_data_parallel_on(bert)
    assert free.supports_data_parallel_on(llama) and free.supports_data_parallel_on(bert)


def test_training_is_adamw_on_the_step_gradients_rebuilt_by_hand(stock, tokenizer, text_file):
    """``train_prompt_retainer`` = AdamW (no weight decay) with a linear warm-up over 5% of the steps then
    cosine decay, gradient norm clipped at 1, on ``add_retainer_gradients`` (tested above) over whole
    batches of the windows in a seeded order drawn anew each pass, the teacher's weight from 1 to 0; the
    report's figures are the last step's (under 10 steps) and the ratios the trained retainer chooses."""
    fields = {
        **TRAINING,
        "algorithm": "adtp",
        "layer": 1,
        "train_steps": 9,
        "batch_size": 16,
        "learning_rate": 0.05,
    }
    fields.update(seed=3, flops_weight=200.0, distill_weight=20.0)  # gradient norms above the clip of 1
    config = TextTokenPruningConfig(**fields, train_data=str(text_file))
    model = copy.deepcopy(stock)
    apply_prompt_token_pruning(model, config)
    reference = copy.deepcopy(model)
    summary = train_prompt_retainer(model, tokenizer, config, progress=False)

    ids = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    size = config.max_length - 1  # BOS first
    windows = [[tokenizer.bos_token_id, *ids[s : s + size]] for s in range(0, len(ids) - size + 1, size)]
    assert summary["windows"] == len(windows) and len(windows) // config.batch_size < config.train_steps
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    parameters = list(reference.retainer.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0
    )
    steps, warm = config.train_steps, 1

    def factor(step):
        if step < warm:
            return step / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator, per_pass = torch.Generator().manual_seed(3), len(windows) // config.batch_size
    for step in range(steps):
        if step % per_pass == 0:
            order = torch.randperm(len(windows), generator=generator).tolist()
        batch = order[(step % per_pass) * config.batch_size :][: config.batch_size]
        input_ids = torch.tensor([windows[i] for i in batch])
        terms = add_retainer_gradients(reference, input_ids, config, 1 - step / (steps - 1))
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        for grad in grads:
            grad.mul_(min(1.0, 1.0 / (float(norm) + 1e-6)))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    for name, tensor in reference.retainer.state_dict().items():
        if name != "saliency.2.bias":  # its exact gradient is 0 (a shift moves no threshold): AdamW turns
            # the float noise in it into full steps of either sign
            torch.testing.assert_close(
                model.retainer.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name
            )
    for term in ("task", "distill", "flops", "ratio"):
        assert summary["final"][term] == pytest.approx(float(terms[term]), abs=1e-4), term
    prompts = torch.tensor([w[: config.max_length - config.continuation_length] for w in windows])
    with torch.no_grad():
        hidden = stock(input_ids=prompts, output_hidden_states=True).hidden_states[1]  # entering layer 1
        chosen = chosen_ratios(
            model.settings, model.retainer(hidden, torch.ones_like(prompts, dtype=torch.bool))[1]
        )
    assert summary["chosen_ratios"] == {f"{r:g}": n for r, n in sorted(Counter(chosen.tolist()).items())}


class CountingTokenizer:
    """Token i of the text is i + 10 (the text is its token count, written as a number)."""

    def __init__(self, bos_token_id):
        self.bos_token_id = bos_token_id

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 + i for i in range(int(text))]}


@pytest.mark.parametrize(
    ("tokens", "bos", "expected"), [(30, 1, 3), (29, 1, 2), (44, None, 4), (43, None, 3)]
)
def test_text_windows_by_hand(tmp_path, tokens, bos, expected):
    """Windows of max_length 11: BOS + 10 text tokens (11 without a BOS) every 10 (11) tokens, a short tail
    left out; as many windows as a batch is enough, fewer is refused naming the file."""
    path = tmp_path / "text.txt"
    path.write_text(str(tokens))
    stage = TextTokenPruningConfig(
        algorithm="fixed",
        keep_ratio=0.5,
        max_length=11,
        continuation_length=4,
        batch_size=expected,
        train_data=str(path),
    )
    windows = text_windows(stage, CountingTokenizer(bos))
    size = 10 if bos is not None else 11
    head = [bos] if bos is not None else []
    assert [w["input_ids"].tolist() for w in windows] == [
        head + [10 + i for i in range(k * size, (k + 1) * size)] for k in range(expected)
    ]
    stage.batch_size = expected + 1
    with pytest.raises(
        DataError,
        match=rf"text\.txt gives {expected} windows of 11 tokens, fewer than one batch \({expected + 1}\)",
    ):
        text_windows(stage, CountingTokenizer(bos))
    with pytest.raises(DataError, match="needs the model's tokenizer"):
        text_windows(stage, None)
    stage.train_data = str(tmp_path / "gone.txt")
    with pytest.raises(DataError, match=r"train_data: file not found: .*gone\.txt"):
        text_windows(stage, CountingTokenizer(bos))
