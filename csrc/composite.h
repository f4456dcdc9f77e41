// Op A, warp-and-composite: the per-pixel math shared by the CPU kernels (composite.cpp) and the CUDA
// kernels (composite_cuda.cu). Semantics: minseg/ops/composite.py (composite_reference is the ground truth).
//
//   x_0 = background;  x_i = x_{i-1} + T_i(m_i) * (T_i(f_i) - x_{i-1});  image = x_N
//
// T_i samples bilinearly with zero padding at the points of F.affine_grid(theta_i, align_corners=False).
// In input-pixel units the sample point of output pixel (w, h) is affine in (w, h): one WarpMap per (b, i).
//
// Backward, with g = dL/dimage at a pixel, s_i = g . x_i (a scalar) and P_i = prod_{j > i} (1 - T_j(m_j)):
//   dL/dT_i(f_i) = c_i g                       c_i = T_i(m_i) P_i
//   dL/dT_i(m_i) = e_i                         e_i = P_i (g . T_i(f_i) - s_{i-1}) + dL/dwarped_alpha_i
//   dL/dbackground = P_0 g                     s_i = s_{i-1} + T_i(m_i) (g . T_i(f_i) - s_{i-1}),  s_0 = g . bg
// So two scalars per layer and pixel (c_i, e_i) carry everything the warp's backward needs, and the backward
// needs no x_{i-1}: a forward sweep over the layers computes the scalar prefix s, a backward sweep the suffix
// product P. Storing x_{i-1} would cost N x C values per pixel, recomputing the recursion for every layer
// O(N^2) samples; the prefix costs 2 scalars per layer (a scratch), and each layer is sampled twice (the value
// on the forward sweep, the derivatives on the backward sweep; the top layer once).
// On the GPU the warp's input gradients are gathered (one source pixel at a time, enumerating the output pixels
// whose bilinear footprint covers it): deterministic, no atomics. The CPU runs the same gather when it has
// fewer samples than threads, and otherwise scatters per sample (composite.cpp).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline
#endif

