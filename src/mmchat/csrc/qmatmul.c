/* Weight-only quantized matmuls (y = x W^T) and whole Llama blocks, for decode steps, batches and prompts.
 *
 * W is kept in GGUF's own blocks of 32 weights along the input, either 4-bit with a scale and a minimum
 * (Q4_1: w = d * q + m, q in 0..15; Q4_0 is m = -8 d) or 8-bit with a scale (Q8_0: w = d * q, q in -127..127).
 * The activations are quantized to int8 per block of 32 on entry (scale dx, values qx), so each block's dot
 * product is integer multiply-adds:
 *     sum_j w_j x_j ~ d dx sum_j q_j qx_j + m dx sum_j qx_j.
 * The weights are read once per call for up to ROWS activation rows, which is what makes a batch of 8 nearly as
 * cheap as one row. Output rows of W are split over threads (OpenMP: the process's libgomp, torch's own).
 *
 * Layouts (all row-major, contiguous):
 *   q4 (N/8, K/32, 128) uint8 and d, m (N/8, K/32, 8) float16: W's rows in tiles of 8, interleaved (q4_tile);
 *   q8 (N, K) int8, d (N, K/32) float32; x (M, K) float32; y (M, N) float32.
 * Needs AVX2, FMA and F16C (every x86-64 CPU of the last decade); uses AVX-VNNI / AVX-512 VNNI where the compiler
 * targets it.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 8 /* activation rows handled per pass over the weights */

/* x (M, K) float -> xq (M, K) int8, and every block's scale and the sum of its quantized values times the scale,
 * laid out for the row kernels: dxt and sxt (ceil(M/ROWS), K/32, ROWS), zero past row M. The minimum term uses that
 * quantized sum, not the float one, so the block's dot product is exactly the one with the rounded activations,
 * sum_j w_j x^_j, whose error sum_j w_j (x_j - x^_j) is small because the weights are centred; with the float sum
 * the error would be sum_j d q_j (x_j - x^_j), and q in 0..15 is not centred (measured on SmolLM2: 5x the KL
 * divergence from float32). Called by every thread of a team; the blocks are split between them. */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *dxt, float *sxt) {
    int G = K / 32, padded = (M + ROWS - 1) / ROWS * ROWS;
    #pragma omp for schedule(static)
    for (int i = 0; i < padded * G; i++) {
        int row = i / G, g = i % G;
        float *d = dxt + ((size_t)(row / ROWS) * G + g) * ROWS + row % ROWS;
        float *s = sxt + (d - dxt);
        if (row >= M) { *d = *s = 0.f; continue; }
        const float *b = x + (size_t)i * 32;
        __m256 v[4], top = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(b + 8 * j);
            top = _mm256_max_ps(top, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[j]));  /* |x| */
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
        __m256i q[4], sum = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {  /* rounded to nearest, ties to even, like lrintf */
            q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)));
            sum = _mm256_add_epi32(sum, q[j]);
        }
        /* 32 int32 -> 32 int8 in order: the packs interleave 128-bit lanes, the permute puts them back */
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + (size_t)i * 32), bytes);
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        *d = scale;
        *s = scale * (float)_mm_cvtsi128_si32(s4);
    }
}

/* 32 unsigned bytes times 32 signed bytes, summed in groups of four into 8 int32 */
static inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void *scratch(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* Eight output rows of W (a tile) against R activation rows (R a constant after inlining, so the accumulators
 * stay in registers). The tile's weights are interleaved so that one 32-byte vector holds 4 consecutive inputs of
 * each of the 8 rows: one multiply-add of it with 4 activation bytes broadcast to every lane gives all 8 rows'
 * partial sums at once, and a block's 8 such products add up in 16 bits (each at most 8 * 2 * 15 * 127 < 2^15).
 * So one conversion and one FMA serve 8 outputs, and every output gets the same chain of block sums whatever R
 * is: a row's result does not depend on which rows share its batch.
 * w: (G, 128) bytes for this tile, per block 4 chunks of 32: chunk c, byte 4i+t holds row i's input 8c+t in its
 * low nibble and input 8c+4+t in its high one. d, m: (G, 8) float16 for this tile. xq points at the first of the
 * R rows; dxt and sxt are their scales and block sums, (G, ROWS). y: the tile's first output of the first row. */
static inline __attribute__((always_inline)) void q4_tile(const uint8_t *w, const uint16_t *d, const uint16_t *m,
        const int8_t *xq, const float *dxt, const float *sxt, float *y, int N, int G, const int R) {
    __m256 acc[ROWS];
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m256i v[8];  /* v[j]: inputs 4j..4j+3 of the 8 rows */
        for (int c = 0; c < 4; c++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + (size_t)g * 128 + c * 32));
            v[2 * c] = _mm256_and_si256(bytes, low);
            v[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
        }
        __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + g * 8)));  /* float16 -> float32 */
        __m256 wm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + g * 8)));
        /* unrolled: otherwise the compiler keeps the accumulators in memory, 1.4x slower at 8 rows */
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const int8_t *a = xq + ((size_t)r * G + g) * 32;
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
            __m256i sum = _mm256_setzero_si256();
            #pragma GCC unroll 8
            for (int j = 0; j < 8; j++) sum = _mm256_dpbusd_epi32(sum, v[j], _mm256_set1_epi32(*(const int32_t *)(a + 4 * j)));
#else
            __m256i s16 = _mm256_maddubs_epi16(v[0], _mm256_set1_epi32(*(const int32_t *)a));
            #pragma GCC unroll 8
            for (int j = 1; j < 8; j++)
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(v[j], _mm256_set1_epi32(*(const int32_t *)(a + 4 * j))));
            __m256i sum = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
#endif
            /* the block's scaled products plus its minimum term, then one add: one short chain per row */
            __m256 block = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(wd, _mm256_set1_ps(dxt[g * ROWS + r])),
                                           _mm256_mul_ps(wm, _mm256_set1_ps(sxt[g * ROWS + r])));
            acc[r] = _mm256_add_ps(acc[r], block);
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(y + (size_t)r * N, acc[r]);
}

static inline __attribute__((always_inline)) void q8_row(const int8_t *wq, const float *wd,
        const int8_t *xq, const float *dxt, float *y, int N, int G, const int R) {
    __m256 acc[ROWS];
    float scales[ROWS] __attribute__((aligned(32)));
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(wq + g * 32));
        __m256i wabs = _mm256_sign_epi8(w, w);  /* u8 x s8: the weight's sign moves to the activation */
        _mm256_store_ps(scales, _mm256_mul_ps(_mm256_set1_ps(wd[g]), _mm256_loadu_ps(dxt + g * ROWS)));
        for (int r = 0; r < R; r++) {
            __m256i a = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq + ((size_t)r * G + g) * 32)), w);
            __m256 p = _mm256_cvtepi32_ps(dot_u8_s8(wabs, a));
            acc[r] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(scales + r), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[(size_t)r * N] = hsum(acc[r]);
}

/* a switch over R so that each case gets its own unrolled copy of the row kernel */
#define FOR_R(R, CALL) switch (R) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); }

/* A matmul's scratch: the quantized activations of up to M rows of K inputs and their scales */
typedef struct {
    int8_t *xq;
    float *dxt, *sxt;
} qscratch;

