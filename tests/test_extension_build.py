"""The CUDA extension path without a GPU: setup.py's build logic, the built module, and the
kernels' per-pixel math compiled for the host.

kernels/sam.cuh writes everything below its __global__ wrappers as __host__ __device__ code, so
nvcc can compile the very functions the GPU runs into a host library; here they are checked
against the float64 reference for every dtype and both channel paths (register-cached and
streamed). Tests that need nvcc, or a built fastfuse._C, skip with the reason when absent.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastfuse
from fastfuse import backends
from testing_utils import assert_close

ROOT = Path(__file__).resolve().parent.parent


def load_setup_module():
    """setup.py's helpers without running setup() (it only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("fastfuse_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup_py():
    pytest.importorskip("setuptools", reason="setup.py needs setuptools in this environment")
    return load_setup_module()


@pytest.fixture(scope="module")
def nvcc(setup_py):
    path = setup_py.find_nvcc()
    if path is None:
        pytest.skip("nvcc not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)")
    return path


def extension_built() -> bool:
    return importlib.util.find_spec("fastfuse._C") is not None


# --- setup.py: arch flags and the decision to build --------------------------------------------

def test_default_archs_and_flags(setup_py):
    archs = setup_py.parse_archs(setup_py.DEFAULT_ARCHS)
    assert [a.number for a in archs] == [80, 86, 89, 90]
    assert setup_py.arch_flags(archs) == [
        "-gencode=arch=compute_80,code=[sm_80]",
        "-gencode=arch=compute_86,code=[sm_86]",
        "-gencode=arch=compute_89,code=[sm_89]",
        "-gencode=arch=compute_90,code=[sm_90,compute_90]",  # PTX of the highest: newer GPUs JIT it
    ]
    assert setup_py.arch_list_string(archs) == "80;86;89;90+PTX"


@pytest.mark.parametrize("spec,expected", [
    ("80;86", "80;86+PTX"),
    ("8.6, 8.0", "80;86+PTX"),
    ("sm_89", "89+PTX"),
    ("80;90+PTX;86", "80;86;90+PTX"),
    ("86+PTX;90", "86+PTX;90"),
    ("100 120", "100;120+PTX"),
])
def test_arch_list_narrowing(setup_py, spec, expected):
    assert setup_py.arch_list_string(setup_py.parse_archs(spec)) == expected


@pytest.mark.parametrize("spec", ["", "ampere", "sm_8x", "90a", "8.6.1"])
def test_bad_arch_list_is_a_clear_error(setup_py, spec):
    with pytest.raises(ValueError, match="FASTFUSE_CUDA_ARCHS"):
        setup_py.parse_archs(spec)


def test_nvcc_command(setup_py):
    toolkit = setup_py.CudaToolkit("/opt/cuda/bin/nvcc", "/opt/cuda/include", "/opt/cuda/lib64")
    cmd = setup_py.nvcc_command(toolkit, setup_py.parse_archs("80;90"), ROOT / "csrc" / "sam.cu",
                                Path("/tmp/sam.o"), threads=2)
    assert cmd[:2] == ["/opt/cuda/bin/nvcc", "-c"]
    for flag in ("-O3", "-std=c++17", "--threads=2", f"-I{ROOT}", "-gencode=arch=compute_80,code=[sm_80]",
                 "-gencode=arch=compute_90,code=[sm_90,compute_90]"):
        assert flag in cmd
    assert cmd[cmd.index("-fPIC") - 1] == "-Xcompiler"


def test_no_build_without_nvcc_or_when_skipped(setup_py, monkeypatch, capsys):
    monkeypatch.setenv("FASTFUSE_SKIP_CUDA_BUILD", "1")
    assert setup_py.cuda_plan() is None
    assert "FASTFUSE_SKIP_CUDA_BUILD" in capsys.readouterr().out
    monkeypatch.delenv("FASTFUSE_SKIP_CUDA_BUILD")
    monkeypatch.setattr(setup_py, "find_nvcc", lambda: None)
    assert setup_py.cuda_plan() is None
    assert "nvcc not found" in capsys.readouterr().out


