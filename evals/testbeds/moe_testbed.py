"""A small Mixtral trained offline on three real domains: the testbed for expert pruning.

No small pretrained mixture-of-experts model is available offline, and one upcycled from a dense
model (experts = copies of its MLP) collapses its routing onto one expert per layer, so every expert
pruning method looks lossless on it (see ``docs/METHODS.md``, "Testbeds"). This module trains one
from scratch whose experts specialise, deterministically and in a few minutes on 2 CPU cores:

* Data, three real domains with disjoint train / calibration / eval splits:
  ``stories`` (text sampled from stories260K from BOS with a fixed seed), ``shakespeare``
  (tiny-shakespeare) and ``wikitext`` (WikiText-2 *valid*; the test split is left for final
  reports). Each held-out split is one contiguous slice of its domain's text cut at document
  boundaries (stories / speeches / articles), taken from the end: eval last, calibration before it.
* Tokenizer: a byte-level BPE (1,024 tokens) trained on an equal share of each domain's training
  text, like the demo model's. The 512-token stories260K vocabulary would cut shakespeare and
  wikitext into ~1.6 characters per token against ~2.1 for stories; this one is fairer to all three.
  ``split_special_tokens=True`` keeps WikiText's literal ``<unk>`` as text.
* Model: ``MixtralForCausalLM``, 8 experts, top-2, hidden 128, 4 layers, expert intermediate 256,
  every expert randomly initialised on its own (no copies).
* Training: every batch holds the same number of windows from each domain; loss = cross-entropy +
  0.005 x a load-balancing loss (the Switch loss ``E * sum_i f_i P_i``) computed *per layer* and
  averaged + 0.001 x the router z-loss; AdamW with linear warm-up and cosine decay; a fixed seed;
  1,200 steps of 18 x 128 tokens, ~3.5 minutes on 2 quiet CPU cores. (The stock
  Mixtral auxiliary loss pools the counts of all layers before the product, so it only balances the
  layers' average; the saved config records the coefficient, with ``output_router_logits=False``
  so that a plain forward's loss is the language-model loss alone.) A stronger balance (0.02, 0.01)
  also trains well but spreads the load so evenly that the most-used experts are hardly more
  important than the least-used, which would make frequency-based pruning look no better than chance.

Usable means (``testbed.json`` → ``checks``): no expert takes more than 40% of a layer's top-k
assignments, every layer's load entropy is at least 0.75 x ln 8, and removing (masking out of the
router) the 2 most-used experts of every layer raises each domain's eval perplexity at least 1.1x
as much as removing the 2 least-used, with usage counted on the calibration text of all domains and
of each domain alone.

The folder (cached under ``$HF_PRUNE_CACHE`` or ``~/.cache/hf_prune``, subfolder ``moe-testbed-v1``)
holds the model, the tokenizer, ``data/{train,calibration,eval}_<domain>.txt``, ``data/calibration.txt``
(the three calibration slices cut into ~1 KB records separated by blank lines, domains interleaved)
and ``testbed.json``: the recipe, build time, losses, eval perplexity per domain, the routing report,
the ablation check and whether the testbed passed its usability checks.

    python -m hf_prune.evals.testbeds.moe_testbed [--cache DIR] [--assets DIR]

Determinism: the same seed gives the same weights in the same environment (same torch build and
thread count); float reductions may differ across machines.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)

from ..perplexity import perplexity_of_tokens
from ..training import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    adamw_warmup_cosine,
    cache_root,
    default_assets_dir,
    publish_when_done,
    testbed_cli,
    train_byte_level_bpe,
)
from .moe_routing import SEQ_LEN, ablation_check, routing_report, token_stream, usability_checks

# Bump when the recipe changes so stale caches are ignored rather than reused.
MOE_TESTBED_VERSION = "moe-testbed-v1"

DOMAINS = ("stories", "shakespeare", "wikitext")
SOURCES = {  # relative to the shared assets folder
    "stories": "models/stories260K",
    "shakespeare": "text/tinyshakespeare/input.txt",
    "wikitext": "text/wikitext-2/valid.txt",
}
# Held-out characters per domain (whole documents, so a little more).
EVAL_CHARS = 40_000
CALIBRATION_CHARS = 30_000
CALIBRATION_RECORD_CHARS = 1_000
# stories260K samples: 640 x up to 320 new tokens, pure sampling (top_k=0) with a fixed seed, ~440 KB
# (with 448 samples, ~300 KB, the model saw each training story ~12 times and stories overfitted most).
STORY_SAMPLES = 640
STORY_MAX_NEW_TOKENS = 320
STORY_SEED = 0  # fixed: the data do not change with the training seed

VOCAB_SIZE = 1024
TOKENIZER_CHARS_PER_DOMAIN = 200_000

NUM_EXPERTS = 8
TOP_K = 2
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 4
WINDOWS_PER_DOMAIN = 6  # batch = 18 windows of 128 tokens
TRAIN_STEPS = 1200
PEAK_LR = 3e-3
WARMUP_FRACTION = 0.05
# Per-layer Switch load-balancing loss. Measured with 1,200 steps: 0.02 balances every layer almost
# perfectly (max load 0.18), so the most- and least-used experts are near-arbitrary and removing the
# most-used hurts stories *less* (ratio 0.93); 0.01 passes only narrowly (min ratio 1.18); 0.005 leaves
# the natural imbalance (max load 0.34, normalised load entropy >= 0.92) and a clear contrast (>= 1.7).
AUX_LOSS_COEF = 0.005
Z_LOSS_COEF = 1e-3  # router z-loss (ST-MoE): mean squared logsumexp of the router logits


def moe_testbed_dir(
    cache_dir: str | os.PathLike | None = None, *, assets: str | os.PathLike | None = None
) -> pathlib.Path:
    """Return the folder of the cached MoE testbed, building it first (a few minutes) if missing."""
    root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / MOE_TESTBED_VERSION
    # The folder only appears through an atomic rename, so its existence means it is complete.
    if not target.is_dir():
        build_moe_testbed(target, assets=assets if assets is not None else default_assets_dir())
    return target


# --------------------------------------------------------------------------------------------- data


def _source(assets: pathlib.Path, domain: str) -> pathlib.Path:
    path = assets / SOURCES[domain]
    if not path.exists():
        raise FileNotFoundError(f"MoE testbed: shared asset {SOURCES[domain]} not found at {path}")
    return path


@functools.lru_cache(maxsize=2)
def _sample_stories(model_dir: str, num_samples: int) -> str:
    """Stories sampled from stories260K, one per blank-line-separated paragraph (cached per process)."""
    from hf_prune.calibration import self_generated_texts

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=False
    ).eval()
    texts = self_generated_texts(
        model,
        tokenizer,
        num_samples=num_samples,
        max_new_tokens=STORY_MAX_NEW_TOKENS,
        seed=STORY_SEED,
        batch_size=64,
    )
    stories = [re.sub(r"\n\s*\n+", "\n", text.strip()) for text in texts]
    return "\n\n".join(story for story in stories if story)


def _domain_text_and_boundaries(assets: pathlib.Path, domain: str) -> tuple[str, list[int]]:
    """A domain's whole text and the offsets where its documents start (cut points for the splits)."""
    if domain == "stories":
        text = _sample_stories(str(_source(assets, domain)), STORY_SAMPLES)
        pattern = r"\n\n"  # one story per paragraph
    else:
        text = _source(assets, domain).read_text(encoding="utf-8")
        # Speeches for shakespeare; articles (" = Title = " headings) for WikiText.
        pattern = r"\n\n" if domain == "shakespeare" else r"(?m)^ \n(?= = [^=\n].* = \n)"
    return text, [
        match.end() if domain != "wikitext" else match.start() for match in re.finditer(pattern, text)
    ]


