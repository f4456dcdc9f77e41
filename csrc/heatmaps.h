// Op B per-pixel math shared by the CPU kernels (heatmaps.cpp) and the CUDA kernels (heatmaps_cuda.cu):
// GANSeg's Gaussian part heatmaps and point-relative positional encoding (GANSeg sec. 3, appendix E).
// Plain C++ (no ATen), so nvcc compiles it without torch's CUDA headers.
//
// Coordinates: [-1, 1] across the image, x along the width; output index j on an axis of `extent` image
// pixels padded by `margin` on each side is image pixel j - margin, centred at (2 (j - margin) + 1) / extent - 1.
//   heat(p) = exp(-|p - c|^2 / sigma^2) = gaussian_factor(p_x - c_x) * gaussian_factor(p_y - c_y)
//   PE(p)   = sin / cos(pi u(p)),  u(p) = a_x p_x + a_y p_y + a_c   (W.[p - x_1, ..., p - x_P] + b is affine in p)
// Per-(b, k) Gaussian parameters are packed as [c_x, c_y, 1 / sigma^2], per-(b, f) PE coefficients as
// [a_x, a_y, a_c]; both are computed by the .cpp in the accumulation type (double for double, else float).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MINSEG_HD __host__ __device__
#else
#define MINSEG_HD
#endif

namespace minseg_heatmaps {

constexpr double kPi = 3.14159265358979323846;

// The normalised coordinate of output index `index` along an axis of `extent` image pixels, `margin` padding.
template <typename T>
MINSEG_HD inline T pixel_centre(int64_t index, int64_t extent, int64_t margin) {
  return T(2 * (index - margin) + 1) / T(extent) - T(1);
}

MINSEG_HD inline float exp_of(float x) { return expf(x); }
MINSEG_HD inline double exp_of(double x) { return exp(x); }

// One axis of the separable Gaussian: exp(-d^2 / sigma^2), given 1 / sigma^2.
template <typename T>
MINSEG_HD inline T gaussian_factor(T d, T inv_sigma2) {
  return exp_of(-d * d * inv_sigma2);
}

// sin(pi u), cos(pi u): sincospi on the GPU (exact reduction of the argument), sin/cos of pi * u on the host.
MINSEG_HD inline void sincos_pi(float u, float* s, float* c) {
#ifdef __CUDA_ARCH__
  sincospif(u, s, c);
#else
  const float angle = float(kPi) * u;
  *s = std::sin(angle);
  *c = std::cos(angle);
#endif
}
MINSEG_HD inline void sincos_pi(double u, double* s, double* c) {
#ifdef __CUDA_ARCH__
  sincospi(u, s, c);
#else
  const double angle = kPi * u;
  *s = std::sin(angle);
  *c = std::cos(angle);
#endif
}

// The PE phase u (in units of pi) at (x, y) from the coefficients [a_x, a_y, a_c].
template <typename T>
MINSEG_HD inline T pe_phase(const T* coef, T x, T y) {
  return coef[0] * x + coef[1] * y + coef[2];
}

// sin(a + b), cos(a + b) from the sines and cosines of a and b: the CPU kernels split u into a column part
// a_x x and a row part a_y y + a_c, tabulate sin/cos of each, and pay two multiplies and two FMAs per pixel.
template <typename T>
MINSEG_HD inline void add_angles(T sin_a, T cos_a, T sin_b, T cos_b, T* s, T* c) {
  *s = sin_a * cos_b + cos_a * sin_b;
  *c = cos_a * cos_b - sin_a * sin_b;
}

}  // namespace minseg_heatmaps

// CUDA launchers (heatmaps_cuda.cu). Big arrays are in the storage type, parameters and partial sums in the
// accumulation type (double for Float64, float otherwise); all arrays contiguous.
#if defined(__CUDACC__) || defined(WITH_CUDA)
#include <cuda_runtime_api.h>

namespace minseg_heatmaps {

enum class Storage : int { Float32, Float64, Float16, BFloat16 };

// heat (BK, Hp, Wp) from params (BK, 3).
void heat_forward_cuda(const void* params, void* heat, Storage storage, int64_t BK, int64_t H, int64_t W,
                       int64_t margin, cudaStream_t stream);
// partials (BK, Hp, 3): per row, sums of v dx, v dy, v (dx^2 + dy^2) with v = grad * heat.
void heat_backward_rows_cuda(const void* grad, const void* heat, const void* params, void* partials, Storage storage,
                             int64_t BK, int64_t H, int64_t W, int64_t margin, cudaStream_t stream);
// out (B, 2F, Hp, Wp) from coefs (B, F, 3): sin channels then cos channels.
void pe_forward_cuda(const void* coefs, void* out, Storage storage, int64_t B, int64_t F, int64_t H, int64_t W,
                     int64_t margin, cudaStream_t stream);
// partials (B F, Hp, 3): per row, sums of t x, t y, t with t = g_sin cos(pi u) - g_cos sin(pi u).
void pe_backward_rows_cuda(const void* grad, const void* coefs, void* partials, Storage storage, int64_t B, int64_t F,
                           int64_t H, int64_t W, int64_t margin, cudaStream_t stream);

}  // namespace minseg_heatmaps
#endif
