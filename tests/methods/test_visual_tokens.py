"""Visual token pruning: the selection algorithms, and the pruned forward / generate contract on tiny LLaVA models."""

import itertools
import math

import pytest
import torch
from hf_prune.model_patches import token_selection as patch
from tiny_models import build_processor, build_tiny_model, build_tokenizer, sample_image
from transformers.modeling_outputs import BaseModelOutputWithPooling

import hf_prune
from hf_prune.adapters import get_adapter
from hf_prune.context import PruneContext
from hf_prune.errors import ConfigFieldError, RecipeError, UnsupportedModelError
from hf_prune.methods.tokens.visual_tokens import token_pruning_classes
from hf_prune.recipe import build_dataclass
from hf_prune.registry import get_method, run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "USER: <image>\nwhat is in the picture? ASSISTANT:",
    "USER: <image>\ndescribe the colours of this image in a few words ASSISTANT:",
]


# ---- selection functions -------------------------------------------------------------------------------


def brute_force_greedy_map(kernel: torch.Tensor, count: int) -> list[int]:
    """Greedy MAP by definition: add the item that maximises det(L_S) at each step."""
    chosen: list[int] = []
    for _ in range(count):
        best = max(
            (j for j in range(kernel.shape[0]) if j not in chosen),
            key=lambda j: torch.linalg.det(kernel[[*chosen, j]][:, [*chosen, j]].double()).item(),
        )
        chosen.append(best)
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(4))
def test_dpp_greedy_map_matches_the_determinant_definition(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 12, 6, generator=generator)
    relevance = torch.rand(3, 12, generator=generator)
    kernel = relevance[:, :, None] * patch.cosine_similarity_matrix(features) * relevance[:, None, :]
    chosen = patch.dpp_greedy_map(kernel, 5)
    assert chosen.shape == (3, 5)
    for b in range(3):
        assert chosen[b].tolist() == brute_force_greedy_map(kernel[b], 5)


def greedy_by_log_det(kernel: torch.Tensor, count: int) -> list[int]:
    """Greedy MAP by definition, in pick order: each step adds the candidate with the largest
    log det(L[S ∪ {i}]) (torch.linalg.slogdet in float64); a candidate whose determinant is zero (or
    round-off) ranks below every positive one, and ties go to the lowest index."""
    kernel = kernel.double()
    scale = kernel.diagonal().max().clamp_min(1e-300)
    chosen: list[int] = []
    for _ in range(count):
        best, best_value = None, None
        for i in range(kernel.shape[0]):
            if i in chosen:
                continue
            picked = [*chosen, i]
            sign, logdet = torch.linalg.slogdet(kernel[picked][:, picked])
            # zero or round-off determinants (the span of the picks is exhausted) all count as -inf
            value = logdet.item() if sign > 0 and logdet > len(picked) * math.log(scale) - 20 else -math.inf
            if best is None or value > best_value:
                best, best_value = i, value
        chosen.append(best)
    return chosen


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def random_kernels(seed: int, batch: int, n: int, dim: int) -> torch.Tensor:
    """diag(r)·S·diag(r) built by hand: S the cosines of random features, r uniform in [0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    features = unit(torch.randn(batch, n, dim, generator=generator))
    relevance = torch.rand(batch, n, generator=generator)
    return relevance[:, :, None] * (features @ features.transpose(1, 2)) * relevance[:, None, :]


@pytest.mark.parametrize("seed", range(3))
def test_dpp_each_pick_maximises_the_log_determinant(seed):
    """Every prefix of the greedy picks (count 1..N, full-rank kernel) is the by-definition greedy's: the
    projection of the earlier picks out of each candidate's gain decides every pick after the first."""
    kernels = random_kernels(seed, batch=2, n=9, dim=12)
    for b in range(2):
        order = greedy_by_log_det(kernels[b], 9)
        for count in range(1, 10):
            assert patch.dpp_greedy_map(kernels[b : b + 1], count)[0].tolist() == sorted(order[:count])


