// Windowed attention on the CPU, query by query: every query visits only its prefix tokens
// and the keys inside its own window rectangle, so the work is exactly the window area (no
// halo waste) and q, k, v are read in place through strides (no gathers, no copies).
//
// Built at first use by vitfree/ops/native.py (g++ -O3 -fopenmp, loaded with ctypes); the
// OpenMP runtime is the one PyTorch already loaded (same soname), so both share one pool.
//
// Layouts (element strides, fp32):
//   q, k, v : (B, H, T, D) with strides s[0] (batch), s[1] (head), s[2] (token); unit stride in D
//   bounds  : (BH, T, 4) int32, per token: first row, last row, first col, last col of its
//             window (inclusive); BH = 1 (shared by heads) or H (per head); prefix tokens
//             carry the whole grid
//   out     : (B, T, H, D) contiguous (the layout the output projection reads)
//   lse     : (B, H, T) log-sum-exp of every query row
// Logits, softmax and accumulation are fp32.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

namespace {

// exp(x) for x <= 0: Cody-Waite reduction and a degree-7 polynomial (relative error < 2e-7);
// written so that GCC vectorises the loops that call it.
inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;
    const float n = std::floor(t + 0.5f);
    const float f = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
    float p = 1.9841270e-04f;
    p = p * f + 1.3888889e-03f;
    p = p * f + 8.3333333e-03f;
    p = p * f + 4.1666667e-02f;
    p = p * f + 1.6666667e-01f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
    return s;
}

// four dot products against one vector, four accumulators: one pass over `a`
inline void dot4(const float* __restrict a, const float* __restrict b0, const float* __restrict b1,
                 const float* __restrict b2, const float* __restrict b3, int64_t d, float* out) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < d; ++i) {
        s0 += a[i] * b0[i];
        s1 += a[i] * b1[i];
        s2 += a[i] * b2[i];
        s3 += a[i] * b3[i];
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

// softmax numerators in place: s[j] <- exp(s[j] - max); returns (max, sum of numerators)
inline void softmax_numerators(float* s, int64_t n, float* max_out, float* sum_out) {
    float m = s[0];
#pragma omp simd reduction(max : m)
    for (int64_t j = 1; j < n; ++j) m = s[j] > m ? s[j] : m;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
        const float e = exp_nonpos(s[j] - m);
        s[j] = e;
        sum += e;
    }
    *max_out = m;
    *sum_out = sum;
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t d) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) y[i] += alpha * x[i];
}

struct Geometry {
    int64_t B, H, T, D, P, gw;
    const int64_t *qs, *ks, *vs;
    const int32_t* bounds;
    int64_t bounds_heads;

    const int32_t* window(int64_t h, int64_t t) const {
        return bounds + ((bounds_heads == 1 ? 0 : h) * T + t) * 4;
    }
    int64_t num_keys(const int32_t* w) const {
        return P + static_cast<int64_t>(w[1] - w[0] + 1) * (w[3] - w[2] + 1);
    }
};

// token index of every key of one query, in visiting order: prefix tokens, then the window row by row
inline int64_t key_tokens(const Geometry& g, const int32_t* w, int64_t* idx) {
    int64_t n = 0;
    for (int64_t j = 0; j < g.P; ++j) idx[n++] = j;
    for (int64_t r = w[0]; r <= w[1]; ++r) {
        const int64_t base = g.P + r * g.gw;
        for (int64_t c = w[2]; c <= w[3]; ++c) idx[n++] = base + c;
    }
    return n;
}

// scaled logits of one query against its keys
inline void logits(const float* qrow, const float* kbase, int64_t kst, const int64_t* idx, int64_t n, int64_t d,
                   float scale, float* s) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        dot4(qrow, kbase + idx[i] * kst, kbase + idx[i + 1] * kst, kbase + idx[i + 2] * kst,
             kbase + idx[i + 3] * kst, d, s + i);
    }
    for (; i < n; ++i) s[i] = dot(qrow, kbase + idx[i] * kst, d);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] *= scale;
}

