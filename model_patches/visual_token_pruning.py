"""LLaVA-style models that drop visual tokens before the language model, by themselves.

The config of an ``hf_prune_<family>`` checkpoint holds a ``token_pruning`` dict; the model keeps, per
image (LLaVA) or per crop (LLaVA-NeXT), ``budget`` of its visual tokens (or ``keep_ratio`` of them) and
removes the others from the sequence before the first language-model layer, in ``forward`` and in
``generate``. Algorithms (``algorithm``):

- ``cdpruner`` (CDPruner, NeurIPS 2025): kernel L = diag(r)·S·diag(r), S the cosine similarity of the
  projected visual features, r the instruction relevance of each token (mean cosine between the token
  and the language model's input embeddings of the instruction tokens, min-max normalised; ``relevance_sign:
  negative`` flips the cosine, as the official code does with CLIP), then greedy MAP inference of the DPP;
- ``diversity``: the same DPP with r ≡ 1 (DivPrune-style, no instruction);
- ``random``: a seeded uniform choice;
- ``pooling``: the visual features average-pooled on their spatial grid down to the budget;
- ``fastv``: the tokens that receive the most attention (mean over heads and non-pad queries) at decoder
  layer ``fastv_layer``, from one scoring pass over the full sequence with eager attention up to that
  layer. Unlike FastV, which keeps every token in the first layers, all layers then see the kept tokens.

Kept tokens stay in their original order. ``input_ids`` placeholders, ``attention_mask``, ``labels`` and
given ``position_ids`` are cut the same way, so logits (and the loss) are those of the shorter sequence:
positions are renumbered contiguously (the stock behaviour of a shorter prompt). Rows that lose different
numbers of tokens are left-padded. The instruction is the text after each image in its row (up to the next
image), or ``instruction_ids`` when given (one 1-D tensor per row, or a [B, M] tensor; pad ids ignored).
``generate`` prunes once, then runs the stock loop on the shorter prompt; the returned sequences start
with the caller's own ``input_ids``.

Imports only torch, transformers and the standard library: ``save_pretrained`` copies this file next to
the weights, so ``AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)`` works
without hf_prune. Importing it registers the classes with the Auto classes.
"""

import math

import torch
import torch.nn.functional as F

PREFIX = "hf_prune_"
ALGORITHMS = ("cdpruner", "diversity", "random", "pooling", "fastv")
RELEVANCE_SIGNS = ("positive", "negative")
DEFAULTS = {"algorithm": "cdpruner", "budget": None, "keep_ratio": None, "relevance_sign": "positive",
            "seed": 0, "fastv_layer": 2}
#: family -> (stock config class, stock model class)
FAMILIES = {
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
}


def check_settings(settings) -> dict:
    """The ``token_pruning`` dict with defaults filled in; ValueError naming the bad key otherwise."""
    if not isinstance(settings, dict):
        raise ValueError(f"token_pruning must be a dict, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"token_pruning.{unknown[0]}: unknown key (allowed: {', '.join(DEFAULTS)})")
    merged = {**DEFAULTS, **settings}
    if merged["algorithm"] not in ALGORITHMS:
        raise ValueError(f"token_pruning.algorithm: {merged['algorithm']!r} is not one of {', '.join(ALGORITHMS)}")
    budget, ratio = merged["budget"], merged["keep_ratio"]
    if (budget is None) == (ratio is None):
        raise ValueError("token_pruning: give exactly one of budget or keep_ratio")
    if budget is not None and (type(budget) is not int or budget < 1):
        raise ValueError(f"token_pruning.budget: must be a positive integer (tokens kept per image or crop), got {budget!r}")
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"token_pruning.keep_ratio: must be in (0, 1], got {ratio!r}")
    if merged["relevance_sign"] not in RELEVANCE_SIGNS:
        raise ValueError(f"token_pruning.relevance_sign: {merged['relevance_sign']!r} is not one of "
                         f"{', '.join(RELEVANCE_SIGNS)}")
    for key in ("seed", "fastv_layer"):
        if type(merged[key]) is not int or merged[key] < 0:
            raise ValueError(f"token_pruning.{key}: must be a non-negative integer, got {merged[key]!r}")
    return merged


