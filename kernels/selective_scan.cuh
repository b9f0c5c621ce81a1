// Selective scan (Mamba's S6 recurrence), forward and backward: header-only CUDA templates.
//
//   dt = softplus(delta + bias) (identity above 20), x_t = exp(dt·A) ⊙ x_{t-1} + dt·u_t·B_t,
//   y_t = C_t·x_t, out = (y + D·u) · silu(z)          (semantics: fastfuse/reference/selective_scan.py)
//
// Work layout. One thread block per (batch, group, block of channels of that group), so every
// channel of a block reads the same B_t and C_t. Inside a block, `nt` consecutive threads (a power
// of two, within one warp) own one channel, each holding k = ceil(N / nt) <= 8 of its states in
// fp32 registers (states n = lane + j·nt); the block covers threads / nt channels. Time runs
// sequentially; sums over the states of a channel (y_t, and in the backward C·x, h·B, h·a·x·A)
// are xor-butterflies over the nt lanes, so every lane ends with the same bits.
//
// Memory. Inputs are contiguous (the Python wrapper makes them so): u, delta, z, dout, out, du,
// ddelta, dz (batch, D, L); B, C, dB, dC (batch, G, N, L); A (D, N) and D, bias (D,) in the
// accumulation type. A tile of `tile` time steps of every per-channel input and of B and C is
// staged through shared memory by the whole block (consecutive threads read consecutive time
// steps of a row, instead of one strided element per channel per step), and outputs leave the
// same way. Offsets are 64-bit throughout.
//
// Forward saves the state at the start of every `chunk` steps, (batch, D, n_chunks, N). Backward
// walks the chunks last to first: it re-runs a chunk from its saved start state, writing every
// x_{t-1} of the chunk to a global scratch that only the writing thread reads back (coalesced:
// [block][step][j][thread]), then runs the adjoint recurrence backwards through the chunk:
//
//   h_t = g + dy_t·C_t   (g = a_{t+1} ⊙ h_{t+1}; the gradient of x_L at the end)
//   du = dt·Σ_n h B + D·dy,   ddt = u·Σ_n h B + Σ_n h a x_{t-1} A,   dA += h a x_{t-1} dt,
//   dB_t = Σ_d h dt u,   dC_t = Σ_d dy x_t.
//
// dB/dC are summed over the channels of a warp by shuffles, over the warps of the block by shared
// atomics, and over blocks (only when a group spans several blocks) by global fp32 atomics. dA,
// dD and dbias are per-batch partials written once per thread (summed over the batch in Python:
// deterministic).
//
// Host testing. Everything, the block bodies included, is __host__ __device__ and written against
// a `Team` (the block's threads: tid, barrier, xor-shuffle, atomics). DeviceTeam maps it to CUDA
// intrinsics; tests/test_selective_scan_cuda.py runs the very same block bodies on the host with
// one fiber per thread, a barrier being "every fiber has reached it".
#pragma once

#include <cstdint>

#include "kernels/common.cuh"

namespace fastfuse {
namespace selective_scan {

constexpr int kThreads = 128;            // threads per block on the GPU
constexpr int kMaxStatesPerThread = 8;   // k: states held in registers by one thread
constexpr int kMaxTile = 32;             // time steps staged per tile
constexpr int kMaxSharedBytes = 48 * 1024;  // the default per-block limit: no opt-in needed
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;
constexpr double kSoftplusThreshold = 20.0;  // softplus is the identity above this (mamba-ssm)

FASTFUSE_HD float exp2_acc(float v) { return exp2f(v); }
FASTFUSE_HD double exp2_acc(double v) { return exp2(v); }
FASTFUSE_HD float exp_acc(float v) { return expf(v); }
FASTFUSE_HD double exp_acc(double v) { return exp(v); }
FASTFUSE_HD float log1p_acc(float v) { return log1pf(v); }
FASTFUSE_HD double log1p_acc(double v) { return log1p(v); }

// Sizes and options of one call, identical for every block.
struct Geometry {
  int64_t batch, dim, length, n_state, groups, per_group, chunk, n_chunks;
  int threads;             // block size: a multiple of 32
  int nt;                  // threads per channel: a power of two <= 32
  int k;                   // states per thread: ceil(N / nt) <= kMaxStatesPerThread
  int channels_per_block;  // threads / nt
  int64_t blocks_per_group;
  int tile;                // time steps per shared-memory tile
  int64_t chunk_rows;      // scratch steps per block: min(chunk, L)
  bool has_d, has_z, has_bias, softplus;

