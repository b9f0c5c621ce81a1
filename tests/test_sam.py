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
    x64 = torch.rand(shape, generator=g, dtype=torch.float64) + 0.05
    y64 = torch.rand(shape, generator=g, dtype=torch.float64) + 0.05
    x = x64.to(device, dtype).requires_grad_(True)
    y = non_contiguous(y64.to(device, dtype)).requires_grad_(True)
    out = fastfuse.sam_map(x, y, backend=backend)
    xr, yr = x64.clone().requires_grad_(True), y64.clone().requires_grad_(True)
    ref = fastfuse.sam_map(xr, yr, backend="torch")
    # Angles are in degrees (up to 180): scale the absolute tolerance by the output's range.
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, atol_scale=10, name="angle")
    grad = torch.rand(ref.shape, generator=g, dtype=torch.float64)
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
    expected = torch.autograd.grad(fastfuse.sam_map(a, b, backend="torch").sum(), a)[0]
    torch.testing.assert_close(a.grad, expected)