def kept_count(settings: dict, num_tokens: int, crops: float = 1.0) -> int:
    """Tokens kept out of ``num_tokens`` that stand for ``crops`` crops' worth of tokens (a budget at or
    above the count keeps them all)."""
    if settings["budget"] is not None:
        return min(math.ceil(settings["budget"] * crops - 1e-9), num_tokens)
    return min(num_tokens, max(1, math.ceil(settings["keep_ratio"] * num_tokens)))


# ---- selection: pure tensor functions ------------------------------------------------------------


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """[..., N, D] -> [..., N, N] cosine similarities in float32."""
    unit = F.normalize(features.float(), dim=-1)
    return unit @ unit.transpose(-1, -2)


def instruction_relevance(features: torch.Tensor, instruction: torch.Tensor | None, sign: str = "positive") -> torch.Tensor:
    """[N] relevance in [0, 1]: mean cosine of each token [N, D] with the instruction embeddings [M, D],
    optionally negated, min-max normalised; all ones without an instruction or when every token ties."""
    if instruction is None or instruction.shape[0] == 0:
        return torch.ones(features.shape[0], device=features.device)
    cosine = F.normalize(features.float(), dim=-1) @ F.normalize(instruction.float(), dim=-1).T
    relevance = cosine.mean(dim=-1) * (-1.0 if sign == "negative" else 1.0)
    spread = relevance.max() - relevance.min()
    if spread <= 1e-6:
        return torch.ones_like(relevance)
    return (relevance - relevance.min()) / spread


def dpp_greedy_map(kernel: torch.Tensor, count: int, eps: float = 1e-10) -> torch.Tensor:
    """Fast greedy MAP inference for a DPP (Chen, Zhang & Zhou 2018), batched: kernel [B, N, N] -> [B, count]
    indices in ascending order. Once the kernel's rank is exhausted, the remaining picks go by index."""
    batch, n, _ = kernel.shape
    kernel = kernel.float()
    rows = torch.arange(batch, device=kernel.device)
    gains = torch.diagonal(kernel, dim1=-2, dim2=-1).clone()  # d²_i
    vectors = kernel.new_zeros(batch, count, n)  # c_k, one row per pick so far
    chosen = torch.empty(batch, count, dtype=torch.long, device=kernel.device)
    for t in range(count):
        j = gains.argmax(dim=-1)
        chosen[:, t] = j
        gain = gains[rows, j]
        projection = torch.einsum("bk,bkn->bn", vectors[rows, :t, j], vectors[:, :t]) if t else 0
        e = (kernel[rows, j] - projection) / gain.clamp_min(eps).sqrt()[:, None]
        e = torch.where((gain > eps)[:, None], e, torch.zeros_like(e))
        vectors[:, t] = e
        gains = gains - e.square()
        gains[rows, j] = float("-inf")
    return chosen.sort(dim=-1).values


def pool_grid(features: torch.Tensor, grid: tuple[int, int], count: int) -> torch.Tensor:
    """Average-pool [h0*w0, D] features laid out on ``grid`` (h0, w0) to ``count`` tokens [count, D], on the
    h × w grid with h·w = count whose aspect ratio is closest to the input's."""
    h0, w0 = grid
    shapes = [(h, count // h) for h in range(1, count + 1) if count % h == 0]
    h, w = min(shapes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - math.log(h0 / w0)), 9), s[0]))
    image = features.T.reshape(1, features.shape[1], h0, w0).float()
    pooled = F.adaptive_avg_pool2d(image, (h, w))
    return pooled.reshape(features.shape[1], h * w).T.to(features.dtype)


def square_grid(num_tokens: int) -> tuple[int, int]:
    side = math.isqrt(num_tokens)
    return (side, side) if side * side == num_tokens else (1, num_tokens)


# ---- the model side --------------------------------------------------------------------------------


class _StopScoring(Exception):
    """Raised by the FastV scoring hook once the scoring layer has run."""


def _image_runs(image_mask: torch.Tensor, counts: list[int]) -> list[tuple[int, torch.Tensor]]:
    """(row, positions) of each image's placeholder block, images in row-major order."""
    flat = torch.nonzero(image_mask.reshape(-1)).squeeze(1)
    if flat.numel() != sum(counts):
        raise ValueError(f"the input has {flat.numel()} image tokens but the images give {sum(counts)} features "
                         f"({len(counts)} images): each image needs exactly one image placeholder in the text, "
                         "expanded by the processor")
    width = image_mask.shape[1]
    runs, start = [], 0
    for count in counts:
        positions = flat[start:start + count]
        start += count
        row = int(positions[0]) // width
        if int(positions[-1]) // width != row:
            raise ValueError("an image's placeholder tokens span two rows of the batch")
        runs.append((row, positions - row * width))
    return runs