namespace minseg {

// ---- scalar types: half/bfloat16 compute in float, float in float, double in double ----

template <typename scalar_t> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename acc_t, typename scalar_t> HOST_DEVICE acc_t load(const scalar_t* p) { return static_cast<acc_t>(*p); }
template <typename scalar_t, typename acc_t> HOST_DEVICE void store(scalar_t* p, acc_t v) { *p = static_cast<scalar_t>(v); }
#ifdef __CUDACC__  // torch builds with __CUDA_NO_HALF_CONVERSIONS__: convert explicitly
template <> HOST_DEVICE float load<float, __half>(const __half* p) { return __half2float(*p); }
template <> HOST_DEVICE float load<float, __nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <> HOST_DEVICE void store<__half, float>(__half* p, float v) { *p = __float2half_rn(v); }
template <> HOST_DEVICE void store<__nv_bfloat16, float>(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
#endif

// floor and ceil of a finite value well inside the int64 range, without a libm call (x86-64 has no rounding
// instruction before SSE4.1: floor() would be a function call per sample).
template <typename real_t> HOST_DEVICE int64_t floor_int(real_t x) {
  const int64_t t = static_cast<int64_t>(x);  // rounds toward zero
  return t - (real_t(t) > x);
}
template <typename real_t> HOST_DEVICE int64_t ceil_int(real_t x) {
  const int64_t t = static_cast<int64_t>(x);
  return t + (real_t(t) < x);
}

// ---- geometry: the sample point of output pixel (w, h), in input pixel units ----

// ix = ax w + bx h + cx, iy = ay w + by h + cy. With align_corners=False, affine_grid's base point of pixel w
// is xn = (2w + 1) / W - 1, and grid_sample reads column ix = ((x + 1) W - 1) / 2 at x = theta_0 . (xn, yn, 1).
template <typename acc_t> struct PixelAffine {
  acc_t ax, bx, cx, ay, by, cy;
  HOST_DEVICE acc_t ix(int64_t w, int64_t h) const { return ax * acc_t(w) + bx * acc_t(h) + cx; }
  HOST_DEVICE acc_t iy(int64_t w, int64_t h) const { return ay * acc_t(w) + by * acc_t(h) + cy; }
};

// The warp of one (b, i): the forward map, plus its inverse in double for the gather's enumeration.
template <typename acc_t> struct WarpMap {
  PixelAffine<acc_t> to_input;  // output pixel -> sample point, the arithmetic every kernel uses
  double inverse[4];            // (w, h) = inverse . (ix - cx, iy - cy), row-major; valid when `regular`
  double inv_ax, inv_ay;        // 1 / ax and 1 / ay, or 0 where ix (iy) is constant along a row
  bool regular;                 // |det| large enough for the inverse to bound the rows reaching a pixel
};

template <typename acc_t, typename scalar_t>
HOST_DEVICE WarpMap<acc_t> warp_map(const scalar_t* theta, int64_t H, int64_t W) {
  const acc_t t00 = load<acc_t>(theta + 0), t01 = load<acc_t>(theta + 1), t02 = load<acc_t>(theta + 2);
  const acc_t t10 = load<acc_t>(theta + 3), t11 = load<acc_t>(theta + 4), t12 = load<acc_t>(theta + 5);
  const acc_t Wf = acc_t(W), Hf = acc_t(H), xn0 = acc_t(1) / Wf - 1, yn0 = acc_t(1) / Hf - 1;  // xn, yn of pixel 0
  WarpMap<acc_t> m;
  PixelAffine<acc_t>& a = m.to_input;
  a.ax = t00;
  a.bx = t01 * Wf / Hf;
  a.cx = Wf / 2 * (t00 * xn0 + t01 * yn0 + t02) + (Wf - 1) / 2;
  a.ay = t10 * Hf / Wf;
  a.by = t11;
  a.cy = Hf / 2 * (t10 * xn0 + t11 * yn0 + t12) + (Hf - 1) / 2;
  const double det = double(a.ax) * double(a.by) - double(a.bx) * double(a.ay);
  m.regular = fabs(det) > 1e-9;  // (near) singular: a square's preimage is unbounded, scan every row
  m.inverse[0] = m.regular ? double(a.by) / det : 0;
  m.inverse[1] = m.regular ? -double(a.bx) / det : 0;
  m.inverse[2] = m.regular ? -double(a.ay) / det : 0;
  m.inverse[3] = m.regular ? double(a.ax) / det : 0;
  m.inv_ax = fabs(double(a.ax)) > 1e-12 ? 1 / double(a.ax) : 0;
  m.inv_ay = fabs(double(a.ay)) > 1e-12 ? 1 / double(a.ay) : 0;
  return m;
}

// ---- the op's tensors as raw pointers (contiguous) and sizes ----

template <typename scalar_t> struct CompositeInputs {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* layers;      // (B, N, C, H, W)
  const scalar_t* alphas;      // (B, N, 1, H, W)
  const scalar_t* background;  // (B, C, H, W)
  const WarpMap<acc_t>* warp;  // (B, N) from theta, or nullptr: no warp (identity, no sampling)
  int64_t B, N, C, H, W;
};

// ---- bilinear sampling with zero padding ----

// The 2x2 cell holding a sample point: top-left corner (x0, y0) and the position (tx, ty) inside it.
template <typename acc_t> struct Footprint {
  int64_t x0, y0;
  acc_t tx, ty;
};

template <typename acc_t>
HOST_DEVICE Footprint<acc_t> footprint(acc_t ix, acc_t iy, int64_t H, int64_t W) {
  // Points over a pixel outside the image read zeros only; clamping keeps floor() in int64 range
  // (and sends a nan to the border, where it also reads zeros).
  ix = ix > acc_t(-2) ? ix : acc_t(-2);
  ix = ix < acc_t(W + 1) ? ix : acc_t(W + 1);
  iy = iy > acc_t(-2) ? iy : acc_t(-2);
  iy = iy < acc_t(H + 1) ? iy : acc_t(H + 1);
  const int64_t x0 = floor_int(ix), y0 = floor_int(iy);
  return {x0, y0, ix - acc_t(x0), iy - acc_t(y0)};
}

template <typename acc_t>
HOST_DEVICE Footprint<acc_t> footprint(const PixelAffine<acc_t>& a, int64_t w, int64_t h, int64_t H, int64_t W) {
  return footprint(a.ix(w, h), a.iy(w, h), H, W);
}

// Bilinear weight of source pixel (sx, sy) in a footprint (0 when outside the 2x2 cell).
template <typename acc_t>
HOST_DEVICE acc_t footprint_weight(const Footprint<acc_t>& fp, int64_t sx, int64_t sy) {
  const acc_t wx = sx == fp.x0 ? acc_t(1) - fp.tx : (sx == fp.x0 + 1 ? fp.tx : acc_t(0));
  const acc_t wy = sy == fp.y0 ? acc_t(1) - fp.ty : (sy == fp.y0 + 1 ? fp.ty : acc_t(0));
  return wx * wy;
}

// The four corners of a footprint, located once and then read (or written) for every channel.
template <typename acc_t> struct Bilinear {
  int64_t offset[4];  // flat offsets of (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1); 0 when outside
  bool inside[4];     // outside corners read zeros (zero padding) and receive no gradient
  acc_t tx, ty;
  HOST_DEVICE acc_t weight(int k) const {
    return inside[k] ? ((k & 1) ? tx : acc_t(1) - tx) * ((k & 2) ? ty : acc_t(1) - ty) : acc_t(0);
  }
};

template <typename acc_t>
HOST_DEVICE Bilinear<acc_t> bilinear(const Footprint<acc_t>& fp, int64_t H, int64_t W) {
  Bilinear<acc_t> q;
  for (int k = 0; k < 4; ++k) {
    const int64_t x = fp.x0 + (k & 1), y = fp.y0 + (k >> 1);
    q.inside[k] = x >= 0 && x < W && y >= 0 && y < H;
    q.offset[k] = q.inside[k] ? y * W + x : 0;
  }
  q.tx = fp.tx;
  q.ty = fp.ty;
  return q;
}

template <typename acc_t> struct Sampled {
  acc_t value, d_ix, d_iy;  // the sample and its derivatives along the sample point
};

template <typename acc_t, typename scalar_t>
HOST_DEVICE Sampled<acc_t> sample(const scalar_t* plane, const Bilinear<acc_t>& q) {
  acc_t v[4];
  if (q.inside[0] & q.inside[1] & q.inside[2] & q.inside[3]) {  // the common case, without per-corner tests
    for (int k = 0; k < 4; ++k) v[k] = load<acc_t>(plane + q.offset[k]);
  } else {
    for (int k = 0; k < 4; ++k) v[k] = q.inside[k] ? load<acc_t>(plane + q.offset[k]) : acc_t(0);
  }
  const acc_t top = v[0] + q.tx * (v[1] - v[0]), bottom = v[2] + q.tx * (v[3] - v[2]);
  return {top + q.ty * (bottom - top), (acc_t(1) - q.ty) * (v[1] - v[0]) + q.ty * (v[3] - v[2]),
          (acc_t(1) - q.tx) * (v[2] - v[0]) + q.tx * (v[3] - v[1])};
}

// One layer at one output pixel: its alpha, and g . f over the C channels (planes HW apart), each with
// derivatives along the sample point. Without a warp (q == nullptr) both are read at pixel p itself.
template <typename acc_t> struct LayerSample {
  Sampled<acc_t> alpha, dot;
};

template <typename acc_t, typename scalar_t>
HOST_DEVICE LayerSample<acc_t> sample_layer(const scalar_t* layer, const scalar_t* alpha, const scalar_t* g,
                                            int64_t C, int64_t H, int64_t W, int64_t p,
                                            const Bilinear<acc_t>* q) {
  const int64_t HW = H * W;
  LayerSample<acc_t> out{{0, 0, 0}, {0, 0, 0}};
  if (q == nullptr) {
    out.alpha.value = load<acc_t>(alpha + p);
    for (int64_t c = 0; c < C; ++c) out.dot.value += load<acc_t>(g + c * HW) * load<acc_t>(layer + c * HW + p);
    return out;
  }
  out.alpha = sample(alpha, *q);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t gc = load<acc_t>(g + c * HW);
    const Sampled<acc_t> f = sample(layer + c * HW, *q);
    out.dot.value += gc * f.value;
    out.dot.d_ix += gc * f.d_ix;
    out.dot.d_iy += gc * f.d_iy;
  }
  return out;
}

// ---- forward: one output pixel through all N layers ----

template <typename scalar_t>
HOST_DEVICE void forward_pixel(const CompositeInputs<scalar_t>& in, int64_t b, int64_t h, int64_t w,
                               scalar_t* image, scalar_t* warped_alphas) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t C = in.C, H = in.H, W = in.W, HW = H * W, p = h * W + w;
  const scalar_t* background = in.background + b * C * HW + p;
  scalar_t* out = image + b * C * HW + p;  // holds x_i between layers
  for (int64_t i = 0; i < in.N; ++i) {
    const int64_t bi = b * in.N + i;
    const scalar_t* layer = in.layers + bi * C * HW;
    const scalar_t* previous = i == 0 ? background : out;
    if (in.warp != nullptr) {
      const Bilinear<acc_t> q = bilinear(footprint(in.warp[bi].to_input, w, h, H, W), H, W);
      const acc_t m = sample(in.alphas + bi * HW, q).value;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t f = sample(layer + c * HW, q).value, x = load<acc_t>(previous + c * HW);
        store(out + c * HW, x + m * (f - x));
      }
      store(warped_alphas + bi * HW + p, m);
    } else {
      const acc_t m = load<acc_t>(in.alphas + bi * HW + p);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t f = load<acc_t>(layer + c * HW + p), x = load<acc_t>(previous + c * HW);
        store(out + c * HW, x + m * (f - x));
      }
      store(warped_alphas + bi * HW + p, m);
    }
  }
}

