/*
 * PAMR on the CPU: the affinity pass and the fused propagation sweeps, float32.
 *
 * Built on first use by naclip_kernels/native.py with the system C compiler (-O3 -march=native where it works)
 * and called through ctypes, which releases the GIL: Python threads run disjoint slices of the work in parallel.
 * The maths is SPEC.md section 3; naclip_kernels/ops/pamr.py documents the layouts these functions expect.
 *
 * Why a compiled kernel: one sweep is out_c(p) = sum_n a(p, n) m_c(p + o_n) over 8 L neighbours. As eager
 * tensor ops that is 8 L multiply-add passes over the mask, each streaming three operands and a result through
 * the caches. Here the 8 L-term sum stays in vector registers for NK_CB channels at once, so each affinity vector
 * loaded from memory feeds NK_CB fused multiply-adds and the mask row is written once per sweep.
 *
 * Sweeps in place, by residue classes of rows: every tap's row offset is a multiple of g = gcd(dilations) (8 for
 * NACLIP's (8, 16)), so rows y = rho (mod g) read only rows of their own class, apart from the border rows 0 and
 * H - 1 that clamped taps read. A sweep therefore runs class by class: the previous sweep's values of the rows
 * y - pad .. y + pad of the class, 2 pad / g + 1 rows, are copied (with replicate-padded border columns) into a
 * ring, so the vector loop reads every neighbour unclamped and row y is overwritten as soon as it is computed.
 * The border rows are saved before the sweep. Rings hold 5 rows per channel for (8, 16), not 33, so the rings
 * of dozens of channels fit in one core's L2 cache, and classes split across threads without any thread waiting
 * for another within a sweep.
 *
 * Several sweeps per pass: sweep l + 1 of a class runs pad rows behind sweep l, reading sweep l's rows from a ring
 * of its own, so a pass of T sweeps reads and writes each mask row once. The clamped taps of sweep l read rows 0
 * and H - 1 after l - 1 sweeps; those come from sweeping short strips at the top and bottom first
 * (nk_pamr_border_history_f32).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(_WIN32)
#define NK_YIELD() ((void)0) /* no sched_yield: the barrier keeps spinning */
#else
#include <sched.h>
#define NK_YIELD() ((void)sched_yield())
#endif

#ifndef NK_VL
#if defined(__AVX512F__)
#define NK_VL 16 /* floats per vector: one zmm */
#else
#define NK_VL 8  /* one ymm (AVX2), two q registers (NEON), or whatever the compiler lowers it to */
#endif
#endif
/* Channels accumulated together: NK_CB accumulators + the affinity + one load fit the register file (16
 * accumulators in 32 zmm registers, 8 in 16 ymm). More channels per affinity vector means fewer affinity bytes per
 * multiply-add, the term that decides the sweep's speed once the rows come from the L2 cache. */
#ifndef NK_CB
#if defined(__AVX512F__)
#define NK_CB 16
#else
#define NK_CB 8
#endif
#endif
#define NK_ABI 4

typedef float vf __attribute__((vector_size(NK_VL * sizeof(float))));

