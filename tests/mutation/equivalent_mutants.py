"""Surviving mutants that are *equivalent*: no input can tell them from the original code, so no test can
kill them. ``run_mutation.py`` leaves them out of the kill rate and names entries that no longer survive.

Key: mutmut's mutant name (``mutmut show NAME`` in the group's work folder prints the diff); value: why
it is equivalent, in a sentence. A mutant that a test *could* kill does not belong here: write the test.
"""

EQUIVALENT_MUTANTS: dict[str, str] = {
    # --- visual ---
    "hf_prune.model_patches.token_selection.x_instruction_relevance__mutmut_1": (
        'the default sign becomes another string than "negative", which is treated as "positive" all the '
        "same."
    ),
    "hf_prune.model_patches.token_selection.x_instruction_relevance__mutmut_2": (
        'the default sign becomes another string than "negative", which is treated as "positive" all the '
        "same."
    ),
    "hf_prune.model_patches.token_selection.x_instruction_relevance__mutmut_17": (
        "the features are 2-D ([N, D]) by contract, "
        "so normalising along dim 1 (the default) is normalising along dim -1."
    ),
    "hf_prune.model_patches.token_selection.x_instruction_relevance__mutmut_18": (
        "the features are 2-D ([N, D]) by contract, so normalising along dim +1 is normalising along dim -1."
    ),
    "hf_prune.model_patches.token_selection.x_instruction_relevance__mutmut_23": (
        "the instruction embeddings are 2-D ([M, D]) by contract, "
        "so normalising along dim 1 (the default) is normalising along dim -1."
    ),
    "hf_prune.model_patches.token_selection.x_instruction_relevance__mutmut_24": (
        "the instruction embeddings are 2-D ([M, D]) by contract, "
        "so normalising along dim +1 is normalising along dim -1."
    ),
    "hf_prune.model_patches.token_selection.x_instruction_relevance__mutmut_27": (
        "dividing by the sign (±1) is multiplying by it."
    ),
    "hf_prune.model_patches.token_selection.x_instruction_relevance__mutmut_29": (
        "the cosine matrix is 2-D [N, M], so its dim +1 is its dim -1."
    ),
    "hf_prune.model_patches.token_selection.x_instruction_relevance__mutmut_34": (
        "the negated relevance scaled by 2 before the min-max normalisation, which removes any positive "
        "scale."
    ),
    "hf_prune.model_patches.token_selection.x_instruction_relevance__mutmut_38": (
        "the relevance scaled by 2 before the min-max normalisation, which removes any positive scale."
    ),
    "hf_prune.model_patches.token_selection.x_pool_grid__mutmut_10": (
        "range(1, count + 2) adds only h = count + 1, which never divides count."
    ),
    "hf_prune.model_patches.token_selection.x_pool_grid__mutmut_32": (
        "rounding the aspect distance to 10 instead of 9 digits: distinct grid shapes differ by far more, "
        "exact ties by float round-off of about 1e-16, so both merge the same ties."
    ),
    "hf_prune.model_patches.token_selection.x_pool_grid__mutmut_39": (
        "adaptive_avg_pool2d pools an unbatched [C, H, W] input exactly like the [1, C, H, W] one."
    ),
    "hf_prune.model_patches.visual_token_scoring.xǁVisualTokenScoringǁ_instruction_ids__mutmut_43": (
        "ending an instruction at the next image's second placeholder instead of its first adds only image "
        "positions, which the text mask drops."
    ),
    "hf_prune.model_patches.visual_token_scoring.xǁVisualTokenScoringǁ_fastv_received__mutmut_35": (
        "use_cache=None: the scoring pass stops (by exception) inside the scoring layer, and a cache, built "
        "or not, changes no attention weight there."
    ),
    "hf_prune.model_patches.visual_token_scoring.xǁVisualTokenScoringǁ_fastv_received__mutmut_39": (
        "without use_cache the config's default applies: the scoring pass stops (by exception) inside the "
        "scoring layer, and a cache, built or not, changes no attention weight there."
    ),
    "hf_prune.model_patches.visual_token_scoring.xǁVisualTokenScoringǁ_fastv_received__mutmut_40": (
        "use_cache=True: the scoring pass stops (by exception) inside the scoring layer, and a cache, built "
        "or not, changes no attention weight there."
    ),
    "hf_prune.model_patches.clip_relevance.x_build_relevance_modules__mutmut_4": (
        "CLIPTextConfig.from_dict takes a model_type key as a plain attribute that nothing reads, so keeping "
        "it changes no module."
    ),
    "hf_prune.model_patches.clip_relevance.x_build_relevance_modules__mutmut_5": (
        "CLIPTextConfig.from_dict takes a model_type key as a plain attribute that nothing reads, so keeping "
        "it changes no module."
    ),
    "hf_prune.model_patches.clip_relevance.x_build_relevance_modules__mutmut_10": (
        "nn.Linear(bias=None) builds no bias, as bias=False does."
    ),
}
