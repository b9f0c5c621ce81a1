"""fastfuse.data: readers on files written here, Wald simulation, synthetic scene, SRFs."""
import importlib.util

import numpy as np
import pytest
import torch

from fastfuse import data

HAS_DEGRADE_OP = importlib.util.find_spec("fastfuse.ops.degrade") is not None
needs_degrade_op = pytest.mark.skipif(not HAS_DEGRADE_OP,
                                      reason="fastfuse.ops.degrade (spatial_degrade) is not in this checkout yet")


# --------------------------------------------------------------------------- ENVI

def write_envi(folder, name, cube_chw, *, dtype, code, interleave, big_endian=False, offset=0,
               data_suffix=".img", extra=""):
    bands, lines, samples = cube_chw.shape
    order = {"bsq": (0, 1, 2), "bil": (1, 0, 2), "bip": (1, 2, 0)}[interleave]
    file_dtype = np.dtype(dtype).newbyteorder(">" if big_endian else "<")
    stored = np.ascontiguousarray(cube_chw.transpose(order)).astype(file_dtype)
    header = (f"ENVI\ndescription = {{test cube,\n  written by the test}}\nsamples = {samples}\nlines   = {lines}\n"
              f"bands   = {bands}\nheader offset = {offset}\nfile type = ENVI Standard\ndata type = {code}\n"
              f"interleave = {interleave}\nbyte order = {int(big_endian)}\n{extra}")
    (folder / f"{name}.hdr").write_text(header)
    with open(folder / f"{name}{data_suffix}", "wb") as f:
        f.write(b"\0" * offset)
        f.write(stored.tobytes())
    return folder / f"{name}.hdr", folder / f"{name}{data_suffix}"


@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
@pytest.mark.parametrize("dtype,code,big_endian,offset", [(np.uint16, 12, False, 0), (np.float32, 4, True, 0),
                                                          (np.int16, 2, False, 7), (np.float64, 5, False, 0),
                                                          (np.uint8, 1, False, 0)])
def test_read_envi_layouts_and_types(tmp_path, interleave, dtype, code, big_endian, offset):
    rng = np.random.default_rng(0)
    cube = (rng.random((5, 4, 3)) * 200).astype(dtype)  # bands, lines, samples all different
    hdr, raw = write_envi(tmp_path, "cube", cube, dtype=dtype, code=code, interleave=interleave,
                          big_endian=big_endian, offset=offset)
    for path in (hdr, raw):
        got = data.read_envi(path, dtype=torch.float64)
        assert got.shape == (5, 4, 3) and got.dtype == torch.float64
        np.testing.assert_array_equal(got.numpy(), cube.astype(np.float64))
    assert data.read_envi(hdr).dtype == torch.float32


def test_read_envi_header_fields(tmp_path):
    cube = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    hdr, _ = write_envi(tmp_path, "scene", cube, dtype=np.float32, code=4, interleave="bsq", data_suffix="",
                        extra="wavelength = {\n 450.0, 550.0\n}\nwavelength units = Nanometers\n")
    header = data.read_envi_header(hdr)
    assert header["samples"] == "4" and header["interleave"] == "bsq"
    assert header["wavelength"] == ["450.0", "550.0"] and header["wavelength units"] == "Nanometers"
    np.testing.assert_array_equal(data.read_envi(hdr).numpy(), cube)  # data file without a suffix


def test_read_envi_errors(tmp_path):
    cube = np.zeros((2, 3, 4), dtype=np.float32)
    hdr, raw = write_envi(tmp_path, "short", cube, dtype=np.float32, code=4, interleave="bsq")
    raw.write_bytes(raw.read_bytes()[:-4])
    with pytest.raises(ValueError, match="has 92 bytes but its header describes 96"):
        data.read_envi(hdr)
    hdr, _ = write_envi(tmp_path, "cplx", cube, dtype=np.float32, code=6, interleave="bsq")
    with pytest.raises(ValueError, match="unsupported ENVI data type 6"):
        data.read_envi(hdr)
    hdr, _ = write_envi(tmp_path, "odd", cube, dtype=np.float32, code=4, interleave="bsq", extra="")
    hdr.write_text(hdr.read_text().replace("bands   = 2\n", ""))
    with pytest.raises(ValueError, match="lacks the required field 'bands'"):
        data.read_envi(hdr)
    (tmp_path / "nohdr.img").write_bytes(b"\0" * 8)
    with pytest.raises(FileNotFoundError, match="no ENVI header"):
        data.read_envi(tmp_path / "nohdr.img")
    (tmp_path / "bad.hdr").write_text("not envi\n")
    (tmp_path / "bad.img").write_bytes(b"")
    with pytest.raises(ValueError, match="not an ENVI header"):
        data.read_envi(tmp_path / "bad.hdr")