static qscratch qscratch_new(int M, int K) {
    size_t scales = (size_t)(M + ROWS - 1) / ROWS * ROWS * (K / 32);
    return (qscratch){scratch((size_t)M * K), scratch(sizeof(float) * scales), scratch(sizeof(float) * scales)};
}

static void qscratch_free(qscratch t) { free(t.xq); free(t.dxt); free(t.sxt); }

/* y = x W^T for W in 4-bit (bits 4: q, d, m) or 8-bit blocks (bits 8: q, d), called by every thread of a team:
 * the rows of x quantized once, then every ROWS of them against all of W, output rows split over the threads.
 * Returns after the team's barrier, so y is complete. */
static void block_matmul_team(int bits, const void *q, const void *d, const void *m, const float *x, float *y,
                              int M, int N, int K, qscratch t) {
    int G = K / 32;
    quantize_rows(x, M, K, t.xq, t.dxt, t.sxt);
    for (int i0 = 0; i0 < M; i0 += ROWS) {
        int R = M - i0 < ROWS ? M - i0 : ROWS;
        const float *dxt = t.dxt + (size_t)(i0 / ROWS) * G * ROWS, *sxt = t.sxt + (size_t)(i0 / ROWS) * G * ROWS;
        const int8_t *xq = t.xq + (size_t)i0 * K;
        if (bits == 4) {
            #pragma omp for schedule(static)
            for (int n = 0; n < N; n += 8) {
#define Q4_CALL(r) q4_tile((const uint8_t *)q + (size_t)n * (K / 2), (const uint16_t *)d + (size_t)n * G, \
                           (const uint16_t *)m + (size_t)n * G, xq, dxt, sxt, y + (size_t)i0 * N + n, N, G, r)
                FOR_R(R, Q4_CALL)
            }
        } else {
            #pragma omp for schedule(static)
            for (int n = 0; n < N; n++) {
#define Q8_CALL(r) q8_row((const int8_t *)q + (size_t)n * K, (const float *)d + (size_t)n * G, xq, dxt, \
                           y + (size_t)i0 * N + n, N, G, r)
                FOR_R(R, Q8_CALL)
            }
        }
    }
}

static void block_matmul(int bits, const void *q, const void *d, const void *m, const float *x, float *y,
                         int M, int N, int K, int threads) {
    qscratch t = qscratch_new(M, K);
    #pragma omp parallel num_threads(threads)
    block_matmul_team(bits, q, d, m, x, y, M, N, K, t);
    qscratch_free(t);
}

void q4_matmul(const uint8_t *q4, const uint16_t *d, const uint16_t *m, const float *x, float *y,
               int M, int N, int K, int threads) {
    block_matmul(4, q4, d, m, x, y, M, N, K, threads);
}

void q8_matmul(const int8_t *q8, const float *d, const float *x, float *y, int M, int N, int K, int threads) {
    block_matmul(8, q8, d, NULL, x, y, M, N, K, threads);
}

/* ---- every block of a forward pass with a KV cache: decode steps and prompts -------------------------------
 * The same arithmetic as model.py's Block with a KV cache, for N rows, each a token of some sequence at its own
 * position in its own cache row: RMSNorm, the fused Q/K/V projection, rotary embeddings, the cache write,
 * grouped-query attention over the slots up to the row's position, the output projection, RMSNorm, SwiGLU MLP,
 * two residual adds. A decode step is one row per sequence; a prompt is many rows of one sequence at
 * consecutive positions, whose keys are all written before any row attends (causal attention). Every layer runs
 * in one call from Python and one OpenMP team: its threads split each phase and meet at a barrier between
 * phases, instead of starting a parallel region per matmul (150 per step for SmolLM2, ~5 us each).
 * Each row's result is the same whatever rows share its call (per-row activation scales, per-query sums in a
 * fixed order), so a prompt's last row gives exactly the logits that decoding that token alone would. */
typedef struct {
    int kind;            /* 4: q4 blocks (q, d, m); 8: q8 blocks (q, d) */
    const void *q;
    const void *d, *m;  /* q4: float16 (as bits); q8: float32 */
    int n_out, n_in;
} qlinear;

typedef struct {
    const float *attn_norm, *mlp_norm;
    qlinear wqkv, wo, wup, wdown;
    uint16_t *k_cache, *v_cache;  /* (rows, nkv, S, hs) each, float16: half the bytes attention reads */
} llama_layer;

static void qlinear_team(const qlinear *L, const float *x, float *y, int M, qscratch t) {
    block_matmul_team(L->kind, L->q, L->d, L->m, x, y, M, L->n_out, L->n_in, t);
}

/* out = x / rms(x) * w for one row of D; x += add first when add is not NULL (the residual) */
static void rms_norm_row(float *x, const float *add, const float *w, float eps, float *out, int D) {
    if (add)
        for (int i = 0; i < D; i++) x[i] += add[i];
    __m256 sq = _mm256_setzero_ps();  /* the sum of squares in 8 lanes (D a multiple of 8), then across them */
    for (int i = 0; i < D; i += 8) sq = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), sq);
    float r = 1.f / sqrtf(hsum(sq) / D + eps);
    for (int i = 0; i < D; i++) out[i] = x[i] * r * w[i];
}

/* e^x for 8 floats (Cephes' polynomial after x = n ln2 + r): within 2 ulp of expf, clamped to float's range */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));  /* times 2^n */
}

/* x (hs) rotated in place: x * cos + (x2, x1) * sin, with sin's first half negated (model.rope_tables) */
static void rope(float *x, const float *cos, const float *sin, int hs) {
    float tmp[512];
    int half = hs / 2;
    for (int i = 0; i < half; i++) tmp[i] = x[i] * cos[i] + x[i + half] * sin[i];
    for (int i = half; i < hs; i++) tmp[i] = x[i] * cos[i] + x[i - half] * sin[i];
    memcpy(x, tmp, sizeof(float) * hs);
}

