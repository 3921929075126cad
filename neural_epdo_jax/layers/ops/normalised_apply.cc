// CPU kernels (XLA FFI) for neural_epdo_jax.layers.normalised_apply: steps 3-4 of the Neural
// ePDO layer, out = scale * sum_t w_t x(. + off_t) with scale = 0.2 / (0.2 sum |w| + 0.01),
// and its backward pass. The formulas are those of normalised_apply_fwd_xla and
// normalised_apply_bwd_xla (normalised_apply.py); tests/layers/ops/cpu_kernel_test.py checks
// both against that XLA path.
//
// Arrays are channel-major planes: x, out, gout [d, Q, G, M, H, W]; w, gw [S, d, T, G / S, M,
// H, W] (operator gi = j * G / S + l is at (j, l): the generator's output is grouped like that)
// with T = K * K taps (tap t is the offset (t / K - K / 2, t % K - K / 2)); scale [G, M, H, W].
// The taps (and their gradient) may come as several buffers [S, d_i, T, G / S, M, H, W] that
// split the component axis, d = d_0 + d_1 + ...: the generator's parts (its Fourier and dense
// blocks), so that they are never concatenated (`TapParts`). The operands are passed flattened
// (x, out, gout [d, Q, G, M * H * W], w, gw [S, d_i, T * G / S * M * H * W], scale [G, M * H *
// W], with H and W as attributes): XLA gave the size-1 axes of the full forms layouts of their
// own and copied the arrays to reorder them.
// Each (g, m) plane group is copied into zero-padded scratch planes whose rows are whole
// vectors, and the taps into a scratch that holds the T tap vectors of a position next to
// each other, so the inner loops are branch-free vector multiply-adds whose loads sit at
// compile-time offsets (faster than loads at per-tap offsets read from a table).
// Vectors are 8 floats, or 16 where the compiler targets AVX-512 and the planes are wider
// than 8 (`Simd`).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// dst[p] += a[p] * b[p].
inline void add_product(float* __restrict dst, const float* __restrict a,
                        const float* __restrict b, int64_t n) {
  for (int64_t p = 0; p < n; ++p) dst[p] += a[p] * b[p];
}

struct Shape {
  int64_t d, q, g, m, h, w, hw, wv, gl;
  Shape() = default;
  // x: the dimensions of x as passed, [d, Q, G, M * H * W] (H = height, W = width); groups:
  // S, the leading axis of the taps. (`CheckParts` rejects what this cannot describe.)
  Shape(ffi::Span<const int64_t> x, int64_t height, int64_t width, int64_t groups) {
    const bool ok = x.size() == 4;
    d = ok ? x[0] : 0, q = ok ? x[1] : 0, g = ok ? x[2] : 0, h = height, w = width;
    hw = h * w;
    m = ok && hw > 0 ? x[3] / hw : 0;
    wv = w;  // rows in whole vectors: `with_lanes`
    gl = groups > 0 ? g / groups : 0;
  }
  // This shape with rows of kv-float vectors: wv, the row length in whole vectors.
  Shape with_lanes(int64_t kv) const {
    Shape t = *this;
    t.wv = (w + kv - 1) / kv * kv;
    return t;
  }
  // Start of plane (a, b) of an array [A, nb, G, M, H, W] at (gi, mi).
  int64_t plane(int64_t a, int64_t nb, int64_t b, int64_t gi, int64_t mi) const {
    return (((a * nb + b) * g + gi) * m + mi) * hw;
  }
};

// The taps [S, d, T, G / S, M, H, W] (or their gradient) as buffers that split the component
// axis; P is const float* (inputs) or float* (results).
template <typename P>
struct TapParts {
  std::vector<P> data;
  std::vector<int64_t> size;         // per buffer: its number of components
  std::vector<int64_t> part, local;  // per component: its buffer, its index there
  void add(P p, int64_t components) {
    for (int64_t c = 0; c < components; ++c) {
      part.push_back(static_cast<int64_t>(data.size()));
      local.push_back(c);
    }
    data.push_back(p);
    size.push_back(components);
  }
  // Start of tap t's plane of component c at (gi, mi).
  P tap(const Shape& s, int64_t c, int64_t nt, int64_t t, int64_t gi, int64_t mi) const {
    const int64_t b = part[c];
    return data[b] +
           ((((gi / s.gl * size[b] + local[c]) * nt + t) * s.gl + gi % s.gl) * s.m + mi) * s.hw;
  }
};

