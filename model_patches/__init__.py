"""Self-contained modeling files for models whose structure or forward pass no longer fits the stock class
(per-layer expert counts, token-pruning forwards). Each imports only torch, transformers, the standard
library and its sibling files (relative imports), so it can be copied next to a checkpoint as remote code.

Modeling files: one per group of families, each defining its ``hf_prune_<family>`` classes as plain class
statements (``class HfPruneLlamaConfig(PromptTokenPruningConfigMixin, LlamaConfig)``,
``class HfPruneLlamaForCausalLM(PromptTokenPruningMixin, LlamaForCausalLM)``): the names a checkpoint's
``auto_map`` and ``architectures`` hold are the names in the source. Importing a modeling file registers its
classes with the Auto classes. Each has the public tables ``FAMILIES`` (family -> stock class names) and
``CLASSES`` (family -> (config class, model class)).

- ``nonuniform_moe.py``: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE with a different expert count per layer
  (imports no sibling: it travels alone);
- ``prompt_token_pruning.py``: Llama, Qwen2, Mistral dropping prompt tokens inside the prefill;
- ``text_token_pruning.py``: BERT, RoBERTa, DistilBERT classifiers dropping tokens at a layer (AD-TP);
- ``visual_token_pruning.py``: LLaVA, LLaVA-NeXT dropping visual tokens;
- ``qwen2_vl_token_pruning.py``: Qwen2-VL, Qwen2.5-VL dropping visual tokens;
- ``card_deck.py``: a CARD-Deck, K image classifiers of one architecture as one ensemble (no ``FAMILIES``
  table: it wraps whatever architecture its members have).

Helper files, imported by name (public, documented API only) and copied along with the files that import
them: ``patch_classes.py`` (settings check, Auto registration, native-layout saving, cutting tokens out of
a batch), ``prompt_prefill.py`` and ``prompt_retainer.py`` (the pruned prefill and the learned retainer),
``visual_pruning_mixin.py`` (the model side shared by the two visual files), ``visual_token_scoring.py``
(its instruction relevance, FastV attention and per-group choice), ``token_selection.py`` (visual settings
and selection algorithms) and ``clip_relevance.py`` (CDPruner's CLIP text-tower relevance). A checkpoint
carries exactly its classes' modules and their relative imports, transitively (transformers'
``custom_object_save``); ``tests/checkpoints/test_carried_files.py`` checks it.

Depth pruning needs none: a ReplaceMe checkpoint is the stock architecture with fewer layers."""
