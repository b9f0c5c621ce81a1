"""subspace_guidance: value and gradients against autograd of the float64 composed formula.

The triton backend runs under the suite's TRITON_INTERPRET=1 (float64 included: its kernels then
accumulate in float64, so the 1e-10 tolerance checks the algebra, the tap gathers and the paddings).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastfuse
from fastfuse.reference import degrade as ref_degrade
from fastfuse.reference.subspace_guidance import guidance_loss

BACKENDS = ("torch", "cpu", "triton")


def make(B=2, d=3, C=7, c=2, H=9, W=10, ratio=3, k=4, *, batched_E=False, per_band=False, seed=0,
         dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    A = rnd(B, d, H, W)
    E = rnd(B, C, d) if batched_E else rnd(C, d)
    R = torch.rand(c, C, generator=g, dtype=torch.float64)
    X = rnd(B, C, H // ratio, W // ratio)
    Y = rnd(B, c, H, W)
    kernel = torch.rand(*((C,) if per_band else ()), k, k, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (A, E)] + [R] + [t.to(dtype) for t in (X, Y)] + [kernel]


def oracle(A, E, R, X, Y, kernel, ratio, lam, padding="circular", offset=None):
    """Autograd of the plain formula in float64, written out here (einsum, blur, response)."""
    offset = [max(ratio // 2 - 1, 0)] * 2 if offset is None else offset
    a = A.detach().double().requires_grad_(True)
    e = E.detach().double().requires_grad_(True)
    Z = torch.einsum("bij,bjhw->bihw" if e.dim() == 3 else "ij,bjhw->bihw", e, a)
    x_res = ref_degrade.spatial_degrade(Z, kernel.double(), ratio, padding, offset) - X.double()
    y_res = torch.einsum("oi,bihw->bohw", R.double(), Z) - Y.double()
    loss = x_res.square().sum() + lam * y_res.square().sum()
    dA, dE = torch.autograd.grad(loss, (a, e))
    return loss.detach(), dA, dE


def assert_rel(actual, expected, tol, name):
    scale = expected.double().abs().max().clamp_min(1e-30)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= tol, f"{name}: max error {err:.3g} of the largest value, tolerance {tol:g}"


def test_reference_gradients_match_finite_differences():
    A, E, R, X, Y, kernel = make(B=1, d=2, C=3, c=2, H=5, W=4, ratio=2, k=3)
    A.requires_grad_(True)
    E.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, e: guidance_loss(a, e, R, X, Y, kernel, 2, 0.7, "reflect", [0, 0]), (A, E))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ("circular", "reflect", "zero"))
@pytest.mark.parametrize("case", [
    dict(),                                          # H, W not multiples of ratio
    dict(batched_E=True),                            # one basis per image
    dict(per_band=True),                             # (C, k, k): H does not commute with E
    dict(B=1, d=1, C=1, c=1, H=3, W=3, ratio=3, k=1),  # every size 1 that can be
    dict(B=1, d=4, C=5, c=3, H=8, W=8, ratio=4, k=9),  # kernel wider than the decimated grid
], ids=["awkward", "batched-E", "per-band", "size-1", "wide-kernel"])
def test_float64_matches_autograd_oracle(backend, padding, case):
    ratio = case.get("ratio", 3)
    inputs = make(**case)
    loss, dA, dE = fastfuse.subspace_guidance(*inputs, ratio, 0.7, padding=padding, backend=backend)
    want = oracle(*inputs, ratio, 0.7, padding)
    for got, exp, name in zip((loss, dA, dE), want, ("loss", "dA", "dE")):
        assert got.dtype == torch.float64 and got.shape == exp.shape, name
        assert_rel(got, exp, 1e-10, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_and_non_contiguous_inputs(backend):
    A, E, R, X, Y, kernel = make(H=11, W=7, ratio=2, k=3)
    want = oracle(A, E, R, X, Y, kernel, 2, 2.5, "circular", [1, 0])
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (A, E, R, X, Y, kernel)]
    assert not strided[0].is_contiguous()
    got = fastfuse.subspace_guidance(*strided, 2, 2.5, offset=(1, 0), backend=backend)
    for g, w, name in zip(got, want, ("loss", "dA", "dE")):
        assert_rel(g, w, 1e-10, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
def test_low_precision_against_float64(backend, dtype, tol):
    inputs = make(B=2, d=4, C=13, c=3, H=17, W=12, ratio=4, k=5, dtype=dtype)
    loss, dA, dE = fastfuse.subspace_guidance(*inputs, 4, 1.0, backend=backend)
    assert loss.dtype == torch.float32 and dA.dtype == dtype and dE.dtype == dtype
    want = oracle(*inputs, 4, 1.0)  # the same (rounded) inputs, in float64
    for g, w, name in zip((loss, dA, dE), want, ("loss", "dA", "dE")):
        assert_rel(g, w, tol, name)


def test_backends_agree_and_outputs_are_not_differentiable():
    inputs = make(batched_E=True)
    inputs[0].requires_grad_(True)
    a = fastfuse.subspace_guidance(*inputs, 3, 0.3, backend="torch")
    for backend in ("cpu", "triton"):
        b = fastfuse.subspace_guidance(*inputs, 3, 0.3, backend=backend)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-11)
        assert not any(t.requires_grad for t in b)


class _SyncCounter(TorchDispatchMode):
    """Counts the aten ops that read a value back to the host."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                    torch.ops.aten.is_nonzero.default):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend):
    inputs = make(per_band=False, dtype=torch.float32)
    with _SyncCounter() as counter:
        fastfuse.subspace_guidance(*inputs, 3, 1.0, padding="zero", backend=backend)
    assert counter.syncs == []


def test_flop_formula_counts_the_closed_form():
    from torch.utils.flop_counter import FlopCounterMode
    inputs = make(dtype=torch.float32)
    with FlopCounterMode(display=False) as mode:
        fastfuse.subspace_guidance(*inputs, 3, 1.0)
    assert mode.get_total_flops() > 0


@pytest.mark.parametrize("change,match", [
    (dict(A=torch.zeros(2, 3, 9)), "A must be 4-D"),
    (dict(E=torch.zeros(7, 4)), "E must have shape"),
    (dict(E=torch.zeros(3, 7, 3)), "E must have shape"),
    (dict(R=torch.zeros(2, 6)), "R must have shape"),
    (dict(X=torch.zeros(2, 7, 4, 3)), "X must have shape"),
    (dict(Y=torch.zeros(2, 3, 9, 10)), "Y must have shape"),
    (dict(kernel=torch.zeros(3, 4)), "kernel must be"),
    (dict(kernel=torch.zeros(5, 3, 3)), "kernel must be"),
    (dict(lam=-1.0), "lam must be"),
    (dict(padding="mirror"), "padding must be one of"),
    (dict(offset=3), "offset must lie"),
    (dict(ratio=20), "at least ratio"),
    (dict(X=torch.zeros(2, 7, 3, 3, dtype=torch.float64).float()), "same dtype"),
])
def test_bad_arguments_name_the_argument(change, match):
    A, E, R, X, Y, kernel = make()
    args = dict(A=A, E=E, R=R, X=X, Y=Y, kernel=kernel, ratio=3, lam=1.0)
    kwargs = {k: change.pop(k) for k in ("padding", "offset") if k in change}
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        fastfuse.subspace_guidance(*args.values(), **kwargs)
