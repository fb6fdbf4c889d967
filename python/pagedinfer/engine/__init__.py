"""The control plane: requests and sequences, the block manager and the scheduler (plain Python, no
torch.cuda, no `_ops`), and the step loop that drives the model runner."""
