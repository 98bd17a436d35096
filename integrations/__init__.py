"""Glue to the rest of the Hugging Face stack: Trainer callbacks, peft healing, Hub publishing,
accelerate / torch.distributed helpers. Imports the core (``hf_prune``) but never the pipeline or CLI."""