  FASTFUSE_HD int64_t blocks() const { return batch * groups * blocks_per_group; }
};

// 0 if the launch configuration is usable, else a code for the launcher's message.
enum ConfigError { kConfigOk = 0, kBadThreads, kBadLanes, kTooManyStates, kBadTile, kBadChunk, kBadGroups };

FASTFUSE_HD Geometry make_geometry(int64_t batch, int64_t dim, int64_t length, int64_t n_state, int64_t groups,
                                   int64_t chunk, int threads, int nt, int tile, bool has_d, bool has_z,
                                   bool has_bias, bool softplus) {
  Geometry g;
  g.batch = batch;
  g.dim = dim;
  g.length = length;
  g.n_state = n_state;
  g.groups = groups;
  g.per_group = groups > 0 ? dim / groups : 0;
  g.chunk = chunk;
  g.n_chunks = chunk > 0 ? (length + chunk - 1) / chunk : 0;
  g.threads = threads;
  g.nt = nt;
  g.k = nt > 0 ? static_cast<int>((n_state + nt - 1) / nt) : 0;
  g.channels_per_block = nt > 0 ? threads / nt : 0;
  g.blocks_per_group = g.channels_per_block > 0 ? (g.per_group + g.channels_per_block - 1) / g.channels_per_block : 0;
  g.tile = tile;
  g.chunk_rows = chunk < length ? chunk : length;
  g.has_d = has_d;
  g.has_z = has_z;
  g.has_bias = has_bias;
  g.softplus = softplus;
  return g;
}

// Shared memory of one block, in accumulation-type elements: B and C tiles (N × tile each) and
// four per-channel tiles (u, delta, z, out/dout); the backward adds du, ddelta, dz and dB, dC.
FASTFUSE_HD int64_t shared_elements(int64_t n_state, int channels_per_block, int tile, bool backward) {
  return static_cast<int64_t>(tile) * (backward ? 4 * n_state + 7 * channels_per_block
                                                : 2 * n_state + 4 * channels_per_block);
}

FASTFUSE_HD int check_geometry(const Geometry& g) {
  if (g.threads < 32 || g.threads % 32 != 0 || g.threads > 1024) return kBadThreads;
  if (g.nt < 1 || g.nt > 32 || (g.nt & (g.nt - 1)) != 0) return kBadLanes;
  if (g.k < 1 || g.k > kMaxStatesPerThread) return kTooManyStates;
  if (g.tile < 1 || g.tile > kMaxTile) return kBadTile;
  if (g.chunk < 1) return kBadChunk;
  if (g.groups < 1 || g.dim % g.groups != 0) return kBadGroups;
  return kConfigOk;
}

// The block's threads, on the GPU.
struct DeviceTeam {
  FASTFUSE_HD int tid() const {
#ifdef __CUDA_ARCH__
    return static_cast<int>(threadIdx.x);
#else
    return 0;
#endif
  }
  FASTFUSE_HD void sync() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
  template <typename V> FASTFUSE_HD V shfl_xor(V v, int mask) const {
#ifdef __CUDA_ARCH__
    return __shfl_xor_sync(0xffffffffu, v, mask);
#else
    return v;
#endif
  }
  template <typename V> FASTFUSE_HD void shared_add(V* p, V v) const {
#ifdef __CUDA_ARCH__
    atomicAdd(p, v);
#else
    *p += v;
#endif
  }
  template <typename V> FASTFUSE_HD void global_add(V* p, V v) const { shared_add(p, v); }
};

// Sum over the nt lanes of one channel (lanes tid ^ m for m < nt); every lane gets the sum.
template <typename A, typename Team>
FASTFUSE_HD A sum_over_lanes(const Team& team, A v, int nt) {
  for (int m = nt >> 1; m > 0; m >>= 1) v += team.shfl_xor(v, m);
  return v;
}

// Sum over the channels of one warp that hold the same state (lanes tid ^ m for nt <= m < 32).
template <typename A, typename Team>
FASTFUSE_HD A sum_over_warp_channels(const Team& team, A v, int nt) {
  for (int m = nt; m < 32; m <<= 1) v += team.shfl_xor(v, m);
  return v;
}

// Where a block works: its batch, group and channels.
struct BlockPlace {
  int64_t batch, group;
  int64_t first_channel;  // global channel index of the block's local channel 0
  int channels;           // how many of its channels exist (the last block of a group may be short)
};

FASTFUSE_HD BlockPlace place_block(const Geometry& g, int64_t block) {
  BlockPlace p;
  const int64_t dblock = block % g.blocks_per_group;
  p.group = (block / g.blocks_per_group) % g.groups;
  p.batch = block / (g.blocks_per_group * g.groups);
  const int64_t first_in_group = dblock * g.channels_per_block;
  p.first_channel = p.group * g.per_group + first_in_group;
  const int64_t left = g.per_group - first_in_group;
  p.channels = static_cast<int>(left < g.channels_per_block ? left : g.channels_per_block);
  return p;
}

// The shared-memory tiles; per-channel tiles are [channel][step], B/C tiles [state][step].
template <typename A>
struct Tiles {
  A *B, *C, *u, *dt, *z, *y;  // y: forward output, or the incoming gradient in the backward
  A *du, *ddelta, *dz, *dB, *dC;
};

template <typename A>
FASTFUSE_HD Tiles<A> carve_tiles(A* smem, const Geometry& g, bool backward) {
  const int64_t bc = g.n_state * g.tile, ch = static_cast<int64_t>(g.channels_per_block) * g.tile;
  Tiles<A> t;
  t.B = smem;
  t.C = t.B + bc;
  t.u = t.C + bc;
  t.dt = t.u + ch;
  t.z = t.dt + ch;
  t.y = t.z + ch;
  t.du = t.ddelta = t.dz = t.dB = t.dC = nullptr;
  if (backward) {
    t.du = t.y + ch;
    t.ddelta = t.du + ch;
    t.dz = t.ddelta + ch;
    t.dB = t.dz + ch;
    t.dC = t.dB + bc;
  }
  return t;
}

// Rows [row0, row0 + rows) × steps [t0, t0 + steps) of a contiguous (..., L) tensor into
// dst[r * tile + s]; rows past `valid_rows`, steps past `steps` and an absent tensor read 0.
template <typename T, typename A, typename Team>
FASTFUSE_HD void load_tile(const Team& team, const T* src, int64_t row0, int rows, int valid_rows, int64_t length,
                           int64_t t0, int steps, int tile, int threads, A* dst) {
  for (int i = team.tid(); i < rows * tile; i += threads) {
    const int r = i / tile, s = i % tile;
    dst[i] = (src != nullptr && r < valid_rows && s < steps) ? A(to_acc(src[(row0 + r) * length + t0 + s])) : A(0);
  }
}

// The inverse: dst[(row0 + r) * L + t0 + s] = src[r * tile + s] for the valid rows and steps,
// converted to T.
template <typename T, typename A, typename Team>
FASTFUSE_HD void store_tile(const Team& team, const A* src, T* dst, int64_t row0, int rows, int valid_rows,
                            int64_t length, int64_t t0, int steps, int tile, int threads) {
  for (int i = team.tid(); i < rows * tile; i += threads) {
    const int r = i / tile, s = i % tile;
    if (r < valid_rows && s < steps) dst[(row0 + r) * length + t0 + s] = from_acc<T>(src[i]);
  }
}

// dB/dC tiles: stored when this block is the only one of its group, else added with atomics.
template <typename A, typename Team>
FASTFUSE_HD void store_or_add_tile(const Team& team, const A* src, A* dst, int64_t row0, int rows, int64_t length,
                                   int64_t t0, int steps, int tile, int threads, bool accumulate) {
  for (int i = team.tid(); i < rows * tile; i += threads) {
    const int r = i / tile, s = i % tile;
    if (s >= steps) continue;
    A* q = dst + (row0 + r) * length + t0 + s;
    if (accumulate) {
      team.global_add(q, src[i]);
    } else {
      *q = src[i];
    }
  }
}

template <typename A, typename Team>
FASTFUSE_HD void zero_tile(const Team& team, A* dst, int64_t elements, int threads) {
  for (int64_t i = team.tid(); i < elements; i += threads) dst[i] = A(0);
}

// One thread's registers: its channel's constants and its k states.
template <typename A>
struct ThreadState {
  A A2[kMaxStatesPerThread];     // A · log2(e): exp(dt·A) = exp2(dt·A2)
  A x[kMaxStatesPerThread];      // forward: the running state; backward: x_t of the current step
  A g[kMaxStatesPerThread];      // backward: dL/dx_t from the steps after t (a_{t+1} h_{t+1})
  A dA[kMaxStatesPerThread];     // backward: sum over time of h a x_{t-1} dt
  A x_prev[kMaxStatesPerThread];
  A decay[kMaxStatesPerThread];  // a_t = exp(dt·A)
  A db[kMaxStatesPerThread];     // this channel's share of dB_t, dC_t
  A dc[kMaxStatesPerThread];
  A D, bias, dD, dbias;
};

// Where a thread works inside its block.
struct ThreadPlace {
  int channel;     // local channel index
  int lane;        // index among the nt threads of the channel
  bool valid;      // the channel exists
  int64_t row;     // batch * D + d: the row of the (batch, D, ...) tensors
  int64_t d;
};

FASTFUSE_HD ThreadPlace place_thread(const Geometry& g, const BlockPlace& b, int tid) {
  ThreadPlace p;
  p.channel = tid / g.nt;
  p.lane = tid % g.nt;
  p.valid = p.channel < b.channels;
  p.d = b.first_channel + p.channel;
  p.row = b.batch * g.dim + p.d;
  return p;
}

// State index of register j, or -1 if it holds none (n >= N, or an absent channel).
FASTFUSE_HD int64_t state_of(const Geometry& g, const ThreadPlace& p, int j) {
  const int64_t n = p.lane + static_cast<int64_t>(j) * g.nt;
  return (p.valid && j < g.k && n < g.n_state) ? n : -1;
}

template <typename A>
FASTFUSE_HD void init_thread(ThreadState<A>& ts, const Geometry& g, const ThreadPlace& p, const A* A_mat,
                             const A* D, const A* bias) {
#pragma unroll
  for (int j = 0; j < kMaxStatesPerThread; ++j) {
    const int64_t n = state_of(g, p, j);
    ts.A2[j] = n >= 0 ? A_mat[p.d * g.n_state + n] * A(kLog2e) : A(0);
    ts.x[j] = ts.g[j] = ts.dA[j] = ts.x_prev[j] = ts.decay[j] = ts.db[j] = ts.dc[j] = A(0);
  }
  ts.D = (p.valid && g.has_d) ? D[p.d] : A(0);
  ts.bias = (p.valid && g.has_bias) ? bias[p.d] : A(0);
  ts.dD = ts.dbias = A(0);
}

// dt from the raw delta: + bias, then softplus = log1p(exp(v)) up to 20, identity above (NaN
// passes through: the comparison is false).
template <typename A>
FASTFUSE_HD A effective_delta(A raw, A bias, bool softplus) {
  const A v = raw + bias;
  return (softplus && v <= A(kSoftplusThreshold)) ? log1p_acc(exp_acc(v)) : v;
}

template <typename A>
FASTFUSE_HD A sigmoid_acc(A v) { return A(1) / (A(1) + exp_acc(-v)); }

// One step of the recurrence for this thread's states; returns its share of C_t · x_t (0 if C
// is null: the backward's recomputation needs only the states).
template <typename A>
FASTFUSE_HD A advance(ThreadState<A>& ts, const Geometry& g, const ThreadPlace& p, A dt, A u, const A* B_tile,
                      const A* C_tile, int s) {
  const A dtu = dt * u;
  A share = A(0);
#pragma unroll
  for (int j = 0; j < kMaxStatesPerThread; ++j) {
    const int64_t n = state_of(g, p, j);
    if (n < 0) continue;
    ts.x[j] = exp2_acc(dt * ts.A2[j]) * ts.x[j] + dtu * B_tile[n * g.tile + s];
    if (C_tile != nullptr) share += ts.x[j] * C_tile[n * g.tile + s];
  }
  return share;
}

// out = (y + D·u) · silu(z)
template <typename A>
FASTFUSE_HD A output_of(const ThreadState<A>& ts, const Geometry& g, A y, A u, A z) {
  if (g.has_d) y += ts.D * u;
  if (g.has_z) y = y * z * sigmoid_acc(z);
  return y;
}

// The forward of one block.
template <typename T, typename TW>
struct ForwardArgs {
  const T *u, *delta, *z;
  const TW *B, *C;
  const acc_t<T> *A, *D, *bias;
  T* out;
  acc_t<T>* last_state;    // (batch, D, N)
  acc_t<T>* chunk_states;  // (batch, D, n_chunks, N)
};

template <typename T, typename TW, typename Team>
FASTFUSE_HD void forward_block(const Team& team, const ForwardArgs<T, TW>& args, const Geometry& g, int64_t block,
                               acc_t<T>* smem) {
  using A = acc_t<T>;
  const BlockPlace b = place_block(g, block);
  const ThreadPlace p = place_thread(g, b, team.tid());
  const Tiles<A> tiles = carve_tiles(smem, g, false);
  const int cpb = g.channels_per_block, T_ = g.tile;
  const int64_t channel_row0 = b.batch * g.dim + b.first_channel;
  const int64_t bc_row0 = (b.batch * g.groups + b.group) * g.n_state;
  const int bc_rows = static_cast<int>(g.n_state);
  ThreadState<A> ts;
  init_thread(ts, g, p, args.A, args.D, args.bias);

  for (int64_t t0 = 0; t0 < g.length; t0 += T_) {
    const int steps = static_cast<int>(g.length - t0 < T_ ? g.length - t0 : T_);
    // No barrier before the loads: the previous tile's last barrier already follows every read
    // of these tiles, and the store phase still running reads only the output tile.
    load_tile(team, args.u, channel_row0, cpb, b.channels, g.length, t0, steps, T_, g.threads, tiles.u);
    load_tile(team, args.delta, channel_row0, cpb, b.channels, g.length, t0, steps, T_, g.threads, tiles.dt);
    load_tile(team, g.has_z ? args.z : static_cast<const T*>(nullptr), channel_row0, cpb, b.channels, g.length, t0,
              steps, T_, g.threads, tiles.z);
    load_tile(team, args.B, bc_row0, bc_rows, bc_rows, g.length, t0, steps, T_, g.threads, tiles.B);
    load_tile(team, args.C, bc_row0, bc_rows, bc_rows, g.length, t0, steps, T_, g.threads, tiles.C);
    team.sync();
    for (int s = 0; s < steps; ++s) {
      const int64_t t = t0 + s;
      if (t % g.chunk == 0) {  // the state this chunk starts from, for the backward
        A* saved = args.chunk_states + (p.row * g.n_chunks + t / g.chunk) * g.n_state;
#pragma unroll
        for (int j = 0; j < kMaxStatesPerThread; ++j) {
          const int64_t n = state_of(g, p, j);
          if (n >= 0) saved[n] = ts.x[j];
        }
      }
      const int at = p.channel * T_ + s;
      const A u = tiles.u[at];
      const A dt = effective_delta(tiles.dt[at], ts.bias, g.softplus);
      const A y = sum_over_lanes(team, advance(ts, g, p, dt, u, tiles.B, tiles.C, s), g.nt);
      if (p.lane == 0) tiles.y[at] = output_of(ts, g, y, u, tiles.z[at]);
    }
    team.sync();
    store_tile(team, tiles.y, args.out, channel_row0, cpb, b.channels, g.length, t0, steps, T_, g.threads);
  }
#pragma unroll
  for (int j = 0; j < kMaxStatesPerThread; ++j) {
    const int64_t n = state_of(g, p, j);
    if (n >= 0) args.last_state[p.row * g.n_state + n] = ts.x[j];
  }
}

// The backward of one step for one channel, after the states are known.
template <typename A>
struct Gate {
  A dy;  // gradient of y + D·u
  A dz;
};

// pre = C·x + D·u; out = pre·silu(z): dz = dout·pre·σ(z)(1 + z(1 − σ(z))), d pre = dout·z·σ(z).
template <typename A>
FASTFUSE_HD Gate<A> gate_backward(const ThreadState<A>& ts, const Geometry& g, A dout, A y, A u, A z) {
  Gate<A> r;
  if (!g.has_z) {
    r.dy = dout;
    r.dz = A(0);
    return r;
  }
  const A pre = y + (g.has_d ? ts.D * u : A(0));
  const A sig = sigmoid_acc(z);
  r.dz = dout * pre * sig * (A(1) + z * (A(1) - sig));
  r.dy = dout * z * sig;
  return r;
}

// Phase 1 of a reverse step: x_{t-1} from the scratch, a_t and x_t; returns the share of C·x_t.
template <typename A>
FASTFUSE_HD A recall_step(ThreadState<A>& ts, const Geometry& g, const ThreadPlace& p, const A* scratch_step,
                          int tid, A dt, A u, const A* B_tile, const A* C_tile, int s) {
  const A dtu = dt * u;
  A share = A(0);
#pragma unroll
  for (int j = 0; j < kMaxStatesPerThread; ++j) {
    const int64_t n = state_of(g, p, j);
    if (n < 0) continue;
    ts.x_prev[j] = scratch_step[static_cast<int64_t>(j) * g.threads + tid];
    ts.decay[j] = exp2_acc(dt * ts.A2[j]);
    ts.x[j] = ts.decay[j] * ts.x_prev[j] + dtu * B_tile[n * g.tile + s];
    share += ts.x[j] * C_tile[n * g.tile + s];
  }
  return share;
}

template <typename A>
struct Shares {
  A hB;    // Σ_n h B
  A haxA;  // Σ_n h a x_{t-1} A2 (A·log2 e; scaled back by ln 2 in channel_grads)
};

// Phase 2: the adjoint state h_t = g + dy C_t; this thread's shares of the state sums, its
// channel's contributions to dB_t and dC_t, dA, and g for step t − 1.
template <typename A>
FASTFUSE_HD Shares<A> adjoint_step(ThreadState<A>& ts, const Geometry& g, const ThreadPlace& p, A dy, A dt, A u,
                                   const A* B_tile, const A* C_tile, int s) {
  const A dtu = dt * u;
  Shares<A> r{A(0), A(0)};
#pragma unroll
  for (int j = 0; j < kMaxStatesPerThread; ++j) {
    const int64_t n = state_of(g, p, j);
    if (n < 0) {
      ts.db[j] = ts.dc[j] = A(0);
      continue;
    }
    const A h = ts.g[j] + dy * C_tile[n * g.tile + s];
    const A hax = h * ts.decay[j] * ts.x_prev[j];
    r.hB += h * B_tile[n * g.tile + s];
    r.haxA += hax * ts.A2[j];
    ts.dA[j] += hax * dt;
    ts.db[j] = h * dtu;
    ts.dc[j] = dy * ts.x[j];
    ts.g[j] = h * ts.decay[j];
  }
  return r;
}

template <typename A>
struct ChannelGrads {
  A du, ddelta;
};

// Phase 3, per channel (the sums are over all its states): du, ddelta through softplus and the
// bias, and the time sums of dD and dbias.
template <typename A>
FASTFUSE_HD ChannelGrads<A> channel_grads(ThreadState<A>& ts, const Geometry& g, A hB, A haxA2, A dy, A dt, A u,
                                          A raw) {
  ChannelGrads<A> r;
  r.du = dt * hB + (g.has_d ? dy * ts.D : A(0));
  A ddt = u * hB + haxA2 * A(kLn2);
  if (g.softplus) {
    const A v = raw + ts.bias;
    if (v <= A(kSoftplusThreshold)) ddt *= sigmoid_acc(v);
  }
  r.ddelta = ddt;
  ts.dD += dy * u;
  ts.dbias += ddt;
  return r;
}

template <typename T, typename TW>
struct BackwardArgs {
  const T *dout, *u, *delta, *z;
  const TW *B, *C;
  const acc_t<T> *A, *D, *bias;
  const acc_t<T>* dlast;         // (batch, D, N)
  const acc_t<T>* chunk_states;  // (batch, D, n_chunks, N)
  acc_t<T>* scratch;             // blocks × chunk_rows × k × threads
  T *du, *ddelta, *dz;
  acc_t<T> *dB, *dC;             // (batch, G, N, L): zeroed first when accumulate_bc
  acc_t<T> *dA, *dD, *dbias;     // per-batch partials (batch, D, N), (batch, D), (batch, D)
  bool accumulate_bc;            // several blocks share a group: add with atomics
};

template <typename T, typename TW, typename Team>
FASTFUSE_HD void backward_block(const Team& team, const BackwardArgs<T, TW>& args, const Geometry& g,
                                int64_t block, acc_t<T>* smem) {
  using A = acc_t<T>;
  const int tid = team.tid();
  const BlockPlace b = place_block(g, block);
  const ThreadPlace p = place_thread(g, b, tid);
  const Tiles<A> tiles = carve_tiles(smem, g, true);
  const int cpb = g.channels_per_block, T_ = g.tile;
  const int64_t channel_row0 = b.batch * g.dim + b.first_channel;
  const int64_t bc_row0 = (b.batch * g.groups + b.group) * g.n_state;
  const int bc_rows = static_cast<int>(g.n_state);
  const int64_t scratch_step_elems = static_cast<int64_t>(g.k) * g.threads;
  A* scratch = args.scratch + block * g.chunk_rows * scratch_step_elems;
  const T* z_src = g.has_z ? args.z : nullptr;
  ThreadState<A> ts;
  init_thread(ts, g, p, args.A, args.D, args.bias);
#pragma unroll
  for (int j = 0; j < kMaxStatesPerThread; ++j) {
    const int64_t n = state_of(g, p, j);
    if (n >= 0) ts.g[j] = args.dlast[p.row * g.n_state + n];
  }

  for (int64_t c = g.n_chunks - 1; c >= 0; --c) {
    const int64_t begin = c * g.chunk;
    const int64_t end = begin + g.chunk < g.length ? begin + g.chunk : g.length;
    // Re-run the chunk from its saved start state, keeping every x_{t-1}.
#pragma unroll
    for (int j = 0; j < kMaxStatesPerThread; ++j) {
      const int64_t n = state_of(g, p, j);
      ts.x[j] = n >= 0 ? args.chunk_states[(p.row * g.n_chunks + c) * g.n_state + n] : A(0);
    }
    for (int64_t t0 = begin; t0 < end; t0 += T_) {
      const int steps = static_cast<int>(end - t0 < T_ ? end - t0 : T_);
      team.sync();
      load_tile(team, args.u, channel_row0, cpb, b.channels, g.length, t0, steps, T_, g.threads, tiles.u);
      load_tile(team, args.delta, channel_row0, cpb, b.channels, g.length, t0, steps, T_, g.threads, tiles.dt);
      load_tile(team, args.B, bc_row0, bc_rows, bc_rows, g.length, t0, steps, T_, g.threads, tiles.B);
      team.sync();
      for (int s = 0; s < steps; ++s) {
        A* row = scratch + (t0 - begin + s) * scratch_step_elems;
#pragma unroll
        for (int j = 0; j < kMaxStatesPerThread; ++j) {
          if (j < g.k) row[static_cast<int64_t>(j) * g.threads + tid] = ts.x[j];
        }
        const int at = p.channel * T_ + s;
        advance(ts, g, p, effective_delta(tiles.dt[at], ts.bias, g.softplus), tiles.u[at], tiles.B,
                static_cast<const A*>(nullptr), s);
      }
    }
    // Walk the chunk backwards, one tile at a time (tiles start at begin + m·tile).
    const int64_t tiles_in_chunk = (end - begin + T_ - 1) / T_;
    for (int64_t m = tiles_in_chunk - 1; m >= 0; --m) {
      const int64_t t0 = begin + m * T_;
      const int steps = static_cast<int>(end - t0 < T_ ? end - t0 : T_);
      team.sync();
      load_tile(team, args.u, channel_row0, cpb, b.channels, g.length, t0, steps, T_, g.threads, tiles.u);
      load_tile(team, args.delta, channel_row0, cpb, b.channels, g.length, t0, steps, T_, g.threads, tiles.dt);
      load_tile(team, z_src, channel_row0, cpb, b.channels, g.length, t0, steps, T_, g.threads, tiles.z);
      load_tile(team, args.dout, channel_row0, cpb, b.channels, g.length, t0, steps, T_, g.threads, tiles.y);
      load_tile(team, args.B, bc_row0, bc_rows, bc_rows, g.length, t0, steps, T_, g.threads, tiles.B);
      load_tile(team, args.C, bc_row0, bc_rows, bc_rows, g.length, t0, steps, T_, g.threads, tiles.C);
      zero_tile(team, tiles.dB, 2 * g.n_state * T_, g.threads);  // dB and dC are adjacent
      team.sync();
      for (int s = steps - 1; s >= 0; --s) {
        const int at = p.channel * T_ + s;
        const A u = tiles.u[at], raw = tiles.dt[at];
        const A dt = effective_delta(raw, ts.bias, g.softplus);
        const A* row = scratch + (t0 - begin + s) * scratch_step_elems;
        const A cx = recall_step(ts, g, p, row, tid, dt, u, tiles.B, tiles.C, s);
        const A y = g.has_z ? sum_over_lanes(team, cx, g.nt) : A(0);
        const Gate<A> gate = gate_backward(ts, g, tiles.y[at], y, u, tiles.z[at]);
        const Shares<A> sh = adjoint_step(ts, g, p, gate.dy, dt, u, tiles.B, tiles.C, s);
        const A hB = sum_over_lanes(team, sh.hB, g.nt);
        const A haxA = sum_over_lanes(team, sh.haxA, g.nt);
        const ChannelGrads<A> cg = channel_grads(ts, g, hB, haxA, gate.dy, dt, u, raw);
        if (p.lane == 0) {
          tiles.du[at] = cg.du;
          tiles.ddelta[at] = cg.ddelta;
          tiles.dz[at] = gate.dz;
        }
        // dB_t, dC_t: over the channels of this warp by shuffles, then one shared add per warp.
        // (Unrolled over the register array with a uniform guard, so ts.db/dc stay in registers.)
#pragma unroll
        for (int j = 0; j < kMaxStatesPerThread; ++j) {
          if (j >= g.k) continue;
          const A db = sum_over_warp_channels(team, ts.db[j], g.nt);
          const A dc = sum_over_warp_channels(team, ts.dc[j], g.nt);
          const int64_t n = p.lane + static_cast<int64_t>(j) * g.nt;
          if (tid % 32 < g.nt && n < g.n_state) {
            team.shared_add(&tiles.dB[n * T_ + s], db);
            team.shared_add(&tiles.dC[n * T_ + s], dc);
          }
        }
      }
      team.sync();
      store_tile(team, tiles.du, args.du, channel_row0, cpb, b.channels, g.length, t0, steps, T_, g.threads);
      store_tile(team, tiles.ddelta, args.ddelta, channel_row0, cpb, b.channels, g.length, t0, steps, T_, g.threads);
      if (g.has_z) {
        store_tile(team, tiles.dz, args.dz, channel_row0, cpb, b.channels, g.length, t0, steps, T_, g.threads);
      }
      store_or_add_tile(team, tiles.dB, args.dB, bc_row0, bc_rows, g.length, t0, steps, T_, g.threads,
                        args.accumulate_bc);
      store_or_add_tile(team, tiles.dC, args.dC, bc_row0, bc_rows, g.length, t0, steps, T_, g.threads,
                        args.accumulate_bc);
    }
  }
#pragma unroll
  for (int j = 0; j < kMaxStatesPerThread; ++j) {
    const int64_t n = state_of(g, p, j);
    if (n >= 0) args.dA[p.row * g.n_state + n] = ts.dA[j];
  }
  if (p.valid && p.lane == 0) {
    args.dD[p.row] = ts.dD;
    args.dbias[p.row] = ts.dbias;
  }
}

// The kernels: one block per (batch, group, channel block), gridDim.x = g.blocks().
template <typename T, typename TW>
__global__ void __launch_bounds__(kThreads)
forward_kernel(ForwardArgs<T, TW> args, Geometry g) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  forward_block<T, TW>(DeviceTeam{}, args, g, static_cast<int64_t>(blockIdx.x),
                       reinterpret_cast<acc_t<T>*>(shared_bytes));
}

template <typename T, typename TW>
__global__ void __launch_bounds__(kThreads)
backward_kernel(BackwardArgs<T, TW> args, Geometry g) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  backward_block<T, TW>(DeviceTeam{}, args, g, static_cast<int64_t>(blockIdx.x),
                        reinterpret_cast<acc_t<T>*>(shared_bytes));
}

}  // namespace selective_scan
}  // namespace fastfuse
