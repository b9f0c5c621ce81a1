"""ARGS-Diff on a tiny synthetic scene: networks, training samples, schedule, guided sampling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastfuse
from fastfuse import backends
from fastfuse.data import nikon_d700_gaussian, synthetic_scene
from fastfuse.models.argsdiff import ARGSDiff, SpatialUNet, SpectralNet, bicubic_kernel, exponential_schedule

BANDS, MSI, RATIO, SIZE = 31, 3, 4, 16

# Tiny networks: a second OpenMP thread only adds synchronisation (and contention when shared).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    Z = synthetic_scene(SIZE, SIZE, BANDS, seed=3)[None]
    R = nikon_d700_gaussian()
    # backend="torch": under TRITON_INTERPRET=1 "auto" would run the Triton interpreter (slow).
    X = fastfuse.spatial_degrade(Z, bicubic_kernel(RATIO), RATIO, padding="reflect", backend="torch")
    Y = fastfuse.spectral_response(Z, R, backend="torch")
    return Z, X, Y, R


def tiny(**kw):
    """A two-level UNet and a narrow MLP: the method's behaviour at a fraction of the cost. backend
    "cpu" (the machine's automatic choice) unless given: under TRITON_INTERPRET=1 "auto" would
    run the guidance in the Triton interpreter (tests/test_subspace_guidance.py covers it)."""
    torch.manual_seed(0)
    kw.setdefault("backend", "cpu")
    return ARGSDiff(BANDS, MSI, RATIO, timesteps=12, base_channels=4, channel_mult=(1, 2), res_blocks=1,
                    spectral_hidden=(16, 32, 16), **kw)


def test_exponential_schedule():
    ab = exponential_schedule(500)
    assert ab.shape == (501,) and ab[0] == pytest.approx(1.0) and ab[-1] == pytest.approx(1e-3)
    assert bool((ab[1:] < ab[:-1]).all())


def test_bicubic_kernel_matches_antialiased_interpolation_inside():
    Z = synthetic_scene(32, 24, 5, seed=0)[None]
    ours = fastfuse.spatial_degrade(Z, bicubic_kernel(4), 4, padding="reflect", backend="torch")
    theirs = F.interpolate(Z, scale_factor=0.25, mode="bicubic", antialias=True)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[..., 2:-2, 2:-2], theirs[..., 2:-2, 2:-2], rtol=0, atol=1e-5)
    assert bicubic_kernel(2).sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="even"):
        bicubic_kernel(3)


def test_networks_shapes_and_gradients():
    spec = SpectralNet(BANDS, 12, hidden=(16, 32, 16))
    x = torch.randn(5, BANDS)
    out = spec(x, torch.tensor([3]))
    assert out.shape == (5, BANDS)
    unet = SpatialUNet(3, base_channels=4, channel_mult=(1, 2, 3, 4), res_blocks=2)
    a = torch.randn(2, 3, 12, 20, requires_grad=True)  # sides not multiples of 8
    y = unet(a, torch.tensor([0, 7]))
    assert y.shape == a.shape
    (y.square().mean() + out.square().mean()).backward()
    for net in (spec, unet):
        for name, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert a.grad is not None and a.grad.abs().sum() > 0
    # Four levels, two residual blocks down each level and in the middle.
    assert len(unet.down) == 4 and all(len(b) == 2 for b in unet.down) and len(unet.middle) == 2


def test_training_samples_come_from_the_pair(pair):
    _, X, Y, _ = pair
    model = tiny()
    spectra = model.spectral_samples(X, 3)
    assert spectra.shape == (3, model.d, BANDS)
    pixels = (2 * X[0].reshape(BANDS, -1).t() - 1)
    assert all(((pixels - s).abs().amax(1) < 1e-6).any() for s in spectra.reshape(-1, BANDS))
    patches = model.spatial_samples(Y, 2, patch=8)
    assert patches.shape == (2, model.d, 8, 8)
    bands = 2 * Y[0] - 1
    for sample in patches:
        for channel in sample:  # each channel is one HR-MSI band over one patch
            windows = bands.unfold(1, 8, 1).unfold(2, 8, 1)  # (c, H-7, W-7, 8, 8)
            assert ((windows - channel).abs().amax((-1, -2)) < 1e-6).any()


def test_fit_runs_and_returns_finite_losses(pair):
    _, X, Y, _ = pair
    history = tiny().fit(X, Y, steps=2, batch=2, patch=8, generator=torch.Generator().manual_seed(0))
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h)).all() for h in history)


def residual(fused, model, X, Y, R):
    """‖H(Z) − X‖² + ‖Z ×₃ R − Y‖² of a fused cube."""
    hx = fastfuse.spatial_degrade(fused, model.kernel, RATIO, padding=model.padding, backend="torch")
    y_res = fastfuse.spectral_response(fused, R, backend="torch") - Y
    return ((hx - X).square().sum() + y_res.square().sum()).item()


@pytest.mark.parametrize("guidance", ("network", "x0"))
def test_sampling_lowers_the_data_fidelity_residual(pair, guidance):
    """A dozen guided steps (a large step size, so that few steps suffice) against the same
    chain without guidance (ρ = 0): the guided result fits the observations far better."""
    _, X, Y, R = pair
    results = {}
    for rho in (0.5, 0.0):
        model = tiny(guidance=guidance, rho1=rho, rho2=rho)
        fused, info = model.sample(X, Y, R, steps=12, generator=torch.Generator().manual_seed(1))
        assert fused.shape == (1, BANDS, SIZE, SIZE) and torch.isfinite(fused).all()
        assert info["loss"].shape == (12,)
        results[rho] = (residual(fused, model, X, Y, R), info["loss"])
    guided, plain = results[0.5], results[0.0]
    assert guided[0] < 0.75 * plain[0]
    assert bool(guided[1][-1] < 0.75 * guided[1][0])


def test_fused_and_torch_backends_sample_alike(pair):
    _, X, Y, R = pair
    outs = []
    for backend in ("cpu", "torch"):
        model = tiny(backend=backend, degradation="blur")
        outs.append(model.sample(X, Y, R, steps=3, generator=torch.Generator().manual_seed(2))[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


class SyncCounter(TorchDispatchMode):
    """Counts aten ops that read a tensor's value on the host; fastfuse custom ops are opened up
    (their kernel runs under this mode too), so a sync inside a kernel is seen as well."""

    SYNCS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
             torch.ops.aten.is_nonzero.default, torch.ops.aten.nonzero.default)

    def __init__(self):
        super().__init__()
        self.syncs, self.fastfuse_calls = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SYNCS:
            self.syncs.append(str(func))
        name = func.name()
        if name.startswith("fastfuse::") and not name.endswith("_backward"):
            self.fastfuse_calls += 1
            op = name.split("::", 1)[1].split(".")[0]
            *call, backend = args
            like = next(a for a in call if isinstance(a, torch.Tensor))
            kernel = backends.kernel(op, backends.resolve(op, backend, like.device, like.numel()), "forward")
            with self:
                return kernel(*call)
        return func(*args, **kwargs)


@pytest.mark.parametrize("guidance", ("network", "x0"))
def test_no_host_sync_inside_a_sampling_step(pair, guidance):
    _, X, Y, R = pair
    model = tiny(guidance=guidance)
    with SyncCounter() as counter:
        model.sample(X, Y, R, steps=2)
    assert counter.fastfuse_calls == 4  # two guidance evaluations per step
    assert counter.syncs == []


def test_bad_inputs_are_named(pair):
    _, X, Y, R = pair
    model = tiny()
    with pytest.raises(ValueError, match="lr_hsi must be"):
        model.sample(X[..., :3, :], Y, R, steps=1)
    with pytest.raises(ValueError, match="srf"):
        model.sample(X, Y, R[:2], steps=1)
    with pytest.raises(ValueError, match="degradation"):
        ARGSDiff(BANDS, MSI, degradation="nearest")
