"""Self-contained modeling files, one per architecture family, for models whose structure or forward
pass no longer fits the stock class (per-layer expert counts, token-pruning forwards). Each file imports
only torch and transformers, so it can be copied next to a checkpoint as remote code.

Depth pruning needs none: a ReplaceMe checkpoint is the stock architecture with fewer layers."""
