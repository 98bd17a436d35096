"""Engines that run calibration-based methods: in memory (the default when the model fits), layer by layer
from the checkpoint's files (``engine: sequential``), and data-parallel over processes.

- ``layers``: ``OffloadedModel`` (weights stay on disk, accelerate's offload), ``InMemoryModel`` and
  ``LayerRunner`` (calibration activations carried from one decoder layer to the next).
- ``activation_store``: activations in memory up to a budget, spilled to checksummed files beyond it.
- ``writer``: the pruned checkpoint written shard by shard.
- ``distributed``: calibration batches sharded over ``torch.distributed`` processes, sums all-reduced.
- ``checkpoint_files``: a sharded checkpoint's index and shards checked before any is read.
- ``sequential``: the pipeline of ``engine: sequential`` and the engine choice of ``engine: auto``.
"""
