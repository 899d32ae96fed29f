/* y[M, N] = x[M, K] . W[N, K]^T, W stored in GGUF blocks of 32 weights, float32 arithmetic.
 *
 * Decode multiplies a few activation rows by every weight: the time is the weight bytes
 * streamed from memory. GGUF blocks are 6.4x (Q4_1) and 3.8x (Q8_0) smaller than the same
 * weights in float32, so the weights stay in blocks and are expanded to float32 in
 * registers. Activations are never quantized: every product and sum is a float32 op on
 * the exact dequantized weight values (Q4_1: d*q + m, Q8_0: d*q, d and m float16).
 *
 * Per block b of a weight row and activation row x:
 *     sum_j x_j (d q_j + m) = d * (sum_j x_j q_j) + m * (sum_j x_j)
 * with sum_j x_j per block computed once per activation row, not once per weight row.
 *
 * Two builds of this file: with AVX2+FMA+F16C (-mavx2 -mfma -mf16c) the vector path,
 * otherwise the portable scalar path (same formula). With -fopenmp the output rows are
 * split over the calling thread's OpenMP team: linked against PyTorch's own libgomp, that
 * is PyTorch's intra-op pool, sized by torch.set_num_threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32 /* weights per block */
#define MAX_ROWS_PER_PASS 4 /* activation rows sharing one expansion of a block (AVX2 registers: 4 q + 4 acc + temps) */

enum { FORMAT_Q4_1 = 0, FORMAT_Q8_0 = 1 };
enum { OK = 0, ERR_FORMAT = 1, ERR_SHAPE = 2, ERR_MEMORY = 3 };

typedef struct {
    uint16_t d, m;         /* float16 scale and offset */
    uint8_t qs[QK / 2];    /* weight j in the low nibble of qs[j], weight j + 16 in the high nibble */
} block_q4_1;

typedef struct {
    uint16_t d;            /* float16 scale */
    int8_t qs[QK];
} block_q8_0;

_Static_assert(sizeof(block_q4_1) == 20, "GGUF Q4_1 block is 20 bytes");
_Static_assert(sizeof(block_q8_0) == 34, "GGUF Q8_0 block is 34 bytes");

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0 && mantissa == 0) {
        bits = sign;
    } else if (exponent == 0) { /* subnormal: normalise into a float32 normal */
        exponent = 127 - 15 + 1;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            exponent--;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    } else if (exponent == 31) { /* inf, nan */
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* x_sums[i * nb + b] = sum of activation row i over block b (the m term of Q4_1). */
static void block_sums(const float *x, int64_t M, int64_t K, float *x_sums) {
    int64_t nb = K / QK;
    for (int64_t i = 0; i < M; i++)
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + i * K + b * QK;
            float s = 0.0f;
            for (int j = 0; j < QK; j++) s += xb[j];
            x_sums[i * nb + b] = s;
        }
}

#ifdef __AVX2__

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum_j q_j x_j over one block, the four 8-wide quarters of q already float32. */
static inline __m256 block_dot(const __m256 q[4], const float *xb) {
    __m256 lo = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb + 8), _mm256_mul_ps(q[0], _mm256_loadu_ps(xb)));
    __m256 hi = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), _mm256_mul_ps(q[2], _mm256_loadu_ps(xb + 16)));
    return _mm256_add_ps(lo, hi);
}

static inline void expand_q4_1(const block_q4_1 *block, __m256 q[4]) {
    const __m128i nibble = _mm_set1_epi8(0x0f);
    __m128i raw = _mm_loadu_si128((const __m128i *)block->qs);
    __m128i lo = _mm_and_si128(raw, nibble);                     /* weights 0..15 */
    __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);  /* weights 16..31 */
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static inline void expand_q8_0(const block_q8_0 *block, __m256 q[4]) {
    for (int k = 0; k < 4; k++)
        q[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(block->qs + 8 * k))));
}

/* out[i * ldy] = weight row . activation row i, for `rows` (<= MAX_ROWS_PER_PASS) rows of x. */
static inline __attribute__((always_inline)) void dot_rows_q4_1(
    const block_q4_1 *w, int64_t nb, const float *x, int64_t K, const float *x_sums, int rows, float *out, int64_t ldy) {
    __m256 acc[MAX_ROWS_PER_PASS];
    float offset_acc[MAX_ROWS_PER_PASS];
    for (int i = 0; i < rows; i++) {
        acc[i] = _mm256_setzero_ps();
        offset_acc[i] = 0.0f;
    }
    for (int64_t b = 0; b < nb; b++) {
        __m256 q[4];
        expand_q4_1(w + b, q);
        __m256 d = _mm256_set1_ps(half_to_float(w[b].d));
        float m = half_to_float(w[b].m);
        for (int i = 0; i < rows; i++) {
            acc[i] = _mm256_fmadd_ps(d, block_dot(q, x + i * K + b * QK), acc[i]);
            offset_acc[i] += m * x_sums[i * nb + b];
        }
    }
    for (int i = 0; i < rows; i++) out[i * ldy] = hsum(acc[i]) + offset_acc[i];
}

