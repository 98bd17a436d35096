"""Visual token pruning: what selection costs, what it saves, and what it keeps.

    python -m hf_prune.evals.benchmarks.bench_visual_tokens [--skip-accuracy] [--limit 400] [--only cdpruner+clip ...]

1. Selection overhead per image at N = 576 visual tokens, d = 4,096 (LLaVA-1.5-7B's projected features),
   T = 64 and 128 kept, for every algorithm but fastv (whose cost is a partial prefill), against the
   language-model prefill the pruning saves: analytic FLOPs of LLaVA-1.5-7B (Vicuna-7B shapes) for a
   576-token image and a 40-token question, turned into milliseconds at the matmul throughput measured
   on this machine in the same run.
2. Prefill latency (median of 5, batch 1) and analytic FLOPs against the budget on a random LLaVA with a
   CLIP-336/14 tower (576 tokens) and a 1,024-wide 8-layer Llama, and on the trained testbed.
3. Accuracy against the budget on the held-out testbed questions (``hf_prune.evals.testbeds.vlm_testbed``), for
   every algorithm, both relevance signs for cdpruner, per question kind; ``cdpruner+clip`` is cdpruner with
   relevance from a CLIP text tower trained for the testbed's vision tower
   (``hf_prune.evals.testbeds.vlm_testbed_clip``).

Prints figures; passes or fails nothing. GPU figures when CUDA is present (``--device cuda``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch

from ...adapters import get_adapter
from ...context import PruneContext
from ...model_patches import token_selection
from ...recipe import build_dataclass
from ...registry import get_method, run_stage
from ..flops import analytic_flops_per_token

ALGORITHMS = ("cdpruner", "diversity", "random", "pooling", "fastv")
#: The accuracy table's rows: label -> visual_token_pruning fields (besides the budget).
ACCURACY_VARIANTS = {
    "cdpruner": {"algorithm": "cdpruner"},
    "cdpruner (negative)": {"algorithm": "cdpruner", "relevance_sign": "negative"},
    "cdpruner+clip": {"algorithm": "cdpruner", "text_tower": "<testbed clip>"},
    "cdpruner+clip (negative)": {
        "algorithm": "cdpruner",
        "text_tower": "<testbed clip>",
        "relevance_sign": "negative",
    },
    **{name: {"algorithm": name, "fastv_layer": 1} for name in ALGORITHMS[1:]},
}


def _median_ms(fn, repeats: int = 5, device: torch.device | None = None) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def select(algorithm: str, features: torch.Tensor, instruction: torch.Tensor, count: int) -> torch.Tensor:
    """One image's selection as the model does it: [N, D] features -> kept indices (or pooled features)."""
    n = features.shape[0]
    if algorithm == "pooling":
        return token_selection.pool_grid(features, token_selection.square_grid(n), count)
    if algorithm == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:count].sort().values
    relevance = (
        token_selection.instruction_relevance(features, instruction)
        if algorithm == "cdpruner"
        else torch.ones(n, device=features.device)
    )
    kernel = relevance[:, None] * token_selection.cosine_similarity_matrix(features) * relevance[None, :]
    return token_selection.dpp_greedy_map(kernel[None], count)[0]


def llava_7b_config() -> Any:
    """LLaVA-1.5-7B shapes (CLIP ViT-L/14-336 + Vicuna-7B), no weights."""
    import transformers

    vision = transformers.CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
    )
    text = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
    )
    return transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def matmul_gflops(device: torch.device) -> float:
    """Measured float32 throughput of a 4,096² matmul on ``device`` (GFLOP/s)."""
    a = torch.randn(4096, 4096, device=device)
    ms = _median_ms(lambda: a @ a, repeats=3, device=device)
    return 2 * 4096**3 / ms / 1e6


def print_selection_overhead(device: torch.device) -> None:
    n, d, question = 576, 4096, 40
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n, d, generator=generator).to(device)
    instruction = torch.randn(12, d, generator=generator).to(device)
    gflops = matmul_gflops(device)
    config = llava_7b_config()
    full_len = n + question
    full = analytic_flops_per_token(config, full_len)["prefill_flops_per_token"] * full_len
    print(
        f"1. selection overhead per image (N {n}, d {d}) on {device}; matmul throughput {gflops:,.0f} GFLOP/s"
    )
    print(
        f"   LLaVA-1.5-7B language-model prefill, {n} visual + {question} text tokens: {full / 1e12:.2f} TFLOPs "
        f"= {full / gflops / 1e6:,.0f} ms at that rate"
    )
    print(
        f"   {'algorithm':<10} {'T':>4} {'selection ms':>13} {'prefill saved (TFLOPs / ms)':>29} {'overhead/saved':>15}"
    )
    for count in (64, 128):
        kept_len = count + question
        kept = analytic_flops_per_token(config, kept_len)["prefill_flops_per_token"] * kept_len
        saved = full - kept
        saved_ms = saved / gflops / 1e6
        for algorithm in ("cdpruner", "diversity", "random", "pooling"):
            ms = _median_ms(lambda a=algorithm, c=count: select(a, features, instruction, c), device=device)
            print(
                f"   {algorithm:<10} {count:>4} {ms:>13.2f} {saved / 1e12:>17.2f} / {saved_ms:>9,.0f} "
                f"{ms / saved_ms:>15.2%}"
            )


