// Windowed attention on the CPU, blocked: queries are the vector lanes.
//
// A tile is up to NR grid rows x L consecutive columns of queries (L = 16 with AVX-512, 8 with
// AVX2 or the generic build), one L-lane vector per row.  K and V of one (image, head) are first
// packed transposed per grid row, [row][channel][column] with zero padding on both sides, so that
// the L keys at a fixed offset (dr, dc) from the tile's L queries are one contiguous vector:
// S[lane] = sum_d Q^T[d][lane] * K^T[row + dr][d][col + dc + lane] is a plain elementwise FMA
// over d, and so is the P V product.  A tile works over the union of its queries' windows,
// expressed as offsets (dr, dc) relative to each query, in key blocks of one key row and NC
// offsets; the NR query rows of a tile share every key vector they load (register blocking in
// both query rows and offsets for Q K^T, and in query rows and channels for P V).  Every (query,
// key) pair of the block is masked per query with a select, so the result is exact per patch:
// keys outside a query's window contribute exactly nothing, even when they hold NaN or Inf.
// The softmax is exact in two passes over the tile's logits (a tile's union of windows is small
// and stays in L1/L2, so no rescaling is needed); accumulation is fp32.
//
// Prefix tokens (0..P-1: class/register tokens) are seen by every query (their keys are
// broadcast to all lanes) and see every token (each prefix query runs with keys as lanes).
//
// The backward pass recomputes the probabilities from the saved log-sum-exp.  Query side (per
// tile): S, P, dP = dO V^T, dS = P (dP - delta), dQ = dS K.  Key side (per key vector): dK =
// dS^T Q and dV = P^T dO, read from a band of P and dS stored by query offset, so that the L
// queries at offset (-dr, -dc) from L consecutive keys are again one contiguous vector.
//
// Built at first use by vitfree/ops/native.py for one instruction set (-march=x86-64-v4,
// x86-64-v3 or the compiler's baseline), loaded with ctypes; the OpenMP runtime is the one
// PyTorch already loaded (same soname), so both share one pool.  Work is split by (image, head).
//
// Layouts (element strides, fp32):
//   q, k, v : (B, H, T, D) with strides s[0] (batch), s[1] (head), s[2] (token); unit stride in D
//   bounds  : (BH, T, 4) int32, per token: first row, last row, first col, last col of its
//             window (inclusive, inside the grid); BH = 1 (shared by heads) or H (per head);
//             prefix tokens carry the whole grid (they see every token regardless)
//   out     : (B, T, H, D) contiguous (the layout the output projection reads)
//   lse     : (B, H, T) log-sum-exp of every query row
//
// An additive position bias (optional, VitfreeBias below; vitfree/ops/bias.py defines it) is added
// to the logits of the pairs each tile visits, after the Q K^T product and before the window mask:
// per head, a relative-offset table (one scalar per offset (dr, dc) of the layout, the same for
// every lane), three prefix terms, and per query a key-row and a key-column term, read from
// buffers laid out by offset, [dr][query] and [dc][query], so that the L queries of a tile row read
// one contiguous vector.  The backward pass sums dS into the same layouts (table: one lane vector
// per offset; rows and columns: [offset][query]) and writes every gradient element at the end of
// its (image, head).  Without a bias (a null pointer) none of this runs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <omp.h>
#include <sys/mman.h>
#include <type_traits>
#include <utility>

// The position bias, fp32 and contiguous; a null part adds nothing.  Inputs: table (H, ty, tx)
// with odd sides (offsets y_q - y_k, x_q - x_k clamped to +-(ty - 1) / 2, +-(tx - 1) / 2); prefix
// (H, 3): prefix query -> patch key, patch query -> prefix key, prefix -> prefix; rows
// (rows_b, H, N, gh) and cols (cols_b, H, N, gw), rows_b and cols_b 1 (shared by the batch) or B.
// Gradients (backward only, non-null where the input is; every element written): d_table
// (B, H, ty * tx), d_prefix (B, H, 3), d_rows (B, H, N, gh), d_cols (B, H, N, gw): per image, the
// caller sums over the batch where the input is shared.
struct VitfreeBias {
    const float* table;
    int64_t ty, tx;
    const float* prefix;
    const float* rows;
    int64_t rows_b;
    const float* cols;
    int64_t cols_b;
    float *d_table, *d_prefix, *d_rows, *d_cols;
};

