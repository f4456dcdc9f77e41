// Op A, warp-and-composite: registration of minseg::composite and minseg::composite_backward, input checks,
// and dispatch to the CPU kernels (composite_cpu.h, composite_cpu_backward.h) or, WITH_CUDA, to the CUDA kernels
// of composite_cuda.cu, reached through plain launchers with the current stream. Autograd and fake (meta)
// implementations are registered from Python (minseg/ops/composite.py).
//
// Backward (see composite.h): one pass over output pixels computes two scalars per layer (c_i, e_i) from a
// forward sweep of scalar prefixes and a backward sweep of suffix products. With a warp, the layer gradients
// then go back through the bilinear footprints, deterministically, in one of two ways on the CPU:
//   - B >= threads: each thread owns whole samples and scatters their gradients in pixel order, in the same
//     pass; grad theta accumulates per row, then per sample, in that same order;
//   - B < threads (e.g. one large image): the GPU's plan, parallel over every pixel: the scalars go to a
//     scratch, a second pass gathers the gradients per source pixel (gather_pixel), a third reduces grad
//     theta per (b, i). The tests run it with B = 1, so the CPU checks the arithmetic the GPU runs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/isfinite.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "composite.h"
#include "composite_cpu.h"
#include "composite_cpu_backward.h"

