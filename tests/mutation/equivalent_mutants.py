"""Surviving mutants that are *equivalent*: no input can tell them from the original code, so no test can
kill them. ``run_mutation.py`` leaves them out of the kill rate and names entries that no longer survive.

Key: mutmut's mutant name (``mutmut show NAME`` in the group's work folder prints the diff); value: why
it is equivalent, in a sentence. A mutant that a test *could* kill does not belong here: write the test.
"""

#: tokens: mutants that only drop a ``device=`` argument (or ``.to(device)``).
TOKENS_CPU_ONLY = (
    "device=None (or left out): the tensor is made on the CPU, where every input of the tests is; "
    "only a run on an accelerator could tell"
)

EQUIVALENT_MUTANTS: dict[str, str] = {
    # --- tokens ---
    "hf_prune.model_patches.text_token_pruning.xǁTextTokenPruningMixinǁ_special__mutmut_4": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.text_token_pruning.xǁTextTokenPruningMixinǁ_special__mutmut_7": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.text_token_pruning.xǁTextTokenPruningMixinǁforward__mutmut_51": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.text_token_pruning.xǁTextTokenPruningMixinǁforward__mutmut_53": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.text_token_pruning.xǁTextTokenPruningMixinǁforward__mutmut_58": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.text_token_pruning.xǁTextTokenPruningMixinǁforward__mutmut_60": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.text_token_pruning.xǁTextTokenPruningMixinǁforward__mutmut_64": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.text_token_pruning.xǁTextTokenPruningMixinǁforward__mutmut_66": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_expected_ratios__mutmut_11": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_prefill.x_seeded_scores__mutmut_2": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_prefill.xǁPrunedPromptǁdecode_inputs__mutmut_10": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_prefill.xǁPrunedPromptǁdecode_inputs__mutmut_13": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.xǁPromptRetainerǁforward__mutmut_18": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.xǁPromptRetainerǁforward__mutmut_20": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.xǁPromptRetainerǁforward__mutmut_36": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.xǁPromptRetainerǁforward__mutmut_38": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_always_kept__mutmut_4": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_always_kept__mutmut_6": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_chosen_ratios__mutmut_8": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_chosen_ratios__mutmut_10": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_chosen_ratios__mutmut_18": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_chosen_ratios__mutmut_21": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_expected_ratios__mutmut_8": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_soft_attention_bias__mutmut_6": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_soft_attention_bias__mutmut_8": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_soft_attention_bias__mutmut_11": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_soft_attention_bias__mutmut_13": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_soft_attention_bias__mutmut_27": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_soft_attention_bias__mutmut_30": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_soft_attention_bias__mutmut_38": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_soft_attention_bias__mutmut_41": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.text_token_pruning.x_top_fraction__mutmut_34": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.text_token_pruning.x_top_fraction__mutmut_36": TOKENS_CPU_ONLY,
    "hf_prune.model_patches.prompt_retainer.x_always_kept__mutmut_31": (
        "Filling padding with +1 instead of -1 changes the last position only when the last real "
        "token is at 0, and then it is also the first, kept anyway."
    ),
    "hf_prune.model_patches.prompt_retainer.x_always_kept__mutmut_32": (
        "Any negative fill gives the same maximum for a row with a real token, and a row without "
        "one matches no position either way."
    ),
    "hf_prune.model_patches.prompt_retainer.x_soft_attention_bias__mutmut_15": (
        "key < query drops only the diagonal, which the identity OR-ed in the next line makes visible again."
    ),
    "hf_prune.model_patches.prompt_retainer.xǁPromptRetainerǁforward__mutmut_2": (
        "A bool mask (.to(None) keeps it bool) multiplies and sums to the same values as its float copy."
    ),
    "hf_prune.model_patches.prompt_retainer.x_expected_ratios__mutmut_18": (
        "softmax over dim +1 of the [B, R] ratio logits is the same dimension as -1."
    ),
    "hf_prune.model_patches.prompt_retainer.x_expected_ratios__mutmut_20": (
        "Summing the [B, R] weighted candidates over dim +1 is the same dimension as -1."
    ),
    "hf_prune.model_patches.prompt_retainer.x_soft_keep__mutmut_76": ("float('-INF') is float('-inf')."),
    "hf_prune.model_patches.text_token_pruning.x_soft_keep__mutmut_4": (
        "Tensor.sort's default dim is -1, which is dim 1 of the [B, L] saliency."
    ),
    "hf_prune.model_patches.text_token_pruning.x_soft_keep__mutmut_13": ("float('-INF') is float('-inf')."),
    "hf_prune.model_patches.text_token_pruning.x_soft_keep__mutmut_73": ("float('-INF') is float('-inf')."),
    "hf_prune.model_patches.text_token_pruning.x_soft_keep__mutmut_29": (
        "The rank ratio·n - 1 never exceeds n - 1 <= L - 1 for ratios in (0, 1], so clamping at L"
        " + 1 instead of L - 1 never bites."
    ),
    "hf_prune.model_patches.text_token_pruning.xǁTextTokenPruningMixinǁ_init_weights__mutmut_5": (
        "float('NAN') is NaN like float('nan')."
    ),
    "hf_prune.model_patches.text_token_pruning.x_self_attention__mutmut_1": (
        "getattr(None, 'self', default) returns layer.attention, whose output[1] is the same "
        "attention weights (BertAttention passes its self-attention's weights through; "
        "DistilBERT's attention is that module)."
    ),
    "hf_prune.model_patches.prompt_retainer.xǁPromptRetainerǁforward__mutmut_31": (
        "Filling padding with -2 instead of -1 only changes a row without real tokens, which "
        "clamp_min(0) sends to 0 either way."
    ),
    "hf_prune.model_patches.prompt_retainer.xǁPromptRetainerǁforward__mutmut_49": (
        "Concatenating the two [B, H] pooled states on dim +1 is the same dimension as -1."
    ),
    "hf_prune.model_patches.prompt_retainer.x_chosen_ratios__mutmut_14": (
        "argmax over dim +1 of the [B, R] ratio logits is the same dimension as -1."
    ),
    "hf_prune.model_patches.prompt_retainer.x_soft_keep__mutmut_4": (
        "Tensor.sort's default dim is -1, which is dim 1 of the [B, L] saliency."
    ),
    "hf_prune.model_patches.prompt_retainer.x_soft_keep__mutmut_13": ("float('-INF') is float('-inf')."),
    "hf_prune.model_patches.prompt_retainer.x_soft_keep__mutmut_29": (
        "The rank ratio·n - 1 never exceeds n - 1 <= L - 1 for ratios in (0, 1], so clamping at L"
        " + 1 instead of L - 1 never bites."
    ),
}
