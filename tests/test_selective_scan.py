import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastfuse
from fastfuse import backends
import fastfuse.ops.selective_scan as scan_ops
import fastfuse.reference.selective_scan as reference_module
from fastfuse.reference.selective_scan import selective_scan as reference_scan
from testing_utils import DTYPES, TOLERANCES, backend_params, non_contiguous

F64 = torch.float64
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Independent oracle: the recurrence one time step at a time, in float64, B/C copied per channel."""
    u, delta, A = u.double(), delta.double(), A.double()
    batch, dim, length = u.shape
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    per_group = dim // B.shape[1]
    Bd = B.double().repeat_interleave(per_group, dim=1)  # (batch, D, N, L)
    Cd = C.double().repeat_interleave(per_group, dim=1)
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = torch.where(delta <= 20, torch.log1p(torch.exp(delta)), delta)
    x = torch.zeros(batch, dim, A.shape[1], dtype=F64)
    ys = []
    for t in range(length):
        x = torch.exp(delta[:, :, t, None] * A) * x + delta[:, :, t, None] * Bd[..., t] * u[:, :, t, None]
        ys.append((x * Cd[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * z.double() * torch.sigmoid(z.double())
    return y, x


def make_case(batch, dim, length, n_state, groups=None, *, seed=0, has_D=True, has_z=True, has_bias=True,
              softplus=True):
    """float64 inputs shaped like mamba-ssm's tests; groups=None gives the ungrouped (batch, N, L) B/C."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=F64)

    bc = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    return dict(
        u=randn(batch, dim, length),
        # With softplus, raw delta of both signs; without, a positive step as a model would feed.
        delta=randn(batch, dim, length) - 1.0 if softplus else 0.5 * rand(batch, dim, length),
        A=-(0.05 + 1.5 * rand(dim, n_state)),
        B=randn(*bc), C=randn(*bc),
        D=randn(dim) if has_D else None,
        z=randn(batch, dim, length) if has_z else None,
        delta_bias=0.5 * rand(dim) if has_bias else None,
    )


# ------------------------------------------------------------------------------- the reference
REFERENCE_CONFIGS = [
    # batch, dim, L, N, groups, D, z, bias, softplus
    (2, 4, 1, 3, None, False, False, False, False),
    (2, 4, 17, 3, None, True, True, True, True),
    (1, 8, 50, 4, 1, True, False, True, False),
    (2, 8, 33, 5, 2, False, True, False, True),
    (1, 8, 70, 2, 4, True, True, True, True),
    (3, 6, 130, 1, 3, True, True, True, True),
    # Long sequences of the grid: many chunks of the closed form chained together.
    (1, 4, 2049, 4, 2, True, True, True, True),
    (1, 2, 4100, 2, None, True, False, True, True),
]


@pytest.mark.parametrize("cfg", REFERENCE_CONFIGS,
                         ids=lambda c: "b{}-d{}-L{}-N{}-G{}-D{:d}z{:d}bias{:d}sp{:d}".format(*c))
