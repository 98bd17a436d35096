"""Surviving mutants that are *equivalent*: no input can tell them from the original code, so no test can
kill them. ``run_mutation.py`` leaves them out of the kill rate and names entries that no longer survive.

Key: mutmut's mutant name (``mutmut show NAME`` in the group's work folder prints the diff); value: why
it is equivalent, in a sentence. A mutant that a test *could* kill does not belong here: write the test.
"""

_SAVE_FORMAT = (
    "transformers 5.24 applies its per-expert key conversion by the stock model_type only, so an "
    "hf_prune_<family> model writes fused expert keys whatever save_original_format is (default, True, "
    "False and an unknown key all give the same files; checked by hand)"
)
_NM = "hf_prune.model_patches.nonuniform_moe."
_SC = "hf_prune.methods.experts.scoring."
_GRAD_FLAG = (
    "the training loop sets requires_grad on every α and β at the start of each epoch, before any use"
)
_NO_CACHE = "nothing reads the KV cache of this single forward, and the logits do not depend on it"
_STRICT = "the length check just above raises first, and moe_layer_flags has num_hidden_layers entries"
_LOGITS_2D = "every family's router returns 2-D logits [tokens, experts], so shape[1] is shape[-1]"

EQUIVALENT_MUTANTS: dict[str, str] = {
    # --- experts ---
    _NM + "xǁNonuniformExpertsMixinǁsave_pretrained__mutmut_1": _SAVE_FORMAT,
    _NM + "xǁNonuniformExpertsMixinǁsave_pretrained__mutmut_2": _SAVE_FORMAT,
    _NM + "xǁNonuniformExpertsMixinǁsave_pretrained__mutmut_3": _SAVE_FORMAT,
    _NM + "xǁNonuniformExpertsMixinǁsave_pretrained__mutmut_4": _SAVE_FORMAT,
    _NM + "xǁNonuniformExpertsMixinǁforward__mutmut_38": _LOGITS_2D,
    _NM + "xǁNonuniformExpertsMixinǁforward__mutmut_50": _LOGITS_2D,
    _NM + "xǁNonuniformExpertsMixinǁforward__mutmut_54": 'float("-INF") is float("-inf")',
    _NM + "xǁNonuniformExpertsConfigMixinǁcheck_experts_per_layer__mutmut_13": _STRICT,
    _NM + "xǁNonuniformExpertsConfigMixinǁcheck_experts_per_layer__mutmut_16": _STRICT,
    _NM + "xǁNonuniformExpertsConfigMixinǁcheck_experts_per_layer__mutmut_18": _STRICT,
    _SC + "x__causal_lm_loss__mutmut_10": _NO_CACHE,
    _SC + "x__causal_lm_loss__mutmut_13": _NO_CACHE,
    _SC + "x__causal_lm_loss__mutmut_14": _NO_CACHE,
    _SC + "x__causal_lm_loss__mutmut_30": "-100 is F.cross_entropy's default ignore_index",
    _SC + "x_diep_scores__mutmut_33": _GRAD_FLAG,
    _SC + "x_diep_scores__mutmut_36": _GRAD_FLAG,
    _SC + "x_diep_scores__mutmut_41": _GRAD_FLAG,
    _SC + "x_diep_scores__mutmut_48": _GRAD_FLAG,
    _SC + "x_diep_scores__mutmut_49": _GRAD_FLAG,
    _SC
    + "x_diep_scores__mutmut_67": "cache_moe_io keeps the same rows for every MoE layer, so all have the same count",
}