namespace {

// ---- instruction set: vector width and register blocking ------------------------------------
// L: lanes (queries per tile row); NR: query rows per tile, at most; NC: key offsets per Q K^T
// micro-kernel; ND: head channels per P V micro-kernel; KM: key rows per dK / dV micro-kernel.
// Register budget: AVX-512 has 32 vector registers (3 x 8 accumulators), AVX2 16 (3 x 4).
#if defined(__AVX512F__)
#define VITFREE_ISA "avx512"
constexpr int L = 16, NR = 3, NC = 8, ND = 8, KM = 3;
#elif defined(__AVX2__) && defined(__FMA__)
#define VITFREE_ISA "avx2"
constexpr int L = 8, NR = 3, NC = 4, ND = 4, KM = 3;
#else
#define VITFREE_ISA "generic"
constexpr int L = 8, NR = 2, NC = 4, ND = 4, KM = 2;
#endif

typedef float vf __attribute__((vector_size(4 * L)));
typedef float vfu __attribute__((vector_size(4 * L), aligned(4)));
typedef int32_t vi __attribute__((vector_size(4 * L)));
typedef int32_t viu __attribute__((vector_size(4 * L), aligned(4)));

inline vf ld(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void st(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
inline vi ldi(const int32_t* p) { return *reinterpret_cast<const viu*>(p); }
inline void sti(int32_t* p, vi x) { *reinterpret_cast<viu*>(p) = x; }
inline vf bc(float x) { return vf{} + x; }
// a value loaded once into a register: without the barrier GCC folds a load that feeds several
// FMAs into each of them as a memory operand, which multiplies the loads
#if defined(__AVX2__) || defined(__AVX512F__)
inline vf reg(vf x) {
    __asm__("" : "+v"(x));
    return x;
}
#else
inline vf reg(vf x) { return x; }
#endif
inline vi bci(int32_t x) { return vi{} + x; }
inline vf sel(vi m, vf a, vf b) { return m ? a : b; }  // per lane: m != 0 ? a : b

inline vi lane_ids() {
    vi x;
    for (int i = 0; i < L; ++i) x[i] = i;
    return x;
}

inline float hsum(vf x) {
    float s = 0.0f;
    for (int i = 0; i < L; ++i) s += x[i];
    return s;
}

inline float hmax(vf x) {
    float m = x[0];
    for (int i = 1; i < L; ++i) m = x[i] > m ? x[i] : m;
    return m;
}

constexpr float NEG_INF = -__builtin_inff();

// exp(x) for x <= 0 (slightly positive x is fine too): Cody-Waite reduction and a degree-7
// polynomial (relative error < 2e-7); x < -87.3 (and -inf) gives exactly 0, NaN gives NaN.
inline vf vexp(vf x) {
    const vi under = x < -87.3f;
    x = sel(under, bc(-87.0f), x);
    const vf t = x * 1.44269504088896341f;
    const vf n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
    const vf f = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
    vf p = bc(1.9841270e-04f);
    p = p * f + 1.3888889e-03f;
    p = p * f + 8.3333333e-03f;
    p = p * f + 4.1666667e-02f;
    p = p * f + 1.6666667e-01f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return sel(under, vf{}, p * (vf)bits);
}

// log(x) for positive normal x (here x >= 1): exponent and mantissa in [sqrt(1/2), sqrt(2)),
// then a degree-9 polynomial (Cephes' coefficients; error about 1 ulp).
inline vf vlog(vf x) {
    const vi bits = (vi)x;
    vi e = ((bits >> 23) & 0xff) - 126;
    const vi mb = (bits & 0x007fffff) | 0x3f000000;
    vf m = (vf)mb;  // in [0.5, 1)
    const vi small = m < 0.70710678f;
    e = small ? e - 1 : e;
    m = sel(small, m + m - 1.0f, m - 1.0f);
    const vf z = m * m;
    vf y = bc(7.0376836292e-2f);
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    const vf ef = __builtin_convertvector(e, vf);
    y = y * m * z + ef * -2.12194440e-4f - 0.5f * z;
    return m + y + ef * 0.693359375f;
}

// ---- L x L transpose (in registers, log2(L) stages of two-input shuffles) -------------------
#define VITFREE_STAGE(S, LO, HI)                                   \
    for (int i = 0; i < L; ++i) {                                  \
        if (i & S) continue;                                       \
        const vf a = x[i], b = x[i + S];                           \
        x[i] = __builtin_shuffle(a, b, LO);                        \
        x[i + S] = __builtin_shuffle(a, b, HI);                    \
    }
#if defined(__AVX512F__)
inline void transpose(vf* x) {
    const vi lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vi hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vi lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
    const vi hi4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
    const vi lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    const vi hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
    const vi lo1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
    const vi hi1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
    VITFREE_STAGE(8, lo8, hi8)
    VITFREE_STAGE(4, lo4, hi4)
    VITFREE_STAGE(2, lo2, hi2)
    VITFREE_STAGE(1, lo1, hi1)
}
#else
inline void transpose(vf* x) {
    const vi lo4 = {0, 1, 2, 3, 8, 9, 10, 11};
    const vi hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    const vi lo2 = {0, 1, 8, 9, 4, 5, 12, 13};
    const vi hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const vi lo1 = {0, 8, 2, 10, 4, 12, 6, 14};
    const vi hi1 = {1, 9, 3, 11, 5, 13, 7, 15};
    VITFREE_STAGE(4, lo4, hi4)
    VITFREE_STAGE(2, lo2, hi2)
    VITFREE_STAGE(1, lo1, hi1)
}
#endif
#undef VITFREE_STAGE

// n (<= L) token rows of D channels (token stride tst) -> D lane vectors (stride dst_d), times
// `mul`; lanes n..L-1 are zero.  With `bad`, also tells whether any value read was NaN or Inf.
inline void pack_block(const float* src, int64_t tst, int n, int64_t D, float mul, float* dst, int64_t dst_d,
                       bool* bad = nullptr) {
    vf z{};
    int64_t d0 = 0;
    for (; d0 + L <= D; d0 += L) {
        vf x[L];
        for (int i = 0; i < L; ++i) {
            x[i] = i < n ? ld(src + i * tst + d0) : vf{};
            if (bad) z += x[i] * 0.0f;  // NaN where x is NaN or Inf
            x[i] *= mul;
        }
        transpose(x);
        for (int j = 0; j < L; ++j) st(dst + (d0 + j) * dst_d, x[j]);
    }
    float zs = 0.0f;
    for (int64_t d = d0; d < D; ++d) {
        float* o = dst + d * dst_d;
        for (int i = 0; i < L; ++i) {
            const float y = i < n ? src[i * tst + d] : 0.0f;
            zs += y * 0.0f;
            o[i] = y * mul;
        }
    }
    if (!bad) return;
    for (int i = 0; i < L; ++i) zs += z[i];
    *bad = *bad || zs != 0.0f;
}

// D lane vectors (stride src_d) -> n token rows (token stride tst), times `mul` per lane;
// `add` accumulates into the rows instead of overwriting them.
inline void unpack_block(const float* src, int64_t src_d, int n, int64_t D, vf mul, float* dst, int64_t tst,
                         bool add) {
    int64_t d0 = 0;
    for (; d0 + L <= D; d0 += L) {
        vf x[L];
        for (int j = 0; j < L; ++j) x[j] = ld(src + (d0 + j) * src_d) * mul;
        transpose(x);
        for (int i = 0; i < n; ++i) st(dst + i * tst + d0, add ? ld(dst + i * tst + d0) + x[i] : x[i]);
    }
    for (int64_t d = d0; d < D; ++d) {
        const float* s = src + d * src_d;
        for (int i = 0; i < n; ++i) dst[i * tst + d] = (add ? dst[i * tst + d] : 0.0f) + s[i] * mul[i];
    }
}

// ---- scratch ---------------------------------------------------------------------------------
struct Buf {  // aligned, grows on demand, kept by its thread across work items and calls
    float* p = nullptr;
    size_t n = 0;
    float* get(size_t m) {
        if (m > n) {
            std::free(p);
            const size_t bytes = m * sizeof(float);
            const size_t align = bytes >= (size_t{4} << 20) ? size_t{2} << 20 : 64;  // big ones: huge pages
            p = static_cast<float*>(std::aligned_alloc(align, (bytes + align - 1) / align * align));
            if (!p) {
                n = 0;
                throw std::bad_alloc();
            }
#ifdef MADV_HUGEPAGE
            if (align > 64) madvise(p, (bytes + align - 1) / align * align, MADV_HUGEPAGE);
#endif
            n = m;
        }
        return p;
    }
    void trim(size_t most) {  // give back a buffer of more than `most` floats
        if (n > most) {
            std::free(p);
            p = nullptr;
            n = 0;
        }
    }
    int32_t* geti(size_t m) { return reinterpret_cast<int32_t*>(get(m)); }
    Buf() = default;
    Buf(const Buf&) = delete;
    Buf& operator=(const Buf&) = delete;
    ~Buf() { std::free(p); }
};

// ---- geometry --------------------------------------------------------------------------------
struct Geo {
    int64_t B, H, T, D, P, gw, gh;
    const int64_t *qs, *ks, *vs;
    const int32_t* bounds;
    int64_t bounds_heads;
    const VitfreeBias* bias = nullptr;  // null: no position bias
    const int32_t* win(int64_t h, int64_t t) const { return bounds + ((bounds_heads == 1 ? 0 : h) * T + t) * 4; }
};

// Packed layout of one (image, head): [row][channel][pad + column] (pitch = pad + ncv L: the
// zero pad in front of each channel row is also the previous row's right pad; buffers end with
// one more pad), and the union over the head's patch queries of their windows' offsets (dr, dc)
// relative to the query.
struct Lay {
    int64_t gh, gw, D, ncv, pad, pitch, rs;
    int dr_lo, dr_hi, dc_lo, dc_hi;
    int64_t ndc() const { return dc_hi - dc_lo + 1; }
    int64_t noff() const { return static_cast<int64_t>(dr_hi - dr_lo + 1) * ndc(); }
    size_t packed() const { return static_cast<size_t>(gh * rs + pad + L); }  // floats of a packed buffer
};

// false if a window is empty or leaves the grid
bool make_layout(const Geo& g, int64_t h, Lay& y) {
    y.gh = g.gh;
    y.gw = g.gw;
    y.D = g.D;
    y.ncv = (g.gw + L - 1) / L;
    int dr_lo = 0, dr_hi = 0, dc_lo = 0, dc_hi = 0;
    for (int64_t r = 0; r < g.gh; ++r) {
        for (int64_t c = 0; c < g.gw; ++c) {
            const int32_t* w = g.win(h, g.P + r * g.gw + c);
            if (w[0] < 0 || w[0] > w[1] || w[1] >= g.gh || w[2] < 0 || w[2] > w[3] || w[3] >= g.gw) return false;
            dr_lo = std::min<int>(dr_lo, w[0] - r);
            dr_hi = std::max<int>(dr_hi, w[1] - r);
            dc_lo = std::min<int>(dc_lo, w[2] - c);
            dc_hi = std::max<int>(dc_hi, w[3] - c);
        }
    }
    y.dr_lo = dr_lo;
    y.dr_hi = dr_hi;
    y.dc_lo = dc_lo;
    y.dc_hi = dc_hi;
    const int64_t reach = std::max(-dc_lo, dc_hi);
    y.pad = ((reach + L - 1) / L) * L;
    y.pitch = y.pad + y.ncv * L;  // a row's right pad is the next row's left pad
    y.rs = y.D * y.pitch;
    return true;
}

// One tensor to pack: token rows at `base` (token stride tst), times `mul`, into `dst`; bad[r]:
// row r holds a NaN or Inf.
struct PackJob {
    const float* base;
    int64_t tst;
    float mul;
    float* dst;
    uint8_t* bad;
};

inline void zero(float* p, int64_t n) {  // n: a multiple of L
    for (int64_t i = 0; i < n; i += L) st(p + i, vf{});
}

// rows [0, gh) of up to 3 tensors of one (image, head) into the packed layout, block by block
// for all of them at once (their rows share pages: q, k, v are views of one projection), with
// the next block's rows prefetched
void pack_rows(const PackJob* jobs, int nj, const Geo& g, const Lay& y) {
    for (int64_t r = 0; r < g.gh; ++r) {
        bool b[3] = {false, false, false};
        for (int j = 0; j < nj; ++j) {
            float* row = jobs[j].dst + r * y.rs;
            for (int64_t d = 0; d < y.D; ++d) zero(row + d * y.pitch, y.pad);
            if (r == g.gh - 1) zero(row + y.rs, y.pad);
        }
        for (int64_t cv = 0; cv < y.ncv; ++cv) {
            const int64_t c0 = cv * L;
            const int n = static_cast<int>(std::min<int64_t>(L, g.gw - c0));
            const int64_t t0 = g.P + r * g.gw + c0;
            for (int j = 0; j < nj; ++j) {
                const PackJob& pj = jobs[j];
                if (t0 + L < g.T) {
                    const float* nxt = pj.base + (t0 + L) * pj.tst;
                    const int nn = static_cast<int>(std::min<int64_t>(L, g.T - t0 - L));
                    for (int i = 0; i < nn; ++i)
                        for (int64_t d = 0; d < y.D; d += 16) __builtin_prefetch(nxt + i * pj.tst + d);
                }
                pack_block(pj.base + t0 * pj.tst, pj.tst, n, y.D, pj.mul, pj.dst + r * y.rs + y.pad + c0, y.pitch, &b[j]);
            }
        }
        for (int j = 0; j < nj; ++j) jobs[j].bad[r] = b[j];
    }
}

// packed rows [0, gh) -> token rows (accumulating or overwriting)
void unpack_rows(const float* src, const Geo& g, const Lay& y, float* base, int64_t tst, bool add) {
    for (int64_t r = 0; r < g.gh; ++r) {
        for (int64_t cv = 0; cv < y.ncv; ++cv) {
            const int64_t c0 = cv * L;
            const int n = static_cast<int>(std::min<int64_t>(L, g.gw - c0));
            unpack_block(src + r * y.rs + y.pad + c0, y.pitch, n, y.D, bc(1.0f), base + (g.P + r * g.gw + c0) * tst,
                         tst, add);
        }
    }
}

// ---- tiles -----------------------------------------------------------------------------------
struct Tile {
    int64_t R0, C;   // first query row, first query column
    int nr, nval;    // query rows, valid lanes per row
    vi dr0[NR], dr1[NR], dc0[NR], dc1[NR];  // per lane: window relative to the query (empty if invalid)
    vi valid;
    int lo[NR], hi[NR];  // per row: the rows' union of dr
    int64_t rlo, rhi;    // key rows of the tile
    int dclo, dchi;      // union of dc
    int64_t nrows() const { return rhi - rlo + 1; }
    int64_t ndc() const { return dchi - dclo + 1; }
    bool active(int m, int64_t r) const {
        const int64_t dr = r - (R0 + m);
        return dr >= lo[m] && dr <= hi[m];
    }
};

void make_tile(const Geo& g, int64_t h, int64_t R0, int nr, int64_t C, Tile& t) {
    t.R0 = R0;
    t.C = C;
    t.nr = nr;
    t.nval = static_cast<int>(std::min<int64_t>(L, g.gw - C));
    t.valid = lane_ids() < t.nval;
    t.rlo = g.gh;
    t.rhi = -1;
    t.dclo = 1 << 20;
    t.dchi = -(1 << 20);
    for (int m = 0; m < nr; ++m) {
        const int64_t R = R0 + m;
        vi a = bci(1 << 20), b = bci(-(1 << 20)), c = bci(1 << 20), d = bci(-(1 << 20));
        int lo = 1 << 20, hi = -(1 << 20);
        for (int i = 0; i < t.nval; ++i) {
            const int32_t* w = g.win(h, g.P + R * g.gw + C + i);
            a[i] = w[0] - static_cast<int32_t>(R);
            b[i] = w[1] - static_cast<int32_t>(R);
            c[i] = w[2] - static_cast<int32_t>(C + i);
            d[i] = w[3] - static_cast<int32_t>(C + i);
            lo = std::min(lo, a[i]);
            hi = std::max(hi, b[i]);
            t.dclo = std::min(t.dclo, c[i]);
            t.dchi = std::max(t.dchi, d[i]);
        }
        t.dr0[m] = a;
        t.dr1[m] = b;
        t.dc0[m] = c;
        t.dc1[m] = d;
        t.lo[m] = lo;
        t.hi[m] = hi;
        t.rlo = std::min<int64_t>(t.rlo, R + lo);
        t.rhi = std::max<int64_t>(t.rhi, R + hi);
    }
}

// ---- micro-kernels ---------------------------------------------------------------------------
// out[m][j] = sum_d a[m][d * ap] * b[d * bp + j]: M query-lane vectors against NJ key vectors
// at consecutive offsets (all lanes elementwise)
template <int M, int NJ>
void qk(const float* const* a, int64_t ap, const float* b, int64_t bp, int64_t D, float* const* out) {
    vf acc[M][NJ];
    for (int m = 0; m < M; ++m)
        for (int j = 0; j < NJ; ++j) acc[m][j] = vf{};
    for (int64_t d = 0; d < D; ++d) {
        vf av[M];
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) av[m] = reg(ld(a[m] + d * ap));
        const float* bd = b + d * bp;
#pragma GCC unroll 8
        for (int j = 0; j < NJ; ++j) {
            const vf x = reg(ld(bd + j));
#pragma GCC unroll 4
            for (int m = 0; m < M; ++m) acc[m][j] += av[m] * x;
        }
    }
    for (int m = 0; m < M; ++m)
        for (int j = 0; j < NJ; ++j) st(out[m] + j * L, acc[m][j]);
}

// out[m][j] = sum_d a[m][d * ap] * rows[j][d]: query-lane vectors against NJ broadcast key rows
// (prefix keys)
template <int M, int NJ>
void qk_bcast(const float* const* a, int64_t ap, const float* const* rows, int64_t D, float* const* out) {
    vf acc[M][NJ];
    for (int m = 0; m < M; ++m)
        for (int j = 0; j < NJ; ++j) acc[m][j] = vf{};
    for (int64_t d = 0; d < D; ++d) {
        vf av[M];
        for (int m = 0; m < M; ++m) av[m] = reg(ld(a[m] + d * ap));
#pragma GCC unroll 8
        for (int j = 0; j < NJ; ++j) {
            const vf x = reg(bc(rows[j][d]));
            for (int m = 0; m < M; ++m) acc[m][j] += av[m] * x;
        }
    }
    for (int m = 0; m < M; ++m)
        for (int j = 0; j < NJ; ++j) st(out[m] + j * L, acc[m][j]);
}

// One channel block [d0, d0 + N) of O^T[m] = sum_j P[m][j] * pre[j] + sum_{rows, dc} P[m] * V:
// `pb[m]`: the tile's weights of query row m (P prefix entries, then nrows x ndc window
// entries), `mb[m]`: the window entries' masks (read only when Safe: then a masked-out pair
// adds nothing even if its value is NaN or Inf), `pre[j]`: prefix value rows at d0, `vb`: the
// packed values at (row 0, channel d0, column C + dclo).
struct PVArgs {
    const float* const* pb;
    const int32_t* const* mb;
    int64_t P;
    const float* const* pre;
    const float* vb;
    int64_t rs, pitch, rlo, nrows, ndc;
    float* const* out;
    const uint8_t* act;  // per key row: bit m set where query row m of the tile uses it
};

// f(A, B) with A, B compile-time constants equal to a, b (0 <= a <= b < M): lets a micro-kernel
// run only the accumulator rows [a, b] while all of them stay in registers
template <int M, int A = 0, int B = 0, class F>
__attribute__((always_inline)) inline void with_range(int a, int b, F& f) {
    if constexpr (A < M) {
        if constexpr (B < M) {
            if (a == A && b == B) {
                f(std::integral_constant<int, A>{}, std::integral_constant<int, B>{});
                return;
            }
            with_range<M, A, B + 1>(a, b, f);
        } else {
            with_range<M, A + 1, A + 1>(a, b, f);
        }
    }
}

// the first and last set bit of `bits` (non-zero), or [0, M - 1] when the set bits have gaps
template <int M>
inline void bit_range(unsigned bits, int* a, int* b) {
    *a = __builtin_ctz(bits);
    *b = 31 - __builtin_clz(bits);
    if ((bits >> *a) != (1u << (*b - *a + 1)) - 1) {
        *a = 0;
        *b = M - 1;
    }
}

template <int M, int N, bool Safe>
void pv(const PVArgs& a) {
    vf acc[M][N];
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) acc[m][n] = vf{};
    for (int64_t j = 0; j < a.P; ++j) {
        const float* pr = a.pre[j];
        vf p[M];
        for (int m = 0; m < M; ++m) p[m] = reg(ld(a.pb[m] + j * L));
#pragma GCC unroll 8
        for (int n = 0; n < N; ++n) {
            const vf x = reg(bc(pr[n]));
            for (int m = 0; m < M; ++m) acc[m][n] += p[m] * x;
        }
    }
    for (int64_t rr = 0; rr < a.nrows; ++rr) {
        if (!a.act[rr]) continue;
        const float* vr = a.vb + (a.rlo + rr) * a.rs;
        const int64_t e0 = rr * a.ndc;
        // only the query rows that use this key row (rows in between read zero weights)
        auto body = [&](auto A_, auto B_) __attribute__((always_inline)) {
            constexpr int A = decltype(A_)::value, B = decltype(B_)::value;
            for (int64_t c = 0; c < a.ndc; ++c) {
                vf p[M];
                vi k[M];
                for (int m = A; m <= B; ++m) {
                    p[m] = reg(ld(a.pb[m] + (a.P + e0 + c) * L));
                    if (Safe) k[m] = ldi(a.mb[m] + (e0 + c) * L);
                }
#pragma GCC unroll 8
                for (int n = 0; n < N; ++n) {
                    const vf x = reg(ld(vr + n * a.pitch + c));
                    for (int m = A; m <= B; ++m)
                        acc[m][n] = Safe ? sel(k[m], acc[m][n] + p[m] * x, acc[m][n]) : acc[m][n] + p[m] * x;
                }
            }
        };
        int ma, mb;
        bit_range<M>(a.act[rr], &ma, &mb);
        with_range<M>(ma, mb, body);
    }
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) st(a.out[m] + n * L, acc[m][n]);
}

