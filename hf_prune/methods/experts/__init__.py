"""Expert pruning for mixture-of-experts models: remove routed experts, keep checkpoints loadable."""