// ---- backward at one output pixel: c_i, e_i (and gix_i, giy_i with a warp) for every layer ----

// Per-layer scratch of one pixel: element (i, k) at ptr[i * layer_stride + k * slot_stride].
template <typename acc_t> struct Scratch {
  acc_t* ptr;
  int64_t layer_stride, slot_stride;
  HOST_DEVICE acc_t& at(int64_t i, int k) const { return ptr[i * layer_stride + k * slot_stride]; }
};

// Slots per (b, i, pixel) of the warp's backward scratch: c, e (for the gather), gix, giy (for grad theta).
constexpr int kWarpSlots = 4;

// sink(i, c_i, e_i, gix_i, giy_i, corners) receives every layer's scalars, top layer first; gix, giy =
// dL/d(sample point), corners = the layer's Bilinear at this pixel (nullptr without a warp). grad_warped may be nullptr (no cotangent for warped_alphas). scratch holds (m_i, g.f_i - s_{i-1}) of
// layers 0..N-2 in slots 0 and 1; it may alias the sink's slots 0 and 1 (each layer's are read before written).
template <typename scalar_t, typename Sink>
HOST_DEVICE void backward_pixel(const CompositeInputs<scalar_t>& in, const scalar_t* grad_image,
                                const scalar_t* grad_warped, const Scratch<typename Acc<scalar_t>::type>& scratch,
                                int64_t b, int64_t h, int64_t w, scalar_t* grad_background, const Sink& sink) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = in.N, C = in.C, H = in.H, W = in.W, HW = H * W, p = h * W + w;
  const scalar_t* g = grad_image + b * C * HW + p;
  const scalar_t* background = in.background + b * C * HW + p;
  Bilinear<acc_t> corners;  // of the layer sampled last
  const Bilinear<acc_t>* where = in.warp != nullptr ? &corners : nullptr;
  auto layer_sample = [&](int64_t i) {
    const int64_t bi = b * N + i;
    if (where != nullptr) corners = bilinear(footprint(in.warp[bi].to_input, w, h, H, W), H, W);
    return sample_layer<acc_t>(in.layers + bi * C * HW, in.alphas + bi * HW, g, C, H, W, p, where);
  };

  acc_t s = 0;  // s_{i-1} = g . x_{i-1}
  for (int64_t c = 0; c < C; ++c) s += load<acc_t>(g + c * HW) * load<acc_t>(background + c * HW);
  for (int64_t i = 0; i + 1 < N; ++i) {  // forward sweep below the top layer
    const LayerSample<acc_t> ls = layer_sample(i);
    const acc_t q = ls.dot.value - s;
    scratch.at(i, 0) = ls.alpha.value;
    scratch.at(i, 1) = q;
    s += ls.alpha.value * q;
  }
  acc_t P = 1;  // P_i = prod_{j > i} (1 - m_j)
  for (int64_t i = N - 1; i >= 0; --i) {  // backward sweep; the top layer is sampled here, once
    LayerSample<acc_t> ls{{0, 0, 0}, {0, 0, 0}};
    acc_t m, q;
    if (i == N - 1) {
      ls = layer_sample(i);
      m = ls.alpha.value;
      q = ls.dot.value - s;
    } else {
      m = scratch.at(i, 0);
      q = scratch.at(i, 1);
      if (where != nullptr) ls = layer_sample(i);  // for the corners and the derivatives along the sample point
    }
    const acc_t c_i = m * P;
    const acc_t e_i = P * q + (grad_warped != nullptr ? load<acc_t>(grad_warped + (b * N + i) * HW + p) : acc_t(0));
    sink(i, c_i, e_i, c_i * ls.dot.d_ix + e_i * ls.alpha.d_ix, c_i * ls.dot.d_iy + e_i * ls.alpha.d_iy, where);
    P *= acc_t(1) - m;
  }
  for (int64_t c = 0; c < C; ++c) store(grad_background + b * C * HW + c * HW + p, P * load<acc_t>(g + c * HW));
}

