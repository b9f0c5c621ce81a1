import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfuse
from fastfuse.nn.ss2d import SS2D
from testing_utils import backend_params


class VMambaSS2DOracle(nn.Module):
    """SS2D written from VMamba's description with plain torch ops (einsum and a step-by-step scan).

    Same parameter names as VMamba's SS2D. in_proj -> (x, z) -> depthwise conv -> SiLU -> four
    scan orders (row-major, column-major, both reversed) -> per-direction x_proj (dt, B, C) ->
    delta = softplus(dt_proj(dt) + bias) -> x_t = exp(delta A) x_{t-1} + delta B u -> y = C x + D u
    -> back to pixel order, summed over directions -> LayerNorm -> · SiLU(z) -> out_proj.
    Parameters are randomised (not VMamba's init) so that every one of them matters.
    """

    def __init__(self, d_model, d_state, ssm_ratio, with_z, channel_first, d_conv=3, bias=False):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        D = int(ssm_ratio * d_model)
        R = math.ceil(d_model / 16)
        N = d_state
        self.with_z, self.channel_first, self.D, self.N, self.R = with_z, channel_first, D, N, R
        self.in_proj = nn.Linear(d_model, 2 * D if with_z else D, bias=bias)
        self.conv2d = nn.Conv2d(D, D, d_conv, padding=(d_conv - 1) // 2, groups=D, bias=True) if d_conv > 1 else None
        self.x_proj_weight = nn.Parameter(torch.randn(4, R + 2 * N, D, generator=g) / math.sqrt(D))
        self.dt_projs_weight = nn.Parameter(torch.randn(4, D, R, generator=g) * R ** -0.5)
        self.dt_projs_bias = nn.Parameter(torch.randn(4, D, generator=g) - 3.0)
        self.A_logs = nn.Parameter(torch.log(torch.arange(1.0, N + 1)).repeat(4 * D, 1)
                                   + 0.2 * torch.randn(4 * D, N, generator=g))
        self.Ds = nn.Parameter(1 + 0.3 * torch.randn(4 * D, generator=g))
        self.out_norm = nn.LayerNorm(D)
        self.out_proj = nn.Linear(D, d_model, bias=bias)
        with torch.no_grad():
            self.out_norm.weight.add_(0.3 * torch.randn(D, generator=g))
            self.out_norm.bias.add_(0.3 * torch.randn(D, generator=g))

    def forward(self, x):
        if self.channel_first:
            x = x.permute(0, 2, 3, 1)
        x = self.in_proj(x)
        if self.with_z:
            x, z = x.chunk(2, dim=-1)
        x = x.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            x = self.conv2d(x)
        x = F.silu(x)
        B, D, H, W = x.shape
        L, N, R = H * W, self.N, self.R
        pixels = torch.arange(L).view(H, W)
        orders = [pixels.flatten(), pixels.t().flatten()]
        orders += [o.flip(0) for o in orders]
        flat = x.reshape(B, D, L)
        y = torch.zeros_like(flat)
        for k, order in enumerate(orders):
            u = flat[:, :, order]
            x_dbl = torch.einsum("bdl,cd->bcl", u, self.x_proj_weight[k])
            dt, B_k, C_k = torch.split(x_dbl, [R, N, N], dim=1)
            delta = F.softplus(torch.einsum("brl,dr->bdl", dt, self.dt_projs_weight[k])
                               + self.dt_projs_bias[k][None, :, None])
            A = -torch.exp(self.A_logs[k * D:(k + 1) * D])
            skip = self.Ds[k * D:(k + 1) * D]
            state = u.new_zeros(B, D, N)
            outs = []
            for t in range(L):
                state = (torch.exp(delta[:, :, t, None] * A) * state
                         + (delta[:, :, t] * u[:, :, t])[:, :, None] * B_k[:, None, :, t])
                outs.append((state * C_k[:, None, :, t]).sum(-1) + skip * u[:, :, t])
            y = y.index_add(2, order, torch.stack(outs, dim=-1))
        y = self.out_norm(y.transpose(1, 2)).reshape(B, H, W, D)
        if self.with_z:
            y = y * F.silu(z)
        out = self.out_proj(y)
        return out.permute(0, 3, 1, 2) if self.channel_first else out


def vmamba_state_dict_shapes(d_model, d_state, ssm_ratio, with_z, d_conv=3, bias=False):
    """Keys and shapes of VMamba's SS2D state_dict (classification/models/vmamba.py)."""
    D, R = int(ssm_ratio * d_model), math.ceil(d_model / 16)
    shapes = {
        "in_proj.weight": (2 * D if with_z else D, d_model),
        "x_proj_weight": (4, R + 2 * d_state, D),
        "dt_projs_weight": (4, D, R),
        "dt_projs_bias": (4, D),
        "A_logs": (4 * D, d_state),
        "Ds": (4 * D,),
        "out_norm.weight": (D,),
        "out_norm.bias": (D,),
        "out_proj.weight": (d_model, D),
    }
    if d_conv > 1:
        shapes.update({"conv2d.weight": (D, 1, d_conv, d_conv), "conv2d.bias": (D,)})
    if bias:
        shapes.update({"in_proj.bias": (2 * D if with_z else D,), "out_proj.bias": (d_model,)})
    return shapes


@pytest.mark.parametrize("forward_type,d_conv,bias", [("v0", 3, False), ("v05_noz", 3, False),
                                                      ("v05_noz", 1, True), ("v2", 5, False)])
@pytest.mark.parametrize("channel_first", [False, True])
def test_state_dict_matches_vmamba_names_and_shapes(forward_type, d_conv, bias, channel_first):
    module = SS2D(d_model=40, d_state=4, ssm_ratio=1.5, d_conv=d_conv, bias=bias, forward_type=forward_type,
                  channel_first=channel_first)
    got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert got == vmamba_state_dict_shapes(40, 4, 1.5, forward_type != "v05_noz", d_conv, bias)
    assert module.dt_rank == 3  # "auto" = ceil(40 / 16)


def test_init_follows_vmamba():
    torch.manual_seed(0)
    module = SS2D(d_model=32, d_state=5, ssm_ratio=2.0, dt_min=0.01, dt_max=0.05, dt_init_floor=1e-4)
    D, N, R = 64, 5, 2
    torch.testing.assert_close(module.A_logs, torch.log(torch.arange(1.0, N + 1)).repeat(4 * D, 1))
    assert module.A_logs.dtype == torch.float32 and torch.equal(module.Ds, torch.ones(4 * D))
    assert module.A_logs._no_weight_decay and module.Ds._no_weight_decay
    dt = F.softplus(module.dt_projs_bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert module.dt_projs_weight.abs().max() <= R ** -0.5
    assert module.x_proj_weight.abs().max() <= 1 / math.sqrt(D)
    assert module.x_proj_weight.std() > 0.3 / math.sqrt(D)  # actually random, not constant
    floored = SS2D(d_model=16, d_state=2, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-4, dt_init="constant")
    torch.testing.assert_close(F.softplus(floored.dt_projs_bias), torch.full((4, 32), 1e-4))
    assert torch.all(floored.dt_projs_weight == 1.0)


@pytest.mark.parametrize("forward_type", ["v0", "v05_noz"])
@pytest.mark.parametrize("channel_first", [False, True])
def test_matches_oracle_float64(forward_type, channel_first):
    with_z = forward_type == "v0"
    oracle = VMambaSS2DOracle(d_model=4, d_state=3, ssm_ratio=1.5, with_z=with_z, channel_first=channel_first).double()
    module = SS2D(d_model=4, d_state=3, ssm_ratio=1.5, forward_type=forward_type, channel_first=channel_first,
                  backend="torch").double()
    module.load_state_dict(oracle.state_dict(), strict=True)
    g = torch.Generator().manual_seed(12)
    x = torch.randn((2, 4, 3, 4) if channel_first else (2, 3, 4, 4), generator=g, dtype=torch.float64)
    x_oracle, x_module = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected, got = oracle(x_oracle), module(x_module)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)

    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    expected.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(x_module.grad, x_oracle.grad, rtol=1e-9, atol=1e-10)
    oracle_params = dict(oracle.named_parameters())
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, oracle_params[name].grad, rtol=1e-9, atol=1e-10, msg=name)