/* n floats (a multiple of 8) -> float16, rounded to nearest */
static void to_half(const float *x, uint16_t *h, int n) {
    for (int i = 0; i < n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

/* r[j] <- column j of the 8 x 8 matrix whose rows are r[0..7] */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
    }
    for (int j = 0; j < 8; j += 4) {
        u[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
        u[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
        u[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
        u[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
        r[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
    }
}

static const uint16_t zeros[512];  /* float16 zeros: the keys past a row's last slot */

#define TILE_ROWS 32 /* a prompt's consecutive rows that attend together, reading the keys and values once */
#define QB 6         /* queries per register tile */
#define KB 16        /* keys (scores) or head dims (outputs) per register tile: two vectors */

/* Attention for one tile of consecutive rows of one sequence (positions p0..p0+R-1) and the g query heads that
 * share key/value head K, V (slots 0..p0+R-1, hs each): out[row][head] = softmax(q K^T / sqrt(hs)) V over the
 * slots up to the row's position. Queries m = r * g + j are gathered (scaled) into qs (Mq, hs); the scores go to
 * sc (Mq, n rounded up to KB), each one an FMA chain over the head dims in order, and each output an FMA chain
 * over the slots in order, so a query's result does not depend on its tile. kt: (hs, KB) scratch. */
static void attend_tile(const float *qkv, int W, int R, int head0, int g, int64_t p0, const uint16_t *K,
                        const uint16_t *V, int hs, float *out, int out_stride, float *qs, float *sc, float *kt) {
    int Mq = R * g, Mp = (Mq + QB - 1) / QB * QB, n = (int)p0 + R, np = (n + KB - 1) / KB * KB;
    float scale = 1.f / sqrtf((float)hs), total[TILE_ROWS * 64];
    /* a decode step's keys and values come cold from memory: ask for all their lines at once, not one by one */
    for (size_t at = 0; at < (size_t)n * hs; at += 32) {  /* 32 float16 a line */
        _mm_prefetch((const char *)(K + at), _MM_HINT_T0);
        _mm_prefetch((const char *)(V + at), _MM_HINT_T1);
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < g; j++)
            for (int i = 0; i < hs; i++) qs[(size_t)(r * g + j) * hs + i] = qkv[(size_t)r * W + (size_t)(head0 + j) * hs + i] * scale;
    memset(qs + (size_t)Mq * hs, 0, sizeof(float) * (Mp - Mq) * hs);
    for (int t0 = 0; t0 < np; t0 += KB) {  /* scores, KB slots at a time against every query */
        for (int tb = 0; tb < KB; tb += 8) {  /* kt (hs, KB) <- K's slots t0+tb.. (8, hs), 8 x 8 at a time */
            const uint16_t *key[8];
            for (int t = 0; t < 8; t++) key[t] = t0 + tb + t < n ? K + (size_t)(t0 + tb + t) * hs : zeros;
            for (int i = 0; i < hs; i += 8) {
                __m256 r[8];
                for (int t = 0; t < 8; t++) r[t] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(key[t] + i)));
                transpose8(r);
                for (int j = 0; j < 8; j++) _mm256_storeu_ps(kt + (size_t)(i + j) * KB + tb, r[j]);
            }
        }
        for (int m0 = 0; m0 < Mp; m0 += QB) {
            __m256 acc[QB][2];
            for (int a = 0; a < QB; a++) acc[a][0] = acc[a][1] = _mm256_setzero_ps();
            for (int i = 0; i < hs; i++) {
                __m256 k0 = _mm256_loadu_ps(kt + i * KB), k1 = _mm256_loadu_ps(kt + i * KB + 8);
                for (int a = 0; a < QB; a++) {
                    __m256 q = _mm256_broadcast_ss(qs + (size_t)(m0 + a) * hs + i);
                    acc[a][0] = _mm256_fmadd_ps(q, k0, acc[a][0]);
                    acc[a][1] = _mm256_fmadd_ps(q, k1, acc[a][1]);
                }
            }
            for (int a = 0; a < QB; a++) {
                _mm256_storeu_ps(sc + (size_t)(m0 + a) * np + t0, acc[a][0]);
                _mm256_storeu_ps(sc + (size_t)(m0 + a) * np + t0 + 8, acc[a][1]);
            }
        }
    }
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int m = 0; m < Mq; m++) {  /* softmax over the slots the query may see; zeros past them */
        float *p = sc + (size_t)m * np;
        int seen = (int)p0 + m / g + 1, full = seen / 8 * 8;
        __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(seen - full), lanes);  /* the last chunk's seen lanes */
        __m256 top = _mm256_set1_ps(-INFINITY);
        for (int t = 0; t < full; t += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(p + t));
        if (full < seen)
            top = _mm256_max_ps(top, _mm256_blendv_ps(top, _mm256_loadu_ps(p + full), _mm256_castsi256_ps(tail)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        __m256 best = _mm256_set1_ps(_mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)))), sum = _mm256_setzero_ps();
        for (int t = 0; t < full; t += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), best));
            _mm256_storeu_ps(p + t, e);
            sum = _mm256_add_ps(sum, e);
        }
        if (full < seen) {
            __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(p + full), best)), _mm256_castsi256_ps(tail));
            _mm256_storeu_ps(p + full, e);
            sum = _mm256_add_ps(sum, e);
        }
        int zeroed = (seen + 7) / 8 * 8;
        memset(p + zeroed, 0, sizeof(float) * (np - zeroed));
        total[m] = hsum(sum);
    }
    for (int m0 = 0; m0 < Mp; m0 += QB)  /* outputs: the weights times the values, KB head dims at a time */
        for (int c = 0; c < hs; c += KB) {
            __m256 acc[QB][2];
            for (int a = 0; a < QB; a++) acc[a][0] = acc[a][1] = _mm256_setzero_ps();
            for (int t = 0; t < n; t++) {
                __m256 v0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(V + (size_t)t * hs + c)));
                __m256 v1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(V + (size_t)t * hs + c + 8)));
                for (int a = 0; a < QB; a++) {
                    __m256 w = _mm256_broadcast_ss(sc + (size_t)(m0 + a) * np + t);
                    acc[a][0] = _mm256_fmadd_ps(w, v0, acc[a][0]);
                    acc[a][1] = _mm256_fmadd_ps(w, v1, acc[a][1]);
                }
            }
            for (int a = 0; a < QB && m0 + a < Mq; a++) {
                int m = m0 + a;
                __m256 inv = _mm256_set1_ps(1.f / total[m]);
                float *o = out + (size_t)(m / g) * out_stride + (size_t)(head0 + m % g) * hs + c;
                _mm256_storeu_ps(o, _mm256_mul_ps(acc[a][0], inv));
                _mm256_storeu_ps(o + 8, _mm256_mul_ps(acc[a][1], inv));
            }
        }
}

/* what a call's layers share: the activations between phases, sized for N rows; the tiles of rows that attend
 * together; each thread's attention scratch */
typedef struct {
    float *h, *qkv, *att, *o, *up;
    qscratch t;
    int n_tiles, *tile_start, *tile_len;
    float *attn_scratch;
    size_t attn_stride;
} step_buffers;