# --------------------------------------------------------------------------- MATLAB

def test_read_mat_cube(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(1)
    hwc = (rng.random((6, 5, 4)) * 255).astype(np.uint8)
    scipy_io.savemat(tmp_path / "scene.mat", {"cube": hwc, "srf": rng.random((3, 4))})
    got = data.read_mat_cube(tmp_path / "scene.mat", scale=255.0, dtype=torch.float64)
    assert got.shape == (4, 6, 5)
    np.testing.assert_allclose(got.numpy(), hwc.transpose(2, 0, 1) / 255.0)
    chw = data.read_mat_cube(tmp_path / "scene.mat", key="cube", layout="CHW")
    assert chw.shape == (6, 5, 4) and chw.dtype == torch.float32
    assert sorted(data.read_mat(tmp_path / "scene.mat")) == ["cube", "srf"]
    scipy_io.savemat(tmp_path / "two.mat", {"a": hwc, "b": hwc})
    with pytest.raises(ValueError, match="has 2 3-D arrays"):
        data.read_mat_cube(tmp_path / "two.mat")
    with pytest.raises(KeyError, match="no variable 'c'"):
        data.read_mat_cube(tmp_path / "two.mat", key="c")
    with pytest.raises(ValueError, match="must be a numeric 3-D array"):
        data.read_mat_cube(tmp_path / "scene.mat", key="srf")
    with pytest.raises(FileNotFoundError):
        data.read_mat(tmp_path / "missing.mat")


def test_read_mat_v73_needs_h5py(tmp_path):
    if importlib.util.find_spec("h5py") is not None:
        pytest.skip("h5py is installed: the v7.3 path reads instead of refusing")
    preamble = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 ."
    header = preamble.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM"
    (tmp_path / "v73.mat").write_bytes(header + b"\0" * 512)
    with pytest.raises(ImportError, match="v7.3 .*h5py"):
        data.read_mat(tmp_path / "v73.mat")


# --------------------------------------------------------------------------- PNG / CAVE

def write_cave(folder, planes, *, prefix="toy_ms"):
    Image = pytest.importorskip("PIL.Image")
    folder.mkdir(parents=True, exist_ok=True)
    for k, plane in enumerate(planes, start=1):
        Image.fromarray(plane).save(folder / f"{prefix}_{k:02d}.png")


def test_read_cave_16bit_nested(tmp_path):
    rng = np.random.default_rng(2)
    planes = [(rng.random((5, 7)) * 65535).astype(np.uint16) for _ in range(31)]
    write_cave(tmp_path / "toy_ms" / "toy_ms", planes)
    (tmp_path / "toy_ms" / "toy_ms" / "toy_RGB.bmp").write_bytes(b"not a band")
    cube = data.read_cave(tmp_path / "toy_ms")
    assert cube.shape == (31, 5, 7) and cube.dtype == torch.float32
    np.testing.assert_allclose(cube.numpy(), np.stack(planes) / 65535.0, rtol=1e-6)
    cube64 = data.read_cave(tmp_path / "toy_ms", dtype=torch.float64)
    np.testing.assert_allclose(cube64.numpy(), np.stack(planes) / 65535.0, rtol=1e-15)
    np.testing.assert_allclose(data.read_png(tmp_path / "toy_ms" / "toy_ms" / "toy_ms_03.png"),
                               planes[2] / 65535.0, rtol=1e-6)
    raw = data.read_png(tmp_path / "toy_ms" / "toy_ms" / "toy_ms_03.png", normalize=False)
    np.testing.assert_array_equal(raw, planes[2])


def test_read_cave_8bit_grey_rgb_and_errors(tmp_path):
    rng = np.random.default_rng(3)
    planes = [(rng.random((4, 4)) * 255).astype(np.uint8) for _ in range(3)]
    planes[1] = np.repeat(planes[1][..., None], 3, axis=2)  # a grey band stored as RGB
    write_cave(tmp_path / "s", planes)
    cube = data.read_cave(tmp_path / "s", bands=3, dtype=torch.float64)
    expected = np.stack([planes[0], planes[1][..., 0], planes[2]]) / 255.0
    np.testing.assert_allclose(cube.numpy(), expected, rtol=1e-15)
    with pytest.raises(FileNotFoundError, match=r"bands \[4, 5\]"):
        data.read_cave(tmp_path / "s", bands=5)
    colour = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    write_cave(tmp_path / "c", [colour], prefix="c")
    with pytest.raises(ValueError, match="colour image"):
        data.read_cave(tmp_path / "c", bands=1)
    (tmp_path / "fake_01.png").write_bytes(b"GIF89a....................")
    with pytest.raises(ValueError, match="not a PNG"):
        data.read_png(tmp_path / "fake_01.png")


# --------------------------------------------------------------------------- SRF

def test_nikon_gaussian_approximation():
    R = data.load_srf("nikon_d700_gaussian", dtype=torch.float64)
    assert R.shape == (3, 31)
    torch.testing.assert_close(R.sum(1), torch.ones(3, dtype=torch.float64))
    peaks = R.argmax(1).tolist()
    assert peaks[0] > peaks[1] > peaks[2]  # rows R, G, B
    wl = np.array(data.CAVE_WAVELENGTHS, dtype=np.float64)
    for row, (centre, width) in zip(R.numpy(), data.NIKON_D700_GAUSSIAN_BANDS.values()):
        g = np.exp(-0.5 * ((wl - centre) / width) ** 2)
        np.testing.assert_allclose(row, g / g.sum(), rtol=1e-12)
    assert data.nikon_d700_gaussian(range(400, 1001, 50)).shape == (3, 13)


def test_load_srf_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown SRF 'nikon'"):
        data.load_srf("nikon")
    with pytest.raises(ValueError, match="pass data_dir"):
        data.load_srf("nikon_d700")
    with pytest.raises(FileNotFoundError, match="nikon_d700"):
        data.load_srf("nikon_d700", tmp_path)
    assert "nikon_d700_gaussian" in data.available_srfs() and "sentinel2a_dcmall" in data.available_srfs()


def test_load_srf_shared_tables(shared_data):
    shapes = {"nikon_d700": (3, 31), "nikon_d700_daem": (3, 31), "nikon_d700_hiftool": (3, 31),
              "sentinel2a_dcmall": (13, 191), "chikusei": (4, 128), "chikusei_93": (4, 93), "landsat_128": (3, 128)}
    for name, shape in shapes.items():
        R = data.load_srf(name, shared_data, dtype=torch.float64)
        assert R.shape == shape, name
        torch.testing.assert_close(R.sum(1), torch.ones(shape[0], dtype=torch.float64), msg=name)
    # All Nikon tables come back as rows R, G, B: DAEM's B, G, R columns are reordered.
    p = data.load_srf("nikon_d700", shared_data, dtype=torch.float64)
    daem = data.load_srf("nikon_d700_daem", shared_data, dtype=torch.float64)
    assert (p - daem).abs().max() < 0.034  # the documented spread of the published tables
    assert (p - data.load_srf("nikon_d700_gaussian", dtype=torch.float64)).abs().max() < 0.05
    raw = data.load_srf("nikon_d700_hiftool", shared_data, normalize=False, dtype=torch.float64)
    assert not torch.allclose(raw.sum(1), torch.ones(3, dtype=torch.float64))


# --------------------------------------------------------------------------- gaussian kernel, noise

@pytest.mark.parametrize("size,sigma", [(8, 2.0), (7, 1.5), (1, 1.0), (8, 3 ** 0.5)])
def test_gaussian_kernel_matches_fspecial_formula(size, sigma):
    m = (size - 1) / 2.0
    y, x = np.ogrid[-m:m + 1, -m:m + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    k = data.gaussian_kernel(size, sigma, dtype=torch.float64)
    np.testing.assert_allclose(k.numpy(), h / h.sum(), rtol=1e-12)
    assert torch.equal(k, k.flip(0)) and torch.equal(k, k.t())
    assert data.gaussian_kernel(size, sigma).dtype == torch.get_default_dtype()


def test_gaussian_kernel_errors():
    with pytest.raises(ValueError, match="size must be a positive int"):
        data.gaussian_kernel(0, 1.0)
    with pytest.raises(ValueError, match="sigma must be a positive"):
        data.gaussian_kernel(5, 0.0)


def test_add_noise_snr_and_reproducibility():
    x = data.synthetic_scene(64, 64, 4, seed=1, dtype=torch.float64).unsqueeze(0)
    noisy = data.add_noise(x, 30.0, generator=torch.Generator().manual_seed(0))
    again = data.add_noise(x, 30.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    snr = 10 * torch.log10(x.square().mean((2, 3)) / (noisy - x).square().mean((2, 3)))
    assert (snr - 30).abs().max() < 0.3  # 4096 samples per band
    assert data.add_noise(x.float(), 30.0).dtype == torch.float32


# --------------------------------------------------------------------------- synthetic scene

def test_synthetic_scene_is_deterministic_and_sensible():
    a = data.synthetic_scene(24, 20, 31, seed=5)
    assert a.shape == (31, 24, 20) and a.dtype == torch.float32
    assert torch.equal(a, data.synthetic_scene(24, 20, 31, seed=5))
    assert not torch.allclose(a, data.synthetic_scene(24, 20, 31, seed=6))
    assert a.min() > 0 and a.max() < 1
    # Spectrally smooth: neighbouring bands differ far less than the spectra vary.
    assert (a[1:] - a[:-1]).abs().mean() < 0.2 * (a - a.mean(0)).abs().mean() + 0.05 * a.std()
    # Spatially structured: not white noise (neighbouring pixels correlate).
    d = a - a.mean(dim=(1, 2), keepdim=True)
    corr = (d[:, 1:] * d[:, :-1]).mean() / d.square().mean()
    assert corr > 0.5
    tiny = data.synthetic_scene(1, 1, 1, endmembers=1, dtype=torch.float64)
    assert tiny.shape == (1, 1, 1) and 0 < tiny.item() < 1


def test_synthetic_abundances_sum_to_one():
    ab = data.synthetic_abundances(16, 12, 5, torch.Generator().manual_seed(0))
    assert ab.shape == (5, 16, 12) and (ab >= 0).all()
    torch.testing.assert_close(ab.sum(0), torch.ones(16, 12, dtype=torch.float64))


def test_synthetic_scene_errors():
    with pytest.raises(ValueError, match="height must be an int"):
        data.synthetic_scene(0, 4)
    with pytest.raises(ValueError, match="texture"):
        data.synthetic_scene(4, 4, texture=0.7)


# --------------------------------------------------------------------------- Wald simulation

def numpy_wald(z: np.ndarray, R: np.ndarray, kernel: np.ndarray, ratio: int, offset: int):
    """Independent oracle: circular convolution by FFT (kernel origin at k // 2), then decimation."""
    C, H, W = z.shape
    k = kernel.shape[0]
    otf = np.zeros((H, W))
    otf[:k, :k] = kernel
    otf = np.roll(otf, (-(k // 2), -(k // 2)), axis=(0, 1))
    blurred = np.real(np.fft.ifft2(np.fft.fft2(z) * np.fft.fft2(otf)))
    lr = blurred[:, offset::ratio, offset::ratio][:, :H // ratio, :W // ratio]
    return lr, np.einsum("oc,chw->ohw", R, z)


@needs_degrade_op
@pytest.mark.parametrize("ratio,size,sigma", [(4, 4, 2.0), (8, 8, 2.0), (2, 5, 1.0)])
def test_simulate_matches_fft_oracle(ratio, size, sigma):
    z = data.synthetic_scene(24, 32, 8, seed=ratio, dtype=torch.float64)
    R = torch.rand(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lr, msi = data.simulate(z, R, ratio, kernel_size=size, sigma=sigma, backend="torch")
    kernel = data.gaussian_kernel(size, sigma, dtype=torch.float64).numpy()
    lr_np, msi_np = numpy_wald(z.numpy(), R.numpy(), kernel, ratio, max(ratio // 2 - 1, 0))
    assert lr.shape == (8, 24 // ratio, 32 // ratio) and msi.shape == (3, 24, 32)
    np.testing.assert_allclose(lr.numpy(), lr_np, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(msi.numpy(), msi_np, rtol=1e-10, atol=1e-12)
    # The default backend (the Triton interpreter in CI) in fp32 agrees at fp32 tolerance.
    lr32, msi32 = data.simulate(z.float(), R.float(), ratio, kernel_size=size, sigma=sigma)
    np.testing.assert_allclose(lr32.numpy(), lr_np, rtol=6e-4, atol=2e-3)
    np.testing.assert_allclose(msi32.numpy(), msi_np, rtol=6e-4, atol=2e-3)


@needs_degrade_op
def test_simulate_batched_noise_and_named_srf():
    z = torch.stack([data.synthetic_scene(16, 16, 31, seed=s) for s in range(2)])
    # The ops' kernels are tested in their own files; the reference keeps this test fast.
    lr, msi = data.simulate(z, "nikon_d700_gaussian", 4, hsi_snr_db=35.0, msi_snr_db=40.0,
                            generator=torch.Generator().manual_seed(1), backend="torch")
    assert lr.shape == (2, 31, 4, 4) and msi.shape == (2, 3, 16, 16) and lr.dtype == torch.float32
    clean_lr, clean_msi = data.simulate(z, data.load_srf("nikon_d700_gaussian"), 4, backend="torch")
    assert not torch.equal(lr, clean_lr) and (msi - clean_msi).abs().max() < 0.1
    lr2, msi2 = data.simulate(z, "nikon_d700_gaussian", 4, hsi_snr_db=35.0, msi_snr_db=40.0,
                              generator=torch.Generator().manual_seed(1), backend="torch")
    assert torch.equal(lr, lr2) and torch.equal(msi, msi2)
    # An explicit kernel is used as given.
    box = torch.full((4, 4), 1 / 16)
    lr_box, _ = data.simulate(z, "nikon_d700_gaussian", 4, kernel=box, backend="torch")
    assert not torch.allclose(lr_box, clean_lr)


def test_simulate_errors():
    z = torch.rand(4, 8, 8)
    with pytest.raises(ValueError, match=r"srf must have shape \(msi_bands, 4\)"):
        data.simulate(z, torch.rand(3, 5), 2)
    with pytest.raises(ValueError, match="ratio must be a positive int"):
        data.simulate(z, torch.rand(3, 4), 0)
    with pytest.raises(ValueError, match="hr_hsi must be 3-D or 4-D"):
        data.simulate(z[0], torch.rand(3, 4), 2)


@needs_degrade_op
def test_simulate_cave_scene(shared_data):
    cube = data.read_mat_cube(shared_data / "cave" / "paints.mat", key="orig", scale=255.0)
    z = cube[:, :64, :64]
    R = data.load_srf("nikon_d700", shared_data)
    lr, msi = data.simulate(z, R, 8, kernel_size=8, sigma=2.0, backend="torch")
    assert lr.shape == (31, 8, 8) and msi.shape == (3, 64, 64)
    assert torch.isfinite(lr).all() and torch.isfinite(msi).all()
    # Blur and a row-stochastic R preserve the range of the scene.
    assert lr.min() >= z.min() - 1e-6 and lr.max() <= z.max() + 1e-6
    assert msi.min() >= z.min() - 1e-6 and msi.max() <= z.max() + 1e-6


# --------------------------------------------------------------------------- bad input (each a reported repro)

def test_read_mat_cube_refuses_complex_bad_scale_and_integer_dtype(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    cube = np.random.default_rng(5).random((4, 5, 3))
    scipy_io.savemat(tmp_path / "c.mat", {"z": cube + 1j * cube})
    with pytest.raises(ValueError, match="is complex"):
        data.read_mat_cube(tmp_path / "c.mat")
    scipy_io.savemat(tmp_path / "r.mat", {"z": cube})
    with pytest.raises(ValueError, match="finite positive"):
        data.read_mat_cube(tmp_path / "r.mat", scale=float("inf"))
    with pytest.raises(TypeError, match="scale must be a number"):
        data.read_mat_cube(tmp_path / "r.mat", scale="255")
    with pytest.raises(TypeError, match="real floating torch dtype"):
        data.read_mat_cube(tmp_path / "r.mat", dtype=torch.int64)
    (tmp_path / "notmat.mat").write_bytes(b"this is not a MAT file at all" * 10)
    with pytest.raises(ValueError, match="notmat.mat is not a readable MATLAB"):
        data.read_mat(tmp_path / "notmat.mat")


def test_read_mat_cube_spectra_matrix_in_column_major_order(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    H, W, C = 3, 4, 5
    hwc = np.arange(H * W * C, dtype=np.float64).reshape(H, W, C)
    spectra = hwc.reshape(H * W, C, order="F").T          # (bands, pixels) as unmixing data sets store it
    scipy_io.savemat(tmp_path / "u.mat", {"Y": spectra, "nRow": H, "nCol": W})
    with pytest.raises(ValueError, match=r"pass key= and shape=\(H, W\)"):
        data.read_mat_cube(tmp_path / "u.mat")
    got = data.read_mat_cube(tmp_path / "u.mat", "Y", shape=(H, W), dtype=torch.float64)
    np.testing.assert_array_equal(got.numpy(), hwc.transpose(2, 0, 1))
    got_t = data.read_mat_cube(tmp_path / "u.mat", "Y", shape=(W, H), dtype=torch.float64)
    assert got_t.shape == (C, W, H)
    with pytest.raises(ValueError, match="needs 7 pixels"):
        data.read_mat_cube(tmp_path / "u.mat", "Y", shape=(7, 1))


def test_jasper_ridge_reads_with_shape(shared_data):
    scipy_io = pytest.importorskip("scipy.io")
    path = shared_data / "jasper_ridge_100x100x198.mat"
    cube = data.read_mat_cube(path, "Y", shape=(100, 100), scale=5000)
    expected = scipy_io.loadmat(path)["Y"].T.reshape(100, 100, 198, order="F").transpose(2, 0, 1) / 5000
    np.testing.assert_allclose(cube.numpy(), expected, rtol=1e-6)


def test_read_cave_duplicates_dtype_bands_and_truncated(tmp_path):
    planes = [np.full((3, 3), 10 * k, dtype=np.uint8) for k in range(1, 3)]
    write_cave(tmp_path / "d", planes)
    write_cave(tmp_path / "d", planes[:1], prefix="other")   # a second *_01.png
    with pytest.raises(ValueError, match="several PNGs for the same band"):
        data.read_cave(tmp_path / "d", bands=2)
    write_cave(tmp_path / "ok", planes)
    with pytest.raises(TypeError, match="real floating torch dtype"):
        data.read_cave(tmp_path / "ok", bands=2, dtype=torch.int64)
    with pytest.raises(ValueError, match="bands must be a positive int"):
        data.read_cave(tmp_path / "ok", bands=0)
    band = next((tmp_path / "ok").glob("*_02.png"))
    band.write_bytes(band.read_bytes()[:40])                  # truncated after the header
    with pytest.raises(ValueError, match=f"cannot decode .*{band.name}"):
        data.read_cave(tmp_path / "ok", bands=2)


def test_envi_unterminated_brace_is_an_error(tmp_path):
    (tmp_path / "x.hdr").write_text("ENVI\ndescription = {never closed\nsamples = 2\nlines = 2\nbands = 1\n"
                                    "data type = 4\n")
    with pytest.raises(ValueError, match="'description' .* never closes"):
        data.read_envi_header(tmp_path / "x.hdr")


def test_srf_and_scene_argument_errors():
    with pytest.raises(ValueError, match="within 200–1200 nm"):
        data.nikon_d700_gaussian([1e6])
    with pytest.raises(TypeError, match="must be numbers in nm"):
        data.nikon_d700_gaussian(["a"])
    assert torch.isfinite(data.nikon_d700_gaussian([400, 550, 700])).all()
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\)"):
        data.synthetic_scene(8, 8, 3, seed=2**70)
