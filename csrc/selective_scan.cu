// Launchers for kernels/selective_scan.cuh: argument checks, the (input, B/C) dtype dispatch,
// shared-memory sizing, launch error check.
#include <string>
#include <utility>

#include "fastfuse_ext.h"
#include "kernels/selective_scan.cuh"
#include "selective_scan.h"

namespace fastfuse {
namespace {

namespace ss = selective_scan;

constexpr std::int64_t kMaxGridX = 2147483647;

std::string config_message(int code) {
  switch (code) {
    case ss::kBadThreads: return "the block size must be a multiple of 32";
    case ss::kBadLanes: return "threads_per_channel must be a power of two between 1 and 32";
    case ss::kTooManyStates:
      return "ceil(n_state / threads_per_channel) must be between 1 and " + std::to_string(ss::kMaxStatesPerThread);
    case ss::kBadTile: return "tile must be between 1 and " + std::to_string(ss::kMaxTile);
    case ss::kBadChunk: return "chunk must be >= 1";
    case ss::kBadGroups: return "groups must be >= 1 and divide dim";
    default: return "bad configuration";
  }
}

// Checks the sizes and configuration; returns false when there is nothing to compute.
bool check_call(const char* fn, const ss::Geometry& g, int dtype, int bc_dtype, std::size_t acc_bytes,
                bool backward) {
  dtype_from_code(dtype, fn);
  dtype_from_code(bc_dtype, fn);
  // float64 (the gradcheck path, which "auto" keeps in the torch reference) is not compiled in:
  // five dtype pairs instead of six keep the 4-arch build shorter. The header supports it and
  // the host tests run it.
  require(dtype != static_cast<int>(DType::Float64), fn,
          "float64 is not compiled into the CUDA selective scan; use float32, float16 or bfloat16");
  require(bc_dtype == dtype || bc_dtype == 0, fn,
          "bc_dtype must equal dtype, or be 0 (float32) for float16/bfloat16 inputs; got " + std::to_string(bc_dtype) +
              " for dtype " + std::to_string(dtype));
  require(g.batch >= 0 && g.dim >= 0 && g.length >= 0, fn, "batch, dim and length must be >= 0");
  require(g.n_state >= 1 && g.n_state <= 256, fn,
          "n_state must be between 1 and 256, got " + std::to_string(g.n_state));
  const int code = ss::check_geometry(g);
  require(code == ss::kConfigOk, fn, config_message(code) + " (threads_per_channel " + std::to_string(g.nt) +
                                         ", n_state " + std::to_string(g.n_state) + ", tile " + std::to_string(g.tile) +
                                         ", chunk " + std::to_string(g.chunk) + ", groups " + std::to_string(g.groups) +
                                         ", dim " + std::to_string(g.dim) + ")");
  const std::int64_t bytes = ss::shared_elements(g.n_state, g.channels_per_block, g.tile, backward) *
                             static_cast<std::int64_t>(acc_bytes);
  require(bytes <= ss::kMaxSharedBytes, fn,
          "tile " + std::to_string(g.tile) + " needs " + std::to_string(bytes) + " bytes of shared memory, over " +
              std::to_string(ss::kMaxSharedBytes) + "; use a smaller tile");
  if (g.batch == 0 || g.dim == 0 || g.length == 0) return false;
  require(g.blocks() <= kMaxGridX, fn, "too many thread blocks for one launch: " + std::to_string(g.blocks()));
  return true;
}

ss::Geometry geometry(std::int64_t batch, std::int64_t dim, std::int64_t length, std::int64_t n_state,
                      std::int64_t groups, std::int64_t chunk, int nt, int tile, bool has_d, bool has_z, bool has_bias,
                      bool softplus) {
  return ss::make_geometry(batch, dim, length, n_state, groups, chunk, ss::kThreads, nt, tile, has_d, has_z, has_bias,
                           softplus);
}

template <typename P> P* as(std::uintptr_t p) { return reinterpret_cast<P*>(p); }

template <typename T, typename TW>
void launch_forward(const ss::Geometry& g, std::uintptr_t u, std::uintptr_t delta, std::uintptr_t A,
                    std::uintptr_t B, std::uintptr_t C, std::uintptr_t D, std::uintptr_t z, std::uintptr_t bias,
                    std::uintptr_t out, std::uintptr_t last, std::uintptr_t states, cudaStream_t stream) {
  using Acc = acc_t<T>;
  ss::ForwardArgs<T, TW> args;
  args.u = as<const T>(u);
  args.delta = as<const T>(delta);
  args.z = as<const T>(z);
  args.B = as<const TW>(B);
  args.C = as<const TW>(C);
  args.A = as<const Acc>(A);
  args.D = as<const Acc>(D);
  args.bias = as<const Acc>(bias);
  args.out = as<T>(out);
  args.last_state = as<Acc>(last);
  args.chunk_states = as<Acc>(states);
  const std::size_t smem = ss::shared_elements(g.n_state, g.channels_per_block, g.tile, false) * sizeof(Acc);
  ss::forward_kernel<T, TW><<<static_cast<unsigned>(g.blocks()), ss::kThreads, smem, stream>>>(args, g);
}

template <typename T, typename TW>
void launch_backward(const ss::Geometry& g, bool accumulate_bc, std::uintptr_t dout, std::uintptr_t dlast,
                     std::uintptr_t u, std::uintptr_t delta, std::uintptr_t A, std::uintptr_t B, std::uintptr_t C,
                     std::uintptr_t D, std::uintptr_t z, std::uintptr_t bias, std::uintptr_t states,
                     std::uintptr_t scratch, std::uintptr_t du, std::uintptr_t ddelta, std::uintptr_t dz,
                     std::uintptr_t dB, std::uintptr_t dC, std::uintptr_t dA, std::uintptr_t dD, std::uintptr_t dbias,
                     cudaStream_t stream) {
  using Acc = acc_t<T>;
  ss::BackwardArgs<T, TW> args;
  args.dout = as<const T>(dout);
  args.u = as<const T>(u);
  args.delta = as<const T>(delta);
  args.z = as<const T>(z);
  args.B = as<const TW>(B);
  args.C = as<const TW>(C);
  args.A = as<const Acc>(A);
  args.D = as<const Acc>(D);
  args.bias = as<const Acc>(bias);
  args.dlast = as<const Acc>(dlast);
  args.chunk_states = as<const Acc>(states);
  args.scratch = as<Acc>(scratch);
  args.du = as<T>(du);
  args.ddelta = as<T>(ddelta);
  args.dz = as<T>(dz);
  args.dB = as<Acc>(dB);
  args.dC = as<Acc>(dC);
  args.dA = as<Acc>(dA);
  args.dD = as<Acc>(dD);
  args.dbias = as<Acc>(dbias);
  args.accumulate_bc = accumulate_bc;
  const std::size_t smem = ss::shared_elements(g.n_state, g.channels_per_block, g.tile, true) * sizeof(Acc);
  ss::backward_kernel<T, TW><<<static_cast<unsigned>(g.blocks()), ss::kThreads, smem, stream>>>(args, g);
}

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>, Tag<TW>) for the (input dtype, B/C dtype) pair: five instantiations. check_call
// has already rejected every other pair (and float64).
template <typename F>
void dispatch(int dtype, int bc_dtype, F&& f) {
  const bool bc_fp32 = bc_dtype == 0;
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: f(Tag<float>{}, Tag<float>{}); break;
    case DType::Float16:
      if (bc_fp32) f(Tag<__half>{}, Tag<float>{}); else f(Tag<__half>{}, Tag<__half>{});
      break;
    case DType::BFloat16:
      if (bc_fp32) f(Tag<__nv_bfloat16>{}, Tag<float>{}); else f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
      break;
    case DType::Float64: break;
  }
}

