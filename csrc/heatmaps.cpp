// Op B: GANSeg's part heatmaps and positional encoding (GANSeg sec. 3, appendix E): input checks, the
// dispatch to the CPU kernels (heatmaps_cpu.h) or the CUDA ones, and the registration of minseg::part_heatmaps,
// minseg::positional_encoding and their backward ops (CPU and CUDA).
// Autograd and fake (meta) kernels are registered from Python (minseg/ops/heatmaps.py).
//
// Forward: a kernel writes the per-pixel maps; the embedding map is a batched matmul (B, D, K) @ (B, K, H'W').
// Backward: the matmuls (grad_embeddings = heat . g^T, heat's total gradient = grad_heat + embeddings . g) are
// ATen bmm/baddbmm; the kernels reduce each output row to three partial sums (deterministic, no atomics), summed
// over rows by ATen, and tiny matmuls chain those sums to the inputs.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "heatmaps.h"
#include "heatmaps_cpu.h"

namespace minseg_heatmaps {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------- input checks

// `t` (called `name`) must be a floating-point tensor on the device and of the dtype of the op's first input.
void check_float(const Tensor& t, const char* op, const char* name, const Tensor& first, const char* first_name) {
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == first.device(), op, ": ", name, " is on ", t.device(), " but ", first_name, " on ",
              first.device(), "; put all inputs on one device");
  TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              first_name, " ", first.scalar_type(), "; use one dtype");
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), op, ": ", name, " must be on the CPU or a CUDA device");
}

void check_size(const char* op, int64_t height, int64_t width, int64_t margin) {
  TORCH_CHECK(height > 0 && width > 0, op, ": size must be positive, got (", height, ", ", width, ")");
  TORCH_CHECK(margin >= 0, op, ": margin must be >= 0, got ", margin);
}

void check_heatmap_args(const char* op, const Tensor& centers, const Tensor& sigmas, const Tensor& embeddings) {
  check_float(centers, op, "centers", centers, "centers");
  check_float(sigmas, op, "sigmas", centers, "centers");
  check_float(embeddings, op, "embeddings", centers, "centers");
  TORCH_CHECK(centers.dim() == 3 && centers.size(2) == 2, op, ": centers must be (B, K, 2), got ", centers.sizes());
  TORCH_CHECK(sigmas.dim() == 2 && sigmas.size(0) == centers.size(0) && sigmas.size(1) == centers.size(1), op,
              ": sigmas must be (B, K) = (", centers.size(0), ", ", centers.size(1), "), got ", sigmas.sizes());
  TORCH_CHECK(embeddings.dim() == 3 && embeddings.size(0) == centers.size(0) && embeddings.size(1) == centers.size(1),
              op, ": embeddings must be (B, K, D) with (B, K) = (", centers.size(0), ", ", centers.size(1), "), got ",
              embeddings.sizes());
}

void check_encoding_args(const char* op, const Tensor& points, const Tensor& weight, const Tensor& bias) {
  check_float(points, op, "points", points, "points");
  check_float(weight, op, "weight", points, "points");
  check_float(bias, op, "bias", points, "points");
  TORCH_CHECK(points.dim() == 3 && points.size(2) == 2, op, ": points must be (B, P, 2), got ", points.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == 2 * points.size(1), op, ": weight must be (F, 2P) = (F, ",
              2 * points.size(1), "), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), op, ": bias must be (F,) = (", weight.size(0),
              ",), got ", bias.sizes());
}

void check_grad(const char* op, const char* name, const Tensor& grad, at::IntArrayRef expected, const Tensor& first,
                const char* first_name) {
  check_float(grad, op, name, first, first_name);
  TORCH_CHECK(grad.sizes() == expected, op, ": ", name, " must be ", expected, ", got ", grad.sizes());
}

// Parameters, coefficients and partial sums live in the accumulation type: double for double, else float.
at::ScalarType acc_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

#ifdef WITH_CUDA
Storage storage_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Storage::Float32;
    case at::kDouble: return Storage::Float64;
    case at::kHalf: return Storage::Float16;
    case at::kBFloat16: return Storage::BFloat16;
    default:
      TORCH_CHECK(false, "minseg: CUDA kernels support float32, float64, float16 and bfloat16, got ", t.scalar_type());
  }
}
#endif

