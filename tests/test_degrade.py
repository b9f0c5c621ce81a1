import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastfuse
from testing_utils import DTYPES, assert_close, backend_params, non_contiguous

PADDINGS = ("circular", "reflect", "zero")


# ---------------------------------------------------------------------------------------------
# Oracles, written independently of fastfuse.reference.degrade.

def fft_degrade(z: torch.Tensor, kernel: torch.Tensor, ratio: int, offset=None) -> torch.Tensor:
    """psf2otf-style circular blur (MoG-DCN): the kernel zero-padded to the image, circularly
    shifted so that its element (k//2, k//2) sits at the origin, multiplied in the Fourier domain;
    then every ratio-th pixel from offset (default ratio//2 - 1)."""
    H, W = z.shape[-2:]
    k = kernel.shape[-1]
    off = max(ratio // 2 - 1, 0) if offset is None else offset
    psf = torch.zeros(*kernel.shape[:-2], H, W, dtype=z.dtype)
    psf[..., :k, :k] = kernel
    otf = torch.fft.fft2(torch.roll(psf, shifts=(-(k // 2), -(k // 2)), dims=(-2, -1)))
    blurred = torch.fft.ifft2(torch.fft.fft2(z) * otf).real
    return blurred[..., off::ratio, off::ratio][..., :H // ratio, :W // ratio]


def conv_degrade(z, kernel, ratio, padding, offset):
    """F.pad with torch's mode, then F.conv2d (a correlation: flip the kernel for a convolution)."""
    k = kernel.shape[-1]
    before, after = k - 1 - k // 2, k // 2
    zp = F.pad(z, (before, after, before, after), mode="constant" if padding == "zero" else "reflect")
    C = z.shape[1]
    weight = kernel.flip(-1, -2).expand(C, k, k)[:, None]
    blurred = F.conv2d(zp, weight, groups=C)
    H, W = z.shape[-2:]
    return blurred[..., offset::ratio, offset::ratio][..., :H // ratio, :W // ratio]


def gaussian_kernel(k: int, sigma: float, dtype=torch.float64) -> torch.Tensor:
    t = torch.arange(k, dtype=dtype) - (k - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def rand(*shape, g, dtype=torch.float64):
    return torch.rand(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Reference semantics (torch backend, float64)

def test_spectral_response_matches_einsum():
    g = torch.Generator().manual_seed(0)
    z, R = rand(2, 31, 5, 7, g=g), rand(3, 31, g=g)
    out = fastfuse.spectral_response(z, R, backend="torch")
    torch.testing.assert_close(out, torch.einsum("oc,bchw->bohw", R, z))
    # R may have its own dtype (an fp32 parameter with float64 images): output in z's dtype.
    out32 = fastfuse.spectral_response(z, R.float(), backend="torch")
    assert out32.dtype == torch.float64
    torch.testing.assert_close(out32, torch.einsum("oc,bchw->bohw", R.float().double(), z))


@pytest.mark.parametrize("H,W,k,ratio,offset", [(16, 12, 5, 4, None), (17, 13, 8, 4, 3), (8, 8, 8, 8, None),
                                                 (5, 7, 3, 1, None), (9, 6, 2, 3, 2)])
def test_spatial_degrade_circular_matches_fft(H, W, k, ratio, offset):
    g = torch.Generator().manual_seed(1)
    z = rand(2, 3, H, W, g=g)
    for kernel in (rand(k, k, g=g), rand(3, k, k, g=g)):
        out = fastfuse.spatial_degrade(z, kernel, ratio, offset=offset, backend="torch")
        assert out.shape == (2, 3, H // ratio, W // ratio)
        torch.testing.assert_close(out, fft_degrade(z, kernel, ratio, offset))


@pytest.mark.parametrize("padding", ["zero", "reflect"])
@pytest.mark.parametrize("H,W,k,ratio,offset", [(16, 12, 5, 4, 1), (11, 13, 8, 2, 0), (6, 6, 11, 2, 1)])
def test_spatial_degrade_matches_conv2d(padding, H, W, k, ratio, offset):
    g = torch.Generator().manual_seed(2)
    z = rand(1, 2, H, W, g=g)
    for kernel in (rand(k, k, g=g), rand(2, k, k, g=g)):
        out = fastfuse.spatial_degrade(z, kernel, ratio, padding=padding, offset=offset, backend="torch")
        torch.testing.assert_close(out, conv_degrade(z, kernel, ratio, padding, offset))


def test_default_offset_and_kernel_origin():
    z = torch.arange(2 * 16 * 16, dtype=torch.float64).view(1, 2, 16, 16)
    delta = torch.zeros(3, 3, dtype=torch.float64)
    delta[1, 1] = 1.0  # the origin of an odd kernel: its centre
    for ratio in (1, 2, 4, 8):
        off = max(ratio // 2 - 1, 0)
        torch.testing.assert_close(fastfuse.spatial_degrade(z, delta, ratio, backend="torch"),
                                   z[..., off::ratio, off::ratio])
    # Even kernel: the origin is element (k//2, k//2); a delta one step before it shifts by +1.
    delta4 = torch.zeros(4, 4, dtype=torch.float64)
    delta4[1, 2] = 1.0
    out = fastfuse.spatial_degrade(z, delta4, 4, offset=(0, 0), backend="torch")
    torch.testing.assert_close(out, z[..., 1::4, 0::4])


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("H,W,k,ratio,offset", [(16, 12, 5, 4, None), (17, 13, 8, 4, (0, 3)), (6, 5, 11, 2, 1),
                                                 (1, 1, 3, 1, None), (7, 7, 1, 7, 6)])
def test_adjoint_inner_product(padding, H, W, k, ratio, offset):
    g = torch.Generator().manual_seed(3)
    z = rand(2, 3, H, W, g=g)
    for kernel in (rand(k, k, g=g), rand(3, k, k, g=g)):
        Az = fastfuse.spatial_degrade(z, kernel, ratio, padding=padding, offset=offset, backend="torch")
        x = rand(*Az.shape, g=g)
        ATx = fastfuse.spatial_degrade_adjoint(x, kernel, ratio, (H, W), padding=padding, offset=offset,
                                               backend="torch")
        assert ATx.shape == z.shape
        lhs, rhs = (Az * x).sum().item(), (z * ATx).sum().item()
        assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


def test_gradcheck_reference():
    g = torch.Generator().manual_seed(4)
    z = rand(1, 2, 5, 4, g=g).requires_grad_(True)
    kernel = rand(2, 3, 3, g=g).requires_grad_(True)
    R = rand(3, 2, g=g).requires_grad_(True)
    x = rand(1, 2, 2, 2, g=g).requires_grad_(True)
    # fast_mode: the Jacobian is probed along random directions, enough for these linear maps.
    check = lambda fn, inputs: torch.autograd.gradcheck(fn, inputs, fast_mode=True)  # noqa: E731
    assert check(lambda a, r: fastfuse.spectral_response(a, r, backend="torch"), (z, R))
    for padding in PADDINGS:
        assert check(lambda a, kk: fastfuse.spatial_degrade(a, kk, 2, padding=padding, backend="torch"), (z, kernel))
        assert check(lambda a, kk: fastfuse.spatial_degrade_adjoint(a, kk, 2, (5, 4), padding=padding,
                                                                    backend="torch"), (x, kernel))
    assert torch.autograd.gradcheck(
        lambda a, kk, b: fastfuse.spatial_degrade_sam(a, kk, 2, b, padding="reflect", backend="torch"),
        (z, kernel, x))


def test_spectral_response_ssim_reference_composes():
    pytest.importorskip("fastfuse.reference.ssim")
    g = torch.Generator().manual_seed(5)
    z = rand(1, 4, 12, 12, g=g).requires_grad_(True)
    R = rand(2, 4, g=g).requires_grad_(True)
    y = rand(1, 2, 12, 12, g=g).requires_grad_(True)
    y_pseudo, smap = fastfuse.spectral_response_ssim(z, R, y, window_size=5, backend="torch")
    torch.testing.assert_close(y_pseudo, torch.einsum("oc,bchw->bohw", R, z))
    torch.testing.assert_close(smap, fastfuse.ssim_map(y_pseudo, y, window_size=5, backend="torch"))
    assert smap.shape == (1, 2, 8, 8)
    assert torch.autograd.gradcheck(
        lambda a, r, b: fastfuse.spectral_response_ssim(a, r, b, window_size=3, padding="reflect", backend="torch"),
        (z[:, :, :4, :3].detach().requires_grad_(True), R, y[:, :, :4, :3].detach().requires_grad_(True)),
        fast_mode=True)


def test_spatial_degrade_sam_reference_composes():
    g = torch.Generator().manual_seed(6)
    z = rand(2, 5, 8, 8, g=g)
    kernel = gaussian_kernel(4, 1.0)
    x = rand(2, 5, 2, 2, g=g)
    x_pseudo, sam = fastfuse.spatial_degrade_sam(z, kernel, 4, x, backend="torch")
    torch.testing.assert_close(x_pseudo, fft_degrade(z, kernel, 4))
    torch.testing.assert_close(sam, fastfuse.sam_map(x_pseudo, x, backend="torch"))
    _, radians = fastfuse.spatial_degrade_sam(z, kernel, 4, x, degrees=False, backend="torch")
    torch.testing.assert_close(radians * 180 / math.pi, sam)


def test_real_data_nikon_response_and_daem_blur(shared_data):
    sio = pytest.importorskip("scipy.io")
    cube = sio.loadmat(shared_data / "cave" / "feathers.mat")["orig"][200:264, 100:164]  # H × W × 31, uint8
    z = torch.from_numpy(cube.astype(np.float64) / 255.0).permute(2, 0, 1)[None]
    srf = sio.loadmat(shared_data / "srf" / "srf_nikon_d700_daem.mat")["srf"]  # 31 × 3, columns B, G, R
    R = torch.from_numpy(srf.T.copy())
    y = fastfuse.spectral_response(z, R, backend="torch")
    np.testing.assert_allclose(y[0].numpy(), np.einsum("hwc,co->ohw", cube / 255.0, srf), rtol=1e-12, atol=1e-12)
    # Columns sum to 1: a spectrally flat scene maps to the same grey level in every channel.
    flat = fastfuse.spectral_response(torch.full((1, 31, 2, 2), 0.3, dtype=torch.float64), R, backend="torch")
    torch.testing.assert_close(flat, torch.full((1, 3, 2, 2), 0.3, dtype=torch.float64))

    kernel = torch.from_numpy(sio.loadmat(shared_data / "blur_kernels" / "daem_32x32_0.mat")["data"])
    lr = fastfuse.spatial_degrade(z, kernel, 32, backend="torch")  # DAEM: 32 × 32 kernel, ratio 32
    assert lr.shape == (1, 31, 2, 2)
    torch.testing.assert_close(lr, fft_degrade(z, kernel, 32))
    f_set = sio.loadmat(shared_data / "blur_kernels" / "f_set_13_to_35.mat")["f_set"]
    odd = torch.from_numpy(f_set[0, 0].astype(np.float64))  # 13 × 13
    torch.testing.assert_close(fastfuse.spatial_degrade(z, odd, 8, backend="torch"), fft_degrade(z, odd, 8))


def test_bad_inputs():
    z = torch.rand(1, 3, 8, 8)
    kernel = torch.rand(3, 3)
    with pytest.raises(ValueError, match="kernel must be square"):
        fastfuse.spatial_degrade(z, torch.rand(3, 4), 2)
    with pytest.raises(ValueError, match=r"per-band kernel must have shape \(C, k, k\) with C = 3"):
        fastfuse.spatial_degrade(z, torch.rand(2, 3, 3), 2)
    with pytest.raises(ValueError, match="kernel must be 2-D or 3-D"):
        fastfuse.spatial_degrade(z, torch.rand(3), 2)
    with pytest.raises(ValueError, match="kernel must not be empty"):
        fastfuse.spatial_degrade(z, torch.rand(0, 0), 2)
    with pytest.raises(ValueError, match="ratio must be positive"):
        fastfuse.spatial_degrade(z, kernel, 0)
    with pytest.raises(TypeError, match="ratio must be an int"):
        fastfuse.spatial_degrade(z, kernel, 2.0)
    with pytest.raises(ValueError, match="padding must be one of"):
        fastfuse.spatial_degrade(z, kernel, 2, padding="replicate")
    with pytest.raises(ValueError, match=r"offset must lie in \[0, ratio\)"):
        fastfuse.spatial_degrade(z, kernel, 2, offset=2)
    with pytest.raises(TypeError, match="offset must be None, an int or a pair"):
        fastfuse.spatial_degrade(z, kernel, 2, offset=(0, 0, 0))
    with pytest.raises(ValueError, match="at least ratio"):
        fastfuse.spatial_degrade(z, kernel, 9)
    with pytest.raises(ValueError, match="z must be 4-D"):
        fastfuse.spatial_degrade(z[0], kernel, 2)
    with pytest.raises(TypeError, match="z must have dtype"):
        fastfuse.spatial_degrade(z.int(), kernel, 2)
    with pytest.raises(ValueError, match=r"R must have shape \(c, C\) with C = 3"):
        fastfuse.spectral_response(z, torch.rand(3, 4))
    with pytest.raises(TypeError, match="R must have dtype"):
        fastfuse.spectral_response(z, torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H // ratio, W // ratio\)"):
        fastfuse.spatial_degrade_adjoint(torch.rand(1, 3, 3, 4), kernel, 2, (8, 8))
    with pytest.raises(TypeError, match="size must be a pair"):
        fastfuse.spatial_degrade_adjoint(torch.rand(1, 3, 4, 4), kernel, 2, 8)
    with pytest.raises(ValueError, match=r"x must have shape \(1, 3, 4, 4\)"):
        fastfuse.spatial_degrade_sam(z, kernel, 2, torch.rand(1, 3, 8, 8))
    with pytest.raises(TypeError, match="same dtype"):
        fastfuse.spatial_degrade_sam(z, kernel, 2, torch.rand(1, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"y must have shape \(1, 2, 8, 8\)"):
        fastfuse.spectral_response_ssim(z, torch.rand(2, 3), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="window_size must be odd"):
        fastfuse.spectral_response_ssim(z, torch.rand(2, 3), torch.rand(1, 2, 8, 8), window_size=4)
    with pytest.raises(ValueError, match="one device"):
        fastfuse.spatial_degrade(z, kernel.to("meta"), 2)
    with pytest.raises(ValueError, match="one device"):
        fastfuse.spectral_response(z, torch.rand(2, 3, device="meta"))
    with pytest.raises(RuntimeError, match="unavailable"):
        fastfuse.spatial_degrade(z, kernel, 2, backend="cuda")


def test_empty_batch():
    kernel = torch.rand(3, 3)
    assert fastfuse.spatial_degrade(torch.rand(0, 3, 8, 8), kernel, 2).shape == (0, 3, 4, 4)
    assert fastfuse.spatial_degrade_adjoint(torch.rand(0, 3, 4, 4), kernel, 2, (8, 8)).shape == (0, 3, 8, 8)
    assert fastfuse.spectral_response(torch.rand(0, 3, 8, 8), torch.rand(2, 3)).shape == (0, 2, 8, 8)
    xp, sam = fastfuse.spatial_degrade_sam(torch.rand(0, 3, 8, 8), kernel, 2, torch.rand(0, 3, 4, 4))
    assert xp.shape == (0, 3, 4, 4) and sam.shape == (0, 4, 4)


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(7)
    z = rand(1, 4, 8, 8, g=g, dtype=torch.float32).requires_grad_(True)
    R = rand(2, 4, g=g, dtype=torch.float32)
    kernel = gaussian_kernel(4, 1.0, torch.float32)
    x = rand(1, 4, 2, 2, g=g, dtype=torch.float32)

    def loss(z):
        y = fastfuse.spectral_response(z, R)
        x_pseudo, sam = fastfuse.spatial_degrade_sam(z, kernel, 4, x)
        back = fastfuse.spatial_degrade_adjoint(x_pseudo, kernel, 4, (8, 8), padding="reflect")
        return y.square().sum() + sam.sum() + back.sum() + fastfuse.spatial_degrade(z, kernel, 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(z).backward()
    grad = z.grad.clone()
    z.grad = None
    loss(z).backward()
    torch.testing.assert_close(grad, z.grad)


# ---------------------------------------------------------------------------------------------
# Kernels (triton through the interpreter on CPU), against the float64 reference. Inputs are
# rounded to the kernel dtype first, so only the kernel's arithmetic is measured.

def _rounded(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype).double()


@pytest.mark.parametrize("shape,bands", [((2, 31, 5, 7), 3), ((1, 1, 1, 1), 1), ((1, 20, 9, 33), 17)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", backend_params("spectral_response"))
def test_kernel_spectral_response(shape, bands, dtype, device, backend):
    g = torch.Generator().manual_seed(8)
    z64 = _rounded(rand(*shape, g=g), dtype)
    R64 = rand(bands, shape[1], g=g) / shape[1]
    z = non_contiguous(z64.to(device, dtype)).requires_grad_(True)
    R = R64.float().to(device).requires_grad_(True)  # an fp32 parameter, whatever the image dtype
    out = fastfuse.spectral_response(z, R, backend=backend)
    zr, Rr = z64.clone().requires_grad_(True), R64.float().double().requires_grad_(True)
    ref = fastfuse.spectral_response(zr, Rr, backend="torch")
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, name="y")
    grad = _rounded(rand(*ref.shape, g=g), dtype)
    dz, dR = torch.autograd.grad(out, (z, R), grad.to(device, dtype))
    dzr, dRr = torch.autograd.grad(ref, (zr, Rr), grad)
    assert dz.dtype == dtype and dR.dtype == torch.float32
    assert_close(dz, dzr, dtype, name="dz")
    # dR sums over every pixel: compare relative to its scale.
    assert_close(dR / dRr.abs().max(), dRr / dRr.abs().max(), dtype, name="dR")


DEGRADE_CASES = [  # (B, C, H, W, k, ratio, offset, per-band kernel)
    (1, 2, 9, 7, 3, 2, None, False),
    (2, 1, 8, 8, 4, 4, (0, 3), True),
    (1, 1, 4, 3, 5, 2, (1, 0), True),  # kernel wider than the image: repeated wrapping / mirroring
]


def _degrade_inputs(case, dtype, device, g):
    B, C, H, W, k, ratio, offset, per_band = case
    z64 = _rounded(rand(B, C, H, W, g=g), dtype)
    kernel64 = rand(C, k, k, g=g) if per_band else rand(k, k, g=g)
    kernel64 = (kernel64 / kernel64.sum((-1, -2), keepdim=True)).float().double()
    z = non_contiguous(z64.to(device, dtype)).requires_grad_(True)
    kernel = kernel64.float().to(device).requires_grad_(True)
    return z64, kernel64, z, kernel, ratio, offset


@pytest.mark.parametrize("case", DEGRADE_CASES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", backend_params("spatial_degrade"))
def test_kernel_spatial_degrade(case, padding, dtype, device, backend):
    if dtype != torch.float32 and (case is not DEGRADE_CASES[0] or padding != "reflect"):
        pytest.skip("half dtypes on one shape and padding only (dtype handling does not depend on them), "
                    "to keep the interpreter run short")
    g = torch.Generator().manual_seed(9)
    z64, kernel64, z, kernel, ratio, offset = _degrade_inputs(case, dtype, device, g)
    out = fastfuse.spatial_degrade(z, kernel, ratio, padding=padding, offset=offset, backend=backend)
    zr, kr = z64.clone().requires_grad_(True), kernel64.clone().requires_grad_(True)
    ref = fastfuse.spatial_degrade(zr, kr, ratio, padding=padding, offset=offset, backend="torch")
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, name="x")
    grad = _rounded(rand(*ref.shape, g=g), dtype)
    dz, dk = torch.autograd.grad(out, (z, kernel), grad.to(device, dtype))
    dzr, dkr = torch.autograd.grad(ref, (zr, kr), grad)
    assert dz.dtype == dtype and dk.dtype == torch.float32
    assert_close(dz, dzr, dtype, name="dz")
    assert_close(dk / dkr.abs().max(), dkr / dkr.abs().max(), dtype, name="dkernel")

    # The adjoint kernel, forward and backward, on the same problem.
    x64 = _rounded(rand(*ref.shape, g=g), dtype)
    x = non_contiguous(x64.to(device, dtype)).requires_grad_(True)
    back = fastfuse.spatial_degrade_adjoint(x, kernel, ratio, z.shape[-2:], padding=padding, offset=offset,
                                            backend=backend)
    xr = x64.clone().requires_grad_(True)
    back_ref = fastfuse.spatial_degrade_adjoint(xr, kr, ratio, z.shape[-2:], padding=padding, offset=offset,
                                                backend="torch")
    assert back.dtype == dtype and back.shape == z.shape
    assert_close(back, back_ref, dtype, name="adjoint")
    grad = _rounded(rand(*back_ref.shape, g=g), dtype)
    (dx,) = torch.autograd.grad(back, (x,), grad.to(device, dtype))
    (dxr,) = torch.autograd.grad(back_ref, (xr,), grad)
    assert_close(dx, dxr, dtype, name="adjoint dx")


@pytest.mark.parametrize("case", DEGRADE_CASES[:2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", backend_params("spatial_degrade_sam"))
def test_kernel_spatial_degrade_sam(case, dtype, device, backend):
    g = torch.Generator().manual_seed(10)
    z64, kernel64, z, kernel, ratio, offset = _degrade_inputs(case, dtype, device, g)
    B, C, H, W = z64.shape
    x64 = _rounded(rand(B, C, H // ratio, W // ratio, g=g) + 0.05, dtype)
    x = non_contiguous(x64.to(device, dtype)).requires_grad_(True)
    x_pseudo, sam = fastfuse.spatial_degrade_sam(z, kernel, ratio, x, padding="reflect", offset=offset,
                                                 backend=backend)
    zr, kr, xr = (t.clone().requires_grad_(True) for t in (z64, kernel64, x64))
    x_pseudo_ref, sam_ref = fastfuse.spatial_degrade_sam(zr, kr, ratio, xr, padding="reflect", offset=offset,
                                                         backend="torch")
    assert x_pseudo.dtype == sam.dtype == dtype and sam.shape == sam_ref.shape
    assert_close(x_pseudo, x_pseudo_ref, dtype, name="x_pseudo")
    # Angles in degrees (up to 180) from X' rounded to the dtype: absolute tolerance scaled as in
    # test_sam.
    assert_close(sam, sam_ref, dtype, atol_scale=10, name="sam")
    g_x = _rounded(rand(*x_pseudo_ref.shape, g=g), dtype)
    g_sam = _rounded(rand(*sam_ref.shape, g=g), dtype) / 100
    dz, dk, dx = torch.autograd.grad((x_pseudo, sam), (z, kernel, x), (g_x.to(device, dtype), g_sam.to(device, dtype)))
    dzr, dkr, dxr = torch.autograd.grad((x_pseudo_ref, sam_ref), (zr, kr, xr), (g_x, g_sam))
    assert_close(dz, dzr, dtype, rtol_scale=5, atol_scale=10, name="dz")
    assert_close(dx, dxr, dtype, rtol_scale=5, atol_scale=10, name="dx")
    assert_close(dk / dkr.abs().max(), dkr / dkr.abs().max(), dtype, rtol_scale=5, atol_scale=10, name="dkernel")


@pytest.mark.parametrize("device,backend", backend_params("spatial_degrade_sam"))
def test_kernel_sam_zero_and_identical_spectra(device, backend):
    z = torch.rand(1, 3, 4, 4, device=device)
    delta = torch.zeros(1, 1, device=device)
    delta[0, 0] = 1.0  # ratio 2, 1×1 kernel: X' = z[..., 0::2, 0::2]
    x = z[..., 0::2, 0::2].clone()
    x[0, :, 1, 1] = 0.0  # a zero spectrum: right angle
    _, sam = fastfuse.spatial_degrade_sam(z, delta, 2, x, offset=0, backend=backend)
    assert sam[0, 1, 1].item() == pytest.approx(90.0, abs=1e-4)
    assert sam[0, 0, 0].abs().item() < 0.05  # identical spectra
    assert torch.isfinite(sam).all()


@pytest.mark.parametrize("device,backend", backend_params("spectral_response_ssim"))
def test_kernel_spectral_response_ssim(device, backend):
    pytest.importorskip("fastfuse.reference.ssim")
    g = torch.Generator().manual_seed(11)
    z64, R64, y64 = rand(1, 6, 9, 8, g=g), rand(2, 6, g=g) / 6, rand(1, 2, 9, 8, g=g)
    z, R, y = (t.float().to(device).requires_grad_(True) for t in (z64, R64, y64))
    y_pseudo, smap = fastfuse.spectral_response_ssim(z, R, y, window_size=5, padding="zero", backend=backend)
    zr, Rr, yr = (t.float().double().requires_grad_(True) for t in (z64, R64, y64))
    y_pseudo_ref, smap_ref = fastfuse.spectral_response_ssim(zr, Rr, yr, window_size=5, padding="zero",
                                                             backend="torch")
    assert_close(y_pseudo, y_pseudo_ref, torch.float32, name="y_pseudo")
    assert_close(smap, smap_ref, torch.float32, name="ssim")
    g_y, g_map = rand(*y_pseudo_ref.shape, g=g), rand(*smap_ref.shape, g=g)
    grads = torch.autograd.grad((y_pseudo, smap), (z, R, y), (g_y.float().to(device), g_map.float().to(device)))
    grads_ref = torch.autograd.grad((y_pseudo_ref, smap_ref), (zr, Rr, yr), (g_y, g_map))
    for got, want, name in zip(grads, grads_ref, ("dz", "dR", "dy")):
        assert_close(got, want, torch.float32, rtol_scale=5, atol_scale=10, name=name)


@pytest.mark.parametrize("device,backend", backend_params("spatial_degrade"))
def test_kernel_real_daem_kernel(shared_data, device, backend):
    sio = pytest.importorskip("scipy.io")
    cube = sio.loadmat(shared_data / "cave" / "paints.mat")["orig"][:64, :64, 10:11]
    z = torch.from_numpy(cube.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(device)
    kernel = torch.from_numpy(sio.loadmat(shared_data / "blur_kernels" / "daem_32x32_3.mat")["data"]).float()
    kernel = kernel.to(device)
    for padding in ("reflect",):  # circular is checked against the FFT on this kernel above
        out = fastfuse.spatial_degrade(z, kernel, 32, padding=padding, backend=backend)
        ref = fastfuse.spatial_degrade(z.double().cpu(), kernel.double().cpu(), 32, padding=padding, backend="torch")
        assert_close(out, ref, torch.float32, name=f"x {padding}")
        back = fastfuse.spatial_degrade_adjoint(out, kernel, 32, (64, 64), padding=padding, backend=backend)
        back_ref = fastfuse.spatial_degrade_adjoint(out.double().cpu(), kernel.double().cpu(), 32, (64, 64),
                                                    padding=padding, backend="torch")
        assert_close(back, back_ref, torch.float32, name=f"adjoint {padding}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (real shapes)")
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_real_shapes(dtype):
    # CAVE-like sizes: 31 bands, 512 × 512, 8 × 8 Gaussian (SRLF-Net / MoG-DCN), ratio 8.
    g = torch.Generator().manual_seed(12)
    z64 = _rounded(rand(2, 31, 512, 512, g=g), dtype)
    kernel = gaussian_kernel(8, 2.0).float()
    x64 = _rounded(rand(2, 31, 64, 64, g=g), dtype)
    z, x = z64.to("cuda", dtype), x64.to("cuda", dtype)
    for padding in PADDINGS:
        out = fastfuse.spatial_degrade(z, kernel.cuda(), 8, padding=padding, backend="triton")
        assert_close(out, fastfuse.spatial_degrade(z64, kernel.double(), 8, padding=padding, backend="torch"), dtype)
        back = fastfuse.spatial_degrade_adjoint(x, kernel.cuda(), 8, (512, 512), padding=padding, backend="triton")
        back_ref = fastfuse.spatial_degrade_adjoint(x64, kernel.double(), 8, (512, 512), padding=padding,
                                                    backend="torch")
        assert_close(back, back_ref, dtype)
    x_pseudo, sam = fastfuse.spatial_degrade_sam(z, kernel.cuda(), 8, x, backend="triton")
    x_pseudo_ref, sam_ref = fastfuse.spatial_degrade_sam(z64, kernel.double(), 8, x64, backend="torch")
    assert_close(x_pseudo, x_pseudo_ref, dtype)
    assert_close(sam, sam_ref, dtype, atol_scale=10)
    R = torch.rand(3, 31, generator=g).cuda() / 31
    assert_close(fastfuse.spectral_response(z, R, backend="triton"),
                 fastfuse.spectral_response(z64, R.double().cpu(), backend="torch"), dtype)


# ---------------------------------------------------------------------------------------------
# spectral_response_ssim kernels: Y' and the SSIM map from one pass over z (Triton: the ssim
# forward kernel with its MIX prologue), against the float64 reference.

# (B, C, c, H, W), window: odd sizes; C = c = 1 with several tiles per axis under window 3 (the
# "valid" programs must also write Y''s border rows/columns, outside every map tile); a window
# larger than the image (zero / reflect only).
RESPONSE_SSIM_CASES = [((2, 4, 3, 13, 17), 5), ((1, 1, 1, 32, 32), 3), ((1, 3, 2, 4, 6), 7)]


@pytest.mark.parametrize("case", range(len(RESPONSE_SSIM_CASES)))
@pytest.mark.parametrize("padding", ("valid", "zero", "reflect"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", backend_params("spectral_response_ssim"))
def test_kernel_spectral_response_ssim_fused(case, padding, dtype, device, backend):
    pytest.importorskip("fastfuse.reference.ssim")
    from fastfuse.reference.ssim import ssim_map as reference_ssim_map

    (B, C, c, H, W), window_size = RESPONSE_SSIM_CASES[case]
    if padding == "valid" and min(H, W) < window_size:
        pytest.skip("'valid' needs the image to be at least the window (a checked error)")
    g = torch.Generator().manual_seed(31 + case)
    z64, y64 = _rounded(rand(B, C, H, W, g=g), dtype), _rounded(rand(B, c, H, W, g=g), dtype)
    R64 = _rounded(rand(c, C, g=g) / C, dtype)
    z = non_contiguous(z64.to(device, dtype)).requires_grad_(True)
    R = R64.to(device, dtype).t().contiguous().t().requires_grad_(True)  # non-contiguous R too
    y = y64.to(device, dtype).requires_grad_(True)
    y_pseudo, smap = fastfuse.spectral_response_ssim(z, R, y, window_size=window_size, padding=padding,
                                                     backend=backend)
    zr, Rr, yr = (t.clone().requires_grad_(True) for t in (z64, R64, y64))
    y_pseudo_ref, smap_ref = fastfuse.spectral_response_ssim(zr, Rr, yr, window_size=window_size,
                                                             padding=padding, backend="torch")
    assert y_pseudo.dtype == smap.dtype == dtype
    assert y_pseudo.shape == y_pseudo_ref.shape and smap.shape == smap_ref.shape
    assert_close(y_pseudo, y_pseudo_ref, dtype, name="y_pseudo")
    # The map is that of the returned (rounded) Y': measure the kernel's error on it, and the
    # whole op against the exact float64 composition within the error Y''s rounding brings.
    smap_of_returned = reference_ssim_map(y_pseudo.detach().double().cpu(), y64, window_size, 1.5, 1.0, 0.01,
                                          0.03, padding)
    assert_close(smap, smap_of_returned, dtype, name="ssim of Y'")
    assert_close(smap, smap_ref, dtype, rtol_scale=2, atol_scale=2, name="ssim")
    g_y, g_map = rand(*y_pseudo_ref.shape, g=g) - 0.3, rand(*smap_ref.shape, g=g) - 0.3
    g_y, g_map = _rounded(g_y, dtype), _rounded(g_map, dtype)
    grads = torch.autograd.grad((y_pseudo, smap), (z, R, y), (g_y.to(device, dtype), g_map.to(device, dtype)))
    grads_ref = torch.autograd.grad((y_pseudo_ref, smap_ref), (zr, Rr, yr), (g_y, g_map))
    for got, want, name in zip(grads, grads_ref, ("dz", "dR", "dy")):
        assert got.dtype == dtype and got.shape == want.shape
        scale = max(1.0, want.abs().max().item())
        assert_close(got, want, dtype, rtol_scale=4, atol_scale=4 * scale, name=name)


@pytest.mark.parametrize("padding", ("valid", "zero", "reflect"))
def test_triton_fused_response_ssim_writes_every_pixel(padding):
    """The fused kernel alone, into a NaN-filled Y' buffer: every pixel must be written (the
    "valid" map's tiles do not cover Y''s border), and the map must be that of the mix."""
    pytest.importorskip("triton")
    from fastfuse.reference.ssim import ssim_map as reference_ssim_map
    from fastfuse.triton import ssim as triton_ssim

    g = torch.Generator().manual_seed(41)
    z, y = rand(2, 5, 62, 32, g=g).float(), rand(2, 2, 62, 32, g=g).float()
    R = (rand(2, 5, g=g) / 5).float()
    y_pseudo = torch.full((2, 2, 62, 32), float("nan"))
    smap = triton_ssim.ssim_map_forward(y_pseudo, y, 3, 1.5, 1.0, 0.01, 0.03, padding, mix=(z, R))
    expected = torch.einsum("oi,bihw->bohw", R.double(), z.double())
    assert_close(y_pseudo, expected, torch.float32, name="y_pseudo")
    assert_close(smap, reference_ssim_map(expected, y.double(), 3, 1.5, 1.0, 0.01, 0.03, padding), torch.float32,
                 name="ssim")


# --------------------------------------------------------------------------- reported repros: SAM guide

SAM_GUIDE_BACKENDS = [b for b in ("torch", "cpu", "triton")
                      if fastfuse.backends.unavailable_reason("spatial_degrade_sam", b, torch.device("cpu")) is None]


@pytest.mark.parametrize("backend", SAM_GUIDE_BACKENDS)
@pytest.mark.parametrize("where", ["z", "kernel", "x", "z_inf"])
def test_spatial_degrade_sam_propagates_nan_like_sam_map(backend, where):
    torch.manual_seed(0)
    z, k, x = torch.rand(1, 3, 8, 8), torch.ones(3, 3) / 9, torch.rand(1, 3, 4, 4)
    target = {"z": z, "z_inf": z, "kernel": k, "x": x}[where]
    target.view(-1)[0] = float("inf") if where == "z_inf" else float("nan")
    x_pseudo, guide = fastfuse.spatial_degrade_sam(z, k, 2, x, backend=backend)
    expected = fastfuse.sam_map(x_pseudo, x, backend="torch")
    assert torch.equal(guide.isnan(), expected.isnan()) and guide.isnan().any()


@pytest.mark.parametrize("backend", SAM_GUIDE_BACKENDS)
def test_spatial_degrade_sam_guide_is_scale_invariant(backend):
    torch.manual_seed(1)
    z, k, x = torch.rand(1, 3, 8, 8), torch.ones(3, 3) / 9, torch.rand(1, 3, 4, 4)
    _, small = fastfuse.spatial_degrade_sam(z, k, 2, x, backend="torch")
    _, big = fastfuse.spatial_degrade_sam(z * 1e20, k, 2, x * 1e20, backend=backend)
    torch.testing.assert_close(big, small, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- cpu backend (C++ kernels)
# The kernel tests above run the cpu backend at three shapes; these add the awkward ones: H, W not
# multiples of the ratio, size-1 axes, C = 1, kernels narrower than the ratio (columns no tap
# reads), not a multiple of it, wider than the image, ratio 1, and strided inputs.

_CPU_REASON = fastfuse.backends.unavailable_reason("spatial_degrade", "cpu", torch.device("cpu"))
needs_cpu = pytest.mark.skipif(_CPU_REASON is not None, reason=str(_CPU_REASON))

CPU_DEGRADE_CASES = [  # (B, C, H, W, k, ratio, offset, per-band kernel)
    (1, 1, 7, 5, 2, 3, (2, 1), False),   # k < r: skipped columns, H, W not multiples of r
    (2, 3, 13, 11, 5, 2, None, True),
    (1, 2, 1, 9, 3, 1, None, False),     # a 1-pixel axis, ratio 1 (a plain blur)
    (1, 1, 4, 3, 7, 2, (1, 0), True),    # kernel wider than the image
    (1, 4, 17, 20, 8, 8, (0, 7), False),  # k = r, the largest offset
    (3, 2, 9, 10, 6, 4, (3, 1), True),   # k not a multiple of r
]


def _cpu_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in a strided layout: transposed storage, or a view into a larger tensor."""
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    big = torch.zeros(t.shape[0], 2 * t.shape[1], t.shape[2], t.shape[3] + 3, dtype=t.dtype)
    big[:, ::2, :, 1:t.shape[3] + 1] = t
    return big[:, ::2, :, 1:t.shape[3] + 1]


@needs_cpu
@pytest.mark.parametrize("case", CPU_DEGRADE_CASES, ids=str)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_spatial_degrade_and_adjoint_awkward_shapes(case, padding, dtype):
    B, C, H, W, k, ratio, offset, per_band = case
    g = torch.Generator().manual_seed(51)
    layout = "transposed" if C % 2 else "sliced"
    z64 = _rounded(rand(B, C, H, W, g=g) - 0.3, dtype)
    k64 = (rand(C, k, k, g=g) if per_band else rand(k, k, g=g)).float().double()
    z = _cpu_layout(z64.to(dtype), layout).requires_grad_(True)
    kernel = k64.float().requires_grad_(True)
    zr, kr = z64.clone().requires_grad_(True), k64.clone().requires_grad_(True)
    out = fastfuse.spatial_degrade(z, kernel, ratio, padding=padding, offset=offset, backend="cpu")
    ref = fastfuse.spatial_degrade(zr, kr, ratio, padding=padding, offset=offset, backend="torch")
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert_close(out, ref, dtype, name="x")
    grad = _rounded(rand(*ref.shape, g=g) - 0.5, dtype)
    dz, dk = torch.autograd.grad(out, (z, kernel), grad.to(dtype))
    dzr, dkr = torch.autograd.grad(ref, (zr, kr), grad)
    assert dz.dtype == dtype and dk.dtype == torch.float32 and dk.shape == kernel.shape
    assert_close(dz, dzr, dtype, name="dz")
    assert_close(dk / dkr.abs().max(), dkr / dkr.abs().max(), dtype, name="dkernel")

    x64 = _rounded(rand(*ref.shape, g=g) - 0.3, dtype)
    x = _cpu_layout(x64.to(dtype), layout).requires_grad_(True)
    xr = x64.clone().requires_grad_(True)
    back = fastfuse.spatial_degrade_adjoint(x, kernel, ratio, (H, W), padding=padding, offset=offset, backend="cpu")
    back_ref = fastfuse.spatial_degrade_adjoint(xr, kr, ratio, (H, W), padding=padding, offset=offset,
                                                backend="torch")
    assert back.dtype == dtype and back.shape == (B, C, H, W)
    assert_close(back, back_ref, dtype, name="adjoint")
    grad = _rounded(rand(B, C, H, W, g=g) - 0.5, dtype)
    dx, dk = torch.autograd.grad(back, (x, kernel), grad.to(dtype))
    dxr, dkr = torch.autograd.grad(back_ref, (xr, kr), grad)
    assert_close(dx, dxr, dtype, name="adjoint dx")
    assert_close(dk / dkr.abs().max(), dkr / dkr.abs().max(), dtype, name="adjoint dkernel")


@needs_cpu
@pytest.mark.parametrize("case", CPU_DEGRADE_CASES, ids=str)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_spatial_degrade_sam_awkward_shapes(case, padding, dtype):
    B, C, H, W, k, ratio, offset, per_band = case
    g = torch.Generator().manual_seed(52)
    z64 = _rounded(rand(B, C, H, W, g=g), dtype)
    k64 = (rand(C, k, k, g=g) if per_band else rand(k, k, g=g)).float().double()
    x64 = _rounded(rand(B, C, H // ratio, W // ratio, g=g) + 0.05, dtype)
    layout = "sliced" if C % 2 else "transposed"
    z = _cpu_layout(z64.to(dtype), layout).requires_grad_(True)
    x = _cpu_layout(x64.to(dtype), layout).requires_grad_(True)
    kernel = k64.float().requires_grad_(True)
    zr, kr, xr = (t.clone().requires_grad_(True) for t in (z64, k64, x64))
    for degrees in (True, False):
        x_pseudo, sam = fastfuse.spatial_degrade_sam(z, kernel, ratio, x, padding=padding, offset=offset,
                                                     degrees=degrees, backend="cpu")
        x_pseudo_ref, sam_ref = fastfuse.spatial_degrade_sam(zr, kr, ratio, xr, padding=padding, offset=offset,
                                                             degrees=degrees, backend="torch")
        assert x_pseudo.dtype == sam.dtype == dtype and sam.shape == sam_ref.shape
        assert_close(x_pseudo, x_pseudo_ref, dtype, name="x_pseudo")
        scale = 10 if degrees else 1
        assert_close(sam, sam_ref, dtype, atol_scale=scale, name="sam")
    g_x = _rounded(rand(*x_pseudo_ref.shape, g=g) - 0.5, dtype)
    g_sam = _rounded(rand(*sam_ref.shape, g=g), dtype)
    grads = torch.autograd.grad((x_pseudo, sam), (z, kernel, x), (g_x.to(dtype), g_sam.to(dtype)))
    grads_ref = torch.autograd.grad((x_pseudo_ref, sam_ref), (zr, kr, xr), (g_x, g_sam))
    for got, want, name in zip(grads, grads_ref, ("dz", "dkernel", "dx")):
        scale = max(1.0, want.abs().max().item())
        assert_close(got, want, dtype, rtol_scale=5, atol_scale=10 * scale, name=name)


@needs_cpu
@pytest.mark.parametrize("layout", ["rows", "transposed", "broadcast grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_spectral_response_strided(layout, dtype):
    g = torch.Generator().manual_seed(53)
    z64 = _rounded(rand(2, 5, 6, 7, g=g) - 0.3, dtype)
    R64 = rand(4, 5, g=g).float().double()
    z = z64.to(dtype)
    if layout == "rows":  # rows that do not follow each other: walked row by row
        z = torch.zeros(2, 5, 12, 7, dtype=dtype).index_copy_(2, torch.arange(0, 12, 2), z64.to(dtype))[:, :, ::2]
    elif layout == "transposed":
        z = non_contiguous(z)
    z.requires_grad_(True)
    R = R64.float().t().contiguous().t().requires_grad_(True)  # a transposed R too
    zr, Rr = z64.clone().requires_grad_(True), R64.clone().requires_grad_(True)
    out = fastfuse.spectral_response(z, R, backend="cpu")
    ref = fastfuse.spectral_response(zr, Rr, backend="torch")
    assert_close(out, ref, dtype, name="y")
    grad = _rounded(rand(*ref.shape, g=g) - 0.5, dtype)
    if layout == "broadcast grad":  # a gradient with zero strides, read without expanding it
        grad = grad[:, :, :1, :1].expand(ref.shape)
    dz, dR = torch.autograd.grad(out, (z, R), grad.to(dtype))
    dzr, dRr = torch.autograd.grad(ref, (zr, Rr), grad)
    assert dz.dtype == dtype and dR.dtype == torch.float32
    assert_close(dz, dzr, dtype, name="dz")
    assert_close(dR / dRr.abs().max(), dRr / dRr.abs().max(), dtype, name="dR")


@needs_cpu
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("k,ratio", [(2, 3), (5, 2), (4, 4)])
def test_cpu_degrade_nan_and_inf_reach_what_the_reference_reaches(padding, k, ratio):
    """A NaN/inf pixel spoils exactly the outputs whose taps read it (none for a column between
    the taps of a kernel narrower than the ratio), as in the reference."""
    g = torch.Generator().manual_seed(54)
    for value in (float("nan"), float("inf")):
        for where in [(0, 0), (1, 4), (6, 8), (8, 2)]:
            z = rand(1, 2, 9, 10, g=g).float()
            z[0, 1, where[0], where[1]] = value
            kernel = rand(k, k, g=g).float()
            out = fastfuse.spatial_degrade(z, kernel, ratio, padding=padding, backend="cpu")
            ref = fastfuse.spatial_degrade(z.double(), kernel.double(), ratio, padding=padding, backend="torch")
            assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf()), (value, where)
            x = torch.rand(out.shape, generator=g)
            x[0, 0, 0, -1] = value
            back = fastfuse.spatial_degrade_adjoint(x, kernel, ratio, (9, 10), padding=padding, backend="cpu")
            back_ref = fastfuse.spatial_degrade_adjoint(x.double(), kernel.double(), ratio, (9, 10), padding=padding,
                                                        backend="torch")
            assert torch.equal(back.isnan(), back_ref.isnan()), (value, "adjoint")


@needs_cpu
def test_cpu_gradients_do_not_depend_on_the_thread_count():
    """dkernel and dR are reductions over every pixel: the same to the bit with 1 and 2 threads."""
    g = torch.Generator().manual_seed(55)
    z = rand(2, 3, 40, 36, g=g).float().requires_grad_(True)
    kernels = [rand(5, 5, g=g).float().requires_grad_(True), rand(3, 5, 5, g=g).float().requires_grad_(True)]
    R = rand(2, 3, g=g).float().requires_grad_(True)
    x = rand(2, 3, 10, 9, g=g).float() + 0.1

    def grads():
        out = [fastfuse.spectral_response(z, R, backend="cpu").sin().sum()]
        for kernel in kernels:
            out.append(fastfuse.spatial_degrade(z, kernel, 4, padding="reflect", backend="cpu").sin().sum())
            out.append(fastfuse.spatial_degrade_adjoint(x, kernel, 4, (40, 36), backend="cpu").cos().sum())
            out.append(sum(t.sum() for t in fastfuse.spatial_degrade_sam(z, kernel, 4, x, backend="cpu")))
        return torch.autograd.grad(sum(out), [z, R, *kernels])

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads()
        torch.set_num_threads(2)
        two = grads()
    finally:
        torch.set_num_threads(threads)
    for a, b, name in zip(one, two, ("dz", "dR", "dkernel shared", "dkernel per band")):
        assert torch.equal(a, b), f"{name} depends on the thread count"


@needs_cpu
def test_cpu_float64_is_the_reference():
    g = torch.Generator().manual_seed(56)
    z, kernel, x = rand(1, 2, 9, 8, g=g), rand(3, 3, g=g), rand(1, 2, 4, 4, g=g)
    for backend_out, ref_out in [
        (fastfuse.spatial_degrade(z, kernel, 2, backend="cpu"), fastfuse.spatial_degrade(z, kernel, 2, backend="torch")),
        (fastfuse.spatial_degrade_adjoint(x, kernel, 2, (9, 8), backend="cpu"),
         fastfuse.spatial_degrade_adjoint(x, kernel, 2, (9, 8), backend="torch")),
        (fastfuse.spatial_degrade_sam(z, kernel, 2, x, backend="cpu")[1],
         fastfuse.spatial_degrade_sam(z, kernel, 2, x, backend="torch")[1])]:
        assert backend_out.dtype == torch.float64
        torch.testing.assert_close(backend_out, ref_out, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- triton spatial_degrade_sam: both paths

_TRITON_SAM_REASON = fastfuse.backends.unavailable_reason("spatial_degrade_sam", "triton", torch.device("cpu"))


class _Refused:
    """Stands in for a launcher that this path must not use."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} launched")

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"{self.name} called")


@pytest.mark.skipif(_TRITON_SAM_REASON is not None, reason=str(_TRITON_SAM_REASON))
@pytest.mark.parametrize("fused", [True, False], ids=["fused kernel", "split for few programs"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_triton_degrade_sam_fused_and_split_paths(monkeypatch, fused, padding):
    """Small images have too few output pixels for the one-program-per-pixel-block kernel and go
    through the degrade + sam kernels; the fused kernel is forced here by lowering the bar."""
    from fastfuse.reference.sam import sam_map as reference_sam_map
    from fastfuse.triton import degrade as triton_degrade

    if fused:
        monkeypatch.setattr(triton_degrade, "MIN_PROGRAMS", 1)
        monkeypatch.setattr(triton_degrade, "_degrade", _Refused("the split path"))
    else:
        monkeypatch.setattr(triton_degrade, "_degrade_sam_kernel", _Refused("the fused kernel"))
    g = torch.Generator().manual_seed(57)
    z, x = rand(2, 3, 9, 11, g=g).float(), rand(2, 3, 4, 5, g=g).float() + 0.05
    kernel = rand(3, 3, 3, g=g).float()
    x[0, :, 1, 1] = 0.0  # an undirected spectrum: a right angle
    x_pseudo, sam = triton_degrade.spatial_degrade_sam_forward(z, kernel, 2, x, padding, (1, 0), True, 1e-8)
    x_pseudo_ref = fastfuse.spatial_degrade(z.double(), kernel.double(), 2, padding=padding, offset=(1, 0),
                                            backend="torch")
    assert_close(x_pseudo, x_pseudo_ref, torch.float32, name="x_pseudo")
    assert_close(sam, reference_sam_map(x_pseudo.double(), x.double(), True, 1e-8), torch.float32, atol_scale=10,
                 name="sam")
    assert sam[0, 1, 1].item() == pytest.approx(90.0)