def test_family_selection(setup_py, monkeypatch):
    everything = setup_py.families()
    assert {"sam", "ssim"} <= set(everything)
    assert [p.name for p in setup_py.binding_sources()] == sorted(
        ["bindings.cpp"] + [f"{name}_bindings.cpp" for name in everything])
    monkeypatch.setenv("FASTFUSE_CUDA_FAMILIES", "sam")
    assert [p.name for p in setup_py.cuda_sources()] == ["sam.cu"]
    assert [p.name for p in setup_py.binding_sources()] == ["bindings.cpp", "sam_bindings.cpp"]
    monkeypatch.setenv("FASTFUSE_CUDA_FAMILIES", "sam;nope")
    with pytest.raises(ValueError, match="FASTFUSE_CUDA_FAMILIES names \\['nope'\\]"):
        setup_py.cuda_sources()


def test_toolkit_located_from_nvcc(setup_py, nvcc):
    toolkit = setup_py.locate_toolkit(nvcc)
    assert (Path(toolkit.include_dir) / "cuda_runtime_api.h").is_file()
    assert (Path(toolkit.lib_dir) / "libcudart_static.a").is_file()


# --- the built module ------------------------------------------------------------------------

def test_extension_imports_without_gpu():
    if not extension_built():
        pytest.skip("fastfuse._C is not built in this checkout (python setup.py build_ext --inplace)")
    # A fresh interpreter with no visible device: the import and the status queries must not fail.
    code = ("import fastfuse._C as C; i = C.build_info(); s = C.runtime_status(); "
            "print(sorted(i), i['families'], sorted(s))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'sam'" in done.stdout and "'ssim'" in done.stdout and "device_count" in done.stdout


def test_extension_links_no_libtorch_nor_shared_cudart():
    if not extension_built():
        pytest.skip("fastfuse._C is not built in this checkout")
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not available")
    so = importlib.util.find_spec("fastfuse._C").origin
    needed = subprocess.run([readelf, "-d", so], capture_output=True, text=True, check=True).stdout
    needed = [line for line in needed.splitlines() if "NEEDED" in line]
    assert needed and not any(lib in line for line in needed for lib in ("cudart", "torch", "c10"))


def test_extension_reports_bad_arguments():
    if not extension_built():
        pytest.skip("fastfuse._C is not built in this checkout")
    from fastfuse import _C

    # Checked before anything touches the device, so safe on any machine.
    with pytest.raises(ValueError, match="dtype code"):
        _C.sam_map_forward(8, 8, 8, 1, 3, 4, 9, True, 1e-8, 0)
    with pytest.raises(ValueError, match="channels must be >= 1"):
        _C.sam_map_forward(8, 8, 8, 1, 0, 4, 0, True, 1e-8, 0)
    with pytest.raises(ValueError, match="x must be a device pointer"):
        _C.sam_map_backward(8, 0, 8, 8, 8, 1, 3, 4, 0, True, 1e-8, 0)
    _C.sam_map_forward(0, 0, 0, 0, 3, 4, 0, True, 1e-8, 0)  # empty batch: nothing to launch
    #                  x  y  out planes H  W  OH OW dtype ws sigma c1 c2 padding stream
    good = dict(zip(["x", "y", "out", "planes", "height", "width", "out_height", "out_width", "dtype",
                     "window_size", "sigma", "c1", "c2", "padding", "stream"],
                    [8, 8, 8, 1, 20, 20, 10, 10, 0, 11, 1.5, 1e-4, 9e-4, 0, 0]))
    for change, message in [({"window_size": 33}, "window_size must be odd"), ({"window_size": 4}, "odd"),
                            ({"padding": 3}, "padding must be 0"), ({"out_height": 20}, "does not match"),
                            ({"sigma": 0.0}, "sigma"), ({"c2": -1.0}, "c1 and c2"), ({"dtype": 5}, "dtype code"),
                            ({"out": 0}, "out must be a device pointer")]:
        with pytest.raises(ValueError, match=message):
            _C.ssim_map_forward(**{**good, **change})
    _C.ssim_map_forward(**{**good, "planes": 0, "x": 0, "y": 0, "out": 0})  # nothing to launch
    info = _C.build_info()
    assert info["families"] == sorted(info["families"]) and {"sam", "ssim"} <= set(info["families"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: a launch would really run")
def test_launch_failure_is_a_python_exception():
    if not extension_built():
        pytest.skip("fastfuse._C is not built in this checkout")
    from fastfuse import _C

    if _C.runtime_status()["device_count"] != 0:
        pytest.skip("the CUDA runtime sees a device")
    with pytest.raises(RuntimeError, match="sam_map_forward: CUDA kernel launch failed"):
        _C.sam_map_forward(256, 256, 256, 1, 3, 4, 0, True, 1e-8, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU behaviour")
def test_cuda_backend_says_why_it_is_unavailable():
    fastfuse.sam_map  # registers the op's backends
    reason = backends.unavailable_reason("sam_map", "cuda", torch.device("cpu"))
    assert reason is not None and "needs CUDA tensors" in reason
    x = torch.rand(1, 3, 2, 2)
    with pytest.raises(backends.BackendUnavailableError, match="backend 'cuda' is unavailable"):
        fastfuse.sam_map(x, x, backend="cuda")
    from fastfuse.cuda import sam as cuda_sam

    if extension_built():
        with pytest.raises(ValueError, match="must be a CUDA tensor"):
            cuda_sam.sam_map_forward(x, x, True, 1e-8)
    else:
        assert "not built" in backends.cuda_extension_unavailable_reason()
        with pytest.raises(backends.BackendUnavailableError, match="not built"):
            cuda_sam.sam_map_forward(x, x, True, 1e-8)


# --- the kernels' per-pixel code, compiled for the host ------------------------------------------

HOST_HARNESS = r"""
// SAM: the kernels' per-pixel functions over every (b, p), exactly as forward_kernel and
// backward_kernel do on the GPU, but in a host loop.
#include <cstdint>
#include "kernels/sam.cuh"

using namespace fastfuse;
using namespace fastfuse::sam;

template <typename T, int K>
void forward_all(const void* x, const void* y, void* out, int64_t B, int64_t C, int64_t P, double eps,
                 bool degrees) {
  const T* xp = static_cast<const T*>(x);
  const T* yp = static_cast<const T*>(y);
  T* op = static_cast<T*>(out);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) {
      const int64_t base = b * C * P + p;
      forward_at<T, K>(xp + base, yp + base, op + b * P + p, C, P, static_cast<acc_t<T>>(eps), degrees);
    }
}

template <typename T, int K>
void backward_all(const void* grad, const void* x, const void* y, void* gx, void* gy, int64_t B, int64_t C,
                  int64_t P, double eps, bool degrees) {
  const T* gp = static_cast<const T*>(grad);
  const T* xp = static_cast<const T*>(x);
  const T* yp = static_cast<const T*>(y);
  T* gxp = static_cast<T*>(gx);
  T* gyp = static_cast<T*>(gy);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) {
      const int64_t base = b * C * P + p;
      backward_at<T, K>(xp + base, yp + base, gp[b * P + p], gxp + base, gyp + base, C, P,
                        static_cast<acc_t<T>>(eps), degrees);
    }
}

#define FASTFUSE_DISPATCH(K, FN, ...)                                  \
  switch (dtype) {                                                     \
    case 0: FN<float, K>(__VA_ARGS__); return 0;                       \
    case 1: FN<__half, K>(__VA_ARGS__); return 0;                      \
    case 2: FN<__nv_bfloat16, K>(__VA_ARGS__); return 0;               \
    case 3: FN<double, K>(__VA_ARGS__); return 0;                      \
    default: return -1;                                                \
  }

extern "C" int sam_forward_host(int dtype, int cached, const void* x, const void* y, void* out, int64_t B,
                                int64_t C, int64_t P, double eps, bool degrees) {
  if (cached) {
    if (C > kCachedChannels) return -2;
    FASTFUSE_DISPATCH(kCachedChannels, forward_all, x, y, out, B, C, P, eps, degrees)
  }
  FASTFUSE_DISPATCH(0, forward_all, x, y, out, B, C, P, eps, degrees)
}

extern "C" int sam_backward_host(int dtype, int cached, const void* grad, const void* x, const void* y,
                                 void* gx, void* gy, int64_t B, int64_t C, int64_t P, double eps, bool degrees) {
  if (cached) {
    if (C > kCachedChannels) return -2;
    FASTFUSE_DISPATCH(kCachedChannels, backward_all, grad, x, y, gx, gy, B, C, P, eps, degrees)
  }
  FASTFUSE_DISPATCH(0, backward_all, grad, x, y, gx, gy, B, C, P, eps, degrees)
}

// ---- SSIM: every block of the grid, each phase run for all of its threads before the next ----
// (what the barriers between phases guarantee on the GPU). Shared memory is refilled with NaN
// before every block, so a read of anything a previous phase did not write shows up as NaN.
#include <limits>
#include <vector>

#include "kernels/ssim.cuh"

namespace fs = fastfuse::ssim;

template <typename A>
std::vector<A> poisoned(int elems) { return std::vector<A>(elems, std::numeric_limits<A>::quiet_NaN()); }

template <typename T, bool kAdjoint>
void moments_grid(const T* x, const T* y, T* out, const T* grad, acc_t<T>* adjoint, int64_t planes,
                  const fs::Params<acc_t<T>>& p) {
  using A = acc_t<T>;
  const int s = p.footprint();
  const int64_t in_plane = p.height * p.width, out_plane = p.out_height * p.out_width;
  for (int64_t plane = 0; plane < planes; ++plane)
    for (int64_t row0 = 0; row0 < p.out_height; row0 += fs::kTile)
      for (int64_t col0 = 0; col0 < p.out_width; col0 += fs::kTile) {
        std::vector<A> smem = poisoned<A>(fs::moments_smem_elems(p.radius));
        A* sx = smem.data();
        A* sy = sx + s * s;
        A* h = sy + s * s;
        for (int tid = 0; tid < fs::kThreads; ++tid)
          fs::load_footprint<T>(p, x + plane * in_plane, y + plane * in_plane, row0, col0, sx, sy, tid, fs::kThreads);
        for (int tid = 0; tid < fs::kThreads; ++tid) fs::horizontal_moments<A>(p, sx, sy, h, tid, fs::kThreads);
        for (int tid = 0; tid < fs::kThreads; ++tid) {
          if (kAdjoint)
            fs::write_adjoints<T>(p, h, row0, col0, grad + plane * out_plane, adjoint + plane * out_plane,
                                  planes * out_plane, tid);
          else
            fs::write_ssim<T>(p, h, row0, col0, out + plane * out_plane, tid);
        }
      }
}

template <typename T>
int transposed_grid(const acc_t<T>* adjoint, const T* x, const T* y, T* dx, T* dy, int64_t planes,
                    const fs::Params<acc_t<T>>& p) {
  using A = acc_t<T>;
  const int s = p.footprint();
  const int64_t in_plane = p.height * p.width, out_plane = p.out_height * p.out_width;
  int out_of_footprint = 0;
  for (int64_t plane = 0; plane < planes; ++plane)
    for (int64_t row0 = 0; row0 < p.height; row0 += fs::kTile)
      for (int64_t col0 = 0; col0 < p.width; col0 += fs::kTile) {
        std::vector<A> smem = poisoned<A>(fs::transposed_smem_elems(p.radius));
        A* sa = smem.data();
        A* hb = sa + fs::kAdjoints * s * s;
        for (int tid = 0; tid < fs::kThreads; ++tid)
          fs::load_adjoint_footprint<A>(p, adjoint + plane * out_plane, planes * out_plane, row0, col0, sa, tid,
                                        fs::kThreads);
        for (int tid = 0; tid < fs::kThreads; ++tid)
          fs::horizontal_transposed<A>(p, sa, col0, hb, tid, fs::kThreads, &out_of_footprint);
        const int64_t at = plane * in_plane;
        for (int tid = 0; tid < fs::kThreads; ++tid)
          fs::write_input_gradients<T>(p, hb, row0, col0, x + at, y + at, dx ? dx + at : nullptr,
                                       dy ? dy + at : nullptr, tid, &out_of_footprint);
      }
  return out_of_footprint;
}

template <typename T>
int ssim_host(bool backward, const void* grad, const void* x, const void* y, void* out, void* dx, void* dy,
              void* adjoint, int64_t planes, int64_t H, int64_t W, int64_t OH, int64_t OW, int window, double sigma,
              double c1, double c2, int padding) {
  using A = acc_t<T>;
  const auto p = fs::make_params<A>(H, W, OH, OW, window, sigma, c1, c2, padding);
  const T* xp = static_cast<const T*>(x);
  const T* yp = static_cast<const T*>(y);
  if (!backward) {
    moments_grid<T, false>(xp, yp, static_cast<T*>(out), nullptr, nullptr, planes, p);
    return 0;
  }
  A* adj = static_cast<A*>(adjoint);
  moments_grid<T, true>(xp, yp, nullptr, static_cast<const T*>(grad), adj, planes, p);
  return transposed_grid<T>(adj, xp, yp, static_cast<T*>(dx), static_cast<T*>(dy), planes, p);
}

#define FASTFUSE_SSIM_HOST(T)                                                                       \
  ssim_host<T>(backward, grad, x, y, out, dx, dy, adjoint, planes, H, W, OH, OW, window, sigma, c1, c2, padding)

extern "C" int ssim_host_run(int dtype, bool backward, const void* grad, const void* x, const void* y, void* out,
                             void* dx, void* dy, void* adjoint, int64_t planes, int64_t H, int64_t W, int64_t OH,
                             int64_t OW, int window, double sigma, double c1, double c2, int padding) {
  switch (dtype) {
    case 0: return FASTFUSE_SSIM_HOST(float);
    case 1: return FASTFUSE_SSIM_HOST(__half);
    case 2: return FASTFUSE_SSIM_HOST(__nv_bfloat16);
    case 3: return FASTFUSE_SSIM_HOST(double);
    default: return -1;
  }
}
"""

HOST_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@pytest.fixture(scope="module")
def host_kernels(nvcc, tmp_path_factory):
    build = tmp_path_factory.mktemp("kernels_host")
    source = build / "kernels_host.cu"
    source.write_text(HOST_HARNESS)
    library = build / "libkernels_host.so"
    # One arch: the device side is irrelevant here, only the host instantiations are called.
    done = subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-O2", "-arch=sm_80",
                           f"-I{ROOT}", str(source), "-o", str(library)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"the kernels do not compile for the host:\n{done.stderr}"
    lib = ctypes.CDLL(str(library))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.sam_forward_host.argtypes = [ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, i64, i64, i64, ctypes.c_double,
                                     ctypes.c_bool]
    lib.sam_backward_host.argtypes = [ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, ptr, ptr, i64, i64, i64,
                                      ctypes.c_double, ctypes.c_bool]
    lib.ssim_host_run.restype = ctypes.c_int
    lib.ssim_host_run.argtypes = [ctypes.c_int, ctypes.c_bool, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64,
                                  i64, ctypes.c_int, ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_int]
    return lib


def run_host(lib, x, y, grad, *, cached, degrees=True, eps=1e-8):
    x, y, grad = x.contiguous(), y.contiguous(), grad.to(x.dtype).contiguous()
    B, C, H, W = x.shape
    code = HOST_DTYPE_CODES[x.dtype]
    out = torch.empty((B, H, W), dtype=x.dtype)
    gx, gy = torch.empty_like(x), torch.empty_like(y)
    assert lib.sam_forward_host(code, int(cached), x.data_ptr(), y.data_ptr(), out.data_ptr(), B, C, H * W,
                                eps, degrees) == 0
    assert lib.sam_backward_host(code, int(cached), grad.data_ptr(), x.data_ptr(), y.data_ptr(), gx.data_ptr(),
                                 gy.data_ptr(), B, C, H * W, eps, degrees) == 0
    return out, gx, gy


def reference(x, y, grad, **kwargs):
    xr = x.detach().double().clone().requires_grad_(True)  # clone: .double() of float64 is x itself
    yr = y.detach().double().clone().requires_grad_(True)
    out = fastfuse.sam_map(xr, yr, backend="torch", **kwargs)
    out.backward(grad.to(x.dtype).double())
    return out.detach(), xr.grad, yr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,cached", [((2, 31, 3, 5), True), ((2, 31, 3, 5), False), ((1, 1, 2, 2), True),
                                          ((1, 40, 2, 3), False), ((3, 2, 1, 1), True)])
def test_host_compiled_kernel_math(host_kernels, dtype, shape, cached):
    g = torch.Generator().manual_seed(7)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.05).to(dtype)
    y = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.05).to(dtype)
    grad = torch.rand((shape[0], shape[2], shape[3]), generator=g, dtype=torch.float64)
    for degrees in (True, False):
        out, gx, gy = run_host(host_kernels, x, y, grad, cached=cached, degrees=degrees)
        ref, gx_ref, gy_ref = reference(x, y, grad, degrees=degrees)
        assert out.dtype == dtype and gx.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-11)
            torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(gy, gy_ref, rtol=1e-9, atol=1e-9)
        else:
            assert_close(out, ref, dtype, atol_scale=10, name="angle")
            assert_close(gx, gx_ref, dtype, rtol_scale=5, atol_scale=10, name="dx")
            assert_close(gy, gy_ref, dtype, rtol_scale=5, atol_scale=10, name="dy")