// ------------------------------------------------------------------------------------------------------- ops

// [c_x, c_y, 1 / sigma^2] per (b, k): (B K, 3) in the accumulation type.
Tensor gaussian_params(const Tensor& centers, const Tensor& sigmas) {
  const Tensor c = centers.to(acc_type(centers)).reshape({-1, 2});
  const Tensor s = sigmas.to(acc_type(centers)).reshape({-1, 1});
  return at::cat({c, (s * s).reciprocal()}, 1).contiguous();
}

// [a_x, a_y, a_c] per (b, f), with u(p) = W.[p - x_1, ..., p - x_P] + b = a_x p_x + a_y p_y + a_c: (B, F, 3).
Tensor encoding_coefficients(const Tensor& points, const Tensor& weight, const Tensor& bias) {
  const int64_t B = points.size(0), F = weight.size(0);
  const Tensor w = weight.to(acc_type(points));                                  // (F, 2P)
  const Tensor x = points.to(w.scalar_type()).reshape({B, -1});                  // (B, 2P)
  const Tensor axy = w.view({F, -1, 2}).sum(1).unsqueeze(0).expand({B, F, 2});  // (B, F, 2)
  const Tensor ac = bias.to(w.scalar_type()) - at::matmul(x, w.t());             // (B, F)
  return at::cat({axy, ac.unsqueeze(2)}, 2).contiguous();
}

std::tuple<Tensor, Tensor> part_heatmaps(const Tensor& centers_in, const Tensor& sigmas_in,
                                         const Tensor& embeddings_in, int64_t height, int64_t width, int64_t margin) {
  const char* op = "minseg::part_heatmaps";
  check_heatmap_args(op, centers_in, sigmas_in, embeddings_in);
  check_size(op, height, width, margin);
  const Tensor embeddings = embeddings_in.contiguous();
  const int64_t B = centers_in.size(0), K = centers_in.size(1), D = embeddings.size(2);
  const int64_t Hp = height + 2 * margin, Wp = width + 2 * margin;
  const Tensor params = gaussian_params(centers_in, sigmas_in);  // (B K, 3)
  Tensor heat = at::empty({B, K, Hp, Wp}, centers_in.options());  // (B, K, H', W')
  if (heat.numel() > 0) {
#ifdef WITH_CUDA
    if (heat.is_cuda()) {
      const c10::cuda::CUDAGuard guard(heat.device());
      heat_forward_cuda(params.data_ptr(), heat.data_ptr(), storage_of(heat), B * K, height, width, margin,
                        at::cuda::getCurrentCUDAStream());
    } else
#endif
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, heat.scalar_type(), "part_heatmaps",
                                      [&] { heat_forward_cpu<scalar_t>(params, heat, height, width, margin); });
  }
  const Tensor embedding_map = at::bmm(embeddings.transpose(1, 2), heat.view({B, K, Hp * Wp}));  // (B, D, H' W')
  return {heat, embedding_map.view({B, D, Hp, Wp})};
}

