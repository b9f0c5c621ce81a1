import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastfuse
from testing_utils import DTYPES, TOLERANCES, backend_params, non_contiguous

ODD_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 2, 1, 9), (2, 3, 6, 1), (1, 37, 4, 33)]


def scan_orders(H: int, W: int) -> list[list[tuple[int, int]]]:
    """The four pixel visiting orders, written out by hand (independent of any reshape)."""
    rows = [(h, w) for h in range(H) for w in range(W)]
    cols = [(h, w) for w in range(W) for h in range(H)]
    return [rows, cols, rows[::-1], cols[::-1]]


def naive_cross_merge(ys: torch.Tensor) -> torch.Tensor:
    """Oracle: sequence position t of direction k lands on pixel scan_orders[k][t]."""
    B, K, C, H, W = ys.shape
    seq = ys.reshape(B, K, C, H * W).double()
    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    for k, order in enumerate(scan_orders(H, W)):
        for t, (h, w) in enumerate(order):
            out[:, :, h, w] += seq[:, k, :, t]
    return out.reshape(B, C, H * W)


def naive_cross_selective_scan(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                               delta_softplus=True):
    """Oracle written from the contract's sentence, one pixel and one time step at a time, float64."""
    B, D, H, W = x.shape
    R, N = dt_projs_weight.shape[2], A_logs.shape[1]
    out = torch.zeros(B, D, H, W, dtype=torch.float64)
    for k, order in enumerate(scan_orders(H, W)):
        A = -torch.exp(A_logs[k * D:(k + 1) * D].double())
        for b in range(B):
            state = torch.zeros(D, N, dtype=torch.float64)
            for h, w in order:
                u = x[b, :, h, w].double()
                x_dbl = x_proj_weight[k].double() @ u
                if x_proj_bias is not None:
                    x_dbl = x_dbl + x_proj_bias[k].double()
                dt, B_t, C_t = x_dbl[:R], x_dbl[R:R + N], x_dbl[R + N:]
                delta = dt_projs_weight[k].double() @ dt + dt_projs_bias[k].double()
                if delta_softplus:
                    delta = torch.where(delta <= 20, torch.log1p(torch.exp(delta)), delta)
                state = torch.exp(delta[:, None] * A) * state + (delta * u)[:, None] * B_t[None, :]
                out[b, :, h, w] += state @ C_t + Ds[k * D:(k + 1) * D].double() * u
    return out


def css_params(B, D, H, W, N, R, *, bias=True, seed=0, dtype=torch.float64):
    """Inputs at VMamba's init scales (outputs O(1)), plus some spread in A and the skip."""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape, bound):
        return (torch.rand(*shape, generator=g, dtype=dtype) * 2 - 1) * bound

    x = torch.randn(B, D, H, W, generator=g, dtype=dtype)
    x_proj_weight = uniform(4, R + 2 * N, D, bound=1 / math.sqrt(D))
    x_proj_bias = uniform(4, R + 2 * N, bound=0.1) if bias else None
    dt_projs_weight = uniform(4, D, R, bound=R ** -0.5)
    dt = torch.exp(torch.rand(4, D, generator=g, dtype=dtype) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt_projs_bias = dt + torch.log(-torch.expm1(-dt))
    A_logs = torch.log(torch.arange(1, N + 1, dtype=dtype)).repeat(4 * D, 1) + uniform(4 * D, N, bound=0.2)
    Ds = 1 + uniform(4 * D, bound=0.5)
    return [x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds]


def assert_close_scaled(actual, expected, dtype, *, rtol_scale=1.0, atol_scale=1.0, name=""):
    """TOLERANCES, with atol relative to the largest expected magnitude (sums over pixels grow)."""
    rtol, atol = TOLERANCES[dtype]
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol * rtol_scale,
                               atol=atol * atol_scale * scale, msg=lambda m: f"{name}: {m}")


def all_backends(op):
    return [pytest.param("cpu", "torch", id="cpu-torch")] + backend_params(op)