// Without a warp the layer gradients sit at the pixel itself: grad f_i = c_i g, grad m_i = e_i.
template <typename scalar_t> struct DirectSink {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* g;      // the pixel's cotangent, channel 0
  scalar_t* grad_layers;  // (B, N, C, H, W) at (b, 0, 0, pixel)
  scalar_t* grad_alphas;  // (B, N, 1, H, W) at (b, 0, 0, pixel)
  int64_t C, HW;
  HOST_DEVICE void operator()(int64_t i, acc_t c_i, acc_t e_i, acc_t, acc_t, const Bilinear<acc_t>*) const {
    for (int64_t c = 0; c < C; ++c) store(grad_layers + (i * C + c) * HW, c_i * load<acc_t>(g + c * HW));
    store(grad_alphas + i * HW, e_i);
  }
};

// With a warp the four scalars go to the scratch (B, N, kWarpSlots, H, W), for the gather and grad theta.
template <typename acc_t> struct WarpSink {
  Scratch<acc_t> scratch;
  HOST_DEVICE void operator()(int64_t i, acc_t c_i, acc_t e_i, acc_t gix, acc_t giy, const Bilinear<acc_t>*) const {
    scratch.at(i, 0) = c_i;
    scratch.at(i, 1) = e_i;
    scratch.at(i, 2) = gix;
    scratch.at(i, 3) = giy;
  }
};