def _split_domain(text: str, boundaries: list[int]) -> dict[str, tuple[int, int]]:
    """Character ranges of train / calibration / eval: eval is the tail, calibration just before it."""
    cuts = sorted(b for b in boundaries if 0 < b < len(text))

    def cut_before(end: int, chars: int) -> int:
        candidates = [b for b in cuts if b <= end - chars]
        if not candidates:
            raise ValueError(f"text too short for a held-out split of {chars} characters")
        return candidates[-1]

    eval_start = cut_before(len(text), EVAL_CHARS)
    calibration_start = cut_before(eval_start, CALIBRATION_CHARS)
    return {
        "train": (0, calibration_start),
        "calibration": (calibration_start, eval_start),
        "eval": (eval_start, len(text)),
    }


def testbed_text_splits(assets: str | os.PathLike) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """``{domain: {"train"|"calibration"|"eval": text}}`` and a record of where each split came from."""
    assets = pathlib.Path(assets)
    splits: dict[str, dict[str, str]] = {}
    record: dict[str, Any] = {}
    for domain in DOMAINS:
        text, boundaries = _domain_text_and_boundaries(assets, domain)
        ranges = _split_domain(text, boundaries)
        # Strip only the separators at the cut points, so the files are clean documents.
        splits[domain] = {name: text[start:end].strip("\n") for name, (start, end) in ranges.items()}
        record[domain] = {
            "source": SOURCES[domain] + (" (sampled from BOS)" if domain == "stories" else ""),
            "char_ranges": {name: list(span) for name, span in ranges.items()},
            "chars": {name: len(part) for name, part in splits[domain].items()},
        }
    return splits, record