/* one layer, called by every thread of the team; x (N, D) is updated in place */
static void layer_team(float *x, const llama_layer *L, float eps, const float *cos, const float *sin,
                       const int64_t *pos, const int64_t *rows, int N, int nh, int nkv, int hs, int S,
                       step_buffers *s) {
    int D = L->wqkv.n_in, F = L->wdown.n_in, W = (nh + 2 * nkv) * hs, group = nh / nkv;
    #pragma omp for schedule(static)
    for (int b = 0; b < N; b++) rms_norm_row(x + (size_t)b * D, NULL, L->attn_norm, eps, s->h + (size_t)b * D, D);
    qlinear_team(&L->wqkv, s->h, s->qkv, N, s->t);  /* (N, W): nh query heads, nkv key heads, nkv value heads */
    #pragma omp for schedule(static)
    for (int b = 0; b < N; b++) {
        float *qb = s->qkv + (size_t)b * W;
        const float *cb = cos + (size_t)pos[b] * hs, *sb = sin + (size_t)pos[b] * hs;
        for (int j = 0; j < nh + nkv; j++) rope(qb + (size_t)j * hs, cb, sb, hs);
        for (int j = 0; j < nkv; j++) {  /* cache row rows[b], slot pos[b] */
            size_t at = (((size_t)rows[b] * nkv + j) * S + pos[b]) * hs;
            to_half(qb + (size_t)(nh + j) * hs, L->k_cache + at, hs);
            to_half(qb + (size_t)(nh + nkv + j) * hs, L->v_cache + at, hs);
        }
    }
    /* every key of the call is in the cache now (the loop's barrier): each tile of rows attends, per K/V head */
    float *mine = s->attn_scratch + s->attn_stride * omp_get_thread_num();
    #pragma omp for schedule(dynamic, 1)
    for (int item = s->n_tiles * nkv - 1; item >= 0; item--) {  /* the longest (last) tiles first */
        int tile = item / nkv, kvh = item % nkv, b = s->tile_start[tile], R = s->tile_len[tile];
        size_t kv = ((size_t)rows[b] * nkv + kvh) * S * hs;
        float *qs = mine, *kt = qs + (size_t)(TILE_ROWS * group + QB) * hs, *sc = kt + (size_t)hs * KB;
        attend_tile(s->qkv + (size_t)b * W, W, R, kvh * group, group, pos[b], L->k_cache + kv, L->v_cache + kv, hs,
                    s->att + (size_t)b * nh * hs, nh * hs, qs, sc, kt);
    }
    qlinear_team(&L->wo, s->att, s->o, N, s->t);
    #pragma omp for schedule(static)
    for (int b = 0; b < N; b++)
        rms_norm_row(x + (size_t)b * D, s->o + (size_t)b * D, L->mlp_norm, eps, s->h + (size_t)b * D, D);
    qlinear_team(&L->wup, s->h, s->up, N, s->t);  /* (N, 2F): the gate, then the up projection */
    int chunks = F / 8;
    #pragma omp for schedule(static)
    for (int i = 0; i < N * chunks; i++) {  /* SwiGLU, 8 at a time, into h (rows b > 0 would overwrite inputs) */
        int b = i / chunks, j = i % chunks * 8;
        const float *g = s->up + (size_t)b * 2 * F + j;
        __m256 gate = _mm256_loadu_ps(g);
        __m256 silu = _mm256_div_ps(gate, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate))));
        _mm256_storeu_ps(s->h + (size_t)b * F + j, _mm256_mul_ps(silu, _mm256_loadu_ps(g + F)));
    }
    qlinear_team(&L->wdown, s->h, s->o, N, s->t);
    #pragma omp for schedule(static)
    for (int i = 0; i < N * D; i++) x[i] += s->o[i];
}

/* every block of the model for N rows at positions pos in cache rows rows (a decode step, a prompt, or both) */
void llama_layers(float *x, const llama_layer *layers, int n_layers, float eps, const float *cos, const float *sin,
                  const int64_t *pos, const int64_t *rows, int N, int nh, int nkv, int hs, int S, int threads) {
    int D = layers[0].wqkv.n_in, F = layers[0].wdown.n_in, W = (nh + 2 * nkv) * hs, max_pos = 0;
    for (int b = 0; b < N; b++) max_pos = pos[b] > max_pos ? (int)pos[b] : max_pos;
    int widest = D > F ? D : F;
    if (nh * hs > widest) widest = nh * hs;
    int *tile_start = malloc(sizeof(int) * N), *tile_len = malloc(sizeof(int) * N), n_tiles = 0;
    for (int b = 0; b < N; b++) {  /* runs of consecutive positions of one cache row, up to TILE_ROWS long */
        int run = n_tiles ? tile_len[n_tiles - 1] : 0;
        if (run && run < TILE_ROWS && rows[b] == rows[b - 1] && pos[b] == pos[b - 1] + 1) tile_len[n_tiles - 1]++;
        else { tile_start[n_tiles] = b; tile_len[n_tiles++] = 1; }
    }
    int group = nh / nkv, slots = (max_pos + 1 + KB - 1) / KB * KB;
    size_t per_thread = (size_t)(TILE_ROWS * group + QB) * hs + (size_t)hs * KB + (size_t)(TILE_ROWS * group + QB) * slots;
    per_thread = (per_thread + 15) / 16 * 16;
    step_buffers s = {scratch(sizeof(float) * N * widest), scratch(sizeof(float) * N * W),
                      scratch(sizeof(float) * N * nh * hs), scratch(sizeof(float) * N * D),
                      scratch(sizeof(float) * N * 2 * F), qscratch_new(N, widest), n_tiles, tile_start, tile_len,
                      scratch(sizeof(float) * per_thread * threads), per_thread};
    #pragma omp parallel num_threads(threads)
    for (int l = 0; l < n_layers; l++)
        layer_team(x, layers + l, eps, cos, sin, pos, rows, N, nh, nkv, hs, S, &s);
    free(s.h); free(s.qkv); free(s.att); free(s.o); free(s.up); free(s.attn_scratch); free(tile_start); free(tile_len);
    qscratch_free(s.t);
}

/* ---- sampling a batch of next-token logits ------------------------------------------------------------------
 * Row b's token is drawn by inverting the cumulative distribution of softmax(logits[b] * inv_temp[b]) at the
 * uniform number u[b] (the first token whose cumulative weight passes u times the total), or is the first largest
 * logit where inv_temp[b] is 0. The weights are summed in blocks of SAMPLE_BLOCK (float lanes, then float64
 * across blocks) and only the block where the target falls is walked weight by weight. logprob[b] is the chosen
 * token's log-probability under softmax(report[b]), the model's own distribution before penalties and
 * temperature. Rows with top_k or top_p go through draw_truncated. A few passes over each row: at 8 rows of
 * 49152, ~0.2-0.5 ms against ~5 ms of tensor ops. */
#define SAMPLE_BLOCK 256

static float row_max(const float *x, int V) {
    __m256 best = _mm256_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 8 <= V; j += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(x + j));
    float lanes[8], m = -INFINITY;
    _mm256_storeu_ps(lanes, best);
    for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
    for (; j < V; j++) m = x[j] > m ? x[j] : m;
    return m;
}

/* w[j] = exp((x[j] - top) * scale) for j < n (n <= SAMPLE_BLOCK; w has room for SAMPLE_BLOCK), and their sum;
 * weights below float's range are exactly 0, as a float32 softmax's underflow gives, so -inf is never drawn, and
 * so are weights under floor (min_p's, relative to the largest weight, 1) */
static double block_weights(const float *x, int n, float top, float scale, float floor, float *w) {
    __m256 acc = _mm256_setzero_ps(), t = _mm256_set1_ps(top), s = _mm256_set1_ps(scale);
    float pad[8], lanes[8];
    for (int j = 0; j < n; j += 8) {
        const float *src = x + j;
        if (j + 8 > n) {  /* the row's tail, padded with -inf */
            for (int i = 0; i < 8; i++) pad[i] = j + i < n ? x[j + i] : -INFINITY;
            src = pad;
        }
        __m256 a = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(src), t), s);
        __m256 e = _mm256_and_ps(exp8(a), _mm256_cmp_ps(a, _mm256_set1_ps(-87.33654f), _CMP_GT_OQ));
        e = _mm256_and_ps(e, _mm256_cmp_ps(e, _mm256_set1_ps(floor), _CMP_GE_OQ));
        _mm256_storeu_ps(w + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    _mm256_storeu_ps(lanes, acc);
    double sum = 0.0;
    for (int i = 0; i < 8; i++) sum += lanes[i];
    return sum;
}