// ---- fast path for head sizes that are a multiple of 16: whole rows in vector registers ----
typedef float vf __attribute__((vector_size(64)));             // 16 floats (one zmm, or two ymm)
typedef float vfu __attribute__((vector_size(64), aligned(4)));  // the same, unaligned in memory
typedef int32_t vi __attribute__((vector_size(64)));

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }

inline float hsum(vf x) {
    x += __builtin_shuffle(x, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    x += __builtin_shuffle(x, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    x += __builtin_shuffle(x, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    x += __builtin_shuffle(x, vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return x[0];
}

template <int V>
struct Row {  // one head-size row (V * 16 floats) held in registers
    vf x[V];
    void zero() { for (int i = 0; i < V; ++i) x[i] = vf{}; }
    void load_from(const float* p, float scale = 1.0f) { for (int i = 0; i < V; ++i) x[i] = load(p + 16 * i) * scale; }
    void add_scaled(float a, const float* p) { for (int i = 0; i < V; ++i) x[i] += a * load(p + 16 * i); }
    void store_to(float* p, float scale = 1.0f) const { for (int i = 0; i < V; ++i) store(p + 16 * i, x[i] * scale); }
    void add_to(float* p, float scale) const { for (int i = 0; i < V; ++i) store(p + 16 * i, load(p + 16 * i) + x[i] * scale); }
    float dot(const float* p) const {
        vf a = x[0] * load(p);
        for (int i = 1; i < V; ++i) a += x[i] * load(p + 16 * i);
        return hsum(a);
    }
};

// logits of one query row (already scaled) against its keys
template <int V>
inline void row_logits(const Row<V>& q, const float* kbase, int64_t kst, const int64_t* idx, int64_t n, float* s) {
    for (int64_t j = 0; j < n; ++j) s[j] = q.dot(kbase + idx[j] * kst);
}

template <int V>
void forward_rows(const Geometry& g, const float* q, const float* k, const float* v, float scale, float* out,
                  float* lse, int threads) {
    // Work items are blocks of consecutive queries of one image, all heads: the tokens a block's
    // windows touch (every head's q, k, v share each token's row of the qkv projection) are
    // read from memory once and reused from cache by all heads.
    const int64_t T = g.T, H = g.H, D = 16 * V, blk = 16, nblk = (T + blk - 1) / blk;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> s(T);
        std::vector<int64_t> idx(T);
#pragma omp for collapse(2) schedule(dynamic, 2)
        for (int64_t b = 0; b < g.B; ++b) {
            for (int64_t tb = 0; tb < nblk; ++tb) {
                const int64_t t1 = (tb + 1) * blk < T ? (tb + 1) * blk : T;
                for (int64_t t = tb * blk; t < t1; ++t) {
                    for (int64_t h = 0; h < H; ++h) {
                        const float* kb = k + b * g.ks[0] + h * g.ks[1];
                        const float* vb = v + b * g.vs[0] + h * g.vs[1];
                        const int64_t n = key_tokens(g, g.window(h, t), idx.data());
                        Row<V> qr;
                        qr.load_from(q + b * g.qs[0] + h * g.qs[1] + t * g.qs[2], scale);
                        row_logits(qr, kb, g.ks[2], idx.data(), n, s.data());
                        float m, sum;
                        softmax_numerators(s.data(), n, &m, &sum);
                        Row<V> acc, acc2;  // two sets of accumulators: half-length dependency chains
                        acc.zero();
                        acc2.zero();
                        int64_t j = 0;
                        for (; j + 2 <= n; j += 2) {
                            acc.add_scaled(s[j], vb + idx[j] * g.vs[2]);
                            acc2.add_scaled(s[j + 1], vb + idx[j + 1] * g.vs[2]);
                        }
                        if (j < n) acc.add_scaled(s[j], vb + idx[j] * g.vs[2]);
                        for (int i = 0; i < V; ++i) acc.x[i] += acc2.x[i];
                        acc.store_to(out + ((b * T + t) * H + h) * D, 1.0f / sum);
                        lse[(b * H + h) * T + t] = m + std::log(sum);
                    }
                }
            }
        }
    }
}

template <int V>
void backward_rows(const Geometry& g, const float* q, const float* k, const float* v, const float* out,
                   const float* grad_out, const float* lse, float scale, float* dq, float* dk, float* dv,
                   const int64_t* dqs, const int64_t* dks, const int64_t* dvs, int threads) {
    const int64_t T = g.T, H = g.H, D = 16 * V;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> s(T), dp(T);
        std::vector<int64_t> idx(T);
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < g.B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            const float* qb = q + b * g.qs[0] + h * g.qs[1];
            const float* kb = k + b * g.ks[0] + h * g.ks[1];
            const float* vb = v + b * g.vs[0] + h * g.vs[1];
            float* dqb = dq + b * dqs[0] + h * dqs[1];
            float* dkb = dk + b * dks[0] + h * dks[1];
            float* dvb = dv + b * dvs[0] + h * dvs[1];
            for (int64_t t = 0; t < T; ++t) {
                const int64_t n = key_tokens(g, g.window(h, t), idx.data());
                Row<V> qr, go;
                qr.load_from(qb + t * g.qs[2], scale);
                row_logits(qr, kb, g.ks[2], idx.data(), n, s.data());
                const float l = lse[bh * T + t];
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) s[j] = exp_nonpos(s[j] - l);  // probabilities
                const float* gop = grad_out + ((b * T + t) * H + h) * D;
                go.load_from(gop);
                const float delta = go.dot(out + ((b * T + t) * H + h) * D);
                row_logits(go, vb, g.vs[2], idx.data(), n, dp.data());  // dO . v_j
                Row<V> acc;
                acc.zero();
                const float* qrow = qb + t * g.qs[2];
                for (int64_t j = 0; j < n; ++j) {
                    const float ds = s[j] * (dp[j] - delta);  // d loss / d logit
                    const int64_t tok = idx[j];
                    acc.add_scaled(ds, kb + tok * g.ks[2]);
                    float* dkr = dkb + tok * dks[2];
                    float* dvr = dvb + tok * dvs[2];
                    for (int i = 0; i < V; ++i) {
                        store(dkr + 16 * i, load(dkr + 16 * i) + (ds * scale) * load(qrow + 16 * i));
                        store(dvr + 16 * i, load(dvr + 16 * i) + s[j] * go.x[i]);
                    }
                }
                acc.add_to(dqb + t * dqs[2], scale);
            }
        }
    }
}

}  // namespace