def mixed_calibration_text(calibration: Mapping[str, str]) -> str:
    """The domains' calibration texts cut into ~1 KB records at line ends, interleaved domain by domain.

    Records are separated by a blank line (the ``paragraph`` unit of the calibration loader); blank lines
    inside a record are collapsed so that each record stays one paragraph from one domain.
    """
    per_domain: list[list[str]] = []
    for text in calibration.values():
        records, current = [], ""
        for line in re.sub(r"\n\s*\n+", "\n", text).split("\n"):
            current = f"{current}\n{line}" if current else line
            if len(current) >= CALIBRATION_RECORD_CHARS:
                records.append(current)
                current = ""
        if current.strip():
            records.append(current)
        per_domain.append([r for r in records if r.strip()])
    interleaved = [
        records[i] for i in range(max(map(len, per_domain))) for records in per_domain if i < len(records)
    ]
    return "\n\n".join(interleaved) + "\n"


# ---------------------------------------------------------------------------------------- tokenizer


def _train_tokenizer(train_texts: Mapping[str, str]) -> PreTrainedTokenizerFast:
    # An equal share of every domain, fed by line: a balanced vocabulary, and quick to train. WikiText's
    # literal "<unk>" stays text (split_special_tokens), not the unknown token.
    lines = [line for text in train_texts.values() for line in text[:TOKENIZER_CHARS_PER_DOMAIN].split("\n")]
    return train_byte_level_bpe(
        lines, vocab_size=VOCAB_SIZE, model_max_length=SEQ_LEN * 4, split_special_tokens=True
    )


# -------------------------------------------------------------------------------------- model, loss


def _build_model(seed: int) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=SEQ_LEN * 4,
        sliding_window=None,
        tie_word_embeddings=True,
        router_aux_loss_coef=AUX_LOSS_COEF,
        output_router_logits=False,  # a plain forward's loss stays the language-model loss
        router_jitter_noise=0.0,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)  # every expert and router row drawn independently
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


