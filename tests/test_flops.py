"""FLOP counting: hand-computed counts in every convention, and our custom ops' formulas."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastfuse
from fastfuse import flops


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x)


class ConvAttention(torch.nn.Module):
    """A 3x3 conv, then self-attention over its pixels: q·kᵀ and attn·v are activation matmuls."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        f = self.conv(x).flatten(2).transpose(1, 2)  # (B, 64, 5)
        attn = torch.softmax(f @ f.transpose(1, 2), -1)  # (B, 64, 64)
        return attn @ f


def test_linear_counts():
    x = torch.rand(4, 16)
    macs = 4 * 16 * 8
    assert flops.count_flops(Linear(), [x], "torch").total == 2 * macs
    assert flops.count_flops(Linear(), [x], "paper").total == macs
    assert flops.count_flops(Linear(), [x], "vmamba").total == macs
    assert flops.count_flops(Linear(), [x], "torch").params == 16 * 8 + 8


def test_conv_and_attention_matrix_conventions():
    x = torch.rand(2, 3, 8, 8)
    conv_macs = 2 * 5 * 8 * 8 * 3 * 3 * 3
    attention_macs = 2 * (64 * 5 * 64) * 2  # q·kᵀ and attn·v, batch 2
    torch_count = flops.count_flops(ConvAttention(), [x], "torch")
    assert torch_count.total == 2 * (conv_macs + attention_macs)
    # SRLF-Net counts weight layers, not the attention matrix; fvcore (VMamba) counts every matmul.
    assert flops.count_flops(ConvAttention(), [x], "paper").total == conv_macs
    assert flops.count_flops(ConvAttention(), [x], "vmamba").total == conv_macs + attention_macs
    assert torch_count.params == 5 * 3 * 9 + 5
    assert "ConvAttention.conv" in torch_count.by_module


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="convention"):
        flops.count_flops(Linear(), [torch.rand(1, 16)], "fvcore")


def test_vmamba_selective_scan_formula_by_hand():
    # VMamba's flops_selective_scan_fn(B=1, L=256, D=768, N=16, with_D=True, with_Z=False).
    assert flops.selective_scan_count(1, 768, 256, 16, with_d=True, with_z=False).scan == \
        9 * 256 * 768 * 16 + 768 * 256 == 28_508_160
    assert flops.selective_scan_count(2, 4, 16, 8, with_d=True, with_z=True).total("paper") == \
        9 * 2 * 16 * 4 * 8 + 2 * 2 * 4 * 16


def _scan_inputs(batch=2, dim=4, state=8, length=16):
    g = torch.Generator().manual_seed(0)
    return dict(u=torch.randn(batch, dim, length, generator=g), delta=torch.rand(batch, dim, length, generator=g),
                A=-torch.exp(torch.rand(dim, state, generator=g)), B=torch.randn(batch, state, length, generator=g),
                C=torch.randn(batch, state, length, generator=g), D=torch.randn(dim, generator=g),
                z=torch.randn(batch, dim, length, generator=g), delta_bias=torch.rand(dim, generator=g))


def test_selective_scan_call_is_counted_by_its_formula():
    pytest.importorskip("fastfuse.ops.selective_scan")
    t = _scan_inputs()
    expected = 9 * 2 * 16 * 4 * 8 + 2 * 4 * 16 + 2 * 4 * 16  # 9·B·L·D·N + D skip + z gate

    def call(u):
        return fastfuse.selective_scan(u, t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                       delta_bias=t["delta_bias"], delta_softplus=True, backend="torch")

    for convention in flops.CONVENTIONS:  # the scan counts the same in every convention
        assert flops.count_flops(call, [t["u"]], convention).total == expected
    without_dz = flops.count_flops(
        lambda u: fastfuse.selective_scan(u, t["delta"], t["A"], t["B"], t["C"], backend="torch"), [t["u"]], "torch")
    assert without_dz.total == 9 * 2 * 16 * 4 * 8