std::size_t acc_bytes(int) { return sizeof(float); }

}  // namespace

void selective_scan_forward(std::uintptr_t u, std::uintptr_t delta, std::uintptr_t A, std::uintptr_t B,
                            std::uintptr_t C, std::uintptr_t D, std::uintptr_t z, std::uintptr_t delta_bias,
                            std::uintptr_t out, std::uintptr_t last_state, std::uintptr_t chunk_states,
                            std::int64_t batch, std::int64_t dim, std::int64_t length, std::int64_t n_state,
                            std::int64_t groups, std::int64_t chunk, int threads_per_channel, int tile, int dtype,
                            int bc_dtype, bool delta_softplus, std::uintptr_t stream) {
  constexpr const char* fn = "selective_scan_forward";
  const ss::Geometry g = geometry(batch, dim, length, n_state, groups, chunk, threads_per_channel, tile, D != 0, z != 0,
                                  delta_bias != 0, delta_softplus);
  if (!check_call(fn, g, dtype, bc_dtype, acc_bytes(dtype), false)) return;
  const std::pair<std::uintptr_t, const char*> needed[] = {
      {u, "u"}, {delta, "delta"}, {A, "A"}, {B, "B"}, {C, "C"}, {out, "out"}, {last_state, "last_state"},
      {chunk_states, "chunk_states"}};
  for (const auto& [ptr, name] : needed) require_pointer(ptr, fn, name);
  const cudaStream_t s = as_stream(stream);
  dispatch(dtype, bc_dtype, [&](auto t, auto tw) {
    using T = typename decltype(t)::type;
    using TW = typename decltype(tw)::type;
    launch_forward<T, TW>(g, u, delta, A, B, C, D, z, delta_bias, out, last_state, chunk_states, s);
  });
  check_launch(fn);
}

