// Vectorisable math shared by the cpu kernels (selective_scan.cpp, cross_scan.cpp, channel_attention.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastfuse_cpu {

// 2^t in float, vectorisable: round-to-nearest split t = k + f, |f| ≤ 1/2, Cephes' exp2f
// polynomial for 2^f (≈ 2 ulp), 2^k by the exponent bits. Below -127 it gives 0 (exp2f gives
// subnormals down to -149: irrelevant for a decay factor), above 128 inf; NaN stays NaN.
inline float exp2_poly(float t) {
  t = t < -127.0f ? -127.0f : t;  // written as comparisons so that NaN passes through
  t = t > 128.0f ? 128.0f : t;
  const float shifter = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  const float k = (t + shifter) - shifter;
  const float f = t - k;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t ki = static_cast<int32_t>(k);
  int32_t bits = (ki + 127) << 23;  // k = -127 → 0.0; k = 128 → inf
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp2_poly(double t) { return std::exp2(t); }

}  // namespace fastfuse_cpu
