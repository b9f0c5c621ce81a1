import numpy as np
import pytest
import torch

import fastfuse
from testing_utils import DTYPES, assert_close, backend_params, non_contiguous


def numpy_channel_attention(q, k, v, scale, heads, normalize, eps=1e-12):
    """Independent oracle: per batch element and head, written with explicit loops in numpy."""
    B, cq = q.shape[:2]
    ck = k.shape[1]
    qf, kf, vf = (t.reshape(t.shape[0], t.shape[1], -1) for t in (q, k, v))
    out = np.zeros_like(qf)
    hq, hk = cq // heads, ck // heads
    for b in range(B):
        for h in range(heads):
            Q, K, V = qf[b, h * hq:(h + 1) * hq], kf[b, h * hk:(h + 1) * hk], vf[b, h * hk:(h + 1) * hk]
            if normalize:
                Q = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), eps)
                K = K / np.maximum(np.linalg.norm(K, axis=1, keepdims=True), eps)
            logits = scale[h] * Q @ K.T
            e = np.exp(logits - logits.max(1, keepdims=True))
            out[b, h * hq:(h + 1) * hq] = (e / e.sum(1, keepdims=True)) @ V
    return out.reshape(q.shape)


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(shape_q, ck, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    kshape = (shape_q[0], ck, *shape_q[2:])
    q = torch.randn(shape_q, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(kshape, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(kshape, generator=g, dtype=torch.float64).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_numpy(normalize):
    q, k, v = _inputs((2, 6, 5, 3), 4)
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    got = fastfuse.channel_attention(q, k, v, heads=2, scale=scale, normalize=normalize, backend="torch")
    want = numpy_channel_attention(q.numpy(), k.numpy(), v.numpy(), scale.numpy(), 2, normalize)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_default_scale_and_rows_are_convex_combinations():
    q, k, v = _inputs((1, 3, 4, 4), 3)
    ones = torch.ones(1, 3, 4, 4, dtype=torch.float64)
    # Every output channel is a convex combination of the value channels: constant v stays constant.
    out = fastfuse.channel_attention(q, k, ones, backend="torch")
    torch.testing.assert_close(out, ones)
    plain = fastfuse.channel_attention(q, k, v, normalize=False, backend="torch")
    explicit = fastfuse.channel_attention(q, k, v, normalize=False, scale=1 / 4.0, backend="torch")
    torch.testing.assert_close(plain, explicit)  # None means 1/sqrt(L) without normalisation


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_reference(normalize):
    # Checks the reference composition itself (the oracle the kernels are held to).
    q, k, v = _inputs((2, 4, 3, 2), 2, requires_grad=True)
    s = torch.tensor([0.7, 1.4], dtype=torch.float64, requires_grad=True)
    fn = lambda a, b, c, t: fastfuse.channel_attention(a, b, c, heads=2, scale=t, normalize=normalize,  # noqa: E731
                                                       backend="torch")
    assert torch.autograd.gradcheck(fn, (q, k, v, s), fast_mode=True)


# (q shape, k channels, heads): size 1, batch 1, odd channel counts, L not a multiple of a block,
# more key than query channels, 1-D (B, C, L) input.
SHAPES = [((1, 1, 1, 1), 1, 1), ((2, 6, 5, 7), 4, 2), ((1, 31, 9, 11), 31, 1), ((3, 3, 130), 5, 1),
          ((1, 8, 3, 37), 12, 4)]


@pytest.mark.parametrize("shape,ck,heads", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("device,backend", backend_params("channel_attention"))
def test_float64_matches_reference(shape, ck, heads, normalize, device, backend):
    q, k, v = (t.to(device) for t in _inputs(shape, ck, seed=3))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    scale = torch.linspace(0.5, 2.0, heads, dtype=torch.float64, device=device).requires_grad_(True)
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device)
    results = {}
    for name in ("torch", backend):
        out = fastfuse.channel_attention(q, k, v, heads=heads, scale=scale, normalize=normalize, backend=name)
        results[name] = (out, *torch.autograd.grad((out * weights).sum(), (q, k, v, scale)))
    for label, got, want in zip(("out", "dq", "dk", "dv", "dscale"), results[backend], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", backend_params("channel_attention"))
def test_low_precision_and_non_contiguous(dtype, device, backend):
    q, k, v = (non_contiguous(t.to(dtype).to(device)) for t in _inputs((2, 6, 9, 13), 6, seed=5))
    scale = torch.tensor([1.5, 3.0], device=device, requires_grad=True)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = fastfuse.channel_attention(*leaves, heads=2, scale=scale, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device)
    grads = torch.autograd.grad((out.float() * weights).sum(), (*leaves, scale))
    # The float64 reference on exactly the kernel's (rounded) inputs.
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_scale = scale.detach().double().requires_grad_(True)
    ref = fastfuse.channel_attention(*ref_leaves, heads=2, scale=ref_scale, backend="torch")
    ref_grads = torch.autograd.grad((ref * weights.double()).sum(), (*ref_leaves, ref_scale))
    assert_close(out, ref, dtype, name="out")
    for label, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == dtype
        assert_close(got, want, dtype, atol_scale=4, name=label)
    assert_close(grads[3], ref_grads[3], torch.float32, rtol_scale=10, atol_scale=10, name="dscale")


@pytest.mark.parametrize("device,backend", backend_params("channel_attention"))
def test_zero_channel_has_finite_gradients(device, backend):
    q, k, v = (t.to(device).requires_grad_(True) for t in _inputs((1, 3, 4, 5), 3, seed=7))
    with torch.no_grad():
        q[0, 1].zero_()
        k[0, 2].zero_()
    results = {}
    for name in ("torch", backend):
        out = fastfuse.channel_attention(q, k, v, backend=name)
        results[name] = (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))
    for got, want in zip(results[backend], results["torch"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


# The cpu kernel computes in fp32 (float64 inputs take the torch composition), so it is held to
# the float64 reference here, at shapes that cross its blocking: 4-row Gram and 8-row apply blocks
# (odd channel counts), 16/32-pixel vectors and their tails, 512-pixel chunks, the 16-run cap on a
# problem's Gram partials (L = 8300), H·W = 1, batch 1, and more key than query channels.
KERNEL_SHAPES = [((1, 1, 1, 1), 1, 1), ((1, 5, 1, 1), 7, 1), ((2, 9, 37), 13, 1), ((1, 6, 30, 37), 10, 2),
                 ((2, 18, 7, 19), 27, 3), ((1, 3, 8300), 2, 1)]


def _channel_strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, every other channel of a twice-as-wide tensor: rows not adjacent in memory."""
    wide = torch.zeros((t.shape[0], 2 * t.shape[1], *t.shape[2:]), dtype=t.dtype)
    wide[:, ::2] = t
    return wide[:, ::2]


@pytest.mark.parametrize("shape,ck,heads", KERNEL_SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_cpu_kernel_fp32_matches_float64_reference(shape, ck, heads, normalize):
    q64, k64, v64 = _inputs(shape, ck, seed=13)
    scale = torch.linspace(0.8, 2.5, heads, dtype=torch.float64)
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    leaves = [_channel_strided(q64.float()), k64.float(), non_contiguous(v64.float())]
    leaves = [t.requires_grad_(True) for t in leaves]
    scale32 = scale.float().requires_grad_(True)
    out = fastfuse.channel_attention(*leaves, heads=heads, scale=scale32, normalize=normalize, backend="cpu")
    assert out.dtype == torch.float32 and out.shape == q64.shape and out.is_contiguous()
    grads = torch.autograd.grad((out * weights.float()).sum(), (*leaves, scale32))
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ref_scale = scale.requires_grad_(True)
    ref = fastfuse.channel_attention(*ref_leaves, heads=heads, scale=ref_scale, normalize=normalize, backend="torch")
    ref_grads = torch.autograd.grad((ref * weights).sum(), (*ref_leaves, ref_scale))
    assert_close(out, ref, torch.float32, name="out")
    for label, got, want in zip(("dq", "dk", "dv", "dscale"), grads, ref_grads):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert_close(got, want, torch.float32, rtol_scale=4, atol_scale=4, name=label)


def test_cpu_kernel_zero_channel_and_broadcast_gradient():
    # A zero channel (norm below eps: the clamp passes no gradient) and the stride-0 gradient that
    # out.sum() sends back, in fp32 through the kernel.
    q, k, v = (t.float() for t in _inputs((1, 5, 6, 7), 3, seed=7))
    q[0, 1].zero_()
    k[0, 2].zero_()
    results = {}
    for name in ("torch", "cpu"):
        leaves = [t.detach().double().requires_grad_(True) if name == "torch" else t.detach().requires_grad_(True)
                  for t in (q, k, v)]
        out = fastfuse.channel_attention(*leaves, backend=name)
        results[name] = (out, *torch.autograd.grad(out.sum(), leaves))
    for got, want in zip(results["cpu"], results["torch"]):
        assert torch.isfinite(got).all()
        assert_close(got, want, torch.float32, atol_scale=4)


def test_only_some_gradients_requested():
    q, k, v = _inputs((1, 4, 3, 3), 4, seed=11)
    k.requires_grad_(True)
    for name in ("torch", "cpu"):
        out = fastfuse.channel_attention(q, k, v, heads=2, backend=name)
        (grad_k,) = torch.autograd.grad(out.sum() + out.square().sum(), (k,))
        if name == "torch":
            want = grad_k
    torch.testing.assert_close(grad_k, want)
    # The fp32 kernel with only k's gradient wanted (the kernel skips dQ, dV and dscale).
    q32, v32 = q.float(), v.float()
    k32 = k.detach().float().requires_grad_(True)
    out = fastfuse.channel_attention(q32, k32, v32, heads=2, backend="cpu")
    (grad_k32,) = torch.autograd.grad(out.sum() + out.square().sum(), (k32,))
    assert_close(grad_k32, want, torch.float32, atol_scale=4, name="dk")


def test_bad_arguments_name_the_argument():
    q, k, v = _inputs((1, 4, 3, 3), 4)
    with pytest.raises(ValueError, match="heads"):
        fastfuse.channel_attention(q, k, v, heads=3)
    with pytest.raises(ValueError, match="k must have shape"):
        fastfuse.channel_attention(q, k[..., :2], v, heads=1)
    with pytest.raises(ValueError, match="v must have shape"):
        fastfuse.channel_attention(q, k, v[:, :2], heads=1)
    with pytest.raises(TypeError, match="k and v|q and k"):
        fastfuse.channel_attention(q, k.float(), v, heads=1)
    with pytest.raises(ValueError, match="scale must have shape"):
        fastfuse.channel_attention(q, k, v, heads=2, scale=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 3-D"):
        fastfuse.channel_attention(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match="eps"):
        fastfuse.channel_attention(q, k, v, eps=0.0)
    with pytest.raises(TypeError, match="heads must be an int"):
        fastfuse.channel_attention(q, k, v, heads=2.0)