def test_plain_flop_counter_mode_sees_our_ops_after_import():
    # fastfuse.flops registers formulas with torch.utils.flop_counter: a user's own mode counts them.
    x, y = torch.rand(2, 31, 4, 5), torch.rand(2, 31, 4, 5)
    with FlopCounterMode(display=False) as mode:
        fastfuse.sam_map(x, y, backend="torch")
    pixels = 2 * 4 * 5
    assert mode.get_total_flops() == 2 * 3 * 31 * pixels + 6 * pixels
    assert flops.count_flops(lambda a, b: fastfuse.sam_map(a, b), [x, y], "paper").total == pixels * (2 * 31 + 6)


def test_ssim_map_formulas_follow_srlf_eq10():
    pytest.importorskip("fastfuse.ops.ssim")
    x, y = torch.rand(1, 3, 20, 18), torch.rand(1, 3, 20, 18)
    out = 3 * 10 * 8  # valid map: (20-11+1) x (18-11+1)
    paper = flops.count_flops(lambda a, b: fastfuse.ssim_map(a, b, backend="torch"), [x, y], "paper").total
    assert paper == out * (5 * 11 * 11 + 10)
    torch_count = flops.count_flops(lambda a, b: fastfuse.ssim_map(a, b, padding="zero", backend="torch"), [x, y]).total
    assert torch_count == 3 * 20 * 18 * (2 * 5 * 121 + 20)


def test_backward_ops_count_twice_the_forward():
    x, y = torch.rand(1, 4, 3, 3), torch.rand(1, 4, 3, 3)
    forward = flops._op_counter("sam_map", torch.ops.fastfuse.sam_map)
    backward = flops._op_counter("sam_map_backward", torch.ops.fastfuse.sam_map_backward)
    fwd = forward(x, y, True, 1e-8, "auto", out_val=torch.empty(1, 3, 3))
    bwd = backward([torch.empty(1, 3, 3)], [], [True, True], x, y, True, 1e-8, "auto", out_val=[x, y])
    assert bwd == fwd.scaled(2) and fwd.total("torch") > 0


def test_every_registered_fastfuse_op_has_a_formula():
    fastfuse_ops = flops.fastfuse_op_names()
    assert "sam_map" in fastfuse_ops
    missing = [name for name in fastfuse_ops if flops.formula_for(name)[0] is None]
    assert not missing, f"custom ops without a FLOP formula in fastfuse/flops.py: {missing}"


def test_ss2d_core_matches_vmamba_fvcore_count():
    """VMamba's fvcore count of the unfused SS2D core = our cross_selective_scan formula."""
    pytest.importorskip("fastfuse.ops.cross_scan")
    pytest.importorskip("fastfuse.ops.selective_scan")
    from fastfuse.benchmark.providers import vmamba_pipeline
    batch, dim, h, w, state, rank = 1, 6, 3, 4, 2, 2
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(batch, dim, h, w, generator=g), torch.randn(4, rank + 2 * state, dim, generator=g), None,
            torch.randn(4, dim, rank, generator=g), torch.rand(4, dim, generator=g),
            torch.rand(4 * dim, state, generator=g), torch.ones(4 * dim)]
    length, k = h * w, 4
    vmamba = (batch * length * k * (rank + 2 * state) * dim + batch * length * k * dim * rank  # x_proj, dt_proj MACs
              + 9 * batch * length * k * dim * state + batch * k * dim * length)  # scan handle, with D
    unfused = vmamba_pipeline(lambda *a, **kw: fastfuse.selective_scan(*a, **kw, backend="torch"),
                              lambda x: fastfuse.cross_scan(x, backend="torch"),
                              lambda ys: fastfuse.cross_merge(ys, backend="torch"))
    assert flops.count_flops(unfused, args, "vmamba").total == vmamba
    fused = flops.count_flops(lambda *a: fastfuse.cross_selective_scan(*a, backend="torch"), args, "vmamba")
    assert fused.total == vmamba and not fused.uncounted


def test_parse_shapes_and_load_model_errors():
    assert flops.parse_shapes("1x31x64x64, 1x3x256x256") == [(1, 31, 64, 64), (1, 3, 256, 256)]
    with pytest.raises(ValueError, match="cannot read shape"):
        flops.parse_shapes("1x31xfoo")
    with pytest.raises(ValueError, match="package.module:factory_or_class"):
        flops.load_model("torch.nn.Linear")
    model = flops.load_model("torch.nn:Linear", {"in_features": 3, "out_features": 2})
    assert isinstance(model, torch.nn.Linear) and math.prod(model.weight.shape) == 6
