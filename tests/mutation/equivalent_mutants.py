"""Surviving mutants that no test on this machine can kill, each with its reason.

- ``EQUIVALENT_MUTANTS``: no input can tell them from the original code (``-INF`` for ``-inf``, a dim
  +1 that is the last dim of every tensor it sees, a flag the next line overrides).
- ``NEEDS_ACCELERATOR``: they only drop a ``device=`` argument or a ``.to(device)``; every tensor of the
  tests is on the CPU, so only a run on a GPU could tell. Counted apart, not as equivalent.

``run_mutation.py`` reports both columns, leaves them out of the kill rate (the raw rate is shown too) and
names entries that no longer survive. Key: mutmut's mutant name (``mutmut show NAME`` in the group's work
folder prints the diff); value: the reason, in a sentence. A mutant that a test on the CPU *could* kill
does not belong here: write the test.
"""

_MOE = "hf_prune.model_patches.nonuniform_moe."
_SCORING = "hf_prune.methods.experts.scoring."
_REMOVAL = "hf_prune.methods.experts.removal."
_RETAINER = "hf_prune.model_patches.prompt_retainer."
_PREFILL = "hf_prune.model_patches.prompt_prefill."
_TEXT = "hf_prune.model_patches.text_token_pruning."
_SELECTION = "hf_prune.model_patches.token_selection."
_VISUAL = "hf_prune.model_patches.visual_token_scoring."
_CLIP = "hf_prune.model_patches.clip_relevance."
_ESTIMATORS = "hf_prune.methods.depth.estimators."
_REPLACEME = "hf_prune.methods.depth.replaceme."
_CUTS = "hf_prune.methods.depth.cuts."
_DIEP = "hf_prune.methods.experts.diep."
_LAYERWISE = "hf_prune.methods.experts.diep_sequential."
_TRAINING = _DIEP + "xǁDiepTrainingǁ"

_SAVE_FORMAT = (
    "transformers 5.24 applies its per-expert key conversion by the stock model_type only, so an "
    "hf_prune_<family> model writes fused expert keys whatever save_original_format is (default, True, "
    "False and an unknown key all give the same files; checked by hand)"
)
_LOGITS_2D = "every family's router returns 2-D logits [tokens, experts], so shape[1] is shape[-1]"
_ZIP_STRICT = "the length check just above raises first, and moe_layer_flags has num_hidden_layers entries"
_NO_CACHE = "nothing reads the KV cache of this single forward, and the logits do not depend on it"
_GRAD_FLAG = (
    "the training loop sets requires_grad on every α and β at the start of each epoch, before any use"
)
_MINUS_INF = "float('-INF') is float('-inf')."
_SORT_DIM = "Tensor.sort's default dim is -1, which is dim 1 of the [B, L] saliency."
_RANK_CLAMP = (
    "The rank ratio·n - 1 never exceeds n - 1 <= L - 1 for ratios in (0, 1], so clamping at L + 1 instead"
    " of L - 1 never bites."
)
_DEVICE_ONLY = (
    "device=None (or left out): the tensor is made on the CPU, where every input of the tests is; only a "
    "run on an accelerator could tell"
)