@pytest.mark.parametrize("cached", [True, False])
def test_host_compiled_kernel_special_spectra(host_kernels, cached):
    x = torch.rand(1, 6, 1, 6, dtype=torch.float64) + 0.1
    y = torch.rand(1, 6, 1, 6, dtype=torch.float64) + 0.1
    x[0, :, 0, 0] = 0                       # zero x
    y[0, :, 0, 1] = 0                       # zero y
    y[0, :, 0, 2] = 2 * x[0, :, 0, 2]       # same direction (exactly, in every precision)
    y[0, :, 0, 3] = -0.5 * x[0, :, 0, 3]    # opposite
    x[0, 3, 0, 4] = float("nan")            # NaN propagates
    x[0, :, 0, 5] *= 1e-4 / x[0, :, 0, 5].norm()  # under eps = 1e-3: right angle
    grad = torch.rand(1, 1, 6, dtype=torch.float64)
    out, gx, gy = run_host(host_kernels, x.float(), y.float(), grad, cached=cached, eps=1e-3)
    ref, gx_ref, gy_ref = reference(x.float(), y.float(), grad, eps=1e-3)
    assert torch.isnan(out[0, 0, 4]) and torch.isnan(ref[0, 0, 4])
    keep = [0, 1, 2, 3, 5]
    assert_close(out[..., keep], ref[..., keep], torch.float32, atol_scale=10, name="angle")
    torch.testing.assert_close(out[0, 0, keep], torch.tensor([90.0, 90.0, 0.0, 180.0, 90.0]), atol=1e-4, rtol=0)
    for got, want in ((gx, gx_ref), (gy, gy_ref)):
        assert (got[..., [0, 1, 5]] == 0).all()
        assert torch.isfinite(got[..., keep]).all()
        assert_close(got[..., keep], want[..., keep], torch.float32, rtol_scale=5, atol_scale=10, name="grad")


