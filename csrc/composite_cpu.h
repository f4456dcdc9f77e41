// Op A, warp-and-composite: the CPU kernels, forward here and backward in composite_cpu_backward.h (included by
// composite.cpp only; the CUDA kernels never see these files). They compute what composite.h defines, in loops shaped
// for a CPU core rather than one thread per pixel:
//
//   - No warp: spans of up to kSpan contiguous pixels of one sample, one channel at a time, in loops the compiler
//     vectorises; the backward reads every input plane once (C = 64 feature blends are memory-bound streams).
//   - A warp, B >= threads (each thread owns whole samples): the layers of one sample are first interleaved into
//     a per-thread buffer, pixel-major with the alpha as one more channel, (H, W, Cp) with Cp = C + 1 rounded up to
//     a multiple of 4 (RGBA for C = 3). A bilinear tap is then one 4-lane load per corner and packet of 4 channels
//     instead of one scalar load per corner and channel, and the backward scatters one 4-lane add per corner into
//     an interleaved gradient buffer, de-interleaved into grad_layers / grad_alphas at the end. Both buffers stay
//     in L2 (256 KB each for one 128 x 128 RGBA layer). Every sample point is classified once per layer
//     (RowCells): interior (its 2x2 cell inside the image: one base offset, no per-corner tests), outside (reads
//     zeros only: no contribution, no gradient) or partial (straddling the border: composite.h's corner code).
//     Grad theta accumulates per row, then per sample, in pixel order: deterministic.
//   - A warp, B < threads (e.g. one large image): the forward runs rows in parallel on the planar tensors; the
//     backward runs the GPU's plan with composite.h's per-pixel functions (scratch, gather, reduction), so the
//     tests (B = 1, two threads) check on the CPU the arithmetic the GPU runs.
//
// Channel loops are unrolled for C = 1 and C = 3 (template parameter CC; 0 = any C).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "composite.h"