def prune_copy(model: Any, tokenizer: Any, **fields) -> Any:
    """A copy of ``model`` with visual token pruning set to ``fields``."""
    pruned = copy.deepcopy(model)
    config = build_dataclass(get_method("visual_token_pruning").config_cls, fields, "stage")
    run_stage(
        get_method("visual_token_pruning"),
        pruned,
        config,
        PruneContext(get_adapter(pruned.config), tokenizer, None, progress=False),
    )
    return pruned.eval()


def random_llava(device: torch.device) -> tuple[Any, Any]:
    """A random LLaVA with LLaVA-1.5's 576 visual tokens (CLIP-336/14, 4 layers of 256) and a 1,024-wide,
    8-layer Llama; returns (model, inputs of one image and a 40-token question)."""
    import transformers

    vision = transformers.CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
    )
    text = transformers.LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=4096,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=4000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval().to(device)
    ids = torch.randint(5, 3999, (1, 616), generator=torch.Generator().manual_seed(0))
    ids[0, 1:577] = 4000
    inputs = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1)).to(device),
    }
    return model, inputs


def print_prefill_vs_budget(
    title: str, model: Any, tokenizer: Any, inputs: dict, budgets: list[int], device: torch.device
) -> None:
    print(
        f"\n2. prefill vs budget: {title} (cdpruner; FLOPs: the language model, per input token; the vision "
        "tower, which pruning does not change, is left out)"
    )
    print(
        f"   {'budget':>7} {'LM tokens':>9} {'prefill ms':>11} {'ratio':>7} {'FLOPs/input token':>18} {'ratio':>7}"
    )
    seq_len = inputs["input_ids"].shape[1]
    image_tokens = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    base_ms = base_flops = None
    for budget in budgets:
        pruned = model if budget >= image_tokens else prune_copy(model, tokenizer, budget=budget)
        with torch.no_grad():
            ms = _median_ms(lambda m=pruned: m(**inputs), device=device)
        flops = analytic_flops_per_token(pruned.config, seq_len, image_tokens=image_tokens)
        base_ms, base_flops = base_ms or ms, base_flops or flops["prefill_flops_per_token"]
        print(
            f"   {budget:>7} {flops.get('language_model_tokens', seq_len):>9} {ms:>11.2f} {ms / base_ms:>7.3f} "
            f"{flops['prefill_flops_per_token'] / 1e6:>16.2f}M {flops['prefill_flops_per_token'] / base_flops:>7.3f}"
        )


def print_accuracy_table(limit: int | None, device: torch.device, only: list[str] | None = None) -> None:
    from ...checkpoint import load_model, load_preprocessor
    from ..testbeds.vlm_testbed import vlm_testbed_dir
    from ..testbeds.vlm_testbed_clip import vlm_testbed_clip_dir
    from ..vqa import evaluate_vqa

    folder = vlm_testbed_dir()
    processor = load_preprocessor(str(folder), vision_language=True)
    model = load_model(str(folder)).to(device).eval()
    data = folder / "data" / "eval.jsonl"
    inputs = processor(
        images=[_first_image(data)],
        text=[f"USER: {processor.image_token}\nIs there a bag? ASSISTANT:"],
        return_tensors="pt",
    ).to(device)
    image_tokens = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    budgets = [b for b in (32, 16, 8, 4) if b < image_tokens]
    print_prefill_vs_budget(
        f"the testbed ({image_tokens} visual tokens)",
        model,
        processor,
        dict(inputs),
        [image_tokens, *budgets],
        device,
    )

    def accuracy(m: Any) -> dict[str, float]:
        result = evaluate_vqa(m, processor, data, batch_size=16, limit=limit, progress=False)
        return {k: v for k, v in result.items() if isinstance(v, float)}

    base = accuracy(model)
    keys = sorted(base)
    print(
        f"\n3. testbed accuracy vs visual tokens kept (of {image_tokens}); {limit or 'all'} held-out questions"
    )
    print(f"   {'algorithm':<24} {'kept':>5} " + " ".join(f"{k:>22}" for k in keys))
    print(f"   {'none':<24} {image_tokens:>5} " + " ".join(f"{base[k]:>22.3f}" for k in keys))
    variants = {label: fields for label, fields in ACCURACY_VARIANTS.items() if not only or label in only}
    if any("text_tower" in fields for fields in variants.values()):
        clip = str(vlm_testbed_clip_dir())
        variants = {
            label: {**fields, "text_tower": clip} if "text_tower" in fields else fields
            for label, fields in variants.items()
        }
    for budget in budgets:
        for label, fields in variants.items():
            scores = accuracy(prune_copy(model, processor, budget=budget, **fields))
            print(
                f"   {label:<24} {budget:>5} "
                + " ".join(f"{scores.get(k, float('nan')):>22.3f}" for k in keys)
            )


def _first_image(jsonl) -> Any:
    import json

    from PIL import Image

    row = json.loads(jsonl.read_text().splitlines()[0])
    return Image.open(jsonl.parent / row["image"]).convert("RGB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-accuracy", action="store_true", help="skip the testbed (parts 2b and 3)")
    parser.add_argument("--limit", type=int, default=None, help="held-out questions to score (default: all)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(ACCURACY_VARIANTS),
        default=None,
        help="accuracy table: only these rows (default: all)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print_selection_overhead(device)
    model, inputs = random_llava(device)
    print_prefill_vs_budget(
        "random LLaVA, CLIP-336/14 (576 tokens) + Llama 1,024 × 8 layers",
        model,
        None,
        inputs,
        [576, 256, 128, 64, 32],
        device,
    )
    if not args.skip_accuracy:
        print_accuracy_table(args.limit, device, args.only)


if __name__ == "__main__":
    main()
