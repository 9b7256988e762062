/* Paged attention on the CPU, reading the KV cache in place through the block table.
 *
 * The Driver contract (drivers/base.py): q [T, H, D]; k_cache, v_cache
 * [num_blocks, block_size, Hkv, D]; block_tables [S, max_blocks] int32; seq_lens [S] and
 * query_start_loc [S+1] int32. New token j of sequence s (q_len new tokens) sits at
 * position seq_len - q_len + j and attends to positions 0..that one. Query head h uses
 * KV head h / G, G = H / Hkv. q, the caches and the output share one dtype: float32 or
 * bfloat16 (widened by shifting its bits; the output rounded to nearest even).
 *
 * The work, in order:
 *   1. check the metadata (a caller's mistake returns an error code, never a crash);
 *   2. cut it into tiles: a (sequence, run of new tokens, run of KV heads), whose rows
 *      are its tokens times its KV heads' query heads, so every K/V row fetched serves
 *      the G heads of its group and every token of the tile;
 *   3. when tiles are too few for the threads, cut a tile's keys into parts
 *      (flash-decoding); an item is one part of one tile;
 *   4. per item, in parallel: visit its keys a chunk of positions at a time, each found
 *      through the block table; per chunk, per KV head, fold the keys into every row of
 *      the head with an online softmax (running max and sum, float32 accumulation);
 *   5. merge the parts of split tiles.
 * Only positions below seq_len are read and only the table entries that cover them, so
 * free blocks (NaN in debug mode) and garbage past a sequence's blocks never leak in.
 * Nothing gathers a sequence's KV: float32 rows are read where they lie, or (bf16, or a
 * tile with many rows per head: COPY_ROWS) one chunk of one head is copied to a buffer.
 *
 * Why a decode tile holds all the KV heads: a block is [block_size, Hkv, D], so one
 * head's rows lie Hkv * D apart. Read head by head over the whole context, that stride
 * streamed at a third of the memory bandwidth of reading block by block, all heads
 * (2.5 against 8 GB/s, one core of the 2-core EPYC these were measured on); a tile of all
 * heads reads one block's heads one after the other while the block is in cache.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK_MAX 64        /* key positions per step: a block, but 16 at least and 64 at most */
#define ROWS 64             /* query rows per tile (tokens x heads): a tile's q and output
                               stay in L2 while each K/V row serves them all */
#define COPY_ROWS 8         /* rows of one KV head in a tile from which its K/V rows are
                               copied to a dense buffer: rows Hkv * D apart (4 KB for 8 x 128
                               floats) share L1 sets and evict one another before reuse */
#define PART_MIN 256        /* fewest keys worth a part of their own (the merge costs a pass) */
#define ITEMS_PER_THREAD 4  /* split tiles until there are this many items per thread */
#define WORK_PER_THREAD (1 << 20)  /* fewest query-key products x D worth a thread (~0.1 ms):
                                      waking and joining one costs more on smaller calls */

enum { PA_OK, PA_BAD_SHAPE, PA_BAD_QUERY_START, PA_BAD_SEQ_LEN, PA_BAD_BLOCK, PA_NO_MEMORY };

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline v8f splat8(float x) { return (v8f){0} + x; }
/* Per lane: mask ? a : b (mask lanes all ones or all zeros, as comparisons make them). */
static inline v8f select8(v8i mask, v8f a, v8f b)
{
    return (v8f)(((v8i)a & mask) | ((v8i)b & ~mask));
}
static inline float hsum8(v8f v)
{
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

#if defined(__AVX__)
#include <immintrin.h>
/* The lane sums of a0..a7, in that order, in one vector. */
static inline v8f hsum8x8(v8f a0, v8f a1, v8f a2, v8f a3, v8f a4, v8f a5, v8f a6, v8f a7)
{
    __m256 t0 = _mm256_hadd_ps((__m256)a0, (__m256)a1), t1 = _mm256_hadd_ps((__m256)a2, (__m256)a3);
    __m256 t2 = _mm256_hadd_ps((__m256)a4, (__m256)a5), t3 = _mm256_hadd_ps((__m256)a6, (__m256)a7);
    t0 = _mm256_hadd_ps(t0, t1);      /* a0..a3: low halves' sums, then high halves' */
    t2 = _mm256_hadd_ps(t2, t3);      /* a4..a7 likewise */
    return (v8f)_mm256_add_ps(_mm256_permute2f128_ps(t0, t2, 0x20),
                              _mm256_permute2f128_ps(t0, t2, 0x31));
}
#else
static inline v8f hsum8x8(v8f a0, v8f a1, v8f a2, v8f a3, v8f a4, v8f a5, v8f a6, v8f a7)
{
    return (v8f){hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3),
                 hsum8(a4), hsum8(a5), hsum8(a6), hsum8(a7)};
}
#endif