namespace minseg {
namespace cpu {

// Rows (b, h) per parallel task: enough work per task to amortise the scheduling.
inline int64_t row_grain(int64_t N, int64_t C, int64_t W) { return std::max<int64_t>(1, 16384 / (W * N * (C + 1))); }

// Samples per parallel task: small problems run on the calling thread.
inline int64_t sample_grain(int64_t N, int64_t C, int64_t H, int64_t W) {
  return std::max<int64_t>(1, 32768 / (N * (C + 1) * H * W));
}

// ---- 4 lanes of float or double, in SIMD registers (GCC/Clang vector extensions; plain arrays elsewhere) ----

#if defined(__GNUC__) || defined(__clang__)
template <typename T> struct VectorOf;
template <> struct VectorOf<float> { typedef float type __attribute__((vector_size(16))); };
template <> struct VectorOf<double> { typedef double type __attribute__((vector_size(32))); };
template <typename T> struct Pack {
  typename VectorOf<T>::type v;
  static Pack load(const T* p) {
    Pack r;
    std::memcpy(&r.v, p, sizeof(r.v));
    return r;
  }
  static Pack make(T a, T b, T c, T d) { return {typename VectorOf<T>::type{a, b, c, d}}; }
  void store(T* p) const { std::memcpy(p, &v, sizeof(v)); }
  T lane(int k) const { return v[k]; }
};
template <typename T> inline Pack<T> operator+(const Pack<T>& a, const Pack<T>& b) { return {a.v + b.v}; }
template <typename T> inline Pack<T> operator-(const Pack<T>& a, const Pack<T>& b) { return {a.v - b.v}; }
template <typename T> inline Pack<T> operator*(const Pack<T>& a, const Pack<T>& b) { return {a.v * b.v}; }
template <typename T> inline Pack<T> operator*(const Pack<T>& a, T s) { return {a.v * s}; }
#else
template <typename T> struct Pack {
  T v[4];
  static Pack load(const T* p) {
    Pack r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static Pack make(T a, T b, T c, T d) { return {{a, b, c, d}}; }
  void store(T* p) const { std::memcpy(p, v, sizeof(v)); }
  T lane(int k) const { return v[k]; }
};
template <typename T> inline Pack<T> operator+(const Pack<T>& a, const Pack<T>& b) {
  return {{a.v[0] + b.v[0], a.v[1] + b.v[1], a.v[2] + b.v[2], a.v[3] + b.v[3]}};
}
template <typename T> inline Pack<T> operator-(const Pack<T>& a, const Pack<T>& b) {
  return {{a.v[0] - b.v[0], a.v[1] - b.v[1], a.v[2] - b.v[2], a.v[3] - b.v[3]}};
}
template <typename T> inline Pack<T> operator*(const Pack<T>& a, const Pack<T>& b) {
  return {{a.v[0] * b.v[0], a.v[1] * b.v[1], a.v[2] * b.v[2], a.v[3] * b.v[3]}};
}
template <typename T> inline Pack<T> operator*(const Pack<T>& a, T s) {
  return {{a.v[0] * s, a.v[1] * s, a.v[2] * s, a.v[3] * s}};
}
#endif

// Channels of the interleaved layout: C colour channels, the alpha, zero padding to a multiple of 4.
inline int64_t packed_channels(int64_t C) { return (C + 1 + 3) / 4 * 4; }

// Layer (C planes of HW) and alpha (one plane) -> dst (HW, Cp); padding lanes are left as they are (zero).
template <int CC, typename scalar_t, typename acc_t>
void interleave(const scalar_t* layer, const scalar_t* alpha, int64_t C_runtime, int64_t HW, acc_t* dst) {
  const int64_t C = CC > 0 ? CC : C_runtime, Cp = packed_channels(C);
  for (int64_t c = 0; c <= C; ++c) {
    const scalar_t* src = c < C ? layer + c * HW : alpha;
    for (int64_t p = 0; p < HW; ++p) dst[p * Cp + c] = acc_t(src[p]);
  }
}

// ---- where a sample point falls ----

template <typename acc_t> struct Cell {
  enum Kind : int { kInterior, kOutside, kPartial } kind;
  int64_t o;     // interior: flat offset of the cell's top-left corner (x0, y0)
  acc_t tx, ty;  // interior: position inside the cell
};

// The sample points of one output row h of one layer, classified pixel by pixel: the arithmetic of footprint()
// (ix = (ax w + bx h) + cx, same rounding; for ix >= 0 truncation is floor) with the row's terms and the bounds
// converted once.
template <typename acc_t> struct RowCells {
  acc_t ax, ay, bxh, byh, cx, cy, last_x, last_y, width, height;
  RowCells() = default;
  RowCells(const PixelAffine<acc_t>& a, int64_t h, int64_t H, int64_t W)
      : ax(a.ax), ay(a.ay), bxh(a.bx * acc_t(h)), byh(a.by * acc_t(h)), cx(a.cx), cy(a.cy), last_x(acc_t(W - 1)),
        last_y(acc_t(H - 1)), width(acc_t(W)), height(acc_t(H)), W_(W) {}
  Cell<acc_t> operator()(int64_t w) const {
    const acc_t wf = acc_t(w), ix = ax * wf + bxh + cx, iy = ay * wf + byh + cy;
    if (ix >= acc_t(0) && iy >= acc_t(0) && ix < last_x && iy < last_y) {
      const int64_t x0 = static_cast<int64_t>(ix), y0 = static_cast<int64_t>(iy);
      return {Cell<acc_t>::kInterior, y0 * W_ + x0, ix - acc_t(x0), iy - acc_t(y0)};
    }
    if (ix < acc_t(-1) || iy < acc_t(-1) || ix >= width || iy >= height)  // every corner outside
      return {Cell<acc_t>::kOutside, 0, acc_t(0), acc_t(0)};
    return {Cell<acc_t>::kPartial, 0, acc_t(0), acc_t(0)};  // includes nan: footprint() sends it to the border
  }

 private:
  int64_t W_ = 0;
};

// Bilinear interpolation inside an interior cell whose top-left corner is at p (rows W apart): sample()'s formula.
template <typename acc_t, typename scalar_t>
inline acc_t lerp_cell(const scalar_t* p, int64_t W, acc_t tx, acc_t ty) {
  const acc_t v0 = p[0], v1 = p[1], v2 = p[W], v3 = p[W + 1];
  const acc_t top = v0 + tx * (v1 - v0), bottom = v2 + tx * (v3 - v2);
  return top + ty * (bottom - top);
}

// ---- forward ----

// No warp: pixels [p0, p0 + n) of sample b, every layer in turn, one channel at a time over contiguous pixels.
template <int CC, typename scalar_t>
void forward_span_plain(const CompositeInputs<scalar_t>& in, int64_t b, int64_t p0, int64_t n, scalar_t* image,
                        scalar_t* warped_alphas) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = in.N, C = CC > 0 ? CC : in.C, HW = in.H * in.W;
  scalar_t* out = image + b * C * HW + p0;  // holds x_i between layers
  for (int64_t i = 0; i < N; ++i) {
    const int64_t bi = b * N + i;
    const scalar_t* previous = i == 0 ? in.background + b * C * HW + p0 : out;
    const scalar_t* f = in.layers + bi * C * HW + p0;
    const scalar_t* m = in.alphas + bi * HW + p0;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* x = previous + c * HW;
      const scalar_t* fc = f + c * HW;
      scalar_t* y = out + c * HW;
      for (int64_t k = 0; k < n; ++k) {
        const acc_t xv = x[k];
        y[k] = scalar_t(xv + acc_t(m[k]) * (acc_t(fc[k]) - xv));
      }
    }
    std::copy(m, m + n, warped_alphas + bi * HW + p0);
  }
}

// A warp, planar tensors: row h of layer i (for B < threads, rows in parallel).
template <int CC, typename scalar_t>
void forward_row_warp(const CompositeInputs<scalar_t>& in, int64_t b, int64_t i, int64_t h, const scalar_t* previous,
                      scalar_t* out, scalar_t* warped_row) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t C = CC > 0 ? CC : in.C, H = in.H, W = in.W, HW = H * W, bi = b * in.N + i;
  const scalar_t* layer = in.layers + bi * C * HW;
  const scalar_t* alpha = in.alphas + bi * HW;
  const PixelAffine<acc_t>& a = in.warp[bi].to_input;
  const RowCells<acc_t> cells(a, h, H, W);
  for (int64_t w = 0; w < W; ++w) {
    const Cell<acc_t> cell = cells(w);
    acc_t m;
    if (cell.kind == Cell<acc_t>::kInterior) {
      m = lerp_cell(alpha + cell.o, W, cell.tx, cell.ty);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t f = lerp_cell(layer + c * HW + cell.o, W, cell.tx, cell.ty), x = previous[c * HW + w];
        out[c * HW + w] = scalar_t(x + m * (f - x));
      }
    } else if (cell.kind == Cell<acc_t>::kOutside) {
      m = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t x = previous[c * HW + w];
        out[c * HW + w] = scalar_t(x + m * (acc_t(0) - x));
      }
    } else {
      const Bilinear<acc_t> q = bilinear(footprint(a, w, h, H, W), H, W);
      m = sample(alpha, q).value;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t f = sample(layer + c * HW, q).value, x = previous[c * HW + w];
        out[c * HW + w] = scalar_t(x + m * (f - x));
      }
    }
    warped_row[w] = scalar_t(m);
  }
}

