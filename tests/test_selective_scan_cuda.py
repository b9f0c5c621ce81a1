"""The CUDA selective scan without a GPU, and with one when present.

kernels/selective_scan.cuh writes its whole block bodies (forward_block, backward_block) as
__host__ __device__ templates over a `Team` (thread id, barrier, xor-shuffle, atomics). The
harness below compiles those very functions for the host with nvcc and runs each thread block
with one fiber (ucontext) per thread: a barrier switches back to a scheduler that resumes every
fiber in turn, so a round of the scheduler is exactly one barrier phase, and a shuffle is a
write to a slot, a barrier, a read of the partner's slot and a barrier. Shared memory and the
backward scratch are poisoned with NaN, outputs are pre-filled with NaN, and the scheduler checks
that every thread reaches the same number of barriers, so a missing barrier, an unwritten output
or a read of an unwritten tile shows up as a failure here rather than on a GPU.

What the host run does not exercise is the mapping of that Team onto CUDA (DeviceTeam: four
one-line intrinsics) and the launch itself; the gpu-marked tests at the end do.
"""
from __future__ import annotations

import ctypes
import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

import fastfuse
from fastfuse import backends
from fastfuse.reference.selective_scan import scan_with_states
from testing_utils import assert_close

ROOT = Path(__file__).resolve().parent.parent
F64 = torch.float64