def test_reference_matches_naive_loop(cfg):
    batch, dim, length, n_state, groups, has_D, has_z, has_bias, softplus = cfg
    case = make_case(batch, dim, length, n_state, groups, has_D=has_D, has_z=has_z, has_bias=has_bias,
                     softplus=softplus)
    out, last = reference_scan(**case, delta_softplus=softplus, return_last_state=True)
    want_out, want_last = naive_scan(**case, delta_softplus=softplus)
    assert out.dtype == F64 and last.dtype == F64 and last.shape == (batch, dim, n_state)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, want_last, rtol=1e-10, atol=1e-10)
    public = fastfuse.selective_scan(**case, delta_softplus=softplus, backend="torch")
    torch.testing.assert_close(public, want_out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_half_inputs_compute_in_fp32(dtype):
    case = make_case(2, 4, 40, 4, 2)
    low = {k: (v.to(dtype) if k in ("u", "delta", "z", "B", "C") else v.float()) if v is not None else None
           for k, v in case.items()}
    out, last = reference_scan(**low, delta_softplus=True, return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    want_out, want_last = naive_scan(**low, delta_softplus=True)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), want_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(last.double(), want_last, rtol=6e-4, atol=2e-3)


def test_reference_gradcheck(monkeypatch):
    # 4-step chunks: L = 7 crosses a chunk boundary, so the carried state is checked too.
    monkeypatch.setattr(reference_module, "MAX_CHUNK", 4)
    case = make_case(1, 2, 7, 2, 2)
    keys = list(case)

    def fn(*tensors):
        out, last = reference_scan(**dict(zip(keys, tensors)), delta_softplus=True, return_last_state=True)
        return out, last

    inputs = tuple(v.clone().requires_grad_(True) for v in case.values())
    assert torch.autograd.gradcheck(fn, inputs)


def test_reference_strong_decay_stays_finite():
    # delta·A down to −500 per step: the segment form must never exponentiate a positive sum.
    case = make_case(1, 4, 40, 4, None, softplus=False)
    case["delta"] = case["delta"] * 100
    case["A"] = case["A"] * 10
    inputs = {k: v.clone().requires_grad_(True) for k, v in case.items()}
    out, last = reference_scan(**inputs, return_last_state=True)
    want_out, want_last = naive_scan(**case)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    (out.sum() + last.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs.values())


def test_reference_real_size_cpu_fallback():
    """The CPU fallback at a real size (1 × 64 × 4096 × 16) runs chunked, matching the step loop."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(1, 64, 4096, generator=g)
    delta = 0.5 * torch.rand(1, 64, 4096, generator=g)
    A = -torch.rand(64, 16, generator=g)
    B = torch.randn(1, 16, 4096, generator=g)
    C = torch.randn(1, 16, 4096, generator=g)
    out, last = fastfuse.selective_scan(u, delta, A, B, C, return_last_state=True, backend="torch")
    assert out.shape == (1, 64, 4096) and torch.isfinite(out).all()
    # Channels are independent: the step loop checks a slice of them, at 1/8 of its cost.
    want_out, want_last = naive_scan(u[:, ::8], delta[:, ::8], A[::8], B, C)
    torch.testing.assert_close(out[:, ::8].double(), want_out, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last[:, ::8].double(), want_last, rtol=6e-4, atol=2e-3)


# --------------------------------------------------------------------------- the public op
def test_bad_inputs():
    b, d, L, N = 2, 4, 8, 3
    u, delta = torch.randn(b, d, L), torch.rand(b, d, L)
    A, B, C = -torch.rand(d, N), torch.randn(b, N, L), torch.randn(b, N, L)
    scan = fastfuse.selective_scan
    with pytest.raises(ValueError, match="u must be 3-D"):
        scan(u[0], delta[0], A, B, C)
    with pytest.raises(ValueError, match=r"delta must have shape \(2, 4, 8\)"):
        scan(u, delta[:, :, :5], A, B, C)
    with pytest.raises(ValueError, match=r"A must have shape \(4, \*\)"):
        scan(u, delta, -torch.rand(5, N), B, C)
    with pytest.raises(ValueError, match="N ≤ 256"):
        scan(u, delta, -torch.rand(d, 257), torch.randn(b, 257, L), torch.randn(b, 257, L))
    with pytest.raises(ValueError, match="1 ≤ N"):
        scan(u, delta, -torch.rand(d, 0), torch.randn(b, 0, L), torch.randn(b, 0, L))
    with pytest.raises(ValueError, match=r"B must have shape \(2, 3, 8\)"):
        scan(u, delta, A, torch.randn(b, N, L + 1), C)  # mismatched L
    with pytest.raises(ValueError, match="B must be 2-D or 3-D or 4-D"):
        scan(u, delta, A, B[0, 0], C)
    with pytest.raises(ValueError, match=r"B must have shape \(4, 3\)"):  # a constant B is (D, N)
        scan(u, delta, A, B[0], C)
    with pytest.raises(TypeError, match="A must be real; mamba-ssm's complex-valued A"):
        scan(u, delta, torch.complex(A, A), torch.randn(b, N, 2 * L), torch.randn(b, N, 2 * L))
    with pytest.raises(ValueError, match=r"C must have shape \(2, 3, 8\)"):
        scan(u, delta, A, B, torch.randn(b, N, L - 1))
    with pytest.raises(ValueError, match="must divide D = 4"):
        scan(u, delta, A, torch.randn(b, 3, N, L), torch.randn(b, 3, N, L))
    with pytest.raises(TypeError, match="delta must have dtype in \\(float32\\)"):
        scan(u, delta.half(), A, B, C)
    with pytest.raises(TypeError, match="B must have dtype in \\(float16, float32\\)"):
        scan(u.half(), delta.half(), A, B.double(), C)
    with pytest.raises(TypeError, match="u must have dtype"):
        scan(u.long(), delta.long(), A, B, C)
    with pytest.raises(ValueError, match=r"D must have shape \(4\)"):
        scan(u, delta, A, B, C, D=torch.ones(5))
    with pytest.raises(ValueError, match=r"z must have shape \(2, 4, 8\)"):
        scan(u, delta, A, B, C, z=torch.randn(b, d, L + 1))
    with pytest.raises(ValueError, match="delta_bias must be 1-D"):
        scan(u, delta, A, B, C, delta_bias=torch.ones(1, d))
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        scan(u, delta, [[-1.0]], B, C)
    with pytest.raises(ValueError, match="one device; u is on cpu but B is on meta"):
        scan(u, delta, A, B.to("meta"), C)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: the cuda backend needs CUDA tensors"):
            scan(u, delta, A, B, C, backend="cuda")


def test_empty_and_single_step():
    u, delta = torch.randn(2, 4, 0, requires_grad=True), torch.rand(2, 4, 0, requires_grad=True)
    A = (-torch.rand(4, 3)).requires_grad_(True)
    B, C = torch.randn(2, 3, 0), torch.randn(2, 3, 0)
    out, last = fastfuse.selective_scan(u, delta, A, B, C, return_last_state=True)
    assert out.shape == (2, 4, 0) and last.shape == (2, 4, 3) and (last == 0).all()
    (out.sum() + last.sum()).backward()
    assert A.grad is not None and (A.grad == 0).all()
    empty_batch = fastfuse.selective_scan(torch.randn(0, 4, 5), torch.rand(0, 4, 5), A.detach(),
                                          torch.randn(0, 2, 3, 5), torch.randn(0, 2, 3, 5))
    assert empty_batch.shape == (0, 4, 5)
    case = make_case(2, 4, 1, 3, 2)
    out, last = fastfuse.selective_scan(**case, delta_softplus=True, return_last_state=True, backend="torch")
    want_out, want_last = naive_scan(**case, delta_softplus=True)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(last, want_last)


def test_last_state_is_differentiable():
    case = make_case(1, 4, 20, 3, 2)
    inputs = {k: v.clone().requires_grad_(True) for k, v in case.items()}
    _, last = fastfuse.selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="torch")
    last.pow(2).sum().backward()
    ref = {k: v.clone().requires_grad_(True) for k, v in case.items()}
    _, ref_last = naive_scan(**ref, delta_softplus=True)
    ref_last.pow(2).sum().backward()
    for name in ("u", "delta", "A", "B", "delta_bias"):
        torch.testing.assert_close(inputs[name].grad, ref[name].grad, msg=name)
    assert all((inputs[name].grad == 0).all() for name in ("C", "z", "D"))  # they only reach y


def test_custom_op_opcheck():
    case = make_case(2, 4, 10, 3, 2)
    args = tuple(case[k].float().requires_grad_(True) for k in NAMES)
    torch.library.opcheck(torch.ops.fastfuse.selective_scan.default, (*args, True, 4, "torch"))


def test_torch_compile_fullgraph():
    case = make_case(2, 4, 12, 3, 2)
    inputs = [case[k].float().requires_grad_(True) for k in NAMES]

    def loss(*tensors):
        out, last = fastfuse.selective_scan(*tensors, delta_softplus=True, return_last_state=True)
        return out.square().sum() + last.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(*inputs)
    grads = torch.autograd.grad(value, inputs)
    expected = torch.autograd.grad(loss(*inputs), inputs)
    for name, got, want in zip(NAMES, grads, expected):
        torch.testing.assert_close(got, want, msg=name)


def test_flop_counter_sees_one_op():
    """FlopCounterMode sees torch.ops.fastfuse.selective_scan as one op (with the formula given
    here as the flops module will register it) and none of the reference's internal einsums."""
    from torch.utils.flop_counter import FlopCounterMode

    def formula(u, delta, A, B, C, D, z, delta_bias, *args, out_shape=None, **kwargs):
        batch, dim, length = u
        return 9 * batch * length * dim * A[1]

    case = make_case(2, 4, 20, 3, 2)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.fastfuse.selective_scan: formula}) as mode:
        fastfuse.selective_scan(**case, delta_softplus=True, backend="torch")
    assert mode.get_total_flops() == 9 * 2 * 20 * 4 * 3