// A warp, sample b owned by the calling thread: each layer is interleaved into `packed` (HW, Cp), each output row
// sampled into `sampled` (W, Cp), then blended over the row below.
template <int CC, typename scalar_t>
void forward_sample_warp(const CompositeInputs<scalar_t>& in, int64_t b, scalar_t* image, scalar_t* warped_alphas,
                         std::vector<typename Acc<scalar_t>::type>& packed,
                         std::vector<typename Acc<scalar_t>::type>& sampled) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = in.N, C = CC > 0 ? CC : in.C, H = in.H, W = in.W, HW = H * W, Cp = packed_channels(C);
  constexpr int64_t kPacketsFixed = CC > 0 ? (CC + 1 + 3) / 4 : 0;
  const int64_t packets = kPacketsFixed > 0 ? kPacketsFixed : Cp / 4;
  if (int64_t(packed.size()) != HW * Cp) packed.assign(HW * Cp, acc_t(0));  // padding lanes stay zero
  sampled.resize(W * Cp);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t bi = b * N + i;
    const scalar_t* layer = in.layers + bi * C * HW;
    const scalar_t* alpha = in.alphas + bi * HW;
    interleave<CC>(layer, alpha, C, HW, packed.data());
    const PixelAffine<acc_t>& a = in.warp[bi].to_input;
    for (int64_t h = 0; h < H; ++h) {
      const RowCells<acc_t> cells(a, h, H, W);
      for (int64_t w = 0; w < W; ++w) {
        const Cell<acc_t> cell = cells(w);
        acc_t* r = sampled.data() + w * Cp;
        if (cell.kind == Cell<acc_t>::kInterior) {
          const acc_t* corner = packed.data() + cell.o * Cp;
          for (int64_t k = 0; k < packets; ++k) {
            const Pack<acc_t> v0 = Pack<acc_t>::load(corner + 4 * k), v1 = Pack<acc_t>::load(corner + Cp + 4 * k);
            const Pack<acc_t> v2 = Pack<acc_t>::load(corner + W * Cp + 4 * k);
            const Pack<acc_t> v3 = Pack<acc_t>::load(corner + (W + 1) * Cp + 4 * k);
            const Pack<acc_t> top = v0 + (v1 - v0) * cell.tx, bottom = v2 + (v3 - v2) * cell.tx;
            (top + (bottom - top) * cell.ty).store(r + 4 * k);
          }
        } else if (cell.kind == Cell<acc_t>::kOutside) {
          std::fill(r, r + C + 1, acc_t(0));
        } else {
          const Bilinear<acc_t> q = bilinear(footprint(a, w, h, H, W), H, W);
          for (int64_t c = 0; c < C; ++c) r[c] = sample(layer + c * HW, q).value;
          r[C] = sample(alpha, q).value;
        }
      }
      const scalar_t* previous = (i == 0 ? in.background : image) + b * C * HW + h * W;
      scalar_t* out = image + b * C * HW + h * W;
      const acc_t* s = sampled.data();
      for (int64_t c = 0; c < C; ++c)
        for (int64_t w = 0; w < W; ++w) {
          const acc_t x = previous[c * HW + w], m = s[w * Cp + C];
          out[c * HW + w] = scalar_t(x + m * (s[w * Cp + c] - x));
        }
      scalar_t* warped_row = warped_alphas + bi * HW + h * W;
      for (int64_t w = 0; w < W; ++w) warped_row[w] = scalar_t(s[w * Cp + C]);
    }
  }
}