static inline __attribute__((always_inline)) void dot_rows_q8_0(
    const block_q8_0 *w, int64_t nb, const float *x, int64_t K, int rows, float *out, int64_t ldy) {
    __m256 acc[MAX_ROWS_PER_PASS];
    for (int i = 0; i < rows; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256 q[4];
        expand_q8_0(w + b, q);
        __m256 d = _mm256_set1_ps(half_to_float(w[b].d));
        for (int i = 0; i < rows; i++) acc[i] = _mm256_fmadd_ps(d, block_dot(q, x + i * K + b * QK), acc[i]);
    }
    for (int i = 0; i < rows; i++) out[i * ldy] = hsum(acc[i]);
}

/* One weight row against all M activation rows, MAX_ROWS_PER_PASS at a time (constant
 * `rows` in each call, so the compiler keeps the accumulators in registers). */
static void weight_row(const uint8_t *w_row, int format, const float *x, int64_t M, int64_t K, const float *x_sums,
                       float *y_col, int64_t N) {
    int64_t nb = K / QK;
    for (int64_t i0 = 0; i0 < M; i0 += MAX_ROWS_PER_PASS) {
        int rows = M - i0 < MAX_ROWS_PER_PASS ? (int)(M - i0) : MAX_ROWS_PER_PASS;
        const float *xi = x + i0 * K;
        float *out = y_col + i0 * N;
        if (format == FORMAT_Q4_1) {
            const block_q4_1 *w = (const block_q4_1 *)w_row;
            const float *s = x_sums + i0 * nb;
            switch (rows) {
                case 4: dot_rows_q4_1(w, nb, xi, K, s, 4, out, N); break;
                case 3: dot_rows_q4_1(w, nb, xi, K, s, 3, out, N); break;
                case 2: dot_rows_q4_1(w, nb, xi, K, s, 2, out, N); break;
                default: dot_rows_q4_1(w, nb, xi, K, s, 1, out, N); break;
            }
        } else {
            const block_q8_0 *w = (const block_q8_0 *)w_row;
            switch (rows) {
                case 4: dot_rows_q8_0(w, nb, xi, K, 4, out, N); break;
                case 3: dot_rows_q8_0(w, nb, xi, K, 3, out, N); break;
                case 2: dot_rows_q8_0(w, nb, xi, K, 2, out, N); break;
                default: dot_rows_q8_0(w, nb, xi, K, 1, out, N); break;
            }
        }
    }
}

#else /* portable scalar path */

static void weight_row(const uint8_t *w_row, int format, const float *x, int64_t M, int64_t K, const float *x_sums,
                       float *y_col, int64_t N) {
    int64_t nb = K / QK;
    for (int64_t i = 0; i < M; i++) {
        const float *xi = x + i * K;
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = xi + b * QK;
            float dot = 0.0f;
            if (format == FORMAT_Q4_1) {
                const block_q4_1 *w = (const block_q4_1 *)w_row + b;
                for (int j = 0; j < QK / 2; j++) dot += xb[j] * (float)(w->qs[j] & 0x0f) + xb[j + QK / 2] * (float)(w->qs[j] >> 4);
                acc += half_to_float(w->d) * dot + half_to_float(w->m) * x_sums[i * nb + b];
            } else {
                const block_q8_0 *w = (const block_q8_0 *)w_row + b;
                for (int j = 0; j < QK; j++) dot += xb[j] * (float)w->qs[j];
                acc += half_to_float(w->d) * dot;
            }
        }
        y_col[i * N] = acc;
    }
}

#endif

static int64_t row_bytes(int format, int64_t K) {
    return K / QK * (format == FORMAT_Q4_1 ? (int64_t)sizeof(block_q4_1) : (int64_t)sizeof(block_q8_0));
}

/* x: [M, K] float32, contiguous
 * w: [N, K / 32] blocks of `format`, row-major (a weight row's blocks are consecutive)
 * y: [M, N] float32, contiguous, written
 * threads: how many threads share the output rows (OpenMP builds; others use one)
 * Returns OK, or ERR_* for an unknown format, K not a multiple of 32, or no memory. */
int block_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int format, float *y, int threads) {
    if (format != FORMAT_Q4_1 && format != FORMAT_Q8_0) return ERR_FORMAT;
    if (K <= 0 || K % QK != 0 || M <= 0 || N <= 0) return ERR_SHAPE;
    float *x_sums = NULL;
    if (format == FORMAT_Q4_1) {
        x_sums = malloc((size_t)(M * (K / QK)) * sizeof(float));
        if (x_sums == NULL) return ERR_MEMORY;
        block_sums(x, M, K, x_sums);
    }
    int64_t stride = row_bytes(format, K);
    if (threads < 1) threads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
#ifdef _OPENMP
        int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
#else
        int64_t thread = 0, team = 1;
        (void)threads;
#endif
        int64_t first = N * thread / team, last = N * (thread + 1) / team;
        for (int64_t n = first; n < last; n++) weight_row(w + n * stride, format, x, M, K, x_sums, y + n, N);
    }
    free(x_sums);
    return OK;
}

/* Which build this is, for logs and tests: 1 = AVX2 vector path, 0 = scalar. */
int block_matmul_vectorized(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}
