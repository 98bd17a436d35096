"""Analysis of pruning masks: empirical graphons, distances between them, pruning-at-initialisation
scorers, and the Graphon NTK ("The Graphon Limit Hypothesis", arXiv 2510.17515). ``hf-prune graphon``
runs the study (``study.py``) or reads a pruned checkpoint's masks (``mask_sources.py``)."""

from .graphon import GraphonError, cut_distance, estimate_graphon, l2_distance
from .graphon_ntk import graphon_ntk, spectral_summary
from .mask_sources import masks_from_checkpoint, masks_from_state_file
from .pai_scorers import SCORERS, prune_at_init

__all__ = [
    "SCORERS",
    "GraphonError",
    "cut_distance",
    "estimate_graphon",
    "graphon_ntk",
    "l2_distance",
    "masks_from_checkpoint",
    "masks_from_state_file",
    "prune_at_init",
    "spectral_summary",
]