// Pixels per task of the no-warp kernels: long contiguous runs in every plane (C = 64 planes are streamed).
constexpr int64_t kSpan = 1024;

template <int CC, typename scalar_t>
void forward(const CompositeInputs<scalar_t>& in, scalar_t* image, scalar_t* warped_alphas) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t B = in.B, N = in.N, C = in.C, H = in.H, W = in.W, HW = H * W;
  if (in.warp == nullptr) {
    const int64_t spans = (HW + kSpan - 1) / kSpan;
    const int64_t grain = std::max<int64_t>(1, 32768 / (std::min(HW, kSpan) * N * (C + 1)));
    at::parallel_for(0, B * spans, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / spans, p0 = t % spans * kSpan;
        forward_span_plain<CC>(in, b, p0, std::min(kSpan, HW - p0), image, warped_alphas);
      }
    });
    return;
  }
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, sample_grain(N, C, H, W), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> packed, sampled;
      for (int64_t b = begin; b < end; ++b) forward_sample_warp<CC>(in, b, image, warped_alphas, packed, sampled);
    });
    return;
  }
  at::parallel_for(0, B * H, row_grain(N, C, W), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, h = row % H;
      const scalar_t* background = in.background + b * C * HW + h * W;
      scalar_t* out = image + b * C * HW + h * W;  // holds x_i between layers
      for (int64_t i = 0; i < N; ++i)
        forward_row_warp<CC>(in, b, i, h, i == 0 ? background : out, out, warped_alphas + (b * N + i) * HW + h * W);
    }
  });
}

}  // namespace cpu
}  // namespace minseg