def test_loads_conv_shaped_pointwise_weights():
    # VMamba's channel-first Linear2d also accepts 1×1-conv weights; so does ours.
    source = SS2D(d_model=8, d_state=2, channel_first=True, forward_type="v05_noz")
    state = {k: (v[:, :, None, None] if k in ("in_proj.weight", "out_proj.weight") else v)
             for k, v in source.state_dict().items()}
    target = SS2D(d_model=8, d_state=2, channel_first=True, forward_type="v05_noz", backend="torch")
    target.load_state_dict(state, strict=True)
    x = torch.randn(1, 8, 3, 3)
    source.backend = "torch"
    torch.testing.assert_close(target(x), source(x))


@pytest.mark.parametrize("device,backend", backend_params("cross_selective_scan"))
def test_kernel_backend_matches_torch(device, backend):
    torch.manual_seed(1)
    module = SS2D(d_model=8, d_state=2, ssm_ratio=1.0, forward_type="v05_noz", backend="torch").to(device)
    x = torch.randn(1, 3, 4, 8, device=device)
    x_ref, x_kernel = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = module(x_ref)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x_ref, *module.parameters()])
    module.backend = backend
    out = module(x_kernel)
    grads = torch.autograd.grad(out.square().sum(), [x_kernel, *module.parameters()])
    torch.testing.assert_close(out, ref, rtol=6e-4, atol=2e-3)
    for (name, _), g, r in zip([("x", None), *module.named_parameters()], grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=3e-3, atol=2e-3 * max(r.abs().max().item(), 1.0), msg=name)


