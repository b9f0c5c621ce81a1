// Pieces every kernel family shares: the accumulation type of each input type and conversions.
// Half types accumulate in fp32; float64 stays float64 (the gradcheck path), as
// fastfuse._checks.compute_dtype. Everything here is __host__ __device__ so that a family's
// per-thread code can also be compiled for the host and tested without a GPU.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef FASTFUSE_HD
#define FASTFUSE_HD __host__ __device__ __forceinline__
#endif

namespace fastfuse {

template <typename T> struct Accumulator { using type = float; };
template <> struct Accumulator<double> { using type = double; };
template <typename T> using acc_t = typename Accumulator<T>::type;

FASTFUSE_HD float to_acc(float v) { return v; }
FASTFUSE_HD double to_acc(double v) { return v; }
FASTFUSE_HD float to_acc(__half v) { return __half2float(v); }
FASTFUSE_HD float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as torch's casts.
template <typename T> FASTFUSE_HD T from_acc(acc_t<T> v);
template <> FASTFUSE_HD float from_acc<float>(float v) { return v; }
template <> FASTFUSE_HD double from_acc<double>(double v) { return v; }
template <> FASTFUSE_HD __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> FASTFUSE_HD __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

FASTFUSE_HD float sqrt_acc(float v) { return sqrtf(v); }
FASTFUSE_HD double sqrt_acc(double v) { return sqrt(v); }
FASTFUSE_HD float atan2_acc(float y, float x) { return atan2f(y, x); }
FASTFUSE_HD double atan2_acc(double y, double x) { return atan2(y, x); }

// torch.finfo(dtype).tiny of the accumulation type.
template <typename A> FASTFUSE_HD A smallest_normal();
template <> FASTFUSE_HD float smallest_normal<float>() { return FLT_MIN; }
template <> FASTFUSE_HD double smallest_normal<double>() { return DBL_MIN; }

}  // namespace fastfuse
