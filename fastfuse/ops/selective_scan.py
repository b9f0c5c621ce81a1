"""Public `selective_scan`: checks, backend dispatch and the op declaration.

The forward custom op returns three tensors: the output, the last state, and the chunk start
states (batch, D, ceil(L / chunk), N) that the Triton backward recomputes each chunk from (so no
per-step state is ever stored). Every backend returns all three so that one fake kernel fits all;
the reference's backward ignores the chunk states and differentiates the oracle instead.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastfuse import backends
from fastfuse._checks import FLOAT_DTYPES, check_same_device, check_tensor
from fastfuse.ops._define import define_op
from fastfuse.reference import selective_scan as reference

OP = "selective_scan"
MAX_D_STATE = 256
# Time steps between saved states: the Triton backward keeps one chunk of per-step states in a
# scratch buffer, so memory is ~(L / CHUNK + CHUNK)·N per channel; 64 balances both for L ≤ 4096.
CHUNK = 64

backends.register(OP, "torch", "fastfuse.reference.selective_scan:selective_scan_forward")
backends.register(OP, "triton", "fastfuse.triton.selective_scan:selective_scan_forward",
                  "fastfuse.triton.selective_scan:selective_scan_backward")
# 64-bit offsets throughout (kernels/selective_scan.cuh).
backends.register(OP, "cuda", "fastfuse.cuda.selective_scan:selective_scan_forward",
                  "fastfuse.cuda.selective_scan:selective_scan_backward", int64_indexing=True)
# "auto" keeps Triton ahead of the CUDA kernels until a GPU run has validated the CUDA path (so
# far it is tested only through the host-compiled block bodies); backend="cuda" selects it. The
# compile estimate (bench/results/2026-12-02_compile-model.md) cannot rank them: both stream the
# same bytes with the states in registers and neither spills in fp32 (the CUDA fp16/bf16 forward
# has a 32 B budget at sm_80).
backends.set_preference(OP, ("triton", "cuda", "torch"))


def _resolve(args, backend: str, numel: int) -> str:
    # float64 is the gradcheck path: "auto" keeps it in the float64 reference, since the kernels'
    # states are fp32. A kernel asked for by name still runs (fp32 states, float64 in and out).
    u = args[0]
    if backend == "auto" and u.dtype == torch.float64:
        backend = "torch"
    return backends.resolve(OP, backend, u.device, numel)


def _fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
    batch, dim, length = u.shape
    n_state = A.shape[1]
    dtype = reference.state_dtype(u.dtype)
    n_chunks = (length + chunk - 1) // chunk
    return (u.new_empty(u.shape), u.new_empty((batch, dim, n_state), dtype=dtype),
            u.new_empty((batch, dim, n_chunks, n_state), dtype=dtype))


# Outputs: out, last state, and the chunk start states, which only the backward reads.
@define_op(OP, differentiable=("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), fake=_fake,
           saved_outputs=(2,), resolve=_resolve)
def _selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                    delta_softplus: bool, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, backend: str = "auto"):
    """Mamba's selective scan, a drop-in for mamba-ssm's `selective_scan_fn`.

    u, delta, z: (batch, D, L); A: (D, N) with N ≤ 256, real; D, delta_bias: (D,). B and C each
    take any of mamba-ssm's layouts, independently of each other:
      (batch, N, L)      input-dependent, one group;
      (batch, G, N, L)   input-dependent, grouped: channel d reads group d // (D/G);
      (D, N)             constant over batch and time (mamba-ssm's is_variable_B/C = False).
    A constant B or C is passed to the kernels as a stride-0 view, and B and C whose group counts
    differ are both read per channel (G = D), so their gradients are computed at (batch, D, N, L)
    and reduced by autograd to the caller's shape: exact, but that gradient costs batch·D·N·L
    memory. mamba-ssm's complex-valued A (with B and C of length 2L) is not supported: a complex A
    is refused with a TypeError.

        delta ← softplus(delta + delta_bias)   (if delta_softplus; identity above 20)
        x_t = exp(delta_t·A) ⊙ x_{t-1} + delta_t·B_t·u_t,   y_t = C_t·x_t
        out = (y + D·u) · silu(z)

    Returns out (batch, D, L) in u's dtype, or (out, x_L) with return_last_state, x_L being
    (batch, D, N) in fp32 (float64 for float64 u). Differentiable in every tensor argument,
    x_L included. Dtypes: u, delta, z share one float dtype; B and C are u's dtype or fp32; A, D,
    delta_bias may be any float dtype and are used in fp32. States always accumulate in fp32.
    L = 0 gives an empty output and a zero last state.

    Range: states are fp32 for fp32/fp16/bf16 inputs, so a growing scan (A > 0) is exact while its
    states stay within fp32 (|x_t| < 3.4e38). The kernels step one time step at a time; the torch
    backend solves 16-step chunks in closed form, which can also overflow (to ±inf, never NaN)
    when one chunk's growth exp(Σ delta·A) exceeds ~1e38 while the state it multiplies is small
    and non-zero. Decaying scans (A ≤ 0, every Mamba model) have no such limit.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    B, C = _grouped_pair(u, B, C)
    out, last_state, _ = _selective_scan(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), CHUNK, backend)
    return (out, last_state) if return_last_state else out