def _router_losses(router_logits: tuple[torch.Tensor, ...], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer Switch load-balancing loss (mean over layers) and router z-loss (mean over layers)."""
    balance, z_loss = [], []
    for logits in router_logits:
        logits = logits.float()
        probs = logits.softmax(dim=-1)
        num_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        fraction = F.one_hot(chosen, num_experts).float().sum(dim=1).mean(dim=0) / top_k  # f_i, sums to 1
        balance.append(num_experts * (fraction * probs.mean(dim=0)).sum())
        z_loss.append(torch.logsumexp(logits, dim=-1).pow(2).mean())
    return torch.stack(balance).mean(), torch.stack(z_loss).mean()


def _train(
    model: MixtralForCausalLM, streams: Mapping[str, torch.Tensor], steps: int, seed: int, progress: bool
) -> dict[str, Any]:
    """Train on balanced batches of random windows; return the mean losses of the last steps."""
    generator = torch.Generator().manual_seed(seed)
    optimizer, scheduler = adamw_warmup_cosine(
        model, steps=steps, peak_lr=PEAK_LR, warmup_fraction=WARMUP_FRACTION
    )
    offsets = torch.arange(SEQ_LEN)
    names = list(streams)
    window = max(20, steps // 20)
    recent: dict[str, list[float]] = {key: [] for key in [*names, "ce", "balance", "z"]}
    model.train()
    bar = tqdm(range(steps), desc="training MoE testbed", disable=not progress)
    for _ in bar:
        rows = []
        for name in names:
            tokens = streams[name]
            starts = torch.randint(0, len(tokens) - SEQ_LEN, (WINDOWS_PER_DOMAIN,), generator=generator)
            rows.append(tokens[starts[:, None] + offsets])
        batch = torch.cat(rows)
        outputs = model(input_ids=batch, output_router_logits=True, use_cache=False)
        token_ce = F.cross_entropy(
            outputs.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none"
        ).view(len(batch), -1)
        ce = token_ce.mean()
        balance, z_loss = _router_losses(outputs.router_logits, model.config.num_experts_per_tok)
        loss = ce + AUX_LOSS_COEF * balance + Z_LOSS_COEF * z_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        per_domain = token_ce.detach().view(len(names), WINDOWS_PER_DOMAIN, -1).mean(dim=(1, 2))
        values = {
            **dict(zip(names, per_domain.tolist(), strict=True)),
            "ce": ce.item(),
            "balance": balance.item(),
            "z": z_loss.item(),
        }
        for key, value in values.items():
            recent[key] = (recent[key] + [value])[-window:]
        bar.set_postfix(ce=f"{ce.item():.3f}", bal=f"{balance.item():.3f}")
    model.eval()

    def mean(key: str) -> float:
        return round(sum(recent[key]) / max(1, len(recent[key])), 4)

    return {
        "train_ce": mean("ce"),
        "train_ce_by_domain": {name: mean(name) for name in names},
        "load_balancing_loss": mean("balance"),
        "router_z_loss": mean("z"),
        "averaged_over_last_steps": window,
    }


# ------------------------------------------------------------------------------------------- build


def build_moe_testbed(
    out_dir: str | os.PathLike,
    *,
    assets: str | os.PathLike,
    seed: int = 0,
    progress: bool = True,
    _steps: int | None = None,
) -> pathlib.Path:
    """Sample the data, train the tokenizer and the MoE, measure it, and save it all to ``out_dir`` atomically.

    Everything is written to a unique temporary sibling folder renamed into place at the end, so an
    interrupted build leaves nothing that looks complete; if ``out_dir`` exists by then (a concurrent
    build won the race) the fresh copy is discarded. ``_steps`` overrides the number of training steps
    (tests use a handful).
    """
    out_dir = pathlib.Path(out_dir)
    steps = TRAIN_STEPS if _steps is None else _steps
    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        stage_seconds[stage] = round(now - since, 1)
        return now

    mark = started
    splits, data_record = testbed_text_splits(assets)
    mark = lap("data", mark)
    tokenizer = _train_tokenizer({d: parts["train"] for d, parts in splits.items()})
    streams = {d: token_stream(tokenizer, parts["train"]) for d, parts in splits.items()}
    for domain in DOMAINS:
        data_record[domain]["tokens"] = {
            name: len(streams[domain])
            if name == "train"
            else len(token_stream(tokenizer, splits[domain][name]))
            for name in ("train", "calibration", "eval")
        }
    mark = lap("tokenizer", mark)
    model = _build_model(seed)
    losses = _train(model, streams, steps, seed, progress)
    mark = lap("training", mark)
    eval_texts = {d: parts["eval"] for d, parts in splits.items()}
    calibration_texts = {d: parts["calibration"] for d, parts in splits.items()}
    eval_ppl = {
        d: round(
            perplexity_of_tokens(model, token_stream(tokenizer, text), seq_len=SEQ_LEN, batch_size=16)[
                "perplexity"
            ],
            4,
        )
        for d, text in eval_texts.items()
    }
    routing = routing_report(model, tokenizer, eval_texts)
    ablation = ablation_check(model, tokenizer, eval_texts, usage_texts=calibration_texts)
    checks = usability_checks(routing, ablation)
    mark = lap("evaluation", mark)
    seconds = time.perf_counter() - started  # the whole build bar saving

    with publish_when_done(out_dir) as tmp_dir:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        data_dir = tmp_dir / "data"
        data_dir.mkdir()
        for domain, parts in splits.items():
            for name, text in parts.items():
                (data_dir / f"{name}_{domain}.txt").write_text(text + "\n", encoding="utf-8")
        (data_dir / "calibration.txt").write_text(mixed_calibration_text(calibration_texts), encoding="utf-8")
        record = {
            "version": MOE_TESTBED_VERSION,
            "seed": seed,
            "steps": steps,
            "seconds": round(seconds, 1),
            "seconds_by_stage": stage_seconds,
            "torch_threads": torch.get_num_threads(),
            "recipe": {
                "model": "MixtralForCausalLM",
                "num_experts": NUM_EXPERTS,
                "top_k": TOP_K,
                "hidden_size": HIDDEN_SIZE,
                "intermediate_size": INTERMEDIATE_SIZE,
                "num_layers": NUM_LAYERS,
                "expert_init": "independent random",
                "tokenizer": f"byte-level BPE, {VOCAB_SIZE} tokens, trained on the first "
                f"{TOKENIZER_CHARS_PER_DOMAIN} characters of each domain's train split",
                "seq_len": SEQ_LEN,
                "batch": f"{WINDOWS_PER_DOMAIN} windows per domain",
                "peak_lr": PEAK_LR,
                "schedule": f"AdamW, {WARMUP_FRACTION:.0%} linear warm-up, cosine to 10%",
                "load_balancing": f"per-layer Switch loss x {AUX_LOSS_COEF}",
                "router_z_loss": Z_LOSS_COEF,
            },
            "data": data_record,
            "final_losses": losses,
            "eval_perplexity": eval_ppl,
            "routing": routing,
            "ablation": ablation,
            "checks": checks,
        }
        (tmp_dir / "testbed.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def summary(record: Mapping[str, Any]) -> str:
    """The headline figures of a ``testbed.json`` record, as text."""
    lines = [
        f"MoE testbed {record['version']}: {record['steps']} steps, built in {record['seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in record['seconds_by_stage'].items())})"
    ]
    losses = record["final_losses"]
    lines.append(
        f"final train CE {losses['train_ce']:.3f} "
        f"({', '.join(f'{d} {v:.3f}' for d, v in losses['train_ce_by_domain'].items())}); "
        f"load-balancing loss {losses['load_balancing_loss']:.3f}, z-loss {losses['router_z_loss']:.3f}"
    )
    lines.append(
        "eval perplexity: " + ", ".join(f"{d} {v:.2f}" for d, v in record["eval_perplexity"].items())
    )
    lines.append(
        "routing (eval text): layer  max load  min load  load entropy (norm.)  router entropy  "
        "domain distance"
    )
    for layer in record["routing"]["layers"]:
        distance = " ".join(f"{d[:5]} {v:.2f}" for d, v in layer["domain_load_distance"].items())
        lines.append(
            f"  {layer['layer']:>3}  {layer['max_load']:8.3f}  {layer['min_load']:8.3f}  "
            f"{layer['load_entropy']:6.3f} ({layer['normalised_load_entropy']:.3f})  "
            f"{layer['router_entropy']:14.3f}  {distance}"
        )
    ablation = record["ablation"]
    lines.append(
        f"ablation (remove {ablation['num_removed']} experts per layer, usage on "
        f"{'+'.join(ablation['usage_measured_on'])} calibration text):"
    )
    for domain, base in ablation["perplexity"]["baseline"].items():
        most, least = (ablation["perplexity"][k][domain] for k in ("most_used_removed", "least_used_removed"))
        line = (
            f"  {domain:<12} baseline {base:8.2f}  most-used removed {most:8.2f}  least-used removed "
            f"{least:8.2f}  most/least {ablation['most_vs_least'][domain]:.2f}"
        )
        if domain in ablation["per_domain"]:
            own = ablation["per_domain"][domain]
            line += (
                f"  (domain's own usage: {own['most_used_removed']:.2f} vs {own['least_used_removed']:.2f})"
            )
        lines.append(line)
    checks = record["checks"]
    lines.append(
        f"checks: max load {checks['max_expert_load']:.3f} (<= {checks['max_expert_load_limit']}), "
        f"min normalised load entropy {checks['min_normalised_load_entropy']:.3f} "
        f"(>= {checks['min_normalised_load_entropy_limit']}), min most/least ratio "
        f"{checks['min_most_vs_least_ratio']:.2f} (domain's own usage "
        f"{checks['min_own_domain_most_vs_least_ratio']:.2f}; >= {checks['min_most_vs_least_ratio_limit']}): "
        f"{'PASSED' if checks['passed'] else 'FAILED'}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    record = testbed_cli(argv, __doc__, moe_testbed_dir, summary)
    return 0 if record["checks"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