# ----------------------------------------------------------------------- the kernel backends
def _tolerances(name, dtype, has_z):
    """mamba-ssm's test tolerances: du ×2, ddelta rtol×5 / atol×10, weights (1e-3, 1e-3) widened to
    the input dtype's when z is present; dB/dC (time-varying, in the input dtype) at the dtype's."""
    rtol, atol = TOLERANCES[dtype]
    if name == "u":
        return 2 * rtol, 2 * atol
    if name == "delta":
        return 5 * rtol, 10 * atol
    if name in ("A", "D", "delta_bias"):
        return (max(1e-3, rtol), max(1e-3, atol)) if has_z else (1e-3, 1e-3)
    return rtol, atol


def check_against_reference(case, dtype, device, backend, *, softplus=True, noncontiguous=False,
                            bc_dtype=None, seed=0):
    """Run one case through `backend` and the float64 reference on the same (rounded) inputs and
    compare the output, the last state, and the gradients of every input (x_L's included)."""
    low_precision = ("u", "delta", "z", "B", "C")
    inputs = {}
    for name, value in case.items():
        if value is None:
            inputs[name] = None
            continue
        want = (bc_dtype or dtype) if name in ("B", "C") else dtype if name in low_precision else torch.float32
        t = value.to(want).to(device)
        if noncontiguous and name in low_precision:
            t = non_contiguous(t)
        inputs[name] = t.requires_grad_(True)
    ref_inputs = {k: None if v is None else v.detach().cpu().double().requires_grad_(True) for k, v in inputs.items()}

    out, last = fastfuse.selective_scan(**inputs, delta_softplus=softplus, return_last_state=True, backend=backend)
    ref_out, ref_last = fastfuse.selective_scan(**ref_inputs, delta_softplus=softplus, return_last_state=True,
                                                backend="torch")
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert last.dtype == torch.float32 and last.shape == ref_last.shape
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double().cpu(), ref_out, rtol=rtol, atol=atol, msg=lambda m: f"out: {m}")
    torch.testing.assert_close(last.double().cpu(), ref_last, rtol=6e-4, atol=2e-3, msg=lambda m: f"x_L: {m}")

    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g, dtype=F64).to(dtype)
    dlast = torch.randn(last.shape, generator=g, dtype=F64).float()
    if noncontiguous:
        dout = non_contiguous(dout)
    torch.autograd.backward((out, last), (dout.to(device), dlast.to(device)))
    torch.autograd.backward((ref_out, ref_last), (dout.double(), dlast.double()))
    for name, t in inputs.items():
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        rtol, atol = _tolerances(name, dtype, case["z"] is not None)
        torch.testing.assert_close(t.grad.double().cpu(), ref_inputs[name].grad, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("length", [1, 7, 127, 128, 129, 300])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_kernel_lengths_and_dtypes(length, dtype, device, backend):
    # Default chunk (64): 127/128/129 end just before, on, and after a chunk boundary. Long cases
    # run one program (batch 1, one group): the interpreter's cost is programs × steps.
    batch, groups = (2, 2) if length < 100 else (1, None)
    case = make_case(batch, 4, length, 4, groups, seed=length)
    check_against_reference(case, dtype, device, backend, seed=length)


@pytest.mark.parametrize("length", [2049, 4100])
@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_kernel_long_sequences(length, device, backend):
    # mamba-ssm's long lengths: 33 and 65 saved chunk states, one program so the interpreter's
    # cost stays at one pass over the steps; fp32 only (dtype handling is covered above).
    case = make_case(1, 2, length, 4, None, seed=length)
    check_against_reference(case, torch.float32, device, backend, seed=length)


KERNEL_OPTION_CONFIGS = [
    # dim, N, groups, D, z, bias, softplus
    (4, 1, None, False, False, False, False),
    (4, 4, 1, True, False, False, False),
    (4, 16, 2, False, True, False, True),
    (8, 4, 4, True, True, True, True),
    (6, 16, None, True, False, True, True),
    (3, 4, None, False, True, True, False),
]


@pytest.mark.parametrize("cfg", KERNEL_OPTION_CONFIGS,
                         ids=lambda c: "d{}-N{}-G{}-D{:d}z{:d}bias{:d}sp{:d}".format(*c))
@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_kernel_options(cfg, device, backend, monkeypatch):
    # A 16-step chunk makes L = 37 cross two saved-state boundaries and end mid-chunk.
    monkeypatch.setattr(scan_ops, "CHUNK", 16)
    dim, n_state, groups, has_D, has_z, has_bias, softplus = cfg
    case = make_case(2, dim, 37, n_state, groups, seed=dim * n_state, has_D=has_D, has_z=has_z,
                     has_bias=has_bias, softplus=softplus)
    check_against_reference(case, torch.float32, device, backend, softplus=softplus)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_kernel_channel_blocks_noncontiguous(dtype, device, backend, monkeypatch):
    """Several channel blocks per group (5 channels, blocks of 2: the last one partial), so dB/dC
    are summed across programs; every (batch, D, L) input and dout non-contiguous."""
    import fastfuse.triton.selective_scan as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK_D", 2)
    monkeypatch.setattr(scan_ops, "CHUNK", 16)
    case = make_case(1, 10, 35, 4, 2, seed=5)
    check_against_reference(case, dtype, device, backend, noncontiguous=True)


@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_kernel_fp32_B_C_with_bf16_inputs(device, backend):
    case = make_case(2, 4, 20, 8, 2, seed=9)
    check_against_reference(case, torch.bfloat16, device, backend, bc_dtype=torch.float32)


@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_kernel_softplus_threshold_and_strong_decay(device, backend):
    # Raw delta around the softplus threshold (identity above 20), far below it (softplus ≈ e^x),
    # and decays so strong that exp(delta·A) underflows to 0.
    case = make_case(1, 4, 24, 4, None, seed=11, has_z=False)
    raw = torch.tensor([-40.0, -12.0, 0.0, 19.5, 20.0, 20.5, 30.0, 3.0], dtype=F64)
    case["delta"] = raw.repeat(1, 4, 3) - case["delta_bias"][None, :, None]
    case["A"] = case["A"] * torch.tensor([1.0, 1.0, 10.0, 0.01], dtype=F64)[:, None]
    check_against_reference(case, torch.float32, device, backend)


@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_float64_inputs(device, backend):
    # "auto" keeps float64 in the float64 reference; the kernel named explicitly runs fp32 states.
    case = {k: v.to(device) for k, v in make_case(1, 4, 12, 3, 2, seed=17).items()}
    want_out, want_last = naive_scan(**{k: v.cpu() for k, v in case.items()}, delta_softplus=True)
    out, last = fastfuse.selective_scan(**case, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out.cpu(), want_out, rtol=1e-10, atol=1e-10)
    out, last = fastfuse.selective_scan(**case, delta_softplus=True, return_last_state=True, backend=backend)
    assert out.dtype == F64 and last.dtype == F64
    torch.testing.assert_close(out.cpu(), want_out, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last.cpu(), want_last, rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_kernel_empty_inputs(device, backend):
    A = (-torch.rand(4, 3, device=device)).requires_grad_(True)
    u = torch.randn(2, 4, 0, device=device, requires_grad=True)
    out, last = fastfuse.selective_scan(u, torch.rand(2, 4, 0, device=device), A, torch.randn(2, 3, 0, device=device),
                                        torch.randn(2, 3, 0, device=device), return_last_state=True, backend=backend)
    assert out.shape == (2, 4, 0) and last.shape == (2, 4, 3) and (last == 0).all()
    (out.sum() + last.sum()).backward()
    assert (A.grad == 0).all() and u.grad.shape == (2, 4, 0)
    out = fastfuse.selective_scan(torch.randn(0, 4, 6, device=device), torch.rand(0, 4, 6, device=device), A.detach(),
                                  torch.randn(0, 3, 6, device=device), torch.randn(0, 3, 6, device=device),
                                  backend=backend)
    assert out.shape == (0, 4, 6)


@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_kernel_under_torch_compile(device, backend):
    case = make_case(1, 4, 10, 3, 2, seed=13)
    inputs = [case[k].float().to(device).requires_grad_(True) for k in NAMES]
    fn = torch.compile(lambda *t: fastfuse.selective_scan(*t, delta_softplus=True, backend=backend).sum(),
                       fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(fn(*inputs), inputs)
    ref = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    expected = torch.autograd.grad(reference_scan(*ref, delta_softplus=True).sum(), ref)
    for name, got, want in zip(NAMES, grads, expected):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-3, atol=2e-3, msg=name)


def test_kernels_compile_for_gpu_architectures():
    """The interpreter does not type-check like the compiler: compile both kernels to cubins for
    sm_80 (Ampere, run by RTX 30xx/40xx too) and sm_90 with every option on, without a GPU."""
    code = textwrap.dedent("""
        import sys
        try:
            import triton
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource
            import triton.backends.nvidia  # noqa: F401
        except Exception as exc:
            print("SKIP", exc); sys.exit(3)
        import fastfuse.triton.selective_scan as k
        for cap in (80, 90):
            for fn, extra in ((k._selective_scan_fwd_kernel, {}),
                              (k._selective_scan_bwd_kernel, {"ATOMIC_BC": True, "sdo_l": 1})):
                const = dict(BLOCK_D=16, BLOCK_N=16, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True,
                             su_l=1, sdt_l=1, sz_l=1, sB_l=1, sC_l=1, **extra)
                sig = {a: "constexpr" if a in const else ("*bf16" if a.endswith("_ptr") else "i32")
                       for a in fn.arg_names}
                for a in ("states_ptr", "last_ptr", "dB_ptr", "dC_ptr", "dA_ptr", "dD_ptr", "dbias_ptr",
                          "x_scratch_ptr", "dt_scratch_ptr", "dlast_ptr", "A_ptr", "D_ptr", "bias_ptr"):
                    if a in sig:
                        sig[a] = "*fp32"
                compiled = triton.compile(ASTSource(fn, sig, constexprs=const),
                                          target=GPUTarget("cuda", cap, 32), options={"num_warps": 4})
                assert compiled.asm["cubin"], (cap, fn)
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"triton's NVIDIA compiler is not available: {proc.stdout.strip()}")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_real_shape_gpu(dtype):
    # VMamba's grouped scan at 64×64 pixels: 4 directions × 96 channels, d_state 16.
    case = make_case(2, 384, 4096, 16, 4, seed=21, has_z=False)
    check_against_reference(case, dtype, "cuda", "triton")


# --------------------------------------------------------------------------- reported repros: strong decay

@pytest.mark.parametrize("length", [10, 64])
@pytest.mark.parametrize("delta_scale", [0.5, 20.0])
def test_torch_backend_dA_stays_accurate_for_large_delta(length, delta_scale):
    torch.manual_seed(3)
    u, B, C = torch.randn(1, 3, length), torch.randn(1, 4, length), torch.randn(1, 4, length)
    delta = torch.rand(1, 3, length) * delta_scale
    A = (-torch.rand(3, 4) - 0.5).requires_grad_(True)
    fastfuse.selective_scan(u, delta, A, B, C, backend="torch").sum().backward()
    A64 = A.detach().double().requires_grad_(True)
    naive_scan(u, delta, A64, B, C)[0].sum().backward()
    rel = (A.grad.double() - A64.grad).abs().max() / A64.grad.abs().max()
    assert rel < 1e-4   # was ~1e-3 (L = 64) and 4 % with sign flips (L = 10) with differenced sums
    assert torch.sign(A.grad).eq(torch.sign(A64.grad.float())).all()


@pytest.mark.parametrize("strong", [-1e38, float("-inf")])
def test_torch_backend_strong_decay_is_finite(strong):
    torch.manual_seed(4)
    u, B, C = torch.randn(1, 3, 40), torch.randn(1, 4, 40), torch.randn(1, 4, 40)
    delta = torch.rand(1, 3, 40) + 0.1
    A = -torch.rand(3, 4) - 0.5
    A[0, 1] = strong
    out = fastfuse.selective_scan(u, delta, A, B, C, backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), naive_scan(u, delta, A, B, C)[0], rtol=6e-4, atol=2e-3)


def test_cross_selective_scan_large_A_logs_is_finite_on_torch():
    torch.manual_seed(5)
    K, D, R, N = 4, 6, 2, 3
    x = torch.randn(1, D, 4, 5)
    A_logs = torch.log(torch.arange(1, N + 1.0)).repeat(K * D, 1)
    A_logs[2, 1] = 89.0          # -exp(89) is -inf in fp32: that state is reset every step
    y = fastfuse.cross_selective_scan(x, torch.randn(K, R + 2 * N, D) * 0.3, None, torch.randn(K, D, R) * 0.3,
                                      torch.zeros(K, D), A_logs, torch.ones(K * D), backend="torch")
    assert torch.isfinite(y).all()


# ------------------------------------------------------------------- mamba-ssm's other B/C layouts
def _per_channel_bc(t, batch, dim, length):
    """Any accepted B/C layout as float64 (batch, D, N, L), written out independently of the op."""
    t = t.double()
    if t.dim() == 2:  # constant (D, N)
        return t[None, :, :, None].repeat(batch, 1, 1, length)
    if t.dim() == 3:
        t = t[:, None]
    return t.repeat_interleave(dim // t.shape[1], dim=1)


BC_LAYOUTS = [  # (B layout, C layout): "const" (D, N), "3d" (batch, N, L), "g<k>" (batch, k, N, L)
    ("const", "3d"), ("3d", "const"), ("const", "const"), ("3d", "g1"), ("g2", "3d"), ("g2", "const"),
    ("g4", "g2"),
]


@pytest.mark.parametrize("layouts", BC_LAYOUTS, ids=["-".join(x) for x in BC_LAYOUTS])
@pytest.mark.parametrize("device,backend", backend_params("selective_scan") + [pytest.param("cpu", "torch", id="cpu-torch")])
def test_mamba_ssm_bc_layouts(layouts, device, backend):
    """Constant (D, N) B/C and B, C of different ranks or group counts, as selective_scan_fn accepts."""
    batch, dim, length, n_state = 2, 4, 19, 3
    g = torch.Generator().manual_seed(3)

    def make(layout):
        if layout == "const":
            return torch.randn(dim, n_state, generator=g, dtype=F64)
        if layout == "3d":
            return torch.randn(batch, n_state, length, generator=g, dtype=F64)
        return torch.randn(batch, int(layout[1:]), n_state, length, generator=g, dtype=F64)

    case = make_case(batch, dim, length, n_state, seed=5)
    case["B"], case["C"] = make(layouts[0]), make(layouts[1])
    fp32 = {k: (None if v is None else v.float().to(device).requires_grad_()) for k, v in case.items()}
    out = fastfuse.selective_scan(**fp32, delta_softplus=True, backend=backend)
    oracle_inputs = {k: (None if v is None else v.clone().requires_grad_()) for k, v in case.items()}
    expanded = dict(oracle_inputs, B=_per_channel_bc(oracle_inputs["B"], batch, dim, length),
                    C=_per_channel_bc(oracle_inputs["C"], batch, dim, length))
    expected, _ = naive_scan(**expanded, delta_softplus=True)
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-4, rtol=1e-4)
    grad = torch.randn(out.shape, generator=g, dtype=F64)
    out.backward(grad.float().to(device))
    expected.backward(grad)
    for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
        assert fp32[name].grad.shape == case[name].shape, name
        torch.testing.assert_close(fp32[name].grad.double().cpu(), oracle_inputs[name].grad, atol=2e-3, rtol=2e-3,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_growing_scan_near_fp32_limit_is_finite(backend):
    """A > 0 with a zero start state: every state is finite (the last ≈ −7e37), so is the output."""
    if backends.unavailable_reason("selective_scan", backend, torch.device("cpu")):
        pytest.skip(backends.unavailable_reason("selective_scan", backend, torch.device("cpu")))
    length = 9
    u, delta = -torch.ones(1, 1, length), torch.ones(1, 1, length)
    A = torch.full((1, 1), math.log(7e37) / (length - 1))
    B = C = torch.ones(1, 1, length)
    out = fastfuse.selective_scan(u, delta, A, B, C, backend=backend)
    expected = naive_scan(u, delta, A, B, C)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)