// Key side of the backward pass, one channel block [d0, d0 + N) of K key rows at one key
// vector: acc[k] += sum over query rows R and offsets dc of W(r0 + k - R, dc) * X[R], where W is
// a band of P or dS stored by offset and X the packed Q or dO (both read at column C - dc).
struct KBArgs {
    const float* w;        // band buffer: [offset][band row][pitch], at column pad + C
    const int32_t* wm;     // its masks (Safe)
    const float* x;        // packed Q or dO at (row 0, channel d0, column pad + C)
    float* const* acc;     // packed dK or dV at (row r0 + k, channel d0, column pad + C)
    int64_t rs, pitch, hb, band0, ndcg;
    int dr_lo, dr_hi, dc_lo;
    int64_t r0, Ra, Rb;    // key rows r0.., query rows Ra..Rb
    int dca, dcb;          // offsets dc
};

template <int K, int N, bool Safe>
void kb(const KBArgs& a) {
    vf acc[K][N];
    for (int k = 0; k < K; ++k)
        for (int n = 0; n < N; ++n) acc[k][n] = ld(a.acc[k] + n * a.pitch);
    const int64_t step = a.hb * a.pitch;  // offsets are consecutive in dc
    for (int64_t R = a.Ra; R <= a.Rb; ++R) {
        // key rows r0 + k whose offset r0 + k - R lies in the band's range: k in [ka, kb]
        const int ka = static_cast<int>(std::max<int64_t>(0, R - a.r0 + a.dr_lo));
        const int kb_ = static_cast<int>(std::min<int64_t>(K - 1, R - a.r0 + a.dr_hi));
        if (ka > kb_) continue;
        const int64_t o0 = ((a.r0 - R - a.dr_lo) * a.ndcg - a.dc_lo) * step + (R - a.band0) * a.pitch;
        const float* xr = a.x + R * a.rs;
        auto body = [&](auto A_, auto B_) __attribute__((always_inline)) {
            constexpr int A = decltype(A_)::value, B = decltype(B_)::value;
            for (int dc = a.dca; dc <= a.dcb; ++dc) {
                vf w[K];
                vi m[K];
                for (int k = A; k <= B; ++k) {  // the column moves by -dc
                    const int64_t o = o0 + (k * a.ndcg + dc) * step - dc;
                    w[k] = reg(ld(a.w + o));
                    if (Safe) m[k] = ldi(a.wm + o);
                }
#pragma GCC unroll 8
                for (int n = 0; n < N; ++n) {
                    const vf x = reg(ld(xr + n * a.pitch - dc));
                    for (int k = A; k <= B; ++k)
                        acc[k][n] = Safe ? sel(m[k], acc[k][n] + w[k] * x, acc[k][n]) : acc[k][n] + w[k] * x;
                }
            }
        };
        with_range<K>(ka, kb_, body);
    }
    for (int k = 0; k < K; ++k)
        for (int n = 0; n < N; ++n) st(a.acc[k] + n * a.pitch, acc[k][n]);
}

// function tables f[m - 1][n - 1] for block sizes known at run time only
template <int M, int J> struct QK {
    static void run(const float* const* a, int64_t ap, const float* b, int64_t bp, int64_t D, float* const* o) {
        qk<M, J>(a, ap, b, bp, D, o);
    }
};
template <int M, int J> struct QKB {
    static void run(const float* const* a, int64_t ap, const float* const* b, int64_t D, float* const* o) {
        qk_bcast<M, J>(a, ap, b, D, o);
    }
};
template <int M, int N> struct PV0 { static void run(const PVArgs& a) { pv<M, N, false>(a); } };
template <int M, int N> struct PV1 { static void run(const PVArgs& a) { pv<M, N, true>(a); } };
template <int M, int N> struct KB0 { static void run(const KBArgs& a) { kb<M, N, false>(a); } };
template <int M, int N> struct KB1 { static void run(const KBArgs& a) { kb<M, N, true>(a); } };