static int64_t draw_row(const float *x, int V, float scale, float floor, double u, double *block_sums) {
    float top = row_max(x, V), w[SAMPLE_BLOCK];
    if (scale == 0.f) {
        for (int j = 0; j < V; j++) if (x[j] == top) return j;
        return 0;  /* no number in the row */
    }
    int nb = (V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    double total = 0.0;
    for (int k = 0; k < nb; k++) {
        int n = V - k * SAMPLE_BLOCK < SAMPLE_BLOCK ? V - k * SAMPLE_BLOCK : SAMPLE_BLOCK;
        block_sums[k] = block_weights(x + (size_t)k * SAMPLE_BLOCK, n, top, scale, floor, w);
        total += block_sums[k];
    }
    double target = u * total, before = 0.0;
    int k = 0, last = 0;
    for (; k < nb; k++) {
        if (block_sums[k] > 0.0) last = k;
        if (before + block_sums[k] > target) break;
        before += block_sums[k];
    }
    if (k == nb) k = last;  /* rounding put the target past the end: the last block that has weight */
    int n = V - k * SAMPLE_BLOCK < SAMPLE_BLOCK ? V - k * SAMPLE_BLOCK : SAMPLE_BLOCK;
    block_weights(x + (size_t)k * SAMPLE_BLOCK, n, top, scale, floor, w);
    double cum = before;
    int pick = -1;
    for (int j = 0; j < n; j++) {
        if (w[j] <= 0.f) continue;  /* a token of weight 0 is never drawn */
        pick = j;
        cum += w[j];
        if (cum > target) break;
    }
    return (int64_t)k * SAMPLE_BLOCK + (pick < 0 ? 0 : pick);
}

static float log_softmax_at(const float *x, int V, int64_t at) {
    float top = row_max(x, V), w[SAMPLE_BLOCK];
    double total = 0.0;
    for (int k = 0; k < V; k += SAMPLE_BLOCK)
        total += block_weights(x + k, V - k < SAMPLE_BLOCK ? V - k : SAMPLE_BLOCK, top, 1.f, 0.f, w);
    return (float)(x[at] - top - log(total));
}

/* A row with top_k or top_p (and maybe min_p). The tokens within e^-9 of the most likely are gathered; where they
 * do not hold the top_k tokens or top_p of the weight, a histogram of every token's log-weight (relative to the
 * largest) gives the cutoff that does. The gathered tokens are sorted, most likely first. The kept set is
 * the top_k most likely, then the smallest prefix whose probability (over the row, or over those k) reaches top_p,
 * less those under min_p times the largest, and the token is drawn from them in that order, as generate.py's tensor
 * path draws from its sorted candidates. Where that path finds its SAMPLE_CANDIDATES most likely tokens hold less
 * than top_p (a flat row) it draws in vocabulary order instead, so here too: -1 is returned, and *floor is the
 * smallest kept weight, for draw_row. */
#define SAMPLE_CANDIDATES 256 /* generate.CANDIDATES */
#define BUCKETS 128           /* of BUCKET_NATS each: weights down to e^-32 apart, the rest in the last */
#define BUCKET_NATS 0.25f
typedef struct { float w; int id; } candidate;

/* the histogram bucket of a token's -log(weight): BUCKET_NATS wide, the last one open-ended (and -inf's) */
static inline int bucket_of(float x, float top, float scale) {
    float nats = (top - x) * scale / BUCKET_NATS;
    return nats < BUCKETS - 1 ? (int)nats : BUCKETS - 1;
}

static int most_likely_first(const void *a, const void *b) {
    const candidate *x = a, *y = b;
    return x->w != y->w ? (x->w < y->w ? 1 : -1) : x->id - y->id;
}

/* the tokens whose weight is at least cutoff (and above 0) into c, with all the weights' total in *total and the
 * gathered ones' in *held: a vector compare per 8 weights, and most blocks hold none */
static int gather_above(const float *x, int V, float top, float scale, float cutoff, candidate *c, double *total,
                        double *held) {
    float w[SAMPLE_BLOCK];
    int n = 0;
    *total = *held = 0.0;
    for (int b0 = 0; b0 < V; b0 += SAMPLE_BLOCK) {
        int len = V - b0 < SAMPLE_BLOCK ? V - b0 : SAMPLE_BLOCK;
        *total += block_weights(x + b0, len, top, scale, 0.f, w);
        for (int j = 0; j < len; j += 8) {
            __m256 e = _mm256_loadu_ps(w + j);  /* block_weights wrote whole vectors: zeros past len */
            int bits = _mm256_movemask_ps(_mm256_cmp_ps(e, _mm256_set1_ps(cutoff), _CMP_GE_OQ));
            for (; bits; bits &= bits - 1) {
                int i = j + __builtin_ctz(bits);
                if (i < len && w[i] > 0.f) { c[n].w = w[i]; c[n].id = b0 + i; n++; *held += w[i]; }
            }
        }
    }
    return n;
}

/* rearranges c[0..n) so that its first m are the m most likely (in no order): quickselect */
static void select_most_likely(candidate *c, int n, int m) {
    int lo = 0, hi = n - 1;
    while (lo < hi && m > lo && m <= hi) {
        float pivot = c[lo + (hi - lo) / 2].w;
        int i = lo, j = hi;
        while (i <= j) {  /* heavier than the pivot to the left, lighter to the right */
            while (c[i].w > pivot) i++;
            while (c[j].w < pivot) j--;
            if (i <= j) { candidate t = c[i]; c[i] = c[j]; c[j] = t; i++; j--; }
        }
        if (m <= j + 1) hi = j;      /* the first m lie in c[lo..j] */
        else if (m >= i) lo = i;     /* c[lo..i) are all among the first m */
        else return;                 /* c[j+1..i) equal the pivot: any m of them will do */
    }
}

static int64_t draw_truncated(const float *x, int V, float scale, double u, int top_k, float top_p, float min_p,
                              candidate *c, float *floor) {
    float top = row_max(x, V), w[SAMPLE_BLOCK];
    int k = top_k > 0 && top_k < V ? top_k : V;
    double total, held;
    /* most rows: the tokens within e^-9 of the most likely hold the kept set; else the histogram below */
    int n = gather_above(x, V, top, scale, 1e-4f, c, &total, &held);
    if (top_k > 0 ? n < k : held < (double)top_p * total) {
        double mass[BUCKETS] = {0};
        int count[BUCKETS] = {0};
        for (int b0 = 0; b0 < V; b0 += SAMPLE_BLOCK) {
            int len = V - b0 < SAMPLE_BLOCK ? V - b0 : SAMPLE_BLOCK;
            block_weights(x + b0, len, top, scale, 0.f, w);
            for (int j = 0; j < len; j++) {
                int bucket = bucket_of(x[b0 + j], top, scale);
                mass[bucket] += w[j];
                count[bucket]++;
            }
        }
        int last = 0, seen = 0;
        double sum = 0.0;
        for (; last < BUCKETS - 1; last++) {  /* the buckets that hold the kept set */
            sum += mass[last];
            seen += count[last];
            if (top_k > 0 ? seen >= k : sum >= (double)top_p * total) break;
        }
        n = 0;
        for (int b0 = 0; b0 < V; b0 += SAMPLE_BLOCK) {  /* the same weights again: draw_row compares them to *floor */
            int len = V - b0 < SAMPLE_BLOCK ? V - b0 : SAMPLE_BLOCK;
            block_weights(x + b0, len, top, scale, 0.f, w);
            for (int j = 0; j < len; j++) {
                if (w[j] > 0.f && bucket_of(x[b0 + j], top, scale) <= last) {
                    c[n].w = w[j];
                    c[n].id = b0 + j;
                    n++;
                }
            }
        }
    }
    if (n == 0) return 0;
    /* sorted: the top_k, or the SAMPLE_CANDIDATES most likely, and all of them only for a flat row */
    int head = top_k > 0 ? (k < n ? k : n) : (SAMPLE_CANDIDATES < n ? SAMPLE_CANDIDATES : n);
    select_most_likely(c, n, head);
    qsort(c, head, sizeof(candidate), most_likely_first);
    double head_weight = 0.0;
    for (int j = 0; j < head; j++) head_weight += c[j].w;
    int flat = top_k <= 0 && head_weight < (double)top_p * total;
    if (flat) qsort(c, n, sizeof(candidate), most_likely_first);
    else n = head;
    double norm = top_k > 0 ? head_weight : total;  /* the top_k's own total, or the row's */
    double before = 0.0, kept_total = 0.0;
    int kept = 0;
    for (; kept < n; kept++) {  /* the nucleus: every token whose predecessors hold less than top_p */
        if (top_p < 1.f && before >= (double)top_p * norm) break;
        before += c[kept].w;
    }
    if (flat) {
        *floor = c[kept - 1].w > min_p ? c[kept - 1].w : min_p;
        return -1;
    }
    for (int j = 0; j < kept; j++) {  /* min_p: a token under min_p times the largest weight is dropped */
        if (c[j].w < min_p * c[0].w) c[j].w = 0.f;
        kept_total += c[j].w;
    }
    double target = u * kept_total, cum = 0.0;
    int pick = 0;
    for (int j = 0; j < kept; j++) {
        if (c[j].w <= 0.f) continue;
        pick = j;
        cum += c[j].w;
        if (cum > target) break;
    }
    return c[pick].id;
}

void sample_rows(const float *logits, const float *report, int B, int V, const float *inv_temp, const int *top_k,
                 const float *top_p, const float *min_p, const double *u, int64_t *token, float *logprob,
                 int threads) {
    int nb = (V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    double *block_sums = scratch(sizeof(double) * nb * B);
    candidate *candidates = scratch(sizeof(candidate) * (size_t)V * threads);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++) {
        const float *x = logits + (size_t)b * V;
        double *sums = block_sums + (size_t)b * nb;
        if (inv_temp[b] == 0.f || (top_k[b] == 0 && top_p[b] >= 1.f)) {  /* min_p alone: in vocabulary order */
            token[b] = draw_row(x, V, inv_temp[b], min_p[b], u[b], sums);
        } else {
            float floor = 0.f;
            token[b] = draw_truncated(x, V, inv_temp[b], u[b], top_k[b], top_p[b], min_p[b],
                                      candidates + (size_t)V * omp_get_thread_num(), &floor);
            if (token[b] < 0) token[b] = draw_row(x, V, inv_temp[b], floor, u[b], sums);
        }
        logprob[b] = log_softmax_at(report + (size_t)b * V, V, token[b]);
    }
    free(block_sums);
    free(candidates);
}

/* out = logits with each row's penalties: the repetition penalty on the tokens the row has seen (divided where
 * positive, multiplied where not, as HF does), OpenAI's presence and frequency penalties on the tokens it has
 * generated, then its logit bias. The same float operations, in the same order, as generate.Sampler.penalize's
 * tensor path (so no multiply-add contraction here). Row b's history is row rows[b] of seen (bytes), counts and
 * bias (each NULL when no row uses it). */
__attribute__((optimize("fp-contract=off")))
void penalize_rows(const float *logits, float *out, int B, int V, const int64_t *rows, const uint8_t *seen,
                   const float *counts, const float *bias, const float *rep, const float *presence,
                   const float *frequency, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++) {
        const float *x = logits + (size_t)b * V;
        float *o = out + (size_t)b * V, r = rep[b], p = presence[b], f = frequency[b];
        size_t at = (size_t)rows[b] * V;
        int repeat = seen && r != 1.f, generated = counts && (p != 0.f || f != 0.f);
        for (int j = 0; j < V; j++) {
            float v = x[j];
            if (repeat && seen[at + j]) v = v > 0.f ? v / r : v * r;
            if (generated && counts[at + j] != 0.f) v = v - p - f * counts[at + j];
            o[j] = bias ? v + bias[at + j] : v;
        }
    }
}

