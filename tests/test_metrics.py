"""fastfuse.metrics against independent implementations (torchmetrics, NumPy loops, skimage)."""
import functools
import math

import numpy as np
import pytest
import torch

from fastfuse import metrics
from testing_utils import non_contiguous, numpy_mean_spectral_angle, random_pair

pair = functools.partial(random_pair, shape=(2, 5, 14, 13), noise=0.05, clamp_min=0.0)


# --------------------------------------------------------------------------- independent oracles

def numpy_uiqi(pred: np.ndarray, target: np.ndarray, block: int) -> np.ndarray:
    """Wang–Bovik Q with a plain loop over every valid window, img_qi.m's conventions for 0/0."""
    out = []
    for p, t in zip(pred, target):
        qs = []
        for band in range(p.shape[0]):
            for i in range(p.shape[1] - block + 1):
                for j in range(p.shape[2] - block + 1):
                    x = t[band, i:i + block, j:j + block].ravel()
                    y = p[band, i:i + block, j:j + block].ravel()
                    mx, my = x.mean(), y.mean()
                    vx, vy = x.var(), y.var()
                    cxy = ((x - mx) * (y - my)).mean()
                    both_constant = np.ptp(x) == 0 and np.ptp(y) == 0
                    lum = mx * mx + my * my
                    if both_constant:
                        qs.append(2 * mx * my / lum if lum != 0 else 1.0)
                    elif (vx + vy) * lum != 0:
                        qs.append(4 * cxy * mx * my / ((vx + vy) * lum))
                    else:
                        qs.append(1.0)
        out.append(np.mean(qs))
    return np.array(out)


def numpy_band_mse(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return ((pred - target) ** 2).mean(axis=(2, 3))


# --------------------------------------------------------------------------- PSNR, ERGAS vs torchmetrics

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_psnr_matches_torchmetrics(dtype):
    from torchmetrics.functional.image import peak_signal_noise_ratio
    pred, target = pair(dtype=dtype)
    # torchmetrics converts ln to log10 with a float32 constant: agreement to ~1e-7 relative at best.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    glob = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(metrics.psnr(pred, target, mode="global"), glob.to(dtype), **tol)
    per_band = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(2, 3))
    torch.testing.assert_close(metrics.psnr(pred, target), per_band.mean(1).to(dtype), **tol)
    assert metrics.psnr(pred, target).shape == (2,)
    # The peak is fixed by the caller, never inferred: data on a 0–255 scale with data_range 255.
    torch.testing.assert_close(metrics.psnr(pred * 255, target * 255, data_range=255.0),
                               metrics.psnr(pred, target), rtol=1e-5, atol=1e-4)


def test_psnr_exact_band_is_infinite():
    pred, target = pair()
    assert torch.isinf(metrics.psnr(target, target)).all()
    pred[:, 0] = target[:, 0]
    assert torch.isinf(metrics.psnr(pred, target)).all()
    assert torch.isfinite(metrics.psnr(pred, target, mode="global")).all()


@pytest.mark.parametrize("ratio", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ergas_matches_torchmetrics(ratio, dtype):
    from torchmetrics.functional.image import error_relative_global_dimensionless_synthesis as tm_ergas
    pred, target = pair(dtype=dtype)
    expected = tm_ergas(pred, target, ratio=ratio, reduction="none")
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics.ergas(pred, target, ratio), expected, **tol)
    # Hand formula: 100/ratio · sqrt(mean_k (RMSE_k / μ_k)²), the ≥ 1.4 convention (not 100·ratio).
    p, t = pred.double().numpy(), target.double().numpy()
    hand = 100 / ratio * np.sqrt((numpy_band_mse(p, t) / t.mean(axis=(2, 3)) ** 2).mean(1))
    np.testing.assert_allclose(metrics.ergas(pred, target, ratio).double().numpy(), hand, rtol=1e-5)


def test_ergas_exact_zero_band_contributes_nothing():
    pred, target = pair()
    target[:, 1] = 0
    pred[:, 1] = 0
    value = metrics.ergas(pred, target, 4)
    assert torch.isfinite(value).all()
    keep = [0, 2, 3, 4]
    p, t = pred.numpy(), target.numpy()
    hand = 25 * np.sqrt((numpy_band_mse(p, t)[:, keep] / t.mean(axis=(2, 3))[:, keep] ** 2).sum(1) / 5)
    np.testing.assert_allclose(value.numpy(), hand, rtol=1e-10)
    pred[:, 1] = 0.1  # now inexact where the reference mean is 0: ERGAS is infinite, not silently finite
    assert torch.isinf(metrics.ergas(pred, target, 4)).all()


