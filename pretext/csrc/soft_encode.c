/* Soft-encoding kernel of crosschannel (CPU): the lookup of pretext.encoding.SoftEncoder in one pass per block.
 *
 * Same tables, same exact k-NN as the torch path (SoftEncoder.knn / forward). Per block of up to BLOCK pixels of
 * one image:
 *   1. the pixel's square of the lookup grid (vectorised);
 *   2. the square's entry: a tuple id where the ordered k-NN is fixed over the whole square (most squares), else a
 *      record whose up to max_bits linear sign tests ("is bin t closer than bin s") give a pattern code, which
 *      gives the tuple id; codes past n_fast (spots where many bisectors meet, pixels outside the table) take the
 *      k smallest distances over the record's candidate list, or over all bins;
 *   3. the tuple's K bins and their exact squared distances, written to the outputs (B, K, HW);
 *   4. Gaussian weights 2^((d_0 - d_j) log2(e) / (2 sigma^2)), normalised to 1 (vectorised).
 *
 * Compiled at first use by pretext/encoding_kernel.py with the system C compiler, once per (k, max_bits) given as
 * -DCC_K / -DCC_BITS so that the inner loops have fixed trip counts, and loaded with ctypes; no Python headers, no
 * libm. C99, with SSE2 intrinsics on x86-64 (-DCC_PORTABLE or another architecture: the plain C loops).
 */
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__) && !defined(CC_PORTABLE)
#include <emmintrin.h>
#define CC_SSE2 1
#endif

#ifndef CC_K
#error "compile with -DCC_K=<neighbours> -DCC_BITS=<max_bits>"
#endif
#define K CC_K
#define BITS CC_BITS
#define BITS4 ((BITS + 3) / 4 * 4) /* tests padded to groups of four with never-true ones (0 a + 0 b > 1) */
#define REC (3 * BITS4 + 4)        /* per record: coef_a[BITS4], coef_b[BITS4], coef_h[BITS4], base, 3 unused */

typedef struct {
    const int32_t *grid;      /* (n * n) per square: tuple id u >= 0 if fixed over the square, else -1 - record */
    int64_t n;                /* squares per side, the outer ring included */
    float offset, inv_cell;   /* square = floor((ab + offset) * inv_cell), clamped to [0, n - 1] */
    const float *rec;         /* (records, REC): bit j = coef_a[j] a + coef_b[j] b > coef_h[j]; code = base + bits */
    const int32_t *pattern;   /* code -> tuple id u */
    const uint16_t *tup_bin;  /* (tuples, K) bins of tuple u, nearest first */
    int64_t n_fast;           /* codes >= n_fast ask for a search */
    const int64_t *slow_cand; /* (n_slow, width) candidate bins, -1 padded; rows >= n_slow: all bins */
    int64_t n_slow, width;
    const float *bins_ab;     /* (Q, 2) bin centres */
    int64_t Q;
} cc_tables;

#define BLOCK 256

/* 2^t for t <= 0 (2^-126 below -126; NaN for NaN), relative error < 3e-7; branch-free so that loops over it vectorise.
 * t = m + f with m an integer and |f| <= 1/2: 2^f by a degree-5 polynomial (a minimax-like fit of relative error,
 * made for this file), 2^m through the exponent bits. */
static inline float exp2_nonpositive(float t) {
    t = t < -126.0f ? -126.0f : t;
    const float tc = t > -126.0f ? t : -126.0f;      /* NaN -> -126 for the integer part; NaN still comes out */
    const int32_t m = (int32_t)(tc - 0.5f);          /* truncation of a negative number: rounds t to nearest */
    const float f = t - (float)m;
    float p = 0.001327647129073739f;
    p = p * f + 0.009675540961325169f;
    p = p * f + 0.05550713092088699f;
    p = p * f + 0.24022120237350464f;
    p = p * f + 0.6931469440460205f;
    p = p * f + 1.0000001192092896f;
    const int32_t bits = (m + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Pattern code of a record's sign tests at (a, b). */
static inline int32_t record_code(const float *r, float a, float b) {
    int32_t code = (int32_t)r[3 * BITS4];
#ifdef CC_SSE2
    const __m128 va = _mm_set1_ps(a), vb = _mm_set1_ps(b);
    for (int g = 0; g < BITS4; g += 4) {
        const __m128 v = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(r + g), va), _mm_mul_ps(_mm_loadu_ps(r + BITS4 + g), vb));
        code += _mm_movemask_ps(_mm_cmpgt_ps(v, _mm_loadu_ps(r + 2 * BITS4 + g))) << g;
    }
#else
    for (int j = 0; j < BITS4; j++) code += (int32_t)(r[j] * a + r[BITS4 + j] * b > r[2 * BITS4 + j]) << j;
#endif
    return code;
}