// grad_heat / grad_embedding_map may be None (an unused output): it then contributes nothing.
std::tuple<Tensor, Tensor, Tensor> part_heatmaps_backward(const std::optional<Tensor>& grad_heat,
                                                          const std::optional<Tensor>& grad_embedding_map,
                                                          const Tensor& heat_in, const Tensor& centers,
                                                          const Tensor& sigmas, const Tensor& embeddings_in,
                                                          int64_t height, int64_t width, int64_t margin) {
  const char* op = "minseg::part_heatmaps_backward";
  check_heatmap_args(op, centers, sigmas, embeddings_in);
  check_size(op, height, width, margin);
  const int64_t B = centers.size(0), K = centers.size(1), D = embeddings_in.size(2);
  const int64_t Hp = height + 2 * margin, Wp = width + 2 * margin;
  check_grad(op, "heat", heat_in, {B, K, Hp, Wp}, centers, "centers");
  const Tensor heat = heat_in.contiguous().view({B, K, Hp * Wp});
  const Tensor embeddings = embeddings_in.contiguous();
  Tensor g_heat, grad_embeddings;  // heat's total gradient (B, K, H' W'), (B, K, D)
  if (grad_heat.has_value()) {
    check_grad(op, "grad_heat", *grad_heat, {B, K, Hp, Wp}, centers, "centers");
    g_heat = grad_heat->reshape({B, K, Hp * Wp});
  }
  if (grad_embedding_map.has_value()) {
    check_grad(op, "grad_embedding_map", *grad_embedding_map, {B, D, Hp, Wp}, centers, "centers");
    const Tensor g_map = grad_embedding_map->contiguous().view({B, D, Hp * Wp});
    // heat feeds both outputs: its total gradient is grad_heat + embeddings . grad_embedding_map
    g_heat = g_heat.defined() ? at::baddbmm(g_heat, embeddings, g_map) : at::bmm(embeddings, g_map);
    grad_embeddings = at::bmm(heat, g_map.transpose(1, 2));
  } else {
    grad_embeddings = at::zeros_like(embeddings);
  }
  if (!g_heat.defined()) g_heat = at::zeros_like(heat);
  g_heat = g_heat.contiguous().view({B, K, Hp, Wp});

  const Tensor params = gaussian_params(centers, sigmas);  // (B K, 3)
  Tensor partials = at::zeros({B * K, Hp, 3}, params.options());
  if (partials.numel() > 0) {
    const Tensor heat4 = heat.view({B, K, Hp, Wp});
#ifdef WITH_CUDA
    if (heat.is_cuda()) {
      TORCH_CHECK(B * K * Hp < (int64_t(1) << 31), op, ": too many output rows for one launch");
      const c10::cuda::CUDAGuard guard(heat.device());
      heat_backward_rows_cuda(g_heat.data_ptr(), heat4.data_ptr(), params.data_ptr(), partials.data_ptr(),
                              storage_of(heat), B * K, height, width, margin, at::cuda::getCurrentCUDAStream());
    } else
#endif
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, heat.scalar_type(), "part_heatmaps_backward", [&] {
        heat_backward_rows_cpu<scalar_t>(g_heat, heat4, params, partials, height, width, margin);
      });
  }
  // sums over pixels of g h (dx, dy, dx^2 + dy^2); dh/dc = 2 h d / sigma^2, dh/dsigma = 2 h |d|^2 / sigma^3
  const Tensor sums = partials.sum(1);                             // (B K, 3)
  const Tensor inv_sigma2 = params.select(1, 2).unsqueeze(1);     // (B K, 1)
  const Tensor grad_centers = (2 * sums.slice(1, 0, 2) * inv_sigma2).view({B, K, 2});
  const Tensor sigma = sigmas.reshape({-1}).to(sums.scalar_type());
  const Tensor grad_sigmas = 2 * sums.select(1, 2) * inv_sigma2.squeeze(1) / sigma;
  return {grad_centers.to(centers.scalar_type()), grad_sigmas.view({B, K}).to(centers.scalar_type()),
          grad_embeddings.contiguous()};
}