# ------------------------------------------------------------------------ cross_scan / cross_merge
@pytest.mark.parametrize("device,backend", all_backends("cross_scan"))
def test_scan_orders_explicit(device, backend):
    # 2×3 image with pixel (h, w) holding 10·h + w:  [[0, 1, 2], [10, 11, 12]].
    x = torch.tensor([[0.0, 1, 2], [10, 11, 12]], device=device).view(1, 1, 2, 3)
    got = fastfuse.cross_scan(x, backend=backend)[0, :, 0].cpu()
    expected = torch.tensor([[0.0, 1, 2, 10, 11, 12],    # row-major
                             [0, 10, 1, 11, 2, 12],     # column-major
                             [12, 11, 10, 2, 1, 0],     # row-major reversed
                             [12, 2, 11, 1, 10, 0]])    # column-major reversed
    assert torch.equal(got, expected)
    # channel-last input gives the same sequences
    got_cl = fastfuse.cross_scan(x.permute(0, 2, 3, 1), channel_last=True, backend=backend)[0, :, 0].cpu()
    assert torch.equal(got_cl, expected)
    # merging the scan of x sums the same pixel four times
    merged = fastfuse.cross_merge(fastfuse.cross_scan(x, backend=backend).view(1, 4, 1, 2, 3), backend=backend)
    assert torch.equal(merged.cpu(), 4 * x.cpu().view(1, 1, 6))


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("device,backend", all_backends("cross_merge"))
def test_adjoint_and_naive_merge_float64(shape, channel_last, device, backend):
    B, C, H, W = shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    ys = torch.randn(B, 4, C, H, W, generator=g, dtype=torch.float64)
    image = x.permute(0, 2, 3, 1).contiguous() if channel_last else x
    xs = fastfuse.cross_scan(image.to(device), channel_last=channel_last, backend=backend).cpu()
    merged = fastfuse.cross_merge(ys.to(device), channel_last=channel_last, backend=backend).cpu()
    assert xs.shape == (B, 4, C, H * W)
    assert merged.shape == ((B, H * W, C) if channel_last else (B, C, H * W))
    merged_cf = merged.transpose(1, 2) if channel_last else merged
    torch.testing.assert_close(merged_cf, naive_cross_merge(ys), rtol=1e-12, atol=1e-12)
    # <cross_scan(x), ys> = <x, cross_merge(ys)>
    lhs = (xs * ys.reshape(B, 4, C, H * W)).sum()
    rhs = (x.reshape(B, C, H * W) * merged_cf).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_double_backward():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(1, 4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    for channel_last in (False, True):
        scan = lambda t: fastfuse.cross_scan(t, channel_last=channel_last, backend="torch")  # noqa: E731
        merge = lambda t: fastfuse.cross_merge(t, channel_last=channel_last, backend="torch")  # noqa: E731
        assert torch.autograd.gradcheck(scan, (x,))
        assert torch.autograd.gradgradcheck(scan, (x,))
        assert torch.autograd.gradcheck(merge, (ys,))
        assert torch.autograd.gradgradcheck(merge, (ys,))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 37, 33, 2)])
@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", backend_params("cross_scan"))
def test_kernel_scan_merge_forward_backward(shape, channel_last, dtype, device, backend):
    B, C, H, W = shape
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    ys64 = torch.randn(B, 4, C, H, W, generator=g, dtype=torch.float64)
    image64 = x64.permute(0, 2, 3, 1) if channel_last else x64
    # Non-contiguous inputs: the image through a transposed copy, the sequences as a slice.
    image = non_contiguous(image64.to(device, dtype)).requires_grad_(True)
    ys_big = torch.cat([ys64, ys64], dim=2).to(device, dtype)
    ys = ys_big[:, :, ::2].detach().requires_grad_(True)
    assert not ys.is_contiguous()

    xs = fastfuse.cross_scan(image, channel_last=channel_last, backend=backend)
    ref_xs = fastfuse.cross_scan(image.detach().double().cpu(), channel_last=channel_last, backend="torch")
    assert xs.dtype == dtype and torch.equal(xs.double().cpu(), ref_xs)  # a copy is exact
    merged = fastfuse.cross_merge(ys, channel_last=channel_last, backend=backend)
    ref_merged = naive_cross_merge(ys.detach().double().cpu())
    ref_merged = ref_merged.transpose(1, 2) if channel_last else ref_merged
    assert merged.dtype == dtype
    assert_close_scaled(merged, ref_merged, dtype, name="merge")

    # Backward: each is the other's adjoint.
    g_xs = torch.randn(xs.shape, generator=g, dtype=torch.float64)
    xs.backward(g_xs.to(device, dtype))
    ref_dx = naive_cross_merge(g_xs.to(dtype).double().reshape(B, 4, C, H, W))
    ref_dx = ref_dx.reshape(B, C, H, W).permute(0, 2, 3, 1) if channel_last else ref_dx.reshape(B, C, H, W)
    assert image.grad.dtype == dtype
    assert_close_scaled(image.grad, ref_dx, dtype, name="d image")
    g_merged = torch.randn(merged.shape, generator=g, dtype=torch.float64).to(dtype)
    merged.backward(g_merged.to(device))
    image_grad = g_merged.double().reshape((B, H, W, C) if channel_last else (B, C, H, W))
    ref_dys = fastfuse.cross_scan(image_grad, channel_last=channel_last, backend="torch").reshape(B, 4, C, H, W)
    assert torch.equal(ys.grad.double().cpu(), ref_dys)


def test_empty_scan_and_merge():
    assert fastfuse.cross_scan(torch.rand(0, 3, 4, 5)).shape == (0, 4, 3, 20)
    assert fastfuse.cross_scan(torch.rand(2, 3, 0, 5)).shape == (2, 4, 3, 0)
    assert fastfuse.cross_scan(torch.rand(2, 0, 4, 5), channel_last=True).shape == (2, 4, 5, 0)
    assert fastfuse.cross_merge(torch.rand(0, 4, 3, 4, 5)).shape == (0, 3, 20)
    assert fastfuse.cross_merge(torch.rand(2, 4, 3, 4, 0), channel_last=True).shape == (2, 0, 3)


# -------------------------------------------------------------------------- cross_selective_scan
@pytest.mark.parametrize("bias,softplus,channel_last", [(True, True, False), (False, True, True), (True, False, True)])
def test_css_reference_matches_naive(bias, softplus, channel_last):
    params = css_params(2, 3, 3, 4, 3, 2, bias=bias, seed=1)
    expected = naive_cross_selective_scan(*params, delta_softplus=softplus)
    if channel_last:
        params[0] = params[0].permute(0, 2, 3, 1).contiguous()
    got = fastfuse.cross_selective_scan(*params, delta_softplus=softplus, channel_last=channel_last, backend="torch")
    expected = expected.permute(0, 2, 3, 1) if channel_last else expected
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_css_gradcheck_reference():
    params = [p.requires_grad_(True) for p in css_params(1, 2, 2, 3, 2, 1, seed=2)]
    fn = lambda *a: fastfuse.cross_selective_scan(*a, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, params)


