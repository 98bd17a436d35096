"""Deterministic tiny random models of every supported architecture, saved with a tokenizer/processor.

Everything is built offline: the tokenizer is a small byte-level BPE trained on text from
``pydoc_data.topics`` (ships with Python), the models come from stock transformers configs with
random float32 weights drawn from a fixed seed. Used by ``test_architectures.py``.

    folder = save_tiny_model("qwen2_moe", tmp_path / "qwen2_moe")   # weights + tokenizer (+ processor)
    model = build_tiny_model("llama")                                 # in memory only
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import torch

TEXT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
VISION_TYPES = ("llava", "llava_next")
ALL_TYPES = TEXT_TYPES + VISION_TYPES
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
#: Known to the adapter table, refused by ReplaceMe (a norm sits after the MLP).
POST_FFN_NORM_TYPES = ("gemma2",)

SEED = 1234
INIT_STD = 0.1
HIDDEN = 32
NUM_LAYERS = 4
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 64
MOE_INTERMEDIATE = 16
NUM_EXPERTS = 4
TOP_K = 2
SLIDING_WINDOW = 8
TOKENIZER_VOCAB = 300
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
IMAGE_TOKEN = "<image>"
#: Vision tower: 32×32 images cut into 8×8 patches (16 patch features, plus CLS).
IMAGE_SIZE = 32
PATCH_SIZE = 8
#: This decoder layer's attention and MLP outputs are scaled by DAMPING, so the layer is nearly the
#: identity: angular-distance selection (``num_layers: 1``) removes it. Removing a middle layer (not the
#: last one, which random models otherwise tend to lose) shifts indices, ``layer_types`` and the
#: Qwen2-MoE sparse/dense mix, which is what the architecture tests need to see.
DAMPED_LAYER = 2
DAMPING = 0.05
#: Qwen2-MoE layer mix: (i + 1) % 2 == 0 is sparse, so layers 0 and 2 are dense MLPs, 1 and 3 MoE.
QWEN2_MOE_SPARSE_STEP = 2


# ---- text ------------------------------------------------------------------------------------


def pydoc_text(num_chars: int, *, skip: int = 0) -> str:
    """Deterministic English-ish text: pydoc topics in sorted order, paragraphs kept, ``num_chars`` long."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return text[skip : skip + num_chars]


def write_calibration_file(path: str | os.PathLike, num_chars: int = 12_000) -> Path:
    """Write a few KB of pydoc text (blank-line separated paragraphs) to ``path`` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Start past the tokenizer's training text, so calibration is not the exact training data.
    path.write_text(pydoc_text(num_chars, skip=20_000) + "\n", encoding="utf-8")
    return path


# ---- tokenizer --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _base_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = pydoc_text(20_000)
    backend.train_from_iterator([text[i : i + 1000] for i in range(0, len(text), 1000)], trainer=trainer)
    bos = SPECIAL_TOKENS[1]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="right",
    )


def build_tokenizer(*, image_token: bool = False) -> Any:
    """A fresh copy of the session's tiny BPE tokenizer (trained once); optionally with ``<image>`` added."""
    tokenizer = copy.deepcopy(_base_tokenizer())
    if image_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


# ---- configs ----------------------------------------------------------------------------------


def _text_kwargs(tokenizer: Any) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _mixed_layer_types() -> list[str]:
    return ["full_attention", "sliding_attention", "full_attention", "sliding_attention"][:NUM_LAYERS]


def tiny_text_config(model_type: str, tokenizer: Any) -> Any:
    """The config of a tiny decoder-only model of ``model_type`` (any of TEXT_TYPES, or gemma2)."""
    import transformers as tf

    kw = _text_kwargs(tokenizer)
    moe = dict(num_experts_per_tok=TOP_K)
    if model_type == "llama":
        return tf.LlamaConfig(**kw)
    if model_type == "mistral":
        return tf.MistralConfig(**kw, sliding_window=SLIDING_WINDOW)
    if model_type == "qwen2":
        return tf.Qwen2Config(
            **kw, use_sliding_window=True, sliding_window=SLIDING_WINDOW, layer_types=_mixed_layer_types()
        )
    if model_type == "qwen3":
        return tf.Qwen3Config(
            **kw,
            head_dim=HIDDEN // HEADS,
            use_sliding_window=True,
            sliding_window=SLIDING_WINDOW,
            layer_types=_mixed_layer_types(),
        )
    if model_type == "mixtral":
        kw["intermediate_size"] = MOE_INTERMEDIATE
        return tf.MixtralConfig(**kw, **moe, num_local_experts=NUM_EXPERTS)
    if model_type == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **kw,
            **moe,
            num_experts=NUM_EXPERTS,
            moe_intermediate_size=MOE_INTERMEDIATE,
            shared_expert_intermediate_size=2 * MOE_INTERMEDIATE,
            decoder_sparse_step=QWEN2_MOE_SPARSE_STEP,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    if model_type == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **kw,
            **moe,
            head_dim=HIDDEN // HEADS,
            num_experts=NUM_EXPERTS,
            moe_intermediate_size=MOE_INTERMEDIATE,
            norm_topk_prob=True,
        )
    if model_type == "olmoe":
        kw["intermediate_size"] = MOE_INTERMEDIATE
        return tf.OlmoeConfig(**kw, **moe, num_experts=NUM_EXPERTS)
    if model_type == "gemma2":
        return tf.Gemma2Config(**kw, head_dim=HIDDEN // HEADS, sliding_window=SLIDING_WINDOW)
    raise ValueError(f"no tiny config for {model_type!r}")


def tiny_vision_config() -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=HIDDEN,
        initializer_range=INIT_STD,
    )


