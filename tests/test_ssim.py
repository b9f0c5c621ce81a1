"""ssim_map / ssim: the reference against peer libraries, the kernels against the float64 reference."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastfuse
from fastfuse.reference import ssim as ref_ssim
from testing_utils import DTYPES, assert_close, backend_params, non_contiguous

PADDINGS = ("valid", "zero", "reflect")


def pair(shape, seed=0, dtype=torch.float64, noise=0.3):
    """Two related images in [0, 1], like an estimate and its reference (SSIM well inside (0, 1))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = (x + noise * (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5)).clamp(0, 1)
    return x.to(dtype), y.to(dtype)


def conv2d_ssim_map(x, y, window_size, sigma, pad, c1=1e-4, c2=9e-4):
    """Independent oracle for "zero" (pad=r) and "valid" (pad=0): the full 2-D window in one
    conv2d per moment, written from the SSIM definition (not separable, no shared code)."""
    t = torch.arange(window_size, dtype=torch.float64) - window_size // 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    w2 = torch.outer(g, g) / torch.outer(g, g).sum()
    channels = x.shape[1]
    weight = w2.expand(channels, 1, window_size, window_size)

    def blur(v):
        return F.conv2d(v, weight, padding=pad, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    return (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


# ---------------------------------------------------------------------------------------------
# The reference against pytorch-msssim, scikit-image, kornia, torchmetrics and a conv2d formula
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window_size", [7, 9, 11])
@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_reference_valid_matches_pytorch_msssim(window_size, sigma):
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    x, y = pair((2, 3, 24, 21), seed=window_size)
    win = _fspecial_gauss_1d(window_size, sigma).repeat(3, 1, 1, 1)
    per_channel, _ = _ssim(x, y, data_range=1.0, win=win, size_average=False)
    ours = fastfuse.ssim(x, y, window_size=window_size, sigma=sigma, reduction="none", backend="torch")
    # pytorch-msssim builds its window in float32: agreement to ~1e-7, not to float64 rounding.
    torch.testing.assert_close(ours, per_channel, rtol=1e-6, atol=1e-6)
    per_image = pytorch_msssim.ssim(x, y, data_range=1, size_average=False, win_size=window_size, win_sigma=sigma)
    torch.testing.assert_close(fastfuse.ssim(x, y, window_size=window_size, sigma=sigma, reduction="batch",
                                             backend="torch"), per_image, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sigma,window_size", [(1.0, 9), (1.5, 11), (2.0, 15)])
def test_reference_valid_matches_skimage(sigma, window_size):
    """skimage's Gaussian SSIM has radius int(3.5σ + 0.5); the interior of its full map (where the
    padding does not reach) is our "valid" map, and its mean is skimage's mssim."""
    metrics = pytest.importorskip("skimage.metrics")
    x, y = pair((1, 2, 30, 27), seed=3)
    ours = fastfuse.ssim_map(x, y, window_size=window_size, sigma=sigma, backend="torch")
    r = window_size // 2
    for c in range(2):
        mssim, full = metrics.structural_similarity(
            x[0, c].numpy(), y[0, c].numpy(), gaussian_weights=True, sigma=sigma,
            use_sample_covariance=False, data_range=1.0, full=True)
        np.testing.assert_allclose(ours[0, c].numpy(), full[r:-r, r:-r], rtol=1e-10, atol=1e-12)
        assert ours[0, c].mean().item() == pytest.approx(mssim, rel=1e-10)


@pytest.mark.parametrize("window_size", [7, 11])
def test_reference_reflect_matches_kornia(window_size):
    kornia = pytest.importorskip("kornia")
    x, y = pair((2, 3, 19, 23), seed=5)
    expected = kornia.metrics.ssim(x, y, window_size, max_val=1.0, eps=0.0, padding="same")
    ours = fastfuse.ssim_map(x, y, window_size=window_size, padding="reflect", backend="torch")
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sigma", [1.0, 1.5])
def test_reference_reflect_matches_torchmetrics(sigma):
    """torchmetrics ≥ 1.4.2: reflect padding, radius int(3.5σ + 0.5), mean over the whole map."""
    tm = pytest.importorskip("torchmetrics.functional.image")
    window_size = 2 * int(3.5 * sigma + 0.5) + 1
    x, y = pair((2, 3, 20, 18), seed=6)
    per_image, full = tm.structural_similarity_index_measure(
        x, y, sigma=sigma, data_range=1.0, reduction="none", return_full_image=True)
    ours = fastfuse.ssim_map(x, y, window_size=window_size, sigma=sigma, padding="reflect", backend="torch")
    torch.testing.assert_close(ours, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        fastfuse.ssim(x, y, window_size=window_size, sigma=sigma, padding="reflect", reduction="batch",
                      backend="torch"), per_image, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window_size,sigma", [(7, 1.0), (9, 2.0), (11, 1.5)])
def test_reference_zero_and_valid_match_conv2d_formula(window_size, sigma):
    x, y = pair((2, 2, 16, 13), seed=7)
    zero = fastfuse.ssim_map(x, y, window_size=window_size, sigma=sigma, padding="zero", backend="torch")
    torch.testing.assert_close(zero, conv2d_ssim_map(x, y, window_size, sigma, window_size // 2),
                               rtol=1e-10, atol=1e-12)
    valid = fastfuse.ssim_map(x, y, window_size=window_size, sigma=sigma, padding="valid", backend="torch")
    torch.testing.assert_close(valid, conv2d_ssim_map(x, y, window_size, sigma, 0), rtol=1e-10, atol=1e-12)


def test_reference_data_range_and_constants():
    x, y = pair((1, 1, 15, 15), seed=8)
    scaled = fastfuse.ssim_map(255 * x, 255 * y, data_range=255, padding="zero", backend="torch")
    torch.testing.assert_close(scaled, fastfuse.ssim_map(x, y, padding="zero", backend="torch"))
    custom = fastfuse.ssim_map(x, y, k1=0.02, k2=0.05, padding="zero", backend="torch")
    torch.testing.assert_close(custom, conv2d_ssim_map(x, y, 11, 1.5, 5, c1=0.02 ** 2, c2=0.05 ** 2))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 12])
@pytest.mark.parametrize("radius", [1, 3, 5])
def test_reflect_indices_repeat_mirroring(n, radius):
    """Beyond torch's pad < size limit the extension is numpy's repeated "reflect"; within it, torch's."""
    expected = np.pad(np.arange(n), radius, mode="reflect")
    np.testing.assert_array_equal(ref_ssim.reflect_indices(n, radius).numpy(), expected)
    if radius < n:
        torch_pad = F.pad(torch.arange(n, dtype=torch.float64).view(1, 1, n), (radius, radius), mode="reflect")
        np.testing.assert_array_equal(torch_pad.view(-1).long().numpy(), expected)


def test_reference_reflect_small_image_matches_numpy_padding():
    x, y = pair((1, 2, 3, 2), seed=9)
    r = 5
    xp = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect"))
    yp = torch.from_numpy(np.pad(y.numpy(), ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect"))
    ours = fastfuse.ssim_map(x, y, window_size=11, padding="reflect", backend="torch")
    torch.testing.assert_close(ours, conv2d_ssim_map(xp, yp, 11, 1.5, 0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("padding,shape,window_size", [
    ("valid", (1, 1, 5, 6), 3), ("zero", (1, 1, 4, 3), 5), ("reflect", (1, 1, 4, 3), 5),
    ("reflect", (2, 1, 2, 3), 7)])
def test_gradcheck_reference(padding, shape, window_size):
    x, y = pair(shape, seed=10)
    x.requires_grad_(True)
    y.requires_grad_(True)
    fn = lambda a, b: ref_ssim.ssim_map(a, b, window_size, 1.2, 1.0, 0.01, 0.03, padding)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y))


def test_reference_constant_images():
    for value_x, value_y in ((0.0, 0.0), (0.5, 0.5), (0.3, 0.7)):
        x = torch.full((1, 2, 12, 12), value_x, dtype=torch.float64, requires_grad=True)
        y = torch.full((1, 2, 12, 12), value_y, dtype=torch.float64, requires_grad=True)
        out = fastfuse.ssim_map(x, y, padding="reflect", backend="torch")
        luminance = (2 * value_x * value_y + 1e-4) / (value_x ** 2 + value_y ** 2 + 1e-4)
        torch.testing.assert_close(out, torch.full_like(out, luminance))
        out.sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


def nan_reach(bad: torch.Tensor, window_size: int, padding: str) -> torch.Tensor:
    """Which map pixels have a window that reaches a True pixel of `bad` (B, C, H, W)."""
    f = bad.double()
    r = window_size // 2
    if padding == "reflect":
        f = torch.from_numpy(np.pad(f.numpy(), ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect"))
    ones = torch.ones(f.shape[1], 1, window_size, window_size, dtype=torch.float64)
    return F.conv2d(f, ones, padding=r if padding == "zero" else 0, groups=f.shape[1]) > 0


@pytest.mark.parametrize("padding", PADDINGS)
def test_reference_nan_passthrough(padding):
    x, y = pair((1, 2, 14, 15), seed=11)
    x[0, 0, 2, 3] = float("nan")
    y[0, 1, 9, 14] = float("inf")
    out = fastfuse.ssim_map(x, y, window_size=7, padding=padding, backend="torch")
    bad = torch.zeros_like(x, dtype=torch.bool)
    bad[0, 0, 2, 3] = bad[0, 1, 9, 14] = True
    expected = nan_reach(bad, 7, padding)
    assert expected.any() and not expected.all()
    assert torch.equal(torch.isnan(out), expected)


def test_output_dtype_shape_and_reductions():
    x, y = pair((2, 3, 16, 14), seed=12)
    smap = fastfuse.ssim_map(x, y, backend="torch")
    assert smap.shape == (2, 3, 6, 4)
    assert fastfuse.ssim_map(x, y, padding="zero", backend="torch").shape == x.shape
    none = fastfuse.ssim(x, y, reduction="none", backend="torch")
    batch = fastfuse.ssim(x, y, reduction="batch", backend="torch")
    mean = fastfuse.ssim(x, y, backend="torch")
    torch.testing.assert_close(none, smap.mean(dim=(2, 3)))
    torch.testing.assert_close(batch, smap.mean(dim=(1, 2, 3)))
    assert mean.shape == () and mean.item() == pytest.approx(smap.mean().item())
    assert none.shape == (2, 3) and batch.shape == (2,)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert fastfuse.ssim_map(x.to(dtype), y.to(dtype), backend="torch").dtype == dtype
    assert fastfuse.ssim(x, x, backend="torch").item() == pytest.approx(1.0)


def test_empty_batch_and_channels():
    x = torch.rand(0, 3, 12, 13)
    assert fastfuse.ssim_map(x, x).shape == (0, 3, 2, 3)
    assert fastfuse.ssim_map(x, x, padding="reflect", backend="torch").shape == (0, 3, 12, 13)
    assert fastfuse.ssim(x, x, reduction="none").shape == (0, 3)
    assert fastfuse.ssim(x, x, reduction="batch").shape == (0,)
    z = torch.rand(2, 0, 12, 12)
    assert fastfuse.ssim_map(z, z, padding="zero").shape == (2, 0, 12, 12)


def test_bad_inputs():
    x = torch.rand(1, 3, 16, 16)
    cases = [
        (ValueError, "x must be 4-D", lambda: fastfuse.ssim_map(x[0], x[0])),
        (ValueError, "same shape", lambda: fastfuse.ssim_map(x, torch.rand(1, 3, 16, 15))),
        (TypeError, "dtype", lambda: fastfuse.ssim_map(x.long(), x.long())),
        (TypeError, "same dtype", lambda: fastfuse.ssim_map(x, x.double())),
        (ValueError, "window_size must be odd", lambda: fastfuse.ssim_map(x, x, window_size=10)),
        (ValueError, "window_size must be positive", lambda: fastfuse.ssim_map(x, x, window_size=0)),
        (TypeError, "window_size must be an int", lambda: fastfuse.ssim_map(x, x, window_size=11.0)),
        (TypeError, "window_size must be an int", lambda: fastfuse.ssim_map(x, x, window_size=True)),
        (ValueError, "sigma must be a finite positive", lambda: fastfuse.ssim_map(x, x, sigma=0.0)),
        (ValueError, "sigma must be a finite positive", lambda: fastfuse.ssim_map(x, x, sigma=math.nan)),
        (TypeError, "sigma must be a real number", lambda: fastfuse.ssim_map(x, x, sigma=torch.tensor(1.5))),
        (ValueError, "data_range must be a finite positive", lambda: fastfuse.ssim_map(x, x, data_range=-1)),
        (ValueError, "k1 must be a finite positive", lambda: fastfuse.ssim_map(x, x, k1=0.0)),
        (ValueError, "k2 must be a finite positive", lambda: fastfuse.ssim_map(x, x, k2=math.inf)),
        (ValueError, "padding must be one of", lambda: fastfuse.ssim_map(x, x, padding="same")),
        (ValueError, r"padding='valid' needs H and W >= window_size=11",
         lambda: fastfuse.ssim_map(x[..., :10], x[..., :10])),
        (ValueError, "at least one pixel", lambda: fastfuse.ssim_map(x[..., :0], x[..., :0], padding="zero")),
        (ValueError, "reduction must be one of", lambda: fastfuse.ssim(x, x, reduction="sum")),
        (RuntimeError, "unavailable", lambda: fastfuse.ssim_map(x, x, backend="cuda")),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_large_window_falls_back_under_auto_and_is_refused_explicitly(monkeypatch):
    from fastfuse.triton.ssim import MAX_WINDOW_SIZE
    x, y = pair((1, 1, 6, 5), seed=13, dtype=torch.float32)
    window_size = MAX_WINDOW_SIZE + 2
    expected = fastfuse.ssim_map(x, y, window_size=window_size, padding="reflect", backend="torch")
    got = fastfuse.ssim_map(x, y, window_size=window_size, padding="reflect")
    assert torch.equal(got, expected)
    if fastfuse.backends.unavailable_reason("ssim_map", "triton", x.device) is None:
        with pytest.raises(RuntimeError, match="window_size <= "):
            fastfuse.ssim_map(x, y, window_size=window_size, padding="reflect", backend="triton")
        monkeypatch.setenv("FASTFUSE_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="window_size <= "):
            fastfuse.ssim_map(x, y, window_size=window_size, padding="reflect")


def test_float64_uses_the_reference():
    """The kernels compute in fp32: float64 goes to the reference under "auto", and is refused by name."""
    x, y = pair((1, 2, 13, 12), seed=19)
    expected = ref_ssim.ssim_map(x, y, 11, 1.5, 1.0, 0.01, 0.03, "zero")
    assert torch.equal(fastfuse.ssim_map(x, y, padding="zero"), expected)
    if fastfuse.backends.unavailable_reason("ssim_map", "triton", x.device) is None:
        with pytest.raises(RuntimeError, match="fp32/fp16/bf16"):
            fastfuse.ssim_map(x, y, padding="zero", backend="triton")


def test_real_cave_band(shared_data):
    """One CAVE band against a blurred, noisy copy of itself: our valid SSIM is skimage's."""
    io = pytest.importorskip("scipy.io")
    metrics = pytest.importorskip("skimage.metrics")
    cube = io.loadmat(str(shared_data / "cave" / "feathers.mat"))["orig"]
    band = torch.from_numpy(cube[200:248, 220:268, 15].astype(np.float64) / 255.0).view(1, 1, 48, 48)
    g = torch.Generator().manual_seed(14)
    degraded = ref_ssim.gaussian_filter(band[0], 5, 1.0, "reflect").unsqueeze(0)
    degraded = (degraded + 0.02 * torch.randn(degraded.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    expected = metrics.structural_similarity(band[0, 0].numpy(), degraded[0, 0].numpy(), gaussian_weights=True,
                                             sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert 0.2 < expected < 0.99
    assert fastfuse.ssim(band, degraded, backend="torch").item() == pytest.approx(expected, rel=1e-10)
    got = fastfuse.ssim(band.float(), degraded.float())  # the Triton kernel when it is available
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_torch_compile_fullgraph():
    x, y = pair((1, 2, 14, 13), seed=15, dtype=torch.float32)
    a = x.clone().requires_grad_(True)
    fn = torch.compile(lambda p, q: 1 - fastfuse.ssim(p, q, padding="reflect"), fullgraph=True,
                       backend="aot_eager")
    loss = fn(a, y)
    loss.backward()
    b = x.clone().requires_grad_(True)
    expected = 1 - fastfuse.ssim(b, y, padding="reflect", backend="torch")
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Kernels (Triton under the interpreter on CPU; Triton and CUDA on a GPU) against float64
# ---------------------------------------------------------------------------------------------

def assert_grad_close(got, expected, dtype, name):
    """Gradients sum many window terms of either sign: absolute tolerance relative to their scale."""
    scale = max(1.0, expected.abs().max().item())
    assert_close(got, expected, dtype, rtol_scale=2, atol_scale=scale, name=name)


def check_kernel_against_reference(device, backend, shape, dtype, padding, window_size=11, sigma=1.5, seed=0,
                                   contiguous_y=False):
    x64, y64 = pair(shape, seed=seed)
    x = x64.to(device, dtype).requires_grad_(True)
    y = y64.to(device, dtype)
    y = (y if contiguous_y else non_contiguous(y)).requires_grad_(True)
    out = fastfuse.ssim_map(x, y, window_size=window_size, sigma=sigma, padding=padding, backend=backend)
    # The reference sees the inputs the kernel saw (rounded to dtype), so only kernel error is measured.
    xr = x.detach().double().cpu().requires_grad_(True)
    yr = y.detach().double().cpu().requires_grad_(True)
    ref = ref_ssim.ssim_map(xr, yr, window_size, sigma, 1.0, 0.01, 0.03, padding)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, name=f"map {padding}")
    g = torch.rand(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) - 0.3
    g = g.to(dtype)
    out.backward(g.to(device))
    ref.backward(g.double())
    assert x.grad.dtype == dtype and y.grad.dtype == dtype
    assert_grad_close(x.grad, xr.grad, dtype, f"dx {padding}")
    assert_grad_close(y.grad, yr.grad, dtype, f"dy {padding}")


KERNEL_SHAPES = [(1, 1, 1, 1), (1, 1, 4, 6), (2, 3, 13, 17), (1, 2, 50, 9)]


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", backend_params("ssim_map"))
def test_kernel_forward_backward(shape, padding, dtype, device, backend):
    if padding == "valid" and min(shape[-2:]) < 11:
        pytest.skip("'valid' needs the image to be at least the window (a checked error)")
    check_kernel_against_reference(device, backend, shape, dtype, padding)


@pytest.mark.parametrize("window_size,sigma", [(7, 1.0), (7, 2.0), (9, 1.5), (11, 1.0), (11, 2.0), (9, 0.3),
                                               (15, 2.5), (25, 4.0)])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("device,backend", backend_params("ssim_map"))
def test_kernel_window_sizes_and_sigmas(window_size, sigma, padding, device, backend):
    if padding == "valid" and window_size > 19:
        pytest.skip("'valid' needs the image to be at least the window (a checked error)")
    check_kernel_against_reference(device, backend, (1, 1, 19, 21), torch.float32, padding, window_size, sigma,
                                   seed=window_size, contiguous_y=True)


@pytest.mark.parametrize("sigma", [1e-30, 1e-200, 1e30])
@pytest.mark.parametrize("device,backend", [("cpu", "torch")] + backend_params("ssim_map"))
def test_extreme_sigmas(sigma, device, backend):
    """σ → 0 is the one-tap window (σ² = 0 at each pixel: only luminance), σ → ∞ the uniform one."""
    x, y = pair((1, 1, 9, 8), seed=20, dtype=torch.float32)
    out = fastfuse.ssim_map(x.to(device), y.to(device), window_size=5, sigma=sigma, padding="zero",
                            backend=backend).cpu().double()
    xd, yd = x.double(), y.double()
    if sigma < 1:
        expected = (2 * xd * yd + 1e-4) / (xd ** 2 + yd ** 2 + 1e-4)
    else:
        ones = torch.ones(1, 1, 5, 5, dtype=torch.float64) / 25
        mx, my = F.conv2d(xd, ones, padding=2), F.conv2d(yd, ones, padding=2)
        vx, vy = F.conv2d(xd * xd, ones, padding=2) - mx ** 2, F.conv2d(yd * yd, ones, padding=2) - my ** 2
        cxy = F.conv2d(xd * yd, ones, padding=2) - mx * my
        expected = (2 * mx * my + 1e-4) * (2 * cxy + 9e-4) / ((mx ** 2 + my ** 2 + 1e-4) * (vx + vy + 9e-4))
    assert_close(out, expected, torch.float32, name=f"sigma={sigma}")


def _triton_ssim_or_skip():
    from fastfuse import backends
    if backends.unavailable_reason("ssim_map", "triton", torch.device("cpu")) is not None:
        pytest.skip("the triton backend is unavailable on CPU (set TRITON_INTERPRET=1)")
    from fastfuse.triton import ssim
    return ssim


def check_triton_launchers(shape, padding, window_size, dtype=torch.float32, tile=None, need=(True, True),
                           transpose=False, seed=0, tight=True):
    """The launchers against float64 (inputs rounded to dtype first): map, then each needed gradient;
    an unneeded one must come back empty. tight: fp32 within a few ulps of the moments' scale
    (centred moments), far inside the project tolerance, so a wrong tap or fold cannot hide."""
    ssim = _triton_ssim_or_skip()
    x64, y64 = pair(shape, seed=seed)
    x, y = x64.to(dtype), y64.to(dtype)
    if transpose:
        x, y = non_contiguous(x), non_contiguous(y)
    args = (window_size, 1.5, 1.0, 0.01, 0.03, padding)
    out = ssim.ssim_map_forward(x, y, *args, tile=tile)
    xr, yr = x.double().requires_grad_(True), y.double().requires_grad_(True)
    ref = ref_ssim.ssim_map(xr, yr, *args)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, name="map")
    g = (torch.rand(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) - 0.3).to(dtype)
    ref.backward(g.double())
    dx, dy = ssim.ssim_map_backward(g, x, y, *args, *need, tile=tile)
    if tight:
        assert (out.double() - ref).abs().max().item() < 2e-5
    for got, expected, needed, name in ((dx, xr.grad, need[0], "dx"), (dy, yr.grad, need[1], "dy")):
        if not needed:
            assert got.numel() == 0, name
            continue
        assert got.dtype == dtype and got.shape == x.shape, name
        assert_grad_close(got, expected, dtype, name)
        if tight:
            assert (got.double() - expected).abs().max().item() < 2e-5 * max(1.0, expected.abs().max().item()), name


@pytest.mark.parametrize("tile,window_size,shape", [((8, 32), 7, (1, 1, 41, 47)), ((20, 64), 11, (1, 1, 50, 58))])
@pytest.mark.parametrize("padding", PADDINGS)
def test_triton_tilings(tile, window_size, shape, padding):
    """Several row chunks and column strips (forward and backward), ragged last tiles."""
    check_triton_launchers(shape, padding, window_size, tile=tile, seed=tile[0])


@pytest.mark.parametrize("shape,padding,window_size,dtype,tile,need,transpose", [
    ((1, 1, 11, 13), "valid", 11, torch.float32, None, (True, True), False),  # H = window: one map row
    ((1, 1, 13, 11), "valid", 11, torch.bfloat16, None, (True, False), False),  # W = window: one map column
    ((1, 1, 2, 3), "reflect", 7, torch.float16, None, (False, True), False),  # smaller than the radius
    ((1, 1, 1, 5), "zero", 5, torch.float32, None, (True, True), True),
    ((2, 1, 9, 40), "zero", 5, torch.float32, (4, 32), (True, True), True),  # chunks and strips, ragged
    ((1, 2, 21, 35), "reflect", 9, torch.float32, (6, 32), (True, False), True),
    ((1, 1, 12, 33), "valid", 9, torch.float16, (1, 32), (False, True), False),  # one-row chunks
    ((1, 1, 5, 6), "zero", 1, torch.float32, None, (True, True), False),  # one tap: no sliding state
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) and all(isinstance(i, int) for i in v) else str(v))
def test_triton_tile_boundaries(shape, padding, window_size, dtype, tile, need, transpose):
    """Shapes at the tiles' edges, windows as large as the image, every gradient selection,
    half-precision inputs and transposed strides, against float64."""
    check_triton_launchers(shape, padding, window_size, dtype, tile, need, transpose,
                           tight=dtype == torch.float32 and window_size > 1)


@pytest.mark.parametrize("padding", PADDINGS)
def test_triton_backward_persistent_programs(padding, monkeypatch):
    """Fewer backward programs than tiles: each program walks several (row chunk, strip) tiles and
    reuses its scratch slots."""
    ssim = _triton_ssim_or_skip()
    monkeypatch.setattr(ssim, "MAX_PROGRAMS", 3)
    check_triton_launchers((2, 1, 17, 30), padding, 5, tile=(5, 32), seed=3)


def test_triton_tiling_choice():
    """Default tiles: wide images get 128-column strips and enough row chunks for the GPU, each
    chunk at least four halos tall; narrow ones one strip."""
    ssim = _triton_ssim_or_skip()
    assert ssim.strip_width(1910, 0) == 128 and ssim.strip_width(1920, 10) == 128
    assert ssim.strip_width(20, 10) == 32 and ssim.strip_width(100, 0) == 128
    assert ssim.chunk_rows(1070, 375, 10) == -(-1070 // (ssim.MAX_PROGRAMS // 375))  # 214 rows, 1875 programs
    assert ssim.chunk_rows(502, 124, 10) == 40 and ssim.chunk_rows(3, 1, 0) == 16
    with pytest.raises(ValueError, match="tile must be"):
        ssim.ssim_map_forward(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), 3, 1.5, 1.0, 0.01, 0.03, "zero",
                              tile=(4, 48))


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("device,backend", backend_params("ssim_map"))
def test_kernel_constant_images(padding, device, backend):
    for value_x, value_y in ((0.0, 0.0), (0.8, 0.8), (0.3, 0.7)):
        x = torch.full((1, 2, 12, 13), value_x, device=device, requires_grad=True)
        y = torch.full((1, 2, 12, 13), value_y, device=device, requires_grad=True)
        out = fastfuse.ssim_map(x, y, padding=padding, backend=backend)
        xr = torch.full((1, 2, 12, 13), value_x, dtype=torch.float64, requires_grad=True)
        yr = torch.full((1, 2, 12, 13), value_y, dtype=torch.float64, requires_grad=True)
        ref = ref_ssim.ssim_map(xr, yr, 11, 1.5, 1.0, 0.01, 0.03, padding)
        assert_close(out, ref, torch.float32, name="map")
        out.sum().backward()  # an expanded, stride-0 incoming gradient
        ref.sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
        assert_grad_close(x.grad, xr.grad, torch.float32, "dx")
        assert_grad_close(y.grad, yr.grad, torch.float32, "dy")


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("device,backend", backend_params("ssim_map"))
def test_kernel_nan_passthrough(padding, device, backend):
    """NaN/inf reach exactly the map values (and gradients) whose windows reach them, as in the reference."""
    x, y = pair((1, 2, 20, 23), seed=16)
    x[0, 0, 5, 7] = float("nan")
    y[0, 1, 15, 3] = float("inf")
    g = torch.rand(fastfuse.ssim_map(x, y, window_size=7, padding=padding, backend="torch").shape,
                   dtype=torch.float64)
    g[0, 1, 0, 0] = float("nan")
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    ref = ref_ssim.ssim_map(xr, yr, 7, 1.5, 1.0, 0.01, 0.03, padding)
    ref.backward(g)
    xk = x.to(device, torch.float32).requires_grad_(True)
    yk = y.to(device, torch.float32).requires_grad_(True)
    out = fastfuse.ssim_map(xk, yk, window_size=7, padding=padding, backend=backend)
    out.backward(g.to(device, torch.float32))
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(ref))
    finite = ~torch.isnan(ref)
    assert_close(out.cpu()[finite], ref[finite], torch.float32, name="map")
    for got, expected, name in ((xk.grad, xr.grad, "dx"), (yk.grad, yr.grad, "dy")):
        assert torch.equal(torch.isnan(got).cpu(), torch.isnan(expected)), name
        keep = ~torch.isnan(expected)
        assert keep.any()
        assert_grad_close(got.cpu()[keep], expected[keep], torch.float32, name)


@pytest.mark.parametrize("device,backend", backend_params("ssim_map"))
def test_kernel_gradient_only_where_needed(device, backend):
    x, y = pair((2, 1, 15, 12), seed=17, dtype=torch.float32)
    x = x.to(device).requires_grad_(True)
    y = y.to(device)
    loss = 1 - fastfuse.ssim(x, y, padding="zero", backend=backend)
    loss.backward()
    xr = x.detach().double().cpu().requires_grad_(True)
    (1 - ref_ssim.ssim(xr, y.double().cpu(), padding="zero")).backward()
    assert y.grad is None
    assert_grad_close(x.grad, xr.grad, torch.float32, "dx")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_real_shapes(padding, dtype):
    """A realistic training batch (4 × 31 bands × 256²) on the GPU, every available kernel backend."""
    for backend in ("triton", "cuda"):
        if fastfuse.backends.unavailable_reason("ssim_map", backend, torch.device("cuda")) is not None:
            continue
        x64, y64 = pair((4, 31, 256, 256), seed=18)
        x = x64.cuda().to(dtype).requires_grad_(True)
        y = y64.cuda().to(dtype).requires_grad_(True)
        out = fastfuse.ssim_map(x, y, padding=padding, backend=backend)
        xr = x.detach().double().requires_grad_(True)
        yr = y.detach().double().requires_grad_(True)
        ref = ref_ssim.ssim_map(xr, yr, 11, 1.5, 1.0, 0.01, 0.03, padding)
        assert_close(out, ref, dtype, name=f"{backend} map")
        g = torch.rand_like(ref)
        out.backward(g.to(dtype))
        ref.backward(g.to(dtype).double())
        assert_grad_close(x.grad, xr.grad, dtype, f"{backend} dx")
        assert_grad_close(y.grad, yr.grad, dtype, f"{backend} dy")



# ------------------------------------------------------------------ the documented fp32 range
@pytest.mark.parametrize("scale", [1e-6, 1e4, 1e9])
@pytest.mark.parametrize("device,backend", backend_params("ssim_map") + [pytest.param("cpu", "torch", id="cpu-torch")])
def test_fp32_range_of_every_backend(scale, device, backend):
    """Within the documented range (|data|, data_range ≤ 1e9) every backend matches float64."""
    torch.manual_seed(0)
    x, y = torch.rand(1, 2, 13, 14, dtype=torch.float64), torch.rand(1, 2, 13, 14, dtype=torch.float64)
    expected = fastfuse.ssim_map(x * scale, y * scale, data_range=scale, backend="torch")
    got = fastfuse.ssim_map((x * scale).float().to(device), (y * scale).float().to(device), data_range=scale,
                            backend=backend)
    torch.testing.assert_close(got.double().cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e12, 1e20, 1e30])
def test_torch_backend_fp32_rescales_huge_data(scale):
    """The torch backend's fp32 formula divides by a power of two: finite and exact for any finite data."""
    torch.manual_seed(0)
    x, y = torch.rand(1, 2, 13, 14, dtype=torch.float64), torch.rand(1, 2, 13, 14, dtype=torch.float64)
    for data_range, other in ((scale, y * scale), (1.0, y)):  # both on the huge scale; one huge, one unit
        expected = fastfuse.ssim_map(x * scale, other, data_range=data_range, backend="torch")
        got = fastfuse.ssim_map((x * scale).float(), other.float(), data_range=data_range, backend="torch")
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
