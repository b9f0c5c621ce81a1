import math

import numpy as np
import pytest
import torch

import fastfuse
from testing_utils import DTYPES, assert_close, backend_params, non_contiguous


def numpy_sam(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Independent oracle: the textbook arccos of the normalised dot product, per pixel."""
    dot = np.einsum("bchw,bchw->bhw", x, y)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return np.degrees(np.arccos(np.clip(dot / norms, -1.0, 1.0)))


def test_reference_matches_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 31, 7, 5, generator=g, dtype=torch.float64)
    y = torch.rand(2, 31, 7, 5, generator=g, dtype=torch.float64)
    got = fastfuse.sam_map(x, y, backend="torch")
    np.testing.assert_allclose(got.numpy(), numpy_sam(x.numpy(), y.numpy()), rtol=1e-10, atol=1e-9)


def test_radians_and_known_angles():
    x = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1).repeat(1, 1, 1, 3)
    y = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), torch.tensor([-1.0, 0, 0])], -1)
    y = y.view(1, 3, 1, 3).double()
    got = fastfuse.sam_map(x, y, degrees=False, backend="torch")
    torch.testing.assert_close(got, torch.tensor([[[0.0, math.pi / 2, math.pi]]], dtype=torch.float64))


def test_zero_and_identical_spectra_are_finite():
    x = torch.rand(1, 4, 2, 2, dtype=torch.float64)
    x[0, :, 0, 0] = 0
    y = x.clone()
    y[0, :, 1, 1] = 0
    x.requires_grad_(True)
    y.requires_grad_(True)
    out = fastfuse.sam_map(x, y, backend="torch")
    assert out[0, 0, 0].item() == pytest.approx(90.0) and out[0, 1, 1].item() == pytest.approx(90.0)
    assert out[0, 0, 1].abs() < 1e-6 and out[0, 1, 0].abs() < 1e-6
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


def test_gradcheck_reference():
    x = torch.rand(2, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fastfuse.sam_map(a, b, backend="torch"), (x, y))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 31, 5, 7), (1, 3, 33, 17)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", backend_params("sam_map"))
def test_kernel_forward_backward(shape, dtype, device, backend):
    g = torch.Generator().manual_seed(1)
    # The float64 reference sees exactly the kernel's (rounded) inputs, as in mamba-ssm's tests:
    # the comparison measures the kernel's error, not the inputs' quantisation (which at small
    # angles moves a bf16 gradient by more than any sensible tolerance).
    x64 = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.05).to(dtype).double()
    y64 = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.05).to(dtype).double()
    x = x64.to(device, dtype).requires_grad_(True)
    y = non_contiguous(y64.to(device, dtype)).requires_grad_(True)
    out = fastfuse.sam_map(x, y, backend=backend)
    xr, yr = x64.clone().requires_grad_(True), y64.clone().requires_grad_(True)
    ref = fastfuse.sam_map(xr, yr, backend="torch")
    # Angles are in degrees (up to 180): scale the absolute tolerance by the output's range.
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, atol_scale=10, name="angle")
    grad = torch.rand(ref.shape, generator=g, dtype=torch.float64).to(dtype).double()
    out.backward(grad.to(device, dtype))
    ref.backward(grad)
    assert_close(x.grad, xr.grad, dtype, rtol_scale=5, atol_scale=10, name="dx")
    assert_close(y.grad, yr.grad, dtype, rtol_scale=5, atol_scale=10, name="dy")


@pytest.mark.parametrize("device,backend", backend_params("sam_map"))
def test_kernel_zero_and_identical(device, backend):
    x = torch.rand(1, 8, 3, 3, device=device)
    x[0, :, 0, 0] = 0
    y = x.clone()
    y[0, :, 2, 2] = 0
    x.requires_grad_(True)
    out = fastfuse.sam_map(x, y, backend=backend)
    assert torch.isfinite(out).all()
    assert out[0, 0, 0].item() == pytest.approx(90.0, abs=1e-3)
    assert out[0, 1, 1].abs().item() < 0.05
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bad_inputs():
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="x must be 4-D"):
        fastfuse.sam_map(x[0], x[0])
    with pytest.raises(ValueError, match="same shape"):
        fastfuse.sam_map(x, torch.rand(1, 3, 4, 5))
    with pytest.raises(TypeError, match="dtype"):
        fastfuse.sam_map(x.long(), x.long())
    with pytest.raises(TypeError, match="same dtype"):
        fastfuse.sam_map(x, x.double())
    with pytest.raises(ValueError, match="at least one channel"):
        fastfuse.sam_map(x[:, :0], x[:, :0])
    with pytest.raises(RuntimeError, match="unavailable"):
        fastfuse.sam_map(x, x, backend="cuda")


def test_empty_batch_and_nan_passthrough():
    assert fastfuse.sam_map(torch.rand(0, 3, 4, 4), torch.rand(0, 3, 4, 4)).shape == (0, 4, 4)
    x = torch.rand(1, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    out = fastfuse.sam_map(x, torch.rand(1, 3, 2, 2), backend="torch")
    assert torch.isnan(out[0, 0, 0]) and torch.isfinite(out[0, 1:]).all()


def test_torch_compile_fullgraph():
    a = torch.rand(2, 4, 5, 5, requires_grad=True)
    b = torch.rand(2, 4, 5, 5)
    fn = torch.compile(lambda p, q: fastfuse.sam_map(p, q).sum(), fullgraph=True, backend="aot_eager")
    fn(a, b).backward()
    # Compiled and eager must run the same backend's kernels and agree exactly.
    expected = torch.autograd.grad(fastfuse.sam_map(a, b).sum(), a)[0]
    torch.testing.assert_close(a.grad, expected, rtol=0, atol=0)


def _reference_with_grads(x64, y64, grad64, **kwargs):
    xr, yr = x64.clone().requires_grad_(True), y64.clone().requires_grad_(True)
    ref = fastfuse.sam_map(xr, yr, backend="torch", **kwargs)
    ref.backward(grad64)
    return ref.detach(), xr.grad, yr.grad


def _kernel_with_grads(x, y, grad, backend, **kwargs):
    x, y = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    out = fastfuse.sam_map(x, y, backend=backend, **kwargs)
    out.backward(grad)
    return out.detach(), x.grad, y.grad


# C = 1 (every angle is 0 or 180), 33 and 100 (one padded register tile / one CUDA streamed
# pass), 300 (Triton's multi-block channel loop); batches of tiny images exercise the grid.
@pytest.mark.parametrize("shape", [(3, 1, 2, 3), (1, 33, 3, 5), (2, 100, 1, 7), (1, 300, 3, 5), (5, 4, 1, 1)])
@pytest.mark.parametrize("device,backend", backend_params("sam_map"))
def test_kernel_channel_counts(shape, device, backend):
    g = torch.Generator().manual_seed(2)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    y64 = torch.randn(shape, generator=g, dtype=torch.float64)
    grad64 = torch.rand((shape[0], shape[2], shape[3]), generator=g, dtype=torch.float64)
    ref, gx_ref, gy_ref = _reference_with_grads(x64, y64, grad64)
    out, gx, gy = _kernel_with_grads(x64.float().to(device), y64.float().to(device), grad64.float().to(device),
                                     backend)
    assert_close(out, ref, torch.float32, atol_scale=10, name="angle")
    assert_close(gx, gx_ref, torch.float32, rtol_scale=5, atol_scale=10, name="dx")
    assert_close(gy, gy_ref, torch.float32, rtol_scale=5, atol_scale=10, name="dy")


@pytest.mark.parametrize("shape", [(2, 5, 1, 2), (1, 260, 1, 2)])
@pytest.mark.parametrize("device,backend", backend_params("sam_map"))
def test_kernel_float64_gradcheck(shape, device, backend):
    # float64 runs the same kernels with float64 accumulation: a tight check of the analytic VJP.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    y = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    for degrees in (True, False):
        ref = fastfuse.sam_map(x.detach().cpu(), y.detach().cpu(), degrees=degrees, backend="torch")
        out = fastfuse.sam_map(x, y, degrees=degrees, backend=backend)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-11)
    assert torch.autograd.gradcheck(lambda a, b: fastfuse.sam_map(a, b, backend=backend), (x, y),
                                    fast_mode=shape[1] > 100)


@pytest.mark.parametrize("device,backend", backend_params("sam_map"))
def test_kernel_special_spectra(device, backend):
    # Zero, identical, opposite and NaN spectra, a norm just under a custom eps, radians.
    x = torch.rand(1, 6, 2, 4, dtype=torch.float64) + 0.1
    y = torch.rand(1, 6, 2, 4, dtype=torch.float64) + 0.1
    x[0, :, 0, 0] = 0                    # zero x
    y[0, :, 0, 1] = 0                    # zero y
    # Power-of-two scalings keep the unit vectors exactly equal (opposite) in every precision, so
    # both sides sit exactly on the cone point, where the clamp defines the gradient as zero.
    y[0, :, 0, 2] = 2 * x[0, :, 0, 2]     # same direction
    y[0, :, 0, 3] = -0.5 * x[0, :, 0, 3]  # opposite
    x[0, 2, 1, 0] = float("nan")         # NaN propagates
    x[0, :, 1, 1] *= 1e-4 / x[0, :, 1, 1].norm()  # norm 1e-4 < eps = 1e-3: right angle
    grad = torch.rand(1, 2, 4, dtype=torch.float64)
    for degrees in (True, False):
        ref, gx_ref, gy_ref = _reference_with_grads(x, y, grad, degrees=degrees, eps=1e-3)
        out, gx, gy = _kernel_with_grads(x.float().to(device), y.float().to(device), grad.float().to(device),
                                         backend, degrees=degrees, eps=1e-3)
        right = 90.0 if degrees else math.pi / 2
        assert out[0, 0, 0] == pytest.approx(right) and out[0, 0, 1] == pytest.approx(right)
        assert out[0, 1, 1] == pytest.approx(right)
        assert out[0, 0, 2] == pytest.approx(0.0, abs=1e-6) and out[0, 0, 3] == pytest.approx(2 * right)
        assert torch.isnan(out[0, 1, 0]) and not torch.isnan(out[0, 1, 1:]).any() and not torch.isnan(out[0, 0]).any()
        assert_close(out[0, 0], ref[0, 0], torch.float32, atol_scale=10, name="angle")
        assert_close(out[0, 1, 1:], ref[0, 1, 1:], torch.float32, atol_scale=10, name="angle")
        # Gradients: zero for the invalid pixels, finite and matching wherever the input is not NaN.
        for got, want in ((gx, gx_ref), (gy, gy_ref)):
            assert (got[0, :, 0, :2] == 0).all() and (got[0, :, 1, 1] == 0).all()
            assert torch.isfinite(got[0, :, 0]).all() and torch.isfinite(got[0, :, 1, 1:]).all()
            assert_close(got[0, :, :, 1:], want[0, :, :, 1:], torch.float32, rtol_scale=5, atol_scale=10, name="grad")


@pytest.mark.parametrize("device,backend", backend_params("sam_map"))
def test_kernel_layouts(device, backend):
    # channels_last (one strided pixel run), a channel slice (channel stride 2), a spatial crop
    # of a batch slice (rows and columns no longer one run: the kernel's (h, w) indexing).
    g = torch.Generator().manual_seed(4)
    base_x = torch.rand(3, 10, 5, 6, generator=g, dtype=torch.float64) + 0.05
    base_y = torch.rand(3, 10, 5, 6, generator=g, dtype=torch.float64) + 0.05
    views = {
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
        "channel_slice": lambda t: t[:, ::2],
        "spatial_crop": lambda t: t[1:, :, 1:, :-1],
    }
    for name, view in views.items():
        x, y = view(base_x.float().to(device)), view(base_y.float().to(device))
        assert not x.is_contiguous(), name
        x64, y64 = view(base_x), view(base_y)
        grad = torch.rand((x64.shape[0], x64.shape[2], x64.shape[3]), generator=g, dtype=torch.float64)
        ref, gx_ref, gy_ref = _reference_with_grads(x64, y64, grad)
        out, gx, gy = _kernel_with_grads(x, y, grad.float().to(device), backend)
        assert_close(out, ref, torch.float32, atol_scale=10, name=f"{name} angle")
        assert_close(gx, gx_ref, torch.float32, rtol_scale=5, atol_scale=10, name=f"{name} dx")
        assert_close(gy, gy_ref, torch.float32, rtol_scale=5, atol_scale=10, name=f"{name} dy")


@pytest.mark.parametrize("device,backend", backend_params("sam_map"))
def test_kernel_empty_inputs(device, backend):
    for shape in [(0, 3, 4, 4), (2, 3, 0, 5)]:
        x = torch.rand(shape, device=device, requires_grad=True)
        out = fastfuse.sam_map(x, x.detach() + 1, backend=backend)
        assert out.shape == (shape[0], shape[2], shape[3])
        out.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(4, 31, 512, 512), (2, 191, 128, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_real_shapes(shape, dtype, backend):
    reason = fastfuse.backends.unavailable_reason("sam_map", backend, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    g = torch.Generator(device="cuda").manual_seed(5)
    x = (torch.rand(shape, generator=g, device="cuda") + 0.05).to(dtype)
    y = (torch.rand(shape, generator=g, device="cuda") + 0.05).to(dtype)
    grad = torch.rand((shape[0], shape[2], shape[3]), generator=g, device="cuda").to(dtype)
    ref, gx_ref, gy_ref = _reference_with_grads(x.double(), y.double(), grad.double())
    out, gx, gy = _kernel_with_grads(x, y, grad, backend)
    assert out.dtype == dtype and gx.dtype == dtype
    assert_close(out, ref, dtype, atol_scale=10, name="angle")
    assert_close(gx, gx_ref, dtype, rtol_scale=5, atol_scale=10, name="dx")
    assert_close(gy, gy_ref, dtype, rtol_scale=5, atol_scale=10, name="dy")


# --------------------------------------------------------------------------- reported repros

ALL_SAM_BACKENDS = [("cpu", "torch")] + backend_params("sam_map")


@pytest.mark.parametrize("device,backend", ALL_SAM_BACKENDS)
@pytest.mark.parametrize("channels", [5, 300])   # one register tile and the multi-pass path
@pytest.mark.parametrize("scale", [1e20, 1e-15, 3e38])
def test_angle_is_scale_invariant(device, backend, channels, scale):
    torch.manual_seed(0)
    x, y = torch.rand(2, channels, 3, 4), torch.rand(2, channels, 3, 4)
    expected = fastfuse.sam_map(x.double(), y.double(), backend="torch")
    eps = 0.0 if scale < 1 else 1e-8   # 1e-15-sized spectra are below the default eps: no angle
    got = fastfuse.sam_map((x * scale).to(device), (y * scale).to(device), eps=eps, backend=backend)
    assert torch.isfinite(got).all()
    assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("device,backend", ALL_SAM_BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.5])
def test_zero_spectrum_gradient_is_finite_for_every_eps(device, backend, eps):
    x = torch.rand(1, 6, 2, 3, device=device)
    x[0, :, 0, 0] = 0
    x.requires_grad_(True)
    y = torch.rand(1, 6, 2, 3, device=device, requires_grad=True)
    angle = fastfuse.sam_map(x, y, eps=eps, backend=backend)
    assert angle[0, 0, 0].item() == pytest.approx(90.0)
    angle.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    loss = fastfuse.nn.SAMLoss(eps=eps, backend=backend)(x, y)
    x.grad = None
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_eps_is_validated(eps):
    x = torch.rand(1, 3, 2, 2)
    with pytest.raises(ValueError, match="eps must be finite and ≥ 0"):
        fastfuse.sam_map(x, x, eps=eps)


@pytest.mark.parametrize("device,backend", ALL_SAM_BACKENDS)
def test_nan_and_inf_give_nan_on_every_backend(device, backend):
    x, y = torch.rand(1, 4, 2, 2, device=device), torch.rand(1, 4, 2, 2, device=device)
    x[0, 1, 0, 0] = float("nan")
    x[0, 2, 1, 1] = float("inf")
    got = fastfuse.sam_map(x, y, backend=backend)
    assert got[0, 0, 0].isnan() and got[0, 1, 1].isnan() and torch.isfinite(got[0, 0, 1])


def test_metric_sam_is_scale_invariant():
    torch.manual_seed(1)
    gt = torch.rand(1, 31, 8, 8)
    pred = (gt + 0.05 * torch.rand_like(gt))
    assert fastfuse.metrics.sam(pred * 1e20, gt * 1e20).item() == pytest.approx(fastfuse.metrics.sam(pred, gt).item(),
                                                                                 rel=1e-4)


# --------------------------------------------------------------------------- cpu kernel: tiles, needs, cancellation

def _cpu_available():
    return fastfuse.backends.unavailable_reason("sam_map", "cpu", torch.device("cpu")) is None


needs_cpu_kernel = pytest.mark.skipif(not _cpu_available(), reason="the cpu backend's sam kernel is not built")


# Tiles are up to 1024 pixels of the flattened image (fewer for many channels: 96 at C = 300), so
# these cut tiles mid-way, end on a partial tile, and (a crop) tile row by row instead.
@needs_cpu_kernel
@pytest.mark.parametrize("shape,crop", [((1, 31, 33, 40), False), ((2, 7, 45, 23), False), ((1, 300, 7, 15), False),
                                        ((1, 4, 40, 40), True), ((1, 1, 37, 29), False)])
def test_cpu_tile_boundaries(shape, crop):
    g = torch.Generator().manual_seed(11)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    y64 = torch.randn(shape, generator=g, dtype=torch.float64)
    if crop:
        x64, y64 = x64[:, :, 1:-2, 3:], y64[:, :, 1:-2, 3:]
    grad64 = torch.rand((x64.shape[0], x64.shape[2], x64.shape[3]), generator=g, dtype=torch.float64)
    ref, gx_ref, gy_ref = _reference_with_grads(x64, y64, grad64)
    out, gx, gy = _kernel_with_grads(x64.float(), y64.float(), grad64.float(), "cpu")
    assert_close(out, ref, torch.float32, atol_scale=10, name="angle")
    assert_close(gx, gx_ref, torch.float32, rtol_scale=5, atol_scale=10, name="dx")
    assert_close(gy, gy_ref, torch.float32, rtol_scale=5, atol_scale=10, name="dy")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_nearly_identical_and_opposite_spectra(dtype):
    # Angles of 1e-5..1e-3 rad from 0 and from 180°, mixed with ordinary ones in one tile: where
    # 2 ∓ 2cos cancels, the kernel sums the distances from the unit vectors as the reference does.
    g = torch.Generator().manual_seed(12)
    x64 = torch.rand(1, 31, 16, 20, generator=g, dtype=torch.float64) + 0.1
    noise = torch.randn(x64.shape, generator=g, dtype=torch.float64)
    size = torch.logspace(-5, -3, 20, dtype=torch.float64).view(1, 1, 1, 20)
    y64 = x64 * (1 + size * noise)
    y64[:, :, 4:8] = -y64[:, :, 4:8]                                            # near 180°
    y64[:, :, 8:10] = torch.rand(1, 31, 2, 20, generator=g, dtype=torch.float64)  # ordinary angles
    x, y = x64.to(dtype), y64.to(dtype)
    grad64 = torch.rand(1, 16, 20, generator=g, dtype=torch.float64)
    ref, gx_ref, gy_ref = _reference_with_grads(x.double(), y.double(), grad64, degrees=False)
    out, gx, gy = _kernel_with_grads(x, y, grad64.to(dtype), "cpu", degrees=False)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(gy, gy_ref, rtol=1e-7, atol=1e-7)
    else:
        # Relative to the angle itself (down to 1e-5 rad), not only to its 180° range.
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-9)
        assert_close(gx, gx_ref, torch.float32, rtol_scale=5, atol_scale=10, name="dx")
        assert_close(gy, gy_ref, torch.float32, rtol_scale=5, atol_scale=10, name="dy")


@needs_cpu_kernel
@pytest.mark.parametrize("needs", [(True, False), (False, True), (True, True)])
def test_cpu_backward_needs_flags(needs):
    from fastfuse.cpu import sam as cpu_sam
    g = torch.Generator().manual_seed(13)
    x = torch.rand(2, 9, 11, 13, generator=g) + 0.05
    y = non_contiguous(torch.rand(2, 9, 11, 13, generator=g) + 0.05)
    grad = torch.rand(1, 1, 1, generator=g).expand(2, 11, 13)  # a broadcast gradient, read in place
    gx_all, gy_all = cpu_sam.sam_map_backward(grad, x, y, True, 1e-8)
    gx, gy = cpu_sam.sam_map_backward(grad, x, y, True, 1e-8, *needs)
    for got, full, need in ((gx, gx_all, needs[0]), (gy, gy_all, needs[1])):
        if need:
            torch.testing.assert_close(got, full, rtol=0, atol=0)
        else:
            assert got is None
    # Through autograd: only the leaf that asks for a gradient gets one, equal to the full one.
    xa, ya = x.clone().requires_grad_(needs[0]), y.clone().requires_grad_(needs[1])
    (fastfuse.sam_map(xa, ya, backend="cpu") * grad).sum().backward()
    for leaf, full, need in ((xa, gx_all, needs[0]), (ya, gy_all, needs[1])):
        assert (leaf.grad is not None) == need
        if need:
            torch.testing.assert_close(leaf.grad, full, rtol=1e-6, atol=1e-7)


@needs_cpu_kernel
@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_cpu_float64_is_scale_invariant(scale):
    g = torch.Generator().manual_seed(14)
    x = torch.rand(1, 5, 3, 4, generator=g, dtype=torch.float64)
    y = torch.rand(1, 5, 3, 4, generator=g, dtype=torch.float64)
    expected = fastfuse.sam_map(x, y, backend="torch")
    got = fastfuse.sam_map(x * scale, y * scale, eps=0.0, backend="cpu")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-11)


# --------------------------------------------------------------------------- CUDA math, host-compiled

def _host_cuda_fixtures():
    """tests/test_extension_build.py's host build of kernels/sam.cuh (skips there without nvcc)."""
    import test_extension_build as build
    return build.host_kernels, build.nvcc, build.setup_py, build.run_host


host_kernels, nvcc, setup_py, _run_host = _host_cuda_fixtures()


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("scale,eps", [(1e20, 1e-8), (3e38, 1e-8), (1e-15, 0.0), (1e-41, 0.0)])
def test_cuda_math_is_scale_invariant(host_kernels, cached, scale, eps):
    # The GPU kernels' per-pixel code, compiled for the host: x·1e20 (whose squares overflow
    # fp32), 1e-41 (subnormal: its reciprocal overflows) and friends give x's angle, and the
    # gradient of the scaled input is the gradient of x divided by the scale.
    torch.manual_seed(15)
    x, y = torch.rand(2, 5, 3, 4) + 0.05, torch.rand(2, 5, 3, 4) + 0.05
    grad = torch.rand(2, 3, 4)
    xs, ys = (x.double() * scale).float(), (y.double() * scale).float()
    out, gx, gy = _run_host(host_kernels, xs, ys, grad, cached=cached, eps=eps)
    ref, gx_ref, gy_ref = _reference_with_grads(xs.double() / scale, ys.double() / scale, grad.double())
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32, atol_scale=10 if scale < 1e-38 else 1, name="angle")
    if 1e-38 < scale <= 1e20:  # the true gradient (~1 / scale) of the others is out of fp32's range
        assert_close(gx.double() * scale, gx_ref, torch.float32, rtol_scale=5, atol_scale=10, name="dx")
        assert_close(gy.double() * scale, gy_ref, torch.float32, rtol_scale=5, atol_scale=10, name="dy")


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.5])
def test_cuda_math_zero_spectrum_gradient_is_finite_for_every_eps(host_kernels, cached, eps):
    torch.manual_seed(16)
    x, y = torch.rand(1, 6, 2, 3), torch.rand(1, 6, 2, 3)
    x[0, :, 0, 0] = 0
    out, gx, gy = _run_host(host_kernels, x, y, torch.rand(1, 2, 3), cached=cached, eps=eps)
    assert out[0, 0, 0].item() == pytest.approx(90.0)
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert (gx[0, :, 0, 0] == 0).all() and (gy[0, :, 0, 0] == 0).all()
