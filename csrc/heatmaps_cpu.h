// Op B: the CPU kernels of GANSeg's part heatmaps and positional encoding (included by heatmaps.cpp only; the
// per-pixel math they share with the CUDA kernels is in heatmaps.h). Forward kernels write the per-pixel maps;
// backward kernels reduce each output row to partial sums (deterministic, no atomics).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "heatmaps.h"

namespace minseg_heatmaps {
namespace {

using at::Tensor;

// Planes (one (b, k) heatmap or (b, f) encoding channel) per parallel task: at least ~32k pixels, so small
// problems run on the calling thread instead of paying a thread-pool round trip.
int64_t planes_per_task(int64_t plane) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(plane, 1)); }

template <typename scalar_t>
void heat_forward_cpu(const Tensor& params, Tensor& heat, int64_t H, int64_t W, int64_t margin) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t BK = heat.size(0) * heat.size(1), Hp = heat.size(2), Wp = heat.size(3);
  const acc_t* prm = params.data_ptr<acc_t>();
  scalar_t* out = heat.data_ptr<scalar_t>();
  at::parallel_for(0, BK, planes_per_task(Hp * Wp), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> fx(Wp), fy(Hp);  // the two 1-D Gaussian factors of one (b, k)
    for (int64_t bk = begin; bk < end; ++bk) {
      const acc_t* p = prm + 3 * bk;
      for (int64_t j = 0; j < Wp; ++j) fx[j] = gaussian_factor(pixel_centre<acc_t>(j, W, margin) - p[0], p[2]);
      for (int64_t i = 0; i < Hp; ++i) fy[i] = gaussian_factor(pixel_centre<acc_t>(i, H, margin) - p[1], p[2]);
      for (int64_t i = 0; i < Hp; ++i) {
        scalar_t* row = out + (bk * Hp + i) * Wp;
        for (int64_t j = 0; j < Wp; ++j) row[j] = scalar_t(fx[j] * fy[i]);
      }
    }
  });
}

template <typename scalar_t>
void heat_backward_rows_cpu(const Tensor& grad, const Tensor& heat, const Tensor& params, Tensor& partials,
                            int64_t H, int64_t W, int64_t margin) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t BK = heat.size(0) * heat.size(1), Hp = heat.size(2), Wp = heat.size(3);
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* h = heat.data_ptr<scalar_t>();
  const acc_t* prm = params.data_ptr<acc_t>();
  acc_t* part = partials.data_ptr<acc_t>();
  at::parallel_for(0, BK, planes_per_task(Hp * Wp), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs(Wp);
    for (int64_t j = 0; j < Wp; ++j) xs[j] = pixel_centre<acc_t>(j, W, margin);
    for (int64_t bk = begin; bk < end; ++bk) {
      const acc_t* p = prm + 3 * bk;
      for (int64_t i = 0; i < Hp; ++i) {
        const int64_t row = bk * Hp + i;
        const acc_t dy = pixel_centre<acc_t>(i, H, margin) - p[1];
        acc_t sum_v = 0, sum_v_dx = 0, sum_v_dx2 = 0;
        for (int64_t j = 0; j < Wp; ++j) {
          const acc_t v = acc_t(g[row * Wp + j]) * acc_t(h[row * Wp + j]);
          const acc_t dx = xs[j] - p[0];
          sum_v += v;
          sum_v_dx += v * dx;
          sum_v_dx2 += v * dx * dx;
        }
        part[3 * row + 0] = sum_v_dx;
        part[3 * row + 1] = sum_v * dy;
        part[3 * row + 2] = sum_v_dx2 + sum_v * dy * dy;
      }
    }
  });
}

// sin/cos of the column part a_x x_j (fills sin_col, cos_col) and of the row part a_y y_i + a_c of one (b, f).
template <typename acc_t>
void pe_tables(const acc_t* coef, int64_t H, int64_t W, int64_t margin, std::vector<acc_t>& sin_col,
               std::vector<acc_t>& cos_col, std::vector<acc_t>& sin_row, std::vector<acc_t>& cos_row) {
  for (size_t j = 0; j < sin_col.size(); ++j)
    sincos_pi(coef[0] * pixel_centre<acc_t>(j, W, margin), &sin_col[j], &cos_col[j]);
  for (size_t i = 0; i < sin_row.size(); ++i)
    sincos_pi(coef[1] * pixel_centre<acc_t>(i, H, margin) + coef[2], &sin_row[i], &cos_row[i]);
}

template <typename scalar_t>
void pe_forward_cpu(const Tensor& coefs, Tensor& out, int64_t H, int64_t W, int64_t margin) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = out.size(0), F = out.size(1) / 2, Hp = out.size(2), Wp = out.size(3);
  const acc_t* cf = coefs.data_ptr<acc_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * F, planes_per_task(Hp * Wp), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sin_col(Wp), cos_col(Wp), sin_row(Hp), cos_row(Hp);
    for (int64_t bf = begin; bf < end; ++bf) {
      const int64_t b = bf / F, f = bf % F;
      pe_tables(cf + 3 * bf, H, W, margin, sin_col, cos_col, sin_row, cos_row);
      scalar_t* out_sin = o + (b * 2 * F + f) * Hp * Wp;  // (Hp, Wp) plane of channel f
      scalar_t* out_cos = out_sin + F * Hp * Wp;          // channel F + f
      for (int64_t i = 0; i < Hp; ++i) {
        for (int64_t j = 0; j < Wp; ++j) {
          acc_t s, c;
          add_angles(sin_col[j], cos_col[j], sin_row[i], cos_row[i], &s, &c);
          out_sin[i * Wp + j] = scalar_t(s);
          out_cos[i * Wp + j] = scalar_t(c);
        }
      }
    }
  });
}

template <typename scalar_t>
void pe_backward_rows_cpu(const Tensor& grad, const Tensor& coefs, Tensor& partials, int64_t H, int64_t W,
                          int64_t margin) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = grad.size(0), F = grad.size(1) / 2, Hp = grad.size(2), Wp = grad.size(3);
  const acc_t* cf = coefs.data_ptr<acc_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  acc_t* part = partials.data_ptr<acc_t>();
  at::parallel_for(0, B * F, planes_per_task(Hp * Wp), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sin_col(Wp), cos_col(Wp), sin_row(Hp), cos_row(Hp), xs(Wp);
    for (int64_t j = 0; j < Wp; ++j) xs[j] = pixel_centre<acc_t>(j, W, margin);
    for (int64_t bf = begin; bf < end; ++bf) {
      const int64_t b = bf / F, f = bf % F;
      pe_tables(cf + 3 * bf, H, W, margin, sin_col, cos_col, sin_row, cos_row);
      const scalar_t* g_sin = g + (b * 2 * F + f) * Hp * Wp;
      const scalar_t* g_cos = g_sin + F * Hp * Wp;
      for (int64_t i = 0; i < Hp; ++i) {
        acc_t sum_t = 0, sum_t_x = 0;
        for (int64_t j = 0; j < Wp; ++j) {
          acc_t s, c;
          add_angles(sin_col[j], cos_col[j], sin_row[i], cos_row[i], &s, &c);
          const acc_t t = acc_t(g_sin[i * Wp + j]) * c - acc_t(g_cos[i * Wp + j]) * s;
          sum_t += t;
          sum_t_x += t * xs[j];
        }
        const int64_t row = bf * Hp + i;
        part[3 * row + 0] = sum_t_x;
        part[3 * row + 1] = sum_t * pixel_centre<acc_t>(i, H, margin);
        part[3 * row + 2] = sum_t;
      }
    }
  });
}

}  // namespace
}  // namespace minseg_heatmaps