def test_dpp_greedy_matches_exhaustive_map_on_orthogonal_clusters():
    """Three mutually orthogonal clusters of near-copies: the MAP set of T <= 3 items takes the most
    relevant item of T clusters, which greedy finds too; checked against every subset's determinant."""
    features = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.1],  # near-copy of 0
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 1.0, 0.0, -0.1],  # near-copy of 1
            [0.0, 0.0, 1.0, 0.2],  # near-copy of 3
        ]
    )
    relevance = torch.tensor([0.7, 0.5, 0.9, 0.3, 0.8, 0.4])
    kernel = relevance[:, None] * (unit(features) @ unit(features).T) * relevance[None]
    for count, expected in [(1, [2]), (2, [2, 4]), (3, [2, 4, 5])]:
        best = max(
            itertools.combinations(range(6), count),
            key=lambda s: torch.linalg.det(kernel[list(s)][:, list(s)].double()).item(),
        )
        assert list(best) == expected  # the by-hand MAP set
        assert patch.dpp_greedy_map(kernel[None], count)[0].tolist() == expected


def test_dpp_picks_past_the_kernel_rank_go_by_index():
    # Exactly representable: tokens alternate between two orthogonal directions (rank 2). Greedy takes
    # token 0 (the first of the equal gains), then token 1; after that every gain is 0, so picks go 2, 3, ...
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(4, 1)[None]  # [1, 8, 2]
    kernel = features @ features.transpose(1, 2)
    for count in range(1, 9):
        assert patch.dpp_greedy_map(kernel, count)[0].tolist() == list(range(count))
    # Random rank-2 features: the gains past the rank are float32 round-off, not a ranking.
    for seed in range(6):
        kernels = random_kernels(seed, batch=1, n=10, dim=2)
        first_two = greedy_by_log_det(kernels[0], 2)
        rest = [i for i in range(10) if i not in first_two]
        for count in range(3, 11):
            expected = sorted(first_two + rest[: count - 2])
            assert patch.dpp_greedy_map(kernels, count)[0].tolist() == expected, (seed, count)


def test_dpp_prefers_diverse_tokens():
    # Four near-copies of one vector and one different vector: two picks take one of each.
    base, other = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    features = torch.stack([base, base + 0.01, base - 0.01, base * 1.1, other])[None]
    chosen = patch.dpp_greedy_map(patch.cosine_similarity_matrix(features), 2)[0].tolist()
    assert 4 in chosen


def test_cosine_similarity_matrix_by_hand():
    features = torch.tensor([[[3.0, 0.0], [0.0, -2.0], [1.0, 1.0]]], dtype=torch.float64)
    half = 1 / math.sqrt(2)
    expected = torch.tensor([[[1.0, 0.0, half], [0.0, 1.0, -half], [half, -half, 1.0]]])
    result = patch.cosine_similarity_matrix(features)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected.float())


E1, E2, E3 = torch.eye(3)


@pytest.mark.parametrize("sign", ["positive", "negative"])
def test_instruction_relevance_equal_opposite_orthogonal(sign):
    """One instruction direction (given twice, at two lengths): cosines 1, -1, 0, 1/√2 and 0 for tokens equal,
    opposite, orthogonal, at 45° and orthogonal again, at various lengths. Min-max over [-1, 1] gives
    r = (cos + 1) / 2: 1, 0, ½, (1 + 1/√2) / 2, ½; the negated sign gives 1 - r."""
    features = torch.stack([2 * E1, -3 * E1, 0.5 * E2, E1 + E2, 4 * E3])
    instruction = torch.stack([E1, 5 * E1])
    positive = torch.tensor([1.0, 0.0, 0.5, (1 + 1 / math.sqrt(2)) / 2, 0.5])
    expected = positive if sign == "positive" else 1 - positive
    torch.testing.assert_close(patch.instruction_relevance(features, instruction, sign), expected)


def test_instruction_relevance_averages_over_the_instruction_tokens():
    """Instruction tokens along E1 and (E1 + E2)/√2 (at lengths 2 and 3√2), a = 1/√2: the mean cosine is
    (1 + a)/2 for E1, a/2 for E2, -(1 + a)/2 for -E1 and 0 for E3; min-max over ±(1 + a)/2."""
    a = 1 / math.sqrt(2)
    features = torch.stack([E1, 7 * E2, -E1, E3])
    relevance = patch.instruction_relevance(features, torch.stack([2 * E1, 3 * (E1 + E2)]))
    torch.testing.assert_close(relevance, torch.tensor([1.0, (1 + 2 * a) / (2 * (1 + a)), 0.0, 0.5]))


