// Op A, warp-and-composite on CUDA: thin kernels over the per-pixel functions of composite.h.
// Plain CUDA on raw pointers (no ATen/c10 headers), so nvcc can compile-check it with a CPU-only torch;
// composite.cpp passes in the pointers, sizes, a scratch buffer and the current stream.
//
// With theta, a first tiny launch turns it into one WarpMap per (b, i) (workspace passed in).
// Backward (deterministic, no atomics), three more launches when theta is given:
//   1. per output pixel: grad background, and c_i, e_i, gix_i, giy_i of every layer into the scratch;
//   2. per source pixel of every layer: gather grad layers / grad alphas from the output pixels it feeds;
//   3. per (b, i): grad theta, a fixed-order block reduction over the pixels.
// Without theta, launch 1 writes every gradient in place (no sampling).
#include <cuda_runtime.h>

#include <algorithm>

#include "composite.h"

namespace minseg {
namespace {

constexpr int kThreads = 256;
constexpr int kGatherChunk = 4;  // channels accumulated in registers per enumeration of a source pixel's footprint

unsigned blocks_for(int64_t work) {  // kernels loop (grid-stride, int64 indices) over what the grid does not cover
  return static_cast<unsigned>(std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(1) << 20));
}

__device__ __forceinline__ int64_t thread_index() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ int64_t thread_count() { return int64_t(blockDim.x) * gridDim.x; }

template <typename scalar_t>
__global__ void warp_map_kernel(const scalar_t* theta, int64_t count, int64_t H, int64_t W,
                                WarpMap<typename Acc<scalar_t>::type>* maps) {
  for (int64_t bi = thread_index(); bi < count; bi += thread_count())
    maps[bi] = warp_map<typename Acc<scalar_t>::type>(theta + bi * 6, H, W);
}

template <typename scalar_t>
__global__ void forward_kernel(CompositeInputs<scalar_t> in, scalar_t* image, scalar_t* warped_alphas) {
  const int64_t HW = in.H * in.W;
  for (int64_t t = thread_index(); t < in.B * HW; t += thread_count()) {
    const int64_t b = t / HW, p = t % HW;
    forward_pixel(in, b, p / in.W, p % in.W, image, warped_alphas);
  }
}

template <typename scalar_t>
__global__ void backward_pixels_kernel(CompositeInputs<scalar_t> in, const scalar_t* grad_image,
                                       const scalar_t* grad_warped, typename Acc<scalar_t>::type* scratch,
                                       scalar_t* grad_layers, scalar_t* grad_alphas, scalar_t* grad_background) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = in.N, C = in.C, HW = in.H * in.W;
  for (int64_t t = thread_index(); t < in.B * HW; t += thread_count()) {
    const int64_t b = t / HW, p = t % HW, h = p / in.W, w = p % in.W;
    if (in.warp != nullptr) {
      const Scratch<acc_t> slots{scratch + b * N * kWarpSlots * HW + p, kWarpSlots * HW, HW};
      const WarpSink<acc_t> sink{slots};
      backward_pixel(in, grad_image, grad_warped, slots, b, h, w, grad_background, sink);
    } else {
      const Scratch<acc_t> slots{scratch != nullptr ? scratch + b * N * 2 * HW + p : nullptr, 2 * HW, HW};  // N > 1
      const DirectSink<scalar_t> sink{grad_image + b * C * HW + p, grad_layers + b * N * C * HW + p,
                                      grad_alphas + b * N * HW + p, C, HW};
      backward_pixel(in, grad_image, grad_warped, slots, b, h, w, grad_background, sink);
    }
  }
}

template <typename scalar_t>
__global__ void gather_kernel(CompositeInputs<scalar_t> in, const typename Acc<scalar_t>::type* coef,
                              const scalar_t* grad_image, scalar_t* grad_layers, scalar_t* grad_alphas) {
  const int64_t HW = in.H * in.W;
  for (int64_t t = thread_index(); t < in.B * in.N * HW; t += thread_count()) {
    const int64_t bi = t / HW, q = t % HW;
    gather_pixel<kGatherChunk>(in, coef, grad_image, bi / in.N, bi % in.N, q / in.W, q % in.W, grad_layers,
                               grad_alphas);
  }
}

template <typename scalar_t>
__global__ void theta_grad_kernel(CompositeInputs<scalar_t> in, const typename Acc<scalar_t>::type* coef,
                                  scalar_t* grad_theta) {
  using acc_t = typename Acc<scalar_t>::type;
  __shared__ acc_t partial[6][kThreads];
  const int64_t HW = in.H * in.W;
  for (int64_t bi = blockIdx.x; bi < in.B * in.N; bi += gridDim.x) {
    acc_t sums[6] = {0, 0, 0, 0, 0, 0};
    const acc_t* gix = coef + (bi * kWarpSlots + 2) * HW;
    const acc_t* giy = coef + (bi * kWarpSlots + 3) * HW;
    for (int64_t p = threadIdx.x; p < HW; p += kThreads) add_theta_terms(sums, gix[p], giy[p], p / in.W, p % in.W, in.H, in.W);
    for (int k = 0; k < 6; ++k) partial[k][threadIdx.x] = sums[k];
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride /= 2) {  // fixed tree: the same sum on every run
      if (threadIdx.x < stride)
        for (int k = 0; k < 6; ++k) partial[k][threadIdx.x] += partial[k][threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      for (int k = 0; k < 6; ++k) sums[k] = partial[k][0];
      store_theta_grad(sums, in.H, in.W, grad_theta + bi * 6);
    }
    __syncthreads();
  }
}

