"""fastfuse.nn losses: values against independent formulas, gradients, errors."""
import functools

import numpy as np
import pytest
import torch

import fastfuse.nn as ffnn
from fastfuse import metrics
from fastfuse.nn import L1SSIMLoss, SAMLoss, SSIMLoss
from testing_utils import assert_close, numpy_mean_spectral_angle, random_pair

pair = functools.partial(random_pair, shape=(2, 4, 12, 13), noise=0.1, clamp_min=0.01)


def test_public_names():
    assert ffnn.SSIMLoss is SSIMLoss and ffnn.SAMLoss is SAMLoss and ffnn.L1SSIMLoss is L1SSIMLoss


# --------------------------------------------------------------------------- SAMLoss

def test_sam_loss_value_excludes_zero_pixels():
    pred, target = pair()
    pred[0, :, 0, 0] = 0
    target[1, :, 2, 3] = 0
    expected = numpy_mean_spectral_angle(pred.numpy(), target.numpy(), degrees=False, empty_value=0.0)
    per_image = SAMLoss(reduction="none", backend="torch")(pred, target)
    np.testing.assert_allclose(per_image.numpy(), expected, rtol=1e-7, atol=1e-7)
    assert SAMLoss(backend="torch")(pred, target).item() == pytest.approx(expected.mean(), rel=1e-7)
    deg = SAMLoss(degrees=True, reduction="none", backend="torch")(pred, target)
    np.testing.assert_allclose(deg.numpy(), np.degrees(expected), rtol=1e-7)
    # Same convention as the metric, in radians.
    torch.testing.assert_close(deg, metrics.sam(pred, target, backend="torch"))


def test_sam_loss_gradcheck():
    pred, target = pair(shape=(2, 3, 3, 4))
    pred.requires_grad_(True)
    target.requires_grad_(True)
    loss = SAMLoss(backend="torch")
    assert torch.autograd.gradcheck(loss, (pred, target))


def test_sam_loss_gradients_finite_at_identical_and_zero_spectra():
    pred, target = pair(shape=(2, 5, 4, 4))
    pred[:, :, 0, 0] = target[:, :, 0, 0]
    pred[:, :, 1, 1] = 0
    pred[1] = 0  # an image with no valid pixel contributes 0, not NaN
    pred.requires_grad_(True)
    per_image = SAMLoss(reduction="none")(pred, target)
    assert per_image[1].item() == 0.0
    per_image.sum().backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[:, :, 1, 1].abs().max() == 0 and pred.grad[1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sam_loss_low_precision(dtype):
    pred, target = pair(shape=(2, 8, 6, 6), dtype=dtype)
    pred.requires_grad_(True)
    loss = SAMLoss()(pred, target)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    ref = SAMLoss(backend="torch")(pred.detach().double(), target.double())
    # The angle map comes back in the input dtype (the ops' contract), so the tolerance is the dtype's.
    assert_close(loss, ref, dtype, name="SAMLoss")
    loss.backward()
    assert pred.grad.dtype == dtype and torch.isfinite(pred.grad.float()).all()


# --------------------------------------------------------------------------- SSIMLoss, L1SSIMLoss

def test_ssim_loss_value_and_reduction():
    pred, target = pair()
    per_image = SSIMLoss(reduction="none", backend="torch")(pred, target)
    torch.testing.assert_close(per_image, 1 - metrics.ssim(pred, target, backend="torch"))
    torch.testing.assert_close(SSIMLoss(backend="torch")(pred, target), per_image.mean())
    assert SSIMLoss(backend="torch")(target, target).abs().item() < 1e-12
    reflect = SSIMLoss(padding="reflect", window_size=7, sigma=1.0, reduction="none", backend="torch")(pred, target)
    torch.testing.assert_close(reflect, 1 - metrics.ssim(pred, target, padding="reflect", window_size=7,
                                                         sigma=1.0, backend="torch"))


def test_ssim_loss_gradcheck():
    pred, target = pair(shape=(1, 1, 11, 12))
    pred.requires_grad_(True)
    target.requires_grad_(True)
    assert torch.autograd.gradcheck(SSIMLoss(backend="torch"), (pred, target), fast_mode=True)


def test_l1_ssim_loss_mixes_both_terms():
    pred, target = pair()
    ssim = metrics.ssim(pred, target, backend="torch")
    l1 = (pred - target).abs().mean(dim=(1, 2, 3))
    expected = 0.84 * (1 - ssim) + 0.16 * l1
    torch.testing.assert_close(L1SSIMLoss(reduction="none", backend="torch")(pred, target), expected)
    torch.testing.assert_close(L1SSIMLoss(alpha=1.0, backend="torch")(pred, target),
                               SSIMLoss(backend="torch")(pred, target))
    torch.testing.assert_close(L1SSIMLoss(alpha=0.0, backend="torch")(pred, target), l1.mean())
    # The L1 term is divided by data_range: data on a 0–255 scale gives the same loss.
    torch.testing.assert_close(L1SSIMLoss(data_range=255.0, backend="torch")(pred * 255, target * 255),
                               L1SSIMLoss(backend="torch")(pred, target))
    p = pred.clone().requires_grad_(True)
    t = target.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(L1SSIMLoss(backend="torch"), (p[:1, :1], t[:1, :1]), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ssim_losses_low_precision(dtype):
    pred, target = pair(shape=(1, 3, 16, 16), dtype=dtype)
    pred.requires_grad_(True)
    for module in (SSIMLoss(), L1SSIMLoss()):
        loss = module(pred, target)
        assert loss.dtype == torch.float32
        ref_module = type(module)(backend="torch")
        ref = ref_module(pred.detach().double(), target.double())
        assert_close(loss, ref, dtype, name=type(module).__name__)
        loss.backward()
        assert torch.isfinite(pred.grad.float()).all()
        pred.grad = None


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("make,error,match", [
    (lambda: SSIMLoss(window_size=10), ValueError, "window_size must be odd"),
    (lambda: SSIMLoss(sigma=0), ValueError, "sigma must be positive"),
    (lambda: SSIMLoss(padding="same"), ValueError, "padding must be one of"),
    (lambda: SSIMLoss(reduction="sum"), ValueError, "reduction must be one of"),
    (lambda: SAMLoss(eps=-1.0), ValueError, "eps must be non-negative"),
    (lambda: SAMLoss(reduction="batch"), ValueError, "reduction must be one of"),
    (lambda: L1SSIMLoss(alpha=1.5), ValueError, "alpha must be in"),
    (lambda: L1SSIMLoss(alpha=None), TypeError, "alpha must be a finite number"),
])
def test_constructor_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_forward_errors_name_the_argument():
    pred, target = pair()
    with pytest.raises(ValueError, match="same shape"):
        SAMLoss()(pred, target[:, :2])
    with pytest.raises(ValueError, match="pred must be 4-D"):
        SAMLoss()(pred[0], target[0])
    with pytest.raises(ValueError, match="must not be empty"):
        SAMLoss()(pred[:0], target[:0])
    with pytest.raises(ValueError, match="window_size=11"):
        SSIMLoss()(pred[..., :8, :8], target[..., :8, :8])
    with pytest.raises(TypeError, match="same dtype"):
        SSIMLoss()(pred, target.float())