def test_instruction_relevance_ties_and_no_instruction_give_ones():
    features = torch.stack([E1, 2 * E1, 3 * E1])  # every token has the same cosine: no spread
    assert torch.equal(patch.instruction_relevance(features, torch.stack([E1 + E2])), torch.ones(3))
    assert torch.equal(patch.instruction_relevance(features, None), torch.ones(3))
    assert torch.equal(patch.instruction_relevance(features, torch.zeros(0, 3)), torch.ones(3))
    # A spread of exactly 1e-6 (in float32) still counts as a tie: cosines 1e-6 and 0.
    nearly = torch.tensor([[1e-6, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert torch.equal(patch.instruction_relevance(nearly, E1[None]), torch.ones(2))
    # The ones are made on the features' device, not on torch's default one.
    assert off_default_device(patch.instruction_relevance, features, None).device == features.device


@pytest.mark.parametrize(
    ("grid", "count", "shape"),
    [((8, 8), 16, (4, 4)), ((8, 8), 32, (4, 8)), ((4, 8), 8, (2, 4)), ((8, 8), 7, (1, 7))],
)
def test_pool_grid_averages_blocks(grid, count, shape):
    h0, w0 = grid
    features = torch.arange(h0 * w0, dtype=torch.float32)[:, None].repeat(1, 3)
    pooled = patch.pool_grid(features, grid, count)
    assert pooled.shape == (count, 3)
    expected = torch.nn.functional.adaptive_avg_pool2d(features[:, 0].reshape(1, 1, h0, w0), shape).reshape(
        -1
    )
    torch.testing.assert_close(pooled[:, 0], expected)


def test_pool_grid_picks_the_closest_aspect_and_keeps_the_dtype():
    # (8, 2) is 4:1: of 1×4, 2×2 and 4×1 for 4 tokens, 4×1 is closest. (1, 5) to 12 tokens: 2×6 is closer to
    # 1:5 than 1×12 (|log 1/3 - log 1/5| = 0.51 < |log 1/12 - log 1/5| = 0.88).
    for grid, count, shape in [((8, 2), 4, (4, 1)), ((1, 5), 12, (2, 6))]:
        features = torch.randn(
            grid[0] * grid[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        )
        pooled = patch.pool_grid(features, grid, count)
        assert pooled.dtype == torch.float64
        expected = torch.nn.functional.adaptive_avg_pool2d(features.T.reshape(1, 3, *grid), shape)
        torch.testing.assert_close(pooled, expected.reshape(3, count).T)


def test_kept_count():
    settings = patch.check_settings({"budget": 8})
    assert patch.kept_count(settings, 64) == 8 and patch.kept_count(settings, 5) == 5
    assert patch.kept_count(settings, 40, crops=2.5) == 20
    assert patch.kept_count(patch.check_settings({"keep_ratio": 0.25}), 10) == 3


# ---- the pruned model ---------------------------------------------------------------------------------------


def pruned_model(model_type: str, tokenizer, **fields):
    model = build_tiny_model(model_type, tokenizer).eval()
    config = build_dataclass(get_method("visual_token_pruning").config_cls, {"budget": 4, **fields}, "stage")
    report = run_stage(
        get_method("visual_token_pruning"),
        model,
        config,
        PruneContext(get_adapter(model.config), tokenizer, None, progress=False),
    )
    return model, report


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(image_token=True)


def batch(model_type, tokenizer, prompts=PROMPTS, seeds=(1, 2)):
    processor = build_processor(model_type, tokenizer)
    processor.tokenizer.padding_side = "left"
    return processor(
        images=[sample_image(seed=s) for s in seeds], text=list(prompts), return_tensors="pt", padding=True
    )


@pytest.mark.parametrize("model_type", ["llava", "llava_next"])
def test_budget_at_or_above_the_token_count_changes_nothing(model_type, tokenizer):
    stock = build_tiny_model(model_type, tokenizer).eval()
    model, report = pruned_model(model_type, tokenizer, budget=10_000)
    assert "nothing is pruned" in report.details["note"]
    inputs = batch(model_type, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, stock(**inputs).logits, rtol=0, atol=0)


ALGORITHMS = ["cdpruner", "diversity", "random", "pooling", "fastv"]


@pytest.mark.parametrize(
    ("model_type", "algorithm"), list(itertools.product(["llava", "llava_next"], ALGORITHMS))
)
def test_pruned_forward_is_the_stock_model_on_the_kept_tokens(model_type, algorithm, tokenizer):
    """The pruned logits equal the stock forward on the kept tokens' embeddings, with labels cut alike."""
    model, _ = pruned_model(model_type, tokenizer, algorithm=algorithm, fastv_layer=1)
    inputs = batch(model_type, tokenizer)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        features = list(
            model.model.get_image_features(pixel_values=inputs["pixel_values"], **extra).pooler_output
        )
        cut = model.prune_visual_tokens(
            inputs["input_ids"], inputs["attention_mask"], features, labels=labels
        )
        embeds = model.get_input_embeddings()(cut["input_ids"])
        image_mask = (cut["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, torch.cat(cut["features"]))
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=cut["attention_mask"]
        ).last_hidden_state
        expected = model.lm_head(hidden)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    image_tokens = (cut["input_ids"] == model.config.image_token_id).sum(dim=1)
    per_image = 8 if model_type == "llava_next" else 4  # NeXT: base crop 4 + high-res 4, plus its newlines
    newlines = 4 if model_type == "llava_next" else 0
    assert image_tokens.tolist() == [per_image + newlines] * 2
    assert cut["kept_tokens"] == [per_image + newlines] * 2
    # Text tokens are all kept, in order; padding never counts as kept.
    for row in range(2):
        real = inputs["attention_mask"][row].bool()
        text = inputs["input_ids"][row][real & (inputs["input_ids"][row] != model.config.image_token_id)]
        kept = cut["input_ids"][row][cut["attention_mask"][row].bool()]
        assert kept[kept != model.config.image_token_id].tolist() == text.tolist()
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    target = cut["labels"][:, 1:].reshape(-1)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, target, ignore_index=-100))


@pytest.mark.parametrize("layer", [0, 1])
def test_fastv_keeps_the_tokens_the_stock_model_attends_to_most(layer, tokenizer):
    """FastV's scores against the stock model's own attention (eager, ``output_attentions``) at
    ``fastv_layer``: the attention each visual token receives, mean over heads and over the row's real
    (non-pad) queries; the top ``budget`` of each image kept. The queries are scaled up (in both models) so
    that attention depends on content, not only on position (the tiny model's is nearly uniform, and then
    the first visual tokens win at every layer); the batch is right-padded, so pad queries see the image."""
    model, _ = pruned_model("llava", tokenizer, algorithm="fastv", fastv_layer=layer)
    stock = build_tiny_model("llava", tokenizer)
    stock.set_attn_implementation("eager")
    with torch.no_grad():
        for m in (model, stock):
            for decoder_layer in m.model.language_model.layers:
                decoder_layer.self_attn.q_proj.weight.mul_(4)
    processor = build_processor("llava", tokenizer)
    processor.tokenizer.padding_side = "right"
    inputs = processor(
        images=[sample_image(seed=s) for s in (1, 2)], text=PROMPTS, return_tensors="pt", padding=True
    )
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert (mask[:, -1] == 0).any()  # a right-padded row: its pad queries must not count
    with torch.no_grad():
        attentions = stock(**inputs, output_attentions=True).attentions[layer]  # [B, heads, query, key]
        features = list(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        cut = model.prune_visual_tokens(ids, mask, features)
    image = ids == model.config.image_token_id
    for row in range(ids.shape[0]):
        received = attentions[row].mean(dim=0)[mask[row].bool()].mean(dim=0)  # [key]
        positions = torch.nonzero(image[row]).squeeze(1)
        order = sorted(positions.tolist(), key=lambda p: -received[p].item())
        assert received[order[3]] - received[order[4]] > 1e-6  # no tie at the budget's edge
        assert order[:4] != positions[:4].tolist()  # not simply the first visual tokens
        assert torch.nonzero(cut["keep"][row] & image[row]).squeeze(1).tolist() == sorted(order[:4])


def test_llava_cuts_given_position_ids_like_the_tokens(tokenizer):
    """Explicit position ids (offset by 3, pads at 0) are cut at the kept positions: the pruned logits are
    the stock model's on the hand-cut sequence with the hand-cut position ids. Pooling (budget 4 of a 4×4
    grid) keeps each image's first 4 placeholders, filled with the 2×2 block means."""
    model, _ = pruned_model("llava", tokenizer, algorithm="pooling")
    stock = build_tiny_model("llava", tokenizer)
    inputs = batch("llava", tokenizer)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    position_ids = ((mask.cumsum(dim=-1) - 1) * mask + 3 * mask).long()
    image = ids == model.config.image_token_id
    keep = ~image | (image & (image.cumsum(dim=-1) <= 4))
    rows = range(ids.shape[0])
    cut = {name: torch.stack([t[r][keep[r]] for r in rows]) for name, t in [("ids", ids), ("mask", mask)]}
    cut_positions = torch.stack([position_ids[r][keep[r]] for r in rows])
    with torch.no_grad():
        logits = model(**inputs, position_ids=position_ids).logits
        full = torch.stack(
            list(stock.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        )
        dim = full.shape[-1]
        pooled = full.reshape(2, 2, 2, 2, 2, dim).mean(dim=(2, 4)).reshape(2, 4, dim)
        expected = stock(
            input_ids=cut["ids"],
            attention_mask=cut["mask"],
            position_ids=cut_positions,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(pooled))},
        ).logits
        renumbered = stock(
            input_ids=cut["ids"],
            attention_mask=cut["mask"],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(pooled))},
        ).logits
    assert not torch.allclose(expected, renumbered, atol=1e-4)  # the given positions matter here
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_llava_next_keeps_every_newline_token(tokenizer):
    model, _ = pruned_model("llava_next", tokenizer, algorithm="random", budget=1)
    inputs = batch("llava_next", tokenizer)
    with torch.no_grad():
        features = list(
            model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
            ).pooler_output
        )
        cut = model.prune_visual_tokens(inputs["input_ids"], inputs["attention_mask"], features)
    newline = model.model.image_newline
    for full, kept in zip(features, cut["features"], strict=True):
        assert int((full == newline).all(-1).sum()) == int((kept == newline).all(-1).sum()) > 0