def test_css_out_dtype():
    params = css_params(1, 4, 3, 3, 2, 1, seed=4)
    ref = fastfuse.cross_selective_scan(*params, backend="torch")
    half = [params[0].to(torch.bfloat16)] + [p.float() if p is not None else None for p in params[1:]]
    out_default = fastfuse.cross_selective_scan(*half, backend="torch")
    out_fp32 = fastfuse.cross_selective_scan(*half, out_dtype=torch.float32, backend="torch")
    assert out_default.dtype == torch.bfloat16 and out_fp32.dtype == torch.float32
    ref_rounded = fastfuse.cross_selective_scan(half[0].double(), *params[1:], backend="torch")
    torch.testing.assert_close(out_fp32.double(), ref_rounded, rtol=1e-5, atol=1e-5)
    assert_close_scaled(out_default, ref, torch.bfloat16, name="bf16 out")


@pytest.mark.parametrize("dtype,shape,channel_last,bias", [
    (torch.float32, (2, 3, 5, 7, 4, 2), False, True),
    (torch.float32, (1, 1, 1, 1, 1, 1), True, False),
    (torch.float16, (1, 5, 3, 2, 16, 3), True, True),
    (torch.bfloat16, (2, 4, 1, 6, 2, 1), False, False),
])
@pytest.mark.parametrize("device,backend", backend_params("cross_selective_scan"))
def test_css_kernel_forward_backward(dtype, shape, channel_last, bias, device, backend):
    B, D, H, W, N, R = shape
    params64 = css_params(B, D, H, W, N, R, bias=bias, seed=6)
    # x in the test dtype (non-contiguous), weights fp32 as in VMamba; the float64 reference
    # gets the same (rounded) values, so only the kernel's own error is measured.
    x = params64[0].to(dtype)
    if channel_last:
        x = x.permute(0, 2, 3, 1)
    x = non_contiguous(x.to(device)).requires_grad_(True)
    weights = [None if p is None else p.float().to(device).requires_grad_(True) for p in params64[1:]]
    ref_inputs = [x.detach().double().cpu().requires_grad_(True)] + [
        None if p is None else p.detach().double().cpu().requires_grad_(True) for p in weights]

    out = fastfuse.cross_selective_scan(x, *weights, channel_last=channel_last, backend=backend)
    ref = fastfuse.cross_selective_scan(*ref_inputs, channel_last=channel_last, backend="torch")
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_scaled(out, ref, dtype, name="out")

    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    out.backward(grad.to(device))
    ref.backward(grad.double())
    names = ["x", "x_proj_weight", "x_proj_bias", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"]
    for name, t, r in zip(names, [x] + weights, ref_inputs):
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        assert_close_scaled(t.grad, r.grad, t.dtype if t.dtype != torch.float32 else dtype,
                            rtol_scale=5, atol_scale=10, name=f"d {name}")


CSS_GRAD_NAMES = ["x", "x_proj_weight", "x_proj_bias", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"]


def css_grads(params, grad, *, backend, channel_last=False, delta_softplus=True, out_dtype=None):
    """(output, gradients of every tensor input) for one backward with output gradient `grad`."""
    leaves = [None if p is None else p.detach().clone().requires_grad_(True) for p in params]
    out = fastfuse.cross_selective_scan(*leaves, delta_softplus=delta_softplus, out_dtype=out_dtype,
                                        channel_last=channel_last, backend=backend)
    out.backward(grad)
    return out, [None if p is None else p.grad for p in leaves]


# The fused backward against the float64 reference, every gradient, much tighter than TOLERANCES
# (fp32 arithmetic throughout; errors seen ~1e-6 of the largest gradient). Shapes: one pixel,
# H != W over several BT-step chunks, H = 1 with D over one channel block (N = 1: 16 channels per
# program), W = 1 with N = 16 over two channel blocks (4 per program), channel-last, no bias.
@pytest.mark.parametrize("shape,channel_last,bias", [
    ((1, 1, 1, 1, 1, 1), False, True),
    ((2, 3, 5, 7, 4, 2), False, True),
    ((1, 17, 1, 37, 1, 2), True, False),
    ((1, 5, 6, 1, 16, 3), True, True),
    ((1, 2, 5, 7, 16, 1), False, False),
])
@pytest.mark.parametrize("device,backend", backend_params("cross_selective_scan"))
def test_css_fused_backward_fp32_exact(shape, channel_last, bias, device, backend):
    B, D, H, W, N, R = shape
    params = [None if p is None else p.float() for p in css_params(B, D, H, W, N, R, bias=bias, seed=11)]
    if channel_last:
        params[0] = params[0].permute(0, 2, 3, 1).contiguous()
    grad = torch.randn(params[0].shape, generator=torch.Generator().manual_seed(12))
    _, got = css_grads([None if p is None else p.to(device) for p in params], grad.to(device),
                       backend=backend, channel_last=channel_last)
    _, expected = css_grads([None if p is None else p.double() for p in params], grad.double(),
                            backend="torch", channel_last=channel_last)
    for name, g, e in zip(CSS_GRAD_NAMES, got, expected):
        if e is None:
            assert g is None, name
            continue
        assert g.dtype == torch.float32 and g.shape == e.shape, name
        scale = max(e.abs().max().item(), 1.0)
        torch.testing.assert_close(g.double().cpu(), e, rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"d {name}: {m}")


@pytest.mark.parametrize("device,backend", backend_params("cross_selective_scan"))
def test_css_fused_backward_edge_values(device, backend):
    # delta_softplus=False with positive deltas; then softplus with pre-activations above the
    # pass-through threshold of 20 and decays so strong that exp(δA) underflows to 0 within a
    # step (the backward's a_t·h_{t-1} = h_t − δ_t B_t u_t must not turn that into NaN or
    # garbage): gradients stay finite and exact.
    params = css_params(1, 4, 3, 5, 2, 2, seed=13, dtype=torch.float32)
    params[3] = params[3] * 0.05
    params[4] = torch.full_like(params[4], 0.3)
    grad = torch.randn(params[0].shape, generator=torch.Generator().manual_seed(14))
    cases = [(params, False)]
    strong = list(params)
    strong[4] = torch.tensor([[25.0, -3.0, 22.0, 2.0]] * 4)
    strong[5] = params[5] + 5.0  # A down to -exp(5.9) ≈ -360: exp(25·A) is 0 in fp32
    cases.append((strong, True))
    for case, softplus in cases:
        _, got = css_grads([p.to(device) for p in case], grad.to(device), backend=backend, delta_softplus=softplus)
        _, expected = css_grads([p.double() for p in case], grad.double(), backend="torch", delta_softplus=softplus)
        for name, g, e in zip(CSS_GRAD_NAMES, got, expected):
            assert torch.isfinite(g).all(), name
            scale = max(e.abs().max().item(), 1.0)
            torch.testing.assert_close(g.double().cpu(), e, rtol=1e-4, atol=2e-5 * scale,
                                       msg=lambda m: f"softplus={softplus} d {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device,backend", backend_params("cross_selective_scan"))
def test_css_fused_backward_half_fp32_out_expanded_grad(dtype, device, backend):
    # VMamba's half input with fp32 output; out.sum() hands the backward an expanded (stride 0)
    # gradient. The reference sees the same rounded x, so only the kernels' error is measured.
    params = css_params(2, 5, 4, 3, 1, 2, seed=15)
    x = params[0].to(dtype)
    weights = [p.float() for p in params[1:]]
    leaves = [x.to(device).requires_grad_(True)] + [w.to(device).requires_grad_(True) for w in weights]
    out = fastfuse.cross_selective_scan(*leaves, out_dtype=torch.float32, backend=backend)
    assert out.dtype == torch.float32
    out.sum().backward()
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    fastfuse.cross_selective_scan(*ref_leaves, backend="torch").sum().backward()
    for name, t, r in zip(CSS_GRAD_NAMES, leaves, ref_leaves):
        assert t.grad.dtype == t.dtype, name
        # dx is rounded to x's dtype once; the weights' gradients stay fp32.
        assert_close_scaled(t.grad, r.grad, dtype if t.dtype == dtype else torch.float32,
                            rtol_scale=5, atol_scale=10, name=f"d {name}")


def test_css_kernels_compile_for_gpu_architectures():
    """The interpreter does not type-check like the compiler: compile the fused kernels (forward,
    its state-saving mode, backward) to cubins for sm_80 and sm_90 with the block shapes the host
    code picks at VMamba sizes, d_state 1 and 16, without a GPU; none may use local memory."""
    code = textwrap.dedent("""
        import os, re, subprocess, sys, tempfile
        try:
            import triton
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource
            import triton.backends.nvidia  # noqa: F401
        except Exception as exc:
            print("SKIP", exc); sys.exit(3)
        import fastfuse.triton.cross_scan as k
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        FP32 = {"seq_ptr", "dy_ptr", "proj_ptr", "states_ptr", "out_ptr", "du_ptr", "dproj_ptr", "dwdt_ptr",
                "dbias_ptr", "dalog_ptr", "dds_ptr", "wdt_ptr", "bdt_ptr", "alog_ptr", "ds_ptr"}
        for cap in (80, 90):
            for N in (1, 16):
                bd_fwd, bn, bt = k._scan_blocks(192, N, 56 * 56)
                bd = k._backward_channels(192, bn, bt)
                fwd = dict(SOFTPLUS=True, BD=bd_fwd, BN=bn, BT=bt)
                runs = [(k._css_forward_kernel, dict(fwd, WRITE_OUT=True, SAVE_STATES=False), bd_fwd,
                         k.SCAN_BLOCK_ELEMENTS),
                        (k._css_forward_kernel, dict(fwd, WRITE_OUT=False, SAVE_STATES=True), bd_fwd,
                         k.SCAN_BLOCK_ELEMENTS),
                        (k._css_backward_kernel, dict(SOFTPLUS=True, BD=bd, BN=bn, BT=bt, BR=8), bd,
                         k.BACKWARD_BLOCK_ELEMENTS)]
                for fn, const, channels, budget in runs:
                    sig = {a: "constexpr" if a in const else (("*fp32" if a in FP32 else "*bf16")
                                                              if a.endswith("_ptr") else "i32") for a in fn.arg_names}
                    warps = 8 if channels * bn * bt >= budget else 4  # the host code's rule (_scan_warps)
                    compiled = triton.compile(ASTSource(fn, sig, constexprs=const),
                                              target=GPUTarget("cuda", cap, 32), options={"num_warps": warps})
                    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                        f.write(compiled.asm["cubin"])
                    usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
                    os.unlink(f.name)
                    local = re.search(r"LOCAL:(\\d+)", usage)
                    assert local is not None and local.group(1) == "0", (cap, N, fn.__name__, const, usage)
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"triton's NVIDIA compiler is not available: {proc.stdout.strip()}")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_css_empty():
    params = css_params(1, 3, 2, 2, 2, 1)
    for x in (torch.rand(0, 3, 2, 2, dtype=torch.float64), torch.rand(2, 3, 0, 4, dtype=torch.float64)):
        x.requires_grad_(True)
        weights = [p.requires_grad_(True) for p in params[1:]]
        out = fastfuse.cross_selective_scan(x, *weights)
        assert out.shape == x.shape
        out.sum().backward()
        assert x.grad.shape == x.shape
        assert all(torch.count_nonzero(w.grad) == 0 for w in weights)


def test_bad_inputs():
    x, w, b, wdt, bdt, a, ds = css_params(1, 3, 2, 2, 2, 1)
    css = fastfuse.cross_selective_scan
    with pytest.raises(ValueError, match="x must be 4-D"):
        fastfuse.cross_scan(x[0])
    with pytest.raises(TypeError, match="x must have dtype"):
        fastfuse.cross_scan(x.long())
    with pytest.raises(TypeError, match="channel_last must be a bool"):
        fastfuse.cross_scan(x, channel_last=1)
    with pytest.raises(ValueError, match="ys must be 5-D"):
        fastfuse.cross_merge(x)
    with pytest.raises(ValueError, match="4 scan directions"):
        fastfuse.cross_merge(torch.rand(1, 2, 3, 2, 2))
    with pytest.raises(RuntimeError, match="unavailable"):
        fastfuse.cross_scan(x, backend="cuda")
    with pytest.raises(ValueError, match=r"x_proj_weight must have shape \(4, 5, 3\)"):
        css(x, w[:, :4], b, wdt, bdt, a, ds)
    with pytest.raises(ValueError, match=r"dt_projs_weight must have shape \(4, 3, \*\)"):
        css(x, w, b, wdt[:, :2], bdt, a, ds)
    with pytest.raises(ValueError, match=r"A_logs must have shape \(12, \*\)"):
        css(x, w, b, wdt, bdt, a[:4], ds)
    with pytest.raises(ValueError, match=r"x_proj_bias must have shape \(4, 5\)"):
        css(x, w, b[:, :3], wdt, bdt, a, ds)
    with pytest.raises(ValueError, match=r"dt_projs_bias must have shape \(4, 3\)"):
        css(x, w, b, wdt, bdt[:2], a, ds)
    with pytest.raises(ValueError, match=r"Ds must have shape \(12\)"):
        css(x, w, b, wdt, bdt, a, ds[:3])
    with pytest.raises(ValueError, match="N <= 256"):
        css(x, torch.rand(4, 1 + 2 * 257, 3), b, wdt, bdt, torch.rand(12, 257), ds)
    with pytest.raises(ValueError, match="at least one channel"):
        css(x[:, :0], w[..., :0], b, wdt[:, :0], bdt[:, :0], a[:0], ds[:0])
    with pytest.raises(ValueError, match=r"dt_projs_weight must have shape \(4, 2, \*\)"):
        css(x, w, b, wdt, bdt, a, ds, channel_last=True)  # (1, 3, 2, 2) read as (B, H, W, D=2)
    with pytest.raises(ValueError, match="one device"):
        css(x, w, b, wdt, bdt, a, ds.to("meta"))
    with pytest.raises(TypeError, match="out_dtype"):
        css(x, w, b, wdt, bdt, a, ds, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="A_logs must have dtype"):
        css(x, w, b, wdt, bdt, a.long(), ds)


def test_torch_compile_fullgraph():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)

    def scan_merge(t):
        return fastfuse.cross_merge(fastfuse.cross_scan(t).view(2, 4, 3, 4, 5) * 2.0).sum()

    compiled = torch.compile(scan_merge, fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 8.0))

    params = [p.float().requires_grad_(True) for p in css_params(1, 3, 2, 3, 2, 1)]
    fn = torch.compile(lambda *a: fastfuse.cross_selective_scan(*a, backend="torch").square().sum(),
                       fullgraph=True, backend="aot_eager")
    fn(*params).backward()
    expected = torch.autograd.grad(
        fastfuse.cross_selective_scan(*params, backend="torch").square().sum(), params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)


def test_reference_softplus_threshold_matches_contract():
    # delta + bias above 20 passes through unchanged; below, softplus (F.softplus's threshold).
    params = css_params(1, 2, 1, 2, 1, 1)
    params[4] = torch.tensor([[25.0, -3.0]] * 4, dtype=torch.float64)
    got = fastfuse.cross_selective_scan(*params, backend="torch")
    expected = naive_cross_selective_scan(*params)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert F.softplus(torch.tensor(25.0)) == 25.0


# ------------------------------------------------------------------- real shapes, GPU only
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("channel_last", [False, True])
def test_gpu_scan_merge_real_shapes(channel_last):
    x = torch.randn(8, 192, 56, 56, device="cuda", dtype=torch.bfloat16)
    image = x.permute(0, 2, 3, 1).contiguous() if channel_last else x
    xs = fastfuse.cross_scan(image, channel_last=channel_last, backend="triton")
    assert torch.equal(xs, fastfuse.cross_scan(image, channel_last=channel_last, backend="torch"))
    ys = torch.randn(8, 4, 192, 56, 56, device="cuda")
    merged = fastfuse.cross_merge(ys, channel_last=channel_last, backend="triton")
    torch.testing.assert_close(merged, fastfuse.cross_merge(ys, channel_last=channel_last, backend="torch"),
                               rtol=1e-6, atol=1e-5)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 192, 28, 28, 1, 6), (2, 96, 56, 56, 16, 6)])  # VMamba v2 / v0 stages
def test_gpu_css_real_shapes(dtype, shape):
    B, D, H, W, N, R = shape
    params64 = [None if p is None else p.cuda() for p in css_params(B, D, H, W, N, R, bias=False, seed=8)]
    x = params64[0].to(dtype).requires_grad_(True)
    weights = [None if p is None else p.float().requires_grad_(True) for p in params64[1:]]
    ref_inputs = [x.detach().double().requires_grad_(True)] + [
        None if p is None else p.detach().double().requires_grad_(True) for p in weights]
    out = fastfuse.cross_selective_scan(x, *weights, backend="triton")
    ref = fastfuse.cross_selective_scan(*ref_inputs, backend="torch")
    assert_close_scaled(out, ref, dtype, name="out")
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for name, t, r in zip(["x", "x_proj_weight", "x_proj_bias", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"],
                          [x] + weights, ref_inputs):
        if t is not None:
            assert_close_scaled(t.grad, r.grad, dtype, rtol_scale=5, atol_scale=10, name=f"d {name}")


# ------------------------------------------- VMamba's cross-scan options (scans, one_by_one, layouts)
def option_orders(H: int, W: int, scans: int) -> list[list[tuple[int, int]]]:
    """csm_triton's scans: 0 cross (scan_orders), 1 unidirectional, 2 bidirectional — by hand."""
    cross = scan_orders(H, W)
    rows = cross[0]
    return {0: cross, 1: [rows] * 4, 2: [rows, rows, rows[::-1], rows[::-1]]}[scans]


def naive_scan_options(images: torch.Tensor, scans: int) -> torch.Tensor:
    """images (B, 4, C, H, W), one image per direction -> (B, 4, C, L) in float64."""
    B, K, C, H, W = images.shape
    out = torch.zeros(B, K, C, H * W, dtype=torch.float64)
    for k, order in enumerate(option_orders(H, W, scans)):
        for t, (h, w) in enumerate(order):
            out[:, k, :, t] = images[:, k, :, h, w].double()
    return out


def naive_merge_options(ys: torch.Tensor, scans: int) -> torch.Tensor:
    """ys (B, 4, C, H, W) -> per direction back in pixel order, (B, 4, C, H·W), not yet summed."""
    B, K, C, H, W = ys.shape
    seq = ys.reshape(B, K, C, H * W).double()
    out = torch.zeros(B, K, C, H, W, dtype=torch.float64)
    for k, order in enumerate(option_orders(H, W, scans)):
        for t, (h, w) in enumerate(order):
            out[:, k, :, h, w] += seq[:, k, :, t]
    return out.reshape(B, K, C, H * W)


OPTION_CASES = [(s, o, cl, scl) for s in (0, 1, 2) for o in (False, True) for cl in (False, True)
                for scl in (False, True)]


def to_option_layouts(images, ys, one_by_one, channel_last, seq_channel_last):
    """Channel-first (B, 4, C, H, W) tensors in the layouts the options name."""
    x = images if one_by_one else images[:, 0]
    if channel_last:
        x = x.permute(0, 3, 4, 1, 2) if one_by_one else x.permute(0, 2, 3, 1)
    ys = ys.permute(0, 3, 4, 1, 2) if seq_channel_last else ys
    return x.contiguous(), ys.contiguous()


@pytest.mark.parametrize("scans,one_by_one,channel_last,seq_channel_last", OPTION_CASES)
@pytest.mark.parametrize("device,backend", all_backends("cross_scan"))
def test_scan_merge_options_match_naive_float64(scans, one_by_one, channel_last, seq_channel_last, device,
                                                backend):
    B, C, H, W = 2, 3, 3, 5
    g = torch.Generator().manual_seed(21)
    images = torch.randn(B, 4, C, H, W, generator=g, dtype=torch.float64)
    if not one_by_one:
        images = images[:, :1].expand(B, 4, C, H, W)  # one image, scanned four times
    ys = torch.randn(B, 4, C, H, W, generator=g, dtype=torch.float64)
    x, ys_in = to_option_layouts(images, ys, one_by_one, channel_last, seq_channel_last)
    opts = dict(channel_last=channel_last, scans=scans, one_by_one=one_by_one, seq_channel_last=seq_channel_last,
                backend=backend)
    got = fastfuse.cross_scan(x.to(device), **opts).cpu()
    expected = naive_scan_options(images, scans)  # (B, 4, C, L)
    assert got.shape == ((B, H * W, 4, C) if seq_channel_last else (B, 4, C, H * W)) and got.is_contiguous()
    assert torch.equal(got.permute(0, 2, 3, 1) if seq_channel_last else got, expected)

    merged = fastfuse.cross_merge(ys_in.to(device), **opts).cpu()
    per_direction = naive_merge_options(ys, scans)
    expected = per_direction if one_by_one else per_direction.sum(1)  # (B, [4,] C, L)
    if channel_last:
        expected = expected.movedim(-1, 1)  # (B, L, [4,] C)
    assert merged.shape == expected.shape and merged.is_contiguous()
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scans,one_by_one,channel_last,seq_channel_last",
                         [(1, False, False, False), (2, True, True, False), (0, True, False, True),
                          (0, False, True, True), (2, False, False, True)])
def test_scan_merge_options_gradcheck_and_adjoint(scans, one_by_one, channel_last, seq_channel_last):
    g = torch.Generator().manual_seed(22)
    B, C, H, W = 1, 2, 3, 2
    image_shape = (B, 4, C, H, W) if one_by_one else (B, C, H, W)
    x = torch.randn(image_shape, generator=g, dtype=torch.float64)
    if channel_last:
        x = x.permute(0, 3, 4, 1, 2) if one_by_one else x.permute(0, 2, 3, 1)
    ys = torch.randn((B, H, W, 4, C) if seq_channel_last else (B, 4, C, H, W), generator=g, dtype=torch.float64)
    opts = dict(channel_last=channel_last, scans=scans, one_by_one=one_by_one, seq_channel_last=seq_channel_last)
    scanned, merged = fastfuse.cross_scan(x, **opts), fastfuse.cross_merge(ys, **opts)
    # Each merge is the adjoint of the scan with the same options: <scan(x), ys> = <x, merge(ys)>.
    torch.testing.assert_close((scanned.flatten() * ys.flatten()).sum(), (x.flatten() * merged.flatten()).sum(),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: fastfuse.cross_scan(t, **opts), (x.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda t: fastfuse.cross_merge(t, **opts), (ys.clone().requires_grad_(),))
    assert torch.autograd.gradgradcheck(lambda t: fastfuse.cross_merge(t, **opts), (ys.clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scans,one_by_one", [(0, False), (1, False), (2, True)])
@pytest.mark.parametrize("device,backend", all_backends("cross_scan"))
def test_scan_merge_options_dtypes_non_contiguous(dtype, scans, one_by_one, device, backend):
    g = torch.Generator().manual_seed(23)
    B, C, H, W = 1, 3, 4, 3
    images = torch.randn(B, 4, C, H, W, generator=g).to(dtype)
    x = non_contiguous(images if one_by_one else images[:, 0]).to(device)
    ys = non_contiguous(torch.randn(B, H, W, 4, C, generator=g).to(dtype)).to(device)
    opts = dict(scans=scans, one_by_one=one_by_one, seq_channel_last=True, backend=backend)
    got = fastfuse.cross_scan(x, **opts)
    assert got.dtype == dtype
    expected = naive_scan_options(images if one_by_one else images[:, :1].expand(B, 4, C, H, W), scans)
    assert torch.equal(got.cpu().double().permute(0, 2, 3, 1), expected)  # a copy: exact in every dtype
    merged = fastfuse.cross_merge(ys, **opts)
    assert merged.dtype == dtype
    per_direction = naive_merge_options(ys.cpu().permute(0, 3, 4, 1, 2), scans)
    expected = per_direction if one_by_one else per_direction.sum(1)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(merged.cpu().double(), expected, rtol=rtol, atol=atol)


def test_scan_merge_options_refused():
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"scans must be one of 0 = cross .*1 = unidirectional, 2 = bidirectional"):
        fastfuse.cross_scan(x, scans=3)
    with pytest.raises(ValueError, match="scans must be one of"):
        fastfuse.cross_merge(torch.randn(1, 4, 2, 3, 3), scans=True)
    with pytest.raises(TypeError, match="one_by_one must be a bool"):
        fastfuse.cross_scan(x, one_by_one=1)
    with pytest.raises(TypeError, match="seq_channel_last must be a bool"):
        fastfuse.cross_merge(torch.randn(1, 4, 2, 3, 3), seq_channel_last="yes")
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4, C, H, W\) with 4 scan directions in dim 1"):
        fastfuse.cross_scan(torch.randn(1, 3, 2, 3, 3), one_by_one=True)
    with pytest.raises(ValueError, match=r"x must have shape \(B, H, W, 4, C\) with 4 scan directions in dim 3"):
        fastfuse.cross_scan(torch.randn(1, 3, 3, 2, 2), one_by_one=True, channel_last=True)
    with pytest.raises(ValueError, match=r"ys must have shape \(B, H, W, 4, C\) with 4 scan directions in dim 3"):
        fastfuse.cross_merge(torch.randn(1, 4, 2, 3, 3), seq_channel_last=True)
    with pytest.raises(ValueError, match="backend"):
        fastfuse.cross_scan(x, scans=1, backend="bogus")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_css_out_dtype_oflex(dtype):
    # VMamba's oflex selective scan: fp32 out for half inputs, the input dtype otherwise.
    params = css_params(1, 3, 2, 3, 2, 1, dtype=dtype)
    oflex = fastfuse.cross_selective_scan(*params, out_dtype="oflex", backend="torch")
    assert oflex.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    explicit = fastfuse.cross_selective_scan(*params, out_dtype=oflex.dtype, backend="torch")
    assert torch.equal(oflex, explicit)
    with pytest.raises(TypeError, match="out_dtype must be None, 'oflex' or one of"):
        fastfuse.cross_selective_scan(*params, out_dtype="fp32", backend="torch")


# The cpu backend's fused kernel (csrc/cpu/cross_scan.cpp): 16-channel lane blocks, 32-step chunks
# and up to 8 parts of blocks for the dB/dC sums. Shapes: H = 1 over two chunks with D past one
# block; W = 1 with N = 16; D = 147 (10 blocks, 5 parts of 2); B = 3, H != W, odd, over two chunks;
# one pixel with N = 16.
CPU_CSS_SHAPES = [(1, 17, 1, 37, 1, 2), (2, 33, 5, 1, 16, 3), (1, 147, 3, 11, 1, 6), (3, 5, 7, 9, 16, 2),
                  (1, 1, 1, 1, 16, 1)]


@pytest.mark.parametrize("shape", CPU_CSS_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channel_last", [False, True])
def test_css_cpu_fused_kernel_all_gradients(shape, dtype, channel_last):
    B, D, H, W, N, R = shape
    params = css_params(B, D, H, W, N, R, bias=(B + N) % 2 == 0, seed=21)
    x = params[0].to(dtype)
    x = non_contiguous(x.permute(0, 2, 3, 1) if channel_last else x)  # (B, H, W, D) view with channel_last
    weights = [None if p is None else p.float() for p in params[1:]]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    out, got = css_grads([x] + weights, grad.to(dtype), backend="cpu", channel_last=channel_last)
    ref, expected = css_grads([x.double()] + [None if w is None else w.double() for w in weights],
                              grad.to(dtype).double(), backend="torch", channel_last=channel_last)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_scaled(out, ref, dtype, name="out")
    for name, g, e in zip(CSS_GRAD_NAMES, got, expected):
        if e is None:
            assert g is None, name
            continue
        assert g.shape == e.shape, name
        if name == "x":  # rounded to x's dtype once
            assert g.dtype == dtype
            assert_close_scaled(g, e, dtype, name="d x")
        else:  # fp32 weights, fp32 arithmetic: tight
            assert g.dtype == torch.float32, name
            scale = max(e.abs().max().item(), 1.0)
            torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"d {name}: {m}")


def test_css_cpu_fused_kernel_deterministic_across_thread_counts():
    # The directions are summed in a fixed order and dB/dC over parts fixed by the shape, so what
    # the kernel alone computes is bitwise identical whatever the thread count (dx and
    # d x_proj_weight also pass through torch GEMMs, whose blocking may follow the thread count).
    params = [None if p is None else p.float() for p in css_params(2, 40, 6, 7, 16, 3, seed=23)]
    grad = torch.randn(params[0].shape, generator=torch.Generator().manual_seed(24))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3, 3):
            torch.set_num_threads(n)
            out, grads = css_grads(params, grad, backend="cpu")
            results.append([out] + grads)
    finally:
        torch.set_num_threads(threads)
    kernel_only = {"out", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"}
    for name, one, three, again in zip(["out"] + CSS_GRAD_NAMES, *results):
        assert torch.equal(three, again), name  # rerun at the same thread count: every result
        if name in kernel_only:
            assert torch.equal(one, three), name


@pytest.mark.parametrize("target_programs", [4, 10 ** 6])
@pytest.mark.parametrize("N", [1, 16])
@pytest.mark.parametrize("device,backend", [p for p in backend_params("cross_selective_scan")
                                            if p.values[1] == "triton"])
def test_css_triton_channel_groups_all_gradients(target_programs, N, device, backend, monkeypatch):
    # Few target programs: one channel group per (batch, direction) walking all the channel blocks
    # (each adds into the group's rows of the projection gradients after the one before); many:
    # one block per group, the groups' partials summed afterwards. Every gradient against the
    # float64 reference, and bitwise reproducible (no atomics).
    import fastfuse.triton.cross_scan as kernels
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", target_programs)
    B, D, H, W, R = 1, 20, 2, 3, 2
    params = [None if p is None else p.float() for p in css_params(B, D, H, W, N, R, seed=25)]
    bd = kernels._backward_channels(D, kernels._pow2(N), kernels._scan_blocks(D, N, H * W)[2])
    groups, per_group = kernels._channel_groups(B, -(-D // bd))
    assert (groups == 1) == (target_programs == 4) and groups * per_group * bd >= D
    grad = torch.randn(params[0].shape, generator=torch.Generator().manual_seed(26))
    out, got = css_grads([p.to(device) for p in params], grad.to(device), backend=backend)
    again, got_again = css_grads([p.to(device) for p in params], grad.to(device), backend=backend)
    ref, expected = css_grads([p.double() for p in params], grad.double(), backend="torch")
    assert torch.equal(out, again)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    for name, g, g2, e in zip(CSS_GRAD_NAMES, got, got_again, expected):
        assert torch.equal(g, g2), name
        scale = max(e.abs().max().item(), 1.0)
        torch.testing.assert_close(g.double().cpu(), e, rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"d {name}: {m}")
