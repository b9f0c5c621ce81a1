"""Public ops: argument checks, backend dispatch and torch.library registration, one module per family."""