template <template <int, int> class F, int MM, int NN>
struct Table {
    decltype(&F<1, 1>::run) f[MM][NN];
    Table() { fill<1, 1>(); }
    template <int M, int N>
    void fill() {
        if constexpr (M <= MM) {
            if constexpr (N <= NN) {
                f[M - 1][N - 1] = &F<M, N>::run;
                fill<M, N + 1>();
            } else {
                fill<M + 1, 1>();
            }
        }
    }
};
const Table<QK, NR, NC> QK_T;
const Table<QKB, NR, NC> QKB_T;
const Table<PV0, NR, ND> PV_T_0;
const Table<PV1, NR, ND> PV_T_1;
const Table<KB0, KM, ND> KB_T_0;
const Table<KB1, KM, ND> KB_T_1;

// ---- per-thread state of one (image, head) ---------------------------------------------------
// The position bias of one (image, head), by offset (dr - dr_lo, dc - dc_lo of the layout) and
// query: tab[noff] scalars, rows[ndr][N] and cols[ndc][N] (padded by L; 0 where the key leaves the
// grid); null where the part is absent.  The backward sums: gtab (noff lane vectors), grows and
// gcols (as rows and cols), gpre (the three prefix terms).
struct BiasWork {
    bool on = false, has_pre = false;
    const float *tab = nullptr, *rows = nullptr, *cols = nullptr;
    float pre[3] = {0.0f, 0.0f, 0.0f};
    float *gtab = nullptr, *grows = nullptr, *gcols = nullptr, *gpre = nullptr;
};

struct Work {
    Geo g;
    Lay y;
    int64_t b, h;
    float scale;
    int tile_rows;
    const float *qb, *kb, *vb;  // q, k, v of (b, h), token strides g.qs[2], g.ks[2], g.vs[2]
    float *Qp, *Kp, *Vp;      // packed
    uint8_t *qbad, *kbad, *vbad;
    float *S, *S2, *OT, *Qt;  // tile buffers: weights, second weights (dP / dS), O^T or dQ^T, Q^T
    int32_t* Mk;              // window masks of the tile
    int64_t E;                // entries per query row in S (P + rows x dc)
    float* Sq;                // prefix query: logits over all key vectors
    float* Sq2;
    float* tmp;               // 4 D + P + L floats
    const float** pre;        // P row pointers
    uint8_t* act;             // per key row of a tile: which query rows use it
    BiasWork bias;
};

struct Scratch {
    Buf qp, kp, vp, dop, dkp, dvp, s, s2, ot, qt, mk, sq, sq2, tmp, bad, grid, lse, delta, pre, act;
    Buf btab, brows, bcols, gtab, grows, gcols;  // the position bias (only with one)
    void trim(size_t most) {
        for (Buf* b : {&qp, &kp, &vp, &dop, &dkp, &dvp, &s, &s2, &ot, &qt, &mk, &sq, &sq2, &tmp, &bad, &grid, &lse,
                       &delta, &pre, &act, &btab, &brows, &bcols, &gtab, &grows, &gcols})
            b->trim(most);
    }
};

int default_tile_rows() {
    const char* e = std::getenv("VITFREE_NATIVE_TILE_ROWS");
    const int r = e ? std::atoi(e) : 0;
    return r >= 1 && r <= NR ? r : NR;
}

// packs K and V (and Q, scaled, when with_q: the backward pass reads it by key; the forward
// pass packs each tile's queries itself)
void setup_work(Work& w, const Geo& g, int64_t b, int64_t h, float scale, int tile_rows, Scratch& s,
                const float* q, const float* k, const float* v, bool with_q) {
    w.g = g;
    w.b = b;
    w.h = h;
    w.scale = scale;
    w.tile_rows = tile_rows;
    const Lay& y = w.y;
    const size_t packed = y.packed();
    w.Qp = with_q ? s.qp.get(packed) : nullptr;
    w.Kp = s.kp.get(packed);
    w.Vp = s.vp.get(packed);
    uint8_t* bad = reinterpret_cast<uint8_t*>(s.bad.get(g.gh + 1));  // 4 flags a float, 4 arrays
    w.qbad = bad;
    w.kbad = bad + g.gh;
    w.vbad = bad + 2 * g.gh;
    w.E = g.P + static_cast<int64_t>(y.dr_hi - y.dr_lo + NR) * y.ndc();
    w.S = s.s.get(NR * w.E * L);
    w.S2 = s.s2.get(NR * w.E * L);
    w.Mk = s.mk.geti(NR * w.E * L);
    w.OT = s.ot.get(NR * g.D * L);
    w.Qt = s.qt.get(NR * g.D * L);
    w.Sq = s.sq.get(g.gh * y.ncv * L);
    w.Sq2 = s.sq2.get(g.gh * y.ncv * L);
    w.tmp = s.tmp.get(4 * g.D + g.P + L);
    w.pre = reinterpret_cast<const float**>(s.pre.get(2 * g.P + 2));
    w.act = reinterpret_cast<uint8_t*>(s.act.get(y.dr_hi - y.dr_lo + NR + 1));
    w.kb = k + b * g.ks[0] + h * g.ks[1];
    w.vb = v + b * g.vs[0] + h * g.vs[1];
    w.qb = q + b * g.qs[0] + h * g.qs[1];
    const PackJob jobs[3] = {{w.kb, g.ks[2], 1.0f, w.Kp, w.kbad},
                             {w.vb, g.vs[2], 1.0f, w.Vp, w.vbad},
                             {w.qb, g.qs[2], scale, w.Qp, w.qbad}};
    pack_rows(jobs, with_q ? 3 : 2, g, y);
}

bool any_bad(const uint8_t* bad, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r <= r1; ++r)
        if (bad[r]) return true;
    return false;
}

// ---- the position bias -----------------------------------------------------------------------
// the flat table index of offset (dr, dc) = key - query, clamped to the table
inline int64_t table_index(const VitfreeBias& bi, int64_t dr, int64_t dc) {
    const int64_t ry = (bi.ty - 1) / 2, rx = (bi.tx - 1) / 2;
    return (std::min(std::max(-dr, -ry), ry) + ry) * bi.tx + std::min(std::max(-dc, -rx), rx) + rx;
}

// src (N, len) per query -> dst[o][n] = src[n][coord(n) + lo + o] (0 off the grid), o < no; dst
// padded by L zeros.  coord: a query's row (rows) or column (cols).
void offset_layout(const float* src, int64_t len, const Geo& g, bool by_row, int lo, int64_t no, float* dst) {
    const int64_t N = g.gh * g.gw;
    constexpr int64_t ahead = 32;  // queries prefetched ahead: each reads a line or two of a long row
    for (int64_t n = 0; n < N; ++n) {  // a query's entries are contiguous in the source
        const int64_t c0 = (by_row ? n / g.gw : n % g.gw) + lo;
        const float* s = src + n * len;
        if (n + ahead < N) {
            const float* nxt = s + ahead * len;  // (prefetches never fault)
            __builtin_prefetch(nxt + std::max<int64_t>(c0, 0));
            __builtin_prefetch(nxt + std::min<int64_t>(c0 + no, len) - 1);
        }
        for (int64_t o = 0; o < no; ++o) dst[o * N + n] = c0 + o >= 0 && c0 + o < len ? s[c0 + o] : 0.0f;
    }
    for (int i = 0; i < L; ++i) dst[no * N + i] = 0.0f;
}

// the reverse for gradients: dst (N, len) = 0 except dst[n][coord(n) + lo + o] = src[o][n]
void offset_scatter(const float* src, int64_t len, const Geo& g, bool by_row, int lo, int64_t no, float* dst) {
    const int64_t N = g.gh * g.gw;
    std::memset(dst, 0, static_cast<size_t>(N * len) * sizeof(float));
    for (int64_t n = 0; n < N; ++n) {
        const int64_t c0 = (by_row ? n / g.gw : n % g.gw) + lo;
        const int64_t oa = std::max<int64_t>(0, -c0), ob = std::min<int64_t>(no, len - c0);
        float* d = dst + n * len + c0;
        for (int64_t o = oa; o < ob; ++o) d[o] = src[o * N + n];
    }
}

// the bias of (image b, head h) in the offset layouts (and zeroed sums for the backward pass)
void setup_bias(Work& w, Scratch& s, bool backward) {
    const Geo& g = w.g;
    const Lay& y = w.y;
    BiasWork& bw = w.bias;
    bw = BiasWork{};
    if (!g.bias) return;
    const VitfreeBias& bi = *g.bias;
    const int64_t N = g.gh * g.gw, ndr = y.dr_hi - y.dr_lo + 1, ndc = y.ndc(), noff = y.noff();
    bw.on = true;
    float* tbuf = s.btab.get(noff + 3);  // the table's terms, then the prefix sums
    if (bi.table) {
        float* tab = tbuf;
        const float* tb = bi.table + w.h * bi.ty * bi.tx;
        for (int64_t a = 0; a < ndr; ++a)
            for (int64_t c = 0; c < ndc; ++c) tab[a * ndc + c] = tb[table_index(bi, y.dr_lo + a, y.dc_lo + c)];
        bw.tab = tab;
    }
    if (bi.prefix) {
        bw.has_pre = true;
        for (int i = 0; i < 3; ++i) bw.pre[i] = bi.prefix[w.h * 3 + i];
    }
    if (bi.rows) {
        float* r = s.brows.get(ndr * N + L);
        offset_layout(bi.rows + ((bi.rows_b == 1 ? 0 : w.b) * g.H + w.h) * N * g.gh, g.gh, g, true, y.dr_lo, ndr, r);
        bw.rows = r;
    }
    if (bi.cols) {
        float* c = s.bcols.get(ndc * N + L);
        offset_layout(bi.cols + ((bi.cols_b == 1 ? 0 : w.b) * g.H + w.h) * N * g.gw, g.gw, g, false, y.dc_lo, ndc, c);
        bw.cols = c;
    }
    if (!backward) return;
    bw.gpre = tbuf + noff;
    bw.gpre[0] = bw.gpre[1] = bw.gpre[2] = 0.0f;
    if (bi.table) {
        bw.gtab = s.gtab.get(noff * L);
        std::memset(bw.gtab, 0, static_cast<size_t>(noff * L) * sizeof(float));
    }
    if (bi.rows) {
        bw.grows = s.grows.get(ndr * N + L);
        std::memset(bw.grows, 0, static_cast<size_t>(ndr * N + L) * sizeof(float));
    }
    if (bi.cols) {
        bw.gcols = s.gcols.get(ndc * N + L);
        std::memset(bw.gcols, 0, static_cast<size_t>(ndc * N + L) * sizeof(float));
    }
}