extern "C" {

int vitfree_window_attention_forward(const float* q, const float* k, const float* v, int64_t B, int64_t H,
                                     int64_t T, int64_t D, int64_t P, int64_t gw, const int64_t* qs,
                                     const int64_t* ks, const int64_t* vs, const int32_t* bounds,
                                     int64_t bounds_heads, float scale, float* out, float* lse, int threads) {
    const Geometry g{B, H, T, D, P, gw, qs, ks, vs, bounds, bounds_heads};
    switch (D) {
        case 16: forward_rows<1>(g, q, k, v, scale, out, lse, threads); return 0;
        case 32: forward_rows<2>(g, q, k, v, scale, out, lse, threads); return 0;
        case 48: forward_rows<3>(g, q, k, v, scale, out, lse, threads); return 0;
        case 64: forward_rows<4>(g, q, k, v, scale, out, lse, threads); return 0;
        case 80: forward_rows<5>(g, q, k, v, scale, out, lse, threads); return 0;
        case 96: forward_rows<6>(g, q, k, v, scale, out, lse, threads); return 0;
        case 128: forward_rows<8>(g, q, k, v, scale, out, lse, threads); return 0;
        default: break;
    }
    const int64_t blk = 32;  // queries per work item
    const int64_t nblk = (T + blk - 1) / blk;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> s(T);
        std::vector<int64_t> idx(T);
        std::vector<float> acc(D);
#pragma omp for collapse(2) schedule(dynamic, 4)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            for (int64_t tb = 0; tb < nblk; ++tb) {
                const int64_t b = bh / H, h = bh % H;
                const float* qb = q + b * qs[0] + h * qs[1];
                const float* kb = k + b * ks[0] + h * ks[1];
                const float* vb = v + b * vs[0] + h * vs[1];
                const int64_t t1 = (tb + 1) * blk < T ? (tb + 1) * blk : T;
                for (int64_t t = tb * blk; t < t1; ++t) {
                    const int64_t n = key_tokens(g, g.window(h, t), idx.data());
                    logits(qb + t * qs[2], kb, ks[2], idx.data(), n, D, scale, s.data());
                    float m, sum;
                    softmax_numerators(s.data(), n, &m, &sum);
                    std::fill(acc.begin(), acc.end(), 0.0f);
                    for (int64_t j = 0; j < n; ++j) axpy(s[j], vb + idx[j] * vs[2], acc.data(), D);
                    const float inv = 1.0f / sum;
                    float* o = out + ((b * T + t) * H + h) * D;
#pragma omp simd
                    for (int64_t i = 0; i < D; ++i) o[i] = acc[i] * inv;
                    lse[bh * T + t] = m + std::log(sum);
                }
            }
        }
    }
    return 0;
}