SSIM_PADDING_CODES = {"valid": 0, "zero": 1, "reflect": 2}


def run_host_ssim(lib, x, y, grad, *, window_size=11, sigma=1.5, data_range=1.0, k1=0.01, k2=0.03,
                  padding="valid", need_x=True, need_y=True):
    """(map, dx, dy) from the host-compiled kernels/ssim.cuh; asserts no out-of-footprint read."""
    from fastfuse.reference.ssim import output_size

    x, y = x.contiguous(), y.contiguous()
    B, C, H, W = x.shape
    OH, OW = output_size(H, window_size, padding), output_size(W, window_size, padding)
    grad = grad.to(x.dtype).contiguous()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty((B, C, OH, OW), dtype=x.dtype)
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    adjoint = torch.empty((4, B * C, OH, OW), dtype=acc)
    args = (B * C, H, W, OH, OW, window_size, sigma, (k1 * data_range) ** 2, (k2 * data_range) ** 2,
            SSIM_PADDING_CODES[padding])
    code = HOST_DTYPE_CODES[x.dtype]
    assert lib.ssim_host_run(code, False, None, x.data_ptr(), y.data_ptr(), out.data_ptr(), None, None, None,
                             *args) == 0
    misses = lib.ssim_host_run(code, True, grad.data_ptr(), x.data_ptr(), y.data_ptr(), None,
                               dx.data_ptr() if need_x else None, dy.data_ptr() if need_y else None,
                               adjoint.data_ptr(), *args)
    assert misses == 0, f"{misses} reads outside the shared-memory footprint"
    return out, dx, dy