Tensor positional_encoding(const Tensor& points, const Tensor& weight, const Tensor& bias, int64_t height,
                           int64_t width, int64_t margin) {
  const char* op = "minseg::positional_encoding";
  check_encoding_args(op, points, weight, bias);
  check_size(op, height, width, margin);
  const int64_t B = points.size(0), F = weight.size(0);
  const Tensor coefs = encoding_coefficients(points, weight, bias);  // (B, F, 3)
  Tensor out = at::empty({B, 2 * F, height + 2 * margin, width + 2 * margin}, points.options());
  if (out.numel() == 0) return out;
#ifdef WITH_CUDA
  if (out.is_cuda()) {
    const c10::cuda::CUDAGuard guard(out.device());
    pe_forward_cuda(coefs.data_ptr(), out.data_ptr(), storage_of(out), B, F, height, width, margin,
                    at::cuda::getCurrentCUDAStream());
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "positional_encoding",
                                  [&] { pe_forward_cpu<scalar_t>(coefs, out, height, width, margin); });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> positional_encoding_backward(const Tensor& grad_in, const Tensor& points,
                                                                const Tensor& weight, const Tensor& bias,
                                                                int64_t height, int64_t width, int64_t margin) {
  const char* op = "minseg::positional_encoding_backward";
  check_encoding_args(op, points, weight, bias);
  check_size(op, height, width, margin);
  const int64_t B = points.size(0), P = points.size(1), F = weight.size(0);
  const int64_t Hp = height + 2 * margin, Wp = width + 2 * margin;
  check_grad(op, "grad", grad_in, {B, 2 * F, Hp, Wp}, points, "points");
  const Tensor grad = grad_in.contiguous();
  const Tensor coefs = encoding_coefficients(points, weight, bias);  // (B, F, 3)
  Tensor partials = at::zeros({B * F, Hp, 3}, coefs.options());
  if (partials.numel() > 0) {
#ifdef WITH_CUDA
    if (grad.is_cuda()) {
      TORCH_CHECK(B * F * Hp < (int64_t(1) << 31), op, ": too many output rows for one launch");
      const c10::cuda::CUDAGuard guard(grad.device());
      pe_backward_rows_cuda(grad.data_ptr(), coefs.data_ptr(), partials.data_ptr(), storage_of(grad), B, F, height,
                            width, margin, at::cuda::getCurrentCUDAStream());
    } else
#endif
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "positional_encoding_bwd", [&] {
        pe_backward_rows_cpu<scalar_t>(grad, coefs, partials, height, width, margin);
      });
  }
  // dL/du = pi (g_sin cos - g_cos sin); grad of [a_x, a_y, a_c] per (b, f) = sums over pixels of dL/du (x, y, 1)
  const Tensor g_coef = partials.sum(1).view({B, F, 3}) * kPi;  // (B, F, 3)
  const Tensor g_ac = g_coef.select(2, 2);                       // (B, F)
  const Tensor w = weight.to(g_coef.scalar_type());              // (F, 2P)
  const Tensor x = points.to(w.scalar_type()).reshape({B, 2 * P});  // (B, 2P)
  // a_x = sum_i W[f, 2i], a_y = sum_i W[f, 2i + 1], a_c = b - W . [x_1, ..., x_P]
  const Tensor grad_weight = g_coef.slice(2, 0, 2).sum(0).repeat({1, P}) - at::matmul(g_ac.t(), x);  // (F, 2P)
  const Tensor grad_points = -at::matmul(g_ac, w).view({B, P, 2});
  const Tensor grad_bias = g_ac.sum(0);
  const auto dtype = points.scalar_type();
  return {grad_points.to(dtype).contiguous(), grad_weight.to(dtype).contiguous(), grad_bias.to(dtype).contiguous()};
}

}  // namespace
}  // namespace minseg_heatmaps

TORCH_LIBRARY_FRAGMENT(minseg, m) {
  m.set_python_module("minseg.ops.heatmaps");
  m.def("part_heatmaps(Tensor centers, Tensor sigmas, Tensor embeddings, int height, int width, int margin) "
        "-> (Tensor heat, Tensor embedding_map)");
  m.def("part_heatmaps_backward(Tensor? grad_heat, Tensor? grad_embedding_map, Tensor heat, Tensor centers, "
        "Tensor sigmas, Tensor embeddings, int height, int width, int margin) -> (Tensor, Tensor, Tensor)");
  m.def("positional_encoding(Tensor points, Tensor weight, Tensor bias, int height, int width, int margin) -> Tensor");
  m.def("positional_encoding_backward(Tensor grad, Tensor points, Tensor weight, Tensor bias, int height, int width, "
        "int margin) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minseg, CPU, m) {
  m.impl("part_heatmaps", &minseg_heatmaps::part_heatmaps);
  m.impl("part_heatmaps_backward", &minseg_heatmaps::part_heatmaps_backward);
  m.impl("positional_encoding", &minseg_heatmaps::positional_encoding);
  m.impl("positional_encoding_backward", &minseg_heatmaps::positional_encoding_backward);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(minseg, CUDA, m) {
  m.impl("part_heatmaps", &minseg_heatmaps::part_heatmaps);
  m.impl("part_heatmaps_backward", &minseg_heatmaps::part_heatmaps_backward);
  m.impl("positional_encoding", &minseg_heatmaps::positional_encoding);
  m.impl("positional_encoding_backward", &minseg_heatmaps::positional_encoding_backward);
}
#endif
