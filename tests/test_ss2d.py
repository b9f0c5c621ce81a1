import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfuse
from fastfuse.nn.ss2d import SS2D
from testing_utils import backend_params


def pixel_orders(H: int, W: int, scan: str) -> list[torch.Tensor]:
    """VMamba's per-direction pixel orders (csm_triton scans=0 cross, 1 unidi, 2 bidi)."""
    pixels = torch.arange(H * W).view(H, W)
    rows, cols = pixels.flatten(), pixels.t().flatten()
    return {"cross": [rows, cols, rows.flip(0), cols.flip(0)], "unidi": [rows] * 4,
            "bidi": [rows, rows, rows.flip(0), rows.flip(0)]}[scan]


class VMambaSS2DOracle(nn.Module):
    """SS2D written from VMamba's description with plain torch ops (einsum and a step-by-step scan).

    Same parameter names as VMamba's SS2D. in_proj -> (x, z) -> depthwise conv -> SiLU -> scan
    orders (cross: row-major, column-major, both reversed; unidi; bidi) -> per-direction x_proj
    (dt, B, C) -> delta = softplus(dt_proj(dt) + bias) -> x_t = exp(delta A) x_{t-1} + delta B u
    -> y = C x + D u -> back to pixel order, summed over directions -> out norm -> [GELU] ->
    · act(z) -> out_proj. scan="cascade" is VMamba's cascade2d (v052dc). Parameters are
    randomised (not VMamba's init) so that every one of them matters.
    """

    def __init__(self, d_model, d_state, ssm_ratio, with_z, channel_first, d_conv=3, bias=False, scan="cross",
                 out_norm="layernorm", z_act=True, out_act=False):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        D = int(ssm_ratio * d_model)
        R = math.ceil(d_model / 16)
        N = d_state
        self.with_z, self.channel_first, self.D, self.N, self.R = with_z, channel_first, D, N, R
        self.scan, self.out_norm_kind, self.z_act, self.out_act = scan, out_norm, z_act, out_act
        self.in_proj = nn.Linear(d_model, 2 * D if with_z else D, bias=bias)
        self.conv2d = nn.Conv2d(D, D, d_conv, padding=(d_conv - 1) // 2, groups=D, bias=True) if d_conv > 1 else None
        self.x_proj_weight = nn.Parameter(torch.randn(4, R + 2 * N, D, generator=g) / math.sqrt(D))
        self.dt_projs_weight = nn.Parameter(torch.randn(4, D, R, generator=g) * R ** -0.5)
        self.dt_projs_bias = nn.Parameter(torch.randn(4, D, generator=g) - 3.0)
        self.A_logs = nn.Parameter(torch.log(torch.arange(1.0, N + 1)).repeat(4 * D, 1)
                                   + 0.2 * torch.randn(4 * D, N, generator=g))
        self.Ds = nn.Parameter(1 + 0.3 * torch.randn(4 * D, generator=g))
        # VMamba's get_outnorm: its Sequentials hold Permute modules where these hold Identity.
        dwconv = lambda: nn.Conv2d(D, D, 3, padding=1, groups=D, bias=False)  # noqa: E731
        self.out_norm = {"layernorm": lambda: nn.LayerNorm(D),
                         "dwconv3": lambda: nn.Sequential(nn.Identity(), dwconv(), nn.Identity()),
                         "cnorm": lambda: nn.Sequential(nn.LayerNorm(D), nn.Identity(), dwconv(), nn.Identity()),
                         }.get(out_norm, nn.Identity)()
        self.out_proj = nn.Linear(D, d_model, bias=bias)
        with torch.no_grad():
            for p in self.out_norm.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))

    def scan_direction(self, k, u):
        """Direction k's selective scan of sequences u (batch, D, L), one step at a time."""
        D, N, R = self.D, self.N, self.R
        x_dbl = torch.einsum("bdl,cd->bcl", u, self.x_proj_weight[k])
        dt, B_k, C_k = torch.split(x_dbl, [R, N, N], dim=1)
        delta = F.softplus(torch.einsum("brl,dr->bdl", dt, self.dt_projs_weight[k])
                           + self.dt_projs_bias[k][None, :, None])
        A = -torch.exp(self.A_logs[k * D:(k + 1) * D])
        skip = self.Ds[k * D:(k + 1) * D]
        state = u.new_zeros(u.shape[0], D, N)
        outs = []
        for t in range(u.shape[2]):
            state = (torch.exp(delta[:, :, t, None] * A) * state
                     + (delta[:, :, t] * u[:, :, t])[:, :, None] * B_k[:, None, :, t])
            outs.append((state * C_k[:, None, :, t]).sum(-1) + skip * u[:, :, t])
        return torch.stack(outs, dim=-1)

    def cascade(self, x):
        """v052dc: LN; rows scanned both ways (outputs summed as they come); LN; columns both ways."""
        ln = lambda t: F.layer_norm(t.permute(0, 2, 3, 1), (self.D,)).permute(0, 3, 1, 2)  # noqa: E731
        x = ln(x)
        y_row = torch.stack([self.scan_direction(0, x[:, :, h]) + self.scan_direction(1, x[:, :, h].flip(-1))
                             for h in range(x.shape[2])], dim=2)
        y_row = ln(y_row)
        return torch.stack([self.scan_direction(2, y_row[:, :, :, w])
                            + self.scan_direction(3, y_row[:, :, :, w].flip(-1))
                            for w in range(x.shape[3])], dim=3)

    def apply_out_norm(self, y):
        """y (B, D, H, W) -> VMamba's out norm of the configured kind."""
        kind = self.out_norm_kind
        layer_norm = lambda t, m: m(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # noqa: E731
        if kind == "layernorm":
            return layer_norm(y, self.out_norm)
        if kind == "dwconv3":
            return self.out_norm[1](y)
        if kind == "cnorm":
            return self.out_norm[2](layer_norm(y, self.out_norm[0]))
        if kind == "softmax":  # SoftmaxSpatial: over the pixels of each channel
            return torch.softmax(y.flatten(2), dim=-1).view_as(y)
        return torch.sigmoid(y) if kind == "sigmoid" else y

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
        if self.scan == "cascade":
            y = self.cascade(x)
        else:
            flat = x.reshape(B, D, H * W)
            y = torch.zeros_like(flat)
            for k, order in enumerate(pixel_orders(H, W, self.scan)):
                y = y.index_add(2, order, self.scan_direction(k, flat[:, :, order]))
            y = y.view(B, D, H, W)
        y = self.apply_out_norm(y).permute(0, 2, 3, 1)
        if self.out_act:
            y = F.gelu(y)
        if self.with_z:
            y = y * (F.silu(z) if self.z_act else z)
        out = self.out_proj(y)
        return out.permute(0, 3, 1, 2) if self.channel_first else out


def vmamba_state_dict_shapes(d_model, d_state, ssm_ratio, with_z, d_conv=3, bias=False, out_norm="layernorm",
                             conv_bias=True):
    """Keys and shapes of VMamba's SS2D state_dict (classification/models/vmamba.py, read by hand).

    SS2Dv0/SS2Dv2: in_proj Linear(d_model, 2·d_inner or d_inner with _noz); conv2d only for
    d_conv > 1, its bias only with conv_bias; x_proj_weight stacked from 4 Linear(d_inner, R + 2N);
    mamba_init.init_dt_A_D gives (4, d_inner, R), (4, d_inner), (4·d_inner, N), (4·d_inner,);
    get_outnorm: LayerNorm, or Sequential(Permute, Conv2d dw 3×3 no bias, Permute) for _ondwconv3,
    Sequential(LayerNorm, Permute, Conv2d, Permute) for _oncnorm, nothing for _onnone/_onsoftmax/
    _onsigmoid; out_proj Linear(d_inner, d_model).
    """
    D, R = int(ssm_ratio * d_model), math.ceil(d_model / 16)
    shapes = {
        "in_proj.weight": (2 * D if with_z else D, d_model),
        "x_proj_weight": (4, R + 2 * d_state, D),
        "dt_projs_weight": (4, D, R),
        "dt_projs_bias": (4, D),
        "A_logs": (4 * D, d_state),
        "Ds": (4 * D,),
        "out_proj.weight": (d_model, D),
    }
    shapes.update({"layernorm": {"out_norm.weight": (D,), "out_norm.bias": (D,)},
                   "dwconv3": {"out_norm.1.weight": (D, 1, 3, 3)},
                   "cnorm": {"out_norm.0.weight": (D,), "out_norm.0.bias": (D,), "out_norm.2.weight": (D, 1, 3, 3)},
                   }.get(out_norm, {}))
    if d_conv > 1:
        shapes["conv2d.weight"] = (D, 1, d_conv, d_conv)
        if conv_bias:
            shapes["conv2d.bias"] = (D,)
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


# VMamba's configurations (classification/configs/vssm/*.yaml, the released checkpoints, and the
# ablations in configs/vssmab/*.yaml): forward type, SSM settings, whether in_proj has the z gate,
# the out norm. d_model 24 stands in for EMBED_DIM to keep the test small.
VMAMBA_CONFIGS = [
    ("vssm/vmambav0_tiny_224", "v0", dict(d_state=16, ssm_ratio=2.0), True, "layernorm"),
    ("vssm/vmambav2_tiny_224", "v05_noz", dict(d_state=1, ssm_ratio=2.0, d_conv=3, conv_bias=False), False,
     "layernorm"),
    ("vssm/vmambav2v_tiny_224", "v05_noz", dict(d_state=1, ssm_ratio=1.0, d_conv=3, conv_bias=False), False,
     "layernorm"),
    ("vssmab/vmambav0_tiny_224_a01", "v01", dict(d_state=16), True, "layernorm"),
    ("vssmab/vmambav0_tiny_224_a0seq", "v0seq", dict(d_state=16), True, "layernorm"),
    ("vssmab/vmambav0_tiny_224_a1", "v02", dict(d_state=16), True, "layernorm"),
    ("vssmab/vmambav0_tiny_224_a2", "v04", dict(d_state=16), True, "layernorm"),
    ("vssmab/vmambav0_tiny_224_a3", "v05", dict(d_state=16), True, "layernorm"),
    ("vssmab/vmambav0_tiny_224_a7", "v05", dict(d_state=16, d_conv=-1), True, "layernorm"),
    ("vssmab/vmambav2_tiny_224_a9d", "v05_noz", dict(d_state=16, ssm_ratio=1.0, d_conv=-1), False, "layernorm"),
    ("vssmab/vmambav2_tiny_224_unidi", "v051d_noz", dict(d_state=1, ssm_ratio=1.0, conv_bias=False), False,
     "layernorm"),
    ("vssmab/vmambav2_tiny_224_bidi_ndw", "v052d_noz", dict(d_state=1, ssm_ratio=1.0, d_conv=-1), False,
     "layernorm"),
    ("vssmab/vmambav2_tiny_224_cas2d", "v052dc_noz", dict(d_state=1, ssm_ratio=1.0, conv_bias=False), False,
     "layernorm"),
    ("vssmab/vmambav2_tiny_224_ondw", "v05_ondwconv3_noz", dict(d_state=1, ssm_ratio=1.0, conv_bias=False), False,
     "dwconv3"),
    ("vssmab/vmambav2_tiny_224_onone", "v05_onnone_noz", dict(d_state=1, ssm_ratio=1.0, conv_bias=False), False,
     "none"),
    ("vssmab/vmambav2_tiny_224_onsoftmax", "v05_onsoftmax_noz", dict(d_state=1, ssm_ratio=1.0, conv_bias=False),
     False, "softmax"),
    ("vssmab/vmambav2_tiny_224_init2", "v05_noz", dict(d_state=1, ssm_ratio=1.0, conv_bias=False, initialize="v2"),
     False, "layernorm"),
    ("VMamba SS2D() defaults", "v2", dict(), True, "layernorm"),
    ("VMamba docstring postfixes", "v2_nozact", dict(d_state=2), True, "layernorm"),
    ("VMamba docstring postfixes", "v3_noz_oact", dict(d_state=2), False, "layernorm"),
    ("VMamba docstring postfixes", "v05_oncnorm_no32", dict(d_state=2), True, "cnorm"),
    ("VMamba docstring postfixes", "v05_onsigmoid_noz", dict(d_state=2), False, "sigmoid"),
]


@pytest.mark.parametrize("config,forward_type,kwargs,with_z,out_norm", VMAMBA_CONFIGS,
                         ids=[f"{c[0]}:{c[1]}" for c in VMAMBA_CONFIGS])
def test_vmamba_config_state_dicts_load_and_run(config, forward_type, kwargs, with_z, out_norm):
    settings = {"d_state": 16, "ssm_ratio": 2.0, "d_conv": 3, "conv_bias": True, **kwargs}
    expected = vmamba_state_dict_shapes(24, settings["d_state"], settings["ssm_ratio"], with_z, settings["d_conv"],
                                        out_norm=out_norm, conv_bias=settings["conv_bias"])
    module = SS2D(d_model=24, forward_type=forward_type, backend="torch", **settings)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == expected
    g = torch.Generator().manual_seed(5)
    vmamba_state = {k: 0.1 * torch.randn(shape, generator=g) for k, shape in expected.items()}
    module.load_state_dict(vmamba_state, strict=True)
    x = torch.randn(1, 3, 2, 24, requires_grad=True)
    out = module(x)
    out.sum().backward()
    assert out.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for name, p in module.named_parameters())


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