// ---- the warp's input gradients, gathered at source pixel (sx, sy) of layer i ----
//
// Output pixel (w, h) reads (sx, sy) iff its sample point lies in [sx - 1, sx + 1) x [sy - 1, sy + 1). The
// candidates are the rows of that square's preimage and, per row, the columns where both ix and iy are in
// range, computed in double for the square grown by a margin far above the rounding of ix, iy; every candidate
// is then tested with the forward's own arithmetic (footprint_weight), so the set of contributions is exactly
// the one a scatter would make.
constexpr double kSpanMargin = 1e-2;  // input pixels; float rounding of ix, iy stays below ~1e-3 for H, W < 1e4

struct Span {
  int64_t lo, hi;  // inclusive; empty when lo > hi
};

HOST_DEVICE Span integers_within(double lo, double hi, int64_t size) {  // the integers of [lo, hi] in [0, size)
  if (!(lo <= hi)) return lo > hi ? Span{1, 0} : Span{0, size - 1};  // empty, or nan: no usable bound
  lo = lo > -1.0 ? lo : -1.0;
  hi = hi < double(size) ? hi : double(size);
  const int64_t first = ceil_int(lo), last = floor_int(hi);
  return {first > 0 ? first : 0, last < size - 1 ? last : size - 1};
}