/* ---- float32 GEMMs on this process's thread team (training) -------------------------------------------------
 * C (M, N) = op(A) op(B) + beta C, row-major, through a BLAS's cblas_sgemm (numpy's OpenBLAS, 64-bit integers)
 * called single-threaded by each thread of the OpenMP team on its share of C: columns when C is wider than tall,
 * else rows, in multiples of 16. The BLAS's own thread pool would run beside the team that torch's elementwise
 * ops use, and the two spin against each other on the same cores (2 threads measured no faster than 1). */
typedef void (*cblas_sgemm_fn)(int layout, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                               const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
                               int64_t ldc);
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

void sgemm_team(void *sgemm, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                const float *B, int64_t ldb, float beta, float *C, int64_t ldc, int threads) {
    cblas_sgemm_fn gemm = (cblas_sgemm_fn)sgemm;
    int by_columns = N >= M;
    int64_t span = by_columns ? N : M;
    if (threads > (span + 15) / 16) threads = (int)((span + 15) / 16);
    if (threads < 1) threads = 1;
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n_t = omp_get_num_threads();
        int64_t per = (span / n_t + 15) / 16 * 16;
        int64_t lo = t * per, hi = t == n_t - 1 ? span : lo + per;
        if (hi > span) hi = span;
        if (lo < hi) {
            if (by_columns)  /* C[:, lo:hi] = op(A) op(B)[:, lo:hi] */
                gemm(ROW_MAJOR, trans_a ? TRANS : NO_TRANS, trans_b ? TRANS : NO_TRANS, M, hi - lo, K, 1.0f, A, lda,
                     trans_b ? B + lo * ldb : B + lo, ldb, beta, C + lo, ldc);
            else             /* C[lo:hi] = op(A)[lo:hi] op(B) */
                gemm(ROW_MAJOR, trans_a ? TRANS : NO_TRANS, trans_b ? TRANS : NO_TRANS, hi - lo, N, K, 1.0f,
                     trans_a ? A + lo : A + lo * lda, lda, B, ldb, beta, C + lo * ldc, ldc);
        }
    }
}

/* ---- the training loss: -log softmax(logits)[target] per row, and its gradient in the logits' place -----------
 * nll[i] = logsumexp(row i) - row_i[target_i]; the row is then overwritten with d nll_i / d row_i =
 * softmax(row_i) - onehot(target_i). A row (V floats) stays in cache over its three passes (max, sum of
 * exponentials, gradient), so the logits cross memory once; backward only scales this gradient. */