def _check(u, delta, A, B, C, D, z, delta_bias) -> None:
    check_tensor(OP, "u", u, ndim=3)
    batch, dim, length = u.shape
    check_tensor(OP, "delta", delta, ndim=3, dtypes=(u.dtype,), shape=(batch, dim, length))
    if isinstance(A, torch.Tensor) and A.is_complex():
        raise TypeError(f"fastfuse.{OP}: A must be real; mamba-ssm's complex-valued A (with B and C of length 2L) "
                        f"is not supported, got dtype {str(A.dtype).replace('torch.', '')}")
    check_tensor(OP, "A", A, ndim=2, shape=(dim, None))
    n_state = A.shape[1]
    if not 1 <= n_state <= MAX_D_STATE:
        raise ValueError(f"fastfuse.{OP}: A must be (D, N) with 1 ≤ N ≤ {MAX_D_STATE} state dims, "
                         f"got shape {tuple(A.shape)}")
    bc_dtypes = tuple(dict.fromkeys((u.dtype, torch.float32)))
    for name, t in (("B", B), ("C", C)):
        _check_input_matrix(name, t, batch, dim, n_state, length, bc_dtypes)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_tensor(OP, name, t, ndim=1, dtypes=FLOAT_DTYPES, shape=(dim,))
    if z is not None:
        check_tensor(OP, "z", z, ndim=3, dtypes=(u.dtype,), shape=(batch, dim, length))
    check_same_device(OP, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def _check_input_matrix(name: str, t, batch: int, dim: int, n_state: int, length: int, dtypes) -> None:
    """B or C: (batch, N, L), (batch, G, N, L) with G dividing D, or constant (D, N)."""
    check_tensor(OP, name, t, ndim=(2, 3, 4), dtypes=dtypes)
    if t.dim() == 2:
        check_tensor(OP, name, t, shape=(dim, n_state))
    elif t.dim() == 3:
        check_tensor(OP, name, t, shape=(batch, n_state, length))
    else:
        check_tensor(OP, name, t, shape=(batch, None, n_state, length))
        groups = t.shape[1]
        if groups == 0 or dim % groups != 0:
            raise ValueError(f"fastfuse.{OP}: the number of groups G = {name}.shape[1] must divide D = {dim} "
                             f"(channel d reads group d // (D/G)), got {name} of shape {tuple(t.shape)}")


def _grouped(t: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The kernels' (batch, G, N, L) layout as a view: 3-D is G = 1, a constant (D, N) is G = D."""
    if t.dim() == 3:
        return t.unsqueeze(1)
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(-1).expand(batch, t.shape[0], t.shape[1], length)
    return t


def _grouped_pair(u: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B and C in one grouped layout; when their group counts differ, both are read per channel."""
    batch, dim, length = u.shape
    B, C = _grouped(B, batch, length), _grouped(C, batch, length)
    if B.shape[1] != C.shape[1]:
        B, C = _per_channel(B, dim), _per_channel(C, dim)
    if B.dtype != C.dtype:  # one u-dtype and one fp32: the kernels read both in one dtype
        B, C = B.float(), C.float()
    return B, C


def _per_channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, G, N, L) → (batch, D, N, L), channel d keeping group d // (D/G); a view when G = 1 or D."""
    batch, groups, n_state, length = t.shape
    if groups == dim:
        return t
    if groups == 1:
        return t.expand(batch, dim, n_state, length)
    return t.repeat_interleave(dim // groups, dim=1)