# --------------------------------------------------------------------------- RMSE, RASE by hand

def test_rmse_and_rase_hand_formulas():
    pred, target = pair(shape=(3, 4, 9, 11))
    p, t = pred.numpy(), target.numpy()
    rmse = np.sqrt(((p - t) ** 2).mean(axis=(1, 2, 3)))
    np.testing.assert_allclose(metrics.rmse(pred, target).numpy(), rmse, rtol=1e-12)
    rase = 100 / t.mean(axis=(1, 2, 3)) * np.sqrt(numpy_band_mse(p, t).mean(1))
    np.testing.assert_allclose(metrics.rase(pred, target).numpy(), rase, rtol=1e-12)
    # RASE is normalised by the reference: swapping the arguments changes it.
    assert not torch.allclose(metrics.rase(target * 0.5, target), metrics.rase(target, target * 0.5))


# --------------------------------------------------------------------------- SAM vs NumPy arccos

@pytest.mark.parametrize("shape", [(2, 31, 6, 7), (1, 3, 1, 1), (1, 1, 4, 3)])
def test_sam_matches_numpy_and_excludes_zero_pixels(shape):
    pred, target = pair(shape=shape, noise=0.1)
    if shape[2] * shape[3] > 1:
        pred[0, :, 0, 0] = 0     # zero estimate
        target[-1, :, -1, -1] = 0  # zero reference
        target[0, :, 1, 1] = 0
        pred[0, :, 1, 1] = 0     # both zero
    got = metrics.sam(pred, target, backend="torch")
    expected = numpy_mean_spectral_angle(pred.numpy(), target.numpy(), degrees=True, empty_value=np.nan)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7, atol=1e-6)
    # The pixels that are excluded do not move the mean, whatever is in them.
    if shape[2] * shape[3] > 1:
        other = pred.clone()
        other[-1, :, -1, -1] = torch.rand(shape[1], dtype=torch.float64)
        torch.testing.assert_close(metrics.sam(other, target, backend="torch"), got)


def test_sam_radians_default_backend_and_all_zero_image():
    pred, target = pair(shape=(2, 8, 5, 5))
    torch.testing.assert_close(metrics.sam(pred, target, degrees=False),
                               metrics.sam(pred, target, backend="torch") * math.pi / 180)
    pred[1] = 0
    value = metrics.sam(pred, target)
    assert torch.isfinite(value[0]) and torch.isnan(value[1])  # no valid pixel: undefined, said so
    assert metrics.sam(target, target).abs().max() < 1e-5


# --------------------------------------------------------------------------- UIQI vs a NumPy loop

@pytest.mark.parametrize("shape,block", [((2, 3, 12, 13), 8), ((1, 2, 9, 7), 4), ((1, 1, 8, 8), 8),
                                         ((1, 2, 5, 6), 1)])
def test_uiqi_matches_numpy_loop(shape, block):
    pred, target = pair(shape=shape, noise=0.1)
    expected = numpy_uiqi(pred.numpy(), target.numpy(), block)
    np.testing.assert_allclose(metrics.uiqi(pred, target, block=block).numpy(), expected, rtol=1e-9, atol=1e-10)