def ssim_reference(x, y, grad, **kwargs):
    from fastfuse.reference.ssim import ssim_map

    xr = x.detach().double().clone().requires_grad_(True)
    yr = y.detach().double().clone().requires_grad_(True)
    out = ssim_map(xr, yr, **kwargs)
    out.backward(grad.to(x.dtype).double())
    return out.detach(), xr.grad, yr.grad


# Multi-tile and partial tiles (16-pixel tiles), images smaller than the window (repeated
# mirroring), the largest window, a 1-tap window, 1x1 planes.
SSIM_CASES = [
    ((2, 2, 37, 21), 11, "valid"), ((2, 2, 37, 21), 11, "zero"), ((2, 2, 37, 21), 11, "reflect"),
    ((1, 2, 3, 5), 11, "zero"), ((1, 2, 3, 5), 11, "reflect"), ((1, 1, 1, 1), 7, "reflect"),
    ((1, 1, 33, 40), 31, "valid"), ((1, 1, 20, 18), 31, "reflect"), ((1, 3, 9, 6), 1, "zero"),
    ((1, 1, 1, 1), 3, "zero"),
]


@pytest.mark.parametrize("shape,window_size,padding", SSIM_CASES)
def test_host_compiled_ssim_fp32_and_fp64(host_kernels, shape, window_size, padding):
    g = torch.Generator().manual_seed(8)
    base_x = torch.rand(shape, generator=g, dtype=torch.float64)
    base_y = (base_x + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    kwargs = dict(window_size=window_size, sigma=1.5, padding=padding)
    for dtype in (torch.float32, torch.float64):
        x, y = base_x.to(dtype), base_y.to(dtype)
        out_shape = (shape[0], shape[1]) + tuple(
            n - window_size + 1 if padding == "valid" else n for n in shape[2:])
        grad = torch.randn(out_shape, generator=g, dtype=torch.float64)
        ref, dx_ref, dy_ref = ssim_reference(x, y, grad, **kwargs)
        out, dx, dy = run_host_ssim(host_kernels, x, y, grad, **kwargs)
        if dtype == torch.float64:
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(dy, dy_ref, rtol=1e-10, atol=1e-12)
        else:
            assert_close(out, ref, dtype, name="ssim")
            assert_close(dx, dx_ref, dtype, rtol_scale=5, atol_scale=10, name="dx")
            assert_close(dy, dy_ref, dtype, rtol_scale=5, atol_scale=10, name="dy")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padding", ["valid", "zero", "reflect"])
def test_host_compiled_ssim_half(host_kernels, dtype, padding):
    g = torch.Generator().manual_seed(9)
    x = torch.rand(2, 2, 19, 23, generator=g, dtype=torch.float64).to(dtype)
    y = (x.double() + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1).to(dtype)
    out_shape = (2, 2, 9, 13) if padding == "valid" else (2, 2, 19, 23)
    grad = torch.randn(out_shape, generator=g, dtype=torch.float64)
    ref, dx_ref, dy_ref = ssim_reference(x, y, grad, padding=padding)
    out, dx, dy = run_host_ssim(host_kernels, x, y, grad, padding=padding)
    assert out.dtype == dtype and dx.dtype == dtype
    assert_close(out, ref, dtype, name="ssim")
    assert_close(dx, dx_ref, dtype, rtol_scale=5, atol_scale=10, name="dx")
    assert_close(dy, dy_ref, dtype, rtol_scale=5, atol_scale=10, name="dy")


def test_host_compiled_ssim_nan_and_options(host_kernels):
    # NaN poisons exactly what it poisons in the reference; other constants and one-sided grads.
    g = torch.Generator().manual_seed(10)
    x = torch.rand(1, 2, 30, 34, generator=g, dtype=torch.float64)
    y = torch.rand(1, 2, 30, 34, generator=g, dtype=torch.float64)
    x[0, 0, 3, 20] = float("nan")
    y[0, 1, 25, 2] = float("inf")
    kwargs = dict(window_size=7, sigma=2.0, data_range=2.0, k1=0.02, k2=0.05)
    for padding in ("valid", "zero", "reflect"):
        out_shape = (1, 2, 24, 28) if padding == "valid" else (1, 2, 30, 34)
        grad = torch.rand(out_shape, generator=g, dtype=torch.float64)
        ref, dx_ref, dy_ref = ssim_reference(x, y, grad, padding=padding, **kwargs)
        out, dx, dy = run_host_ssim(host_kernels, x, y, grad, padding=padding, **kwargs)
        for got, want in ((out, ref), (dx, dx_ref), (dy, dy_ref)):
            assert torch.equal(torch.isnan(got), torch.isnan(want)), padding
            torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-10, atol=1e-12)
        _, dx_only, dy_skipped = run_host_ssim(host_kernels, x, y, grad, padding=padding, need_y=False, **kwargs)
        assert torch.equal(dx_only.isnan(), dx_ref.isnan())