void nll_rows(float *logits, const int64_t *targets, int64_t N, int V, float *nll, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < N; i++) {
        float *x = logits + i * V;
        float top = row_max(x, V);
        __m256 t = _mm256_set1_ps(top), acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                                                   _mm256_setzero_ps()};
        int j = 0;
        for (; j + 32 <= V; j += 32)  /* four sums: the adds overlap, and each holds fewer terms */
            for (int a = 0; a < 4; a++)
                acc[a] = _mm256_add_ps(acc[a], exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8 * a), t)));
        double sum = (double)hsum(acc[0]) + hsum(acc[1]) + hsum(acc[2]) + hsum(acc[3]);
        for (; j < V; j++) sum += expf(x[j] - top);
        float lse = top + (float)log(sum);
        nll[i] = lse - x[targets[i]];
        __m256 l = _mm256_set1_ps(lse);
        for (j = 0; j + 8 <= V; j += 8) _mm256_storeu_ps(x + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), l)));
        for (; j < V; j++) x[j] = expf(x[j] - lse);
        x[targets[i]] -= 1.f;
    }
}

/* ---- the training step's elementwise layers, forward and backward (float32, rows split over the team) -------
 * Each replaces a chain of tensor ops (and their saved intermediates) with one pass over the rows. */

/* RMSNorm: y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), per row of D; rstd (N,) is kept for backward */
void rms_norm_fwd(const float *x, const float *w, float eps, int64_t N, int D, float *y, float *rstd, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < N; i++) {
        const float *xi = x + i * D;
        __m256 sq = _mm256_setzero_ps();
        int j = 0;
        for (; j + 8 <= D; j += 8) sq = _mm256_fmadd_ps(_mm256_loadu_ps(xi + j), _mm256_loadu_ps(xi + j), sq);
        float ss = hsum(sq);
        for (; j < D; j++) ss += xi[j] * xi[j];
        float r = 1.f / sqrtf(ss / D + eps);
        rstd[i] = r;
        for (j = 0; j < D; j++) y[i * D + j] = xi[j] * r * w[j];
    }
}

/* dx = rstd * (w dy - x rstd^2 mean(w dy x)) per row; dw (D,) = sum over rows of dy x rstd, unless dw is NULL */
void rms_norm_bwd(const float *x, const float *w, const float *rstd, const float *dy, int64_t N, int D, float *dx,
                  float *dw, int threads) {
    float *partial = dw ? calloc((size_t)threads * D, sizeof(float)) : NULL;  /* each thread's share of dw */
    #pragma omp parallel num_threads(threads)
    {
        float *mine = partial ? partial + (size_t)omp_get_thread_num() * D : NULL;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < N; i++) {
            const float *xi = x + i * D, *gi = dy + i * D;
            float r = rstd[i], dot = 0.f;
            for (int j = 0; j < D; j++) dot += w[j] * gi[j] * xi[j];
            float c = dot * r * r / D;
            for (int j = 0; j < D; j++) dx[i * D + j] = r * (w[j] * gi[j] - xi[j] * c);
            if (mine)
                for (int j = 0; j < D; j++) mine[j] += gi[j] * xi[j] * r;
        }
    }
    if (dw) {
        for (int j = 0; j < D; j++) {
            float s = 0.f;
            for (int t = 0; t < threads; t++) s += partial[(size_t)t * D + j];
            dw[j] = s;
        }
        free(partial);
    }
}

static inline __m256 sigmoid8(__m256 g) {
    __m256 one = _mm256_set1_ps(1.f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

/* SwiGLU: out (N, F) = silu(gate) * up for h (N, 2F) = [gate | up] (the fused projection's output) */
void swiglu_fwd(const float *h, int64_t N, int F, float *out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < N; i++) {
        const float *g = h + i * 2 * F, *u = g + F;
        float *o = out + i * F;
        int j = 0;
        for (; j + 8 <= F; j += 8) {
            __m256 gj = _mm256_loadu_ps(g + j);
            _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_mul_ps(gj, sigmoid8(gj)), _mm256_loadu_ps(u + j)));
        }
        for (; j < F; j++) o[j] = g[j] / (1.f + expf(-g[j])) * u[j];
    }
}

/* d gate = dout up s (1 + gate (1 - s)) with s = sigmoid(gate), d up = dout silu(gate): dh (N, 2F) */
void swiglu_bwd(const float *h, const float *dout, int64_t N, int F, float *dh, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < N; i++) {
        const float *g = h + i * 2 * F, *u = g + F, *d = dout + i * F;
        float *dg = dh + i * 2 * F, *du = dg + F;
        int j = 0;
        const __m256 one = _mm256_set1_ps(1.f);
        for (; j + 8 <= F; j += 8) {
            __m256 gj = _mm256_loadu_ps(g + j), s = sigmoid8(gj), dj = _mm256_loadu_ps(d + j);
            __m256 ds = _mm256_mul_ps(s, _mm256_fmadd_ps(gj, _mm256_sub_ps(one, s), one));  /* silu'(gate) */
            _mm256_storeu_ps(dg + j, _mm256_mul_ps(_mm256_mul_ps(dj, _mm256_loadu_ps(u + j)), ds));
            _mm256_storeu_ps(du + j, _mm256_mul_ps(dj, _mm256_mul_ps(gj, s)));
        }
        for (; j < F; j++) {
            float s = 1.f / (1.f + expf(-g[j]));
            dg[j] = d[j] * u[j] * s * (1.f + g[j] * (1.f - s));
            du[j] = d[j] * g[j] * s;
        }
    }
}

/* x (hs) rotated by the row's angles into out, or back (the transpose, for gradients): pairs (i, i + hs/2), sin's
 * first half negated as in model.rope_tables. hs a multiple of 16. */
static inline void rotate(const float *x, const float *cos, const float *sin, int hs, int back, float *out) {
    int half = hs / 2;
    for (int i = 0; i < half; i += 8) {
        __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + half + i);
        __m256 c1 = _mm256_loadu_ps(cos + i), c2 = _mm256_loadu_ps(cos + half + i);
        __m256 s1 = _mm256_loadu_ps(sin + i), s2 = _mm256_loadu_ps(sin + half + i);
        if (back) { __m256 t = s1; s1 = s2; s2 = t; }  /* forward: (x1 c1 + x2 s1, x2 c2 + x1 s2); back: s swapped */
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(x2, s1, _mm256_mul_ps(x1, c1)));
        _mm256_storeu_ps(out + half + i, _mm256_fmadd_ps(x1, s2, _mm256_mul_ps(x2, c2)));
    }
}

/* The fused Q/K/V projection's output (B, T, nh + 2 nkv, hs) -> q (B, nh, T, hs) and k (B, nkv, T, hs) rotated by
 * their row's angles (cos, sin (B, T, hs)), and v (B, nkv, T, hs): the heads' layout attention takes. With back
 * set, the reverse for gradients: dq, dk rotated back and dv gathered into dqkv (B, T, nh + 2 nkv, hs). */
void rope_heads(float *qkv, float *q, float *k, float *v, const float *cos, const float *sin, int B, int T, int nh,
                int nkv, int hs, int back, int threads) {
    int H = nh + 2 * nkv;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bt = 0; bt < (int64_t)B * T; bt++) {
        int64_t b = bt / T, t = bt % T;
        float *row = qkv + bt * H * hs;
        const float *c = cos + bt * hs, *s = sin + bt * hs;
        for (int h = 0; h < H; h++) {
            float *heads = h < nh ? q : h < nh + nkv ? k : v;
            int64_t hh = h < nh ? h : h < nh + nkv ? h - nh : h - nh - nkv, n = h < nh ? nh : nkv;
            float *at = heads + ((b * n + hh) * T + t) * hs;
            if (h >= nh + nkv) memcpy(back ? row + h * hs : at, back ? at : row + h * hs, sizeof(float) * hs);
            else if (back) rotate(at, c, s, hs, 1, row + h * hs);
            else rotate(row + h * hs, c, s, hs, 0, at);
        }
    }
}