def _mixin(stock_model):
    """The token-pruning model class over ``stock_model`` (LlavaForConditionalGeneration or LLaVA-NeXT's)."""
    from dataclasses import dataclass

    from transformers.modeling_outputs import BaseModelOutputWithPooling

    @dataclass
    class PrunedImageFeatures(BaseModelOutputWithPooling):
        """Image features already cut to the budget: ``forward`` passes them on as they are."""

    class TokenPruning(stock_model):
        # ---- what each image offers: groups of tokens, each with its own budget -----------------
        def token_groups(self, features: torch.Tensor) -> tuple[list, torch.Tensor]:
            """([(indices into the image's tokens, grid, crops)], indices always kept) for one image.

            LLaVA: one group, the whole square grid, one crop. LLaVA-NeXT: the base image (one crop) and the
            unpadded high-resolution grid (its token count over a crop's), its newline tokens always kept."""
            n = features.shape[0]
            arange = torch.arange(n, device=features.device)
            newline = getattr(self.model, "image_newline", None)
            vision = self.config.vision_config
            base = (vision.image_size // vision.patch_size) ** 2
            if newline is None or n <= base:
                return [(arange, square_grid(n), 1.0)], arange[:0]
            is_newline = (features[base:] == newline.to(features.dtype)).all(dim=-1)
            rows = int(is_newline.sum())
            hires = arange[base:][~is_newline]
            if rows == 0 or hires.numel() % rows:
                return [(arange[:base], square_grid(base), 1.0), (hires, (1, hires.numel()), hires.numel() / base)], \
                    arange[base:][is_newline]
            return ([(arange[:base], square_grid(base), 1.0), (hires, (rows, hires.numel() // rows), hires.numel() / base)],
                    arange[base:][is_newline])

        def _settings(self) -> dict:
            return check_settings(self.config.token_pruning or {})

        def _image_features(self, pixel_values, mm_encoder_outputs, kwargs) -> list | None:
            if mm_encoder_outputs and mm_encoder_outputs.get("image") is not None:
                return list(mm_encoder_outputs["image"].pooler_output)
            if pixel_values is None:
                return None
            extra = {k: kwargs[k] for k in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")
                     if kwargs.get(k) is not None}
            return list(self.model.get_image_features(pixel_values=pixel_values, return_dict=True, **extra).pooler_output)

        def _instructions(self, input_ids, attention_mask, image_mask, runs, instruction_ids) -> list:
            """Instruction embeddings per image: the override, or the row's text after the image up to the next one."""
            embed = self.get_input_embeddings()
            pad = self.config.get_text_config().pad_token_id
            if instruction_ids is not None:
                rows = list(instruction_ids) if not isinstance(instruction_ids, torch.Tensor) or instruction_ids.dim() > 1 \
                    else [instruction_ids]
                if len(rows) != input_ids.shape[0]:
                    raise ValueError(f"instruction_ids has {len(rows)} rows for a batch of {input_ids.shape[0]}")
                per_row = [embed(r[r != pad] if pad is not None else r) for r in
                           (torch.as_tensor(r, device=input_ids.device) for r in rows)]
                return [per_row[row] for row, _ in runs]
            real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            text = real & ~image_mask
            out = []
            for i, (row, positions) in enumerate(runs):
                end = next((p[0] for r, p in runs[i + 1:] if r == row), input_ids.shape[1])
                after = torch.arange(int(positions[-1]) + 1, int(end), device=input_ids.device)
                ids = input_ids[row, after[text[row, after]]]
                out.append(embed(ids))
            return out

        def _fastv_received(self, input_ids, attention_mask, features, layer) -> torch.Tensor:
            """[B, L] attention each position receives at decoder layer ``layer`` (mean over heads and real queries)."""
            language_model = self.model.language_model
            if layer >= len(language_model.layers):
                raise ValueError(f"token_pruning.fastv_layer: {layer} is past the last decoder layer "
                                 f"({len(language_model.layers) - 1})")
            embeds = self.get_input_embeddings()(input_ids)
            image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(image_mask, torch.cat(features).to(embeds.dtype))
            captured = {}

            def hook(module, args, output):
                captured["weights"] = output[1]
                raise _StopScoring

            text_config = language_model.config
            previous = text_config._attn_implementation
            handle = language_model.layers[layer].self_attn.register_forward_hook(hook)
            text_config._attn_implementation = "eager"  # scores exist only with eager attention
            try:
                language_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
            except _StopScoring:
                pass
            finally:
                text_config._attn_implementation = previous
                handle.remove()
            weights = captured["weights"].float().mean(dim=1)  # [B, query, key]
            queries = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).float()
            return (weights * queries[:, :, None]).sum(dim=1) / queries.sum(dim=1, keepdim=True).clamp_min(1)

        def _choose(self, features: torch.Tensor, group: torch.Tensor, grid, count: int, settings: dict,
                    instruction, received, generator) -> tuple[torch.Tensor, torch.Tensor]:
            """(indices kept within ``group``, their features) for one group of one image; the scores carry no
            gradient, the kept (or pooled) features do."""
            tokens = features[group]
            algorithm = settings["algorithm"]
            if algorithm == "pooling":
                return torch.arange(count, device=group.device), pool_grid(tokens, grid, count)
            with torch.no_grad():
                if algorithm == "random":
                    keep = torch.randperm(group.numel(), generator=generator)[:count].sort().values.to(group.device)
                elif algorithm == "fastv":
                    keep = received[group].topk(count).indices.sort().values
                else:
                    relevance = (instruction_relevance(tokens, instruction, settings["relevance_sign"])
                                 if algorithm == "cdpruner" else torch.ones(group.numel(), device=tokens.device))
                    kernel = relevance[:, None] * cosine_similarity_matrix(tokens) * relevance[None, :]
                    keep = dpp_greedy_map(kernel[None], count)[0]
            return keep, tokens[keep]

        def prune_visual_tokens(self, input_ids, attention_mask=None, features=None, *, labels=None,
                                position_ids=None, instruction_ids=None) -> dict | None:
            """Cut the visual tokens of a batch; None when nothing is to be cut.

            Returns ``input_ids``, ``attention_mask``, ``labels``, ``position_ids`` (the given ones cut, or None),
            ``features`` (the kept features per image), ``keep`` ([B, L] bool over the input) and ``kept_tokens``.
            """
            settings = self._settings()
            image_mask = input_ids == self.config.image_token_id
            runs = _image_runs(image_mask, [f.shape[0] for f in features])
            plans = []
            for (row, positions), image in zip(runs, features, strict=True):
                groups, always = self.token_groups(image)
                plans.append((row, positions, image,
                              [(g, grid, kept_count(settings, g.numel(), crops)) for g, grid, crops in groups], always))
            if all(count == g.numel() for *_, groups, _ in plans for g, _, count in groups):
                return None
            with torch.no_grad():
                instructions = (self._instructions(input_ids, attention_mask, image_mask, runs, instruction_ids)
                                if settings["algorithm"] == "cdpruner" else [None] * len(runs))
                received = (self._fastv_received(input_ids, attention_mask, features, settings["fastv_layer"])
                            if settings["algorithm"] == "fastv" else None)
            generator = torch.Generator().manual_seed(settings["seed"])
            keep = ~image_mask
            kept_features = []
            for index, (row, positions, image, groups, always) in enumerate(plans):
                slots, values = [always], [image[always]]
                for group, grid, count in groups:
                    scores = received[row, positions] if received is not None else None
                    chosen, chosen_features = self._choose(image, group, grid, count, settings, instructions[index],
                                                           scores, generator)
                    slots.append(group[chosen])
                    values.append(chosen_features)
                slots_all = torch.cat(slots)
                order = slots_all.argsort()
                keep[row, positions[slots_all]] = True
                kept_features.append(torch.cat(values)[order])
            width = int(keep.sum(dim=1).max())

            def cut(tensor, fill):
                if tensor is None:
                    return None
                out = tensor.new_full((tensor.shape[0], width, *tensor.shape[2:]), fill)
                for row in range(tensor.shape[0]):
                    kept = tensor[row][keep[row]]
                    out[row, width - kept.shape[0]:] = kept  # left padding
                return out

            pad = self.config.get_text_config().pad_token_id
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            return {"input_ids": cut(input_ids, pad if pad is not None else 0), "attention_mask": cut(mask, 0),
                    "labels": cut(labels, -100), "position_ids": cut(position_ids, 0), "features": kept_features,
                    "keep": keep, "kept_tokens": [f.shape[0] for f in kept_features]}

        def save_pretrained(self, save_directory, *args, **kwargs):
            # Native key layout: the legacy renaming is keyed by the stock model_type and would not be undone.
            kwargs["save_original_format"] = False
            return super().save_pretrained(save_directory, *args, **kwargs)

        # ---- forward and generate ----------------------------------------------------------------
        def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                    inputs_embeds=None, labels=None, mm_encoder_outputs=None, instruction_ids=None, **kwargs):
            features = None
            done = bool(mm_encoder_outputs) and isinstance(mm_encoder_outputs.get("image"), PrunedImageFeatures)
            if input_ids is not None and not done and (pixel_values is not None or mm_encoder_outputs):
                features = self._image_features(pixel_values, mm_encoder_outputs, kwargs)
            pruned = None
            if features:
                pruned = self.prune_visual_tokens(input_ids, attention_mask, features, labels=labels,
                                                  position_ids=position_ids, instruction_ids=instruction_ids)
            if pruned is not None:
                input_ids, attention_mask, labels = pruned["input_ids"], pruned["attention_mask"], pruned["labels"]
                position_ids = pruned["position_ids"]
                pixel_values = None
                mm_encoder_outputs = {"image": PrunedImageFeatures(pooler_output=pruned["features"])}
            elif features is not None and pixel_values is not None:
                pixel_values, mm_encoder_outputs = None, {"image": BaseModelOutputWithPooling(pooler_output=features)}
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, labels=labels,
                                   mm_encoder_outputs=mm_encoder_outputs, **kwargs)

        def generate(self, input_ids=None, pixel_values=None, attention_mask=None, instruction_ids=None, **kwargs):
            features = None
            if input_ids is not None and pixel_values is not None:
                features = self._image_features(pixel_values, None, kwargs)
            pruned = features and self.prune_visual_tokens(input_ids, attention_mask, features,
                                                           instruction_ids=instruction_ids)
            if not pruned:
                return super().generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                        **kwargs)
            for key in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes"):
                kwargs.pop(key, None)
            out = super().generate(input_ids=pruned["input_ids"], attention_mask=pruned["attention_mask"],
                                   mm_encoder_outputs={"image": PrunedImageFeatures(pooler_output=pruned["features"])},
                                   **kwargs)
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
            restored = torch.cat([prompt, sequences[:, pruned["input_ids"].shape[1]:]], dim=1)
            if isinstance(out, torch.Tensor):
                return restored
            out.sequences = restored
            return out

    return TokenPruning