// S += the bias of the tile's pairs (prefix keys and window offsets; masked pairs are masked later)
void tile_bias(const Work& w, const Tile& t, float* S) {
    const BiasWork& bw = w.bias;
    const Lay& y = w.y;
    const int64_t P = w.g.P, ndc = t.ndc(), ndcg = y.ndc(), N = w.g.gh * w.g.gw;
    for (int m = 0; m < t.nr; ++m) {
        float* Sm = S + m * w.E * L;
        const int64_t R = t.R0 + m, n0 = R * w.g.gw + t.C;
        if (bw.has_pre)
            for (int64_t j = 0; j < P; ++j) st(Sm + j * L, ld(Sm + j * L) + bw.pre[1]);
        for (int64_t r = t.rlo; r <= t.rhi; ++r) {
            if (!t.active(m, r)) continue;
            const int64_t a = r - R - y.dr_lo;
            float* Sr = Sm + (P + (r - t.rlo) * ndc) * L;
            const vf rv = bw.rows ? ld(bw.rows + a * N + n0) : vf{};
            const float* tb = bw.tab ? bw.tab + a * ndcg + (t.dclo - y.dc_lo) : nullptr;
            const float* cb = bw.cols ? bw.cols + (t.dclo - y.dc_lo) * N + n0 : nullptr;
            for (int64_t c = 0; c < ndc; ++c) {
                vf x = rv;
                if (tb) x += tb[c];
                if (cb) x += ld(cb + c * N);
                st(Sr + c * L, ld(Sr + c * L) + x);
            }
        }
    }
}

// the bias's sums from the tile's dS (in S2; masked pairs and invalid lanes are exactly 0)
void tile_bias_grad(const Work& w, const Tile& t) {
    const BiasWork& bw = w.bias;
    const Lay& y = w.y;
    const int64_t P = w.g.P, ndc = t.ndc(), ndcg = y.ndc(), N = w.g.gh * w.g.gw;
    for (int m = 0; m < t.nr; ++m) {
        const float* Dm = w.S2 + m * w.E * L;
        const int64_t R = t.R0 + m, n0 = R * w.g.gw + t.C;
        if (bw.has_pre) {
            vf sp{};
            for (int64_t j = 0; j < P; ++j) sp += ld(Dm + j * L);
            bw.gpre[1] += hsum(sp);
        }
        for (int64_t r = t.rlo; r <= t.rhi; ++r) {
            if (!t.active(m, r)) continue;
            const int64_t a = r - R - y.dr_lo;
            const float* Dr = Dm + (P + (r - t.rlo) * ndc) * L;
            float* gt = bw.gtab ? bw.gtab + (a * ndcg + (t.dclo - y.dc_lo)) * L : nullptr;
            float* gc = bw.gcols ? bw.gcols + (t.dclo - y.dc_lo) * N + n0 : nullptr;
            vf rs{};
            for (int64_t c = 0; c < ndc; ++c) {
                const vf ds = ld(Dr + c * L);
                rs += ds;
                if (gt) st(gt + c * L, ld(gt + c * L) + ds);
                if (gc) st(gc + c * N, ld(gc + c * N) + ds);
            }
            if (bw.grows) st(bw.grows + a * N + n0, ld(bw.grows + a * N + n0) + rs);
        }
    }
}

// every gradient element of the bias of (image b, head h) (a buffer without its part stays untouched)
void finish_bias_grad(const Work& w) {
    const Geo& g = w.g;
    const Lay& y = w.y;
    const BiasWork& bw = w.bias;
    if (!g.bias) return;
    const VitfreeBias& bi = *g.bias;
    const int64_t N = g.gh * g.gw, bh = w.b * g.H + w.h, ndcg = y.ndc();
    if (bi.d_table && bw.gtab) {
        float* o = bi.d_table + bh * bi.ty * bi.tx;
        std::memset(o, 0, static_cast<size_t>(bi.ty * bi.tx) * sizeof(float));
        for (int64_t a = 0; a < y.noff(); ++a)
            o[table_index(bi, y.dr_lo + a / ndcg, y.dc_lo + a % ndcg)] += hsum(ld(bw.gtab + a * L));
    }
    if (bi.d_prefix && bw.gpre)
        for (int i = 0; i < 3; ++i) bi.d_prefix[bh * 3 + i] = bw.gpre[i];
    if (bi.d_rows && bw.grows) offset_scatter(bw.grows, g.gh, g, true, y.dr_lo, y.dr_hi - y.dr_lo + 1, bi.d_rows + bh * N * g.gh);
    if (bi.d_cols && bw.gcols) offset_scatter(bw.gcols, g.gw, g, false, y.dc_lo, ndcg, bi.d_cols + bh * N * g.gw);
}

// ---- tile: logits, softmax, P V --------------------------------------------------------------
// logits of the tile's query rows a[m] (channel stride ap) against their prefix keys and window
// offsets: into S (entries of query row m start at S + m * E * L)
void tile_logits(const Work& w, const Tile& t, const float* const* a, int64_t ap, const float* Bp,
                 const float* pre_base, int64_t pre_st, float* S) {
    const Lay& y = w.y;
    const int64_t P = w.g.P, ndc = t.ndc();
    float* o[NR];
    for (int64_t j0 = 0; j0 < P; j0 += NC) {
        const int nj = static_cast<int>(std::min<int64_t>(NC, P - j0));
        const float* rows[NC];
        for (int j = 0; j < nj; ++j) rows[j] = pre_base + (j0 + j) * pre_st;
        for (int m = 0; m < t.nr; ++m) o[m] = S + (m * w.E + j0) * L;
        QKB_T.f[t.nr - 1][nj - 1](a, ap, rows, y.D, o);
    }
    for (int64_t r = t.rlo; r <= t.rhi; ++r) {
        const float* am[NR];
        int ms[NR], na = 0;
        for (int m = 0; m < t.nr; ++m)
            if (t.active(m, r)) {
                ms[na] = m;
                am[na++] = a[m];
            }
        if (!na) continue;
        const int nchunk = static_cast<int>((ndc + NC - 1) / NC);  // even chunks: 7 = 4 + 3, not 6 + 1
        const int chunk = static_cast<int>((ndc + nchunk - 1) / nchunk);
        for (int dc0 = t.dclo; dc0 <= t.dchi; dc0 += chunk) {
            const int nc = std::min(chunk, t.dchi - dc0 + 1);
            for (int i = 0; i < na; ++i)
                o[i] = S + (ms[i] * w.E + P + (r - t.rlo) * ndc + (dc0 - t.dclo)) * L;
            QK_T.f[na - 1][nc - 1](am, ap, Bp + r * y.rs + y.pad + t.C + dc0, y.pitch, y.D, o);
        }
    }
}

// the window mask of query row m at key row r, offset dc (all false on inactive rows)
inline vi window_mask(const Tile& t, int m, int64_t r, int dc) {
    const int32_t dr = static_cast<int32_t>(r - (t.R0 + m));
    return (t.dr0[m] <= dr) & (t.dr1[m] >= dr) & (t.dc0[m] <= dc) & (t.dc1[m] >= dc);
}

// one query row of a tile: logits -> probabilities in place (masked pairs exactly 0), masks into
// Mk; returns the row max in *mx and the sum in *l
void tile_softmax_row(const Work& w, const Tile& t, int m, vf* mx_out, vf* l_out) {
    const int64_t P = w.g.P, ndc = t.ndc();
    float* S = w.S + m * w.E * L;
    int32_t* Mk = w.Mk + m * w.E * L;
    vf mx = bc(NEG_INF);
    for (int64_t j = 0; j < P; ++j) {
        const vf s = sel(t.valid, ld(S + j * L), bc(NEG_INF));
        st(S + j * L, s);
        mx = s > mx ? s : mx;
    }
    for (int64_t r = t.rlo; r <= t.rhi; ++r) {
        float* Sr = S + (P + (r - t.rlo) * ndc) * L;
        int32_t* Mr = Mk + (r - t.rlo) * ndc * L;
        if (!t.active(m, r)) {
            zero(Sr, ndc * L);
            zero(reinterpret_cast<float*>(Mr), ndc * L);
            continue;
        }
        for (int64_t c = 0; c < ndc; ++c) {
            const vi k = window_mask(t, m, r, t.dclo + static_cast<int>(c));
            const vf s = sel(k, ld(Sr + c * L), bc(NEG_INF));
            st(Sr + c * L, s);
            sti(Mr + c * L, k);
            mx = s > mx ? s : mx;
        }
    }
    mx = sel(mx == NEG_INF, vf{}, mx);  // lanes that see nothing (invalid lanes)
    vf l{};
    for (int64_t j = 0; j < P; ++j) {
        const vf p = vexp(ld(S + j * L) - mx);
        st(S + j * L, p);
        l += p;
    }
    for (int64_t r = t.rlo; r <= t.rhi; ++r) {
        if (!t.active(m, r)) continue;
        float* Sr = S + (P + (r - t.rlo) * ndc) * L;
        for (int64_t c = 0; c < ndc; ++c) {
            const vf p = vexp(ld(Sr + c * L) - mx);
            st(Sr + c * L, p);
            l += p;
        }
    }
    *mx_out = mx;
    *l_out = l;
}