// A zero-padded scratch plane: the [h, w] plane sits at (pad, pad) of [h + 2 pad, wv + 2 pad].
struct Frame {
  int64_t pad, rows, cols, size;
  Frame(const Shape& s, int64_t pad_) : pad(pad_), rows(s.h + 2 * pad_), cols(s.wv + 2 * pad_) {
    size = rows * cols;
  }
  // Copies src [h, w] (times mul [h, w] when given) into the interior of dst, a frame whose
  // border (and columns past w) are zero: they are never written, so zeroing the scratch
  // once per call is enough.
  void fill(const Shape& s, const float* src, float* dst, const float* mul = nullptr) const {
    for (int64_t i = 0; i < s.h; ++i) {
      float* row = dst + (i + pad) * cols + pad;
      const float* in = src + i * s.w;
      if (mul) {
        const float* f = mul + i * s.w;
        for (int64_t j = 0; j < s.w; ++j) row[j] = in[j] * f[j];
      } else {
        for (int64_t j = 0; j < s.w; ++j) row[j] = in[j];
      }
    }
  }
};

// The vector code, for vectors of kV floats: 8 (AVX2, or two SSE / NEON registers) and, where
// the compiler targets AVX-512, 16 for planes wider than 8 (the dispatch in `ForwardK` and
// `BackwardK`: narrower planes would leave most of a 16-float row empty). Its shapes come
// through `Shape::with_lanes(kV)`.
template <int64_t N>
struct Lanes;  // N floats (GCC vector extension): v, and u for loads and stores at any address
template <>
struct Lanes<8> {
  typedef float v __attribute__((vector_size(32)));
  typedef float u __attribute__((vector_size(32), aligned(4)));
};
template <>
struct Lanes<16> {
  typedef float v __attribute__((vector_size(64)));
  typedef float u __attribute__((vector_size(64), aligned(4)));
};