ORACLE_CASES = [  # forward type -> the oracle's reading of it
    ("v0", dict(with_z=True)),
    ("v05_noz", dict(with_z=False)),
    ("v2_nozact", dict(with_z=True, z_act=False)),
    ("v05_noz_oact", dict(with_z=False, out_act=True)),
    ("v05_onnone_noz", dict(with_z=False, out_norm="none")),
    ("v05_ondwconv3_noz", dict(with_z=False, out_norm="dwconv3")),
    ("v05_oncnorm", dict(with_z=True, out_norm="cnorm")),
    ("v05_onsoftmax_noz", dict(with_z=False, out_norm="softmax")),
    ("v3_onsigmoid", dict(with_z=True, out_norm="sigmoid")),
    ("v051d_noz", dict(with_z=False, scan="unidi")),
    ("v052d_noz", dict(with_z=False, scan="bidi")),
    ("v052dc_noz", dict(with_z=False, scan="cascade")),
]


@pytest.mark.parametrize("forward_type,reading", ORACLE_CASES, ids=[c[0] for c in ORACLE_CASES])
@pytest.mark.parametrize("channel_first", [False, True])
def test_matches_oracle_float64(forward_type, reading, channel_first):
    oracle = VMambaSS2DOracle(d_model=4, d_state=3, ssm_ratio=1.5, channel_first=channel_first, **reading).double()
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
        SS2D(d_model=8, forward_type="v3_bogus")
    with pytest.raises(ValueError, match="dt_init"):
        SS2D(d_model=8, dt_init="uniform")
    module = SS2D(d_model=8, d_state=2, backend="torch")
    with pytest.raises(ValueError, match=r"\(B, H, W, d_model\) with d_model=8"):
        module(torch.randn(1, 8, 3, 3))