HOST_HARNESS = r"""
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <functional>
#include <limits>
#include <vector>

#include "kernels/selective_scan.cuh"

using namespace fastfuse;
namespace ss = fastfuse::selective_scan;

// One thread block as fibers on one host thread.
struct Fibers {
  int n = 0;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<int> done;
  std::vector<long> barriers;
  std::vector<double> slots;  // shuffle exchange: float and double round-trip exactly
  ucontext_t main_ctx;
  std::function<void(int)> body;
};
static Fibers* g_fibers = nullptr;

struct FiberTeam {
  int t;
  __host__ __device__ int tid() const { return t; }
  __host__ __device__ void sync() const {
#ifndef __CUDA_ARCH__
    g_fibers->barriers[t]++;
    swapcontext(&g_fibers->ctx[t], &g_fibers->main_ctx);
#endif
  }
  template <typename V> __host__ __device__ V shfl_xor(V v, int mask) const {
#ifndef __CUDA_ARCH__
    g_fibers->slots[t] = static_cast<double>(v);
    sync();
    const V other = static_cast<V>(g_fibers->slots[t ^ mask]);
    sync();
    return other;
#else
    return v;
#endif
  }
  template <typename V> __host__ __device__ void shared_add(V* p, V v) const { *p += v; }
  template <typename V> __host__ __device__ void global_add(V* p, V v) const { *p += v; }
};

static void fiber_entry(int t) {
  g_fibers->body(t);
  g_fibers->done[t] = 1;
}

// Runs body(tid) for tid < n as one block; returns 0, or -100 if the threads disagree on the
// number of barriers (a deadlock or a race on the GPU).
static int run_block(int n, const std::function<void(int)>& body) {
  Fibers f;
  f.n = n;
  f.ctx.resize(n);
  f.stacks.assign(n, std::vector<char>(256 * 1024));
  f.done.assign(n, 0);
  f.barriers.assign(n, 0);
  f.slots.assign(n, std::numeric_limits<double>::quiet_NaN());
  f.body = body;
  g_fibers = &f;
  for (int t = 0; t < n; ++t) {
    getcontext(&f.ctx[t]);
    f.ctx[t].uc_stack.ss_sp = f.stacks[t].data();
    f.ctx[t].uc_stack.ss_size = f.stacks[t].size();
    f.ctx[t].uc_link = &f.main_ctx;
    makecontext(&f.ctx[t], reinterpret_cast<void (*)()>(fiber_entry), 1, t);
  }
  // Every round runs the threads in a fresh (seeded) random order, so that a thread reading
  // another's write without a barrier between them sees a stale value in about half the rounds.
  std::vector<int> order(n);
  for (int t = 0; t < n; ++t) order[t] = t;
  std::mt19937 rng(12345u + static_cast<unsigned>(n));
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    int finished = 0;
    for (int t : order) {
      if (!f.done[t]) swapcontext(&f.main_ctx, &f.ctx[t]);
      finished += f.done[t];
    }
    if (finished == n) break;
    if (finished != 0) return -100;  // some threads left while others wait at a barrier
  }
  for (int t = 1; t < n; ++t)
    if (f.barriers[t] != f.barriers[0]) return -100;
  g_fibers = nullptr;
  return 0;
}

template <typename A> std::vector<A> poisoned(int64_t n) {
  return std::vector<A>(static_cast<size_t>(n), std::numeric_limits<A>::quiet_NaN());
}

struct Sizes {
  int64_t batch, dim, length, n_state, groups, chunk;
  int threads, nt, tile;
  bool softplus;
};

static ss::Geometry geometry_of(const Sizes& s, bool has_d, bool has_z, bool has_bias) {
  return ss::make_geometry(s.batch, s.dim, s.length, s.n_state, s.groups, s.chunk, s.threads, s.nt, s.tile, has_d,
                           has_z, has_bias, s.softplus);
}

template <typename T, typename TW>
int forward_host(const Sizes& s, const void* u, const void* delta, const void* A, const void* B, const void* C,
                 const void* D, const void* z, const void* bias, void* out, void* last, void* states) {
  using Acc = acc_t<T>;
  const ss::Geometry g = geometry_of(s, D != nullptr, z != nullptr, bias != nullptr);
  if (int code = ss::check_geometry(g)) return code;
  ss::ForwardArgs<T, TW> a;
  a.u = static_cast<const T*>(u);
  a.delta = static_cast<const T*>(delta);
  a.z = static_cast<const T*>(z);
  a.B = static_cast<const TW*>(B);
  a.C = static_cast<const TW*>(C);
  a.A = static_cast<const Acc*>(A);
  a.D = static_cast<const Acc*>(D);
  a.bias = static_cast<const Acc*>(bias);
  a.out = static_cast<T*>(out);
  a.last_state = static_cast<Acc*>(last);
  a.chunk_states = static_cast<Acc*>(states);
  for (int64_t block = 0; block < g.blocks(); ++block) {
    std::vector<Acc> smem = poisoned<Acc>(ss::shared_elements(g.n_state, g.channels_per_block, g.tile, false));
    const int rc =
        run_block(g.threads, [&](int t) { ss::forward_block<T, TW>(FiberTeam{t}, a, g, block, smem.data()); });
    if (rc) return rc;
  }
  return 0;
}

template <typename T, typename TW>
int backward_host(const Sizes& s, const void* dout, const void* dlast, const void* u, const void* delta,
                  const void* A, const void* B, const void* C, const void* D, const void* z, const void* bias,
                  const void* states, void* du, void* ddelta, void* dz, void* dB, void* dC, void* dA, void* dD,
                  void* dbias) {
  using Acc = acc_t<T>;
  const ss::Geometry g = geometry_of(s, D != nullptr, z != nullptr, bias != nullptr);
  if (int code = ss::check_geometry(g)) return code;
  std::vector<Acc> scratch = poisoned<Acc>(g.blocks() * g.chunk_rows * g.k * g.threads);
  ss::BackwardArgs<T, TW> a;
  a.dout = static_cast<const T*>(dout);
  a.u = static_cast<const T*>(u);
  a.delta = static_cast<const T*>(delta);
  a.z = static_cast<const T*>(z);
  a.B = static_cast<const TW*>(B);
  a.C = static_cast<const TW*>(C);
  a.A = static_cast<const Acc*>(A);
  a.D = static_cast<const Acc*>(D);
  a.bias = static_cast<const Acc*>(bias);
  a.dlast = static_cast<const Acc*>(dlast);
  a.chunk_states = static_cast<const Acc*>(states);
  a.scratch = scratch.data();
  a.du = static_cast<T*>(du);
  a.ddelta = static_cast<T*>(ddelta);
  a.dz = static_cast<T*>(dz);
  a.dB = static_cast<Acc*>(dB);
  a.dC = static_cast<Acc*>(dC);
  a.dA = static_cast<Acc*>(dA);
  a.dD = static_cast<Acc*>(dD);
  a.dbias = static_cast<Acc*>(dbias);
  a.accumulate_bc = g.blocks_per_group > 1;
  for (int64_t block = 0; block < g.blocks(); ++block) {
    std::vector<Acc> smem = poisoned<Acc>(ss::shared_elements(g.n_state, g.channels_per_block, g.tile, true));
    const int rc =
        run_block(g.threads, [&](int t) { ss::backward_block<T, TW>(FiberTeam{t}, a, g, block, smem.data()); });
    if (rc) return rc;
  }
  return 0;
}

#define DISPATCH(CALL)                                                                \
  switch (dtype * 10 + bc_dtype) {                                                    \
    case 0: return CALL(float, float);                                                \
    case 11: return CALL(__half, __half);                                             \
    case 10: return CALL(__half, float);                                              \
    case 22: return CALL(__nv_bfloat16, __nv_bfloat16);                               \
    case 20: return CALL(__nv_bfloat16, float);                                       \
    case 33: return CALL(double, double);                                             \
    default: return -1;                                                               \
  }

extern "C" int ss_forward_host(int dtype, int bc_dtype, const int64_t* sizes, const int* config, bool softplus,
                               const void* u, const void* delta, const void* A, const void* B, const void* C,
                               const void* D, const void* z, const void* bias, void* out, void* last, void* states) {
  const Sizes s{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], config[0], config[1], config[2], softplus};
#define FWD(T, TW) forward_host<T, TW>(s, u, delta, A, B, C, D, z, bias, out, last, states)
  DISPATCH(FWD)
}

extern "C" int ss_backward_host(int dtype, int bc_dtype, const int64_t* sizes, const int* config, bool softplus,
                                const void* dout, const void* dlast, const void* u, const void* delta, const void* A,
                                const void* B, const void* C, const void* D, const void* z, const void* bias,
                                const void* states, void* du, void* ddelta, void* dz, void* dB, void* dC, void* dA,
                                void* dD, void* dbias) {
  const Sizes s{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], config[0], config[1], config[2], softplus};
#define BWD(T, TW) \
  backward_host<T, TW>(s, dout, dlast, u, delta, A, B, C, D, z, bias, states, du, ddelta, dz, dB, dC, dA, dD, dbias)
  DISPATCH(BWD)
}

extern "C" int64_t ss_shared_elements(int64_t n_state, int channels_per_block, int tile, bool backward) {
  return ss::shared_elements(n_state, channels_per_block, tile, backward);
}
"""

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def find_nvcc():
    spec = importlib.util.spec_from_file_location("fastfuse_setup_py_ss", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_nvcc()


def extension_built() -> bool:
    return importlib.util.find_spec("fastfuse._C") is not None


@pytest.fixture(scope="module")
def host_scan(tmp_path_factory):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)")
    build = tmp_path_factory.mktemp("selective_scan_host")
    source = build / "selective_scan_host.cu"
    source.write_text(HOST_HARNESS)
    library = build / "libselective_scan_host.so"
    done = subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-O2", "-arch=sm_80", f"-I{ROOT}",
                           str(source), "-o", str(library)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"kernels/selective_scan.cuh does not compile for the host:\n{done.stderr}"
    lib = ctypes.CDLL(str(library))
    lib.ss_forward_host.restype = ctypes.c_int
    lib.ss_backward_host.restype = ctypes.c_int
    lib.ss_shared_elements.restype = ctypes.c_int64
    lib.ss_shared_elements.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_bool]
    return lib