void selective_scan_backward(std::uintptr_t dout, std::uintptr_t dlast_state, std::uintptr_t u,
                             std::uintptr_t delta, std::uintptr_t A, std::uintptr_t B, std::uintptr_t C,
                             std::uintptr_t D, std::uintptr_t z, std::uintptr_t delta_bias,
                             std::uintptr_t chunk_states, std::uintptr_t scratch, std::uintptr_t du,
                             std::uintptr_t ddelta, std::uintptr_t dz, std::uintptr_t dB, std::uintptr_t dC,
                             std::uintptr_t dA, std::uintptr_t dD, std::uintptr_t dbias, std::int64_t batch,
                             std::int64_t dim, std::int64_t length, std::int64_t n_state, std::int64_t groups,
                             std::int64_t chunk, int threads_per_channel, int tile, int dtype, int bc_dtype,
                             bool delta_softplus, std::uintptr_t stream) {
  constexpr const char* fn = "selective_scan_backward";
  const ss::Geometry g = geometry(batch, dim, length, n_state, groups, chunk, threads_per_channel, tile, D != 0, z != 0,
                                  delta_bias != 0, delta_softplus);
  if (!check_call(fn, g, dtype, bc_dtype, acc_bytes(dtype), true)) return;
  const std::pair<std::uintptr_t, const char*> needed[] = {
      {dout, "dout"}, {dlast_state, "dlast_state"}, {u, "u"}, {delta, "delta"}, {A, "A"}, {B, "B"}, {C, "C"},
      {chunk_states, "chunk_states"}, {scratch, "scratch"}, {du, "du"}, {ddelta, "ddelta"}, {dB, "dB"}, {dC, "dC"},
      {dA, "dA"}, {dD, "dD"}, {dbias, "dbias"}};
  for (const auto& [ptr, name] : needed) require_pointer(ptr, fn, name);
  require(z == 0 || dz != 0, fn, "dz must be a device pointer when z is given, got 0");
  const bool accumulate_bc = g.blocks_per_group > 1;
  const cudaStream_t s = as_stream(stream);
  dispatch(dtype, bc_dtype, [&](auto t, auto tw) {
    using T = typename decltype(t)::type;
    using TW = typename decltype(tw)::type;
    launch_backward<T, TW>(g, accumulate_bc, dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states,
                           scratch, du, ddelta, dz, dB, dC, dA, dD, dbias, s);
  });
  check_launch(fn);
}

SelectiveScanPlan selective_scan_plan(std::int64_t batch, std::int64_t dim, std::int64_t length,
                                      std::int64_t n_state, std::int64_t groups, std::int64_t chunk,
                                      int threads_per_channel) {
  constexpr const char* fn = "selective_scan_plan";
  const ss::Geometry g =
      geometry(batch, dim, length, n_state, groups, chunk, threads_per_channel, 1, false, false, false, false);
  require(batch >= 0 && dim >= 0 && length >= 0 && n_state >= 1, fn, "sizes must be >= 0 and n_state >= 1");
  const int code = ss::check_geometry(g);
  require(code == ss::kConfigOk, fn, config_message(code));
  SelectiveScanPlan p;
  p.threads = ss::kThreads;
  p.max_states_per_thread = ss::kMaxStatesPerThread;
  p.max_tile = ss::kMaxTile;
  p.max_shared_bytes = ss::kMaxSharedBytes;
  p.blocks = g.blocks();
  p.scratch_elements = g.blocks() * g.chunk_rows * g.k * g.threads;
  p.accumulate_bc = g.blocks_per_group > 1;
  return p;
}

}  // namespace fastfuse
