// Op B CUDA kernels: GANSeg's part heatmaps and positional encoding (GANSeg sec. 3, appendix E).
// Plain CUDA on raw pointers (no ATen/c10 headers): heatmaps.cpp passes contiguous buffers, sizes and the stream.
// Forward kernels: one thread per output pixel (grid-stride, 64-bit indices). Backward kernels: one block per
// output row, a fixed-order tree reduction in shared memory, one partial per row (no atomics: deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "heatmaps.h"

namespace minseg_heatmaps {
namespace {

constexpr int kThreads = 256;           // forward kernels
constexpr int kReduceThreads = 128;     // backward kernels; a power of two for the tree reduction
constexpr int64_t kMaxBlocks = 1 << 20; // grid-stride beyond this

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ inline float to_acc(float x) { return x; }
__device__ inline double to_acc(double x) { return x; }
__device__ inline float to_acc(__half x) { return __half2float(x); }
__device__ inline float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ inline void store(float* p, float x) { *p = x; }
__device__ inline void store(double* p, double x) { *p = x; }
__device__ inline void store(__half* p, float x) { *p = __float2half(x); }
__device__ inline void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

int blocks_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// Sums N per-thread values over the block in a fixed order (deterministic); every thread gets the totals.
template <int N, typename acc_t>
__device__ void block_sum(acc_t (&values)[N]) {
  __shared__ acc_t buffer[N][kReduceThreads];
  const int t = threadIdx.x;
  for (int v = 0; v < N; ++v) buffer[v][t] = values[v];
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride /= 2) {
    if (t < stride)
      for (int v = 0; v < N; ++v) buffer[v][t] += buffer[v][t + stride];
    __syncthreads();
  }
  for (int v = 0; v < N; ++v) values[v] = buffer[v][0];
}

template <typename scalar_t>
__global__ void heat_forward_kernel(const typename AccOf<scalar_t>::type* params, scalar_t* heat, int64_t total,
                                    int64_t H, int64_t W, int64_t margin) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t Hp = H + 2 * margin, Wp = W + 2 * margin;
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < total; n += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = n % Wp, i = (n / Wp) % Hp, bk = n / (Wp * Hp);
    const acc_t* p = params + 3 * bk;  // [c_x, c_y, 1 / sigma^2]
    const acc_t fx = gaussian_factor(pixel_centre<acc_t>(j, W, margin) - p[0], p[2]);
    const acc_t fy = gaussian_factor(pixel_centre<acc_t>(i, H, margin) - p[1], p[2]);
    store(heat + n, fx * fy);
  }
}

// Block `row` = bk * Hp + i: sums over the row of v (dx, dy, dx^2 + dy^2), v = grad * heat.
template <typename scalar_t>
__global__ void heat_backward_rows_kernel(const scalar_t* grad, const scalar_t* heat,
                                          const typename AccOf<scalar_t>::type* params,
                                          typename AccOf<scalar_t>::type* partials, int64_t H, int64_t W,
                                          int64_t margin) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t Hp = H + 2 * margin, Wp = W + 2 * margin;
  const int64_t row = blockIdx.x, bk = row / Hp, i = row % Hp;
  const acc_t* p = params + 3 * bk;
  acc_t sums[3] = {0, 0, 0};  // v, v dx, v dx^2
  for (int64_t j = threadIdx.x; j < Wp; j += blockDim.x) {
    const acc_t v = to_acc(grad[row * Wp + j]) * to_acc(heat[row * Wp + j]);
    const acc_t dx = pixel_centre<acc_t>(j, W, margin) - p[0];
    sums[0] += v;
    sums[1] += v * dx;
    sums[2] += v * dx * dx;
  }
  block_sum(sums);
  if (threadIdx.x == 0) {
    const acc_t dy = pixel_centre<acc_t>(i, H, margin) - p[1];
    partials[3 * row + 0] = sums[1];
    partials[3 * row + 1] = sums[0] * dy;
    partials[3 * row + 2] = sums[2] + sums[0] * dy * dy;
  }
}

template <typename scalar_t>
__global__ void pe_forward_kernel(const typename AccOf<scalar_t>::type* coefs, scalar_t* out, int64_t total,
                                  int64_t F, int64_t H, int64_t W, int64_t margin) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t Hp = H + 2 * margin, Wp = W + 2 * margin, plane = Hp * Wp;
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < total; n += int64_t(gridDim.x) * blockDim.x) {
    const int64_t pixel = n % plane, bf = n / plane, b = bf / F, f = bf % F;
    const acc_t x = pixel_centre<acc_t>(pixel % Wp, W, margin), y = pixel_centre<acc_t>(pixel / Wp, H, margin);
    acc_t s, c;
    sincos_pi(pe_phase(coefs + 3 * bf, x, y), &s, &c);
    store(out + (b * 2 * F + f) * plane + pixel, s);
    store(out + (b * 2 * F + F + f) * plane + pixel, c);
  }
}