template <typename acc_t>
HOST_DEVICE Span source_rows(const WarpMap<acc_t>& m, int64_t sx, int64_t sy, int64_t H) {
  if (!m.regular) return {0, H - 1};
  double lo = INFINITY, hi = -INFINITY;
  for (int corner = 0; corner < 4; ++corner) {  // h of the square's corners under the inverse map
    const double dx = double(sx) + ((corner & 1) ? 1 + kSpanMargin : -1 - kSpanMargin) - double(m.to_input.cx);
    const double dy = double(sy) + ((corner & 2) ? 1 + kSpanMargin : -1 - kSpanMargin) - double(m.to_input.cy);
    const double h = m.inverse[2] * dx + m.inverse[3] * dy;
    lo = h < lo ? h : lo;
    hi = h > hi ? h : hi;
  }
  return integers_within(lo, hi, H);
}

template <typename acc_t>
HOST_DEVICE Span source_columns(const WarpMap<acc_t>& m, int64_t sx, int64_t sy, int64_t h, int64_t W) {
  const PixelAffine<acc_t>& a = m.to_input;
  const double inv_slope[2] = {m.inv_ax, m.inv_ay};
  const double offset[2] = {double(a.bx) * double(h) + double(a.cx), double(a.by) * double(h) + double(a.cy)};
  const double centre[2] = {double(sx), double(sy)};
  double lo = -1.0, hi = double(W);
  for (int k = 0; k < 2; ++k) {
    if (inv_slope[k] == 0) continue;  // constant along the row: the exact test decides
    double w0 = (centre[k] - 1 - kSpanMargin - offset[k]) * inv_slope[k];
    double w1 = (centre[k] + 1 + kSpanMargin - offset[k]) * inv_slope[k];
    if (w0 > w1) {
      const double t = w0;
      w0 = w1;
      w1 = t;
    }
    lo = w0 > lo ? w0 : lo;
    hi = w1 < hi ? w1 : hi;
  }
  return integers_within(lo, hi, W);
}

// grad layers (C channels) and grad alphas of layer i at source pixel (sx, sy), CHUNK channels at a time in
// registers. coef: the WarpSink scratch (B, N, kWarpSlots, H, W); grad_image (B, C, H, W).
template <int CHUNK, typename scalar_t>
HOST_DEVICE void gather_pixel(const CompositeInputs<scalar_t>& in, const typename Acc<scalar_t>::type* coef,
                              const scalar_t* grad_image, int64_t b, int64_t i, int64_t sy, int64_t sx,
                              scalar_t* grad_layers, scalar_t* grad_alphas) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t C = in.C, H = in.H, W = in.W, HW = H * W, bi = b * in.N + i;
  const WarpMap<acc_t>& m = in.warp[bi];
  const acc_t* c_coef = coef + (bi * kWarpSlots + 0) * HW;
  const acc_t* e_coef = coef + (bi * kWarpSlots + 1) * HW;
  const scalar_t* g = grad_image + b * C * HW;
  const Span rows = source_rows(m, sx, sy, H);
  for (int64_t c0 = 0; c0 < C; c0 += CHUNK) {
    acc_t acc[CHUNK];
    for (int k = 0; k < CHUNK; ++k) acc[k] = 0;
    acc_t acc_alpha = 0;
    for (int64_t h = rows.lo; h <= rows.hi; ++h) {
      const Span cols = source_columns(m, sx, sy, h, W);
      for (int64_t w = cols.lo; w <= cols.hi; ++w) {
        const acc_t weight = footprint_weight(footprint(m.to_input, w, h, H, W), sx, sy);
        if (weight == acc_t(0)) continue;
        const int64_t p = h * W + w;
        const acc_t cw = weight * c_coef[p];
        for (int k = 0; k < CHUNK; ++k)
          if (c0 + k < C) acc[k] += cw * load<acc_t>(g + (c0 + k) * HW + p);
        if (c0 == 0) acc_alpha += weight * e_coef[p];
      }
    }
    const int64_t q = sy * W + sx;
    for (int k = 0; k < CHUNK; ++k)
      if (c0 + k < C) store(grad_layers + (bi * C + c0 + k) * HW + q, acc[k]);
    if (c0 == 0) store(grad_alphas + bi * HW + q, acc_alpha);
  }
}

