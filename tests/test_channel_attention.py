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


def test_only_some_gradients_requested():
    q, k, v = _inputs((1, 4, 3, 3), 4, seed=11)
    k.requires_grad_(True)
    for name in ("torch", "cpu"):
        out = fastfuse.channel_attention(q, k, v, heads=2, backend=name)
        (grad_k,) = torch.autograd.grad(out.sum() + out.square().sum(), (k,))
        if name == "torch":
            want = grad_k
    torch.testing.assert_close(grad_k, want)


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