static inline float bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)     /* NaN: keep it a (quiet) NaN */
        return (uint16_t)((bits >> 16) | 0x40u);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* e^x for x <= 0, per lane (Cephes' polynomial, ~2 ulp). Below -87 it returns e^-87
 * (~1e-38, nothing next to the row maximum's 1); NaN stays NaN. */
static inline v8f exp8(v8f x)
{
    x = select8(x < -87.0f, splat8(-87.0f), x);
    v8f shifted = x * 1.44269504088896341f + 12582912.0f;    /* 1.5 * 2^23: rounds */
    v8f n = shifted - 12582912.0f;
    v8f r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    v8f p = splat8(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    v8u e = ((v8u)shifted - 0x4b400000u + 127u) << 23;       /* n sits in the low bits */
    return p * (v8f)e;
}

static inline float exp1(float x) { return exp8(splat8(x))[0]; }

typedef struct {
    const void *q, *k, *v;
    void *out;
    const int32_t *tables, *seq_lens, *starts;   /* starts: query_start_loc */
    int S, max_blocks, block_size, H, Hkv, D, G;
    int Dp;           /* D rounded up to 8: rows in scratch are padded with zeros */
    int chunk;        /* key positions per step */
    int bf16;
    int in_place;     /* float32 rows of a multiple of 8 can be read from the cache as they
                         are; others are widened (bf16) or padded into a buffer */
    float scale;
} Problem;

typedef struct {
    int s, t0, nq;        /* sequence; its new tokens t0..t0+nq-1 */
    int h0, nh;           /* KV heads h0..h0+nh-1 */
    int first, parts;     /* its items: first index and count */
} Tile;
/* A tile's row r is token i = r / G % nq and query head (h0 + r / (G * nq)) * G + r % G. */

typedef struct {
    int tile, lo, hi;     /* key positions [lo, hi) of the tile */
    float *partial;       /* parts > 1: [rows, Dp + 2]: unnormalized output, max, sum */
} Item;

/* One thread's working memory, kept between calls (OpenMP threads persist). */
typedef struct {
    size_t rows, Dp;
    float *q, *acc, *m, *l;   /* [rows, Dp] scaled queries and outputs; [rows] max, sum */
    float *s;                 /* [CHUNK_MAX] one row's scores, then probabilities */
    float *kbuf, *vbuf;       /* [CHUNK_MAX, Dp] rows widened from bf16 or padded */
    const float *krow[CHUNK_MAX], *vrow[CHUNK_MAX];
    int64_t slots[CHUNK_MAX];
} Scratch;

static _Thread_local Scratch scratch;

static Scratch *get_scratch(size_t rows, size_t Dp)
{
    Scratch *w = &scratch;
    if (w->q && w->rows >= rows && w->Dp == Dp)
        return w;
    free(w->q);
    size_t n = 2 * rows * Dp + 2 * rows + CHUNK_MAX + 2 * (size_t)CHUNK_MAX * Dp;
    w->q = malloc(n * sizeof(float));
    if (!w->q)
        return NULL;
    w->rows = rows;
    w->Dp = Dp;
    w->acc = w->q + rows * Dp;
    w->m = w->acc + rows * Dp;
    w->l = w->m + rows;
    w->s = w->l + rows;
    w->kbuf = w->s + CHUNK_MAX;
    w->vbuf = w->kbuf + (size_t)CHUNK_MAX * Dp;
    return w;
}

static int q_len_of(const Problem *p, int s) { return p->starts[s + 1] - p->starts[s]; }

/* Row `count` elements from src at element offset off, widened to float32, zero-padded. */
static void widen(float *dst, const void *src, int64_t off, int count, int padded, int bf16)
{
    if (bf16) {
        const uint16_t *h = (const uint16_t *)src + off;
        for (int d = 0; d < count; d++)
            dst[d] = bf16_to_f32(h[d]);
    } else {
        memcpy(dst, (const float *)src + off, (size_t)count * sizeof(float));
    }
    for (int d = count; d < padded; d++)
        dst[d] = 0.0f;
}

/* The slots of positions c..c+cn-1 of sequence s, walking its block table. */
static void find_slots(const Problem *p, int s, int c, int cn, int64_t *slots)
{
    const int32_t *table = p->tables + (int64_t)s * p->max_blocks;
    int bs = p->block_size, b = c / bs, off = c % bs;
    for (int t = 0; t < cn; t++) {
        slots[t] = (int64_t)table[b] * bs + off;
        if (++off == bs)
            off = 0, b++;
    }
}

/* Point krow/vrow at KV head kvh's rows in the given slots: in the cache, or copied. */
static void fetch_rows(const Problem *p, const int64_t *slots, int kvh, int cn, int copy,
                       Scratch *w)
{
    for (int t = 0; t < cn; t++) {
        int64_t off = (slots[t] * p->Hkv + kvh) * p->D;
        if (!copy) {
            w->krow[t] = (const float *)p->k + off;
            w->vrow[t] = (const float *)p->v + off;
        } else {
            float *kd = w->kbuf + (size_t)t * p->Dp, *vd = w->vbuf + (size_t)t * p->Dp;
            widen(kd, p->k, off, p->D, p->Dp, p->bf16);
            widen(vd, p->v, off, p->D, p->Dp, p->bf16);
            w->krow[t] = kd;
            w->vrow[t] = vd;
        }
    }
}

/* s[t] = q . k[t] for t < n, eight keys at a time so eight FMA chains run side by side;
 * returns the largest of m and the scores (NaN scores are passed over: see attend_row).
 * Not inlined (nor accumulate): inlined into run_item, its row pointers were spilled. */
__attribute__((noinline))
static float scores(float *s, const float *q, const float *const *k, int n, int Dp, float m)
{
    v8f top = splat8(m);
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
        for (int d = 0; d < Dp; d += 8) {
            v8f x = load8(q + d);
            a0 += x * load8(k[t] + d);
            a1 += x * load8(k[t + 1] + d);
            a2 += x * load8(k[t + 2] + d);
            a3 += x * load8(k[t + 3] + d);
            a4 += x * load8(k[t + 4] + d);
            a5 += x * load8(k[t + 5] + d);
            a6 += x * load8(k[t + 6] + d);
            a7 += x * load8(k[t + 7] + d);
        }
        v8f sum = hsum8x8(a0, a1, a2, a3, a4, a5, a6, a7);
        store8(s + t, sum);
        top = select8(sum > top, sum, top);
    }
    for (int i = 0; i < 8; i++)
        m = top[i] > m ? top[i] : m;
    for (; t < n; t++) {
        v8f a = {0};
        for (int d = 0; d < Dp; d += 8)
            a += load8(q + d) * load8(k[t] + d);
        s[t] = hsum8(a);
        m = s[t] > m ? s[t] : m;
    }
    return m;
}

/* s[t] = e^(s[t] - m) for t < n; returns their sum. */
static float exponentiate(float *s, int n, float m)
{
    v8f sum8 = {0};
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        v8f e = exp8(load8(s + t) - m);
        store8(s + t, e);
        sum8 += e;
    }
    float sum = hsum8(sum8);
    for (; t < n; t++) {
        s[t] = exp1(s[t] - m);
        sum += s[t];
    }
    return sum;
}

/* acc += sum over t < n of p[t] * v[t]; 64 columns at a time held in registers. */
__attribute__((noinline))
static void accumulate(float *acc, const float *p, const float *const *v, int n, int Dp)
{
    int d = 0;
    for (; d + 64 <= Dp; d += 64) {
        v8f a[8];
        for (int i = 0; i < 8; i++)
            a[i] = load8(acc + d + 8 * i);
        for (int t = 0; t < n; t++) {
            v8f pt = splat8(p[t]);
            const float *vt = v[t] + d;
            for (int i = 0; i < 8; i++)
                a[i] += pt * load8(vt + 8 * i);
        }
        for (int i = 0; i < 8; i++)
            store8(acc + d + 8 * i, a[i]);
    }
    for (; d < Dp; d += 8) {
        v8f a = load8(acc + d);
        for (int t = 0; t < n; t++)
            a += splat8(p[t]) * load8(v[t] + d);
        store8(acc + d, a);
    }
}

/* Fold keys 0..n-1 of the fetched chunk into row r's running max, sum and output. A NaN
 * key (a poisoned block still in use) makes a NaN score, which the max passes over and
 * the exponential keeps: the row's output turns NaN, so a use-after-free shows. */
static void attend_row(Scratch *w, int r, int n, int Dp)
{
    float *s = w->s, *acc = w->acc + (size_t)r * Dp;
    float mx = scores(s, w->q + (size_t)r * Dp, w->krow, n, Dp, w->m[r]);
    if (mx > w->m[r]) {
        float corr = exp1(w->m[r] - mx);     /* ~0 on the first keys: m starts at -inf */
        w->l[r] *= corr;
        for (int d = 0; d < Dp; d++)
            acc[d] *= corr;
        w->m[r] = mx;
    }
    w->l[r] += exponentiate(s, n, mx);
    accumulate(acc, s, w->vrow, n, Dp);
}

/* Where a tile's row r lives in q and in the output: an element offset. */
static int64_t row_offset(const Problem *p, const Tile *tile, int r)
{
    int g = r % p->G, i = r / p->G % tile->nq, head = tile->h0 + r / (p->G * tile->nq);
    int64_t token = (int64_t)p->starts[tile->s] + tile->t0 + i;
    return (token * p->H + (int64_t)head * p->G + g) * p->D;
}

static void load_queries(const Problem *p, const Tile *tile, int rows, Scratch *w)
{
    for (int r = 0; r < rows; r++) {
        float *dst = w->q + (size_t)r * p->Dp;
        widen(dst, p->q, row_offset(p, tile, r), p->D, p->Dp, p->bf16);
        for (int d = 0; d < p->D; d++)
            dst[d] *= p->scale;
    }
}

/* Output row r of the tile: x[0..D-1] * inv, written in the problem's dtype. */
static void write_row(const Problem *p, const Tile *tile, int r, const float *x, float inv)
{
    int64_t off = row_offset(p, tile, r);
    if (p->bf16) {
        uint16_t *o = (uint16_t *)p->out + off;
        for (int d = 0; d < p->D; d++)
            o[d] = f32_to_bf16(x[d] * inv);
    } else {
        float *o = (float *)p->out + off;
        for (int d = 0; d < p->D; d++)
            o[d] = x[d] * inv;
    }
}

static void run_item(const Problem *p, const Tile *tile, const Item *item, Scratch *w)
{
    int G = p->G, Dp = p->Dp, nq = tile->nq, rows = tile->nh * nq * G;
    int copy = !p->in_place || nq * G >= COPY_ROWS;
    int first_pos = p->seq_lens[tile->s] - q_len_of(p, tile->s) + tile->t0;  /* token 0's */
    load_queries(p, tile, rows, w);
    for (int r = 0; r < rows; r++) {
        w->m[r] = -INFINITY;
        w->l[r] = 0.0f;
        memset(w->acc + (size_t)r * Dp, 0, (size_t)Dp * sizeof(float));
    }
    int end = first_pos + nq;                /* the last token sees keys below this */
    if (end > item->hi)
        end = item->hi;
    for (int c = item->lo; c < end; c += p->chunk) {
        int cn = end - c < p->chunk ? end - c : p->chunk;
        find_slots(p, tile->s, c, cn, w->slots);
        for (int h = 0; h < tile->nh; h++) {
            fetch_rows(p, w->slots, tile->h0 + h, cn, copy, w);
            for (int i = 0; i < nq; i++) {
                int n = first_pos + i + 1 - c;   /* causal: keys up to the token's position */
                if (n <= 0)
                    continue;
                for (int g = 0; g < G; g++)
                    attend_row(w, (h * nq + i) * G + g, n < cn ? n : cn, Dp);
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        const float *acc = w->acc + (size_t)r * Dp;
        if (tile->parts == 1) {
            write_row(p, tile, r, acc, 1.0f / w->l[r]);
        } else {
            float *part = item->partial + (size_t)r * (Dp + 2);
            memcpy(part, acc, (size_t)Dp * sizeof(float));
            part[Dp] = w->m[r];
            part[Dp + 1] = w->l[r];
        }
    }
}

/* Combine a split tile's parts: each row's outputs weighted by e^(max_i - max). */
static void merge_tile(const Problem *p, const Tile *tile, const Item *items, float *out)
{
    int Dp = p->Dp, rows = tile->nh * tile->nq * p->G;
    for (int r = 0; r < rows; r++) {
        float mx = -INFINITY, sum = 0.0f;
        for (int i = 0; i < tile->parts; i++) {
            float m = items[tile->first + i].partial[(size_t)r * (Dp + 2) + Dp];
            mx = m > mx ? m : mx;
        }
        memset(out, 0, (size_t)Dp * sizeof(float));
        for (int i = 0; i < tile->parts; i++) {
            const float *part = items[tile->first + i].partial + (size_t)r * (Dp + 2);
            float weight = part[Dp] == -INFINITY ? 0.0f : exp1(part[Dp] - mx);  /* none seen */
            sum += weight * part[Dp + 1];
            for (int d = 0; d < Dp; d++)
                out[d] += weight * part[d];
        }
        write_row(p, tile, r, out, 1.0f / sum);
    }
}

/* Step 1: every table entry read must name a block; *bad is the sequence at fault. */
static int check(const Problem *p, int T, int num_blocks, int32_t *bad)
{
    if (p->starts[0] != 0 || p->starts[p->S] != T)
        return *bad = -1, PA_BAD_QUERY_START;
    for (int s = 0; s < p->S; s++) {
        *bad = s;
        int q_len = q_len_of(p, s), len = p->seq_lens[s];
        if (q_len < 0)
            return PA_BAD_QUERY_START;
        if (len < q_len || len > (int64_t)p->max_blocks * p->block_size)
            return PA_BAD_SEQ_LEN;
        if (q_len == 0)
            continue;                          /* nothing of it is read */
        const int32_t *table = p->tables + (int64_t)s * p->max_blocks;
        for (int b = 0; b < (len + p->block_size - 1) / p->block_size; b++)
            if (table[b] < 0 || table[b] >= num_blocks)
                return PA_BAD_BLOCK;
    }
    return PA_OK;
}

/* A tile's shape for a sequence of q_len new tokens: up to ROWS rows, tokens first, then
 * as many KV heads as fit (all of them, for a decode tile, when G <= ROWS / Hkv). */
static void tile_shape(const Problem *p, int q_len, int *qt, int *nh)
{
    int per_group = ROWS / p->G > 0 ? ROWS / p->G : 1;     /* tokens x heads per KV head */
    *qt = q_len < per_group ? q_len : per_group;
    *nh = per_group / *qt > 0 ? per_group / *qt : 1;
    if (*nh > p->Hkv)
        *nh = p->Hkv;
}

/* Cut [0, keys) into `parts` runs of whole chunks for a tile's items. */
static void split_keys(const Problem *p, Tile *tile, int index, int keys, Item *items)
{
    int chunks = (keys + p->chunk - 1) / p->chunk;
    int step = (chunks + tile->parts - 1) / tile->parts * p->chunk;
    for (int j = 0; j < tile->parts; j++) {
        Item *it = &items[tile->first + j];
        it->tile = index;
        it->lo = j * step < keys ? j * step : keys;      /* rounding can leave a part empty */
        it->hi = (j + 1) * step < keys && j < tile->parts - 1 ? (j + 1) * step : keys;
        it->partial = NULL;
    }
}

/* Steps 2 and 3: tiles, then items; returns the number of tiles, or -1 without memory. */
static int plan(const Problem *p, int threads, Tile **tiles_out, Item **items_out, int *n_items)
{
    int n_tiles = 0, qt, nh;
    for (int s = 0; s < p->S; s++) {
        if (q_len_of(p, s) == 0)
            continue;
        tile_shape(p, q_len_of(p, s), &qt, &nh);
        n_tiles += (q_len_of(p, s) + qt - 1) / qt * ((p->Hkv + nh - 1) / nh);
    }
    Tile *tiles = malloc(((size_t)n_tiles + 1) * sizeof *tiles);
    if (!tiles)
        return -1;
    int want = threads * ITEMS_PER_THREAD, split = threads > 1 && n_tiles < 2 * threads;
    int k = 0, items = 0;
    for (int s = 0; s < p->S; s++) {
        int q_len = q_len_of(p, s);
        if (q_len == 0)
            continue;
        tile_shape(p, q_len, &qt, &nh);
        for (int t0 = 0; t0 < q_len; t0 += qt)
            for (int h0 = 0; h0 < p->Hkv; h0 += nh) {
                Tile *tile = &tiles[k++];
                tile->s = s, tile->t0 = t0, tile->h0 = h0;
                tile->nq = q_len - t0 < qt ? q_len - t0 : qt;
                tile->nh = p->Hkv - h0 < nh ? p->Hkv - h0 : nh;
                int keys = p->seq_lens[s] - q_len + t0 + tile->nq, most = keys / PART_MIN;
                int parts = split ? (want + n_tiles - 1) / n_tiles : 1;
                tile->parts = parts < most ? parts : most > 1 ? most : 1;
                tile->first = items;
                items += tile->parts;
            }
    }
    Item *item = malloc(((size_t)items + 1) * sizeof *item);
    if (!item)
        return free(tiles), -1;
    for (int i = 0; i < n_tiles; i++) {
        Tile *t = &tiles[i];
        split_keys(p, t, i, p->seq_lens[t->s] - q_len_of(p, t->s) + t->t0 + t->nq, item);
    }
    *tiles_out = tiles, *items_out = item, *n_items = items;
    return n_tiles;
}

/* The entry point: returns PA_OK, or an error code with *bad the sequence at fault
 * (-1: none in particular). out is written only on PA_OK. */
int llmos_paged_attention(const void *q, const void *k_cache, const void *v_cache, void *out,
                          const int32_t *block_tables, const int32_t *seq_lens,
                          const int32_t *query_start_loc, int32_t T, int32_t S,
                          int32_t max_blocks, int32_t num_blocks, int32_t block_size,
                          int32_t H, int32_t Hkv, int32_t D, int32_t bf16, float scale,
                          int32_t threads, int32_t *bad)
{
    *bad = -1;
    if (S < 0 || T < 0 || max_blocks < 0 || block_size < 1 || Hkv < 1 || H % Hkv || D < 1)
        return PA_BAD_SHAPE;
    int chunk = block_size < 16 ? 16 : block_size < CHUNK_MAX ? block_size : CHUNK_MAX;
    Problem p = {q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
                 S, max_blocks, block_size, H, Hkv, D, H / Hkv, (D + 7) / 8 * 8, chunk,
                 bf16 != 0, !bf16 && D % 8 == 0, scale};
    int rc = check(&p, T, num_blocks, bad);
    if (rc != PA_OK || T == 0)
        return rc;
    *bad = -1;
    double work = 0;
    for (int s = 0; s < S; s++)
        work += (double)q_len_of(&p, s) * seq_lens[s] * H * D;
    if (threads > 1 + work / WORK_PER_THREAD)
        threads = 1 + (int)(work / WORK_PER_THREAD);
    if (threads < 1)
        threads = 1;
    Tile *tiles;
    Item *items;
    int n_items, n_tiles = plan(&p, threads, &tiles, &items, &n_items);
    if (n_tiles < 0)
        return PA_NO_MEMORY;
    int rows = ROWS > p.G ? ROWS : p.G;      /* the most any tile has */
    size_t part_floats = (size_t)rows * (p.Dp + 2);
    float *partials = NULL;
    if (n_items > n_tiles) {
        partials = malloc((size_t)n_items * part_floats * sizeof(float));
        if (!partials)
            return free(tiles), free(items), PA_NO_MEMORY;
        for (int i = 0; i < n_items; i++)
            if (tiles[items[i].tile].parts > 1)
                items[i].partial = partials + (size_t)i * part_floats;
    }
    int failed = 0;
    if (threads > n_items)
        threads = n_items;
#pragma omp parallel num_threads(threads)
    {
        Scratch *w = get_scratch(rows, p.Dp);
        if (!w) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_items; i++)
            if (w)
                run_item(&p, &tiles[items[i].tile], &items[i], w);
        if (partials) {
#pragma omp for schedule(dynamic, 1)
            for (int i = 0; i < n_tiles; i++)
                if (w && tiles[i].parts > 1)
                    merge_tile(&p, &tiles[i], items, w->acc);
        }
    }
    free(partials);
    free(tiles);
    free(items);
    return failed ? PA_NO_MEMORY : PA_OK;
}
