"""DAEM: the fusion VAE of Table 1, the constrained degradation, and blind kernel recovery.

The ops run on backend="torch": under the test suite's TRITON_INTERPRET=1 the automatic choice
would be the Triton interpreter, far too slow for a training loop (the kernels have their own tests).
"""
from __future__ import annotations

import pytest
import torch

import fastfuse
from fastfuse.data import gaussian_kernel, nikon_d700_gaussian, synthetic_scene
from fastfuse.models.daem import DAEM, FusionVAE

# Tiny networks: a second OpenMP thread only adds synchronisation (and contention when shared).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_fusion_module_follows_table_1():
    vae = FusionVAE(31, 3)
    shapes = [tuple(conv.weight.shape[:2]) for conv in vae.encoder]
    assert shapes == [(4, 34), (8, 7), (16, 11), (24, 19), (16, 27)]
    assert tuple(vae.decoder_mu[0].weight.shape[:2]) == (24, 16) and tuple(vae.decoder_mu[2].weight.shape[:2]) == (31, 24)
    up, msi = torch.rand(2, 31, 9, 7), torch.rand(2, 3, 9, 7)
    mu, sigma = vae(up, msi)
    assert mu.shape == sigma.shape == (2, 31, 9, 7) and bool((sigma >= 0).all()) and bool((mu >= 0).all())
    (mu.mean() + sigma.mean()).backward()
    assert all(p.grad is not None for p in vae.parameters())


def test_degradation_is_constrained_and_differentiable():
    R = nikon_d700_gaussian()
    model = DAEM(31, 3, 4, srf=R, backend="torch")
    k, srf = model.kernel, model.srf
    assert bool((k >= 0).all()) and k.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert bool((srf >= 0).all()) and torch.allclose(srf.sum(1), torch.ones(3))
    torch.testing.assert_close(srf, R / R.sum(1, keepdim=True), rtol=1e-4, atol=1e-6)
    Z = synthetic_scene(16, 16, 31, seed=0)[None]
    X, Y = fastfuse.spatial_degrade(Z, gaussian_kernel(8, 2.0), 4, backend="torch"), fastfuse.spectral_response(Z, R, backend="torch")
    up = torch.nn.functional.interpolate(X, size=(16, 16), mode="bicubic")
    degradation, fusion = model.losses(X, Y, up)
    degradation.backward()
    assert model.kernel_logits.grad.abs().sum() > 0 and model.srf_logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.fusion.parameters())  # the fusion side is detached
    fusion.backward()
    assert all(p.grad is not None for p in model.fusion.parameters())


def test_kernel_estimate_approaches_a_planted_kernel():
    bands = 8
    Z = synthetic_scene(32, 32, bands, seed=2)[None]
    g = torch.Generator().manual_seed(0)
    R = torch.rand(3, bands, generator=g)
    R = R / R.sum(1, keepdim=True)
    planted = gaussian_kernel(8, 1.5)
    X, Y = fastfuse.spatial_degrade(Z, planted, 4, backend="torch"), fastfuse.spectral_response(Z, R, backend="torch")
    torch.manual_seed(0)
    model = DAEM(bands, 3, 4, kernel_size=8, srf=R, backend="torch")
    error = lambda k: ((k - planted).norm() / planted.norm()).item()  # noqa: E731
    before = error(model.kernel.detach())
    fused, info = model.fit(X, Y, steps=60, lr=5e-3, degradation_lr=5e-2, generator=torch.Generator().manual_seed(1))
    assert fused.shape == Z.shape and info["history"].shape == (60, 2)
    assert error(info["kernel"]) < 0.5 * before
    assert info["srf"].shape == (3, bands)


def test_bad_inputs_are_named():
    model = DAEM(8, 3, 2)
    with pytest.raises(ValueError, match="LR-HSI bands"):
        model.fit(torch.rand(1, 5, 4, 4), torch.rand(1, 3, 8, 8), steps=1)
    with pytest.raises(ValueError, match="lr_hsi must be"):
        model.fit(torch.rand(1, 8, 3, 4), torch.rand(1, 3, 8, 8), steps=1)
    with pytest.raises(ValueError, match="srf must have shape"):
        DAEM(8, 3, 2, srf=torch.rand(3, 7))


def test_demo_writes_the_kernel_recovery_report(tmp_path, capsys):
    import json

    from fastfuse import cli
    out = tmp_path / "fused.npy"
    assert cli.main(["fuse", "daem", "--demo", "--size", "16", "--steps", "3", "--backend", "torch", "--no-progress",
                     "--out", str(out)]) == 0
    report = json.loads((tmp_path / "fused_kernel_report.json").read_text())
    assert set(report) == {"kernel_error_initial", "kernel_error_estimate", "psnr_fused", "psnr_bicubic",
                           "psnr_gain_over_bicubic"}
    assert report["kernel_error_initial"] > 0 and report["psnr_bicubic"] > 0
    assert report["psnr_gain_over_bicubic"] == pytest.approx(report["psnr_fused"] - report["psnr_bicubic"])
    printed = capsys.readouterr().out
    assert "kernel recovery" in printed and "vs bicubic" in printed and out.exists()
