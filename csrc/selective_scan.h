// Launchers of the selective scan kernels (kernels/selective_scan.cuh). Every tensor is
// contiguous: u, delta, z, dout, out, du, ddelta, dz (batch, dim, length) in `dtype` (float32,
// float16 or bfloat16; float64 is not compiled in); B, C (batch, groups, n_state, length) in
// `bc_dtype` (`dtype` or float32); A (dim, n_state), D and delta_bias (dim,), states, dB, dC and
// the dA/dD/dbias per-batch partials in float32. D, z and delta_bias are absent when their
// pointer is 0. Pointers are device addresses, `stream` a cudaStream_t, both as integers.
// `threads_per_channel` (a power of two <= 32, with ceil(n_state / it) <= 8) and `tile` (time
// steps per shared-memory tile) are the launch configuration the Python wrapper chose. They
// return once the kernel is queued and throw (std::invalid_argument / std::runtime_error) on bad
// arguments or a failed launch.
#pragma once

#include <cstdint>

namespace fastfuse {

void selective_scan_forward(std::uintptr_t u, std::uintptr_t delta, std::uintptr_t A, std::uintptr_t B,
                            std::uintptr_t C, std::uintptr_t D, std::uintptr_t z, std::uintptr_t delta_bias,
                            std::uintptr_t out, std::uintptr_t last_state, std::uintptr_t chunk_states,
                            std::int64_t batch, std::int64_t dim, std::int64_t length, std::int64_t n_state,
                            std::int64_t groups, std::int64_t chunk, int threads_per_channel, int tile, int dtype,
                            int bc_dtype, bool delta_softplus, std::uintptr_t stream);

// `scratch` holds blocks × min(chunk, length) × ceil(n_state / threads_per_channel) × threads
// accumulation-type elements (see selective_scan_scratch_elements); dB and dC must be zeroed
// first when `accumulate_bc` (a group spans several blocks).
void selective_scan_backward(std::uintptr_t dout, std::uintptr_t dlast_state, std::uintptr_t u,
                             std::uintptr_t delta, std::uintptr_t A, std::uintptr_t B, std::uintptr_t C,
                             std::uintptr_t D, std::uintptr_t z, std::uintptr_t delta_bias,
                             std::uintptr_t chunk_states, std::uintptr_t scratch, std::uintptr_t du,
                             std::uintptr_t ddelta, std::uintptr_t dz, std::uintptr_t dB, std::uintptr_t dC,
                             std::uintptr_t dA, std::uintptr_t dD, std::uintptr_t dbias, std::int64_t batch,
                             std::int64_t dim, std::int64_t length, std::int64_t n_state, std::int64_t groups,
                             std::int64_t chunk, int threads_per_channel, int tile, int dtype, int bc_dtype,
                             bool delta_softplus, std::uintptr_t stream);

// What the Python wrapper needs to choose a configuration and size its buffers.
struct SelectiveScanPlan {
  int threads;                 // per block
  int max_states_per_thread;
  int max_tile;
  int max_shared_bytes;
  std::int64_t blocks;         // grid size for these sizes
  std::int64_t scratch_elements;
  bool accumulate_bc;          // several blocks per group: dB/dC need zeroed buffers
};

SelectiveScanPlan selective_scan_plan(std::int64_t batch, std::int64_t dim, std::int64_t length,
                                      std::int64_t n_state, std::int64_t groups, std::int64_t chunk,
                                      int threads_per_channel);

}  // namespace fastfuse