def _p(t):
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def make_inputs(batch, dim, length, n_state, groups, *, dtype, bc_dtype=None, has_d=True, has_z=True,
                has_bias=True, seed=0):
    """Inputs in their kernel dtypes (A, D, bias in the accumulation dtype), contiguous."""
    g = torch.Generator().manual_seed(seed)
    acc = F64 if dtype == F64 else torch.float32
    bc_dtype = bc_dtype or dtype

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=F64) * scale + shift

    return dict(
        u=rand(batch, dim, length).to(dtype),
        delta=(0.5 * torch.rand(batch, dim, length, generator=g, dtype=F64) - 0.2).to(dtype),
        A=(-0.5 - torch.rand(dim, n_state, generator=g, dtype=F64)).to(acc),
        B=rand(batch, groups, n_state, length).to(bc_dtype),
        C=rand(batch, groups, n_state, length).to(bc_dtype),
        D=rand(dim).to(acc) if has_d else None,
        z=rand(batch, dim, length).to(dtype) if has_z else None,
        delta_bias=(0.3 * rand(dim)).to(acc) if has_bias else None,
    )


def run_host_scan(lib, inputs, *, softplus, chunk, threads=32, nt=None, tile=8, dout=None, dlast=None):
    """Forward (and backward when dout is given) through the host-compiled block bodies."""
    u, B, A = inputs["u"], inputs["B"], inputs["A"]
    batch, dim, length = u.shape
    n_state, groups = A.shape[1], B.shape[1]
    acc = A.dtype
    nt = nt or fastfuse_cuda_config().threads_per_channel(n_state)
    n_chunks = -(-length // chunk)
    sizes = (ctypes.c_int64 * 6)(batch, dim, length, n_state, groups, chunk)
    config = (ctypes.c_int * 3)(threads, nt, tile)
    codes = (CODES[u.dtype], CODES[B.dtype])
    nan = float("nan")
    out = torch.full(u.shape, nan, dtype=u.dtype)
    last = torch.full((batch, dim, n_state), nan, dtype=acc)
    states = torch.full((batch, dim, n_chunks, n_state), nan, dtype=acc)
    t = inputs
    rc = lib.ss_forward_host(*codes, sizes, config, ctypes.c_bool(softplus), _p(t["u"]), _p(t["delta"]), _p(A), _p(B),
                             _p(t["C"]), _p(t["D"]), _p(t["z"]), _p(t["delta_bias"]), _p(out), _p(last), _p(states))
    assert rc == 0, f"host forward returned {rc}"
    result = dict(out=out, last=last, states=states)
    if dout is None:
        return result
    per_group = dim // groups
    accumulate = -(-per_group // (threads // nt)) > 1
    fill = torch.zeros if accumulate else (lambda *s, dtype: torch.full(s, nan, dtype=dtype))
    grads = dict(
        u=torch.full(u.shape, nan, dtype=u.dtype), delta=torch.full(u.shape, nan, dtype=u.dtype),
        z=torch.full(u.shape, nan, dtype=u.dtype) if t["z"] is not None else None,
        B=fill(batch, groups, n_state, length, dtype=acc), C=fill(batch, groups, n_state, length, dtype=acc),
        A=torch.full((batch, dim, n_state), nan, dtype=acc), D=torch.full((batch, dim), nan, dtype=acc),
        delta_bias=torch.full((batch, dim), nan, dtype=acc))
    rc = lib.ss_backward_host(*codes, sizes, config, ctypes.c_bool(softplus), _p(dout), _p(dlast), _p(t["u"]),
                              _p(t["delta"]), _p(A), _p(B), _p(t["C"]), _p(t["D"]), _p(t["z"]), _p(t["delta_bias"]),
                              _p(states), _p(grads["u"]), _p(grads["delta"]), _p(grads["z"]), _p(grads["B"]),
                              _p(grads["C"]), _p(grads["A"]), _p(grads["D"]), _p(grads["delta_bias"]))
    assert rc == 0, f"host backward returned {rc}"
    grads["A"] = grads["A"].sum(0)
    grads["D"] = grads["D"].sum(0) if t["D"] is not None else None
    grads["delta_bias"] = grads["delta_bias"].sum(0) if t["delta_bias"] is not None else None
    result["grads"] = grads
    return result


def fastfuse_cuda_config():
    import fastfuse.cuda.selective_scan as module
    return module


def reference(inputs, *, softplus, chunk, dout, dlast):
    """float64 oracle on the same (rounded) inputs: out, x_L, chunk start states and all gradients."""
    ref = {k: None if v is None else v.detach().double().clone().requires_grad_(True) for k, v in inputs.items()}
    out, last, states = scan_with_states(ref["u"], ref["delta"], ref["A"], ref["B"], ref["C"], ref["D"], ref["z"],
                                         ref["delta_bias"], softplus, save_every=chunk)
    torch.autograd.backward((out, last), (dout.double(), dlast.double()))
    grads = {k: None if v is None else v.grad for k, v in ref.items()}
    return dict(out=out.detach(), last=last.detach(), states=states.detach(), grads=grads)


def compare(got, want, dtype):
    if dtype == F64:
        check = lambda a, b, name, **_: torch.testing.assert_close(  # noqa: E731
            a.double(), b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    else:
        check = lambda a, b, name, **kw: assert_close(a, b, dtype, name=name, **kw)  # noqa: E731
    check(got["out"], want["out"], "out")
    check(got["last"], want["last"], "x_L", atol_scale=2)
    check(got["states"], want["states"], "chunk states", atol_scale=2)
    if "grads" not in got:
        return
    for name, ref_grad in want["grads"].items():
        if ref_grad is None:
            assert got["grads"][name] is None, name
            continue
        check(got["grads"][name], ref_grad, f"d{name}", rtol_scale=5, atol_scale=10)


def check_case(lib, *, batch=2, dim=4, length=23, n_state=4, groups=1, dtype=torch.float32, bc_dtype=None,
               softplus=True, chunk=5, threads=32, nt=None, tile=4, has_d=True, has_z=True, has_bias=True, seed=0):
    inputs = make_inputs(batch, dim, length, n_state, groups, dtype=dtype, bc_dtype=bc_dtype, has_d=has_d,
                         has_z=has_z, has_bias=has_bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    acc = inputs["A"].dtype
    dout = torch.randn(batch, dim, length, generator=g, dtype=F64).to(dtype)
    dlast = torch.randn(batch, dim, n_state, generator=g, dtype=F64).to(acc)
    got = run_host_scan(lib, inputs, softplus=softplus, chunk=chunk, threads=threads, nt=nt, tile=tile, dout=dout,
                        dlast=dlast)
    want = reference(inputs, softplus=softplus, chunk=chunk, dout=dout, dlast=dlast)
    assert got["out"].dtype == dtype and got["grads"]["u"].dtype == dtype
    compare(got, want, dtype)


# --- the host-compiled block bodies against the float64 reference ------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_host_dtypes(host_scan, dtype):
    # Chunk 5 with tiles of 4: forward tiles straddle chunk boundaries, backward tiles restart at each.
    check_case(host_scan, dtype=dtype, groups=2, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_host_fp32_B_C_with_half_inputs(host_scan, dtype):
    check_case(host_scan, dtype=dtype, bc_dtype=torch.float32, seed=2)


@pytest.mark.parametrize("groups,n_state,nt", [(1, 1, None), (2, 1, None), (1, 4, None), (2, 4, 1), (1, 5, 2),
                                               (2, 3, 4), (1, 16, None), (1, 16, 2)])
def test_host_groups_states_and_lanes(host_scan, groups, n_state, nt):
    # nt lanes per channel, k = ceil(N / nt) states each: ragged last register (N=5, nt=2), idle
    # lanes (N=3, nt=4), k up to 8 (N=16, nt=2), butterflies over 1..8 lanes, channel sums over
    # 32/nt channels per warp.
    check_case(host_scan, dim=4, n_state=n_state, groups=groups, nt=nt, length=19, chunk=7, tile=8, seed=3 + n_state)


@pytest.mark.parametrize("has_d,has_z,has_bias,softplus", [(False, False, False, False), (True, False, False, True),
                                                           (False, True, False, False), (False, False, True, True),
                                                           (True, True, True, False)])
def test_host_optional_inputs(host_scan, has_d, has_z, has_bias, softplus):
    check_case(host_scan, has_d=has_d, has_z=has_z, has_bias=has_bias, softplus=softplus, length=13, chunk=4,
               seed=4)


@pytest.mark.parametrize("length,chunk,tile", [(1, 64, 32), (1, 1, 1), (64, 64, 32), (65, 64, 32), (30, 3, 8),
                                               (17, 17, 16)])
def test_host_lengths_and_chunks(host_scan, length, chunk, tile):
    check_case(host_scan, batch=1, dim=2, length=length, chunk=chunk, tile=tile, seed=5 + length)


def test_host_group_spanning_blocks(host_scan):
    # 40 channels in one group with 32 per block: two blocks add into dB/dC (atomics), the second
    # block has only 8 live channels.
    check_case(host_scan, batch=1, dim=40, n_state=2, groups=1, length=9, chunk=4, tile=4, seed=6)


def test_host_full_block_and_large_state(host_scan):
    # The GPU's 128-thread block; and N=256 (32 lanes × 8 registers, the largest configuration).
    check_case(host_scan, batch=1, dim=6, n_state=8, groups=2, length=11, chunk=4, threads=128, tile=4, seed=7)
    check_case(host_scan, batch=1, dim=1, n_state=256, groups=1, length=6, chunk=4, threads=32, tile=2, seed=8)


def test_host_softplus_threshold_and_extremes(host_scan):
    # delta + bias straddling 20 (softplus is the identity above), large dt·|A| (a → 0: x_{t-1} must
    # come from the saved states, never be divided back out), NaN-free everywhere.
    inputs = make_inputs(1, 3, 12, 4, 1, dtype=torch.float32, seed=9)
    inputs["delta"] = torch.tensor([[19.5, 20.5, -30.0, 0.0] * 3] * 3, dtype=torch.float32)[None]
    inputs["A"] = inputs["A"] * 8
    g = torch.Generator().manual_seed(10)
    dout = torch.randn(1, 3, 12, generator=g, dtype=F64).float()
    dlast = torch.randn(1, 3, 4, generator=g, dtype=F64).float()
    got = run_host_scan(host_scan, inputs, softplus=True, chunk=5, tile=4, dout=dout, dlast=dlast)
    want = reference(inputs, softplus=True, chunk=5, dout=dout, dlast=dlast)
    for name, grad in got["grads"].items():
        assert torch.isfinite(grad).all(), name
    compare(got, want, torch.float32)


def test_host_rejects_bad_configurations(host_scan):
    inputs = make_inputs(1, 2, 4, 9, 1, dtype=torch.float32)
    for threads, nt, tile in ((32, 1, 4), (32, 3, 4), (48, 2, 4), (32, 2, 0), (32, 2, 33)):
        sizes = (ctypes.c_int64 * 6)(1, 2, 4, 9, 1, 4)
        config = (ctypes.c_int * 3)(threads, nt, tile)
        out = torch.empty(1, 2, 4)
        last, states = torch.empty(1, 2, 9), torch.empty(1, 2, 1, 9)
        rc = host_scan.ss_forward_host(0, 0, sizes, config, ctypes.c_bool(True), _p(inputs["u"]), _p(inputs["delta"]),
                                       _p(inputs["A"]), _p(inputs["B"]), _p(inputs["C"]), None, None, None, _p(out),
                                       _p(last), _p(states))
        assert rc > 0, (threads, nt, tile)  # a ConfigError code, before anything is read


def test_python_config_fits_every_state_count(host_scan):
    """The wrapper's choice is always a configuration the kernels accept, for every N and dtype."""
    cfg = fastfuse_cuda_config()
    for n_state in range(1, 257):
        nt = cfg.threads_per_channel(n_state)
        assert nt & (nt - 1) == 0 and nt <= 32 and -(-n_state // nt) <= 8, n_state
        for acc_bytes in (4, 8):
            for backward in (False, True):
                tile = cfg.tile_length(n_state, nt, 128, acc_bytes, backward)
                elems = host_scan.ss_shared_elements(n_state, 128 // nt, tile, backward)
                assert elems == cfg.shared_elements(n_state, 128 // nt, tile, backward)
                assert 1 <= tile <= 32 and elems * acc_bytes <= 48 * 1024, (n_state, acc_bytes, backward)


# --- the built extension and the backend registration -----------------------------------------

def test_extension_exposes_the_scan():
    if not extension_built():
        pytest.skip("fastfuse._C is not built in this checkout (python setup.py build_ext --inplace)")
    from fastfuse import _C

    assert "selective_scan" in _C.build_info()["families"]
    plan = _C.selective_scan_plan(2, 384, 4096, 16, 4, 64, 4)
    assert plan["threads"] == 128 and plan["max_states_per_thread"] == 8
    assert plan["blocks"] == 2 * 4 * 3 and plan["accumulate_bc"]  # 96 channels per group, 32 per block
    assert plan["scratch_elements"] == plan["blocks"] * 64 * 4 * 128
    # Checked before anything touches the device, so safe on any machine.
    sizes = dict(batch=1, dim=4, length=8, n_state=4, groups=1, chunk=4, threads_per_channel=1, tile=8)
    good = dict(u=8, delta=8, A=8, B=8, C=8, D=0, z=0, delta_bias=0, out=8, last_state=8, chunk_states=8, **sizes,
                dtype=0, bc_dtype=0, delta_softplus=True, stream=0)
    for change, message in [({"dtype": 7}, "dtype code"), ({"dtype": 1, "bc_dtype": 2}, "bc_dtype must equal"),
                            ({"dtype": 3, "bc_dtype": 3}, "float64 is not compiled"),
                            ({"threads_per_channel": 3}, "power of two"), ({"n_state": 300}, "n_state must be"),
                            ({"tile": 33}, "tile must be"), ({"groups": 3}, "groups must"),
                            ({"chunk": 0}, "chunk must"), ({"n_state": 64}, "ceil\\(n_state"),
                            ({"u": 0}, "u must be a device pointer")]:
        with pytest.raises(ValueError, match=message):
            _C.selective_scan_forward(**{**good, **change})
    _C.selective_scan_forward(**{**good, "batch": 0})  # empty: nothing to launch
    with pytest.raises(ValueError, match="shared memory"):
        _C.selective_scan_backward(
            dout=8, dlast_state=8, u=8, delta=8, A=8, B=8, C=8, D=0, z=0, delta_bias=0, chunk_states=8, scratch=8,
            du=8, ddelta=8, dz=0, dB=8, dC=8, dA=8, dD=8, dbias=8, batch=1, dim=4, length=8, n_state=256, groups=1,
            chunk=4, threads_per_channel=32, tile=32, dtype=0, bc_dtype=0, delta_softplus=False, stream=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: a launch would really run")
def test_launch_failure_is_a_python_exception():
    if not extension_built():
        pytest.skip("fastfuse._C is not built in this checkout")
    from fastfuse import _C

    if _C.runtime_status()["device_count"] != 0:
        pytest.skip("the CUDA runtime sees a device")
    with pytest.raises(RuntimeError, match="selective_scan_forward: CUDA kernel launch failed"):
        _C.selective_scan_forward(256, 256, 256, 256, 256, 0, 0, 0, 256, 256, 256, 1, 4, 8, 4, 1, 4, 1, 8, 0, 0,
                                  True, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU behaviour")
def test_cuda_backend_says_why_it_is_unavailable():
    fastfuse.selective_scan  # registers the op's backends
    assert "cuda" in backends.implementations("selective_scan")
    reason = backends.unavailable_reason("selective_scan", "cuda", torch.device("cpu"))
    assert reason is not None and "needs CUDA tensors" in reason
    t = make_inputs(1, 2, 3, 2, 1, dtype=torch.float32)
    with pytest.raises(backends.BackendUnavailableError, match="backend 'cuda' is unavailable"):
        fastfuse.selective_scan(t["u"], t["delta"], t["A"], t["B"][:, 0], t["C"][:, 0], backend="cuda")
    from fastfuse.cuda import selective_scan as cuda_scan

    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], None, None, None, True, 64)
    if extension_built():
        with pytest.raises(ValueError, match="must be a CUDA tensor"):
            cuda_scan.selective_scan_forward(*args)
        # float64 is refused by name (after the device check, so only on a GPU does it get there).
        with pytest.raises(TypeError, match="u must be float32, float16 or bfloat16"):
            cuda_scan._check("selective_scan_forward", *(t.double() for t in args[:5]), None, None, None, 64)
    else:
        with pytest.raises(backends.BackendUnavailableError, match="not built"):
            cuda_scan.selective_scan_forward(*args)


def test_auto_still_prefers_triton():
    fastfuse.selective_scan
    from fastfuse.backends import _PREFERENCE

    order = _PREFERENCE["selective_scan"]
    assert order.index("triton") < order.index("cuda")


# --- on a GPU: the real kernels at mamba-ssm's test grid -----------------------------------------

def _gpu_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    return backends.unavailable_reason("selective_scan", "cuda", torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length", [128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("groups", [1, 2])
def test_gpu_cuda_scan_against_reference(dtype, length, groups):
    # mamba-ssm's tests/ops/test_selective_scan.py grid: batch 2, dim 4, dstate 8, groups 1 and 2.
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    from fastfuse.cuda import selective_scan as cuda_scan

    inputs = make_inputs(2, 4, length, 8, groups, dtype=dtype, seed=length + groups)
    g = torch.Generator().manual_seed(11)
    dout = torch.randn(2, 4, length, generator=g, dtype=F64).to(dtype)
    dlast = torch.randn(2, 4, 8, generator=g, dtype=F64).float()
    want = reference(inputs, softplus=True, chunk=64, dout=dout, dlast=dlast)
    dev = {k: None if v is None else v.cuda() for k, v in inputs.items()}
    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    out, last, states = cuda_scan.selective_scan_forward(*(dev[k] for k in order), True, 64)
    grads = cuda_scan.selective_scan_backward(dout.cuda(), dlast.cuda(), *(dev[k] for k in order), True, 64, states)
    got = dict(out=out.cpu(), last=last.cpu(), states=states.cpu(),
               grads={k: None if v is None else v.cpu() for k, v in zip(order, grads)})
    compare(got, want, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_public_op_real_shape(dtype):
    # VMamba's grouped scan (4 directions × 96 channels, d_state 16, 32×32 pixels) and d_state 1,
    # through the public op (autograd, a non-contiguous u copied by the wrapper). L = 1024 keeps
    # the float64 autograd reference within a few GB of GPU memory.
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    for n_state in (16, 1):
        inputs = make_inputs(2, 384, 1024, n_state, 4, dtype=dtype, seed=n_state)
        dev = {k: None if v is None else v.cuda().requires_grad_(True) for k, v in inputs.items()}
        dev_args = {**dev, "u": dev["u"].transpose(1, 2).contiguous().transpose(1, 2)}
        out, last = fastfuse.selective_scan(**dev_args, delta_softplus=True, return_last_state=True, backend="cuda")
        ref = {k: None if v is None else v.detach().cuda().double().requires_grad_(True) for k, v in inputs.items()}
        ref_out, ref_last = fastfuse.selective_scan(**ref, delta_softplus=True, return_last_state=True,
                                                    backend="torch")
        assert_close(out, ref_out, dtype, name="out")
        assert_close(last, ref_last, torch.float32, atol_scale=2, name="x_L")
        g = torch.Generator(device="cuda").manual_seed(3)
        dout = torch.randn(out.shape, generator=g, device="cuda").to(dtype)
        torch.autograd.backward((out, last), (dout, torch.zeros_like(last)))
        torch.autograd.backward((ref_out, ref_last), (dout.double(), torch.zeros_like(ref_last)))
        for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
            assert_close(dev[name].grad, ref[name].grad, dtype, rtol_scale=5, atol_scale=10, name=f"d{name}")