def _build(family: str):
    import transformers

    config_name, model_name = FAMILIES[family]
    stock_config = getattr(transformers, config_name)

    class Config(stock_config):
        model_type = PREFIX + family
        token_pruning: dict | None = None

        def __post_init__(self, **kwargs):
            super().__post_init__(**kwargs)
            if self.token_pruning is not None:
                self.token_pruning = check_settings(self.token_pruning)

    model_class = _mixin(getattr(transformers, model_name))
    model_class.config_class = Config
    prefix = "HfPrune" + config_name[: -len("Config")]
    for cls, name in ((Config, prefix + "Config"), (model_class, prefix + "ForConditionalGeneration")):
        cls.__name__ = cls.__qualname__ = name
    return Config, model_class


def _register(config_class, model_class) -> None:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModelForImageTextToText")
    if config_class.model_type in CONFIG_MAPPING:  # first registration wins (e.g. hf_prune, then a remote copy)
        return
    transformers.AutoConfig.register(config_class.model_type, config_class)
    transformers.AutoModelForImageTextToText.register(config_class, model_class)


#: family -> (config class, model class), filled by register().
CLASSES = {}


def register() -> None:
    """Build the classes of every family and register them with the Auto classes (idempotent)."""
    if CLASSES:
        return
    for family in FAMILIES:
        classes = _build(family)
        for cls in classes:
            globals()[cls.__name__] = cls
        _register(*classes)
        CLASSES[family] = classes


# `import hf_prune` imports this module, and so does transformers when it loads the copy saved as remote code.
register()


def token_pruning_classes(model_type: str):
    """(config class, model class) for a stock or ``hf_prune_`` model type of a supported family."""
    family = model_type[len(PREFIX):] if model_type.startswith(PREFIX) else model_type
    if family not in FAMILIES:
        raise ValueError(f"visual token pruning does not support model_type {model_type!r} "
                         f"(supported: {', '.join(FAMILIES)})")
    register()
    return CLASSES[family]