def test_half_input_keeps_dtype_and_matches_float64():
    torch.manual_seed(2)
    module = SS2D(d_model=8, d_state=2, forward_type="v0", backend="torch")
    x = torch.randn(2, 3, 3, 8)
    expected = module.double()(x.double())
    half_module = module.to(torch.bfloat16)
    out = half_module(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=5e-2, atol=5e-2 * scale)


def test_bad_arguments():
    with pytest.raises(ValueError, match="forward_type"):
        SS2D(d_model=8, forward_type="v3_noz")
    with pytest.raises(ValueError, match="dt_init"):
        SS2D(d_model=8, dt_init="uniform")
    module = SS2D(d_model=8, d_state=2, backend="torch")
    with pytest.raises(ValueError, match=r"\(B, H, W, d_model\) with d_model=8"):
        module(torch.randn(1, 8, 3, 3))


# --------------------------------------------------------------------------- reported repros

@pytest.mark.parametrize("kwargs,match", [
    (dict(d_conv=4), "d_conv must be odd"),
    (dict(d_state=300), "d_state must be at most 256"),
    (dict(d_model=8.5), "d_model must be a positive int"),
    (dict(dt_min=0), "dt_min must be a finite positive number"),
    (dict(dt_min=0.5, dt_max=0.1), "dt_min must not exceed dt_max"),
    (dict(act_layer=None), "act_layer must be an nn.Module class"),
    (dict(dt_rank="bogus"), "dt_rank must be 'auto' or a positive int"),
])
def test_constructor_refuses_bad_configuration(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastfuse.nn.SS2D(**{"d_model": 8, **kwargs})


def test_deepcopy_keeps_no_weight_decay_marks():
    import copy
    block = copy.deepcopy(fastfuse.nn.SS2D(d_model=8, d_state=2))
    assert block.A_logs._no_weight_decay and block.Ds._no_weight_decay
    assert block.no_weight_decay() == {"A_logs", "Ds"}


def test_forward_refuses_empty_image_and_mismatched_dtype():
    block = fastfuse.nn.SS2D(d_model=8, d_state=2)
    with pytest.raises(ValueError, match="at least 1×1"):
        block(torch.randn(1, 0, 4, 8))
    with pytest.raises(TypeError, match="the input is torch.float16 but the module's parameters are torch.float32"):
        block(torch.randn(1, 4, 4, 8, dtype=torch.float16))


def test_nn_lists_its_modules():
    assert {"SS2D", "SSIMLoss", "SAMLoss", "L1SSIMLoss"} <= set(dir(fastfuse.nn))