def test_uiqi_constant_window_conventions():
    # Flat regions: zeros in both (Q = 1), equal constants (Q = 1), different constants (luminance
    # term 2μxμy/(μx²+μy²)), a constant reference under a textured estimate (Q = 0).
    target = torch.zeros(1, 4, 10, 10, dtype=torch.float64)
    pred = torch.zeros_like(target)
    target[0, 1], pred[0, 1] = 0.3, 0.3
    target[0, 2], pred[0, 2] = 0.2, 0.6
    target[0, 3] = 0.5
    pred[0, 3] = 0.5 + 0.1 * torch.rand(10, 10, dtype=torch.float64)
    per_band = [metrics.uiqi(pred[:, k:k + 1], target[:, k:k + 1], block=4).item() for k in range(4)]
    assert per_band[0] == 1.0 and per_band[1] == 1.0
    assert per_band[2] == pytest.approx(2 * 0.2 * 0.6 / (0.2 ** 2 + 0.6 ** 2), rel=1e-12)
    assert per_band[3] == pytest.approx(0.0, abs=1e-12)
    # A mixed image (half flat, half textured) against the loop, where windows straddle both.
    target = torch.rand(1, 2, 12, 12, dtype=torch.float64)
    target[:, :, :, :6] = 0.4
    pred = target.clone()
    pred[:, :, 6:] += 0.05 * torch.rand(1, 2, 6, 12, dtype=torch.float64)
    expected = numpy_uiqi(pred.numpy(), target.numpy(), 4)
    np.testing.assert_allclose(metrics.uiqi(pred, target, block=4).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_uiqi_float32_constant_windows_are_exact():
    # Rounded fp32 variances of flat windows are not exactly 0, and there Q would be noise over
    # noise; the exact max == min test gives the convention's luminance term instead.
    g = torch.Generator().manual_seed(3)
    target = torch.rand(1, 3, 16, 24, generator=g)
    pred = (target + 0.05 * torch.rand(1, 3, 16, 24, generator=g)).float()
    target[..., :12] = 0.7
    pred[..., :12] = 0.3
    expected = numpy_uiqi(pred.double().numpy(), target.double().numpy(), 8)
    np.testing.assert_allclose(metrics.uiqi(pred, target, block=8).numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("block", [1, 3, 8])
def test_uiqi_cpu_kernel_matches_torch_formula(monkeypatch, dtype, block):
    """On CPU uiqi runs the cpu backend's one-pass kernel; it must give the torch formula's values,
    flat windows (zero, equal, different constants), a NaN and a non-contiguous input included."""
    from fastfuse.cpu._extension import load
    pytest.importorskip("fastfuse._cpu_ssim", reason="the cpu backend's ssim kernels are not built")
    load("ssim")
    g = torch.Generator().manual_seed(block)
    target = torch.rand(2, 3, 17, 14, generator=g, dtype=torch.float64)
    pred = (target + 0.1 * torch.rand(2, 3, 17, 14, generator=g, dtype=torch.float64)).clamp(0, 1)
    target[0, 0, :9, :9], pred[0, 0, :9, :9] = 0.0, 0.0
    target[0, 1, :9, :9], pred[0, 1, :9, :9] = 0.25, 0.25
    target[1, 0, :9, :9], pred[1, 0, :9, :9] = 0.2, 0.6
    pred[1, 2, 4, 5] = float("nan")
    pred, target = non_contiguous(pred.to(dtype)), target.to(dtype)
    assert metrics._cpu_uiqi_map() is not None
    fast = metrics.uiqi(pred, target, block=block)
    monkeypatch.setattr(metrics, "_cpu_uiqi_map", lambda: None)
    slow = metrics.uiqi(pred, target, block=block)
    assert torch.isnan(fast[1]) and torch.isnan(slow[1])
    torch.testing.assert_close(fast[0].double(), slow[0].double(), rtol=1e-12 if dtype == torch.float64 else 1e-6,
                               atol=1e-12 if dtype == torch.float64 else 1e-6)


# --------------------------------------------------------------------------- SSIM vs skimage

@pytest.mark.parametrize("shape", [(1, 3, 16, 18), (2, 2, 11, 11)])
def test_ssim_matches_skimage(shape):
    from skimage.metrics import structural_similarity
    pred, target = pair(shape=shape, noise=0.1)
    expected = [np.mean([structural_similarity(p[k], t[k], gaussian_weights=True, sigma=1.5,
                                               use_sample_covariance=False, data_range=1.0)
                         for k in range(shape[1])]) for p, t in zip(pred.numpy(), target.numpy())]
    got = metrics.ssim(pred, target, backend="torch")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7, atol=1e-8)


def test_ssim_identical_is_one_and_paddings_differ():
    pred, target = pair(shape=(1, 2, 16, 16))
    torch.testing.assert_close(metrics.ssim(target, target, backend="torch"), torch.ones(1, dtype=torch.float64))
    valid = metrics.ssim(pred, target, backend="torch")
    reflect = metrics.ssim(pred, target, padding="reflect", backend="torch")
    assert valid.shape == reflect.shape == (1,) and not torch.allclose(valid, reflect)
    # The default backend (the Triton interpreter in CI) on fp32 inputs agrees at fp32 tolerance.
    for padding, expected in (("valid", valid), ("reflect", reflect)):
        got = metrics.ssim(pred.float(), target.float(), padding=padding)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=6e-4, atol=2e-4)


