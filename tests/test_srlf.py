"""SRLF-Net: the re-learning modules (fastfuse.nn.relearn) and the model (fastfuse.models.srlf)."""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastfuse import backends
from fastfuse.models.srlf import SRLFNet, default_kernel, default_srf
from fastfuse.nn.relearn import ReLearnBlock, SelectiveRelearn, SpectralMSA

# Tiny configurations: 8×8 HR pixels (the smallest the ×8 multi-scale path takes), 4 channels, one block.
TINY = {"channels": 4, "n_blocks": 1, "lam": 0.5}


def _pair(batch=2, hsi=31, msi=3, size=8, ratio=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, hsi, size // ratio, size // ratio, generator=g, dtype=dtype),
            torch.rand(batch, msi, size, size, generator=g, dtype=dtype))


def test_spectral_msa_shape_and_padding_slots_do_not_leak():
    torch.manual_seed(0)
    msa = SpectralMSA(8, heads=2)
    x = torch.randn(2, 8, 7)
    valid = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    out = msa(x, valid)
    assert out.shape == (2, 8, 7)
    noisy = x.clone()
    noisy[0, :, 5:] = 100.0  # padding slots hold garbage: the valid slots must not see it
    torch.testing.assert_close(msa(noisy, valid)[0, :, :5], out[0, :, :5])
    with pytest.raises(ValueError, match="C = 8"):
        msa(torch.randn(2, 5, 7))


@pytest.mark.parametrize("ffn", ["pointwise", "sparse3x3"])
def test_relearn_block_shapes_and_gradients(ffn):
    torch.manual_seed(0)
    block = ReLearnBlock(6, heads=2, ffn=ffn)
    x = torch.randn(1, 6, 5, requires_grad=True)
    idx = torch.tensor([[0, 3, 4, 9, 15]])
    valid = torch.tensor([[True, True, True, True, False]])
    out = block(x, valid, idx, (4, 4))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())
    with pytest.raises(ValueError, match="ffn must be one of"):
        ReLearnBlock(6, ffn="dense")


def _relearn_module(dim=4, ratio=4, **kw):
    return SelectiveRelearn(dim, 31, 3, ratio, default_srf(31, 3), default_kernel(), **kw)


def test_selective_relearn_shapes_and_gradients_reach_relearning_and_guidance():
    torch.manual_seed(0)
    module = _relearn_module(lam=0.5, backend="torch")
    lr, msi = _pair()
    lr.requires_grad_(True)
    msi.requires_grad_(True)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = module(z, lr, msi)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name in ("relearn_spa", "relearn_spe"):
        grads = [p.grad for p in getattr(module, name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    for t in (z, lr, msi):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_selective_relearn_refuses_bad_configuration():
    with pytest.raises(ValueError, match="lam"):
        _relearn_module(lam=0.0)
    with pytest.raises(ValueError, match="dim == hsi_bands"):
        _relearn_module(band_projection="identity")
    with pytest.raises(ValueError, match="srf must have shape"):
        SelectiveRelearn(4, 31, 3, 4, torch.rand(3, 30), default_kernel())


@pytest.mark.parametrize("ratio", [4, 8])
def test_model_shapes_and_finite_output(ratio):
    torch.manual_seed(0)
    model = SRLFNet(ratio=ratio, backend="torch", **TINY)
    lr, msi = _pair(size=16, ratio=ratio)
    out = model(lr, msi)
    assert out.shape == (2, 31, 16, 16) and torch.isfinite(out).all()


def test_model_refuses_sizes_it_cannot_downsample():
    model = SRLFNet(ratio=4, backend="torch", **TINY)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(*_pair(size=12, ratio=4))
    with pytest.raises(ValueError, match="lr_hsi must have shape"):
        model(torch.rand(2, 31, 3, 3), torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        SRLFNet(channels=0)


def test_default_parameter_count_near_table_1():
    params = sum(p.numel() for p in SRLFNet(ratio=4).parameters())
    assert abs(params - 1.33e6) / 1.33e6 < 0.10, params


class _SyncCounter(TorchDispatchMode):
    """Counts host syncs: aten._local_scalar_dense (.item(), bool(t), int(t), .tolist()) and copies
    to the host, at the dispatcher; the Python-level conversions are patched as well, because a
    custom op's kernel runs below this mode."""

    HOST_CALLS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        super().__init__()
        self.events = []

    def _record(self, what):
        frames = traceback.extract_stack()
        # The torch backend's CPU-only index check of gather/scatter (skipped on CUDA by design,
        # see fastfuse.ops.select) is the one sync that exists only because the tensors are on CPU.
        if any(f.name == "_check_index_range" for f in frames):
            return
        self.events.append((what, "".join(traceback.format_list(frames[-6:-1]))))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in self.HOST_CALLS}
        for name, original in self._saved.items():
            def patched(t, *a, _name=name, _original=original, **k):
                self._record(f"Tensor.{_name}")
                return _original(t, *a, **k)
            setattr(torch.Tensor, name, patched)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def test_training_step_never_syncs_the_host():
    torch.manual_seed(0)
    model = SRLFNet(ratio=4, backend="torch", **TINY)
    # SGD: torch's CPU Adam reads its step counter with .item() (on CUDA the counter can live on
    # the device, capturable=True); the model's forward and backward are what is checked here.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    lr, msi = _pair()
    target = torch.rand(2, 31, 8, 8)
    counter = _SyncCounter()
    with counter:
        loss = torch.nn.functional.l1_loss(model(lr, msi), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not counter.events, "host syncs in a training step:\n" + "\n".join(
        f"{what} at\n{where}" for what, where in counter.events[:3])
    # The counter is live: an .item() inside it is caught.
    probe = _SyncCounter()
    with probe:
        loss.item()
    assert probe.events


def _kernel_backends():
    names = ["triton"]
    if "cpu" in backends.implementations("cross_selective_scan") and \
            backends.unavailable_reason("cross_selective_scan", "cpu", torch.device("cpu")) is None:
        names.append("cpu")
    return names


@pytest.mark.parametrize("backend", _kernel_backends())
def test_backends_agree_with_torch(backend):
    if backend == "triton" and backends.triton_unavailable_reason() is not None:
        pytest.skip(backends.triton_unavailable_reason())
    torch.manual_seed(0)
    reference = SRLFNet(ratio=4, backend="torch", **TINY)
    other = SRLFNet(ratio=4, backend=backend, **TINY)
    other.load_state_dict(reference.state_dict())
    lr, msi = _pair(batch=1)
    outs, grads = [], []
    for model in (reference, other):
        x, y = lr.clone().requires_grad_(True), msi.clone().requires_grad_(True)
        out = model(x, y)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([x.grad, y.grad] + [p.grad for p in model.blocks[0].srl.relearn_spa.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-4)
    for g_other, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_other, g_ref, rtol=2e-3, atol=1e-5)
