"""CUDA backend of selective_scan: kernels/selective_scan.cuh through fastfuse._C (see csrc/selective_scan.cu).

Semantics are fastfuse.reference.selective_scan's; the custom op (fastfuse.ops.selective_scan)
calls these two functions with B and C already in the grouped (batch, G, N, L) layout.

Inputs are float32, float16 or bfloat16 (states and accumulation in fp32). float64, the gradcheck
path that "auto" keeps in the torch reference, is refused with a clear error: it is not compiled
into the extension (one dtype pair fewer for the 4-arch build).

The kernels take contiguous tensors, so inputs that are not contiguous are copied here (one
pass each, on the GPU): u, delta, z, dout in their dtype; B and C in their dtype (fp32 B/C with
fp16/bf16 u is read as fp32, not rounded); A, D, delta_bias, the states and dlast_state in fp32.
The backward
allocates an fp32 scratch of blocks × min(chunk, L) × k × 128 states (k = states per thread) for
the per-step states of one chunk, and per-batch partials of dA, dD and ddelta_bias that are
summed over the batch here, so those three are deterministic; dB and dC are fp32 atomic sums only
when one group's channels span several thread blocks.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastfuse.cuda import DTYPE_CODES, extension, on_device, require_cuda
from fastfuse.reference.selective_scan import state_dtype, zero_gradients

MAX_D_STATE = 256
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# kernels/selective_scan.cuh: kMaxTile, kMaxSharedBytes.
MAX_TILE = 32
MAX_SHARED_BYTES = 48 * 1024
# The time loop is sequential, so parallelism comes from (channel, state) pairs: two states per
# thread (as the Triton config) doubles the threads in flight at mamba's batch 2 × 1536 channels
# over four, and halves the per-step shuffles of the dB/dC channel sums. A choice by reasoning,
# not measurement (no GPU run yet).
TARGET_STATES_PER_THREAD = 2


def threads_per_channel(n_state: int) -> int:
    """Threads sharing one channel's N states: about TARGET_STATES_PER_THREAD states each, a power
    of two up to a warp; 256 states give 8 per thread, the kernels' cap."""
    want = -(-n_state // TARGET_STATES_PER_THREAD)
    nt = 1
    while nt < want and nt < 32:
        nt *= 2
    return nt


def shared_elements(n_state: int, channels_per_block: int, tile: int, backward: bool) -> int:
    """Must match kernels/selective_scan.cuh: shared_elements."""
    return tile * (4 * n_state + 7 * channels_per_block if backward else 2 * n_state + 4 * channels_per_block)


def tile_length(n_state: int, nt: int, threads: int, acc_bytes: int, backward: bool) -> int:
    """The longest tile (power of two <= MAX_TILE) whose shared memory fits the default 48 KB."""
    tile = MAX_TILE
    while tile > 1 and shared_elements(n_state, threads // nt, tile, backward) * acc_bytes > MAX_SHARED_BYTES:
        tile //= 2
    return tile


def _check(fn: str, u, delta, A, B, C, D, z, delta_bias, chunk: int) -> None:
    # The kernels trust these sizes when indexing: a mismatch must fail here, not read out of bounds.
    def fail(what: str):
        raise ValueError(f"fastfuse.cuda.{fn}: {what}")

    if u.dtype not in KERNEL_DTYPES:
        raise TypeError(f"fastfuse.cuda.{fn}: u must be float32, float16 or bfloat16 for the cuda kernels, got "
                        f"{str(u.dtype).replace('torch.', '')} (float64 runs on the 'torch' backend)")
    if u.dim() != 3:
        fail(f"u must be (batch, D, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape or delta.dtype != u.dtype:
        fail(f"delta must match u ({tuple(u.shape)}, {u.dtype}), got {tuple(delta.shape)}, {delta.dtype}")
    if A.dim() != 2 or A.shape[0] != dim or not 1 <= A.shape[1] <= MAX_D_STATE:
        fail(f"A must be (D={dim}, N) with 1 <= N <= {MAX_D_STATE}, got shape {tuple(A.shape)}")
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2:] != (n_state, length):
            fail(f"{name} must be (batch={batch}, G, N={n_state}, L={length}), got shape {tuple(t.shape)}")
        if t.dtype not in (u.dtype, torch.float32):
            fail(f"{name} must have u's dtype ({u.dtype}) or float32, got {t.dtype}")
    groups = B.shape[1]
    if C.shape != B.shape or groups == 0 or dim % groups:
        fail(f"B and C must be one shape with G dividing D={dim}, got {tuple(B.shape)} and {tuple(C.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            fail(f"{name} must have shape ({dim},), got {tuple(t.shape)}")
    if z is not None and (z.shape != u.shape or z.dtype != u.dtype):
        fail(f"z must match u ({tuple(u.shape)}, {u.dtype}), got {tuple(z.shape)}, {z.dtype}")
    if int(chunk) < 1:
        fail(f"chunk must be >= 1, got {chunk}")


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """Contiguous kernel inputs; returns them with the accumulation dtype and the B/C dtype code."""
    acc = state_dtype(u.dtype)
    bc_dtype = u.dtype if B.dtype == u.dtype and C.dtype == u.dtype else torch.float32
    prepared = dict(
        u=u.contiguous(), delta=delta.contiguous(),
        A=A.to(acc).contiguous(), B=B.to(bc_dtype).contiguous(), C=C.to(bc_dtype).contiguous(),
        D=None if D is None else D.to(acc).contiguous(), z=None if z is None else z.contiguous(),
        delta_bias=None if delta_bias is None else delta_bias.to(acc).contiguous())
    return prepared, acc, DTYPE_CODES[bc_dtype]


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int):
    """(out, last state, chunk start states) for B, C in the grouped (batch, G, N, L) layout."""
    fn = "selective_scan_forward"
    ext = extension()
    present = {k: v for k, v in dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias).items()
               if v is not None}
    device = require_cuda(fn, **present)
    _check(fn, u, delta, A, B, C, D, z, delta_bias, chunk)
    batch, dim, length = u.shape
    n_state, groups = A.shape[1], B.shape[1]
    n_chunks = -(-length // chunk)
    acc = state_dtype(u.dtype)
    out = torch.empty((batch, dim, length), dtype=u.dtype, device=device)
    last_state = torch.zeros((batch, dim, n_state), dtype=acc, device=device)
    chunk_states = torch.empty((batch, dim, n_chunks, n_state), dtype=acc, device=device)
    if out.numel() == 0:
        return out, last_state, chunk_states
    t, acc, bc_code = _prepare(u, delta, A, B, C, D, z, delta_bias)
    nt = threads_per_channel(n_state)
    threads = ext.selective_scan_plan(batch, dim, length, n_state, groups, chunk, nt)["threads"]
    tile = tile_length(n_state, nt, threads, acc.itemsize, backward=False)
    with on_device(device) as stream:
        ext.selective_scan_forward(
            _ptr(t["u"]), _ptr(t["delta"]), _ptr(t["A"]), _ptr(t["B"]), _ptr(t["C"]), _ptr(t["D"]), _ptr(t["z"]),
            _ptr(t["delta_bias"]), out.data_ptr(), last_state.data_ptr(), chunk_states.data_ptr(),
            batch, dim, length, n_state, groups, int(chunk), nt, tile, DTYPE_CODES[u.dtype], bc_code,
            bool(delta_softplus), stream)
    return out, last_state, chunk_states


def selective_scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                            chunk: int, chunk_states):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its input's dtype; None for
    absent inputs."""
    fn = "selective_scan_backward"
    ext = extension()
    present = {k: v for k, v in dict(dout=dout, dlast_state=dlast_state, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z,
                                     delta_bias=delta_bias, chunk_states=chunk_states).items() if v is not None}
    device = require_cuda(fn, **present)
    _check(fn, u, delta, A, B, C, D, z, delta_bias, chunk)
    batch, dim, length = u.shape
    n_state, groups = A.shape[1], B.shape[1]
    n_chunks = -(-length // chunk)
    if dout.shape != u.shape:
        raise ValueError(f"fastfuse.cuda.{fn}: dout must have u's shape {tuple(u.shape)}, got {tuple(dout.shape)}")
    if dlast_state.shape != (batch, dim, n_state):
        raise ValueError(f"fastfuse.cuda.{fn}: dlast_state must have shape {(batch, dim, n_state)}, "
                         f"got {tuple(dlast_state.shape)}")
    if chunk_states.shape != (batch, dim, n_chunks, n_state):
        raise ValueError(f"fastfuse.cuda.{fn}: chunk_states must have shape {(batch, dim, n_chunks, n_state)} "
                         f"for chunk={chunk}, got {tuple(chunk_states.shape)}")
    if batch * dim * length == 0:  # nothing to scan: every gradient is zero (or empty)
        return zero_gradients(u, delta, A, B, C, D, z, delta_bias)
    t, acc, bc_code = _prepare(u, delta, A, B, C, D, z, delta_bias)
    # The gradient of a reduction arrives expanded (stride 0): the kernel reads it densely.
    dout = dout.to(u.dtype).contiguous()
    dlast_state = dlast_state.to(acc).contiguous()
    chunk_states = chunk_states.to(acc).contiguous()
    nt = threads_per_channel(n_state)
    plan = ext.selective_scan_plan(batch, dim, length, n_state, groups, chunk, nt)
    tile = tile_length(n_state, nt, plan["threads"], acc.itemsize, backward=True)
    opts = dict(dtype=acc, device=device)
    du = torch.empty((batch, dim, length), dtype=u.dtype, device=device)
    ddelta = torch.empty((batch, dim, length), dtype=u.dtype, device=device)
    dz = torch.empty((batch, dim, length), dtype=u.dtype, device=device) if z is not None else None
    # Every element is written exactly once, except dB/dC when several blocks add into them.
    bc_alloc = torch.zeros if plan["accumulate_bc"] else torch.empty
    dB = bc_alloc((batch, groups, n_state, length), **opts)
    dC = bc_alloc((batch, groups, n_state, length), **opts)
    dA = torch.empty((batch, dim, n_state), **opts)
    dD = torch.empty((batch, dim), **opts)
    dbias = torch.empty((batch, dim), **opts)
    scratch = torch.empty((plan["scratch_elements"],), **opts)
    with on_device(device) as stream:
        ext.selective_scan_backward(
            dout.data_ptr(), dlast_state.data_ptr(), _ptr(t["u"]), _ptr(t["delta"]), _ptr(t["A"]), _ptr(t["B"]),
            _ptr(t["C"]), _ptr(t["D"]), _ptr(t["z"]), _ptr(t["delta_bias"]), chunk_states.data_ptr(),
            scratch.data_ptr(), du.data_ptr(), ddelta.data_ptr(), _ptr(dz), dB.data_ptr(), dC.data_ptr(),
            dA.data_ptr(), dD.data_ptr(), dbias.data_ptr(), batch, dim, length, n_state, groups, int(chunk), nt, tile,
            DTYPE_CODES[u.dtype], bc_code, bool(delta_softplus), stream)
    return (du, ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None, dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None)
