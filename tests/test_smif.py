import pytest
import torch

from fastfuse.models import build_model
from fastfuse.models.smif import IS2F2, MSFE, SMMA, SMATBlock, SMIFNet, msfe_kernel_and_dilation, spatial_heads
from testing_utils import backend_params

# backend="cpu": under the test suite's TRITON_INTERPRET=1, "auto" would pick the (slow) Triton
# interpreter; the triton backend is compared in test_backends_agree_on_a_tiny_configuration.
TINY = dict(channels=8, blocks=2, stages=2, heads=2, backend="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(ratio=4, lr_size=4, batch=1, hsi=5, msi=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(batch, hsi, lr_size, lr_size, generator=g)
    hr = torch.rand(batch, msi, lr_size * ratio, lr_size * ratio, generator=g)
    return lr, hr


def _all_have_grads(module: torch.nn.Module):
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"


def test_spatial_heads_divide_the_pixels():
    assert spatial_heads(64, 4) == 4
    assert spatial_heads(15, 4) == 3
    assert spatial_heads(7, 4) == 1
    assert spatial_heads(1, 4) == 1


def test_msfe_kernels_and_dilations_per_stage():
    assert [msfe_kernel_and_dilation(s) for s in range(1, 6)] == [(1, 1), (3, 1), (5, 2), (7, 3), (7, 4)]


def test_smma_and_smat_block_shapes_and_gradients():
    h = torch.randn(2, 8, 3, 5, requires_grad=True)
    m = torch.randn(2, 8, 3, 5, requires_grad=True)
    smma = SMMA(8, heads=4, backend="cpu")
    out = smma(h, m)
    assert out.shape == h.shape
    out.square().mean().backward()
    _all_have_grads(smma)
    assert h.grad is not None and m.grad is not None
    block = SMATBlock(8, heads=2, backend="cpu")
    h2, m2 = block(h.detach(), m.detach())
    assert h2.shape == h.shape and m2.shape == m.shape
    (h2.square().mean() + m2.square().mean()).backward()
    _all_have_grads(block)


def test_spatial_heads_attend_within_their_own_pixels():
    # Changing the pixels of the second group must leave the first group's output unchanged.
    torch.manual_seed(0)
    smma = SMMA(4, heads=2, backend="torch")
    h, m = torch.randn(1, 4, 2, 4), torch.randn(1, 4, 2, 4)
    h2 = h.clone()
    h2[:, :, 1] += 1.0  # the second row = the second half of the raster-ordered pixels
    out1, out2 = smma(h, m), smma(h2, m)
    torch.testing.assert_close(out1[:, :, 0], out2[:, :, 0])
    assert not torch.allclose(out1[:, :, 1], out2[:, :, 1])


@pytest.mark.parametrize("stage", [1, 4])
def test_msfe_and_is2f2_shapes_and_gradients(stage):
    y = torch.randn(1, 6, 9, 7, requires_grad=True)
    msfe = MSFE(6, stage)
    out = msfe(y)
    assert out.shape == y.shape
    out.mean().backward()
    _all_have_grads(msfe)
    x = torch.randn(1, 6, 9, 7, requires_grad=True)
    fusion = IS2F2(6)
    fused = fusion(x, y.detach())
    assert fused.shape == x.shape
    fused.square().mean().backward()
    _all_have_grads(fusion)


@pytest.mark.parametrize("ratio,patch", [(4, 32), (8, 32), (8, 64)])
def test_model_shapes_and_gradients(ratio, patch):
    model = build_model("smif", hsi_bands=5, msi_bands=3, ratio=ratio, **TINY)
    lr, hr = _pair(ratio, patch // ratio)
    out = model(lr, hr)
    assert out.shape == (1, 5, patch, patch)
    model.loss(out, torch.zeros_like(out)).backward()
    _all_have_grads(model)


def test_default_configuration_matches_table_4():
    model = SMIFNet()
    assert len(model.smat) == 5 and len(model.msfe) == 4 and len(model.is2f2) == 4


def test_bad_inputs_are_refused():
    model = SMIFNet(hsi_bands=5, msi_bands=3, ratio=4, **TINY)
    lr, hr = _pair(4, 4)
    with pytest.raises(ValueError, match="hr_msi must have shape"):
        model(lr, hr[..., :-1])
    with pytest.raises(ValueError, match="lr_hsi must be"):
        model(lr[:, :4], hr)
    with pytest.raises(ValueError, match="stages"):
        SMIFNet(stages=0)


def test_backends_agree_on_a_tiny_configuration():
    torch.manual_seed(0)
    reference = SMIFNet(hsi_bands=5, msi_bands=3, ratio=4, **TINY)
    lr, hr = _pair(4, 4, batch=2)
    results = {}
    for backend in ("torch", "cpu", "triton"):
        model = SMIFNet(hsi_bands=5, msi_bands=3, ratio=4, **{**TINY, "backend": backend})
        model.load_state_dict(reference.state_dict())
        out = model(lr, hr)
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
        results[backend] = (out, grads)
    for backend in ("cpu", "triton"):
        torch.testing.assert_close(results[backend][0], results["torch"][0], rtol=1e-4, atol=1e-5)
        for got, want in zip(results[backend][1], results["torch"][1]):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    model = SMIFNet(hsi_bands=5, msi_bands=3, ratio=4, **TINY)
    lr, hr = _pair(4, 4, batch=2, seed=1)
    target = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic") + 0.1 * hr.mean(1, keepdim=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        optimiser.zero_grad()
        loss = model.loss(model(lr, hr), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