namespace minseg {
namespace {

using at::Tensor;

// ---- checks for direct torch.ops.minseg callers (the Python wrapper checks the same with nicer context) ----

void check_same(const Tensor& t, const Tensor& layers, const char* name) {
  TORCH_CHECK(t.device() == layers.device(), "minseg::composite: ", name, " is on ", t.device(), " but layers on ",
              layers.device(), "; put all tensors on one device");
  TORCH_CHECK(t.scalar_type() == layers.scalar_type(), "minseg::composite: ", name, " has dtype ", t.scalar_type(),
              " but layers ", layers.scalar_type(), "; use one dtype");
}

void check_inputs(const Tensor& layers, const Tensor& alphas, const Tensor& background,
                  const std::optional<Tensor>& theta) {
  TORCH_CHECK(layers.dim() == 5, "minseg::composite: layers must be (B, N, C, H, W), got ", layers.sizes());
  TORCH_CHECK(at::isFloatingType(layers.scalar_type()), "minseg::composite: layers must be floating point, got ",
              layers.scalar_type());
  const int64_t B = layers.size(0), N = layers.size(1), C = layers.size(2), H = layers.size(3), W = layers.size(4);
  TORCH_CHECK(B * N * C * H * W > 0, "minseg::composite: empty input, layers shape ", layers.sizes());
  TORCH_CHECK(alphas.sizes() == at::IntArrayRef({B, N, 1, H, W}), "minseg::composite: alphas must be (B, N, 1, H, W) = (",
              B, ", ", N, ", 1, ", H, ", ", W, "), got ", alphas.sizes());
  TORCH_CHECK(background.sizes() == at::IntArrayRef({B, C, H, W}), "minseg::composite: background must be (B, C, H, W) = (",
              B, ", ", C, ", ", H, ", ", W, "), got ", background.sizes());
  check_same(alphas, layers, "alphas");
  check_same(background, layers, "background");
  if (theta.has_value()) {
    TORCH_CHECK(theta->sizes() == at::IntArrayRef({B, N, 2, 3}), "minseg::composite: theta must be (B, N, 2, 3) = (",
                B, ", ", N, ", 2, 3) or None, got ", theta->sizes());
    check_same(*theta, layers, "theta");
    // The kernels stay in bounds for any theta; on CPU a nan/inf theta is also reported (on CUDA that would cost
    // a device sync per call, and the Python wrapper checks it already).
    if (theta->device().is_cpu())
      TORCH_CHECK(at::isfinite(*theta).all().item<bool>(), "minseg::composite: theta holds non-finite values (nan/inf)");
  }
}

// The CPU's WarpMaps: one per (b, i), computed once per call (B * N of them, a few dozen bytes each).
template <typename scalar_t>
std::vector<WarpMap<typename Acc<scalar_t>::type>> warp_maps_cpu(const std::optional<Tensor>& theta, int64_t H,
                                                                  int64_t W) {
  std::vector<WarpMap<typename Acc<scalar_t>::type>> maps;
  if (!theta.has_value()) return maps;
  const scalar_t* data = theta->data_ptr<scalar_t>();
  for (int64_t bi = 0; bi < theta->numel() / 6; ++bi)
    maps.push_back(warp_map<typename Acc<scalar_t>::type>(data + bi * 6, H, W));
  return maps;
}

template <typename scalar_t>
CompositeInputs<scalar_t> inputs_of(const Tensor& layers, const Tensor& alphas, const Tensor& background,
                                    const std::vector<WarpMap<typename Acc<scalar_t>::type>>& maps) {
  return {layers.data_ptr<scalar_t>(), alphas.data_ptr<scalar_t>(), background.data_ptr<scalar_t>(),
          maps.empty() ? nullptr : maps.data(),
          layers.size(0), layers.size(1), layers.size(2), layers.size(3), layers.size(4)};
}

std::optional<Tensor> contiguous(const std::optional<Tensor>& t) {
  return t.has_value() ? std::optional<Tensor>(t->contiguous()) : std::nullopt;
}

std::optional<Tensor> to_float(const std::optional<Tensor>& t) {
  return t.has_value() ? std::optional<Tensor>(t->to(at::kFloat)) : std::nullopt;
}

bool is_reduced_float(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// Calls f(std::integral_constant<int, CC>) with CC = C for the channel counts whose loops the CPU kernels
// unroll, else CC = 0 (any C).
template <typename F>
void with_channels(int64_t C, const F& f) {
  if (C == 3)
    f(std::integral_constant<int, 3>());
  else if (C == 1)
    f(std::integral_constant<int, 1>());
  else
    f(std::integral_constant<int, 0>());
}

// ---- CUDA: erase the scalar type and launch on the current stream ----

#ifdef WITH_CUDA
RawInputs raw_inputs(const Tensor& layers, const Tensor& alphas, const Tensor& background,
                     const std::optional<Tensor>& theta) {
  Dtype dtype = Dtype::Float;
  switch (layers.scalar_type()) {
    case at::kFloat: dtype = Dtype::Float; break;
    case at::kDouble: dtype = Dtype::Double; break;
    case at::kHalf: dtype = Dtype::Half; break;
    case at::kBFloat16: dtype = Dtype::BFloat16; break;
    default: TORCH_CHECK(false, "minseg::composite: unsupported dtype ", layers.scalar_type());
  }
  return {dtype, layers.data_ptr(), alphas.data_ptr(), background.data_ptr(),
          theta.has_value() ? theta->data_ptr() : nullptr,
          layers.size(0), layers.size(1), layers.size(2), layers.size(3), layers.size(4)};
}

void check_cuda(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "minseg::", what, ": CUDA kernel failed: ", cudaGetErrorString(error));
}
#endif

// ---- the ops ----

std::tuple<Tensor, Tensor> composite_op(const Tensor& layers_in, const Tensor& alphas_in, const Tensor& background_in,
                                        const std::optional<Tensor>& theta_in) {
  check_inputs(layers_in, alphas_in, background_in, theta_in);
  if (layers_in.is_cpu() && is_reduced_float(layers_in)) {  // CPU half/bfloat16: compute in float
    auto [image, warped] = composite_op(layers_in.to(at::kFloat), alphas_in.to(at::kFloat),
                                        background_in.to(at::kFloat), to_float(theta_in));
    return {image.to(layers_in.scalar_type()), warped.to(layers_in.scalar_type())};
  }
  const Tensor layers = layers_in.contiguous(), alphas = alphas_in.contiguous(), background = background_in.contiguous();
  const std::optional<Tensor> theta = contiguous(theta_in);
  Tensor image = at::empty_like(background, at::MemoryFormat::Contiguous);
  Tensor warped = at::empty_like(alphas, at::MemoryFormat::Contiguous);
  if (layers.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(layers.scalar_type(), "minseg::composite", [&] {
      const auto maps = warp_maps_cpu<scalar_t>(theta, layers.size(3), layers.size(4));
      with_channels(layers.size(2), [&](auto CC) {
        cpu::forward<decltype(CC)::value>(inputs_of<scalar_t>(layers, alphas, background, maps), image.data_ptr<scalar_t>(),
                              warped.data_ptr<scalar_t>());
      });
    });
    return {image, warped};
  }
#ifdef WITH_CUDA
  const c10::cuda::CUDAGuard guard(layers.device());
  const RawInputs raw = raw_inputs(layers, alphas, background, theta);
  Tensor warp_maps = at::empty({warp_map_bytes(raw)}, layers.options().dtype(at::kByte));
  check_cuda(composite_forward_cuda(raw, image.data_ptr(), warped.data_ptr(), warp_maps.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream()),
             "composite");
  return {image, warped};
#else
  TORCH_CHECK(false, "minseg::composite: built without CUDA, got tensors on ", layers.device());
#endif
}

std::tuple<Tensor, Tensor, Tensor, Tensor> composite_backward_op(
    const Tensor& grad_image_in, const std::optional<Tensor>& grad_warped_in, const Tensor& layers_in,
    const Tensor& alphas_in, const Tensor& background_in, const std::optional<Tensor>& theta_in) {
  check_inputs(layers_in, alphas_in, background_in, theta_in);
  TORCH_CHECK(grad_image_in.sizes() == background_in.sizes(), "minseg::composite_backward: grad_image must be ",
              background_in.sizes(), " like background, got ", grad_image_in.sizes());
  check_same(grad_image_in, layers_in, "grad_image");
  if (grad_warped_in.has_value()) {
    TORCH_CHECK(grad_warped_in->sizes() == alphas_in.sizes(), "minseg::composite_backward: grad_warped must be ",
                alphas_in.sizes(), " like alphas, got ", grad_warped_in->sizes());
    check_same(*grad_warped_in, layers_in, "grad_warped");
  }
  if (layers_in.is_cpu() && is_reduced_float(layers_in)) {  // CPU half/bfloat16: compute in float
    auto grads = composite_backward_op(grad_image_in.to(at::kFloat), to_float(grad_warped_in), layers_in.to(at::kFloat),
                                       alphas_in.to(at::kFloat), background_in.to(at::kFloat), to_float(theta_in));
    const auto type = layers_in.scalar_type();
    return {std::get<0>(grads).to(type), std::get<1>(grads).to(type), std::get<2>(grads).to(type),
            std::get<3>(grads).to(type)};
  }
  const Tensor layers = layers_in.contiguous(), alphas = alphas_in.contiguous(), background = background_in.contiguous();
  const Tensor grad_image = grad_image_in.contiguous();
  const std::optional<Tensor> theta = contiguous(theta_in), grad_warped = contiguous(grad_warped_in);
  Tensor grad_layers = at::empty_like(layers, at::MemoryFormat::Contiguous);
  Tensor grad_alphas = at::empty_like(alphas, at::MemoryFormat::Contiguous);
  Tensor grad_background = at::empty_like(background, at::MemoryFormat::Contiguous);
  Tensor grad_theta = theta.has_value() ? at::empty_like(*theta, at::MemoryFormat::Contiguous)
                                        : at::empty({0}, layers.options());  // no theta, no gradient
  if (layers.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(layers.scalar_type(), "minseg::composite_backward", [&] {
      const auto maps = warp_maps_cpu<scalar_t>(theta, layers.size(3), layers.size(4));
      with_channels(layers.size(2), [&](auto CC) {
        cpu::backward<decltype(CC)::value>(inputs_of<scalar_t>(layers, alphas, background, maps), grad_image.data_ptr<scalar_t>(),
                               grad_warped.has_value() ? grad_warped->data_ptr<scalar_t>() : nullptr,
                               grad_layers.data_ptr<scalar_t>(), grad_alphas.data_ptr<scalar_t>(),
                               grad_background.data_ptr<scalar_t>(),
                               theta.has_value() ? grad_theta.data_ptr<scalar_t>() : nullptr);
      });
    });
    return {grad_layers, grad_alphas, grad_background, grad_theta};
  }
#ifdef WITH_CUDA
  const c10::cuda::CUDAGuard guard(layers.device());
  const auto acc_type = layers.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t scratch_size = backward_scratch_size(theta.has_value(), layers.size(0), layers.size(1),
                                                     layers.size(3), layers.size(4));
  Tensor scratch = at::empty({scratch_size}, layers.options().dtype(acc_type));
  const RawInputs raw = raw_inputs(layers, alphas, background, theta);
  Tensor warp_maps = at::empty({warp_map_bytes(raw)}, layers.options().dtype(at::kByte));
  check_cuda(composite_backward_cuda(raw, grad_image.data_ptr(), grad_warped.has_value() ? grad_warped->data_ptr() : nullptr,
                                     grad_layers.data_ptr(), grad_alphas.data_ptr(), grad_background.data_ptr(),
                                     theta.has_value() ? grad_theta.data_ptr() : nullptr, warp_maps.data_ptr(),
                                     scratch.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "composite_backward");
  return {grad_layers, grad_alphas, grad_background, grad_theta};
#else
  TORCH_CHECK(false, "minseg::composite_backward: built without CUDA, got tensors on ", layers.device());
#endif
}

}  // namespace
}  // namespace minseg

TORCH_LIBRARY_FRAGMENT(minseg, m) {
  m.def("composite(Tensor layers, Tensor alphas, Tensor background, Tensor? theta) -> (Tensor, Tensor)");
  m.def("composite_backward(Tensor grad_image, Tensor? grad_warped, Tensor layers, Tensor alphas, "
        "Tensor background, Tensor? theta) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minseg, CPU, m) {
  m.impl("composite", &minseg::composite_op);
  m.impl("composite_backward", &minseg::composite_backward_op);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(minseg, CUDA, m) {
  m.impl("composite", &minseg::composite_op);
  m.impl("composite_backward", &minseg::composite_backward_op);
}
#endif