/* ---- the training step's attention: causal softmax(Q K^T / sqrt(hs)) V, forward and backward ----------------
 * q (B, nh, T, hs), k and v (B, nkv, T, hs) contiguous, query head h reading kv head h / (nh / nkv). The output y is
 * (B, T, nh hs), the layout the output projection takes; lse (B, nh, T), each query's log-sum-exp, is kept for
 * backward. Queries go in blocks of ATT_ROWS, each against the keys up to its last position only (the causal
 * half is skipped but for the block's diagonal), the products through cblas sgemm on per-thread scratch rows. */
#define ATT_ROWS 64

/* row i of s (n keys, query at position p0 + i) -> its softmax over keys 0..p0+i, 0 past them; returns log-sum-exp */
static float causal_softmax_row(float *s, int n_valid, int n) {
    float top = row_max(s, n_valid);
    __m256 t = _mm256_set1_ps(top), acc = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n_valid; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), t));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    for (; j < n_valid; j++) sum += (s[j] = expf(s[j] - top));
    float inv = 1.f / sum;
    for (j = 0; j < n_valid; j++) s[j] *= inv;
    for (; j < n; j++) s[j] = 0.f;
    return top + logf(sum);
}

void attention_fwd(void *sgemm, const float *q, const float *k, const float *v, float *y, float *lse, int B, int nh,
                   int nkv, int T, int hs, int threads) {
    cblas_sgemm_fn gemm = (cblas_sgemm_fn)sgemm;
    int g = nh / nkv, blocks = (T + ATT_ROWS - 1) / ATT_ROWS;
    float scale = 1.f / sqrtf((float)hs);
    #pragma omp parallel num_threads(threads)
    {
        float *s = scratch(sizeof(float) * ATT_ROWS * T);
        #pragma omp for schedule(dynamic)
        for (int64_t u = 0; u < (int64_t)B * nh * blocks; u++) {  /* (row, query head, block), the longest first */
            int64_t bh = u / blocks, b = bh / nh, h = bh % nh;
            int p0 = (blocks - 1 - (int)(u % blocks)) * ATT_ROWS, rows = T - p0 < ATT_ROWS ? T - p0 : ATT_ROWS;
            int n = p0 + rows;  /* keys this block sees */
            const float *Q = q + (bh * T + p0) * hs;
            const float *K = k + (b * nkv + h / g) * T * hs, *V = v + (b * nkv + h / g) * T * hs;
            gemm(ROW_MAJOR, NO_TRANS, TRANS, rows, n, hs, scale, Q, hs, K, hs, 0.f, s, n);  /* (rows, n) */
            for (int i = 0; i < rows; i++) lse[bh * T + p0 + i] = causal_softmax_row(s + (int64_t)i * n, p0 + i + 1, n);
            gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, rows, hs, n, 1.f, s, n, V, hs, 0.f,
                 y + ((b * T + p0) * nh + h) * hs, (int64_t)nh * hs);  /* (rows, hs) into y's rows */
        }
        free(s);
    }
}

/* dy (B, T, nh hs) -> dq (B, nh, T, hs), dk and dv (B, nkv, T, hs), from the forward's inputs, output y and lse.
 * Per block: P again from Q K^T and lse, dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO y)) / sqrt(hs),
 * dQ = dS K, dK += dS^T Q. A kv head's query heads all add into its dK and dV: one thread takes the lot. */
void attention_bwd(void *sgemm, const float *q, const float *k, const float *v, const float *y, const float *lse,
                   const float *dy, float *dq, float *dk, float *dv, int B, int nh, int nkv, int T, int hs,
                   int threads) {
    cblas_sgemm_fn gemm = (cblas_sgemm_fn)sgemm;
    int g = nh / nkv, blocks = (T + ATT_ROWS - 1) / ATT_ROWS;
    float scale = 1.f / sqrtf((float)hs);
    #pragma omp parallel num_threads(threads)
    {
        float *p = scratch(sizeof(float) * ATT_ROWS * T), *dp = scratch(sizeof(float) * ATT_ROWS * T);
        #pragma omp for schedule(dynamic)
        for (int64_t bk = 0; bk < (int64_t)B * nkv; bk++) {
            int64_t b = bk / nkv;
            const float *K = k + bk * T * hs, *V = v + bk * T * hs;
            float *dK = dk + bk * T * hs, *dV = dv + bk * T * hs;
            memset(dK, 0, sizeof(float) * T * hs);
            memset(dV, 0, sizeof(float) * T * hs);
            for (int64_t h = (bk % nkv) * g; h < (bk % nkv + 1) * g; h++) {
                int64_t bh = b * nh + h;
                for (int p0 = 0; p0 < T; p0 += ATT_ROWS) {
                    int rows = T - p0 < ATT_ROWS ? T - p0 : ATT_ROWS, n = p0 + rows;
                    const float *Q = q + (bh * T + p0) * hs;
                    const float *dO = dy + ((b * T + p0) * nh + h) * hs, *O = y + ((b * T + p0) * nh + h) * hs;
                    int64_t ld = (int64_t)nh * hs;
                    gemm(ROW_MAJOR, NO_TRANS, TRANS, rows, n, hs, scale, Q, hs, K, hs, 0.f, p, n);
                    for (int i = 0; i < rows; i++) {  /* P = exp(S - lse), 0 past the query's position */
                        float *pi = p + (int64_t)i * n, l = lse[bh * T + p0 + i];
                        int valid = p0 + i + 1, j = 0;
                        for (; j + 8 <= valid; j += 8)
                            _mm256_storeu_ps(pi + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(pi + j), _mm256_set1_ps(l))));
                        for (; j < valid; j++) pi[j] = expf(pi[j] - l);
                        for (; j < n; j++) pi[j] = 0.f;
                    }
                    gemm(ROW_MAJOR, TRANS, NO_TRANS, n, hs, rows, 1.f, p, n, dO, ld, 1.f, dV, hs);   /* dV += P^T dO */
                    gemm(ROW_MAJOR, NO_TRANS, TRANS, rows, n, hs, 1.f, dO, ld, V, hs, 0.f, dp, n);   /* dP = dO V^T */
                    for (int i = 0; i < rows; i++) {  /* dS = P (dP - dO . O) scale, in dp */
                        float *pi = p + (int64_t)i * n, *di = dp + (int64_t)i * n, dot = 0.f;
                        for (int d = 0; d < hs; d++) dot += dO[i * ld + d] * O[i * ld + d];
                        for (int j = 0; j < n; j++) di[j] = pi[j] * (di[j] - dot) * scale;
                    }
                    gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, rows, hs, n, 1.f, dp, n, K, hs, 0.f,
                         dq + (bh * T + p0) * hs, hs);                                               /* dQ = dS K */
                    gemm(ROW_MAJOR, TRANS, NO_TRANS, n, hs, rows, 1.f, dp, n, Q, hs, 1.f, dK, hs);   /* dK += dS^T Q */
                }
            }
        }
        free(p);
        free(dp);
    }
}