@pytest.mark.parametrize("algorithm", ["cdpruner", "pooling"])
@pytest.mark.parametrize("model_type", ["llava", "llava_next"])
def test_generate_equals_the_pruned_forward_step_by_step(model_type, algorithm, tokenizer):
    model, _ = pruned_model(model_type, tokenizer, algorithm=algorithm)
    inputs = batch(model_type, tokenizer)
    pad = model.config.text_config.pad_token_id
    # The instruction is fixed to the prompt's, so the step-by-step forward (which sees the generated
    # tokens too) selects the same visual tokens as generate did once.
    instruction = [row[row != pad] for row in inputs["input_ids"][:, -12:]]
    with torch.no_grad():
        generated = model.generate(**inputs, instruction_ids=instruction, max_new_tokens=6, do_sample=False)
        assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        for _ in range(6):
            logits = model(input_ids=ids, attention_mask=mask, instruction_ids=instruction, **extra).logits
            step = logits[:, -1].argmax(dim=-1, keepdim=True)
            ids, mask = torch.cat([ids, step], dim=1), torch.cat([mask, torch.ones_like(step)], dim=1)
    assert torch.equal(generated, ids)


def test_generate_samples_and_returns_several_sequences(tokenizer):
    model, _ = pruned_model("llava", tokenizer)
    inputs = batch("llava", tokenizer)
    torch.manual_seed(0)
    out = model.generate(
        **inputs,
        max_new_tokens=4,
        do_sample=True,
        top_k=0,
        num_return_sequences=2,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (4, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out.sequences[::2, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_the_instruction_comes_from_the_prompt(tokenizer):
    model, _ = pruned_model("llava", tokenizer, algorithm="cdpruner")
    selections = {}
    for prompt in (
        "USER: <image>\nwhat is it? ASSISTANT:",
        "USER: <image>\ncount the red dots on the left ASSISTANT:",
        "USER: <image>\nwhere is the shadow falling? ASSISTANT:",
    ):
        inputs = batch("llava", tokenizer, prompts=[prompt], seeds=(3,))
        with torch.no_grad():
            features = list(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
            auto = model.prune_visual_tokens(inputs["input_ids"], inputs["attention_mask"], features)
            text_after = inputs["input_ids"][0][
                (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[-1] + 1 :
            ]
            explicit = model.prune_visual_tokens(
                inputs["input_ids"], inputs["attention_mask"], features, instruction_ids=[text_after]
            )
        assert torch.equal(auto["keep"], explicit["keep"])
        selections[prompt] = tuple(auto["keep"][0].nonzero().reshape(-1).tolist())
    assert len(set(selections.values())) > 1, "the kept tokens never depend on the instruction"


def test_training_with_labels_reaches_the_vision_side(tokenizer):
    model, _ = pruned_model("llava", tokenizer, algorithm="random")
    model.train()
    inputs = batch("llava", tokenizer)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_source_model_is_left_alone(tokenizer):
    source = build_tiny_model("llava", tokenizer).eval()
    result = hf_prune.prune(
        source,
        {"stages": [{"method": "visual_token_pruning", "budget": 4}]},
        tokenizer=build_processor("llava", tokenizer),
        progress=False,
    )
    assert type(source).__name__ == "LlavaForConditionalGeneration" and source.config.model_type == "llava"
    assert result.model.config.model_type == "hf_prune_llava"
    assert result.model.config.token_pruning["budget"] == 4


# ---- bad input ------------------------------------------------------------------------------------------


def test_image_count_must_match_the_placeholders(tokenizer):
    model, _ = pruned_model("llava", tokenizer)
    inputs = batch("llava", tokenizer)
    with pytest.raises(ValueError, match=r"image tokens but the images give .* features \(1 images\)"):
        model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"][:1],
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"budget": 0}, r"budget: must be a positive integer"),
        ({"budget": -3}, r"budget: must be a positive integer"),
        ({"keep_ratio": 1.5}, r"keep_ratio: must be in \(0, 1\]"),
        ({"budget": 4, "keep_ratio": 0.5}, r"budget: give exactly one of budget or keep_ratio"),
        ({"budget": 4, "algorithm": "tome"}, r"algorithm: must be one of 'cdpruner' \| 'diversity'"),
    ],
)
def test_bad_settings_name_the_key(fields, message):
    spec = get_method("visual_token_pruning")
    with pytest.raises(RecipeError, match=r"stages\[0\]\." + message):
        build_dataclass(spec.config_cls, fields, "stages[0]")


def test_models_without_a_supported_vision_tower_are_refused(tokenizer, tmp_path):
    dense = build_tiny_model("llama", build_tokenizer())
    with pytest.raises(
        UnsupportedModelError, match="needs a vision-language model; llama has no vision tower"
    ):
        hf_prune.prune(dense, {"stages": [{"method": "visual_token_pruning", "budget": 4}]}, progress=False)
    config = get_method("visual_token_pruning").config_cls(budget=4, algorithm="fastv", fastv_layer=9)
    llava = build_tiny_model("llava", tokenizer)
    with pytest.raises(ConfigFieldError, match="fastv_layer: must be below"):
        config.check_model(llava.config, get_adapter(llava.config))


def test_unsupported_vision_language_family(tmp_path):
    import transformers

    config = transformers.Idefics3Config()
    with pytest.raises(UnsupportedModelError, match="model_type 'idefics3' is not supported"):
        get_adapter(config)
    with pytest.raises(UnsupportedModelError, match="does not support model_type 'idefics3'"):
        token_pruning_classes("idefics3")


# ---- scoring helpers of the pruned model ------------------------------------------------------------------


def off_default_device(function, *args):
    """``function(*args)`` with torch's default device set to meta: a tensor it makes without naming the
    input's device is then a meta tensor, and the result cannot be read (a CPU-only run cannot see it
    otherwise)."""
    with torch.device("meta"):
        return function(*args)


def test_instruction_ids_are_the_real_text_after_each_image(tokenizer):
    """By hand on constructed rows: the text after each image up to the next image of the row (the first
    image's placeholders are not contiguous here), padding and image tokens left out; overrides lose pads."""
    model, _ = pruned_model("llava", tokenizer)
    image, pad = model.config.image_token_id, model.config.text_config.pad_token_id
    ids = torch.tensor(
        [
            [10, image, image, 11, image, 12, 13, image, image, 14, 15, pad],  # two images, right-padded
            [pad, pad, 20, image, 21, 22, 23, 24, 25, 26, 27, 28],
        ]
    )
    mask = (ids != pad).long()
    runs = [(0, torch.tensor([1, 2, 4])), (0, torch.tensor([7, 8])), (1, torch.tensor([3]))]
    image_mask = ids == image
    expected = [[12, 13], [14, 15], list(range(21, 29))]  # after the last placeholder of each image
    got = off_default_device(model._instruction_ids, ids, mask, image_mask, runs, None)
    assert [g.tolist() for g in got] == expected
    no_mask = off_default_device(model._instruction_ids, ids, None, image_mask, runs, None)
    assert [g.tolist() for g in no_mask] == [[12, 13], [14, 15, pad], list(range(21, 29))]
    # Overrides: a [B, M] tensor or a list of rows, pads dropped; a 1-D tensor is the one row of a batch of 1.
    override = torch.tensor([[5, 6, pad], [pad, 7, 8]])
    for given in (override, list(override)):
        got = off_default_device(model._instruction_ids, ids, mask, image_mask, runs, given)
        assert [g.tolist() for g in got] == [[5, 6], [5, 6], [7, 8]]
    single = off_default_device(
        model._instruction_ids,
        ids[1:],
        mask[1:],
        image_mask[1:],
        [(0, torch.tensor([3]))],
        torch.tensor([9, 8]),
    )
    assert [g.tolist() for g in single] == [[9, 8]]
    with pytest.raises(ValueError, match="^instruction_ids has 1 rows for a batch of 2$"):
        off_default_device(model._instruction_ids, ids, mask, image_mask, runs, [torch.tensor([5])])
    with pytest.raises(ValueError, match="^instruction_ids has 3 rows for a batch of 2$"):
        off_default_device(model._instruction_ids, ids, mask, image_mask, runs, torch.tensor([[1], [2], [3]]))


def test_fastv_received_is_the_stock_models_attention_received(tokenizer):
    """``_fastv_received`` against the stock model (eager, ``output_attentions``) on a left-padded batch with
    given position ids that jump: per position, the attention received at the layer, mean over heads and
    over the row's real queries. A row with one real token receives all of its own attention (1 there)."""
    model, _ = pruned_model("llava", tokenizer, algorithm="fastv", fastv_layer=1)
    stock = build_tiny_model("llava", tokenizer)
    stock.set_attn_implementation("eager")
    with torch.no_grad():
        for m in (model, stock):
            for decoder_layer in m.model.language_model.layers:
                decoder_layer.self_attn.q_proj.weight.mul_(4)
    inputs = batch("llava", tokenizer)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = (mask.cumsum(dim=-1) - 1).clamp_min(0)
    positions[:, 10:] += 5
    config = model.model.language_model.config
    assert config._attn_implementation == "sdpa"
    with torch.no_grad():
        attentions = stock(**inputs, position_ids=positions, output_attentions=True).attentions[1]
        features = list(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        got = model._fastv_received(ids, mask, [f.double() for f in features], 1, positions)
    assert config._attn_implementation == "sdpa"  # restored
    real = mask.float()
    expected = (attentions.mean(dim=1) * real[:, :, None]).sum(dim=1) / real.sum(dim=1, keepdim=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Without an attention mask (nor position ids) every query is real: the stock model on that row alone.
    full = int(torch.nonzero(mask.all(dim=1))[0])
    row = slice(full, full + 1)
    with torch.no_grad():
        alone = model._fastv_received(ids[row], None, features[row], 1)
        stock_alone = stock(
            input_ids=ids[row], pixel_values=inputs["pixel_values"][row], output_attentions=True
        ).attentions[1]
    torch.testing.assert_close(alone[0], stock_alone[0].mean(dim=0).mean(dim=0), rtol=1e-5, atol=1e-6)
    # One real token in row 1 (its image dropped): it attends only to itself.
    pad = model.config.text_config.pad_token_id
    lone_ids, lone_mask = ids.clone(), mask.clone()
    lone_ids[1, :-1], lone_mask[1, :-1] = pad, 0
    with torch.no_grad():
        lone = model._fastv_received(lone_ids, lone_mask, features[:1], 1)
    torch.testing.assert_close(
        lone[1], torch.nn.functional.one_hot(torch.tensor(ids.shape[1] - 1), ids.shape[1]).float()
    )
    with pytest.raises(
        ValueError, match=r"^token_pruning.fastv_layer: 4 is past the last decoder layer \(3\)$"
    ):
        model._fastv_received(ids, mask, features, 4)


def test_check_settings_fills_defaults_and_names_the_bad_key():
    assert patch.check_settings({"budget": 4}) == {
        "algorithm": "cdpruner",
        "budget": 4,
        "keep_ratio": None,
        "relevance_sign": "positive",
        "seed": 0,
        "fastv_layer": 2,
    }
    for fine in (
        {"budget": 1},
        {"keep_ratio": 1},
        {"keep_ratio": 1e-9},
        {"budget": 2, "seed": 0, "fastv_layer": 0},
    ):
        patch.check_settings(fine)
    algorithms = "cdpruner, diversity, random, pooling, fastv"
    for settings, message in [
        ({"budget": 4, "algorithm": "tome"}, f"token_pruning.algorithm: 'tome' is not one of {algorithms}"),
        ({}, "token_pruning: give exactly one of budget or keep_ratio"),
        ({"budget": 4, "keep_ratio": 0.5}, "token_pruning: give exactly one of budget or keep_ratio"),
        *[
            (
                {"budget": bad},
                f"token_pruning.budget: must be a positive integer (tokens kept per image or crop), got {bad!r}",
            )
            for bad in (0, -1, 2.0, True)
        ],
        *[
            ({"keep_ratio": bad}, f"token_pruning.keep_ratio: must be in (0, 1], got {bad!r}")
            for bad in (0, 1.5, "0.5", -0.1)
        ],
        (
            {"budget": 4, "relevance_sign": "minus"},
            "token_pruning.relevance_sign: 'minus' is not one of positive, negative",
        ),
        *[
            ({"budget": 4, key: bad}, f"token_pruning.{key}: must be a non-negative integer, got {bad!r}")
            for key in ("seed", "fastv_layer")
            for bad in (-1, 1.0)
        ],
    ]:
        with pytest.raises(ValueError) as caught:
            patch.check_settings(settings)
        assert str(caught.value) == message


def test_kept_count_rounds_up_past_float_error():
    budget = patch.check_settings({"budget": 10})
    assert patch.kept_count(budget, 100, crops=0.7) == 7  # 10 × 0.7 is 7.000000000000001 in floats
    assert patch.kept_count(budget, 100, crops=0.75) == 8 and patch.kept_count(budget, 5, crops=2) == 5
    ratio = patch.check_settings({"keep_ratio": 0.01})
    assert patch.kept_count(ratio, 10) == 1 and patch.kept_count(ratio, 250) == 3
    assert patch.kept_count(patch.check_settings({"keep_ratio": 1}), 7) == 7


def test_square_grid_and_image_runs_by_hand():
    assert patch.square_grid(16) == (4, 4) and patch.square_grid(1) == (1, 1)
    assert patch.square_grid(12) == (1, 12) and patch.square_grid(15) == (1, 15)
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]]).bool()
    runs = patch.image_runs(mask, [2, 1, 2])
    assert [(row, positions.tolist()) for row, positions in runs] == [(0, [1, 2]), (0, [4]), (1, [0, 1])]
    with pytest.raises(ValueError) as caught:
        patch.image_runs(mask, [2, 1])
    assert str(caught.value) == (
        "the input has 5 image tokens but the images give 3 features (2 images): each image needs exactly "
        "one image placeholder in the text, expanded by the processor"
    )
    with pytest.raises(ValueError, match="^an image's placeholder tokens span two rows of the batch$"):
        patch.image_runs(mask, [2, 2, 1])


