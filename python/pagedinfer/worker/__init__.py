"""The data plane: the model, its KV cache, input tensors and sampling, one scheduled step at a time."""