// OT[m] (D x L) = the tile's weights W (entries as in S) times the values: prefix rows
// `pre_base` (token stride pre_st) and packed rows Vp
void tile_pv(const Work& w, const Tile& t, const float* W, const float* Vp, const float* pre_base, int64_t pre_st,
             bool safe, float* OT) {
    const Lay& y = w.y;
    const float* pb[NR];
    const int32_t* mb[NR];
    float* out[NR];
    for (int m = 0; m < t.nr; ++m) {
        pb[m] = W + m * w.E * L;
        mb[m] = w.Mk + m * w.E * L;
    }
    const float** prep = w.pre;
    uint8_t* act = w.act;
    for (int64_t r = t.rlo; r <= t.rhi; ++r) {
        act[r - t.rlo] = 0;
        for (int m = 0; m < t.nr; ++m) act[r - t.rlo] |= t.active(m, r) << m;
    }
    for (int64_t d0 = 0; d0 < y.D; d0 += ND) {
        const int nd = static_cast<int>(std::min<int64_t>(ND, y.D - d0));
        for (int64_t j = 0; j < w.g.P; ++j) prep[j] = pre_base + j * pre_st + d0;
        for (int m = 0; m < t.nr; ++m) out[m] = OT + (m * y.D + d0) * L;
        const PVArgs a{pb, mb, w.g.P, prep, Vp + d0 * y.pitch + y.pad + t.C + t.dclo, y.rs, y.pitch, t.rlo,
                       t.nrows(), t.ndc(), out, act};
        (safe ? PV_T_1.f[t.nr - 1][nd - 1] : PV_T_0.f[t.nr - 1][nd - 1])(a);
    }
}

void forward_tile(const Work& w, const Tile& t, float* out, float* lse) {
    const Geo& g = w.g;
    const float* a[NR];
    for (int m = 0; m < t.nr; ++m) {  // this tile's queries, transposed and scaled
        const int64_t t0 = g.P + (t.R0 + m) * g.gw + t.C;
        pack_block(w.qb + t0 * g.qs[2], g.qs[2], t.nval, g.D, w.scale, w.Qt + m * g.D * L, L);
        a[m] = w.Qt + m * g.D * L;
    }
    tile_logits(w, t, a, L, w.Kp, w.kb, g.ks[2], w.S);
    if (w.bias.on) tile_bias(w, t, w.S);
    vf mx[NR], l[NR];
    for (int m = 0; m < t.nr; ++m) tile_softmax_row(w, t, m, &mx[m], &l[m]);
    tile_pv(w, t, w.S, w.Vp, w.vb, g.vs[2], any_bad(w.vbad, t.rlo, t.rhi), w.OT);
    for (int m = 0; m < t.nr; ++m) {
        const int64_t t0 = g.P + (t.R0 + m) * g.gw + t.C;
        unpack_block(w.OT + m * g.D * L, L, t.nval, g.D, 1.0f / l[m], out + ((w.b * g.T + t0) * g.H + w.h) * g.D,
                     g.H * g.D, false);
        const vf z = mx[m] + vlog(l[m]);
        float* lr = lse + (w.b * g.H + w.h) * g.T + t0;
        for (int i = 0; i < t.nval; ++i) lr[i] = z[i];
    }
}

// ---- prefix queries (they see every token: keys as lanes) ------------------------------------
// S[v] = sum_d a[d] * K^T of key vector v (all gh x ncv vectors of the packed rows), pad lanes
// -inf
void prefix_logits(const Work& w, const float* a, const float* Kp, float* S) {
    const Lay& y = w.y;
    const int64_t nv = y.gh * y.ncv;
    constexpr int G = 8;
    const vi lanes = lane_ids();
    for (int64_t v0 = 0; v0 < nv; v0 += G) {
        const int ng = static_cast<int>(std::min<int64_t>(G, nv - v0));
        const float* kp[G];
        for (int i = 0; i < G; ++i) {
            const int64_t v = v0 + (i < ng ? i : 0);
            kp[i] = Kp + (v / y.ncv) * y.rs + y.pad + (v % y.ncv) * L;
        }
        vf acc[G] = {};
        for (int64_t d = 0; d < y.D; ++d) {
            const vf x = bc(a[d]);
#pragma GCC unroll 8
            for (int i = 0; i < G; ++i) acc[i] += x * ld(kp[i] + d * y.pitch);
        }
        for (int i = 0; i < ng; ++i) {
            const int64_t c0 = ((v0 + i) % y.ncv) * L;
            st(S + (v0 + i) * L, sel(lanes + static_cast<int32_t>(c0) < static_cast<int32_t>(y.gw), acc[i], bc(NEG_INF)));
        }
    }
}

// o[d] = sum_v hsum(W[v] * X^T of key vector v)[d] for all channels d
void prefix_reduce(const Work& w, const float* W, const float* Xp, float* o) {
    const Lay& y = w.y;
    const int64_t nv = y.gh * y.ncv;
    for (int64_t d0 = 0; d0 < y.D; d0 += ND) {
        const int nd = static_cast<int>(std::min<int64_t>(ND, y.D - d0));
        vf acc[ND] = {};
        for (int64_t v = 0; v < nv; ++v) {
            const vf p = ld(W + v * L);
            const float* x = Xp + (v / y.ncv) * y.rs + d0 * y.pitch + y.pad + (v % y.ncv) * L;
#pragma GCC unroll 8
            for (int n = 0; n < ND; ++n)
                if (n < nd) acc[n] += p * ld(x + n * y.pitch);
        }
        for (int n = 0; n < nd; ++n) o[d0 + n] = hsum(acc[n]);
    }
}