// Gradients.  dq, dk, dv are fp32 buffers (zero on entry) with (batch, head, token) strides
// gs[0..2], unit stride in D; work is split by (batch, head), so the key-side sums never race.
int vitfree_window_attention_backward(const float* q, const float* k, const float* v, const float* out,
                                      const float* grad_out, const float* lse, int64_t B, int64_t H, int64_t T,
                                      int64_t D, int64_t P, int64_t gw, const int64_t* qs, const int64_t* ks,
                                      const int64_t* vs, const int32_t* bounds, int64_t bounds_heads, float scale,
                                      float* dq, float* dk, float* dv, const int64_t* dqs, const int64_t* dks,
                                      const int64_t* dvs, int threads) {
    const Geometry g{B, H, T, D, P, gw, qs, ks, vs, bounds, bounds_heads};
#define VITFREE_BACKWARD(V) backward_rows<V>(g, q, k, v, out, grad_out, lse, scale, dq, dk, dv, dqs, dks, dvs, threads)
    switch (D) {
        case 16: VITFREE_BACKWARD(1); return 0;
        case 32: VITFREE_BACKWARD(2); return 0;
        case 48: VITFREE_BACKWARD(3); return 0;
        case 64: VITFREE_BACKWARD(4); return 0;
        case 80: VITFREE_BACKWARD(5); return 0;
        case 96: VITFREE_BACKWARD(6); return 0;
        case 128: VITFREE_BACKWARD(8); return 0;
        default: break;
    }
#undef VITFREE_BACKWARD
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> s(T), dp(T);
        std::vector<int64_t> idx(T);
        std::vector<float> acc(D);
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            const float* qb = q + b * qs[0] + h * qs[1];
            const float* kb = k + b * ks[0] + h * ks[1];
            const float* vb = v + b * vs[0] + h * vs[1];
            float* dqb = dq + b * dqs[0] + h * dqs[1];
            float* dkb = dk + b * dks[0] + h * dks[1];
            float* dvb = dv + b * dvs[0] + h * dvs[1];
            for (int64_t t = 0; t < T; ++t) {
                const int64_t n = key_tokens(g, g.window(h, t), idx.data());
                const float* qrow = qb + t * qs[2];
                logits(qrow, kb, ks[2], idx.data(), n, D, scale, s.data());
                const float l = lse[bh * T + t];
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) s[j] = exp_nonpos(s[j] - l);  // probabilities
                const float* go = grad_out + ((b * T + t) * H + h) * D;
                const float delta = dot(go, out + ((b * T + t) * H + h) * D, D);
                logits(go, vb, vs[2], idx.data(), n, D, 1.0f, dp.data());  // dO . v_j
                std::fill(acc.begin(), acc.end(), 0.0f);
                for (int64_t j = 0; j < n; ++j) {
                    const float ds = s[j] * (dp[j] - delta);  // d loss / d logit
                    const int64_t tok = idx[j];
                    axpy(ds, kb + tok * ks[2], acc.data(), D);
                    axpy(ds * scale, qrow, dkb + tok * dks[2], D);
                    axpy(s[j], go, dvb + tok * dvs[2], D);
                }
                float* dqr = dqb + t * dqs[2];
#pragma omp simd
                for (int64_t i = 0; i < D; ++i) dqr[i] += acc[i] * scale;
            }
        }
    }
    return 0;
}

}  // extern "C"
