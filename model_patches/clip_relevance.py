"""CDPruner's instruction relevance from a CLIP text tower, for LLaVA and LLaVA-NeXT.

The paper scores each visual token by how well it matches the instruction in CLIP's joint space: the
token as CLIP would embed it (the vision tower's post-layernorm, then CLIP's visual projection, applied
to the feature the projector receives) against the instruction as CLIP's text tower embeds it (in chunks
of the text tower's context, 77 tokens for CLIP; mean over the chunks). HF LLaVA checkpoints carry only the
vision half of CLIP, so the text half comes from the recipe (``text_tower``) and is stored in the pruned
checkpoint: the config's ``relevance_text_tower`` holds the CLIP text config (with ``projection_dim``),
the weights hold ``relevance_text_tower`` (CLIPTextModelWithProjection) and ``relevance_visual_projection``.

The instruction arrives as language-model token ids, so the model decodes them with its language
tokenizer and re-encodes the text with the CLIP tokenizer; both are saved with the checkpoint under
``relevance_tokenizers/{language,clip}`` and loaded by ``from_pretrained``.

Imports only torch and transformers: it travels with the checkpoint as remote code.
"""

import os

import torch
from torch import nn

TOKENIZER_FOLDER = "relevance_tokenizers"
#: from_pretrained keyword arguments that also apply to loading the tokenizers
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


def build_relevance_modules(text_config: dict, vision_hidden_size: int) -> tuple[nn.Module, nn.Module]:
    """(CLIPTextModelWithProjection, visual projection Linear) for a ``relevance_text_tower`` config dict."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_dict({k: v for k, v in text_config.items() if k != "model_type"})
    text_tower = CLIPTextModelWithProjection(config)
    return text_tower, nn.Linear(vision_hidden_size, config.projection_dim, bias=False)


def post_layernorm(vision_tower: nn.Module) -> nn.Module:
    """The vision tower's final layer norm (CLIP: ``vision_model.post_layernorm``)."""
    norm = getattr(getattr(vision_tower, "vision_model", vision_tower), "post_layernorm", None)
    if norm is None:
        raise ValueError(
            f"CLIP text-tower relevance needs a CLIP-style vision tower with a post_layernorm; "
            f"{type(vision_tower).__name__} has none"
        )
    return norm


class ProjectorInputCapture:
    """Context manager that keeps what the multimodal projector receives (the selected vision features)."""

    def __init__(self, projector: nn.Module):
        self.projector, self.inputs = projector, None

    def __enter__(self):
        def hook(module, args):
            self.inputs = args[0]

        self.handle = self.projector.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@torch.no_grad()
def clip_patch_embeddings(model, vision_features: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
    """Each image's visual tokens in CLIP's joint space [tokens, P], laid out like the features the model
    gives the language model. ``vision_features``: the projector's input ([images or crops, tokens, D])."""
    inner = model.model
    embeds = model.relevance_visual_projection(post_layernorm(inner.vision_tower)(vision_features))
    if not hasattr(inner, "pack_image_features"):  # LLaVA: one row per image
        return list(embeds)
    # LLaVA-NeXT: split into images' crops and unpad like the model's own features, with a zero vector
    # where the model puts its newline tokens (those are always kept, so their relevance is never used).
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    image_sizes = kwargs["image_sizes"]
    crops = [
        image_size_to_num_patches(
            image_size=size,
            grid_pinpoints=model.config.image_grid_pinpoints,
            patch_size=model.config.vision_config.image_size,
        )
        for size in image_sizes
    ]
    packed, _ = inner.pack_image_features(
        torch.split(embeds, crops, dim=0),
        image_sizes,
        model.config.vision_feature_select_strategy,
        image_newline=embeds.new_zeros(embeds.shape[-1]),
    )
    return list(packed)


@torch.no_grad()
def clip_text_embeddings(text_tower: nn.Module, tokenizer, text: str) -> torch.Tensor:
    """[chunks, P] CLIP text embeddings of ``text``, cut into chunks that fit the text tower's context
    (each chunk framed by the tokenizer's start and end tokens); [0, P] for an empty text."""
    context = text_tower.config.max_position_embeddings
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        return torch.empty(0, text_tower.config.projection_dim, device=text_tower.device)
    step = context - 2
    chunks = [
        [tokenizer.bos_token_id, *ids[i : i + step], tokenizer.eos_token_id] for i in range(0, len(ids), step)
    ]
    width = max(len(c) for c in chunks)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([c + [pad] * (width - len(c)) for c in chunks], device=text_tower.device)
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chunks], device=text_tower.device)
    return text_tower(input_ids=input_ids, attention_mask=mask).text_embeds


class ClipTextTowerRelevance:
    """Mixed in before a stock LLaVA-style model class: the CLIP text tower's modules (built from the config's
    ``relevance_text_tower``), its tokenizers, and their loading and saving with the checkpoint."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if getattr(config, "relevance_text_tower", None):
            self.add_relevance_text_tower(config.relevance_text_tower)

    def has_clip_text_tower(self) -> bool:
        return bool(getattr(self.config, "relevance_text_tower", None))

    def add_relevance_text_tower(self, text_config: dict) -> None:
        """Add freshly initialised ``relevance_text_tower`` and ``relevance_visual_projection`` modules for the
        CLIP text config ``text_config`` and record it in the config; the caller loads their weights."""
        text_tower, projection = build_relevance_modules(text_config, self.config.vision_config.hidden_size)
        device = self.get_input_embeddings().weight.device
        self.relevance_text_tower = text_tower.to(device)
        self.relevance_visual_projection = projection.to(device)
        self.config.relevance_text_tower = dict(text_config)

    def set_relevance_tokenizers(self, language, clip) -> None:
        """The language model's tokenizer (to decode the instruction) and CLIP's (to re-encode it)."""
        self.relevance_tokenizers = {"language": language, "clip": clip}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # (model, loading_info) when the caller asked for output_loading_info=True.
        model = loaded[0] if kwargs.get("output_loading_info") else loaded
        if model.has_clip_text_tower():
            hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
            model.relevance_tokenizers = load_tokenizers(pretrained_model_name_or_path, hub)
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(self, "relevance_tokenizers", None):
            for name, tokenizer in self.relevance_tokenizers.items():
                tokenizer.save_pretrained(os.path.join(save_directory, TOKENIZER_FOLDER, name))
        return result


def load_tokenizers(path, hub_kwargs: dict) -> dict | None:
    """{"language", "clip"} tokenizers saved with a checkpoint at ``path`` (folder or Hub id); None if absent."""
    from transformers import AutoTokenizer

    try:
        return {
            name: AutoTokenizer.from_pretrained(
                path, subfolder=f"{TOKENIZER_FOLDER}/{name}", **{"trust_remote_code": False, **hub_kwargs}
            )
            for name in ("language", "clip")
        }
    except (OSError, ValueError):
        return None