/* The K bins of one tuple and their squared distances to (a, b), written at stride HW. */
static inline void tuple_distances(const uint16_t *tb, const float *bins_ab, float a, float b, int64_t HW, int64_t *oi,
                                   float *od) {
    int j = 0;
#ifdef CC_SSE2
    const __m128 p = _mm_setr_ps(a, b, a, b);
    for (; j + 1 < K; j += 2) { /* two bins per vector: (a_j, b_j, a_j+1, b_j+1) */
        const int64_t q0 = tb[j], q1 = tb[j + 1];
        const __m128d c = _mm_loadh_pd(_mm_load_sd((const double *)(bins_ab + 2 * q0)), (const double *)(bins_ab + 2 * q1));
        __m128 d = _mm_sub_ps(_mm_castpd_ps(c), p);
        d = _mm_mul_ps(d, d);
        d = _mm_add_ps(d, _mm_shuffle_ps(d, d, _MM_SHUFFLE(2, 3, 0, 1)));
        _mm_store_ss(od + j * HW, d);
        _mm_store_ss(od + (j + 1) * HW, _mm_movehl_ps(d, d));
        oi[j * HW] = q0;
        oi[(j + 1) * HW] = q1;
    }
#endif
    for (; j < K; j++) {
        const int64_t q = tb[j];
        const float da = bins_ab[2 * q] - a, db = bins_ab[2 * q + 1] - b;
        oi[j * HW] = q;
        od[j * HW] = da * da + db * db;
    }
}

/* k nearest of the candidates (all bins if cand == NULL), nearest first, by insertion into a sorted list. */
static void search(const cc_tables *t, float a, float b, const int64_t *cand, int64_t count,
                   float *best_d, int64_t *best_i) {
    const int64_t k = K;
    int64_t filled = 0;
    for (int64_t c = 0; c < count; c++) {
        int64_t q = cand ? cand[c] : c;
        if (q < 0) break;
        float da = t->bins_ab[2 * q] - a, db = t->bins_ab[2 * q + 1] - b;
        float d = da * da + db * db;
        if (filled == k && !(d < best_d[k - 1])) continue;
        int64_t pos = filled < k ? filled++ : k - 1;
        while (pos > 0 && d < best_d[pos - 1]) {
            best_d[pos] = best_d[pos - 1];
            best_i[pos] = best_i[pos - 1];
            pos--;
        }
        best_d[pos] = d;
        best_i[pos] = q;
    }
    for (; filled < k; filled++) { /* only with NaN input: keep valid indices */
        best_d[filled] = 1e30f;
        best_i[filled] = filled;
    }
}

/* Squared distances (K rows of len, stride HW, nearest first) -> Gaussian weights normalised to 1, in place:
 * w_j = 2^((d_0 - d_j) * log2e_over_two_var) / sum. */
static void block_weights(float *od, int64_t HW, int64_t len, float log2e_over_two_var) {
    float norm[BLOCK];
    for (int64_t i = 0; i < len; i++) norm[i] = 1.0f;
    for (int j = K - 1; j >= 1; j--) {
        float *dj = od + j * HW;
        for (int64_t i = 0; i < len; i++) {
            dj[i] = exp2_nonpositive((od[i] - dj[i]) * log2e_over_two_var);
            norm[i] += dj[i];
        }
    }
    for (int64_t i = 0; i < len; i++) norm[i] = 1.0f / norm[i];
    for (int64_t i = 0; i < len; i++) od[i] = norm[i];
    for (int j = 1; j < K; j++) {
        float *dj = od + j * HW;
        for (int64_t i = 0; i < len; i++) dj[i] *= norm[i];
    }
}

/* Pixels [p0, p1) of a (B, 2, HW) float32 ab array -> idx (B, k, HW) int64 and out (B, k, HW) float32: the
 * weights, or the squared distances if want_d2. */