// The typed inputs, with theta turned into WarpMaps in the workspace (one tiny launch).
template <typename scalar_t>
CompositeInputs<scalar_t> typed(const RawInputs& raw, void* warp_maps, cudaStream_t stream) {
  using Map = WarpMap<typename Acc<scalar_t>::type>;
  auto* maps = static_cast<Map*>(warp_maps);
  if (raw.theta != nullptr)
    warp_map_kernel<<<blocks_for(raw.B * raw.N), kThreads, 0, stream>>>(static_cast<const scalar_t*>(raw.theta),
                                                                       raw.B * raw.N, raw.H, raw.W, maps);
  return {static_cast<const scalar_t*>(raw.layers), static_cast<const scalar_t*>(raw.alphas),
          static_cast<const scalar_t*>(raw.background), raw.theta != nullptr ? maps : nullptr,
          raw.B, raw.N, raw.C, raw.H, raw.W};
}

template <typename scalar_t>
cudaError_t forward_typed(const RawInputs& raw, void* image, void* warped_alphas, void* warp_maps,
                          cudaStream_t stream) {
  const CompositeInputs<scalar_t> in = typed<scalar_t>(raw, warp_maps, stream);
  forward_kernel<<<blocks_for(in.B * in.H * in.W), kThreads, 0, stream>>>(in, static_cast<scalar_t*>(image),
                                                                          static_cast<scalar_t*>(warped_alphas));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward_typed(const RawInputs& raw, const void* grad_image, const void* grad_warped, void* grad_layers,
                           void* grad_alphas, void* grad_background, void* grad_theta, void* warp_maps,
                           void* scratch, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const CompositeInputs<scalar_t> in = typed<scalar_t>(raw, warp_maps, stream);
  const int64_t pixels = in.B * in.H * in.W;
  auto* coef = static_cast<acc_t*>(scratch);
  backward_pixels_kernel<<<blocks_for(pixels), kThreads, 0, stream>>>(
      in, static_cast<const scalar_t*>(grad_image), static_cast<const scalar_t*>(grad_warped), coef,
      static_cast<scalar_t*>(grad_layers), static_cast<scalar_t*>(grad_alphas), static_cast<scalar_t*>(grad_background));
  if (in.warp != nullptr) {
    gather_kernel<<<blocks_for(pixels * in.N), kThreads, 0, stream>>>(
        in, coef, static_cast<const scalar_t*>(grad_image), static_cast<scalar_t*>(grad_layers),
        static_cast<scalar_t*>(grad_alphas));
    theta_grad_kernel<<<static_cast<unsigned>(std::min<int64_t>(in.B * in.N, int64_t(1) << 20)), kThreads, 0, stream>>>(
        in, coef, static_cast<scalar_t*>(grad_theta));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t composite_forward_cuda(const RawInputs& in, void* image, void* warped_alphas, void* warp_maps,
                                   cudaStream_t stream) {
  switch (in.dtype) {
    case Dtype::Float: return forward_typed<float>(in, image, warped_alphas, warp_maps, stream);
    case Dtype::Double: return forward_typed<double>(in, image, warped_alphas, warp_maps, stream);
    case Dtype::Half: return forward_typed<__half>(in, image, warped_alphas, warp_maps, stream);
    case Dtype::BFloat16: return forward_typed<__nv_bfloat16>(in, image, warped_alphas, warp_maps, stream);
  }
  return cudaErrorInvalidValue;
}

#define MINSEG_BACKWARD_TYPED(T)                                                                                 \
  backward_typed<T>(in, grad_image, grad_warped, grad_layers, grad_alphas, grad_background, grad_theta, warp_maps, \
                    scratch, stream)

cudaError_t composite_backward_cuda(const RawInputs& in, const void* grad_image, const void* grad_warped,
                                    void* grad_layers, void* grad_alphas, void* grad_background, void* grad_theta,
                                    void* warp_maps, void* scratch, cudaStream_t stream) {
  switch (in.dtype) {
    case Dtype::Float: return MINSEG_BACKWARD_TYPED(float);
    case Dtype::Double: return MINSEG_BACKWARD_TYPED(double);
    case Dtype::Half: return MINSEG_BACKWARD_TYPED(__half);
    case Dtype::BFloat16: return MINSEG_BACKWARD_TYPED(__nv_bfloat16);
  }
  return cudaErrorInvalidValue;
}

}  // namespace minseg