# --------------------------------------------------------------------------- dtypes, layout, errors

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    pred, target = pair(shape=(2, 4, 16, 16), dtype=dtype)
    p64, t64 = pred.double(), target.double()  # the same rounded values, in float64
    for name, fn, kwargs in [("psnr", metrics.psnr, {}), ("rmse", metrics.rmse, {}), ("rase", metrics.rase, {}),
                             ("ergas", metrics.ergas, {"ratio": 4}), ("uiqi", metrics.uiqi, {}),
                             ("sam", metrics.sam, {"backend": "torch"})]:
        got = fn(pred, target, **kwargs)
        assert got.dtype == torch.float32 and got.shape == (2,), name
        torch.testing.assert_close(got.double(), fn(p64, t64, **kwargs), rtol=2e-4, atol=2e-4, msg=name)


def test_non_contiguous_and_batch_independence():
    pred, target = pair(shape=(3, 4, 10, 12))
    nc_pred, nc_target = non_contiguous(pred), non_contiguous(target)
    for fn, kwargs in [(metrics.psnr, {}), (metrics.ergas, {"ratio": 4}), (metrics.rmse, {}),
                       (metrics.rase, {}), (metrics.uiqi, {"block": 4}), (metrics.sam, {"backend": "torch"})]:
        whole = fn(pred, target, **kwargs)
        torch.testing.assert_close(fn(nc_pred, nc_target, **kwargs), whole)
        torch.testing.assert_close(fn(pred[1:2], target[1:2], **kwargs), whole[1:2])


def test_empty_batch_gives_empty_result():
    pred = torch.empty(0, 3, 12, 12)
    for fn, kwargs in [(metrics.psnr, {}), (metrics.ergas, {"ratio": 4}), (metrics.rmse, {}),
                       (metrics.rase, {}), (metrics.uiqi, {}), (metrics.sam, {})]:
        out = fn(pred, pred, **kwargs)
        assert out.shape == (0,)


@pytest.mark.parametrize("call,error,match", [
    (lambda p, t: metrics.psnr(p, t[:, :2]), ValueError, "same shape"),
    (lambda p, t: metrics.psnr(p[0, 0], t[0, 0]), ValueError, "pred must be 3-D or 4-D"),
    (lambda p, t: metrics.rmse(p, t.float()), TypeError, "same dtype"),
    (lambda p, t: metrics.rmse((p * 255).to(torch.uint8), (t * 255).to(torch.uint8)), TypeError, "dtype"),
    (lambda p, t: metrics.psnr(p, t, mode="mean"), ValueError, "mode must be one of"),
    (lambda p, t: metrics.psnr(p, t, data_range=0), ValueError, "data_range must be positive"),
    (lambda p, t: metrics.ergas(p, t, ratio=-4), ValueError, "ratio must be positive"),
    (lambda p, t: metrics.ergas(p, t, ratio="4"), TypeError, "ratio must be a number"),
    (lambda p, t: metrics.uiqi(p, t, block=32), ValueError, "block=32"),
    (lambda p, t: metrics.uiqi(p, t, block=0), ValueError, "block must be positive"),
    (lambda p, t: metrics.sam(p, t, eps=-1.0), ValueError, "eps"),
    (lambda p, t: metrics.ssim(p, t, window_size=10), ValueError, "window_size must be odd"),
    (lambda p, t: metrics.ssim(p, t, padding="same"), ValueError, "padding must be one of"),
    (lambda p, t: metrics.ssim(p, t, window_size=15), ValueError, "window_size=15"),
    (lambda p, t: metrics.rmse(p[:, :, :0], t[:, :, :0]), ValueError, "at least one band and one pixel"),
    (lambda p, t: metrics.rmse(p.numpy(), t), TypeError, "pred must be a torch.Tensor"),
])
def test_bad_input_errors_name_the_argument(call, error, match):
    pred, target = pair(shape=(1, 3, 12, 12))
    with pytest.raises(error, match=match):
        call(pred, target)


# --------------------------------------------------------------------------- evaluate, real data

def test_evaluate_returns_every_metric_per_image():
    pred, target = pair(shape=(2, 4, 16, 16))
    out = metrics.evaluate(pred, target, 4, backend="torch")
    assert sorted(out) == ["ergas", "psnr", "rase", "rmse", "sam", "ssim", "uiqi"]
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in out.values())
    torch.testing.assert_close(out["ergas"], metrics.ergas(pred, target, 4))
    torch.testing.assert_close(out["uiqi"], metrics.uiqi(pred, target))
    torch.testing.assert_close(out["ssim"], metrics.ssim(pred, target, backend="torch"))