# --------------------------------------------------------------------------- reported repros

@pytest.mark.parametrize("kwargs,match", [
    (dict(d_conv=2.5), "d_conv must be an int"),
    (dict(initialize="v3"), r"initialize must be one of \('v0', 'v1', 'v2'\)"),
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


# ------------------------------------------------------------------ VMamba drop-in parity
@pytest.mark.parametrize("forward_type,why", [
    ("xv1a", "SS2Dv3"), ("m0", "SS2Dm0"), ("m0_noz", "SS2Dm0"), ("v052d3", ""), ("v0_noz", "core 'v0'"),
    ("v4", ""), ("", ""), (None, "")])
def test_unsupported_forward_types_list_the_supported_ones(forward_type, why):
    with pytest.raises(ValueError) as info:
        SS2D(d_model=8, forward_type=forward_type)
    message = str(info.value)
    assert f"forward_type {forward_type!r} is not supported" in message and why in message
    for listed in ("'v0', 'v0seq'", "v05", "v2", "v051d", "v052d", "v052dc", "_onsoftmax", "_noz", "_oact", "_no32"):
        assert listed in message


def test_vmamba_default_state_dict_into_fastfuse_default_names_forward_type():
    # VMamba's SS2D(d_model=16) is forward_type "v2" (z gate); fastfuse's default is "v05_noz".
    vmamba_default = vmamba_state_dict_shapes(16, 16, 2.0, with_z=True)
    state = {k: torch.zeros(shape) for k, shape in vmamba_default.items()}
    with pytest.raises(RuntimeError, match=r"forward_type='v2'"):
        SS2D(d_model=16).load_state_dict(state)
    SS2D(d_model=16, forward_type="v2").load_state_dict(state, strict=True)
    released_v2 = {k: torch.zeros(shape) for k, shape in vmamba_state_dict_shapes(16, 1, 2.0, False).items()}
    with pytest.raises(RuntimeError, match=r"without the z gate .*forward_type='v05_noz'"):
        SS2D(d_model=16, d_state=1, forward_type="v2").load_state_dict(released_v2)
    ondw = {k: torch.zeros(shape) for k, shape in
            vmamba_state_dict_shapes(16, 1, 2.0, False, out_norm="dwconv3").items()}
    with pytest.raises(RuntimeError, match="'_ondwconv3'"):
        SS2D(d_model=16, d_state=1).load_state_dict(ondw)
    with pytest.raises(RuntimeError, match=r"'_onnone', '_onsoftmax' or '_onsigmoid'"):
        SS2D(d_model=16, d_state=1).load_state_dict(
            {k: torch.zeros(v) for k, v in vmamba_state_dict_shapes(16, 1, 2.0, False, out_norm="none").items()})


def test_initialize_values_follow_vmamba():
    torch.manual_seed(3)
    D, N, R = 64, 4, 2
    v1 = SS2D(d_model=32, d_state=N, initialize="v1")  # A_logs ~ N(0,1), dt ~ 0.1·N(0,1), Ds = 1
    assert v1.A_logs.shape == (4 * D, N) and 0.8 < v1.A_logs.std() < 1.2 and v1.A_logs.min() < 0
    assert 0.07 < v1.dt_projs_weight.std() < 0.13 and 0.07 < v1.dt_projs_bias.std() < 0.13
    assert v1.dt_projs_bias.min() < 0 and torch.equal(v1.Ds, torch.ones(4 * D))
    v2 = SS2D(d_model=32, d_state=N, initialize="v2")  # A_logs = 0, dt ~ 0.1·U(0,1), Ds = 1
    assert torch.equal(v2.A_logs, torch.zeros(4 * D, N)) and torch.equal(v2.Ds, torch.ones(4 * D))
    for p in (v2.dt_projs_weight, v2.dt_projs_bias):
        assert p.min() >= 0 and p.max() < 0.1 and p.std() > 0.02
    assert v2.dt_projs_weight.shape == (4, D, R)
    for module in (v1, v2):
        assert module.A_logs._no_weight_decay and module.Ds._no_weight_decay
        assert module.A_logs.dtype == torch.float32


def test_vssblock_style_construction():
    # VMamba's VSSBlock passes exactly these keywords (ssm_conv=-1 means no convolution).
    block = SS2D(d_model=16, d_state=1, ssm_ratio=1.0, dt_rank="auto", act_layer=nn.GELU, d_conv=-1,
                 conv_bias=False, dropout=0.0, initialize="v2", forward_type="v05_noz", channel_first=True)
    assert not hasattr(block, "conv2d") and block.initialize == "v2"
    assert block(torch.randn(1, 16, 2, 3)).shape == (1, 16, 2, 3)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("d_conv", [2, 4])
def test_even_d_conv_keeps_the_image_size(d_conv):
    block = SS2D(d_model=8, d_state=2, d_conv=d_conv, backend="torch")
    assert block.conv2d.weight.shape == (16, 1, d_conv, d_conv)  # loads VMamba's conv2d.weight
    x = torch.randn(1, 5, 6, 8)
    assert block(x).shape == x.shape
    # 'same' padding, the extra pixel bottom/right: what torch's padding="same" does
    image = torch.randn(1, 16, 5, 6)
    torch.testing.assert_close(block.conv2d(F.pad(image, block._even_conv_pad)),
                               F.conv2d(image, block.conv2d.weight, block.conv2d.bias, padding="same", groups=16))


@pytest.mark.parametrize("forward_type", ["v051d_noz", "v052d_noz", "v052dc_noz", "v05_onsoftmax_noz"])
def test_half_input_unfused_paths(forward_type):
    torch.manual_seed(4)
    module = SS2D(d_model=8, d_state=2, forward_type=forward_type, backend="torch")
    x = torch.randn(1, 3, 4, 8)
    expected = module.double()(x.double())
    out = module.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=5e-2, atol=5e-2 * scale)


@pytest.mark.parametrize("forward_type", ["v051d_noz", "v052dc_noz"])
@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_unfused_forward_types_kernel_backend_matches_torch(forward_type, device, backend):
    torch.manual_seed(6)
    module = SS2D(d_model=8, d_state=2, ssm_ratio=1.0, forward_type=forward_type, backend="torch").to(device)
    x = torch.randn(1, 3, 4, 8, device=device)
    ref = module(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(module.parameters()))
    module.backend = backend
    out = module(x)
    grads = torch.autograd.grad(out.square().sum(), list(module.parameters()))
    torch.testing.assert_close(out, ref, rtol=6e-4, atol=2e-3)
    for (name, _), g, r in zip(module.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=3e-3, atol=2e-3 * max(r.abs().max().item(), 1.0), msg=name)