// ---- grad theta: per (b, i), sums over output pixels of gix (xn, yn, 1) and giy (xn, yn, 1) ----

template <typename acc_t>
HOST_DEVICE void add_theta_terms(acc_t sums[6], acc_t gix, acc_t giy, int64_t h, int64_t w, int64_t H, int64_t W) {
  const acc_t xn = acc_t(2 * w + 1) / acc_t(W) - 1, yn = acc_t(2 * h + 1) / acc_t(H) - 1;
  sums[0] += gix * xn;
  sums[1] += gix * yn;
  sums[2] += gix;
  sums[3] += giy * xn;
  sums[4] += giy * yn;
  sums[5] += giy;
}

// d ix / d theta_0j = W/2 (xn, yn, 1)_j and d iy / d theta_1j = H/2 (xn, yn, 1)_j.
template <typename acc_t, typename scalar_t>
HOST_DEVICE void store_theta_grad(const acc_t sums[6], int64_t H, int64_t W, scalar_t* grad_theta) {
  for (int j = 0; j < 3; ++j) {
    store(grad_theta + j, sums[j] * acc_t(W) / 2);
    store(grad_theta + 3 + j, sums[3 + j] * acc_t(H) / 2);
  }
}

// Scratch of the backward, in acc_t elements: kWarpSlots per (b, i, pixel) with a warp, else 2 per (b, i,
// pixel) for N > 1 (on CUDA; the CPU keeps the no-warp scratch of a pixel in a per-thread buffer).
inline int64_t backward_scratch_size(bool warp, int64_t B, int64_t N, int64_t H, int64_t W) {
  return warp ? B * N * kWarpSlots * H * W : (N > 1 ? B * N * 2 * H * W : 0);
}

}  // namespace minseg

// ---- CUDA entry points (composite_cuda.cu), called from composite.cpp with the current stream ----

#if defined(__CUDACC__) || defined(WITH_CUDA)
#include <cuda_runtime_api.h>

namespace minseg {

enum class Dtype { Float, Double, Half, BFloat16 };

struct RawInputs {  // CompositeInputs with the scalar type erased, and theta instead of its WarpMaps
  Dtype dtype;
  const void *layers, *alphas, *background, *theta;  // theta (B, N, 2, 3) or nullptr
  int64_t B, N, C, H, W;
};

// Bytes of device workspace for the WarpMaps (B * N of them; 0 without theta).
inline int64_t warp_map_bytes(const RawInputs& in) {
  if (in.theta == nullptr) return 0;
  return in.B * in.N * int64_t(in.dtype == Dtype::Double ? sizeof(WarpMap<double>) : sizeof(WarpMap<float>));
}

// warp_maps: warp_map_bytes() of workspace. scratch: backward_scratch_size() elements of float (double for
// Double). grad_warped may be nullptr.
cudaError_t composite_forward_cuda(const RawInputs& in, void* image, void* warped_alphas, void* warp_maps,
                                   cudaStream_t stream);
cudaError_t composite_backward_cuda(const RawInputs& in, const void* grad_image, const void* grad_warped,
                                    void* grad_layers, void* grad_alphas, void* grad_background, void* grad_theta,
                                    void* warp_maps, void* scratch, cudaStream_t stream);

}  // namespace minseg
#endif