EQUIVALENT_MUTANTS: dict[str, str] = {
    # --- experts ---
    _MOE + "xǁNonuniformExpertsMixinǁsave_pretrained__mutmut_1": _SAVE_FORMAT,
    _MOE + "xǁNonuniformExpertsMixinǁsave_pretrained__mutmut_2": _SAVE_FORMAT,
    _MOE + "xǁNonuniformExpertsMixinǁsave_pretrained__mutmut_3": _SAVE_FORMAT,
    _MOE + "xǁNonuniformExpertsMixinǁsave_pretrained__mutmut_4": _SAVE_FORMAT,
    _MOE + "xǁNonuniformExpertsMixinǁforward__mutmut_38": _LOGITS_2D,
    _MOE + "xǁNonuniformExpertsMixinǁforward__mutmut_50": _LOGITS_2D,
    _MOE + "xǁNonuniformExpertsMixinǁforward__mutmut_54": 'float("-INF") is float("-inf")',
    _MOE + "xǁNonuniformExpertsConfigMixinǁcheck_experts_per_layer__mutmut_13": _ZIP_STRICT,
    _MOE + "xǁNonuniformExpertsConfigMixinǁcheck_experts_per_layer__mutmut_16": _ZIP_STRICT,
    _MOE + "xǁNonuniformExpertsConfigMixinǁcheck_experts_per_layer__mutmut_18": _ZIP_STRICT,
    _SCORING + "x__causal_lm_loss__mutmut_10": _NO_CACHE,
    _SCORING + "x__causal_lm_loss__mutmut_13": _NO_CACHE,
    _SCORING + "x__causal_lm_loss__mutmut_14": _NO_CACHE,
    _SCORING + "x__causal_lm_loss__mutmut_30": "-100 is F.cross_entropy's default ignore_index",
    _SCORING + "x_diep_scores__mutmut_33": _GRAD_FLAG,
    _SCORING + "x_diep_scores__mutmut_36": _GRAD_FLAG,
    _SCORING + "x_diep_scores__mutmut_41": _GRAD_FLAG,
    _SCORING + "x_diep_scores__mutmut_48": _GRAD_FLAG,
    _SCORING + "x_diep_scores__mutmut_49": _GRAD_FLAG,
    _SCORING
    + "x_diep_scores__mutmut_67": "cache_moe_io keeps the same rows for every MoE layer, so all have the same count",
    # --- tokens ---
    _TEXT + "xǁTokenRetainerǁforward__mutmut_2": (
        "the real-token mask left bool: multiplying and summing it gives the same values as its float copy."
    ),
    _TEXT + "xǁTokenRetainerǁforward__mutmut_25": "torch.cat(dim=+1) on [B, H] tensors is dim=-1.",
    **{
        _TEXT + f"x_additive_mask__mutmut_{n}": (
            "the bias built in float32 for a half-precision model: attention casts it to the scores' dtype, "
            "so a bfloat16 model keeps the same tokens (test_bfloat16_model_prunes_like_the_float32_one)."
        )
        for n in (7, 10, 16)
    },
    _TEXT + "x_top_fraction__mutmut_11": "argsort's default dim is the last, dim 1 of the [B, L] scores.",
    _TEXT + "x_top_fraction__mutmut_20": 'float("-INF") is float("-inf"): Python reads it case-blind.',
    **{
        _TEXT + f"x_self_attention__mutmut_{n}": (
            "hooking BertAttention instead of its .self module: its second output is the same attention "
            "weights (DistilBERT has no .self either way)."
        )
        for n in (7, 8)
    },
    _TEXT + "x_classify__mutmut_18": (
        "getattr without a default: BERT and RoBERTa models always have a pooler attribute (None when "
        "absent), and DistilBERT returns before this line."
    ),
    **{
        _TEXT + f"xǁTextTokenPruningMixinǁ_special__mutmut_{n}": (
            "the special ids as int64 whatever input_ids' integer dtype: torch.isin compares values."
        )
        for n in (3, 6)
    },
    _TEXT + "xǁTextTokenPruningMixinǁ_run_layer__mutmut_1": (
        "the default of capture_attention: forward always passes it, so the default is never used."
    ),
    **{
        _TEXT + f"xǁTextTokenPruningMixinǁforward__mutmut_{n}": (
            "an initial value that the pruning layer always overwrites before it is read (every forward "
            "reaches that layer: it is checked to be below the layer count)."
        )
        for n in (49, 54, 55)
    },
    **{
        _TEXT
        + f"xǁTextTokenPruningMixinǁforward__mutmut_{n}": "argmax(+1) on the [B, R] ratio logits is argmax(-1)."
        for n in (103, 155)
    },
    **{
        _TEXT + f"xǁTextTokenPruningMixinǁforward__mutmut_{n}": (
            "a bool mask left unconverted: torch.where and the product promote it to the same float values."
        )
        for n in (123, 260)
    },
    _TEXT
    + "xǁTextTokenPruningMixinǁforward__mutmut_203": "argsort's default dim is the last, dim 1 of [B, L].",
    _TEXT + "xǁTextTokenPruningMixinǁforward__mutmut_206": (
        "a stable descending argsort of the bool keep mask orders it as the int8 copy does."
    ),
    _TEXT + "xǁTextTokenPruningMixinǁforward__mutmut_240": (
        "the attention captured (eager) at layer - 1 for every algorithm: only attention reads it, and the "
        "eager layer's output equals sdpa's to float rounding."
    ),
    **{
        _TEXT + f"xǁTextTokenPruningMixinǁforward__mutmut_{n}": (
            "the received-attention scores scaled by another positive factor per row (or per key of equal "
            "weight): each row's top-k, all that is read from them, is unchanged."
        )
        for n in (262, 268, 269, 271, 272, 273)
    },
    _RETAINER + "x_always_kept__mutmut_31": (
        "Filling padding with +1 instead of -1 changes the last position only when the last real token is"
        " at 0, and then it is also the first, kept anyway."
    ),
    _RETAINER + "x_always_kept__mutmut_32": (
        "Any negative fill gives the same maximum for a row with a real token, and a row without one "
        "matches no position either way."
    ),
    _RETAINER + "x_soft_attention_bias__mutmut_15": (
        "key < query drops only the diagonal, which the identity OR-ed in the next line makes visible again."
    ),
    _RETAINER + "xǁPromptRetainerǁforward__mutmut_2": (
        "A bool mask (.to(None) keeps it bool) multiplies and sums to the same values as its float copy."
    ),
    _RETAINER
    + "x_expected_ratios__mutmut_18": "softmax over dim +1 of the [B, R] ratio logits is the same dimension as -1.",
    _RETAINER
    + "x_expected_ratios__mutmut_20": "Summing the [B, R] weighted candidates over dim +1 is the same dimension as -1.",
    _RETAINER + "x_soft_keep__mutmut_76": _MINUS_INF,
    _TEXT + "x_soft_keep__mutmut_4": _SORT_DIM,
    _TEXT + "x_soft_keep__mutmut_13": _MINUS_INF,
    _TEXT + "x_soft_keep__mutmut_73": _MINUS_INF,
    _TEXT + "x_soft_keep__mutmut_29": _RANK_CLAMP,
    _TEXT + "xǁTextTokenPruningMixinǁ_init_weights__mutmut_5": "float('NAN') is NaN like float('nan').",
    _TEXT + "x_self_attention__mutmut_1": (
        "getattr(None, 'self', default) returns layer.attention, whose output[1] is the same attention "
        "weights (BertAttention passes its self-attention's weights through; DistilBERT's attention is "
        "that module)."
    ),
    _RETAINER + "xǁPromptRetainerǁforward__mutmut_31": (
        "Filling padding with -2 instead of -1 only changes a row without real tokens, which clamp_min(0)"
        " sends to 0 either way."
    ),
    _RETAINER + "xǁPromptRetainerǁforward__mutmut_49": (
        "Concatenating the two [B, H] pooled states on dim +1 is the same dimension as -1."
    ),
    _RETAINER
    + "x_chosen_ratios__mutmut_14": "argmax over dim +1 of the [B, R] ratio logits is the same dimension as -1.",
    _RETAINER + "x_soft_keep__mutmut_4": _SORT_DIM,
    _RETAINER + "x_soft_keep__mutmut_13": _MINUS_INF,
    _RETAINER + "x_soft_keep__mutmut_29": _RANK_CLAMP,
    # --- visual ---
    _SELECTION + "x_instruction_relevance__mutmut_1": (
        'the default sign becomes another string than "negative", which is treated as "positive" all the '
        "same."
    ),
    _SELECTION + "x_instruction_relevance__mutmut_2": (
        'the default sign becomes another string than "negative", which is treated as "positive" all the '
        "same."
    ),
    _SELECTION + "x_instruction_relevance__mutmut_17": (
        "the features are 2-D ([N, D]) by contract, so normalising along dim 1 (the default) is "
        "normalising along dim -1."
    ),
    _SELECTION + "x_instruction_relevance__mutmut_18": (
        "the features are 2-D ([N, D]) by contract, so normalising along dim +1 is normalising along dim -1."
    ),
    _SELECTION + "x_instruction_relevance__mutmut_23": (
        "the instruction embeddings are 2-D ([M, D]) by contract, so normalising along dim 1 (the "
        "default) is normalising along dim -1."
    ),
    _SELECTION + "x_instruction_relevance__mutmut_24": (
        "the instruction embeddings are 2-D ([M, D]) by contract, so normalising along dim +1 is "
        "normalising along dim -1."
    ),
    _SELECTION + "x_instruction_relevance__mutmut_27": ("dividing by the sign (±1) is multiplying by it."),
    _SELECTION + "x_instruction_relevance__mutmut_29": (
        "the cosine matrix is 2-D [N, M], so its dim +1 is its dim -1."
    ),
    _SELECTION + "x_instruction_relevance__mutmut_34": (
        "the negated relevance scaled by 2 before the min-max normalisation, which removes any positive "
        "scale."
    ),
    _SELECTION + "x_pool_grid__mutmut_10": (
        "range(1, count + 2) adds only h = count + 1, which never divides count."
    ),
    _SELECTION + "x_pool_grid__mutmut_32": (
        "rounding the aspect distance to 10 instead of 9 digits: distinct grid shapes differ by far more,"
        " exact ties by float round-off of about 1e-16, so both merge the same ties."
    ),
    _SELECTION + "x_pool_grid__mutmut_39": (
        "adaptive_avg_pool2d pools an unbatched [C, H, W] input exactly like the [1, C, H, W] one."
    ),
    _VISUAL + "xǁVisualTokenScoringǁ_instruction_ids__mutmut_43": (
        "ending an instruction at the next image's second placeholder instead of its first adds only "
        "image positions, which the text mask drops."
    ),
    _VISUAL + "xǁVisualTokenScoringǁ_fastv_received__mutmut_35": (
        "use_cache=None: the scoring pass stops (by exception) inside the scoring layer, and a cache, "
        "built or not, changes no attention weight there."
    ),
    _VISUAL + "xǁVisualTokenScoringǁ_fastv_received__mutmut_39": (
        "without use_cache the config's default applies: the scoring pass stops (by exception) inside the"
        " scoring layer, and a cache, built or not, changes no attention weight there."
    ),
    _VISUAL + "xǁVisualTokenScoringǁ_fastv_received__mutmut_40": (
        "use_cache=True: the scoring pass stops (by exception) inside the scoring layer, and a cache, "
        "built or not, changes no attention weight there."
    ),
    _CLIP + "x_build_relevance_modules__mutmut_4": (
        "CLIPTextConfig.from_dict takes a model_type key as a plain attribute that nothing reads, so "
        "keeping it changes no module."
    ),
    _CLIP + "x_build_relevance_modules__mutmut_5": (
        "CLIPTextConfig.from_dict takes a model_type key as a plain attribute that nothing reads, so "
        "keeping it changes no module."
    ),
    _CLIP + "x_build_relevance_modules__mutmut_10": (
        "nn.Linear(bias=None) builds no bias, as bias=False does."
    ),
    **{
        _CLIP + f"x_load_tokenizers__mutmut_{n}": (
            "trust_remote_code left unset: transformers then refuses remote code as with False, unless "
            "stdin is an interactive terminal, where it would ask (no test runs on one)."
        )
        for n in (5, 6, 7)
    },
    # --- depth ---
    _ESTIMATORS + "x_fit_cosine_map__mutmut_76": (
        "cosine_similarity's default dim is 1, the last dim of the 2-D [tokens, d] batches it always gets"
    ),
    _ESTIMATORS + "x_fit_cosine_map__mutmut_77": (
        "dim=+1 is dim=1, the last dim of the 2-D [tokens, d] batches it always gets"
    ),
    _ESTIMATORS + "x_fit_cosine_map__mutmut_79": (
        "zero_grad with set_to_none falsy zeroes the gradient in place instead of dropping it: backward "
        "writes the same gradient and Adam sees the same values"
    ),
    _ESTIMATORS + "x_fit_cosine_map__mutmut_80": (
        "zero_grad with set_to_none falsy zeroes the gradient in place instead of dropping it: backward "
        "writes the same gradient and Adam sees the same values"
    ),
    _ESTIMATORS + "xǁNormalEquationsǁsolve__mutmut_3": ("MᵀM is square: shape[1] == shape[0]"),
    _ESTIMATORS + "xǁNormalEquationsǁsolve__mutmut_6": (
        "a float32 identity added to the float64 MᵀM is promoted exactly (0 and 1 are exact): the same sum"
    ),
    _ESTIMATORS + "xǁNormalEquationsǁsolve__mutmut_9": (
        "a float32 identity added to the float64 MᵀM is promoted exactly (0 and 1 are exact): the same sum"
    ),
    _ESTIMATORS + "xǁNormalEquationsǁall_reduce__mutmut_8": (
        "without a dtype the token count is an int64 tensor, which all_reduce sums exactly, as float64 "
        "does for any realistic count"
    ),
    _CUTS + "xǁDepthCutConfigǁcheck_model__mutmut_1": (
        "the base check_model reads only the adapter (its unsupported_reason), never model_config"
    ),
    _CUTS + "xǁDepthCutConfigǁpredict_config__mutmut_8": (
        "kept is filtered from range(total), so any last >= total - 1 removes the same layers"
    ),
    _CUTS + "x_angular_distances__mutmut_72": (
        "cosine_similarity's default dim is 1, the last dim of the 2-D [tokens, d] states it always gets"
    ),
    _CUTS + "x_angular_distances__mutmut_74": (
        "dim=+1 is dim=1, the last dim of the 2-D [tokens, d] states it always gets"
    ),
    _CUTS + "x_angular_distances__mutmut_89": (
        "every layer's states have the same rows (the same tokens), so states[1] counts what states[0] does"
    ),
    _REPLACEME + "x_estimate_map__mutmut_65": (
        "with y float64 the float32 target is promoted exactly before the subtraction: the same difference"
    ),
    _REPLACEME + "x_estimate_map__mutmut_66": (
        "with the target float64 the float32 y is promoted exactly before the subtraction: the same "
        "difference"
    ),
    _REPLACEME + "x_estimate_map__mutmut_127": (
        "squared_error casts the map to the float64 sums first, and a float32 identity converts exactly"
    ),
    _REPLACEME + "x_estimate_map__mutmut_129": (
        "squared_error casts the map to the float64 sums first, and a float32 identity converts exactly"
    ),
    # --- diep ---
    _DIEP + "x_main_output__mutmut_1": "every MoE block and decoder layer of transformers 5 returns a tensor",
    _DIEP + "x_main_output__mutmut_3": "every MoE block and decoder layer of transformers 5 returns a tensor",
    **{
        _TRAINING + f"__init____mutmut_{n}": "beta_initial_values returns one value per MoE layer"
        for n in (8, 11, 16)
    },
    **{_TRAINING + f"__init____mutmut_{n}": _GRAD_FLAG for n in (20, 23, 24, 31, 32)},
    **{
        _TRAINING + f"__init____mutmut_{n}": "begin_epoch sets the phase and the totals before any use"
        for n in (57, 58, 59, 60, 61, 62)
    },
    **{
        _TRAINING + f"zero_grad__mutmut_{n}": "plain SGD (no momentum, no weight decay) steps the same on "
        "zeroed and on absent gradients, and the data-parallel step fills absent ones with zeros"
        for n in (1, 2)
    },
    _TRAINING + "reconstruction__mutmut_16": (
        "the MoE block routes every token on its own: [1, N, H] and [N, 1, H] give the same outputs"
    ),
    _TRAINING + "reconstruction__mutmut_22": "the difference is [N, H]: dim 1 is its last dim",
    _TRAINING + "step__mutmut_2": (
        "in one process the all-reduce is a no-op, so the only change is an absent gradient becoming zeros"
    ),
    **{
        _TRAINING + f"load_state__mutmut_{n}": "state() writes one α per MoE layer and a β for each"
        for n in (5, 9, 10)
    },
    **{_DIEP + f"x_causal_lm_loss__mutmut_{n}": _NO_CACHE for n in (6, 9, 12)},
    **{
        _DIEP + f"x_diep_scores__mutmut_{n}": "leave only says whether tqdm keeps the finished bar on screen"
        for n in (43, 47, 53)
    },
    # --- diep_layerwise ---
    **{
        _LAYERWISE + f"x_diep_scores_sequential__mutmut_{n}": "leave only says whether tqdm keeps the "
        "finished bar on screen"
        for n in (64, 68, 75)
    },
    _LAYERWISE + "x__one_step__mutmut_4": (
        "a zero lm_loss_weight back-propagates zero, and the history reports no LM loss at weight 0 anyway"
    ),
    _LAYERWISE + "x__one_step__mutmut_10": "reconstruction() returns at once for a step with no cached token",
    _LAYERWISE + "x__one_step__mutmut_12": "gradient is read only when with_lm, which assigns it first",
    _LAYERWISE + "x__one_step__mutmut_85": (
        "a gradient for the first MoE layer's input is computed and never read: the same α and β"
    ),
}