// Block `row` = bf * Hp + i: sums over the row of t (x, y, 1), t = g_sin cos(pi u) - g_cos sin(pi u).
template <typename scalar_t>
__global__ void pe_backward_rows_kernel(const scalar_t* grad, const typename AccOf<scalar_t>::type* coefs,
                                        typename AccOf<scalar_t>::type* partials, int64_t F, int64_t H, int64_t W,
                                        int64_t margin) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t Hp = H + 2 * margin, Wp = W + 2 * margin, plane = Hp * Wp;
  const int64_t row = blockIdx.x, bf = row / Hp, i = row % Hp, b = bf / F, f = bf % F;
  const scalar_t* g_sin = grad + (b * 2 * F + f) * plane + i * Wp;
  const scalar_t* g_cos = grad + (b * 2 * F + F + f) * plane + i * Wp;
  const acc_t y = pixel_centre<acc_t>(i, H, margin);
  acc_t sums[2] = {0, 0};  // t, t x
  for (int64_t j = threadIdx.x; j < Wp; j += blockDim.x) {
    const acc_t x = pixel_centre<acc_t>(j, W, margin);
    acc_t s, c;
    sincos_pi(pe_phase(coefs + 3 * bf, x, y), &s, &c);
    const acc_t t = to_acc(g_sin[j]) * c - to_acc(g_cos[j]) * s;
    sums[0] += t;
    sums[1] += t * x;
  }
  block_sum(sums);
  if (threadIdx.x == 0) {
    partials[3 * row + 0] = sums[1];
    partials[3 * row + 1] = sums[0] * y;
    partials[3 * row + 2] = sums[0];
  }
}

// Calls fn(scalar_t{}) with the storage type named by `storage`.
template <typename Fn>
void dispatch(Storage storage, Fn&& fn) {
  switch (storage) {
    case Storage::Float32: fn(float{}); break;
    case Storage::Float64: fn(double{}); break;
    case Storage::Float16: fn(__half{}); break;
    case Storage::BFloat16: fn(__nv_bfloat16{}); break;
  }
}

}  // namespace

void heat_forward_cuda(const void* params, void* heat, Storage storage, int64_t BK, int64_t H, int64_t W,
                       int64_t margin, cudaStream_t stream) {
  const int64_t total = BK * (H + 2 * margin) * (W + 2 * margin);
  dispatch(storage, [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = typename AccOf<scalar_t>::type;
    heat_forward_kernel<scalar_t><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(
        static_cast<const acc_t*>(params), static_cast<scalar_t*>(heat), total, H, W, margin);
  });
}

void heat_backward_rows_cuda(const void* grad, const void* heat, const void* params, void* partials, Storage storage,
                             int64_t BK, int64_t H, int64_t W, int64_t margin, cudaStream_t stream) {
  const int64_t rows = BK * (H + 2 * margin);  // the .cpp checks rows < 2^31
  dispatch(storage, [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = typename AccOf<scalar_t>::type;
    heat_backward_rows_kernel<scalar_t><<<static_cast<unsigned>(rows), kReduceThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(heat), static_cast<const acc_t*>(params),
        static_cast<acc_t*>(partials), H, W, margin);
  });
}

void pe_forward_cuda(const void* coefs, void* out, Storage storage, int64_t B, int64_t F, int64_t H, int64_t W,
                     int64_t margin, cudaStream_t stream) {
  const int64_t total = B * F * (H + 2 * margin) * (W + 2 * margin);  // pixels of the sin half
  dispatch(storage, [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = typename AccOf<scalar_t>::type;
    pe_forward_kernel<scalar_t><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(
        static_cast<const acc_t*>(coefs), static_cast<scalar_t*>(out), total, F, H, W, margin);
  });
}

void pe_backward_rows_cuda(const void* grad, const void* coefs, void* partials, Storage storage, int64_t B, int64_t F,
                           int64_t H, int64_t W, int64_t margin, cudaStream_t stream) {
  const int64_t rows = B * F * (H + 2 * margin);  // the .cpp checks rows < 2^31
  dispatch(storage, [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = typename AccOf<scalar_t>::type;
    pe_backward_rows_kernel<scalar_t><<<static_cast<unsigned>(rows), kReduceThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad), static_cast<const acc_t*>(coefs), static_cast<acc_t*>(partials), F, H, W,
        margin);
  });
}

}  // namespace minseg_heatmaps