void cc_soft_encode(const cc_tables *t, const float *ab, int64_t HW, int64_t p0, int64_t p1, float inv_two_var,
                    int want_d2, int64_t *idx, float *out) {
    const int64_t k = K;
    const float top = (float)(t->n - 1), offset = t->offset, inv_cell = t->inv_cell;
    const float nf = (float)t->n;
    float best_d[K];
    int64_t best_i[K];
    int32_t sq[BLOCK]; /* squares, then their grid entries */
    int64_t p = p0;
    while (p < p1) {
        const int64_t img = p / HW, h0 = p % HW;
        int64_t h1 = h0 + BLOCK;
        if (h1 > HW) h1 = HW;
        if (h1 - h0 > p1 - p) h1 = h0 + (p1 - p);
        const float *pa = ab + img * 2 * HW, *pb = pa + HW;
        int64_t *oi = idx + img * k * HW;
        float *od = out + img * k * HW;
        int64_t h = h0; /* squares, clamped into the table (NaN -> 0, a search square of the ring) */
#ifdef CC_SSE2
        {
            const __m128 vo = _mm_set1_ps(offset), vi = _mm_set1_ps(inv_cell), vt = _mm_set1_ps(top),
                         vn = _mm_set1_ps(nf), zero = _mm_setzero_ps();
            for (; h + 4 <= h1; h += 4) { /* max/min return their second operand for NaN */
                __m128 fa = _mm_min_ps(_mm_max_ps(_mm_mul_ps(_mm_add_ps(_mm_loadu_ps(pa + h), vo), vi), zero), vt);
                __m128 fb = _mm_min_ps(_mm_max_ps(_mm_mul_ps(_mm_add_ps(_mm_loadu_ps(pb + h), vo), vi), zero), vt);
                fa = _mm_cvtepi32_ps(_mm_cvttps_epi32(fa));
                fb = _mm_cvtepi32_ps(_mm_cvttps_epi32(fb));
                _mm_storeu_si128((__m128i *)(sq + h - h0), _mm_cvttps_epi32(_mm_add_ps(_mm_mul_ps(fa, vn), fb)));
            }
        }
#endif
        for (; h < h1; h++) {
            float fa = (pa[h] + offset) * inv_cell, fb = (pb[h] + offset) * inv_cell;
            fa = fa > 0.0f ? fa : 0.0f;
            fb = fb > 0.0f ? fb : 0.0f;
            fa = fa < top ? fa : top;
            fb = fb < top ? fb : top;
            sq[h - h0] = (int32_t)((float)(int32_t)fa * nf + (float)(int32_t)fb); /* exact: n * n < 2^24 */
        }
        /* the table reads of the block in tight loops, so that their cache misses overlap */
        for (int64_t i = 0; i < h1 - h0; i++) sq[i] = t->grid[sq[i]];
#ifdef __GNUC__
        for (int64_t i = 0; i < h1 - h0; i++)
            __builtin_prefetch(sq[i] >= 0 ? (const void *)(t->tup_bin + (int64_t)sq[i] * K)
                                          : (const void *)(t->rec + (int64_t)(-1 - sq[i]) * REC));
#endif
        for (int64_t h = h0; h < h1; h++) {
            const float a = pa[h], b = pb[h];
            int32_t u = sq[h - h0], code = 0;
            if (u < 0) {
                code = record_code(t->rec + (int64_t)(-1 - u) * REC, a, b);
                u = code < t->n_fast ? t->pattern[code] : -1;
            }
            if (u >= 0) {
                tuple_distances(t->tup_bin + (int64_t)u * K, t->bins_ab, a, b, HW, oi + h, od + h);
            } else {
                const int64_t row = code - t->n_fast;
                if (row < t->n_slow)
                    search(t, a, b, t->slow_cand + row * t->width, t->width, best_d, best_i);
                else
                    search(t, a, b, NULL, t->Q, best_d, best_i);
                for (int64_t j = 0; j < k; j++) {
                    oi[j * HW + h] = best_i[j];
                    od[j * HW + h] = best_d[j];
                }
            }
        }
        if (!want_d2) block_weights(od + h0, HW, h1 - h0, inv_two_var * 1.4426950408889634f);
        p += h1 - h0;
    }
}