static inline vf load_v(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store_v(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int nk_abi_version(void) { return NK_ABI; }
int nk_vector_width(void) { return NK_VL; }
int nk_channel_block(void) { return NK_CB; }

/* ---------------------------------------------------------------------------------------------------------- */
/* Barrier                                                                                                     */
/* ---------------------------------------------------------------------------------------------------------- */

/*
 * The barrier between the phases of one PAMR call (naclip_kernels/ops/pamr.py, _run_phases): `parties` Python
 * threads call it with the GIL released (ctypes) and return together. state: int64[3] zeroed before the first
 * wait: arrivals, generation, aborted. Returns 0, or -1 once nk_barrier_abort was called (a job of another thread
 * failed). The waiters spin a short while, then yield: phases are 0.05-100 ms, and a Python barrier's wake-up
 * (~35 us on the dev VM) cost 1-2% of a small call.
 */
int nk_barrier_wait(int64_t *state, int parties)
{
    const int64_t generation = __atomic_load_n(&state[1], __ATOMIC_ACQUIRE);
    if (__atomic_load_n(&state[2], __ATOMIC_ACQUIRE))
        return -1;
    if (__atomic_add_fetch(&state[0], 1, __ATOMIC_ACQ_REL) == parties) {
        __atomic_store_n(&state[0], 0, __ATOMIC_RELAXED);
        __atomic_store_n(&state[1], generation + 1, __ATOMIC_RELEASE);
        return 0;
    }
    for (int spins = 0; __atomic_load_n(&state[1], __ATOMIC_ACQUIRE) == generation;) {
        if (__atomic_load_n(&state[2], __ATOMIC_ACQUIRE))
            return -1;
        if (spins < 4096) {
            spins++;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        } else {
            NK_YIELD();
        }
    }
    return 0;
}

void nk_barrier_abort(int64_t *state) { __atomic_store_n(&state[2], 1, __ATOMIC_RELEASE); }

/* Affinities are stored pixel-vector-major, [H, ceil(W / NK_VL), n_taps, NK_VL]: the n_taps vectors one output
 * vector needs are one contiguous block, so each row is a single sequential stream for the hardware prefetcher
 * (a [n_taps, H, W] layout is n_taps streams per row, which it does not follow). A row's last block is whole;
 * its lanes past W hold finite values and are never used for a stored output. */
static inline int64_t affinity_row_floats(int W, int n_taps) { return round_up(W, NK_VL) * n_taps; }
int64_t nk_affinity_floats(int H, int W, int n_taps) { return (int64_t)H * affinity_row_floats(W, n_taps); }

/* Left border of a ring row: at least pad columns, rounded up to 16 floats so interior rows start 64-byte
 * aligned (dilations that are multiples of 8, NACLIP's (8, 16), then give 32-byte aligned loads). */
static inline int64_t ring_left(int pad) { return round_up(pad > 0 ? pad : 1, 16); }
/* Floats per ring row: the left border, W rounded up to whole vectors, pad columns on the right. */
int64_t nk_ring_row_floats(int W, int pad) { return round_up(ring_left(pad) + round_up(W, NK_VL) + pad, 16); }

/* ---------------------------------------------------------------------------------------------------------- */
/* Affinity                                                                                                    */
/* ---------------------------------------------------------------------------------------------------------- */

typedef int32_t vi __attribute__((vector_size(NK_VL * sizeof(int32_t))));

static inline vf splat(float x) { return (vf){0} + x; }
/* Lane-wise choice m ? a : b for a comparison mask m (all ones or zeros per lane); C has no vector ?:. */
static inline vf select_v(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf max_v(vf a, vf b) { return select_v(a > b, a, b); }
static inline vf abs_v(vf a) { return (vf)((vi)a & ((vi){0} + 0x7fffffff)); }

/* exp(x) per lane for the softmax, x <= 0 (arguments minus their maximum): Cody-Waite reduction by ln 2 and
 * Cephes' degree-6 polynomial, ~1 ulp (libm's expf is a scalar call). Arguments below -87 are clamped there
 * (e^-87 ~ 1.6e-38, the smallest normal scale): such weights are negligible next to the maximum's weight 1. */
static inline vf exp_v(vf x)
{
    x = max_v(x, splat(-87.0f));
    vf n = x * 1.44269504088896341f + 12582912.0f; /* + 1.5 * 2^23 rounds to the nearest integer */
    n -= 12582912.0f;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

/*
 * aff[n, y, x] = softmax_n( -(1/K) sum_k |d_kn| / (1e-8 + 0.1 std_k) ),  d_kn = x_k(p + o_n) - x_k(p),
 * for rows y0 <= y < y1. std_k is the unbiased spread of the 9 L samples (the L centre samples deviate by 0):
 * the two-pass variance of the deviations, as the Triton kernel computes it.
 *
 * xpad: float32 [K, H + 2 pad, >= lpx + round_up(W, NK_VL) + pad] replicate-padded image, interior at row pad,
 *       column lpx (>= pad); plane stride x_ks, row stride x_rs.
 * aff:  float32, nk_affinity_floats(H, W, 8 L) of them in the layout described there; the lanes past W
 *       receive finite values from the padded image.
 */
#ifdef NK_FIXED_DILATIONS
/* The dilation tuple of a fixed-dilation build (see the propagation's fixed kernel below). */
static const int nk_fixed_dilations[] = {NK_FIXED_DILATIONS};
#define NK_FIXED_TAPS ((int)(8 * sizeof(nk_fixed_dilations) / sizeof(nk_fixed_dilations[0])))
#endif

/* One vector of NK_VL pixels at `centre` (channel 0 of the padded image): the 8 L affinities into block (tap n's
 * lanes at block + n NK_VL). acc: n_taps vectors of scratch. The deviations are re-read from the image (L1) in
 * each of the three loops instead of kept: with n_taps a constant (the fixed-dilation build) the accumulators then
 * stay in registers. */
static inline __attribute__((always_inline)) void
affinity_vector(const float *centre, int64_t x_ks, int K, const int64_t *tap, const int n_taps, int num_dil, vf *acc,
                float *block)
{
    const float inv_samples = 1.0f / (float)(9 * num_dil);
    const float inv_dof = 1.0f / (float)(9 * num_dil - 1);
    const float neg_inv_k = -1.0f / (float)K;
    for (int n = 0; n < n_taps; n++)
        acc[n] = splat(0.0f);
    for (int k = 0; k < K; k++, centre += x_ks) {
        const vf xc = load_v(centre);
        /* Four partial sums each: one sum over the taps is a chain of n_taps dependent adds, and the pass was
         * bound by those chains' latency, not by its arithmetic (four chains: 11% faster on the dev CPU; removing a
         * sixth of the operations instead was not faster at all). */
        vf sum[4] = {splat(0.0f), splat(0.0f), splat(0.0f), splat(0.0f)};
        for (int n = 0; n < n_taps; n++)
            sum[n & 3] += load_v(centre + tap[n]) - xc;
        const vf mean = ((sum[0] + sum[1]) + (sum[2] + sum[3])) * inv_samples;
        vf squares[4] = {(float)num_dil * mean * mean, splat(0.0f), splat(0.0f), splat(0.0f)};
        for (int n = 0; n < n_taps; n++) {
            const vf t = (load_v(centre + tap[n]) - xc) - mean;
            squares[n & 3] += t * t;
        }
        const vf var = ((squares[0] + squares[1]) + (squares[2] + squares[3])) * inv_dof;
        vf spread;
        for (int l = 0; l < NK_VL; l++)
            spread[l] = sqrtf(var[l]);
        const vf inv = 1.0f / (1e-8f + 0.1f * spread);
        for (int n = 0; n < n_taps; n++)
            acc[n] += abs_v(load_v(centre + tap[n]) - xc) * inv;
    }
    vf top[4] = {splat(-INFINITY), splat(-INFINITY), splat(-INFINITY), splat(-INFINITY)}; /* four chains too */
    for (int n = 0; n < n_taps; n++) {
        acc[n] *= neg_inv_k;
        top[n & 3] = max_v(acc[n], top[n & 3]);
    }
    const vf mx = max_v(max_v(top[0], top[1]), max_v(top[2], top[3]));
    vf sums[4] = {splat(0.0f), splat(0.0f), splat(0.0f), splat(0.0f)};
    for (int n = 0; n < n_taps; n++) {
        acc[n] = exp_v(acc[n] - mx);
        sums[n & 3] += acc[n];
    }
    const vf inv_total = 1.0f / ((sums[0] + sums[1]) + (sums[2] + sums[3]));
    for (int n = 0; n < n_taps; n++)
        store_v(block + n * NK_VL, acc[n] * inv_total);
}

int nk_pamr_affinity_f32(const float *xpad, int64_t x_ks, int64_t x_rs, int K, int H, int W, int pad, int lpx,
                         const int32_t *dy, const int32_t *dx, int n_taps, int num_dil, float *aff, int y0, int y1)
{
    if (n_taps < 1 || K < 1 || lpx < pad || y0 < 0 || y1 > H || x_rs < lpx + round_up(W, NK_VL) + pad)
        return -1;
    int64_t tap[n_taps];
    for (int n = 0; n < n_taps; n++)
        tap[n] = (int64_t)dy[n] * x_rs + dx[n];
    const int64_t aff_row = affinity_row_floats(W, n_taps);
#ifdef NK_FIXED_DILATIONS
    /* The same arithmetic with a constant tap count: unrolled, accumulators in registers (about 2x faster). */
    if (n_taps == NK_FIXED_TAPS && num_dil * 8 == NK_FIXED_TAPS) {
        vf acc[NK_FIXED_TAPS];
        for (int y = y0; y < y1; y++)
            for (int x0 = 0; x0 < W; x0 += NK_VL)
                affinity_vector(xpad + (int64_t)(y + pad) * x_rs + lpx + x0, x_ks, K, tap, NK_FIXED_TAPS, num_dil,
                                acc, aff + (int64_t)y * aff_row + (int64_t)x0 * n_taps);
        return 0;
    }
#endif
    vf acc[n_taps];
    for (int y = y0; y < y1; y++)
        for (int x0 = 0; x0 < W; x0 += NK_VL)
            affinity_vector(xpad + (int64_t)(y + pad) * x_rs + lpx + x0, x_ks, K, tap, n_taps, num_dil, acc,
                            aff + (int64_t)y * aff_row + (int64_t)x0 * n_taps);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Propagation                                                                                                 */
/* ---------------------------------------------------------------------------------------------------------- */

/* How many row steps of a class ahead the sweep requests its incoming rows (2 and 4 measured no faster). */
#define NK_PREFETCH_STEPS 1

static inline void prefetch_span(const float *p, int64_t n)
{
    for (int64_t i = 0; i < n; i += 16)
        __builtin_prefetch(p + i, 0, 2);
}

/* Rows a later step reads from memory, requested a few cache lines at a time from inside a row's vector loop
 * (sweep_fixed_row): the affinity row (NULL: none) and one row of each of `count` planes (plane + c plane_cs;
 * NULL: none). */
typedef struct {
    const float *aff;
    const float *plane;
    int64_t plane_cs;
    int count;
} prefetch_plan;

/* Columns x .. x + n of the plan's rows (n_taps affinity vectors per pixel vector). */
static inline void prefetch_columns(const prefetch_plan *pf, int x, int n, int n_taps)
{
    if (pf->aff)
        prefetch_span(pf->aff + (int64_t)x * n_taps, (int64_t)n * n_taps);
    if (pf->plane)
        for (int c = 0; c < pf->count; c++)
            prefetch_span(pf->plane + c * pf->plane_cs + x, n);
}

/* Row y of cb channels: out_c[x] = sum_n aff(y, x)[n] ring_c[tap_n + x], aff_y the row's affinity blocks. cb is a
 * constant after inlining, so the cb accumulators live in registers for the whole 8 L-term sum. */
static inline __attribute__((always_inline)) void
sweep_row(const int cb, float *const *ring_c, const int64_t *tap, const float *aff_y, int n_taps, int W,
          float *const *out_c)
{
    for (int x = 0; x < W; x += NK_VL) {
        const float *a_blk = aff_y + (int64_t)x * n_taps;
        vf acc[NK_CB];
        const vf a0 = load_v(a_blk);
        for (int c = 0; c < cb; c++)
            acc[c] = a0 * load_v(ring_c[c] + tap[0] + x);
        for (int n = 1; n < n_taps; n++) {
            const vf a = load_v(a_blk + n * NK_VL);
            for (int c = 0; c < cb; c++)
                acc[c] += a * load_v(ring_c[c] + tap[n] + x);
        }
        if (x + NK_VL <= W) {
            for (int c = 0; c < cb; c++)
                store_v(out_c[c] + x, acc[c]);
        } else {
            for (int c = 0; c < cb; c++)
                memcpy(out_c[c] + x, &acc[c], (size_t)(W - x) * sizeof(float));
        }
    }
}

static void sweep_row_block(int cb, float *const *ring_c, const int64_t *tap, const float *aff_y, int n_taps, int W,
                            float *const *out_c)
{
#define NK_CASE(n)                                                                                                \
    case n: sweep_row(n, ring_c, tap, aff_y, n_taps, W, out_c); return;
    switch (cb) {
#if NK_CB >= 16
    NK_CASE(16) NK_CASE(15) NK_CASE(14) NK_CASE(13) NK_CASE(12) NK_CASE(11) NK_CASE(10) NK_CASE(9)
#endif
#if NK_CB >= 8
    NK_CASE(8) NK_CASE(7) NK_CASE(6) NK_CASE(5)
#endif
    NK_CASE(4) NK_CASE(3) NK_CASE(2)
    default: sweep_row(1, ring_c, tap, aff_y, n_taps, W, out_c); return;
    }
#undef NK_CASE
}

#ifdef NK_FIXED_DILATIONS
/*
 * The same sweep for one dilation tuple fixed at compile time (-DNK_FIXED_DILATIONS=8,16 -DNK_FIXED_ROW_STEP=8
 * -DNK_FIXED_PAD=16; naclip_kernels/native.py builds one library per tuple). Every tap's column offset and row
 * index is then a constant, the tap loop is fully unrolled and NK_XB vectors are done per step, so the compiler
 * schedules all 8 L x NK_XB x cb multiply-adds of a step at once with constant addressing. Measured on the dev CPU
 * (Zen 5, 2 cores, rows in L2): 66-71 GFLOP/s per core against 55-62 for the generic loop, and 73-84
 * single-threaded with its rings in L2 (the float32 matmul: 96). A variant that loads each ring row's aligned
 * vectors once per step and builds the dx = +-8 taps (whose 64-byte loads straddle two cache lines) with one
 * shuffle, 20 aligned loads per channel and step instead of 32, measured no faster, so those split loads are not
 * what holds the loop back.
 */
#define NK_FIXED_ROWS (2 * (NK_FIXED_PAD / NK_FIXED_ROW_STEP) + 1)
#define NK_XB 2
#if NK_VL >= 16
#define NK_FIXED_CB 8 /* 8 channels x 2 vectors = 16 accumulators of 32 zmm registers */
#else
#define NK_FIXED_CB 4 /* 8 accumulators of 16 ymm registers */
#endif
/* gcc folds every load into its multiply-add (a memory operand), which undoes the sharing: an empty asm that takes
 * the loaded vector as a register operand makes it load once and keep the value for all its uses. Not for clang:
 * around that asm clang 14 kept the accumulators in memory and the sweeps ran at half speed; without it clang's
 * sweeps ran at gcc's rate on the dev CPU. */
#if defined(__clang__)
#define NK_KEEP_IN_REGISTER(v) ((void)0)
#elif defined(__x86_64__) || defined(__i386__)
#define NK_KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))
#elif defined(__aarch64__)
#define NK_KEEP_IN_REGISTER(v) __asm__("" : "+w"(v))
#else
#define NK_KEEP_IN_REGISTER(v) ((void)0)
#endif
static const int nk_unit_dy[8] = {-1, -1, -1, 0, 0, 1, 1, 1};
static const int nk_unit_dx[8] = {-1, 0, 1, -1, 1, -1, 0, 1};

int nk_fixed_taps(void) { return NK_FIXED_TAPS; }
int nk_fixed_channel_block(void) { return NK_FIXED_CB; }
static int fixed_taps_match(const int32_t *dy, const int32_t *dx, int n_taps, int pad, int row_step);
/* 1 when nk_pamr_sweep_f32 runs the compiled-in taps for these arguments, 0 when it runs the generic loop. */
int nk_fixed_kernel_applies(const int32_t *dy, const int32_t *dx, int n_taps, int pad, int row_step)
{
    return fixed_taps_match(dy, dx, n_taps, pad, row_step);
}

/* True when the runtime taps are the compiled ones (same order), so the fixed kernel may run. */
static int fixed_taps_match(const int32_t *dy, const int32_t *dx, int n_taps, int pad, int row_step)
{
    if (n_taps != NK_FIXED_TAPS || pad != NK_FIXED_PAD || row_step != NK_FIXED_ROW_STEP)
        return 0;
    for (int t = 0; t < n_taps; t++)
        if (dy[t] != nk_unit_dy[t % 8] * nk_fixed_dilations[t / 8] ||
            dx[t] != nk_unit_dx[t % 8] * nk_fixed_dilations[t / 8])
            return 0;
    return 1;
}

/* xb vectors from x of row y for cb channels; row_off[j] is the ring offset (left border included) of the row
 * y + (j - pad / row_step) row_step, so every tap's address is row_off[constant] + x + constant. */
static inline __attribute__((always_inline)) void
sweep_fixed_step(const int cb, const int xb, const int whole, float *const *ring_c, const int64_t *row_off,
                 const float *aff_y, int x, int W, float *const *out_c)
{
    vf acc[NK_FIXED_CB][NK_XB];
#pragma GCC unroll 128
    for (int t = 0; t < NK_FIXED_TAPS; t++) {
        const int j = nk_unit_dy[t % 8] * nk_fixed_dilations[t / 8] / NK_FIXED_ROW_STEP + NK_FIXED_ROWS / 2;
        const int d = nk_unit_dx[t % 8] * nk_fixed_dilations[t / 8];
        vf a[NK_XB];
        for (int i = 0; i < xb; i++)
            a[i] = load_v(aff_y + (int64_t)(x + i * NK_VL) * NK_FIXED_TAPS + t * NK_VL);
        for (int c = 0; c < cb; c++) {
            const float *row = ring_c[c] + row_off[j] + x + d;
            for (int i = 0; i < xb; i++) {
                vf v = load_v(row + i * NK_VL);
                NK_KEEP_IN_REGISTER(v);
                acc[c][i] = t == 0 ? a[i] * v : acc[c][i] + a[i] * v;
            }
        }
    }
    /* whole (a constant): all xb vectors lie inside the row, so only full stores are compiled (the partial
     * store's memcpy from the accumulators would otherwise keep all of them in memory). */
    for (int i = 0; i < xb; i++) {
        const int x0 = x + i * NK_VL;
        if (whole || x0 + NK_VL <= W) {
            for (int c = 0; c < cb; c++)
                store_v(out_c[c] + x0, acc[c][i]);
        } else if (x0 < W) {
            for (int c = 0; c < cb; c++) {
                const vf last = acc[c][i];
                memcpy(out_c[c] + x0, &last, (size_t)(W - x0) * sizeof(float));
            }
        }
    }
}

static inline __attribute__((always_inline)) void
sweep_fixed_row(const int cb, float *const *ring_c, const int64_t *row_off, const float *aff_y, int W,
                float *const *out_c, const prefetch_plan *pf)
{
    int x = 0;
    for (; x + NK_XB * NK_VL <= W; x += NK_XB * NK_VL) {
        if (pf)
            prefetch_columns(pf, x, NK_XB * NK_VL, NK_FIXED_TAPS);
        sweep_fixed_step(cb, NK_XB, 1, ring_c, row_off, aff_y, x, W, out_c);
    }
    if (pf && x < W)
        prefetch_columns(pf, x, W - x, NK_FIXED_TAPS);
    for (; x < W; x += NK_VL)
        sweep_fixed_step(cb, 1, 0, ring_c, row_off, aff_y, x, W, out_c);
}

static void sweep_fixed_block(int cb, float *const *ring_c, const int64_t *row_off, const float *aff_y, int W,
                              float *const *out_c, const prefetch_plan *pf)
{
#define NK_CASE(n)                                                                                                \
    case n: sweep_fixed_row(n, ring_c, row_off, aff_y, W, out_c, pf); return;
    switch (cb) {
#if NK_FIXED_CB >= 8
    NK_CASE(8) NK_CASE(7) NK_CASE(6) NK_CASE(5)
#endif
    NK_CASE(4) NK_CASE(3) NK_CASE(2)
    default: sweep_fixed_row(1, ring_c, row_off, aff_y, W, out_c, pf); return;
    }
#undef NK_CASE
}
#else
int nk_fixed_taps(void) { return 0; }
int nk_fixed_channel_block(void) { return NK_CB; }
int nk_fixed_kernel_applies(const int32_t *dy, const int32_t *dx, int n_taps, int pad, int row_step)
{
    (void)dy, (void)dx, (void)n_taps, (void)pad, (void)row_step;
    return 0;
}
#endif

/* Replicate a ring row's first and last interior values into its border columns: ring[left - pad .. left - 1] =
 * ring[left], ring[left + W ..] = ring[left + W - 1], as every tap of the vector loop reads them. */
static inline void pad_ring_row(float *ring, int W, int pad, int64_t left, int64_t width)
{
    for (int64_t i = left - pad; i < left; i++)
        ring[i] = ring[left];
    for (int64_t i = left + W; i < width; i++)
        ring[i] = ring[left + W - 1];
}

/* The ring row of image row `row`: its W values at ring + left, border columns replicated. */
static inline void fill_ring_row(float *ring, const float *row, int W, int pad, int64_t left, int64_t width)
{
    memcpy(ring + left, row, (size_t)W * sizeof(float));
    pad_ring_row(ring, W, pad, left, width);
}

/* Row r of a plane that is the vertical align_corners resize of hres ([h, W]: low-resolution rows already resized
 * along the columns) into dst (W floats). The first pass reads the resized mask this way, so the full-size resize
 * is never written to memory and read back. */
static inline void resize_row(float *dst, const float *hres, int r, int h, const int32_t *row_lo,
                              const float *row_frac, int W)
{
    const int lo = row_lo[r], hi = lo + 1 < h ? lo + 1 : h - 1;
    const float f = row_frac[r], g = 1.0f - f;
    const float *t0 = hres + (int64_t)lo * W, *t1 = hres + (int64_t)hi * W;
    for (int j = 0; j < W; j++)
        dst[j] = g * t0[j] + f * t1[j];
}

/* fill_ring_row for that resized row. */
static inline void fill_ring_row_resized(float *ring, const float *hres, int r, int h, const int32_t *row_lo,
                                         const float *row_frac, int W, int pad, int64_t left, int64_t width)
{
    resize_row(ring + left, hres, r, h, row_lo, row_frac, W);
    pad_ring_row(ring, W, pad, left, width);
}

/* Resize k contiguous float32 [h, w] planes along the columns only: hres[c, r, :] is row r of plane c resized to W
 * columns (align_corners tables col_lo, col_frac). The rows are resized on the fly from these by
 * fill_ring_row_resized. */
int nk_pamr_resize_columns_f32(const float *src, int64_t k, int h, int w, int W, const int32_t *col_lo,
                               const float *col_frac, float *hres)
{
    if (k < 0 || h < 1 || w < 1 || W < 1)
        return -1;
    for (int64_t c = 0; c < k; c++)
        for (int r = 0; r < h; r++) {
            const float *srow = src + (c * h + r) * w;
            float *trow = hres + (c * h + r) * W;
            for (int j = 0; j < W; j++) {
                const int lo = col_lo[j], hi = lo + 1 < w ? lo + 1 : w - 1;
                const float f = col_frac[j];
                trow[j] = (1.0f - f) * srow[lo] + f * srow[hi];
            }
        }
    return 0;
}

/* The previous sweep's rows 0 and H - 1 of k planes, replicate-padded like ring rows, into border + c border_cs
 * (row 0) and border + c border_cs + width (row H - 1), width = nk_ring_row_floats(W, pad): what clamped taps read
 * while those rows are being overwritten. `sides` selects them: bit 0 row 0, bit 1 row H - 1. With hres non-NULL
 * (the first pass) the rows come from the resize instead, as in nk_pamr_sweep_f32. */
int nk_pamr_save_borders_f32(const float *out, int64_t out_cs, int64_t out_rs, int64_t k, int H, int W, int pad,
                             const float *hres, int h, const int32_t *row_lo, const float *row_frac, float *border,
                             int64_t border_cs, int sides)
{
    const int64_t left = ring_left(pad), width = nk_ring_row_floats(W, pad);
    if (k < 0 || H < 1 || W < 1 || pad < 1 || out_rs < W || border_cs < 2 * width)
        return -1;
    for (int64_t c = 0; c < k; c++)
        for (int side = 0; side < 2; side++) {
            if (!(sides & (1 << side)))
                continue;
            const int r = side ? H - 1 : 0;
            float *dst = border + c * border_cs + side * width;
            if (hres)
                fill_ring_row_resized(dst, hres + c * h * W, r, h, row_lo, row_frac, W, pad, left, width);
            else
                fill_ring_row(dst, out + c * out_cs + (int64_t)r * out_rs, W, pad, left, width);
        }
    return 0;
}

/* The image x ([K, H, W] float32, any strides) replicate-padded into xpad ([K, H + 2 pad, x_rs], interior at row
 * pad and column lpx): the layout nk_pamr_affinity_f32 reads. */
int nk_pamr_pad_image_f32(const float *x, int64_t xs_k, int64_t xs_h, int64_t xs_w, int K, int H, int W, int pad,
                          int lpx, float *xpad, int64_t x_rs)
{
    if (K < 1 || H < 1 || W < 1 || pad < 0 || lpx < pad || x_rs < lpx + W + pad)
        return -1;
    const int64_t plane = (int64_t)(H + 2 * pad) * x_rs;
    for (int k = 0; k < K; k++)
        for (int r = 0; r < H + 2 * pad; r++) {
            const int sr = r - pad < 0 ? 0 : (r - pad >= H ? H - 1 : r - pad);
            const float *srow = x + k * xs_k + (int64_t)sr * xs_h;
            float *drow = xpad + k * plane + (int64_t)r * x_rs;
            if (xs_w == 1)
                memcpy(drow + lpx, srow, (size_t)W * sizeof(float));
            else
                for (int64_t i = 0; i < W; i++)
                    drow[lpx + i] = srow[i * xs_w];
            const float first = drow[lpx], last = drow[lpx + W - 1];
            for (int64_t i = 0; i < lpx; i++)
                drow[i] = first;
            for (int64_t i = lpx + W; i < x_rs; i++)
                drow[i] = last;
        }
    return 0;
}

/* Floats of scratch nk_pamr_sweep_f32 needs for `chunk` channels and `levels` fused sweeps: per channel and
 * level a ring of 2 pad / row_step + 1 class rows plus the two border rows. */
int64_t nk_pamr_sweep_scratch_floats(int chunk, int W, int pad, int row_step, int levels)
{
    return (int64_t)chunk * levels * (2 * (pad / row_step) + 3) * nk_ring_row_floats(W, pad);
}

/* Geometry shared by the sweep functions. */
typedef struct {
    int H, W, pad, row_step, slots, n_taps, fixed;
    int64_t left, width, ring_floats, aff_row;
    const float *aff;
    const int32_t *dy, *dx;
} sweep_geometry;

static inline int64_t ring_slot(const sweep_geometry *g, int r)
{
    return r < 0 ? g->slots : (r >= g->H ? g->slots + 1 : (r / g->row_step) % g->slots);
}

/* Row y of `count` channels: channel c reads the ring at ring + c ring_cs (its class rows y - pad .. y + pad in
 * their slots, then the two border rows) and writes dst + c dst_cs (W floats). pf (NULL: none) is prefetched
 * along the way by the fixed kernel (the generic loop ignores it). */
static void compute_row(const sweep_geometry *g, int y, float *ring, int64_t ring_cs, int count, float *dst,
                        int64_t dst_cs, int64_t *tap, const prefetch_plan *pf)
{
    const float *aff_y = g->aff + (int64_t)y * g->aff_row;
    int block = NK_CB;
#ifdef NK_FIXED_DILATIONS
    int64_t row_off[NK_FIXED_ROWS];
    if (g->fixed) {
        block = NK_FIXED_CB; /* <= NK_CB: the pointer arrays below hold either */
        for (int j = 0; j < NK_FIXED_ROWS; j++)
            row_off[j] = ring_slot(g, y + (j - NK_FIXED_ROWS / 2) * g->row_step) * g->width + g->left;
    }
#endif
    if (!g->fixed)
        for (int n = 0; n < g->n_taps; n++)
            tap[n] = ring_slot(g, y + g->dy[n]) * g->width + g->left + g->dx[n];
    for (int cb0 = 0; cb0 < count; cb0 += block) {
        const int cb = count - cb0 < block ? count - cb0 : block;
        float *ring_c[NK_CB], *out_row[NK_CB];
        for (int c = 0; c < cb; c++) {
            ring_c[c] = ring + (cb0 + c) * ring_cs;
            out_row[c] = dst + (cb0 + c) * dst_cs;
        }
#ifdef NK_FIXED_DILATIONS
        if (g->fixed) {
            /* This block's share of the plan: its channels' plane rows, and the affinity row once. */
            prefetch_plan share;
            if (pf)
                share = (prefetch_plan){cb0 == 0 ? pf->aff : NULL, pf->plane ? pf->plane + cb0 * pf->plane_cs : NULL,
                                        pf->plane_cs, cb};
            sweep_fixed_block(cb, ring_c, row_off, aff_y, g->W, out_row, pf ? &share : NULL);
            continue;
        }
#endif
        sweep_row_block(cb, ring_c, tap, aff_y, g->n_taps, g->W, out_row);
    }
}

static int init_geometry(sweep_geometry *g, int H, int W, const float *aff, const int32_t *dy, const int32_t *dx,
                         int n_taps, int pad, int row_step)
{
    if (H < 1 || W < 1 || n_taps < 1 || pad < 1 || row_step < 1 || pad % row_step != 0)
        return -1;
    for (int n = 0; n < n_taps; n++)
        if (dy[n] < -pad || dy[n] > pad || dx[n] < -pad || dx[n] > pad || dy[n] % row_step != 0)
            return -1;
    g->H = H, g->W = W, g->pad = pad, g->row_step = row_step, g->n_taps = n_taps;
    g->slots = 2 * (pad / row_step) + 1;
    g->left = ring_left(pad), g->width = nk_ring_row_floats(W, pad);
    g->ring_floats = (g->slots + 2) * g->width;
    g->aff_row = affinity_row_floats(W, n_taps), g->aff = aff, g->dy = dy, g->dx = dx;
#ifdef NK_FIXED_DILATIONS
    g->fixed = fixed_taps_match(dy, dx, n_taps, pad, row_step);
#else
    g->fixed = 0;
#endif
    return 0;
}

#define NK_MAX_LEVELS 10

/*
 * `levels` (1 to NK_MAX_LEVELS) PAMR sweeps in one pass, in place, of the rows y with
 * class_begin <= y % row_step < class_end of k float32 planes (plane c is out + c out_cs, rows out_rs apart,
 * columns contiguous):
 *     out_c(y, x) <- sum_n aff(y, x)[n] out_c(clamp(y + dy_n), clamp(x + dx_n))   (the previous sweep's values)
 * row_step divides every dy_n and pad (pad >= every |dy_n|, |dx_n|). border + c border_cs + 2 l width holds
 * channel c's rows 0 and H - 1 after l of the pass's sweeps, l < levels (nk_pamr_save_borders_f32 for l = 0).
 * Channels are taken `chunk` at a time; the rows of one class of one chunk are swept top to bottom with the
 * class's rows y - pad .. y + pad of each level in the chunk's rings. Sweep l + 1 runs pad rows behind sweep l and
 * its rows live only in ring l; the last sweep writes the planes: each plane row crosses memory once per pass.
 * With hres non-NULL (the first pass) the values before the pass are not read from the planes but resized on the
 * fly from hres ([k, h, W], see nk_pamr_resize_columns_f32), and the planes are only written.
 * aff: as nk_pamr_affinity_f32 writes it. scratch: nk_pamr_sweep_scratch_floats(chunk, W, pad, row_step, levels).
 * Returns 0, or -1 when an argument is inconsistent (nothing is written then).
 *
 * sweep_rows is that for the rows y_begin <= y < y_end only (nk_pamr_sweep_f32: all rows). The other rows keep
 * their values, and the taps of computed rows still read them. A partial range is for one level only: with more,
 * a level would read rows of the previous one that were not computed.
 */
static int sweep_rows(float *out, int64_t out_cs, int64_t out_rs, int64_t k, int H, int W, const float *aff,
                      const int32_t *dy, const int32_t *dx, int n_taps, int pad, int row_step, int class_begin,
                      int class_end, int levels, const float *border, int64_t border_cs, const float *hres, int h,
                      const int32_t *row_lo, const float *row_frac, int chunk, float *scratch,
                      int64_t scratch_floats, int y_begin, int y_end)
{
    sweep_geometry g;
    if (init_geometry(&g, H, W, aff, dy, dx, n_taps, pad, row_step) != 0 || k < 1 || chunk < 1 ||
        class_begin < 0 || class_end > row_step || out_rs < W || levels < 1 || levels > NK_MAX_LEVELS ||
        border_cs < 2 * levels * g.width || y_begin < 0 || y_end > H || (levels > 1 && (y_begin > 0 || y_end < H)))
        return -1;
    if (scratch_floats < nk_pamr_sweep_scratch_floats(chunk, W, pad, row_step, levels))
        return -1;
    const int steps = pad / row_step;                 /* class rows between a row and its farthest tap */
    const int64_t per_channel = levels * g.ring_floats, width = g.width, left = g.left;
    int64_t tap[n_taps];
    for (int rho = class_begin; rho < class_end && rho < H; rho++) {
        const int rows = (H - rho + row_step - 1) / row_step;   /* rows of the class: y_j = rho + j row_step */
        /* The class rows computed: j_begin <= j < j_end. */
        const int j_begin = y_begin > rho ? (y_begin - rho + row_step - 1) / row_step : 0;
        const int j_end = y_end > rho ? (y_end - rho + row_step - 1) / row_step : 0;
        if (j_begin >= j_end)
            continue;
        for (int64_t c0 = 0; c0 < k; c0 += chunk) {
            const int count = (int)(k - c0 < chunk ? k - c0 : chunk);
            float *const first_plane = out + c0 * out_cs;
#define NK_FILL(c, j)                                                                                             \
    do {                                                                                                          \
        const int r_ = rho + (j) * row_step;                                                                      \
        float *ring_row = scratch + (c) * per_channel + ring_slot(&g, r_) * width;                                \
        if (hres)                                                                                                 \
            fill_ring_row_resized(ring_row, hres + (c0 + (c)) * h * W, r_, h, row_lo, row_frac, W, pad, left,     \
                                  width);                                                                         \
        else                                                                                                      \
            fill_ring_row(ring_row, first_plane + (c) * out_cs + (int64_t)r_ * out_rs, W, pad, left, width);      \
    } while (0)
            for (int c = 0; c < count; c++) {
                for (int l = 0; l < levels; l++)
                    memcpy(scratch + c * per_channel + l * g.ring_floats + g.slots * width,
                           border + (c0 + c) * border_cs + 2 * l * width, 2 * (size_t)width * sizeof(float));
                for (int j = j_begin > steps ? j_begin - steps : 0; j < rows && j <= j_begin + steps; j++)
                    NK_FILL(c, j);
            }
            /* Step s: sweep l (1-based) computes class row s - (l - 1) steps from ring l - 1. */
            for (int s = j_begin; s < j_end + (levels - 1) * steps; s++) {
                prefetch_plan plan = {NULL, NULL, 0, 0};
                if (s < j_end) {
                    const int y = rho + s * row_step;
                    if (s > j_begin && s + steps < rows)
                        for (int c = 0; c < count; c++)
                            NK_FILL(c, s + steps);
                    /* The class's next incoming rows and affinity row: one stream per channel, more than the
                     * hardware prefetchers follow, so they are requested explicitly. The fixed kernel requests them
                     * a few lines per vector step from inside the first level's row: all at once, the requests
                     * of a 2048-column row (3000 lines) stall the loop; spread out, the sweeps at 1024x2048 ran
                     * 17% faster on the dev CPU (equal at 336x448). */
                    const int ahead = y + pad + NK_PREFETCH_STEPS * row_step;
                    const int aff_ahead = y + NK_PREFETCH_STEPS * row_step;
                    plan = (prefetch_plan){aff_ahead < H ? aff + (int64_t)aff_ahead * g.aff_row : NULL,
                                           !hres && ahead < H ? first_plane + (int64_t)ahead * out_rs : NULL,
                                           out_cs, count};
                    if (!g.fixed) /* the generic loop requests the whole rows here (compute_row ignores the plan) */
                        prefetch_columns(&plan, 0, (int)round_up(W, NK_VL), g.n_taps);
                }
                for (int l = 1; l <= levels; l++) {
                    const int j = s - (l - 1) * steps;
                    if (j < j_begin || j >= j_end)
                        continue;
                    const int y = rho + j * row_step;
                    float *src = scratch + (l - 1) * g.ring_floats;
                    const prefetch_plan *pf = l == 1 && (plan.aff || plan.plane) ? &plan : NULL;
                    if (l == levels) {
                        compute_row(&g, y, src, per_channel, count, first_plane + (int64_t)y * out_rs, out_cs, tap,
                                    pf);
                    } else {
                        float *dst = src + g.ring_floats + ring_slot(&g, y) * width;
                        compute_row(&g, y, src, per_channel, count, dst + left, per_channel, tap, pf);
                        for (int c = 0; c < count; c++)
                            pad_ring_row(dst + c * per_channel, W, pad, left, width);
                    }
                }
            }
#undef NK_FILL
        }
    }
    return 0;
}

int nk_pamr_sweep_f32(float *out, int64_t out_cs, int64_t out_rs, int64_t k, int H, int W, const float *aff,
                      const int32_t *dy, const int32_t *dx, int n_taps, int pad, int row_step, int class_begin,
                      int class_end, int levels, const float *border, int64_t border_cs, const float *hres, int h,
                      const int32_t *row_lo, const float *row_frac, int chunk, float *scratch,
                      int64_t scratch_floats)
{
    return sweep_rows(out, out_cs, out_rs, k, H, W, aff, dy, dx, n_taps, pad, row_step, class_begin, class_end,
                      levels, border, border_cs, hres, h, row_lo, row_frac, chunk, scratch, scratch_floats, 0, H);
}

/* Row y of a plane before the pass into dst (W floats): resized from hres_c when it is given (the first pass),
 * else copied from the plane. */
static inline void strip_row(float *dst, const float *plane, int64_t out_rs, const float *hres_c, int h,
                             const int32_t *row_lo, const float *row_frac, int W, int y)
{
    if (hres_c)
        resize_row(dst, hres_c, y, h, row_lo, row_frac, W);
    else
        memcpy(dst, plane + (int64_t)y * out_rs, (size_t)W * sizeof(float));
}

/*
 * Rows 0 and H - 1 of k planes after l sweeps, for 0 < l < levels, into border + c border_cs + 2 l width (the
 * border rows a `levels`-sweep pass reads; border + c border_cs must already hold them before the pass). Row 0
 * after l sweeps depends only on rows <= l pad of its class, so it is computed by sweeping that class in a strip of
 * the first strip_rows = min(H, (levels - 1) pad + 1) rows (the strip's cut-off end does not reach row 0), and row
 * H - 1 in a strip of the last rows. With hres non-NULL (the first pass) the strips' rows are resized from hres
 * as in nk_pamr_sweep_f32 instead of read from the planes. strip: k strip_rows W floats, strip_border: k 2 width
 * floats, scratch: nk_pamr_sweep_scratch_floats(chunk, W, pad, row_step, 1). A few rows of work per channel.
 */
int nk_pamr_border_history_f32(const float *out, int64_t out_cs, int64_t out_rs, int64_t k, int H, int W,
                               const float *aff, const int32_t *dy, const int32_t *dx, int n_taps, int pad,
                               int row_step, int levels, float *border, int64_t border_cs, const float *hres, int h,
                               const int32_t *row_lo, const float *row_frac, float *strip, float *strip_border,
                               int chunk, float *scratch, int64_t scratch_floats)
{
    const int64_t width = nk_ring_row_floats(W, pad);
    if (k < 1 || H < 1 || W < 1 || levels < 1 || levels > NK_MAX_LEVELS || pad < 1 || row_step < 1 ||
        border_cs < 2 * levels * width || (hres && (h < 1 || !row_lo || !row_frac)))
        return -1;
    const int strip_rows = (levels - 1) * pad + 1 < H ? (levels - 1) * pad + 1 : H;
    const int whole = strip_rows == H, classes = row_step < H ? row_step : H;
    const int64_t strip_cs = (int64_t)strip_rows * W, aff_row = affinity_row_floats(W, n_taps);
    for (int side = 0; side < 2; side++) {
        const int first = side ? H - strip_rows : 0;
        const int cls = side ? (strip_rows - 1) % row_step : 0;
        /* The class's rows, and the strip's first and last rows, which its sweeps read as border rows (their
         * values only reach rows past the cut-off, never the border row computed here, but they must be set). */
        const int step = whole ? 1 : row_step, last_step = strip_rows > 1 ? strip_rows - 1 : 1;
        for (int64_t c = 0; c < k; c++) {
            float *dst = strip + c * strip_cs;
            for (int r = whole ? 0 : cls; r < strip_rows; r += step)
                strip_row(dst + (int64_t)r * W, out + c * out_cs, out_rs, hres ? hres + c * h * W : NULL, h, row_lo,
                          row_frac, W, first + r);
            for (int r = 0; r < strip_rows; r += last_step)
                strip_row(dst + (int64_t)r * W, out + c * out_cs, out_rs, hres ? hres + c * h * W : NULL, h, row_lo,
                          row_frac, W, first + r);
        }
        for (int level = 1; level < levels; level++) {
            /* After this level only rows within `reach` of the border row still matter (each later level moves
             * information at most pad rows), so only those are swept. */
            const int reach = (levels - 1 - level) * pad;
            if (nk_pamr_save_borders_f32(strip, strip_cs, W, k, strip_rows, W, pad, NULL, 0, NULL, NULL,
                                         strip_border, 2 * width, 3) != 0 ||
                sweep_rows(strip, strip_cs, W, k, strip_rows, W, aff + first * aff_row, dy, dx, n_taps, pad,
                           row_step, whole ? 0 : cls, whole ? classes : cls + 1, 1, strip_border, 2 * width, NULL, 0,
                           NULL, NULL, chunk, scratch, scratch_floats, side && !whole ? strip_rows - 1 - reach : 0,
                           side || whole ? strip_rows : reach + 1) != 0 ||
                nk_pamr_save_borders_f32(strip, strip_cs, W, k, strip_rows, W, pad, NULL, 0, NULL, NULL,
                                         border + 2 * level * width, border_cs, 1 << side) != 0)
                return -1;
        }
    }
    return 0;
}