#: LLaVA-NeXT "anyres" grid: an image is resized to the best of these and cut into IMAGE_SIZE tiles.
GRID_PINPOINTS = [
    [IMAGE_SIZE, 2 * IMAGE_SIZE],
    [2 * IMAGE_SIZE, IMAGE_SIZE],
    [2 * IMAGE_SIZE, 2 * IMAGE_SIZE],
]


def tiny_config(model_type: str, tokenizer: Any) -> Any:
    """The config of a tiny model of any type in ALL_TYPES (or gemma2)."""
    import transformers as tf

    if model_type not in VISION_TYPES:
        return tiny_text_config(model_type, tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    common = dict(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config("llama", tokenizer),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    if model_type == "llava":
        return tf.LlavaConfig(**common, image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    if model_type == "llava_next":
        return tf.LlavaNextConfig(
            **common, image_grid_pinpoints=GRID_PINPOINTS, image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2
        )
    raise ValueError(model_type)


# ---- models -----------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = SEED, std: float = INIT_STD) -> torch.nn.Module:
    """Overwrite every parameter from a seeded generator: matrices N(0, std²), norm scales 1 + N(0, std²).

    Independent of transformers' own init (which changes between versions and leaves norms at 1 and
    biases at 0), so the weights depend only on the parameter names/shapes and the seed.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
        leaf = name.rsplit(".", 1)[-1]
        is_scale = param.dim() == 1 and "norm" in name and leaf == "weight"
        param.copy_((1.0 + noise) if is_scale else noise)
    return model


@torch.no_grad()
def damp_layer_(layer: torch.nn.Module, factor: float = DAMPING) -> None:
    """Scale every output projection of a decoder layer (``o_proj``, ``down_proj``: dense, fused experts,
    shared expert) by ``factor``: the layer then adds little to the residual stream."""
    for name, param in layer.named_parameters():
        if name.split(".")[-2:-1] in (["o_proj"], ["down_proj"]) or name.endswith(".down_proj"):
            param.mul_(factor)


def build_tiny_model(
    model_type: str, tokenizer: Any = None, *, seed: int = SEED, damped_layer: int | None = DAMPED_LAYER
) -> Any:
    """A tiny float32 model of ``model_type`` with its head, in eval mode, weights from ``seed``.

    ``damped_layer`` (default DAMPED_LAYER) is made nearly the identity, see ``damp_layer_``.
    """
    import transformers as tf

    if tokenizer is None:
        tokenizer = build_tokenizer(image_token=model_type in VISION_TYPES)
    config = tiny_config(model_type, tokenizer)
    auto = tf.AutoModelForImageTextToText if model_type in VISION_TYPES else tf.AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    if damped_layer is not None:
        layers = model.model.language_model.layers if model_type in VISION_TYPES else model.model.layers
        damp_layer_(layers[damped_layer])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.float().eval()


def build_processor(model_type: str, tokenizer: Any) -> Any:
    """CLIP-style image processor + LlavaProcessor / LlavaNextProcessor around ``tokenizer`` (pillow only)."""
    import transformers as tf

    size = {"shortest_edge": IMAGE_SIZE}
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    common = dict(
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )
    if model_type == "llava":
        image_processor = tf.CLIPImageProcessorPil(size=size, crop_size=crop)
        return tf.LlavaProcessor(image_processor=image_processor, **common)
    if model_type == "llava_next":
        image_processor = tf.LlavaNextImageProcessorPil(
            size=size, crop_size=crop, image_grid_pinpoints=GRID_PINPOINTS
        )
        return tf.LlavaNextProcessor(image_processor=image_processor, **common)
    raise ValueError(f"{model_type!r} has no processor")


def build_preprocessor(model_type: str) -> Any:
    """The tokenizer (text models) or processor (LLaVA / LLaVA-NeXT) saved with a tiny model."""
    if model_type in VISION_TYPES:
        return build_processor(model_type, build_tokenizer(image_token=True))
    return build_tokenizer()


def save_tiny_model(model_type: str, folder: str | os.PathLike, *, seed: int = SEED) -> Path:
    """Build a tiny ``model_type`` model with its tokenizer/processor and save both to ``folder``."""
    folder = Path(folder)
    preprocessor = build_preprocessor(model_type)
    tokenizer = getattr(preprocessor, "tokenizer", preprocessor)
    model = build_tiny_model(model_type, tokenizer, seed=seed)
    model.save_pretrained(folder)
    preprocessor.save_pretrained(folder)
    return folder


def sample_image(height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, seed: int = SEED) -> Any:
    """A deterministic RGB PIL image with some structure (a gradient plus seeded noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype("uint8")
    return Image.fromarray(pixels)  # uint8 H×W×3: RGB


#: The tiny CLIP text tower's context: short, so that instructions are cut into several chunks.
CLIP_CONTEXT = 16


def save_tiny_clip(
    folder: str | os.PathLike, vision_tower: Any = None, *, seed: int = SEED, vision_width: int = HIDDEN
) -> Path:
    """A tiny random CLIPModel (vision width = the tiny LLaVA's) with its tokenizer, saved to ``folder``;
    ``vision_tower`` (a CLIPVisionModel) supplies its vision weights, as the real CLIP of a LLaVA would."""
    from hf_prune.evals.testbeds.vlm_testbed_clip import character_clip_tokenizer
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    tokenizer = character_clip_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        max_position_embeddings=CLIP_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=16,
    )
    vision = {**tiny_vision_config().to_dict(), "hidden_size": vision_width}
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    model = randomize_(CLIPModel(config), seed)
    if vision_tower is not None:
        model.vision_model.load_state_dict(vision_tower.state_dict())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def tiny_llama_folder(path):
    """A 3-layer random Llama (hidden 16, vocab 64, seed 0) saved at ``path``; returns ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path