NEEDS_ACCELERATOR: dict[str, str] = {
    # --- diep_layerwise ---
    **{_LAYERWISE + f"x_diep_scores_sequential__mutmut_{n}": _DEVICE_ONLY for n in (27, 38, 40)},
    _LAYERWISE + "x__rows_of__mutmut_9": _DEVICE_ONLY,
    # --- diep ---
    **{_TRAINING + f"__init____mutmut_{n}": _DEVICE_ONLY for n in (19, 22, 27, 30)},
    **{_TRAINING + f"reconstruction__mutmut_{n}": _DEVICE_ONLY for n in (7, 9, 21)},
    **{_DIEP + f"x_causal_lm_loss__mutmut_{n}": _DEVICE_ONLY for n in (1, 10, 11)},
    # --- visual ---
    _CLIP + "xǁClipTextTowerRelevanceǁadd_relevance_text_tower__mutmut_6": _DEVICE_ONLY,
    _CLIP + "xǁClipTextTowerRelevanceǁadd_relevance_text_tower__mutmut_8": _DEVICE_ONLY,
    _CLIP + "xǁClipTextTowerRelevanceǁadd_relevance_text_tower__mutmut_10": _DEVICE_ONLY,
    # --- tokens ---
    _TEXT + "x_additive_mask__mutmut_8": _DEVICE_ONLY,
    _TEXT + "x_additive_mask__mutmut_11": _DEVICE_ONLY,
    _TEXT + "xǁTextTokenPruningMixinǁforward__mutmut_146": _DEVICE_ONLY,
    _TEXT + "xǁTextTokenPruningMixinǁforward__mutmut_149": _DEVICE_ONLY,
    _TEXT + "xǁTextTokenPruningMixinǁforward__mutmut_173": _DEVICE_ONLY,
    _TEXT + "xǁTextTokenPruningMixinǁ_special__mutmut_4": _DEVICE_ONLY,
    _TEXT + "xǁTextTokenPruningMixinǁ_special__mutmut_7": _DEVICE_ONLY,
    _TEXT + "xǁTextTokenPruningMixinǁforward__mutmut_51": _DEVICE_ONLY,
    _TEXT + "xǁTextTokenPruningMixinǁforward__mutmut_53": _DEVICE_ONLY,
    _TEXT + "xǁTextTokenPruningMixinǁforward__mutmut_58": _DEVICE_ONLY,
    _TEXT + "xǁTextTokenPruningMixinǁforward__mutmut_60": _DEVICE_ONLY,
    _TEXT + "xǁTextTokenPruningMixinǁforward__mutmut_64": _DEVICE_ONLY,
    _TEXT + "xǁTextTokenPruningMixinǁforward__mutmut_66": _DEVICE_ONLY,
    _RETAINER + "x_expected_ratios__mutmut_11": _DEVICE_ONLY,
    _PREFILL + "x_seeded_scores__mutmut_2": _DEVICE_ONLY,
    _PREFILL + "xǁPrunedPromptǁdecode_inputs__mutmut_10": _DEVICE_ONLY,
    _PREFILL + "xǁPrunedPromptǁdecode_inputs__mutmut_13": _DEVICE_ONLY,
    _RETAINER + "xǁPromptRetainerǁforward__mutmut_18": _DEVICE_ONLY,
    _RETAINER + "xǁPromptRetainerǁforward__mutmut_20": _DEVICE_ONLY,
    _RETAINER + "xǁPromptRetainerǁforward__mutmut_36": _DEVICE_ONLY,
    _RETAINER + "xǁPromptRetainerǁforward__mutmut_38": _DEVICE_ONLY,
    _RETAINER + "x_always_kept__mutmut_4": _DEVICE_ONLY,
    _RETAINER + "x_always_kept__mutmut_6": _DEVICE_ONLY,
    _RETAINER + "x_chosen_ratios__mutmut_8": _DEVICE_ONLY,
    _RETAINER + "x_chosen_ratios__mutmut_10": _DEVICE_ONLY,
    _RETAINER + "x_chosen_ratios__mutmut_18": _DEVICE_ONLY,
    _RETAINER + "x_chosen_ratios__mutmut_21": _DEVICE_ONLY,
    _RETAINER + "x_expected_ratios__mutmut_8": _DEVICE_ONLY,
    _RETAINER + "x_soft_attention_bias__mutmut_6": _DEVICE_ONLY,
    _RETAINER + "x_soft_attention_bias__mutmut_8": _DEVICE_ONLY,
    _RETAINER + "x_soft_attention_bias__mutmut_11": _DEVICE_ONLY,
    _RETAINER + "x_soft_attention_bias__mutmut_13": _DEVICE_ONLY,
    _RETAINER + "x_soft_attention_bias__mutmut_27": _DEVICE_ONLY,
    _RETAINER + "x_soft_attention_bias__mutmut_30": _DEVICE_ONLY,
    _RETAINER + "x_soft_attention_bias__mutmut_38": _DEVICE_ONLY,
    _RETAINER + "x_soft_attention_bias__mutmut_41": _DEVICE_ONLY,
    _TEXT + "x_top_fraction__mutmut_34": _DEVICE_ONLY,
    _TEXT + "x_top_fraction__mutmut_36": _DEVICE_ONLY,
    # --- depth ---
    _ESTIMATORS + "xǁNormalEquationsǁ__init____mutmut_7": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁ__init____mutmut_11": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁ__init____mutmut_16": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁ__init____mutmut_20": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁ__init____mutmut_24": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁ__init____mutmut_27": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁadd__mutmut_2": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁadd__mutmut_4": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁadd__mutmut_7": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁadd__mutmut_9": _DEVICE_ONLY,
    _ESTIMATORS + "x_fit_cosine_map__mutmut_10": _DEVICE_ONLY,
    _ESTIMATORS + "x_fit_cosine_map__mutmut_13": _DEVICE_ONLY,
    _ESTIMATORS + "x_fit_cosine_map__mutmut_49": _DEVICE_ONLY,
    _ESTIMATORS + "x_fit_cosine_map__mutmut_51": _DEVICE_ONLY,
    _ESTIMATORS + "x_fit_cosine_map__mutmut_54": _DEVICE_ONLY,
    _ESTIMATORS + "x_fit_cosine_map__mutmut_56": _DEVICE_ONLY,
    _ESTIMATORS + "x_fit_cosine_map__mutmut_61": _DEVICE_ONLY,
    _ESTIMATORS + "x_fit_cosine_map__mutmut_63": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁsolve__mutmut_7": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁall_reduce__mutmut_6": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁsolve__mutmut_10": _DEVICE_ONLY,
    _ESTIMATORS + "xǁNormalEquationsǁall_reduce__mutmut_9": _DEVICE_ONLY,
    _CUTS + "x_angular_distances__mutmut_43": _DEVICE_ONLY,
    _CUTS + "x_angular_distances__mutmut_55": _DEVICE_ONLY,
    _CUTS + "x_angular_distances__mutmut_57": _DEVICE_ONLY,
    _REPLACEME + "x_estimate_map__mutmut_16": _DEVICE_ONLY,
    _REPLACEME + "x_estimate_map__mutmut_20": _DEVICE_ONLY,
    _REPLACEME + "x_estimate_map__mutmut_22": _DEVICE_ONLY,
    _REPLACEME + "x_estimate_map__mutmut_51": _DEVICE_ONLY,
    _REPLACEME + "x_estimate_map__mutmut_100": _DEVICE_ONLY,
    _REPLACEME + "x_estimate_map__mutmut_109": _DEVICE_ONLY,
}