inline float dot(const float* a, const float* b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

// logits of prefix query i (scaled q in qs) against prefix keys (spre) and key vectors (Sq);
// returns the max
float prefix_query_logits(const Work& w, const float* qs, float* spre) {
    const Geo& g = w.g;
    prefix_logits(w, qs, w.Kp, w.Sq);
    const BiasWork& bw = w.bias;
    float mx = NEG_INF;
    for (int64_t j = 0; j < g.P; ++j) {
        spre[j] = dot(qs, w.kb + j * g.ks[2], g.D) + (bw.has_pre ? bw.pre[2] : 0.0f);
        mx = std::max(mx, spre[j]);
    }
    const int64_t nv = g.gh * w.y.ncv;
    if (bw.has_pre)  // the padding lanes stay -inf
        for (int64_t v = 0; v < nv; ++v) st(w.Sq + v * L, ld(w.Sq + v * L) + bw.pre[0]);
    for (int64_t v = 0; v < nv; ++v) mx = std::max(mx, hmax(ld(w.Sq + v * L)));
    return mx;
}

void forward_prefix_query(const Work& w, int64_t i, const float* q, float* out, float* lse) {
    const Geo& g = w.g;
    float* qs = w.tmp;
    float* o = w.tmp + g.D;
    float* spre = w.tmp + 2 * g.D;
    const float* qr = q + w.b * g.qs[0] + w.h * g.qs[1] + i * g.qs[2];
    for (int64_t d = 0; d < g.D; ++d) qs[d] = qr[d] * w.scale;
    const float mx = prefix_query_logits(w, qs, spre);
    const int64_t nv = g.gh * w.y.ncv;
    vf lv{};
    for (int64_t v = 0; v < nv; ++v) {
        const vf p = vexp(ld(w.Sq + v * L) - mx);
        st(w.Sq + v * L, p);
        lv += p;
    }
    float l = hsum(lv);
    prefix_reduce(w, w.Sq, w.Vp, o);
    for (int64_t j = 0; j < g.P; ++j) {
        const float p = std::exp(spre[j] - mx);
        l += p;
        const float* vr = w.vb + j * g.vs[2];
        for (int64_t d = 0; d < g.D; ++d) o[d] += p * vr[d];
    }
    float* orow = out + ((w.b * g.T + i) * g.H + w.h) * g.D;
    for (int64_t d = 0; d < g.D; ++d) orow[d] = o[d] / l;
    lse[(w.b * g.H + w.h) * g.T + i] = mx + std::log(l);
}

// ---- backward: query side --------------------------------------------------------------------
struct Back {
    float *dOp, *dKp, *dVp;
    uint8_t* dobad;
    const float* go;      // grad_out of (b, h), token stride H * D
    const float* lse;     // lse of (b, h), padded by L
    const float* delta;   // dO . O per token, padded by L
    float *pre_dk, *pre_dv;  // prefix keys: per key, D lane vectors
    float *gP, *gS;       // band buffers [offset][band row][pitch]
    int32_t* gM;
    bool store_masks;
    int64_t hb, band0;
    float* dq;
    const int64_t* dqs;
};

// probabilities and dS of one query row of a tile, in place in S and S2 (masked pairs 0)
void backward_softmax_row(const Work& w, const Back& k, const Tile& t, int m) {
    const int64_t P = w.g.P, ndc = t.ndc();
    float* S = w.S + m * w.E * L;
    float* D2 = w.S2 + m * w.E * L;
    int32_t* Mk = w.Mk + m * w.E * L;
    const int64_t t0 = P + (t.R0 + m) * w.g.gw + t.C;
    const vf lse = ld(k.lse + t0), delta = ld(k.delta + t0);
    for (int64_t j = 0; j < P; ++j) {
        const vf p = sel(t.valid, vexp(ld(S + j * L) - lse), vf{});
        st(S + j * L, p);
        st(D2 + j * L, sel(t.valid, p * (ld(D2 + j * L) - delta), vf{}));
    }
    for (int64_t r = t.rlo; r <= t.rhi; ++r) {
        const int64_t e = (r - t.rlo) * ndc;
        if (!t.active(m, r)) {
            zero(S + (P + e) * L, ndc * L);
            zero(D2 + (P + e) * L, ndc * L);
            zero(reinterpret_cast<float*>(Mk + e * L), ndc * L);
            continue;
        }
        for (int64_t c = 0; c < ndc; ++c) {
            const vi mk = window_mask(t, m, r, t.dclo + static_cast<int>(c));
            const vf p = sel(mk, vexp(ld(S + (P + e + c) * L) - lse), vf{});
            st(S + (P + e + c) * L, p);
            st(D2 + (P + e + c) * L, sel(mk, p * (ld(D2 + (P + e + c) * L) - delta), vf{}));
            sti(Mk + (e + c) * L, mk);
        }
    }
}

// the tile's P and dS (window entries) into the band buffers, by offset from the query
void store_band(const Work& w, const Back& k, const Tile& t) {
    const Lay& y = w.y;
    const int64_t P = w.g.P, ndc = t.ndc(), ndcg = y.ndc();
    for (int m = 0; m < t.nr; ++m) {
        const int64_t R = t.R0 + m;
        for (int64_t r = t.rlo; r <= t.rhi; ++r) {
            if (!t.active(m, r)) continue;
            const int64_t dr = r - R;
            for (int64_t c = 0; c < ndc; ++c) {
                const int64_t dc = t.dclo + c;
                const int64_t o = (((dr - y.dr_lo) * ndcg + dc - y.dc_lo) * k.hb + R - k.band0) * y.pitch + y.pad + t.C;
                const int64_t e = (m * w.E + P + (r - t.rlo) * ndc + c) * L;
                st(k.gP + o, ld(w.S + e));
                st(k.gS + o, ld(w.S2 + e));
                if (k.store_masks) sti(k.gM + o, ldi(w.Mk + e - P * L));
            }
        }
    }
}

void backward_tile(const Work& w, Back& k, const Tile& t) {
    const Geo& g = w.g;
    const Lay& y = w.y;
    const float *a[NR], *ao[NR];
    for (int m = 0; m < t.nr; ++m) {
        a[m] = w.Qp + (t.R0 + m) * y.rs + y.pad + t.C;
        ao[m] = k.dOp + (t.R0 + m) * y.rs + y.pad + t.C;
    }
    tile_logits(w, t, a, y.pitch, w.Kp, w.kb, g.ks[2], w.S);
    if (w.bias.on) tile_bias(w, t, w.S);
    tile_logits(w, t, ao, y.pitch, w.Vp, w.vb, g.vs[2], w.S2);
    for (int m = 0; m < t.nr; ++m) backward_softmax_row(w, k, t, m);
    if (w.bias.on) tile_bias_grad(w, t);
    tile_pv(w, t, w.S2, w.Kp, w.kb, g.ks[2], any_bad(w.kbad, t.rlo, t.rhi), w.OT);  // dQ^T / scale
    for (int m = 0; m < t.nr; ++m) {
        const int64_t t0 = g.P + (t.R0 + m) * g.gw + t.C;
        unpack_block(w.OT + m * g.D * L, L, t.nval, g.D, bc(w.scale), k.dq + t0 * k.dqs[2], k.dqs[2], false);
    }
    store_band(w, k, t);
    for (int m = 0; m < t.nr; ++m) {  // prefix keys: dK += dS^T Q, dV += P^T dO (lane vectors)
        const float* qa = w.Qp + (t.R0 + m) * y.rs + y.pad + t.C;
        const float* oa = k.dOp + (t.R0 + m) * y.rs + y.pad + t.C;
        for (int64_t j = 0; j < g.P; ++j) {
            const vf ds = ld(w.S2 + (m * w.E + j) * L), p = ld(w.S + (m * w.E + j) * L);
            float* dk = k.pre_dk + j * g.D * L;
            float* dv = k.pre_dv + j * g.D * L;
            for (int64_t d = 0; d < g.D; ++d) {
                st(dk + d * L, ld(dk + d * L) + ds * ld(qa + d * y.pitch));
                st(dv + d * L, ld(dv + d * L) + p * ld(oa + d * y.pitch));
            }
        }
    }
}

// ---- backward: key side ----------------------------------------------------------------------
// dK and dV of key rows [r0, r1) from the query rows of the current band
void backward_keys(const Work& w, const Back& k, int64_t nband) {
    const Lay& y = w.y;
    const int64_t gh = w.g.gh, gw = w.g.gw;
    const int64_t band1 = k.band0 + nband;
    const int64_t r_first = std::max<int64_t>(0, k.band0 + y.dr_lo), r_last = std::min<int64_t>(gh - 1, band1 - 1 + y.dr_hi);
    const bool safe_q = any_bad(w.qbad, k.band0, band1 - 1), safe_o = any_bad(k.dobad, k.band0, band1 - 1);
    for (int64_t r0 = r_first; r0 <= r_last; r0 += KM) {
        const int km = static_cast<int>(std::min<int64_t>(KM, r_last - r0 + 1));
        const int64_t Ra = std::max<int64_t>(k.band0, r0 - y.dr_hi), Rb = std::min<int64_t>(band1 - 1, r0 + km - 1 - y.dr_lo);
        if (Ra > Rb) continue;
        for (int64_t cv = 0; cv < y.ncv; ++cv) {
            const int64_t C = cv * L;
            const int dca = static_cast<int>(std::max<int64_t>(y.dc_lo, C - gw + 1));
            const int dcb = static_cast<int>(std::min<int64_t>(y.dc_hi, C + L - 1));
            if (dca > dcb) continue;
            for (int64_t d0 = 0; d0 < y.D; d0 += ND) {
                const int nd = static_cast<int>(std::min<int64_t>(ND, y.D - d0));
                float* ak[KM];
                float* av[KM];
                for (int i = 0; i < km; ++i) {
                    ak[i] = k.dKp + (r0 + i) * y.rs + d0 * y.pitch + y.pad + C;
                    av[i] = k.dVp + (r0 + i) * y.rs + d0 * y.pitch + y.pad + C;
                }
                KBArgs a{k.gS + y.pad + C, k.gM + y.pad + C,
                         w.Qp + d0 * y.pitch + y.pad + C, ak, y.rs, y.pitch, k.hb, k.band0, y.ndc(),
                         y.dr_lo, y.dr_hi, y.dc_lo, r0, Ra, Rb, dca, dcb};
                (safe_q ? KB_T_1.f[km - 1][nd - 1] : KB_T_0.f[km - 1][nd - 1])(a);
                a.w = k.gP + y.pad + C;
                a.x = k.dOp + d0 * y.pitch + y.pad + C;
                a.acc = av;
                (safe_o ? KB_T_1.f[km - 1][nd - 1] : KB_T_0.f[km - 1][nd - 1])(a);
            }
        }
    }
}

void backward_prefix_query(const Work& w, const Back& k, int64_t i, const float* q, float* dk_pre, float* dv_pre) {
    const Geo& g = w.g;
    const Lay& y = w.y;
    float* qs = w.tmp;
    float* go = w.tmp + g.D;
    float* dq = w.tmp + 2 * g.D;
    float* spre = w.tmp + 4 * g.D;
    const float* qr = q + w.b * g.qs[0] + w.h * g.qs[1] + i * g.qs[2];
    for (int64_t d = 0; d < g.D; ++d) {
        qs[d] = qr[d] * w.scale;
        go[d] = k.go[i * g.H * g.D + d];
    }
    prefix_query_logits(w, qs, spre);
    prefix_logits(w, go, w.Vp, w.Sq2);  // dP over key vectors
    const float lse = k.lse[i], delta = k.delta[i];
    const int64_t nv = g.gh * y.ncv;
    const vi lanes = lane_ids();
    for (int64_t v = 0; v < nv; ++v) {
        const vi valid = lanes + static_cast<int32_t>((v % y.ncv) * L) < static_cast<int32_t>(g.gw);
        const vf p = sel(valid, vexp(ld(w.Sq + v * L) - lse), vf{});
        st(w.Sq + v * L, p);
        st(w.Sq2 + v * L, sel(valid, p * (ld(w.Sq2 + v * L) - delta), vf{}));
    }
    if (w.bias.has_pre) {
        vf sp{};
        for (int64_t v = 0; v < nv; ++v) sp += ld(w.Sq2 + v * L);
        w.bias.gpre[0] += hsum(sp);
    }
    prefix_reduce(w, w.Sq2, w.Kp, dq);
    for (int64_t v = 0; v < nv; ++v) {  // dK += dS q, dV += P dO on the packed key vectors
        const vf ds = ld(w.Sq2 + v * L), p = ld(w.Sq + v * L);
        const int64_t off = (v / y.ncv) * y.rs + y.pad + (v % y.ncv) * L;
        for (int64_t d = 0; d < g.D; ++d) {
            float* a = k.dKp + off + d * y.pitch;
            float* b = k.dVp + off + d * y.pitch;
            st(a, ld(a) + ds * qs[d]);
            st(b, ld(b) + p * go[d]);
        }
    }
    for (int64_t j = 0; j < g.P; ++j) {
        const float* kr = w.kb + j * g.ks[2];
        const float* vr = w.vb + j * g.vs[2];
        const float p = std::exp(spre[j] - lse);
        const float ds = p * (dot(go, vr, g.D) - delta);
        if (w.bias.has_pre) w.bias.gpre[2] += ds;
        for (int64_t d = 0; d < g.D; ++d) {
            dq[d] += ds * kr[d];
            dk_pre[j * g.D + d] += ds * qs[d];
            dv_pre[j * g.D + d] += p * go[d];
        }
    }
    float* dqr = k.dq + i * k.dqs[2];
    for (int64_t d = 0; d < g.D; ++d) dqr[d] = dq[d] * w.scale;
}

int rows_per_tile(const Work& w) { return w.tile_rows; }

void forward_item(Work& w, const float* q, float* out, float* lse) {
    const Geo& g = w.g;
    const int tr = rows_per_tile(w);
    Tile t;
    for (int64_t R0 = 0; R0 < g.gh; R0 += tr) {
        const int nr = static_cast<int>(std::min<int64_t>(tr, g.gh - R0));
        for (int64_t cv = 0; cv < w.y.ncv; ++cv) {
            make_tile(g, w.h, R0, nr, cv * L, t);
            forward_tile(w, t, out, lse);
        }
    }
    for (int64_t i = 0; i < g.P; ++i) forward_prefix_query(w, i, q, out, lse);
}


// per-item state of the backward pass: packed dO, dK, dV, the log-sum-exp and delta rows, the
// prefix keys' accumulators and the band buffers
void setup_back(Work& w, Back& k, Scratch& s, const float* out, const float* grad_out, const float* lse,
                float* dq, const int64_t* dqs) {
    const Geo& g = w.g;
    const Lay& y = w.y;
    const size_t packed = y.packed();
    k.go = grad_out + (w.b * g.T * g.H + w.h) * g.D;
    k.dOp = s.dop.get(packed);
    k.dobad = w.qbad + 3 * g.gh;
    const PackJob job{k.go, g.H * g.D, 1.0f, k.dOp, k.dobad};
    pack_rows(&job, 1, g, y);
    k.dKp = s.dkp.get(packed);
    k.dVp = s.dvp.get(packed);
    std::memset(k.dKp, 0, packed * sizeof(float));
    std::memset(k.dVp, 0, packed * sizeof(float));
    float* l = s.lse.get(g.T + L);
    float* dl = s.delta.get(g.T + L);
    const float* lr = lse + (w.b * g.H + w.h) * g.T;
    const float* orow = out + (w.b * g.T * g.H + w.h) * g.D;
    for (int64_t t = 0; t < g.T; ++t) {
        l[t] = lr[t];
        dl[t] = dot(k.go + t * g.H * g.D, orow + t * g.H * g.D, g.D);
    }
    for (int i = 0; i < L; ++i) l[g.T + i] = dl[g.T + i] = 0.0f;
    k.lse = l;
    k.delta = dl;
    float* pre = s.pre.get(2 * g.P + 2 + 2 * g.P * g.D * (L + 1));  // row pointers, then accumulators
    k.pre_dk = pre + 2 * g.P + 2;
    k.pre_dv = k.pre_dk + g.P * g.D * L;
    std::memset(k.pre_dk, 0, 2 * g.P * g.D * (L + 1) * sizeof(float));
    w.pre = reinterpret_cast<const float**>(pre);
    k.store_masks = any_bad(w.qbad, 0, g.gh - 1) || any_bad(k.dobad, 0, g.gh - 1);
    const int64_t row_bytes = y.noff() * y.pitch * static_cast<int64_t>(sizeof(float)) * (k.store_masks ? 3 : 2);
    k.hb = std::max<int64_t>(1, std::min<int64_t>(g.gh, (int64_t{1} << 20) / row_bytes));
    const size_t band = static_cast<size_t>(y.noff() * k.hb * y.pitch + y.pad + L);
    float* gb = s.grid.get(band * (k.store_masks ? 3 : 2));
    k.gP = gb;
    k.gS = gb + band;
    k.gM = reinterpret_cast<int32_t*>(k.store_masks ? gb + 2 * band : gb);
    k.dq = dq + w.b * dqs[0] + w.h * dqs[1];
    k.dqs = dqs;
}

void backward_item(Work& w, Back& k, const float* q, float* dk, float* dv, const int64_t* dks,
                   const int64_t* dvs) {
    const Geo& g = w.g;
    const Lay& y = w.y;
    float* dk_pre = k.pre_dv + g.P * g.D * L;  // prefix keys' sums from prefix queries
    float* dv_pre = dk_pre + g.P * g.D;
    for (int64_t i = 0; i < g.P; ++i) backward_prefix_query(w, k, i, q, dk_pre, dv_pre);
    const int tr = rows_per_tile(w);
    const size_t band = static_cast<size_t>(y.noff() * k.hb * y.pitch + y.pad + L);
    Tile t;
    for (k.band0 = 0; k.band0 < g.gh; k.band0 += k.hb) {
        const int64_t band1 = std::min<int64_t>(g.gh, k.band0 + k.hb);
        std::memset(k.gP, 0, band * sizeof(float));
        std::memset(k.gS, 0, band * sizeof(float));
        if (k.store_masks) std::memset(k.gM, 0, band * sizeof(int32_t));
        for (int64_t R0 = k.band0; R0 < band1; R0 += tr) {
            const int nr = static_cast<int>(std::min<int64_t>(tr, band1 - R0));
            for (int64_t cv = 0; cv < y.ncv; ++cv) {
                make_tile(g, w.h, R0, nr, cv * L, t);
                backward_tile(w, k, t);
            }
        }
        backward_keys(w, k, band1 - k.band0);
    }
    float* dkb = dk + w.b * dks[0] + w.h * dks[1];
    float* dvb = dv + w.b * dvs[0] + w.h * dvs[1];
    unpack_rows(k.dKp, g, y, dkb, dks[2], false);
    unpack_rows(k.dVp, g, y, dvb, dvs[2], false);
    for (int64_t j = 0; j < g.P; ++j) {
        for (int64_t d = 0; d < g.D; ++d) {
            dkb[j * dks[2] + d] = hsum(ld(k.pre_dk + (j * g.D + d) * L)) + dk_pre[j * g.D + d];
            dvb[j * dvs[2] + d] = hsum(ld(k.pre_dv + (j * g.D + d) * L)) + dv_pre[j * g.D + d];
        }
    }
    finish_bias_grad(w);
}

// pairs of one head: exact (window pairs), and lane-pairs computed by Q K^T and by P V
void count_pairs(const Geo& g, int64_t h, int tile_rows, int64_t* res) {
    Lay y;
    if (!make_layout(g, h, y)) return;
    const int64_t nv = g.gh * y.ncv;
    res[0] += g.P * g.T;
    res[1] += g.P * (nv * L + g.P);
    res[2] += g.P * (nv * L + g.P);
    for (int64_t t = g.P; t < g.T; ++t) {
        const int32_t* w = g.win(h, t);
        res[0] += g.P + static_cast<int64_t>(w[1] - w[0] + 1) * (w[3] - w[2] + 1);
    }
    Tile t;
    for (int64_t R0 = 0; R0 < g.gh; R0 += tile_rows) {
        const int nr = static_cast<int>(std::min<int64_t>(tile_rows, g.gh - R0));
        for (int64_t cv = 0; cv < y.ncv; ++cv) {
            make_tile(g, h, R0, nr, cv * L, t);
            for (int64_t r = t.rlo; r <= t.rhi; ++r) {  // as tile_logits and pv run them
                unsigned act = 0;
                for (int m = 0; m < nr; ++m) {
                    act |= static_cast<unsigned>(t.active(m, r)) << m;
                    res[1] += t.active(m, r) ? L * t.ndc() : 0;
                }
                if (!act) continue;
                int ma, mb;
                bit_range<NR>(act, &ma, &mb);
                if (mb >= nr) mb = nr - 1;  // the kernel's [0, M - 1] fallback, M = nr
                res[2] += L * (mb - ma + 1) * t.ndc();
            }
            res[1] += L * g.P * nr;
            res[2] += L * g.P * nr;
        }
    }
}

// item(work, back, scratch, b, h) for every (image, head), split over `threads` OpenMP threads
// (each with its own scratch); returns 0, 1 (a window is empty or leaves the grid) or 2 (out of
// memory)
template <class F>
int for_each_head(const Geo& g, int threads, F item) {
    int status = 0;
#pragma omp parallel num_threads(threads)
    {
        static thread_local Scratch s;  // OpenMP's threads live on: so do their buffers, up to 64 MiB each
        Work w;
        Back bk;
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < g.B * g.H; ++bh) {
            int failed;
#pragma omp atomic read
            failed = status;
            if (failed) continue;
            try {
                if (!make_layout(g, bh % g.H, w.y)) {
#pragma omp atomic write
                    status = 1;
                    continue;
                }
                item(w, bk, s, bh / g.H, bh % g.H);
            } catch (const std::bad_alloc&) {
#pragma omp atomic write
                status = 2;
            }
        }
        s.trim(size_t{16} << 20);
    }
    return status;
}

}  // namespace

