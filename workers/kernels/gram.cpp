// Inner products ⟨δ_i, δ_k⟩ of δ_i = x_i − base (or x_i) in one pass over the sources: the
// cosines of Model Stock and SLERP. Each δ entry is formed in float32 as the torch path forms it
// (bfloat16 widened exactly first), its products are exact in float64 (24 + 24 significant bits)
// and summed in float64 in a fixed order: within a block of kBlockEntries entries in 16 lanes
// (lane l takes the entries ≡ l mod 16, in order), the lanes in order, then the blocks in order.
// The result depends on the data only, never on the thread count or on the instruction set: the
// AVX-512 path holds a pair's 16 lanes as 2 × 8 doubles, the AVX2 path as 4 × 4, the scalar
// path (and every tail) as 16 doubles, and all three add the same products in the same order.
#include <cstdint>
#include <vector>

#include "lanes.h"
#include "threads.h"

namespace evomerge {
namespace {

constexpr int64_t kBlockEntries = 1 << 13;  // a block's sources stay in L2 while its lanes are summed
constexpr int kLanes = 16;
constexpr int kMaxTensors = 16;
constexpr int kMaxPairs = kMaxTensors * (kMaxTensors + 1) / 2;
// The AVX2 path prefetches each source this far ahead (a prefetch never faults, past the end
// included). Measured on this VM (x86-64-v3 build, AVX-512 Xeon, one thread, two tensors of 2^24
// entries, load 3-4.5 on 2 cores): without it 1.0-1.2 ns/entry in float32 and bf16 (the hardware
// prefetcher did not keep the 8-wide loads fed); 2 KB ahead 0.34-0.51 (bf16) and 0.41-0.97
// (float32), 512 B to 4 KB within ~15 % of that. (The AVX-512 path, without: 0.27-0.57, 0.66-0.92.)
constexpr int64_t kPrefetchBytes = 2048;

// Lane sums of one block [lo, hi) (lo a multiple of kLanes), then the lanes summed in order into
// sums[p], pair p = (i, k) with i <= k in row order. N > 0: the tensor count known at compile
// time (the accumulators then live in registers); N = 0: n_ of them.
template <int N, typename T>
void block_sums(const T* base, const T* const* x, int n_, int64_t lo, int64_t hi, double* sums) {
    const int n = N > 0 ? N : n_;
    constexpr int kPairs = N > 0 ? N * (N + 1) / 2 : kMaxPairs;
    double lanes[kPairs][kLanes];
    int64_t j = lo;
#ifdef __AVX512F__
    __m512d acc[kPairs][2];
    for (int p = 0; p < n * (n + 1) / 2; ++p) acc[p][0] = acc[p][1] = _mm512_setzero_pd();
    for (; j + kLanes <= hi; j += kLanes) {
        __m512d d[N > 0 ? N : kMaxTensors][2];
        __m512 b = base ? load16(base, j) : _mm512_setzero_ps();
        for (int i = 0; i < n; ++i) {
            __m512 v = load16(x[i], j);
            if (base) v = _mm512_sub_ps(v, b);
            d[i][0] = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
            d[i][1] = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        }
        for (int i = 0, p = 0; i < n; ++i)
            for (int k = i; k < n; ++k, ++p)
                for (int h = 0; h < 2; ++h) acc[p][h] = _mm512_add_pd(acc[p][h], _mm512_mul_pd(d[i][h], d[k][h]));
    }
    for (int p = 0; p < n * (n + 1) / 2; ++p) {
        _mm512_storeu_pd(lanes[p], acc[p][0]);
        _mm512_storeu_pd(lanes[p] + 8, acc[p][1]);
    }
#elif defined(__AVX2__)
    // The same 16 lanes, a pair's as 4 __m256d (acc[p][q] holds lanes 4q..4q+3); each half of 8
    // entries is widened and summed before the next is loaded (fewer registers live). Sources are
    // prefetched kPrefetchBytes ahead (see there).
    __m256d acc[kPairs][4];
    for (int p = 0; p < n * (n + 1) / 2; ++p) acc[p][0] = acc[p][1] = acc[p][2] = acc[p][3] = _mm256_setzero_pd();
    constexpr int64_t ahead = kPrefetchBytes / int64_t(sizeof(T));
    for (; j + kLanes <= hi; j += kLanes) {
        if (base) _mm_prefetch(reinterpret_cast<const char*>(base + j + ahead), _MM_HINT_T0);
        for (int i = 0; i < n; ++i) _mm_prefetch(reinterpret_cast<const char*>(x[i] + j + ahead), _MM_HINT_T0);
        for (int half = 0; half < 2; ++half) {
            __m256d d[N > 0 ? N : kMaxTensors][2];
            __m256 b = base ? load8(base, j + 8 * half) : _mm256_setzero_ps();
            for (int i = 0; i < n; ++i) {
                __m256 v = load8(x[i], j + 8 * half);
                if (base) v = _mm256_sub_ps(v, b);
                d[i][0] = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
                d[i][1] = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            }
            for (int i = 0, p = 0; i < n; ++i)
                for (int k = i; k < n; ++k, ++p)
                    for (int h = 0; h < 2; ++h)
                        acc[p][2 * half + h] = _mm256_add_pd(acc[p][2 * half + h], _mm256_mul_pd(d[i][h], d[k][h]));
        }
    }
    for (int p = 0; p < n * (n + 1) / 2; ++p)
        for (int q = 0; q < 4; ++q) _mm256_storeu_pd(lanes[p] + 4 * q, acc[p][q]);
#else
    for (int p = 0; p < n * (n + 1) / 2; ++p)
        for (int l = 0; l < kLanes; ++l) lanes[p][l] = 0.0;
#endif
    for (; j < hi; ++j) {  // the tail (and every entry without AVX2): the same sums lane by lane
        const int l = int(j % kLanes);
        double d[N > 0 ? N : kMaxTensors];
        for (int i = 0; i < n; ++i) d[i] = double(base ? widen(x[i][j]) - widen(base[j]) : widen(x[i][j]));
        for (int i = 0, p = 0; i < n; ++i)
            for (int k = i; k < n; ++k, ++p) lanes[p][l] += d[i] * d[k];
    }
    for (int p = 0; p < n * (n + 1) / 2; ++p) {
        double total = 0.0;
        for (int l = 0; l < kLanes; ++l) total += lanes[p][l];
        sums[p] = total;
    }
}

template <typename T>
void gram(const T* base, const T* const* x, int n, int64_t numel, int threads, double* out) {
    const int pairs = n * (n + 1) / 2;
    const int64_t blocks = (numel + kBlockEntries - 1) / kBlockEntries;
    std::vector<double> partial(blocks * pairs);
    in_parallel(threads, blocks, [&](int64_t block) {
        const int64_t lo = block * kBlockEntries, hi = std::min(numel, lo + kBlockEntries);
        double* sums = partial.data() + block * pairs;
        switch (n) {  // the common counts with their accumulators in registers
            case 1: return block_sums<1>(base, x, n, lo, hi, sums);
            case 2: return block_sums<2>(base, x, n, lo, hi, sums);
            case 3: return block_sums<3>(base, x, n, lo, hi, sums);
            case 4: return block_sums<4>(base, x, n, lo, hi, sums);
            default: return block_sums<0>(base, x, n, lo, hi, sums);
        }
    });
    for (int i = 0, p = 0; i < n; ++i)
        for (int k = i; k < n; ++k, ++p) {
            double total = 0.0;
            for (int64_t block = 0; block < blocks; ++block) total += partial[block * pairs + p];
            out[i * n + k] = out[k * n + i] = total;
        }
}

}  // namespace
}  // namespace evomerge

using namespace evomerge;

extern "C" {

// gram[i·n + k] = ⟨δ_i, δ_k⟩ over `numel` entries, δ_i = tensors[i] − base (base may be null:
// δ_i = tensors[i]); dtype 0 float32, 1 bfloat16; 1 <= n <= 16. Returns 0, or -1 on bad arguments.
int evomerge_gram(int dtype, const void* base, const void* const* tensors, int n, int64_t numel, int threads,
                  double* gram_out) {
    if (n < 1 || n > kMaxTensors || numel < 1 || threads < 1 || (dtype != 0 && dtype != 1)) return -1;
    if (dtype == 0)
        gram(static_cast<const float*>(base), reinterpret_cast<const float* const*>(tensors), n, numel, threads,
             gram_out);
    else
        gram(static_cast<const uint16_t*>(base), reinterpret_cast<const uint16_t* const*>(tensors), n, numel,
             threads, gram_out);
    return 0;
}
}
