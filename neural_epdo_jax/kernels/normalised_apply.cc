// CPU kernels (XLA FFI) for neural_epdo_jax.layers.normalised_apply: steps 3-4 of the Neural
// ePDO layer, out = scale * sum_t w_t x(. + off_t) with scale = 0.2 / (0.2 sum |w| + 0.01),
// and its backward pass. The formulas are those of layers._normalised_apply_fwd_impl and
// layers._na_bwd_xla; tests/kernels_test.py checks both against that XLA path.
//
// Arrays are channel-major planes: x, out, gout [d, Q, G, M, H, W]; w, gw [d, T, G, M, H, W]
// with T = K * K taps (tap t is the offset (t / K - K / 2, t % K - K / 2)); scale [G, M, H, W].
// Each (g, m) plane group is copied into zero-padded scratch planes whose rows are whole
// vectors, so the inner loops are branch-free vector multiply-adds over a row.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kV = 8;  // floats per vector (GCC vector extension: AVX2 or two SSE/NEON)
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned access

inline v8 ld(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void st(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
inline v8 zero() { return v8{0, 0, 0, 0, 0, 0, 0, 0}; }

// Stores the first n (<= kV) lanes of v.
inline void store_n(float* dst, v8 v, int64_t n) {
  if (n == kV) {
    st(dst, v);
  } else {
    for (int64_t l = 0; l < n; ++l) dst[l] = v[l];
  }
}

struct Shape {
  int64_t d, q, g, m, h, w, hw, wv;
  Shape(ffi::Span<const int64_t> x) {
    d = x[0], q = x[1], g = x[2], m = x[3], h = x[4], w = x[5];
    hw = h * w;
    wv = (w + kV - 1) / kV * kV;  // row length in whole vectors
  }
  // Start of plane (a, b) of an array [A, nb, G, M, H, W] at (gi, mi).
  int64_t plane(int64_t a, int64_t nb, int64_t b, int64_t gi, int64_t mi) const {
    return (((a * nb + b) * g + gi) * m + mi) * hw;
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

// NQ planes at once: dst[a](i, j) = sum_t A_t(i, j) B_a(i + oi_t, j + oj_t), where A (stride
// a_plane per tap) and B_a (stride b_plane per plane) are frames read at a per-tap offset
// (a_off[t], b_off[t]) from (i * cols, j).
template <int NQ, int T>
void taps_rows(const Shape& s, const float* a, int64_t a_cols, int64_t a_plane, const int64_t* a_off,
               const float* b, int64_t b_cols, int64_t b_plane, const int64_t* b_off,
               float* const* dst) {
  for (int64_t i = 0; i < s.h; ++i)
    for (int64_t j = 0; j < s.wv; j += kV) {
      v8 acc[NQ];
      for (int q = 0; q < NQ; ++q) acc[q] = zero();
      const float* ar = a + i * a_cols + j;
      const float* br = b + i * b_cols + j;
#pragma GCC unroll 49
      for (int t = 0; t < T; ++t) {
        const v8 av = ld(ar + t * a_plane + a_off[t]);
        for (int q = 0; q < NQ; ++q) acc[q] += av * ld(br + q * b_plane + b_off[t]);
      }
      const int64_t n = std::min(kV, s.w - j);
      for (int q = 0; q < NQ; ++q) store_n(dst[q] + i * s.w + j, acc[q], n);
    }
}

template <int T>
void taps_planes(const Shape& s, int64_t nq, const float* a, int64_t a_cols, int64_t a_plane,
                 const int64_t* a_off, const float* b, int64_t b_cols, int64_t b_plane,
                 const int64_t* b_off, float* const* dst) {
  for (int64_t q0 = 0; q0 < nq; q0 += 4) {
    const float* bq = b + q0 * b_plane;
    float* const* dq = dst + q0;
    switch (std::min<int64_t>(4, nq - q0)) {
      case 4: taps_rows<4, T>(s, a, a_cols, a_plane, a_off, bq, b_cols, b_plane, b_off, dq); break;
      case 3: taps_rows<3, T>(s, a, a_cols, a_plane, a_off, bq, b_cols, b_plane, b_off, dq); break;
      case 2: taps_rows<2, T>(s, a, a_cols, a_plane, a_off, bq, b_cols, b_plane, b_off, dq); break;
      default: taps_rows<1, T>(s, a, a_cols, a_plane, a_off, bq, b_cols, b_plane, b_off, dq);
    }
  }
}

template <int K>
ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> scale) {
  constexpr int T = K * K, R = K / 2;
  const Shape s(x.dimensions());
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  float* od = out->typed_data();
  float* sd = scale->typed_data();
  const Frame xf(s, R);  // inputs padded by R: tap t reads (i + t / K, j + t % K)
  std::vector<float> taps(T * s.h * s.wv, 0.f), xs(s.q * xf.size, 0.f);  // zeros past w
  std::vector<float*> dst(s.q);
  int64_t a_off[T], b_off[T];
  for (int t = 0; t < T; ++t) a_off[t] = 0, b_off[t] = (t / K) * xf.cols + t % K;
  for (int64_t gi = 0; gi < s.g; ++gi)
    for (int64_t mi = 0; mi < s.m; ++mi) {
      // One read of the taps: copied into the scratch planes while their L1 norm accumulates;
      // the raw outputs are scaled once the norm is complete.
      float* sp = sd + (gi * s.m + mi) * s.hw;
      std::fill(sp, sp + s.hw, 0.f);
      for (int64_t c = 0; c < s.d; ++c) {
        for (int64_t t = 0; t < T; ++t) {
          const float* pl = wd + s.plane(c, T, t, gi, mi);
          for (int64_t i = 0; i < s.h; ++i) {
            const float* in = pl + i * s.w;
            float* row = &taps[(t * s.h + i) * s.wv];
            float* l1 = sp + i * s.w;
            for (int64_t j = 0; j < s.w; ++j) {
              row[j] = in[j];
              l1[j] += std::fabs(in[j]);
            }
          }
        }
        for (int64_t qi = 0; qi < s.q; ++qi) {
          xf.fill(s, xd + s.plane(c, s.q, qi, gi, mi), &xs[qi * xf.size]);
          dst[qi] = od + s.plane(c, s.q, qi, gi, mi);
        }
        taps_planes<T>(s, s.q, taps.data(), s.wv, s.h * s.wv, a_off, xs.data(), xf.cols, xf.size,
                       b_off, dst.data());
      }
      for (int64_t p = 0; p < s.hw; ++p) sp[p] = 0.2f / (0.2f * sp[p] + 0.01f);
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
// gradient, dl1 = -scale * sum_{c,q} g out, is known before the taps are visited: every
// array is then read or written once.
template <int K>
ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> gout,
                    ffi::ResultBuffer<ffi::F32> gx, ffi::ResultBuffer<ffi::F32> gw) {
  constexpr int T = K * K, R = K / 2;
  const Shape s(x.dimensions());
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  const float* sd = scale.typed_data();
  const float* od = out.typed_data();
  const float* gd = gout.typed_data();
  float* gxd = gx->typed_data();
  float* gwd = gw->typed_data();
  // x reaches out[p - off_t] through w_t[p - off_t]: taps and gs = gout * scale padded by 2R,
  // read at (i + 3R - t / K, j + 3R - t % K); x padded by R, read at (i + t / K, j + t % K).
  const Frame wf(s, 2 * R), xf(s, R);
  std::vector<float> taps(T * wf.size, 0.f), gs(s.q * wf.size, 0.f), xs(s.q * xf.size, 0.f);
  std::vector<float> dl1(s.h * s.wv, 0.f);  // rows of whole vectors
  std::vector<float*> dst(std::max<int64_t>(s.q, T));
  int64_t back[T], fwd[T];
  for (int t = 0; t < T; ++t) {
    back[t] = (3 * R - t / K) * wf.cols + 3 * R - t % K;
    fwd[t] = (t / K) * xf.cols + t % K;
  }
  const int64_t centre = 2 * R * wf.cols + 2 * R;  // (0, 0) of a plane in its wf frame
  for (int64_t gi = 0; gi < s.g; ++gi)
    for (int64_t mi = 0; mi < s.m; ++mi) {
      const float* sp = sd + (gi * s.m + mi) * s.hw;
      for (int64_t i = 0; i < s.h; ++i) {
        float* row = &dl1[i * s.wv];
        std::fill(row, row + s.w, 0.f);
        for (int64_t c = 0; c < s.d; ++c)
          for (int64_t qi = 0; qi < s.q; ++qi) {
            const int64_t at = s.plane(c, s.q, qi, gi, mi) + i * s.w;
            for (int64_t j = 0; j < s.w; ++j) row[j] += gd[at + j] * od[at + j];
          }
        for (int64_t j = 0; j < s.w; ++j) row[j] *= -sp[i * s.w + j];
      }
      for (int64_t c = 0; c < s.d; ++c) {
        for (int64_t t = 0; t < T; ++t) wf.fill(s, wd + s.plane(c, T, t, gi, mi), &taps[t * wf.size]);
        for (int64_t qi = 0; qi < s.q; ++qi) {
          wf.fill(s, gd + s.plane(c, s.q, qi, gi, mi), &gs[qi * wf.size], sp);
          xf.fill(s, xd + s.plane(c, s.q, qi, gi, mi), &xs[qi * xf.size]);
          dst[qi] = gxd + s.plane(c, s.q, qi, gi, mi);
        }
        // gx_q = sum_t w_t(p - off_t) gs_q(p - off_t)
        taps_planes<T>(s, s.q, taps.data(), wf.cols, wf.size, back, gs.data(), wf.cols, wf.size,
                       back, dst.data());
        // gw_t = sum_q gs_q(p) x_q(p + off_t) + sign(w_t(p)) dl1(p), a few taps per pass over
        // q (gs_q shared, x_q read at each tap's offset).
        for (int64_t t = 0; t < T; ++t) dst[t] = gwd + s.plane(c, T, t, gi, mi);
        for (int64_t t0 = 0; t0 < T; t0 += 4) {
          const int64_t nt = std::min<int64_t>(4, T - t0);
          for (int64_t i = 0; i < s.h; ++i)
            for (int64_t j = 0; j < s.wv; j += kV) {
              v8 acc[4] = {zero(), zero(), zero(), zero()};
              const int64_t at = i * wf.cols + j + centre;
              for (int64_t qi = 0; qi < s.q; ++qi) {
                const v8 gv = ld(gs.data() + qi * wf.size + at);
                const float* xr = xs.data() + qi * xf.size + i * xf.cols + j;
                for (int64_t a = 0; a < nt; ++a) acc[a] += gv * ld(xr + fwd[t0 + a]);
              }
              const v8 d = ld(&dl1[i * s.wv + j]);
              const int64_t n = std::min(kV, s.w - j);
              for (int64_t a = 0; a < nt; ++a) {
                const v8 wv = ld(taps.data() + (t0 + a) * wf.size + at);
                const v8 term = (wv > 0.f ? d : zero()) - (wv < 0.f ? d : zero());
                store_n(dst[t0 + a] + i * s.w + j, acc[a] + term, n);
              }
            }
        }
      }
    }
  return ffi::Error::Success();
}

ffi::Error ForwardAny(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> scale,
                      int64_t k) {
  switch (k) {
    case 3: return Forward<3>(x, w, out, scale);
    case 5: return Forward<5>(x, w, out, scale);
    case 7: return Forward<7>(x, w, out, scale);
  }
  return ffi::Error::InvalidArgument("normalised_apply kernel: kernel_size must be 3, 5 or 7");
}

ffi::Error BackwardAny(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> out,
                       ffi::Buffer<ffi::F32> gout, ffi::ResultBuffer<ffi::F32> gx,
                       ffi::ResultBuffer<ffi::F32> gw, int64_t k) {
  switch (k) {
    case 3: return Backward<3>(x, w, scale, out, gout, gx, gw);
    case 5: return Backward<5>(x, w, scale, out, gout, gx, gw);
    case 7: return Backward<7>(x, w, scale, out, gout, gx, gw);
  }
  return ffi::Error::InvalidArgument("normalised_apply kernel: kernel_size must be 3, 5 or 7");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormalisedApplyForward, ForwardAny,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // scale
                                  .Attr<int64_t>("kernel_size"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormalisedApplyBackward, BackwardAny,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gout
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gw
                                  .Attr<int64_t>("kernel_size"));