# --- setup.py end to end -----------------------------------------------------------------------

@pytest.mark.slow
def test_setup_builds_an_importable_extension(nvcc, tmp_path):
    """What CI relies on: with nvcc present, setup.py compiles csrc/ (one family and one arch here,
    for time) and links a module that imports without a GPU."""
    # pip's isolated build has pybind11; the test environment needs its own to run setup.py.
    pytest.importorskip("pybind11", reason="pybind11 is not installed in the test environment")
    env = {**os.environ, "FASTFUSE_CUDA_ARCHS": "80", "FASTFUSE_CUDA_FAMILIES": "sam",
           "FASTFUSE_SKIP_CUDA_BUILD": "0", "FASTFUSE_ALLOW_CUDA_FAIL": "0"}
    build_lib, build_temp = tmp_path / "lib", tmp_path / "temp"
    done = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(build_lib),
                           "--build-temp", str(build_temp)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "built fastfuse._C" in done.stdout
    built = list((build_lib / "fastfuse").glob("_C*.so"))
    assert len(built) == 1
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('fastfuse._C', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.build_info())")
    done = subprocess.run([sys.executable, "-c", code, str(built[0])], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'cuda_archs': '80+PTX'" in done.stdout and "'families': ['sam']" in done.stdout


# --- on a GPU: the compiled SSIM kernels at real shapes ----------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("padding", ["valid", "zero", "reflect"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_gpu_cuda_ssim_real_shapes(padding, dtype):
    reason = backends.unavailable_reason("ssim_map", "cuda", torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    from fastfuse.cuda import ssim as cuda_ssim

    g = torch.Generator(device="cuda").manual_seed(11)
    shape = (2, 31, 130, 97) if dtype != torch.float64 else (1, 3, 70, 45)
    x = torch.rand(shape, generator=g, device="cuda")
    y = (x + 0.1 * torch.randn(shape, generator=g, device="cuda")).clamp(0, 1)
    x, y = x.to(dtype), y.to(dtype)
    out = cuda_ssim.ssim_map_forward(x, y, 11, 1.5, 1.0, 0.01, 0.03, padding)
    grad = torch.randn(out.shape, generator=g, device="cuda").to(dtype)
    dx, dy = cuda_ssim.ssim_map_backward(grad, x, y, 11, 1.5, 1.0, 0.01, 0.03, padding)
    ref, dx_ref, dy_ref = ssim_reference(x, y, grad, padding=padding)
    compare = (lambda a, b, **kw: torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-10, atol=1e-12)) \
        if dtype == torch.float64 else (lambda a, b, **kw: assert_close(a, b, dtype, **kw))
    compare(out, ref, name="ssim")
    compare(dx, dx_ref, rtol_scale=5, atol_scale=10, name="dx")
    compare(dy, dy_ref, rtol_scale=5, atol_scale=10, name="dy")