def test_cave_scene_against_noisy_copy(shared_data):
    from fastfuse.data import read_mat_cube
    cube = read_mat_cube(shared_data / "cave" / "feathers.mat", key="orig", scale=255.0, dtype=torch.float64)
    target = cube[:, 192:320, 192:320].unsqueeze(0)
    g = torch.Generator().manual_seed(0)
    pred = target + 0.01 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    assert 39.0 < metrics.psnr(pred, target).item() < 41.0  # σ = 0.01 noise is 40 dB at peak 1
    assert metrics.rmse(pred, target).item() == pytest.approx(0.01, rel=0.02)
    sam_deg = metrics.sam(pred, target, backend="torch").item()
    assert 0.0 < sam_deg < 20.0
    for value in (metrics.ergas(pred, target, 8), metrics.rase(pred, target)):
        assert torch.isfinite(value).all() and value.item() > 0
    q = metrics.uiqi(pred, target).item()
    assert 0.0 < q < 1.0
    assert 0.0 < metrics.ssim(pred, target, backend="torch").item() < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_without_host_sync():
    pred, target = pair(shape=(2, 31, 64, 64), dtype=torch.float32)
    cpu = {name: fn(pred, target, **kw) for name, fn, kw in
           [("psnr", metrics.psnr, {}), ("ergas", metrics.ergas, {"ratio": 4}), ("rmse", metrics.rmse, {}),
            ("rase", metrics.rase, {}), ("uiqi", metrics.uiqi, {"block": 32}), ("sam", metrics.sam, {})]}
    p, t = pred.cuda(), target.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = {"psnr": metrics.psnr(p, t), "ergas": metrics.ergas(p, t, 4), "rmse": metrics.rmse(p, t),
               "rase": metrics.rase(p, t), "uiqi": metrics.uiqi(p, t, block=32), "sam": metrics.sam(p, t)}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name, value in gpu.items():
        torch.testing.assert_close(value.cpu(), cpu[name], rtol=1e-4, atol=1e-4, msg=name)


# --------------------------------------------------------------------------- reported repros

def test_error_metrics_stay_finite_beyond_fp32_squares():
    torch.manual_seed(0)
    gt = torch.rand(1, 5, 16, 16)
    pred = gt + 0.01 * torch.randn_like(gt)
    small = metrics.evaluate(pred.double(), gt.double(), 4)
    big = metrics.evaluate(pred * 1e20, gt * 1e20, 4)
    for key in ("ergas", "rase", "sam", "uiqi"):
        assert big[key].item() == pytest.approx(small[key].item(), rel=1e-4), key
    assert big["rmse"].item() == pytest.approx(small["rmse"].item() * 1e20, rel=1e-4)
    assert big["psnr"].item() == pytest.approx(small["psnr"].item() - 400.0, rel=1e-5)  # peak still 1.0
    assert torch.isfinite(metrics.psnr(pred * 1e20, gt * 1e20, mode="global")).all()


def test_ssim_range_is_documented_and_holds():
    torch.manual_seed(1)
    x, y = torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16, 16)
    scaled = metrics.ssim(x * 1e8, y * 1e8, data_range=1e8)
    assert torch.isfinite(scaled).all()
    assert scaled.item() == pytest.approx(metrics.ssim(x, y).item(), rel=1e-3)
    assert "1e9" in metrics.ssim.__doc__


def test_uiqi_fp32_matches_float64_next_to_a_constant_reference():
    gt = torch.full((1, 1, 16, 32), .0157, dtype=torch.float64)
    gt[..., 16:] = .6
    torch.manual_seed(0)
    pred = gt.clone()
    pred[..., :16] += 3e-5 * torch.randn(1, 1, 16, 16, dtype=torch.float64)
    exact = metrics.uiqi(pred, gt, block=8).item()
    assert exact == pytest.approx(0.64, abs=1e-6)
    assert metrics.uiqi(pred.float(), gt.float(), block=8).item() == pytest.approx(exact, abs=1e-6)


def test_metrics_take_a_single_cube_and_errors_name_evaluate():
    gt = torch.rand(4, 12, 12)
    pred = gt.clamp(0.1, 0.9)
    one = metrics.evaluate(pred, gt, 4)
    batched = metrics.evaluate(pred[None], gt[None], 4)
    assert all(one[k].shape == (1,) and torch.equal(one[k], batched[k]) for k in one)
    with pytest.raises(ValueError, match="metrics.evaluate"):
        metrics.evaluate(pred[None], gt, 4)
