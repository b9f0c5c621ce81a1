"""The op contract every backend keeps: real outputs and gradients have exactly the shapes, dtypes
and strides the fake kernels promise (what torch.compile plans its buffers from), the ops compile
whole (forward and backward, fullgraph), double backward works, and forward-mode AD is refused
with an error naming the op instead of returning zero tangents.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastfuse
from fastfuse import backends
from fastfuse.ops import degrade as degrade_ops

CPU = torch.device("cpu")


def _channel_last(*shape, dtype=torch.float32):
    """A dense but non-contiguous (B, C, H, W) tensor: the channels-last memory layout."""
    B, C, H, W = shape
    return torch.randn(B, H, W, C, dtype=dtype).permute(0, 3, 1, 2)


def _strided(*shape, dtype=torch.float32):
    """A non-dense tensor (every other element of the last dimension)."""
    return torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]


def _selective_scan_args():
    u = torch.randn(1, 7, 4).transpose(1, 2)  # (1, 4, 7), non-contiguous
    return dict(u=u, delta=torch.rand(1, 4, 7), A=-torch.rand(4, 2), B=torch.randn(1, 2, 7), C=_strided(1, 2, 7),
                D=torch.randn(4), z=torch.randn(1, 4, 7), delta_bias=torch.randn(4))


def _css_args(channel_last=False):
    D, N, R = 3, 2, 1
    x = torch.randn(1, 3, 5, D) if channel_last else _channel_last(1, D, 3, 5)
    return dict(x=x, x_proj_weight=torch.randn(4, R + 2 * N, D) * 0.3, x_proj_bias=torch.randn(4, R + 2 * N) * 0.1,
                dt_projs_weight=torch.randn(4, D, R) * 0.3, dt_projs_bias=torch.randn(4, D) * 0.1,
                A_logs=torch.randn(4 * D, N) * 0.1, Ds=torch.randn(4 * D))


def _idx(B, K, L):
    return torch.randint(0, L, (B, K))


def _degrade_kernel():
    return torch.rand(3, 3) / 4


# op name -> (public function, tensor inputs (name -> tensor), other keyword arguments)
CASES = {
    "sam_map": (fastfuse.sam_map, lambda: dict(x=_channel_last(2, 3, 4, 5), y=_strided(2, 3, 4, 5)), {}),
    "selective_scan": (fastfuse.selective_scan, _selective_scan_args,
                       dict(delta_softplus=True, return_last_state=True)),
    "cross_scan": (fastfuse.cross_scan, lambda: dict(x=_channel_last(1, 3, 4, 5)), {}),
    "cross_merge": (fastfuse.cross_merge, lambda: dict(ys=_strided(1, 4, 3, 4, 5)), {}),
    "cross_selective_scan": (fastfuse.cross_selective_scan, _css_args, {}),
    "ssim_map": (fastfuse.ssim_map, lambda: dict(x=_channel_last(1, 2, 6, 7), y=_strided(1, 2, 6, 7)),
                 dict(window_size=3)),
    "select_points": (fastfuse.select_points, lambda: dict(score=_strided(2, 9)), dict(k=3)),
    "gather_points": (fastfuse.gather_points,
                      lambda: dict(feat=_channel_last(2, 3, 4, 5), idx=_idx(2, 6, 20)), {}),
    "gather_sum_points": (fastfuse.gather_sum_points,
                          lambda: dict(a=_channel_last(2, 3, 4, 5), b=torch.randn(2, 3, 4, 5), idx=_idx(2, 6, 20)),
                          {}),
    "scatter_points": (fastfuse.scatter_points,
                       lambda: dict(base=_channel_last(2, 3, 4, 5), values=_strided(2, 3, 6), idx=_idx(2, 6, 20)),
                       dict(reduce="replace")),
    "add_scatter_points": (fastfuse.add_scatter_points,
                           lambda: dict(base1=_channel_last(2, 3, 4, 5), base2=torch.randn(2, 3, 4, 5),
                                        values=torch.randn(2, 3, 6), idx=_idx(2, 6, 20)), {}),
    "spectral_response": (fastfuse.spectral_response,
                          lambda: dict(z=_channel_last(1, 4, 3, 5), R=torch.rand(2, 4).t().contiguous().t()), {}),
    "spatial_degrade": (fastfuse.spatial_degrade,
                        lambda: dict(z=_channel_last(1, 2, 6, 8), kernel=_degrade_kernel()), dict(ratio=2)),
    "spatial_degrade_adjoint": (fastfuse.spatial_degrade_adjoint,
                                lambda: dict(x=_channel_last(1, 2, 3, 4), kernel=_degrade_kernel()),
                                dict(ratio=2, size=(6, 8))),
    "spatial_degrade_sam": (fastfuse.spatial_degrade_sam,
                            lambda: dict(z=_channel_last(1, 3, 6, 8), kernel=_degrade_kernel(),
                                         x=_strided(1, 3, 3, 4)), dict(ratio=2)),
    "spectral_response_ssim": (fastfuse.spectral_response_ssim,
                               lambda: dict(z=_channel_last(1, 4, 6, 7), R=torch.rand(2, 4) / 4,
                                            y=torch.rand(1, 2, 6, 7)), dict(window_size=3)),
}
def _backends(op):
    return [b for b in ("torch", "triton", "cpu")
            if b in backends.implementations(op) and backends.unavailable_reason(op, b, CPU) is None]


# Ops whose gradient is another op (define_op's backward= hook): that op's fake gives the layout.
COMPOSED_BACKWARD = {"cross_scan", "cross_merge", "gather_sum_points", "scatter_points", "add_scatter_points"}
PAIRS = [(op, b) for op in CASES for b in _backends(op)]


def _call(op, tensors, backend):
    fn, _, kwargs = CASES[op]
    return fn(**tensors, **kwargs, backend=backend)


def _floating_outputs(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if o.is_floating_point()]


def _layout(t):
    return tuple(t.shape), t.dtype, tuple(t.stride()) if t.numel() else None


def _run(op, tensors, backend):
    """Outputs and gradients (of the sum of the floating outputs) w.r.t. every floating input."""
    leaves = {k: (v.detach().requires_grad_(True) if v.is_floating_point() else v) for k, v in tensors.items()}
    out = _call(op, leaves, backend)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    wrt = [v for v in leaves.values() if v.requires_grad]
    grads = []
    if wrt and _floating_outputs(out):
        total = sum(o.sum() for o in _floating_outputs(out))
        grads = torch.autograd.grad(total, wrt, allow_unused=True)
    return list(outs), [g for g in grads], wrt


def test_every_op_of_the_ops_package_has_a_contract_case():
    from fastfuse.ops import cross_scan, degrade, sam, select, selective_scan, ssim  # noqa: F401
    ours = {name for name in backends.registered_ops()
            if backends.implementations(name)["torch"].forward.split(":")[0].rsplit(".", 1)[-1] in
            ("sam", "selective_scan", "cross_scan", "ssim", "select", "degrade")}
    assert ours - set(CASES) == set()


@pytest.mark.parametrize("op,backend", PAIRS, ids=[f"{op}-{b}" for op, b in PAIRS])
def test_real_outputs_and_gradients_match_the_fake_kernels(op, backend):
    torch.manual_seed(0)
    tensors = CASES[op][1]()
    outs, grads, wrt = _run(op, tensors, backend)
    with FakeTensorMode() as mode:
        fake_tensors = {k: mode.from_tensor(v) for k, v in tensors.items()}
        fake_outs, fake_grads, fake_wrt = _run(op, fake_tensors, backend)
    assert [_layout(o) for o in outs] == [_layout(o) for o in fake_outs]
    assert [g is None for g in grads] == [g is None for g in fake_grads]
    for g, fg, x in zip(grads, fake_grads, wrt):
        if g is not None:
            assert _layout(g) == _layout(fg)
            if op not in COMPOSED_BACKWARD:  # the backward op's promise: empty_like(input)
                assert _layout(g) == _layout(torch.empty_like(x))


# Inductor (on CPU) plans buffers from the fake kernels and asserts the real strides: the
# cross_selective_scan / SS2D break was a gradient whose layout differed from its fake's.
# Inductor compiles are slow on CPU: the ops with the most layouts (several outputs, channel-last
# inputs, the reported break); every op compiles under aot_eager below.
COMPILED = ["cross_selective_scan", "spatial_degrade_sam", "selective_scan"]


@pytest.mark.parametrize("op", COMPILED)
def test_compiled_forward_and_backward_match_eager(op):
    torch._dynamo.reset()
    torch.manual_seed(0)
    tensors = CASES[op][1]()

    def step(*values):
        leaves = dict(zip(tensors, values))
        return sum(o.sum() for o in _floating_outputs(_call(op, leaves, "torch")))

    leaves = [v.detach().requires_grad_(v.is_floating_point()) for v in tensors.values()]
    eager_grads = torch.autograd.grad(step(*leaves), [v for v in leaves if v.requires_grad])
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    leaves = [v.detach().requires_grad_(v.is_floating_point()) for v in tensors.values()]
    grads = torch.autograd.grad(compiled(*leaves), [v for v in leaves if v.requires_grad])
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", list(CASES))
def test_compiled_fullgraph_forward_and_backward_of_every_op(op):
    torch._dynamo.reset()
    tensors = CASES[op][1]()
    def total(*values):
        out = _call(op, dict(zip(tensors, values)), "torch")
        floating = _floating_outputs(out)
        return sum(o.sum() for o in floating) if floating else out.sum()  # select_points: indices

    step = torch.compile(total, fullgraph=True, backend="aot_eager")
    leaves = [v.detach().requires_grad_(v.is_floating_point()) for v in tensors.values()]
    out = step(*leaves)
    if out.requires_grad:
        out.backward()
        assert all(v.grad is not None for v in leaves if v.requires_grad)


def test_dynamic_shape_compile_of_ssim_map_and_spectral_response_ssim():
    torch._dynamo.reset()
    x, y = torch.rand(1, 2, 8, 9), torch.rand(1, 2, 8, 9)
    z, R = torch.rand(1, 3, 8, 9), torch.rand(2, 3) / 3
    f = torch.compile(lambda a, b: fastfuse.ssim_map(a, b, window_size=3, data_range=1.0), fullgraph=True,
                      dynamic=True, backend="aot_eager")
    torch.testing.assert_close(f(x, y), fastfuse.ssim_map(x, y, window_size=3))
    g = torch.compile(lambda a, r, b: fastfuse.spectral_response_ssim(a, r, b, window_size=3)[1], fullgraph=True,
                      dynamic=True, backend="aot_eager")
    torch.testing.assert_close(g(z, R, x), fastfuse.spectral_response_ssim(z, R, x, window_size=3)[1])


# ---------------------------------------------------------------------------------------------
# Double backward: define_op differentiates the reference's vector-Jacobian product.

DOUBLE = {
    "sam_map": lambda: (fastfuse.sam_map, (torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)), {}),
    "spectral_response": lambda: (fastfuse.spectral_response, (torch.randn(1, 3, 2, 2), torch.randn(2, 3)), {}),
    "ssim_map": lambda: (fastfuse.ssim_map, (torch.rand(1, 1, 3, 3), torch.rand(1, 1, 3, 3)), dict(window_size=3)),
    "gather_points": lambda: (lambda f, **kw: fastfuse.gather_points(f, torch.tensor([[0, 3, 3]]), **kw),
                              (torch.randn(1, 2, 5),), {}),
    "cross_scan": lambda: (fastfuse.cross_scan, (torch.randn(1, 2, 2, 3),), {}),
    # The kernel enters as a tensor argument: one drawn inside the function would change per call.
    "spatial_degrade_sam": lambda: (lambda z, k, x, **kw: fastfuse.spatial_degrade_sam(z, k, 2, x, **kw)[1],
                                    (torch.randn(1, 2, 4, 4), torch.rand(3, 3) / 4 + 0.1, torch.randn(1, 2, 2, 2)),
                                    {}),
}


@pytest.mark.parametrize("op", list(DOUBLE))
def test_double_backward_gradgradcheck(op):
    torch.manual_seed(0)
    fn, inputs, kwargs = DOUBLE[op]()
    inputs = tuple(t.double().requires_grad_(True) for t in inputs)
    assert torch.autograd.gradgradcheck(lambda *a: fn(*a, backend="torch", **kwargs), inputs, fast_mode=True)


def test_double_backward_of_a_triton_op_matches_the_reference():
    if "triton" not in _backends("sam_map"):
        pytest.skip("the triton backend is unavailable here (no GPU and no TRITON_INTERPRET)")
    x, y = torch.randn(1, 3, 2, 3), torch.randn(1, 3, 2, 3)
    results = []
    for backend in ("torch", "triton"):
        a = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fastfuse.sam_map(a, y, backend=backend).sum(), a, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), a)
        results.append(gg)
    torch.testing.assert_close(results[1], results[0], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Forward-mode AD is refused (no forward formulas); before, the tangents were silently zero.

FORWARD_MODE = {
    "sam_map": lambda a: fastfuse.sam_map(a, torch.ones_like(a)),
    "ssim_map": lambda a: fastfuse.ssim_map(a, torch.ones_like(a), window_size=3),
    "spectral_response": lambda a: fastfuse.spectral_response(a, torch.ones(2, a.shape[1])),
}


@pytest.mark.parametrize("op", list(FORWARD_MODE))
def test_forward_mode_ad_raises_naming_the_op(op):
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(NotImplementedError, match=f"forward-mode AD is not supported by fastfuse.{op}"):
        torch.func.jvp(FORWARD_MODE[op], (x,), (torch.ones_like(x),))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=f"not supported by fastfuse.{op}"):
        FORWARD_MODE[op](fwAD.make_dual(x, torch.ones_like(x)))


def test_torch_func_grad_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="torch.func transforms .* not supported by fastfuse.sam_map"):
        torch.func.grad(lambda a: fastfuse.sam_map(a, torch.ones_like(a)).sum())(torch.rand(1, 3, 2, 2))


# ---------------------------------------------------------------------------------------------
# The 32-bit refusal counts outputs too, and edge cases of the select/degrade families.

def test_the_32_bit_count_includes_outputs_larger_than_the_inputs():
    x = torch.empty((1, 1, 1000, 1000), device="meta")
    kernel = torch.empty((3, 3), device="meta")
    args = (x, kernel, 64, [64000, 64000], "circular", [0, 0])
    assert degrade_ops._spatial_degrade_adjoint.numel(args) == 64000 * 64000 > backends.INT32_LIMIT


def test_out_of_range_or_negative_indices_raise_on_cpu():
    feat = torch.randn(1, 2, 5)
    for bad in (5, -1):
        with pytest.raises(IndexError, match=r"gather_points: idx\[0, 1\] = .* outside \[0, L\) with L = 5"):
            fastfuse.gather_points(feat, torch.tensor([[0, bad]]), backend="torch")
        with pytest.raises(IndexError, match="scatter_points: idx"):
            fastfuse.scatter_points(feat, torch.randn(1, 2, 2), torch.tensor([[0, bad]]), backend="torch")
    # An invalid slot's index is never read, so it is not checked.
    out = fastfuse.gather_points(feat, torch.tensor([[0, 9]]), torch.tensor([[True, False]]), backend="torch")
    assert out[0, :, 1].eq(0).all()


@pytest.mark.parametrize("backend", _backends("scatter_points"))
def test_scatter_of_no_points_returns_a_copy_of_base(backend):
    base = torch.randn(2, 3, 4)
    for reduce in ("add", "replace"):
        out = fastfuse.scatter_points(base, torch.zeros(2, 3, 0), torch.zeros(2, 0, dtype=torch.int64),
                                      reduce=reduce, backend=backend)
        assert torch.equal(out, base) and out.data_ptr() != base.data_ptr()


def test_select_points_with_an_empty_batch():
    assert fastfuse.select_points(torch.randn(0, 1, 3, 3), 2).shape == (0, 2)
    idx, valid = fastfuse.select_points(torch.randn(0, 9), torch.zeros(0, dtype=torch.int64), capacity=3)
    assert idx.shape == valid.shape == (0, 3)


def test_spatial_degrade_without_bands_is_empty_with_zero_gradient():
    z = torch.randn(1, 0, 8, 8, requires_grad=True)
    out = fastfuse.spatial_degrade(z, torch.ones(3, 3) / 9, 2)
    assert out.shape == (1, 0, 4, 4)
    out.sum().backward()
    assert z.grad.shape == z.shape