template <int64_t kV>
struct Simd {
  typedef typename Lanes<kV>::v vf;
  typedef typename Lanes<kV>::u vfu;
  static inline vf ld(const float* p) { return *reinterpret_cast<const vfu*>(p); }
  static inline void st(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
  static inline vf zero() { return vf{}; }

  // Stores the first n (<= kV) lanes of v at position p of a plane of size hw (dst: the
  // plane's start) whose positions are written in increasing order: where all kV lanes fit in
  // the plane they are stored at once (the extra ones land on positions written later), one
  // vector store instead of n scalar ones.
  static inline void store_n(float* dst, int64_t p, vf v, int64_t n, int64_t hw) {
    if (n == kV || p + kV <= hw) {
      st(dst + p, v);
    } else {
      for (int64_t l = 0; l < n; ++l) dst[p + l] = v[l];
    }
  }

  // The first n (<= kV) lanes at position p of a plane of size hw (the counterpart of
  // `store_n`): a whole vector where it fits in the plane (its extra lanes hold the next
  // positions' values), else the others zero (nothing past the plane is read).
  static inline vf load_n(const float* src, int64_t p, int64_t n, int64_t hw) {
    if (n == kV || p + kV <= hw) return ld(src + p);
    vf v = zero();
    for (int64_t l = 0; l < n; ++l) v[l] = src[p + l];
    return v;
  }

  // gw[p] += sign(w[p]) d[p] (the L1 norm's term of the taps' gradient).
  static inline void add_sign_term(float* gw, const float* w, const float* d, int64_t n) {
    int64_t p = 0;
    for (; p + kV <= n; p += kV) {
      const vf wv = ld(w + p), dv = ld(d + p);
      st(gw + p, ld(gw + p) + ((wv > 0.f ? dv : zero()) - (wv < 0.f ? dv : zero())));
    }
    for (; p < n; ++p) gw[p] += static_cast<float>((w[p] > 0.f) - (w[p] < 0.f)) * d[p];
  }

  // NQ output planes of the forward pass at once: dst[q](i, j) = sum_t tv_t(i, j) b_q(i + t / K,
  // j + t % K). tv holds the taps interleaved, the T vectors of a position next to each other
  // ([h, wv / kV, T, kV]); b_q are frames padded by K / 2 (stride b_plane). Every load is at a
  // constant offset from a pointer set once per position and tap row.
  template <int K, int NQ>
  static void forward_rows(const Shape& s, const float* tv, const float* b, int64_t b_cols,
                    int64_t b_plane, float* const* dst) {
    constexpr int T = K * K;
    const int64_t nv = s.wv / kV;
    for (int64_t i = 0; i < s.h; ++i)
      for (int64_t jv = 0; jv < nv; ++jv) {
        vf acc[NQ];
        for (int q = 0; q < NQ; ++q) acc[q] = zero();
        const float* ap = tv + (i * nv + jv) * T * kV;
  #pragma GCC unroll 7
        for (int di = 0; di < K; ++di) {
          const float* br = b + (i + di) * b_cols + jv * kV;
  #pragma GCC unroll 7
          for (int dj = 0; dj < K; ++dj) {
            const vf av = ld(ap + (di * K + dj) * kV);
            for (int q = 0; q < NQ; ++q) acc[q] += av * ld(br + q * b_plane + dj);
          }
        }
        const int64_t j = jv * kV, n = std::min(kV, s.w - j);
        for (int q = 0; q < NQ; ++q) store_n(dst[q], i * s.w + j, acc[q], n, s.hw);
      }
  }

  // All s.q output planes, four at a time (b: s.q frames shaped like `frame`, one after another).
  template <int K>
  static void forward_planes(const Shape& s, const float* tv, const float* b, const Frame& frame,
                      float* const* dst) {
    for (int64_t q0 = 0; q0 < s.q; q0 += 4) {
      const float* bq = b + q0 * frame.size;
      float* const* dq = dst + q0;
      switch (std::min<int64_t>(4, s.q - q0)) {
        case 4: forward_rows<K, 4>(s, tv, bq, frame.cols, frame.size, dq); break;
        case 3: forward_rows<K, 3>(s, tv, bq, frame.cols, frame.size, dq); break;
        case 2: forward_rows<K, 2>(s, tv, bq, frame.cols, frame.size, dq); break;
        default: forward_rows<K, 1>(s, tv, bq, frame.cols, frame.size, dq);
      }
    }
  }

  template <int K>
  static ffi::Error Forward(const Shape& s, ffi::Buffer<ffi::F32> x, const TapParts<const float*>& w,
                     ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> scale) {
    constexpr int T = K * K, R = K / 2;
    const float* xd = x.typed_data();
    float* od = out->typed_data();
    float* sd = scale->typed_data();
    const Frame xf(s, R);  // inputs padded by R: tap t reads (i + t / K, j + t % K)
    const int64_t nv = s.wv / kV;
    // Taps interleaved [h, nv, T, kV] and their L1 norm [h, wv]: whole vectors (`load_n`), so
    // lanes past w hold other values; the outputs they give are never kept (`store_n`).
    std::vector<float> tv(s.h * nv * T * kV, 0.f), xs(s.q * xf.size, 0.f);
    std::vector<float> l1(s.h * s.wv);
    std::vector<float*> dst(s.q);
    for (int64_t gi = 0; gi < s.g; ++gi)
      for (int64_t mi = 0; mi < s.m; ++mi) {
        // One read of the taps: interleaved into scratch while their L1 norm accumulates; the
        // raw outputs are scaled once the norm is complete.
        std::fill(l1.begin(), l1.end(), 0.f);
        for (int64_t c = 0; c < s.d; ++c) {
          for (int64_t t = 0; t < T; ++t) {
            const float* pl = w.tap(s, c, T, t, gi, mi);
            for (int64_t i = 0; i < s.h; ++i) {
              float* row = &tv[(i * nv * T + t) * kV];
              float* acc = &l1[i * s.wv];
              for (int64_t jv = 0; jv < nv; ++jv) {
                const int64_t j = jv * kV;
                const vf v = load_n(pl, i * s.w + j, std::min(kV, s.w - j), s.hw);
                st(row + jv * T * kV, v);
                st(acc + j, ld(acc + j) + (v > 0.f ? v : -v));
              }
            }
          }
          for (int64_t qi = 0; qi < s.q; ++qi) {
            xf.fill(s, xd + s.plane(c, s.q, qi, gi, mi), &xs[qi * xf.size]);
            dst[qi] = od + s.plane(c, s.q, qi, gi, mi);
          }
          forward_planes<K>(s, tv.data(), xs.data(), xf, dst.data());
        }
        float* sp = sd + (gi * s.m + mi) * s.hw;
        for (int64_t i = 0; i < s.h; ++i)
          for (int64_t j = 0; j < s.w; ++j)
            sp[i * s.w + j] = 0.2f / (0.2f * l1[i * s.wv + j] + 0.01f);
        for (int64_t c = 0; c < s.d; ++c)
          for (int64_t qi = 0; qi < s.q; ++qi) {
            float* o = od + s.plane(c, s.q, qi, gi, mi);
            for (int64_t p = 0; p < s.hw; ++p) o[p] *= sp[p];
          }
      }
    return ffi::Error::Success();
  }

  // With out = raw * scale (the forward's output), d scale = sum_{c,t} w_t gw_scaled_t / scale
  // = sum_{c,q} g out / scale and d scale / d l1 = -scale^2, so the L1 term of the taps'
  // gradient, dl1 = -scale * sum_{c,q} g out, is known before the taps are visited.
  //
  // With gs = gout * scale and off_t = (t / K - R, t % K - R):
  //   gx_q(p) = sum_t w_t(p - off_t) gs_q(p - off_t): the forward's sum (`forward_rows`) over
  //     the shifted taps wbar_u(p) = w_t(p - off_t), u = T - 1 - t, and gs_q read at
  //     (i + u / K, j + u % K) of a frame padded by R;
  //   gw_t(p) = sum_q gs_q(p) x_q(p + off_t) + sign(w_t(p)) dl1(p), one tap row (K taps) per
  //     pass over q, then the L1 term in a separate pass (as fast as adding it as each
  //     vector is stored, and simpler).
  template <int K>
  static ffi::Error Backward(const Shape& s, ffi::Buffer<ffi::F32> x, const TapParts<const float*>& w,
                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> out,
                      ffi::Buffer<ffi::F32> gout, ffi::ResultBuffer<ffi::F32> gx,
                      const TapParts<float*>& gw) {
    constexpr int T = K * K, R = K / 2;
    const float* xd = x.typed_data();
    const float* sd = scale.typed_data();
    const float* od = out.typed_data();
    const float* gd = gout.typed_data();
    float* gxd = gx->typed_data();
    const Frame f(s, R);
    const int64_t nv = s.wv / kV;
    std::vector<float> wbar(s.h * nv * T * kV, 0.f), gs(s.q * f.size, 0.f), xs(s.q * f.size, 0.f);
    std::vector<float> dl1(s.hw);
    std::vector<float> wframe(f.size, 0.f);
    std::vector<float*> dst(std::max<int64_t>(s.q, T));
    const int64_t centre = R * f.cols + R;  // (0, 0) of a plane in its frame
    for (int64_t gi = 0; gi < s.g; ++gi)
      for (int64_t mi = 0; mi < s.m; ++mi) {
        const float* sp = sd + (gi * s.m + mi) * s.hw;
        std::fill(dl1.begin(), dl1.end(), 0.f);
        for (int64_t c = 0; c < s.d; ++c)
          for (int64_t qi = 0; qi < s.q; ++qi) {
            const int64_t at = s.plane(c, s.q, qi, gi, mi);
            add_product(dl1.data(), gd + at, od + at, s.hw);
          }
        for (int64_t p = 0; p < s.hw; ++p) dl1[p] *= -sp[p];
        for (int64_t c = 0; c < s.d; ++c) {
          for (int64_t t = 0; t < T; ++t) {
            const int64_t di = t / K, dj = t % K, u = T - 1 - t;
            // w_t into a frame padded by R (whole plane first: reading a row right after
            // writing it would stall on store forwarding), then wbar_u(i, j) = frame(i + 2R -
            // di, j + 2R - dj); rows and columns past the plane read the zero border.
            f.fill(s, w.tap(s, c, T, t, gi, mi), wframe.data());
            for (int64_t i = 0; i < s.h; ++i) {
              float* dst_row = &wbar[(i * nv * T + u) * kV];
              const float* src = wframe.data() + (i + 2 * R - di) * f.cols + 2 * R - dj;
              for (int64_t jv = 0; jv < nv; ++jv) st(dst_row + jv * T * kV, ld(src + jv * kV));
            }
          }
          for (int64_t qi = 0; qi < s.q; ++qi) {
            f.fill(s, gd + s.plane(c, s.q, qi, gi, mi), &gs[qi * f.size], sp);
            f.fill(s, xd + s.plane(c, s.q, qi, gi, mi), &xs[qi * f.size]);
            dst[qi] = gxd + s.plane(c, s.q, qi, gi, mi);
          }
          forward_planes<K>(s, wbar.data(), gs.data(), f, dst.data());
          for (int64_t t = 0; t < T; ++t) dst[t] = gw.tap(s, c, T, t, gi, mi);
          for (int64_t i = 0; i < s.h; ++i)
            for (int64_t jv = 0; jv < nv; ++jv) {
              const int64_t j = jv * kV, n = std::min(kV, s.w - j);
  #pragma GCC unroll 7
              for (int di = 0; di < K; ++di) {
                vf acc[K];
                for (int dj = 0; dj < K; ++dj) acc[dj] = zero();
                for (int64_t qi = 0; qi < s.q; ++qi) {
                  const vf gv = ld(gs.data() + qi * f.size + i * f.cols + j + centre);
                  const float* xr = xs.data() + qi * f.size + (i + di) * f.cols + j;
                  for (int dj = 0; dj < K; ++dj) acc[dj] += gv * ld(xr + dj);
                }
                for (int dj = 0; dj < K; ++dj)
                  store_n(dst[di * K + dj], i * s.w + j, acc[dj], n, s.hw);
              }
            }
          for (int64_t t = 0; t < T; ++t)
            add_sign_term(dst[t], w.tap(s, c, T, t, gi, mi), dl1.data(), s.hw);
        }
      }
    return ffi::Error::Success();
  }

};

// The tap buffers (a variable number of arguments or results: one or more parts of the
// component axis, each [S, d_i, T * G / S * M * H * W]), checked against x [d, Q, G,
// M * H * W].
ffi::Error CheckParts(const TapParts<const float*>& w, const std::vector<int64_t>& plane,
                      const Shape& s, int64_t nt, ffi::Span<const int64_t> x, int64_t groups) {
  if (x.size() != 4 || s.hw <= 0 || x[3] != s.m * s.hw)
    return ffi::Error::InvalidArgument(
        "normalised_apply kernel: x must be [d, Q, G, M * height * width]");
  if (groups <= 0 || s.g % groups)
    return ffi::Error::InvalidArgument("normalised_apply kernel: S must divide G");
  if (w.data.empty()) return ffi::Error::InvalidArgument("normalised_apply kernel: no taps");
  if (static_cast<int64_t>(w.part.size()) != s.d)
    return ffi::Error::InvalidArgument(
        "normalised_apply kernel: the tap parts' components do not add up to x's");
  for (int64_t n : plane)
    if (n != nt * s.gl * s.m * s.hw)
      return ffi::Error::InvalidArgument(
          "normalised_apply kernel: taps must be [S, d_i, T * G / S * M * H * W]");
  return ffi::Error::Success();
}

ffi::Error DecodeTaps(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, int64_t nt,
                      int64_t height, int64_t width, TapParts<const float*>& w, Shape& s) {
  int64_t groups = 1;
  std::vector<int64_t> plane;
  for (size_t i = 0; i < args.size(); ++i) {
    auto b = args.get<ffi::Buffer<ffi::F32>>(i);
    if (!b.has_value()) return b.error();
    const auto dims = b->dimensions();
    if (dims.size() != 3)
      return ffi::Error::InvalidArgument("normalised_apply kernel: taps must be 3-D");
    groups = dims[0];
    w.add(b->typed_data(), dims[1]);
    plane.push_back(dims[2]);
  }
  s = Shape(x.dimensions(), height, width, groups);
  return CheckParts(w, plane, s, nt, x.dimensions(), groups);
}

template <int K>
ffi::Error ForwardK(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs wa,
                    ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> scale,
                    int64_t height, int64_t width) {
  TapParts<const float*> w;
  Shape s;
  if (auto e = DecodeTaps(x, wa, K * K, height, width, w, s); e.failure()) return e;
#if defined(__AVX512F__)
  if (s.w > 8) return Simd<16>::Forward<K>(s.with_lanes(16), x, w, out, scale);
#endif
  return Simd<8>::Forward<K>(s.with_lanes(8), x, w, out, scale);
}

template <int K>
ffi::Error BackwardK(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                     ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> gout, ffi::RemainingArgs wa,
                     ffi::ResultBuffer<ffi::F32> gx, ffi::RemainingRets gwr, int64_t height,
                     int64_t width) {
  TapParts<const float*> w;
  Shape s;
  if (auto e = DecodeTaps(x, wa, K * K, height, width, w, s); e.failure()) return e;
  if (gwr.size() != w.data.size())
    return ffi::Error::InvalidArgument("normalised_apply kernel: one gradient per tap part");
  TapParts<float*> gw;
  for (size_t i = 0; i < gwr.size(); ++i) {
    auto r = gwr.get<ffi::Buffer<ffi::F32>>(i);
    if (!r.has_value()) return r.error();
    gw.add((*r)->typed_data(), w.size[i]);
  }
#if defined(__AVX512F__)
  if (s.w > 8) return Simd<16>::Backward<K>(s.with_lanes(16), x, w, scale, out, gout, gx, gw);
#endif
  return Simd<8>::Backward<K>(s.with_lanes(8), x, w, scale, out, gout, gx, gw);
}

ffi::Error ForwardAny(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs w,
                      ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> scale,
                      int64_t k, int64_t h, int64_t w_) {
  switch (k) {
    case 3: return ForwardK<3>(x, w, out, scale, h, w_);
    case 5: return ForwardK<5>(x, w, out, scale, h, w_);
    case 7: return ForwardK<7>(x, w, out, scale, h, w_);
  }
  return ffi::Error::InvalidArgument("normalised_apply kernel: kernel_size must be 3, 5 or 7");
}

ffi::Error BackwardAny(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> gout,
                       ffi::RemainingArgs w, ffi::ResultBuffer<ffi::F32> gx,
                       ffi::RemainingRets gw, int64_t k, int64_t h, int64_t w_) {
  switch (k) {
    case 3: return BackwardK<3>(x, scale, out, gout, w, gx, gw, h, w_);
    case 5: return BackwardK<5>(x, scale, out, gout, w, gx, gw, h, w_);
    case 7: return BackwardK<7>(x, scale, out, gout, w, gx, gw, h, w_);
  }
  return ffi::Error::InvalidArgument("normalised_apply kernel: kernel_size must be 3, 5 or 7");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormalisedApplyForward, ForwardAny,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .RemainingArgs()               // w: its parts
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // scale
                                  .Attr<int64_t>("kernel_size")
                                  .Attr<int64_t>("height")
                                  .Attr<int64_t>("width"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormalisedApplyBackward, BackwardAny,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gout
                                  .RemainingArgs()               // w: its parts
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gx
                                  .RemainingRets()               // gw: one per part of w
                                  .Attr<int64_t>("kernel_size")
                                  .Attr<int64_t>("height")
                                  .Attr<int64_t>("width"));
