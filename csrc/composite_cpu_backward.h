// Op A, warp-and-composite: the CPU backward kernels (included by composite.cpp after composite_cpu.h, whose
// header comment describes the plan: spans without a warp, per-sample interleaved buffers with a warp, the GPU's
// per-pixel plan when there are fewer samples than threads). Grad theta accumulates in pixel order: deterministic.
#pragma once

#include "composite_cpu.h"

namespace minseg {
namespace cpu {

// ---- backward ----

// No warp: every gradient sits at its own pixel. Pixels [p0, p0 + n) of sample b in one pass over the channels:
// the suffix products P_i and c_i = m_i P_i need the alphas only, so grad_layers = c_i g and grad_background = P g
// are written while the dot products g . background and g . f_i accumulate; grad alphas = P_i q_i (+ the
// warped-alpha cotangent) then follow from the prefix recursion q_i = g . f_i - s_{i-1}, s_i = s_{i-1} + m_i q_i.
template <int CC, typename scalar_t>
void backward_span_plain(const CompositeInputs<scalar_t>& in, const scalar_t* grad_image, const scalar_t* grad_warped,
                         scalar_t* grad_layers, scalar_t* grad_alphas, scalar_t* grad_background, int64_t b,
                         int64_t p0, int64_t n, std::vector<typename Acc<scalar_t>::type>& buffer) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = in.N, C = CC > 0 ? CC : in.C, HW = in.H * in.W;
  buffer.resize((3 * N + 2) * n);
  acc_t* P = buffer.data();      // P_i = prod_{j > i} (1 - m_j), (N, n)
  acc_t* coef = P + N * n;       // c_i = m_i P_i, (N, n)
  acc_t* dot = coef + N * n;     // g . f_i, (N, n)
  acc_t* P_all = dot + N * n;    // prod_j (1 - m_j): grad background / g
  acc_t* dot_bg = P_all + n;     // g . background
  const scalar_t* alphas = in.alphas + b * N * HW + p0;  // layer i at alphas + i * HW
  std::fill(P_all, P_all + n, acc_t(1));
  for (int64_t i = N - 1; i >= 0; --i) {
    const scalar_t* m = alphas + i * HW;
    for (int64_t k = 0; k < n; ++k) {
      P[i * n + k] = P_all[k];
      coef[i * n + k] = acc_t(m[k]) * P_all[k];
      P_all[k] *= acc_t(1) - acc_t(m[k]);
    }
  }
  std::fill(dot, dot + N * n, acc_t(0));
  std::fill(dot_bg, dot_bg + n, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* g = grad_image + (b * C + c) * HW + p0;
    const scalar_t* background = in.background + (b * C + c) * HW + p0;
    scalar_t* grad_b = grad_background + (b * C + c) * HW + p0;
    for (int64_t k = 0; k < n; ++k) {
      const acc_t gk = g[k];
      dot_bg[k] += gk * acc_t(background[k]);
      grad_b[k] = scalar_t(P_all[k] * gk);
    }
    for (int64_t i = 0; i < N; ++i) {
      const scalar_t* f = in.layers + ((b * N + i) * C + c) * HW + p0;
      scalar_t* grad_f = grad_layers + ((b * N + i) * C + c) * HW + p0;
      acc_t* d = dot + i * n;
      const acc_t* ci = coef + i * n;
      for (int64_t k = 0; k < n; ++k) {
        const acc_t gk = g[k];
        d[k] += gk * acc_t(f[k]);
        grad_f[k] = scalar_t(ci[k] * gk);
      }
    }
  }
  acc_t* s = dot_bg;  // s_{i-1} = g . x_{i-1}, updated in place
  for (int64_t i = 0; i < N; ++i) {
    const scalar_t* m = alphas + i * HW;
    const scalar_t* gw = grad_warped != nullptr ? grad_warped + (b * N + i) * HW + p0 : nullptr;
    scalar_t* grad_m = grad_alphas + (b * N + i) * HW + p0;
    for (int64_t k = 0; k < n; ++k) {
      const acc_t q = dot[i * n + k] - s[k];
      grad_m[k] = scalar_t(P[i * n + k] * q + (gw != nullptr ? acc_t(gw[k]) : acc_t(0)));
      s[k] += acc_t(m[k]) * q;
    }
  }
}

// A layer at one output pixel with a warp: alpha m, dot = g . f over the channels, and their derivatives along
// the sample point. g: the pixel's cotangent in the interleaved layout (Cp lanes, zero from lane C on).
template <typename acc_t> struct LayerAt {
  acc_t m, dot, dm_x, dm_y, dd_x, dd_y;
};

// Interior cell: corner = the cell's top-left corner in the interleaved layout.
template <int CC, typename acc_t>
inline LayerAt<acc_t> layer_at_interior(const acc_t* corner, const Pack<acc_t>* g, int64_t C_runtime, int64_t W, acc_t tx,
                                        acc_t ty) {
  const int64_t C = CC > 0 ? CC : C_runtime, Cp = packed_channels(C);
  constexpr int64_t kPacketsFixed = CC > 0 ? (CC + 1 + 3) / 4 : 0;
  const int64_t packets = kPacketsFixed > 0 ? kPacketsFixed : Cp / 4;
  const acc_t ux = acc_t(1) - tx, uy = acc_t(1) - ty;
  LayerAt<acc_t> out{0, 0, 0, 0, 0, 0};
  for (int64_t k = 0; k < packets; ++k) {
    const Pack<acc_t> v0 = Pack<acc_t>::load(corner + 4 * k), v1 = Pack<acc_t>::load(corner + Cp + 4 * k);
    const Pack<acc_t> v2 = Pack<acc_t>::load(corner + W * Cp + 4 * k);
    const Pack<acc_t> v3 = Pack<acc_t>::load(corner + (W + 1) * Cp + 4 * k);
    const Pack<acc_t> top = v0 + (v1 - v0) * tx, bottom = v2 + (v3 - v2) * tx;
    const Pack<acc_t> value = top + (bottom - top) * ty;
    const Pack<acc_t> d_x = (v1 - v0) * uy + (v3 - v2) * ty, d_y = (v2 - v0) * ux + (v3 - v1) * tx;
    const Pack<acc_t> gk = g[k];
    const Pack<acc_t> gv = gk * value, gx = gk * d_x, gy = gk * d_y;
    for (int lane = 0; lane < 4; ++lane) {
      if (4 * k + lane < C) {
        out.dot += gv.lane(lane);
        out.dd_x += gx.lane(lane);
        out.dd_y += gy.lane(lane);
      } else if (4 * k + lane == C) {
        out.m = value.lane(lane);
        out.dm_x = d_x.lane(lane);
        out.dm_y = d_y.lane(lane);
      }
    }
  }
  return out;
}

// Partial cell (rare: the border): composite.h's corner code on the planar tensors; also returns the corners.
template <typename scalar_t, typename acc_t>
#if defined(__GNUC__)
__attribute__((noinline))
#endif
LayerAt<acc_t> layer_at_partial(const PixelAffine<acc_t>& a, const scalar_t* layer, const scalar_t* alpha,
                                const acc_t* g, int64_t C, int64_t h, int64_t w, int64_t H, int64_t W,
                                Bilinear<acc_t>* corners) {
  const int64_t HW = H * W;
  *corners = bilinear(footprint(a, w, h, H, W), H, W);
  const Sampled<acc_t> m = sample(alpha, *corners);
  LayerAt<acc_t> out{m.value, 0, m.d_ix, m.d_iy, 0, 0};
  for (int64_t c = 0; c < C; ++c) {
    const Sampled<acc_t> f = sample(layer + c * HW, *corners);
    out.dot += g[c] * f.value;
    out.dd_x += g[c] * f.d_ix;
    out.dd_y += g[c] * f.d_iy;
  }
  return out;
}

// Per-thread buffers of the warp backward.
template <typename acc_t> struct WarpBuffers {
  std::vector<acc_t> packed;  // the sample's layers interleaved, (N, HW, Cp)
  std::vector<acc_t> grads;   // their gradients, same layout
  std::vector<acc_t> small;   // g, prefix, theta sums, gix and giy of a row, xn
  std::vector<Pack<acc_t>> g_packs;      // g in packets (for C > 3)
  std::vector<Pack<acc_t>> alpha_lanes;  // 1 in the alpha lane, 0 elsewhere, per packet
  std::vector<RowCells<acc_t>> cells;    // the current row's sample points, per layer
};

// A warp, sample b owned by the calling thread: per output pixel a forward sweep of scalar prefixes over the
// layers below the top and a backward sweep of suffix products (composite.h), the gradients scattered in pixel
// order into the interleaved buffer, then de-interleaved into grad_layers and grad_alphas.
template <int CC, typename scalar_t>
void backward_sample_warp(const CompositeInputs<scalar_t>& in, const scalar_t* grad_image, const scalar_t* grad_warped,
                          int64_t b, scalar_t* grad_layers_all, scalar_t* grad_alphas_all, scalar_t* grad_background,
                          scalar_t* grad_theta, WarpBuffers<typename Acc<scalar_t>::type>& buffers) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = in.N, C = CC > 0 ? CC : in.C, H = in.H, W = in.W, HW = H * W, Cp = packed_channels(C);
  constexpr int64_t kPacketsFixed = CC > 0 ? (CC + 1 + 3) / 4 : 0;
  const int64_t packets = kPacketsFixed > 0 ? kPacketsFixed : Cp / 4;
  if (int64_t(buffers.packed.size()) != N * HW * Cp) buffers.packed.assign(N * HW * Cp, acc_t(0));  // padding stays 0
  buffers.grads.assign(N * HW * Cp, acc_t(0));
  buffers.small.assign(C + 2 * N + 6 * N + 2 * N * W + W, acc_t(0));
  acc_t* packed = buffers.packed.data();
  acc_t* grads = buffers.grads.data();
  acc_t* g = buffers.small.data();  // the pixel's cotangent, C values
  // Packets are built whole from scalars (never lane by lane: a narrow store read back wide stalls the CPU).
  buffers.g_packs.resize(packets);
  buffers.alpha_lanes.resize(packets);
  Pack<acc_t> g_fixed[kPacketsFixed > 0 ? kPacketsFixed : 1], alpha_fixed[kPacketsFixed > 0 ? kPacketsFixed : 1];
  Pack<acc_t>* g_packs = kPacketsFixed > 0 ? g_fixed : buffers.g_packs.data();  // g in Cp lanes, zero from lane C
  Pack<acc_t>* alpha_lane = kPacketsFixed > 0 ? alpha_fixed : buffers.alpha_lanes.data();
  for (int64_t k = 0; k < packets; ++k) {
    auto one_at = [&](int64_t c) { return c == C ? acc_t(1) : acc_t(0); };
    alpha_lane[k] = Pack<acc_t>::make(one_at(4 * k), one_at(4 * k + 1), one_at(4 * k + 2), one_at(4 * k + 3));
  }
  acc_t* prefix = g + C;            // (m_i, q_i) of layers 0..N-2 at the pixel
  acc_t* sums = prefix + 2 * N;     // grad theta sums of add_theta_terms, (N, 6)
  acc_t* gi_row = sums + 6 * N;     // gix, giy of the current row, (N, 2, W)
  acc_t* xn = gi_row + 2 * N * W;   // xn of every column
  for (int64_t w = 0; w < W; ++w) xn[w] = acc_t(2 * w + 1) / acc_t(W) - 1;
  const scalar_t* layers = in.layers + b * N * C * HW;
  const scalar_t* alphas = in.alphas + b * N * HW;
  const WarpMap<acc_t>* maps = in.warp + b * N;
  for (int64_t i = 0; i < N; ++i) {
    interleave<CC>(layers + i * C * HW, alphas + i * HW, C, HW, packed + i * HW * Cp);
  }
  // A layer at an output pixel, any cell kind (the packed buffer for interior cells, the planar tensors else).
  auto at_pixel = [&](int64_t i, const Cell<acc_t>& cell, int64_t h, int64_t w, Bilinear<acc_t>* corners) {
    if (cell.kind == Cell<acc_t>::kInterior)
      return layer_at_interior<CC>(packed + (i * HW + cell.o) * Cp, g_packs, C, W, cell.tx, cell.ty);
    if (cell.kind == Cell<acc_t>::kOutside) return LayerAt<acc_t>{0, 0, 0, 0, 0, 0};
    return layer_at_partial(maps[i].to_input, layers + i * C * HW, alphas + i * HW, g, C, h, w, H, W, corners);
  };
  buffers.cells.resize(N);
  RowCells<acc_t>* cells = buffers.cells.data();
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < N; ++i) cells[i] = RowCells<acc_t>(maps[i].to_input, h, H, W);
    for (int64_t w = 0; w < W; ++w) {
      const int64_t p = h * W + w;
      const scalar_t* g_in = grad_image + b * C * HW + p;
      const scalar_t* background = in.background + b * C * HW + p;
      acc_t s = 0;  // s_{i-1} = g . x_{i-1}
      for (int64_t c = 0; c < C; ++c) {
        g[c] = g_in[c * HW];
        s += g[c] * acc_t(background[c * HW]);
      }
      for (int64_t k = 0; k < packets; ++k) {
        auto g_at = [&](int64_t c) { return c < C ? g[c] : acc_t(0); };
        g_packs[k] = Pack<acc_t>::make(g_at(4 * k), g_at(4 * k + 1), g_at(4 * k + 2), g_at(4 * k + 3));
      }
      for (int64_t i = 0; i + 1 < N; ++i) {  // forward sweep below the top layer
        Bilinear<acc_t> corners;
        const LayerAt<acc_t> at = at_pixel(i, cells[i](w), h, w, &corners);
        const acc_t q = at.dot - s;
        prefix[2 * i] = at.m;
        prefix[2 * i + 1] = q;
        s += at.m * q;
      }
      acc_t P = 1;  // P_i = prod_{j > i} (1 - m_j)
      for (int64_t i = N - 1; i >= 0; --i) {  // backward sweep
        const Cell<acc_t> cell = cells[i](w);
        Bilinear<acc_t> corners;
        const LayerAt<acc_t> at = at_pixel(i, cell, h, w, &corners);
        const acc_t m = i == N - 1 ? at.m : prefix[2 * i];
        const acc_t q = i == N - 1 ? at.dot - s : prefix[2 * i + 1];
        const acc_t c_i = m * P;
        const acc_t e_i = P * q + (grad_warped != nullptr ? acc_t(grad_warped[(b * N + i) * HW + p]) : acc_t(0));
        P *= acc_t(1) - m;
        gi_row[2 * i * W + w] = c_i * at.dd_x + e_i * at.dm_x;  // zero outside: the derivatives are
        gi_row[(2 * i + 1) * W + w] = c_i * at.dd_y + e_i * at.dm_y;
        if (cell.kind == Cell<acc_t>::kOutside) continue;  // no corner inside: no gradient
        acc_t* grad = grads + i * HW * Cp;
        if (cell.kind == Cell<acc_t>::kInterior) {
          const acc_t tx = cell.tx, ty = cell.ty, ux = acc_t(1) - tx, uy = acc_t(1) - ty;
          const acc_t weight[4] = {ux * uy, tx * uy, ux * ty, tx * ty};
          acc_t* corner[4] = {grad + cell.o * Cp, grad + (cell.o + 1) * Cp, grad + (cell.o + W) * Cp,
                              grad + (cell.o + W + 1) * Cp};
          for (int64_t k = 0; k < packets; ++k) {
            const Pack<acc_t> t = g_packs[k] * c_i + alpha_lane[k] * e_i;  // c_i g, and e_i in the alpha lane
            for (int j = 0; j < 4; ++j) (Pack<acc_t>::load(corner[j] + 4 * k) + t * weight[j]).store(corner[j] + 4 * k);
          }
        } else {
          for (int k = 0; k < 4; ++k) {
            if (!corners.inside[k]) continue;
            const acc_t weight = corners.weight(k), weight_c = weight * c_i;
            acc_t* target = grad + corners.offset[k] * Cp;
            for (int64_t c = 0; c < C; ++c) target[c] += weight_c * g[c];
            target[C] += weight * e_i;
          }
        }
      }
      scalar_t* grad_b = grad_background + b * C * HW + p;
      for (int64_t c = 0; c < C; ++c) grad_b[c * HW] = scalar_t(P * g[c]);
    }
    const acc_t yn = acc_t(2 * h + 1) / acc_t(H) - 1;
    for (int64_t i = 0; i < N; ++i) {  // the row's grad theta terms, in pixel order
      const acc_t* gix = gi_row + 2 * i * W;
      const acc_t* giy = gix + W;
      acc_t x_xn = 0, x_sum = 0, y_xn = 0, y_sum = 0;
      for (int64_t w = 0; w < W; ++w) {
        x_xn += gix[w] * xn[w];
        x_sum += gix[w];
        y_xn += giy[w] * xn[w];
        y_sum += giy[w];
      }
      acc_t* t = sums + 6 * i;
      t[0] += x_xn;
      t[1] += x_sum * yn;
      t[2] += x_sum;
      t[3] += y_xn;
      t[4] += y_sum * yn;
      t[5] += y_sum;
    }
  }
  for (int64_t i = 0; i < N; ++i) {
    store_theta_grad(sums + 6 * i, H, W, grad_theta + (b * N + i) * 6);
    const acc_t* grad = grads + i * HW * Cp;
    scalar_t* grad_f = grad_layers_all + (b * N + i) * C * HW;
    scalar_t* grad_m = grad_alphas_all + (b * N + i) * HW;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < HW; ++p) grad_f[c * HW + p] = scalar_t(grad[p * Cp + c]);
    for (int64_t p = 0; p < HW; ++p) grad_m[p] = scalar_t(grad[p * Cp + C]);
  }
}

