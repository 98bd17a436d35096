"""Token pruning: fewer tokens through the model, the weights unchanged."""
