"""Pure-PyTorch oracles of every op: readable, float64-capable, differentiable, the CPU fallback."""