@pytest.mark.parametrize("algorithm", ["cdpruner", "diversity", "random"])
def test_kept_tokens_by_hand(algorithm, tokenizer):
    """The kept visual tokens of each image, by hand: cdpruner from the language model's embeddings of the
    text after the image (relevance, kernel, greedy by log det), diversity the same with r ≡ 1, random the
    first ``budget`` of a randperm from one generator seeded with ``seed``, one draw per image in order."""
    model, _ = pruned_model("llava", tokenizer, algorithm=algorithm, seed=3)
    inputs = batch("llava", tokenizer)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image = ids == model.config.image_token_id
    with torch.no_grad():
        features = list(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        cut = model.prune_visual_tokens(ids, mask, features)
        generator = torch.Generator().manual_seed(3)
        for row, tokens in enumerate(features):
            if algorithm == "random":
                expected = sorted(torch.randperm(16, generator=generator)[:4].tolist())
            else:
                last = int(torch.nonzero(image[row])[-1])
                text = model.get_input_embeddings()(ids[row, last + 1 :])
                cosine = (unit(tokens) @ unit(text).T).mean(dim=-1)
                relevance = (
                    (cosine - cosine.min()) / (cosine.max() - cosine.min())
                    if algorithm == "cdpruner"
                    else torch.ones(16)
                )
                kernel = relevance[:, None] * (unit(tokens) @ unit(tokens).T) * relevance[None]
                expected = sorted(greedy_by_log_det(kernel, 4))
            kept = torch.nonzero(cut["keep"][row][image[row]]).squeeze(1).tolist()
            assert kept == expected
            torch.testing.assert_close(cut["features"][row], tokens[expected])