template <int CHUNK, typename scalar_t>
void gather(const CompositeInputs<scalar_t>& in, const typename Acc<scalar_t>::type* coef, const scalar_t* grad_image,
            scalar_t* grad_layers, scalar_t* grad_alphas) {
  const int64_t N = in.N, H = in.H, W = in.W;
  at::parallel_for(0, in.B * N * H, row_grain(1, in.C, W), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)  // row = (b * N + i) * H + sy
      for (int64_t sx = 0; sx < W; ++sx)
        gather_pixel<CHUNK>(in, coef, grad_image, row / (N * H), row / H % N, row % H, sx, grad_layers, grad_alphas);
  });
}

template <int CC, typename scalar_t>
void backward(const CompositeInputs<scalar_t>& in, const scalar_t* grad_image, const scalar_t* grad_warped,
              scalar_t* grad_layers, scalar_t* grad_alphas, scalar_t* grad_background, scalar_t* grad_theta) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t B = in.B, N = in.N, C = in.C, H = in.H, W = in.W, HW = H * W;
  if (in.warp == nullptr) {  // no warp: every gradient is written at its own pixel in one pass
    const int64_t spans = (HW + kSpan - 1) / kSpan;
    const int64_t grain = std::max<int64_t>(1, 32768 / (std::min(HW, kSpan) * N * (C + 1)));
    at::parallel_for(0, B * spans, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buffer;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / spans, p0 = t % spans * kSpan;
        backward_span_plain<CC>(in, grad_image, grad_warped, grad_layers, grad_alphas, grad_background, b, p0,
                                std::min(kSpan, HW - p0), buffer);
      }
    });
    return;
  }
  if (B >= at::get_num_threads()) {  // a warp, and a sample for every thread: scatter per sample
    at::parallel_for(0, B, sample_grain(N, C, H, W), [&](int64_t begin, int64_t end) {
      WarpBuffers<acc_t> buffers;
      for (int64_t b = begin; b < end; ++b)
        backward_sample_warp<CC>(in, grad_image, grad_warped, b, grad_layers, grad_alphas, grad_background, grad_theta,
                                 buffers);
    });
    return;
  }
  // a warp and few samples: the GPU's plan, parallel over pixels, with the per-pixel code of composite.h
  const at::Tensor coef_tensor = at::empty({backward_scratch_size(true, B, N, H, W)}, at::dtype<acc_t>());
  acc_t* coef = coef_tensor.data_ptr<acc_t>();  // (B, N, kWarpSlots, H, W)
  at::parallel_for(0, B * H, row_grain(N, C, W), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, h = row % H;
      for (int64_t w = 0; w < W; ++w) {
        const Scratch<acc_t> scratch_at{coef + b * N * kWarpSlots * HW + h * W + w, kWarpSlots * HW, HW};
        const WarpSink<acc_t> sink{scratch_at};
        backward_pixel(in, grad_image, grad_warped, scratch_at, b, h, w, grad_background, sink);
      }
    }
  });
  if (C <= 4)
    gather<4>(in, coef, grad_image, grad_layers, grad_alphas);
  else
    gather<16>(in, coef, grad_image, grad_layers, grad_alphas);
  at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi) {
      acc_t sums[6] = {0, 0, 0, 0, 0, 0};
      const acc_t* gix = coef + (bi * kWarpSlots + 2) * HW;
      const acc_t* giy = coef + (bi * kWarpSlots + 3) * HW;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) add_theta_terms(sums, gix[h * W + w], giy[h * W + w], h, w, H, W);
      store_theta_grad(sums, H, W, grad_theta + bi * 6);
    }
  });
}

}  // namespace cpu
}  // namespace minseg
