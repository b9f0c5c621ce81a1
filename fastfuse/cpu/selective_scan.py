"""cpu backend of selective_scan: launchers for the C++ kernels in csrc/cpu/selective_scan.cpp.

One sequential pass per (batch, channel) row with the N states in a stack array, vectorised over
the states; the backward re-runs each CHUNK-step chunk from the saved chunk start states and runs
the adjoint recurrence backwards through it, so no per-step state is stored beyond one chunk.
fp16/bf16 inputs are widened to fp32 (the scan is compute-bound: the copy is small next to it) and
the results narrowed back; states accumulate in fp32, or in float64 for float64 inputs.
Arguments are already checked by fastfuse.ops.selective_scan; B and C arrive grouped (batch, G, N, L).
"""
from __future__ import annotations

import torch

from fastfuse.cpu._extension import load
from fastfuse.reference.selective_scan import state_dtype, zero_gradients

_kernels = load("selective_scan")  # ImportError with the reason → the cpu backend is unavailable


def _compute(t, dtype):
    return None if t is None else t.to(dtype)


def _strides(t, ndim: int) -> list[int]:
    return list(t.stride()) if t is not None else [0] * ndim


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _problem(u, delta, A, B, C, D, z, delta_bias, chunk: int):
    """(sizes, pointers, strides, kept tensors) in the kernels' calling convention."""
    dtype = state_dtype(u.dtype)
    tensors = [_compute(t, dtype) for t in (u, delta, A, B, C, D, z, delta_bias)]
    batch, dim, length = u.shape
    sizes = [batch, dim, length, A.shape[1], B.shape[1], chunk]
    strides = []
    for t, ndim in zip(tensors, (3, 3, 2, 4, 4, 1, 3, 1)):
        strides += _strides(t, ndim)
    return sizes, [_ptr(t) for t in tensors], strides, tensors


def selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int):
    """(out in u's dtype, last state, chunk start states (batch, D, ceil(L / chunk), N))."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    sdtype = state_dtype(u.dtype)
    n_chunks = (length + chunk - 1) // chunk
    out = torch.empty((batch, dim, length), dtype=sdtype)
    last_state = torch.zeros((batch, dim, n_state), dtype=sdtype)
    chunk_states = torch.zeros((batch, dim, n_chunks, n_state), dtype=sdtype)
    if out.numel() == 0:
        return out.to(u.dtype), last_state, chunk_states
    sizes, ptrs, strides, _keep = _problem(u, delta, A, B, C, D, z, delta_bias, chunk)
    _kernels.forward(sizes, ptrs, strides, bool(delta_softplus), out.data_ptr(), last_state.data_ptr(),
                     chunk_states.data_ptr(), sdtype == torch.float64, torch.get_num_threads())
    return out.to(u.dtype), last_state, chunk_states


def selective_scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                            chunk: int, chunk_states):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); None for absent inputs."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B.shape[1]
    n_chunks = (length + chunk - 1) // chunk
    if chunk_states.shape != (batch, dim, n_chunks, n_state):
        raise ValueError(f"fastfuse.selective_scan: backward got chunk states of shape {tuple(chunk_states.shape)}, "
                         f"expected {(batch, dim, n_chunks, n_state)} for chunk={chunk}")
    if batch * dim * length == 0:  # nothing to scan: every gradient is zero (or empty)
        return zero_gradients(u, delta, A, B, C, D, z, delta_bias)
    sdtype = state_dtype(u.dtype)
    like = dict(dtype=sdtype)
    du = torch.empty((batch, dim, length), **like)
    ddelta = torch.empty((batch, dim, length), **like)
    dz = torch.empty((batch, dim, length), **like) if z is not None else None
    dB = torch.empty((batch, groups, n_state, length), **like)
    dC = torch.empty((batch, groups, n_state, length), **like)
    dA = torch.empty((batch, dim, n_state), **like)  # per-batch partials, summed below
    dD = torch.empty((batch, dim), **like)
    dbias = torch.empty((batch, dim), **like)
    sizes, ptrs, strides, _keep = _problem(u, delta, A, B, C, D, z, delta_bias, chunk)
    dout = dout.to(sdtype)
    dlast = (torch.zeros((batch, dim, n_state), **like) if dlast_state is None
             else dlast_state.to(sdtype).contiguous())
    states = chunk_states.to(sdtype).contiguous()
    grads = [du, ddelta, dz, dB, dC, dA, dD, dbias]
    _kernels.backward(sizes, ptrs, strides, bool(delta_softplus), dout.data_ptr(), list(dout.stride()),
                      dlast.data_ptr(), states.data_ptr(), [_ptr(t) for t in grads], sdtype == torch.float64,
                      torch.get_num_threads())
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None, dz.to(z.dtype) if z is not None else None,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None)


__all__ = ["selective_scan_forward", "selective_scan_backward"]
