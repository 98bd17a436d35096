"""Surviving mutants that are *equivalent*: no input can tell them from the original code, so no test can
kill them. ``run_mutation.py`` leaves them out of the kill rate and names entries that no longer survive.

Key: mutmut's mutant name (``mutmut show NAME`` in the group's work folder prints the diff); value: why
it is equivalent, in a sentence. A mutant that a test *could* kill does not belong here: write the test.
"""

# depth: device-only mutants (a ``.to(device)`` or ``device=`` dropped or set to None). The mutation runs are
# CPU-only, where no input can tell them from the original; a run with an accelerator could.
_CPU_ONLY = (
    "device placement only: in a CPU-only run every tensor is already on the CPU, so None (or no device) "
    "and the given device are the same"
)

EQUIVALENT_MUTANTS: dict[str, str] = {
    # --- depth ---
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁ__init____mutmut_7": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁ__init____mutmut_11": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁ__init____mutmut_16": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁ__init____mutmut_20": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁ__init____mutmut_24": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁ__init____mutmut_27": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁadd__mutmut_2": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁadd__mutmut_4": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁadd__mutmut_7": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁadd__mutmut_9": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.x_fit_cosine_map__mutmut_10": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.x_fit_cosine_map__mutmut_13": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.x_fit_cosine_map__mutmut_49": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.x_fit_cosine_map__mutmut_51": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.x_fit_cosine_map__mutmut_54": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.x_fit_cosine_map__mutmut_56": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.x_fit_cosine_map__mutmut_61": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.x_fit_cosine_map__mutmut_63": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.x_fit_cosine_map__mutmut_76": (
        "cosine_similarity's default dim is 1, the last dim of the 2-D [tokens, d] batches it always gets"
    ),
    "hf_prune.methods.depth.estimators.x_fit_cosine_map__mutmut_77": (
        "dim=+1 is dim=1, the last dim of the 2-D [tokens, d] batches it always gets"
    ),
    "hf_prune.methods.depth.estimators.x_fit_cosine_map__mutmut_79": (
        "zero_grad with set_to_none falsy zeroes the gradient in place instead of dropping it: backward "
        "writes the same gradient and Adam sees the same values"
    ),
    "hf_prune.methods.depth.estimators.x_fit_cosine_map__mutmut_80": (
        "zero_grad with set_to_none falsy zeroes the gradient in place instead of dropping it: backward "
        "writes the same gradient and Adam sees the same values"
    ),
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁsolve__mutmut_3": (
        "MᵀM is square: shape[1] == shape[0]"
    ),
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁsolve__mutmut_6": (
        "a float32 identity added to the float64 MᵀM is promoted exactly (0 and 1 are exact): the same sum"
    ),
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁsolve__mutmut_7": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁall_reduce__mutmut_6": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁsolve__mutmut_9": (
        "a float32 identity added to the float64 MᵀM is promoted exactly (0 and 1 are exact): the same sum"
    ),
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁsolve__mutmut_10": _CPU_ONLY,
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁall_reduce__mutmut_8": (
        "without a dtype the token count is an int64 tensor, which all_reduce sums exactly, as float64 does "
        "for any realistic count"
    ),
    "hf_prune.methods.depth.estimators.xǁNormalEquationsǁall_reduce__mutmut_9": _CPU_ONLY,
    "hf_prune.methods.depth.cuts.xǁDepthCutConfigǁcheck_model__mutmut_1": (
        "the base check_model reads only the adapter (its unsupported_reason), never model_config"
    ),
    "hf_prune.methods.depth.cuts.xǁDepthCutConfigǁpredict_config__mutmut_8": (
        "kept is filtered from range(total), so any last >= total - 1 removes the same layers"
    ),
    "hf_prune.methods.depth.cuts.x_angular_distances__mutmut_43": _CPU_ONLY,
    "hf_prune.methods.depth.cuts.x_angular_distances__mutmut_55": _CPU_ONLY,
    "hf_prune.methods.depth.cuts.x_angular_distances__mutmut_57": _CPU_ONLY,
    "hf_prune.methods.depth.cuts.x_angular_distances__mutmut_72": (
        "cosine_similarity's default dim is 1, the last dim of the 2-D [tokens, d] states it always gets"
    ),
    "hf_prune.methods.depth.cuts.x_angular_distances__mutmut_74": (
        "dim=+1 is dim=1, the last dim of the 2-D [tokens, d] states it always gets"
    ),
    "hf_prune.methods.depth.cuts.x_angular_distances__mutmut_89": (
        "every layer's states have the same rows (the same tokens), so states[1] counts what states[0] does"
    ),
    "hf_prune.methods.depth.replaceme.x_estimate_map__mutmut_16": _CPU_ONLY,
    "hf_prune.methods.depth.replaceme.x_estimate_map__mutmut_20": _CPU_ONLY,
    "hf_prune.methods.depth.replaceme.x_estimate_map__mutmut_22": _CPU_ONLY,
    "hf_prune.methods.depth.replaceme.x_estimate_map__mutmut_51": _CPU_ONLY,
    "hf_prune.methods.depth.replaceme.x_estimate_map__mutmut_65": (
        "with y float64 the float32 target is promoted exactly before the subtraction: the same difference"
    ),
    "hf_prune.methods.depth.replaceme.x_estimate_map__mutmut_66": (
        "with the target float64 the float32 y is promoted exactly before the subtraction: the same "
        "difference"
    ),
    "hf_prune.methods.depth.replaceme.x_estimate_map__mutmut_100": _CPU_ONLY,
    "hf_prune.methods.depth.replaceme.x_estimate_map__mutmut_109": _CPU_ONLY,
    "hf_prune.methods.depth.replaceme.x_estimate_map__mutmut_127": (
        "squared_error casts the map to the float64 sums first, and a float32 identity converts exactly"
    ),
    "hf_prune.methods.depth.replaceme.x_estimate_map__mutmut_129": (
        "squared_error casts the map to the float64 sums first, and a float32 identity converts exactly"
    ),
}