extern "C" {

const char* vitfree_window_attention_isa() { return VITFREE_ISA; }

// `bias`: a position bias to add (its inputs), or null.  Returns 0, or 1 (a window is empty or
// leaves the grid), 2 (out of memory).
int vitfree_window_attention_forward(const float* q, const float* k, const float* v, int64_t B, int64_t H,
                                     int64_t T, int64_t D, int64_t P, int64_t gw, const int64_t* qs,
                                     const int64_t* ks, const int64_t* vs, const int32_t* bounds,
                                     int64_t bounds_heads, float scale, float* out, float* lse, int threads,
                                     const VitfreeBias* bias) {
    const Geo g{B, H, T, D, P, gw, (T - P) / gw, qs, ks, vs, bounds, bounds_heads, bias};
    const int tile_rows = default_tile_rows();
    return for_each_head(g, threads, [&](Work& w, Back&, Scratch& s, int64_t b, int64_t h) {
        setup_work(w, g, b, h, scale, tile_rows, s, q, k, v, false);
        setup_bias(w, s, false);
        forward_item(w, q, out, lse);
    });
}

// Gradients.  dq, dk, dv are fp32 buffers with (batch, head, token) strides gs[0..2], unit stride
// in D; every element of them is written.  Work is split by (batch, head), so the key-side sums
// never race.  `bias`: the forward pass's (null: none), with its gradient buffers.  Returns as
// the forward pass.
int vitfree_window_attention_backward(const float* q, const float* k, const float* v, const float* out,
                                      const float* grad_out, const float* lse, int64_t B, int64_t H, int64_t T,
                                      int64_t D, int64_t P, int64_t gw, const int64_t* qs, const int64_t* ks,
                                      const int64_t* vs, const int32_t* bounds, int64_t bounds_heads, float scale,
                                      float* dq, float* dk, float* dv, const int64_t* dqs, const int64_t* dks,
                                      const int64_t* dvs, int threads, const VitfreeBias* bias) {
    const Geo g{B, H, T, D, P, gw, (T - P) / gw, qs, ks, vs, bounds, bounds_heads, bias};
    const int tile_rows = default_tile_rows();
    return for_each_head(g, threads, [&](Work& w, Back& bk, Scratch& s, int64_t b, int64_t h) {
        setup_work(w, g, b, h, scale, tile_rows, s, q, k, v, true);
        setup_bias(w, s, true);
        setup_back(w, bk, s, out, grad_out, lse, dq, dqs);
        backward_item(w, bk, q, dk, dv, dks, dvs);
    });
}

// Work of one call: res[0] = exact pairs (prefix and window pairs of every query, all heads),
// res[1] and res[2] = lane-pairs the Q K^T and P V micro-kernels compute (the useful fraction
// is res[0] / res[1] and res[0] / res[2]).  tile_rows <= 0: the default.  Returns 1 for bad
// bounds, else 0.
int vitfree_window_attention_pairs(int64_t H, int64_t T, int64_t P, int64_t gw, const int32_t* bounds,
                                   int64_t bounds_heads, int tile_rows, int64_t* res) {
    const Geo g{1, H, T, 0, P, gw, (T - P) / gw, nullptr, nullptr, nullptr, bounds, bounds_heads};
    const int tr = tile_rows >= 1 && tile_rows <= NR ? tile_rows : default_tile_rows();
    res[0] = res[1] = res[2] = 0;
    for (int64_t h = 0; h < H; ++h) {
        Lay y;
        y.D = 0;
        if (!make_layout(g, h, y)) return 1;
        count_pairs(g, h, tr, res);
    }
    return 0;
}

// the most rows a tile can have in this build
int vitfree_window_attention_max_tile_rows() { return NR; }

}  // extern "C"
