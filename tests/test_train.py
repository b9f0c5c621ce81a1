"""fastfuse.train: data readers and patches, exact resume, DDP on CPU, a learning run, eval output.

Models here are tiny stand-ins with the fusion interface (model(lr_hsi, hr_msi) -> HR-HSI), named
"test_train:Class" so the tools build them like any registered model.
"""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfuse.train import checkpoint as ckpt
from fastfuse.train.data import Degradation, PatchDataset, StepBatchSampler, load_scenes, split_scenes
from fastfuse.train.evaluate import predict
from fastfuse.train.trainer import TrainConfig, train


class TinyFusionNet(nn.Module):
    """Bilinear upsampling of the LR-HSI plus a residual from two 3×3 convs over [up, MSI]."""
    size_multiple = 1

    def __init__(self, hsi_bands, msi_bands, ratio, backend="auto", channels=8):
        super().__init__()
        self.ratio = ratio
        self.body = nn.Sequential(nn.Conv2d(hsi_bands + msi_bands, channels, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(channels, hsi_bands, 3, padding=1))

    def forward(self, lr_hsi, hr_msi):
        up = F.interpolate(lr_hsi, scale_factor=self.ratio, mode="bilinear", align_corners=False)
        return up + self.body(torch.cat([up, hr_msi], 1))


class PointwiseNet(nn.Module):
    """Nearest upsampling + 1×1 conv: every output pixel depends on its own inputs only."""
    size_multiple = 1

    def __init__(self, hsi_bands, msi_bands, ratio, backend="auto"):
        super().__init__()
        self.ratio = ratio
        self.mix = nn.Conv2d(hsi_bands + msi_bands, hsi_bands, 1)

    def forward(self, lr_hsi, hr_msi):
        up = F.interpolate(lr_hsi, scale_factor=self.ratio, mode="nearest")
        return self.mix(torch.cat([up, hr_msi], 1))


TINY = "test_train:TinyFusionNet"


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    base = dict(model=TINY, ratio=4, patch=16, batch=2, steps=4, synthetic_count=2, synthetic_size=32,
                backend="torch", device="cpu", out=str(tmp_path / "run"), log_every=2, progress=False)
    base.update(overrides)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- data

def _cube(h=24, w=20, c=31, seed=0):
    return np.random.default_rng(seed).random((h, w, c))


def test_mat_cave_uint8_and_harvard_float(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    cave = (_cube() * 255).round().astype(np.uint8)
    scipy_io.savemat(tmp_path / "a_cave.mat", {"orig": cave})
    harvard = _cube(seed=1) * 40.0  # radiance-like, peak above 1: scaled by its own peak
    scipy_io.savemat(tmp_path / "b_harvard.mat", {"ref": harvard, "lbl": np.ones((24, 20))})
    scenes = load_scenes(tmp_path)
    assert [s.name for s in scenes] == ["a_cave", "b_harvard"]
    torch.testing.assert_close(scenes[0].cube, torch.from_numpy(cave.transpose(2, 0, 1) / 255.0).float())
    torch.testing.assert_close(scenes[1].cube, torch.from_numpy(harvard.transpose(2, 0, 1) / harvard.max()).float())
    train_part, held = split_scenes(scenes, 4)
    assert [s.name for s in train_part] == ["a_cave"] and [s.name for s in held] == ["b_harvard"]


def test_png_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    cube = (_cube(12, 16, 31) * 65535).round().astype(np.uint16)
    folder = tmp_path / "balloons_ms" / "balloons_ms"
    folder.mkdir(parents=True)
    for b in range(31):
        Image.fromarray(cube[:, :, b]).save(folder / f"balloons_ms_{b + 1:02d}.png")
    (scene,) = load_scenes(tmp_path / "balloons_ms")
    assert scene.name == "balloons_ms"
    torch.testing.assert_close(scene.cube, torch.from_numpy(cube.transpose(2, 0, 1) / 65535.0).float())


def test_envi_and_single_scene_region_split(tmp_path):
    cube = (_cube(16, 32, 31, seed=3) * 5000).astype(np.uint16)  # reflectance × 5000
    cube.transpose(2, 0, 1).astype("<u2").tofile(tmp_path / "scene.img")
    (tmp_path / "scene.hdr").write_text("ENVI\nsamples = 32\nlines = 16\nbands = 31\nheader offset = 0\n"
                                        "data type = 12\ninterleave = bsq\nbyte order = 0\n")
    scenes = load_scenes(tmp_path)
    assert len(scenes) == 1 and scenes[0].name == "scene"
    torch.testing.assert_close(scenes[0].cube, torch.from_numpy(cube.transpose(2, 0, 1) / cube.max()).float())
    train_part, held = split_scenes(scenes, 4)
    assert (train_part[0].col_start, train_part[0].col_stop) == (0, 24)
    assert (held[0].col_start, held[0].col_stop) == (24, 32)
    # Training crops never reach the held-out columns.
    degradation = Degradation.srlf(torch.full((3, 31), 1 / 31, dtype=torch.float64), 4)
    data = PatchDataset(train_part, degradation, 8, seed=0, augment=False)
    region = scenes[0].cube[:, :, :24]
    for i in range(20):
        crop = data.crop(i)
        hits = [(t, l) for t in range(0, 9, 4) for l in range(0, 17, 4)
                if torch.equal(region[:, t:t + 8, l:l + 8], crop)]
        assert hits, f"crop {i} is not an aligned window of the training region"


def test_patch_dataset_is_deterministic_and_simulates(tmp_path):
    scenes = load_scenes(None, synthetic_count=2, synthetic_size=32)
    assert [s.name for s in scenes] == ["synthetic-0", "synthetic-1", "synthetic-1000"]
    train_part, held = split_scenes(scenes, 4)
    srf = torch.softmax(torch.randn(3, 31, dtype=torch.float64), 1)
    data = PatchDataset(train_part, Degradation.srlf(srf, 4), 16, seed=7)
    lr, msi, gt = data[5]
    assert lr.shape == (31, 4, 4) and msi.shape == (3, 16, 16) and gt.shape == (31, 16, 16)
    torch.testing.assert_close(msi, torch.einsum("mc,chw->mhw", srf.float(), gt))
    again = PatchDataset(train_part, Degradation.srlf(srf, 4), 16, seed=7)[5]
    assert all(torch.equal(a, b) for a, b in zip((lr, msi, gt), again))
    assert not torch.equal(gt, data[6][2])
    batched = data.__getitems__([4, 5])[1]  # the DataLoader's batched fetch gives the same item
    for a, b in zip(batched, (lr, msi, gt)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    batches = list(StepBatchSampler(2, 3, 5, rank=1, world=2))
    assert batches == [[14, 15], [18, 19]]  # step s, rank r: (s·world + r)·batch + b


def test_bad_patch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--patch"):
        train(tiny_config(tmp_path, patch=18))


# --------------------------------------------------------------------------- training

def test_resume_gives_the_same_next_losses(tmp_path):
    full = train(tiny_config(tmp_path, steps=4, save_every=2, out=str(tmp_path / "full")))
    assert (tmp_path / "full" / "step_0000002.pt").is_file() and (tmp_path / "full" / "step_0000004.pt").is_file()
    resumed = train(tiny_config(tmp_path, out=str(tmp_path / "resumed")),
                    resume=str(tmp_path / "full" / "step_0000002.pt"))
    assert [h["step"] for h in resumed.history] == [0, 1, 2, 3]
    assert [h["loss"] for h in resumed.history[2:]] == [h["loss"] for h in full.history[2:]]
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_training_reduces_the_loss(tmp_path):
    result = train(tiny_config(tmp_path, steps=40, batch=4, lr=3e-3))
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    payload = ckpt.load(result.checkpoint)
    assert payload["model"] == TINY and payload["model_kwargs"]["hsi_bands"] == 31
    assert payload["step"] == 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- evaluation

def test_tiled_inference_matches_whole_scene():
    torch.manual_seed(0)
    model = PointwiseNet(31, 3, 4).eval()
    lr, msi = torch.rand(1, 31, 10, 14), torch.rand(1, 3, 40, 56)
    whole = predict(model, lr, msi, 4)
    tiled = predict(model, lr, msi, 4, tile=16, overlap=4)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="--tile"):
        predict(model, lr, msi, 4, tile=18)


def test_eval_json_and_figures(tmp_path, capsys):
    from fastfuse.cli import main
    result = train(tiny_config(tmp_path, steps=2))
    capsys.readouterr()  # the training log
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(result.checkpoint), "--json", "--out", str(out), "--tile", "16",
                 "--backend", "torch"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for method in ("model", "bicubic"):
        assert {"psnr", "ssim", "sam", "ergas"} <= set(printed[method])
        assert all(np.isfinite(printed[method][k]) for k in ("psnr", "ssim", "sam", "ergas"))
    assert [s["scene"] for s in printed["scenes"]] == ["synthetic-1000"]
    assert json.loads((out / "metrics.json").read_text())["model"] == printed["model"]
    Image = pytest.importorskip("PIL.Image")
    with Image.open(out / "figures" / "synthetic-1000_model_sam.png") as img:
        assert img.size == (32, 32) and img.mode == "RGB"


def test_torchrun_ddp_two_processes_end_with_identical_weights(tmp_path):
    """`torchrun -m fastfuse train` (the documented multi-process command), 2 processes on CPU with gloo.

    Each rank reports the SHA-256 of its final weights into the checkpoint; DDP must have kept them equal.
    """
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "fastfuse", "train", TINY, "--steps", "3", "--patch", "16", "--batch", "1", "--ratio", "4",
           "--backend", "torch", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "batch 1 × 2 process(es)" in done.stdout
    assert done.stdout.count("trained 3 steps") == 1  # rank 0 alone logs
    payload = ckpt.load(tmp_path / "run")
    assert payload["world"] == 2 and payload["step"] == 3 and len(payload["rng"]) == 2
    digests = payload["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    model = TinyFusionNet(31, 3, 4)
    model.load_state_dict(payload["model_state"])
    assert ckpt.weights_digest(model) == digests[0]
    assert "warning" not in done.stderr


def test_shared_cave_scenes_and_measured_srf(shared_data):
    from fastfuse.train.data import resolve_srf
    cave = shared_data / "cave"
    scenes = load_scenes(cave)
    assert [s.name for s in scenes] == ["feathers", "paints", "sponges"]
    for scene in scenes:
        assert scene.cube.shape == (31, 512, 512) and scene.cube.dtype == torch.float32
        assert 0.0 <= float(scene.cube.min()) and float(scene.cube.max()) <= 1.0
    # The uint8 'orig' cubes are divided by 255, not by their own peak.
    raw = __import__("scipy.io").io.loadmat(cave / "feathers.mat")["orig"]
    torch.testing.assert_close(scenes[0].cube[:, 5, 7], torch.from_numpy(raw[5, 7].astype(np.float32) / 255.0))
    name, srf = resolve_srf("auto", str(cave), 31)
    assert name.startswith("nikon_d700 (P_N_V2") and srf.shape == (3, 31)
