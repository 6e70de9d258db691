// Σ c_k·x_k in one pass over the terms (linear, task arithmetic, SLERP, Model Stock), computed
// entry by entry as torch's chunked ops compute it on CPUs with FMA (AVX2, AVX-512): the first
// product c_0·x_0 rounded to float32, then each further term added by one fused multiply-add
// (torch's add(alpha=) is vec::fmadd), the coefficients rounded to float32 first. bfloat16 terms
// are widened exactly and the float32 sum rounded once to nearest even, as torch's float32
// buffer is when copied back (a NaN stays a NaN; its payload bits may differ from torch's, whose
// own vector and scalar conversions differ there). Each entry is independent: any split over
// threads gives the same bits.
#include <cmath>
#include <cstdint>

#include "lanes.h"
#include "threads.h"

namespace evomerge {
namespace {

constexpr int64_t kBlockEntries = 1 << 14;  // entries per task: 64 KB of each float32 term
constexpr int kMaxTerms = 18;
// From this size on (1 MB of float32, a core's L2) the sum is written around the cache (streaming
// stores: no read for ownership, no source evicted); a smaller one stays in cache for whatever
// reads it next. Measured on a 110 M-parameter model, one thread, all tensors: 1 << 18 took
// 0.073-0.085 s, 1 << 21 (only the embeddings streamed) 0.097-0.108 s, no streaming 0.102 s.
// (The TIES/Breadcrumbs pass does not stream: its refinement then scatters into evicted lines.)
constexpr int64_t kStreamEntries = 1 << 18;

// x86 without FMA: torch's default kernels multiply then add (two roundings); std::fma would
// differ from them, and be slow. The kernel declines there and the torch path sums.
#if defined(__x86_64__) && !defined(__FMA__)
constexpr bool kFused = false;
#else
constexpr bool kFused = true;
#endif

// Entries [lo, hi). N > 0: the term count known at compile time; N = 0: n_ of them.
template <int N, typename T>
void combine_range(const T* const* x, const float* c, int n_, int64_t lo, int64_t hi, bool stream, T* out) {
    const int n = N > 0 ? N : n_;
    int64_t j = lo;
#ifdef __AVX512F__
    stream = stream && sizeof(T) == 4 && (reinterpret_cast<uintptr_t>(out + lo) & 63) == 0;
    __m512 coeff[N > 0 ? N : kMaxTerms];
    for (int k = 0; k < n; ++k) coeff[k] = _mm512_set1_ps(c[k]);
    for (; j + 16 <= hi; j += 16) {
        __m512 acc = _mm512_mul_ps(load16(x[0], j), coeff[0]);
        for (int k = 1; k < n; ++k) acc = _mm512_fmadd_ps(load16(x[k], j), coeff[k], acc);
        if (stream)
            _mm512_stream_ps(reinterpret_cast<float*>(out + j), acc);
        else
            store16(acc, out, j);
    }
    if (stream) _mm_sfence();  // streamed stores are weakly ordered: visible before the task counts as done
#endif
    for (; j < hi; ++j) {  // the tail (and every entry without AVX-512)
        float acc = widen(x[0][j]) * c[0];
        for (int k = 1; k < n; ++k) acc = std::fma(widen(x[k][j]), c[k], acc);
        store(acc, out + j);
    }
}

template <typename T>
void combine(const T* const* x, const float* c, int n, int64_t numel, int threads, T* out) {
    const int64_t blocks = (numel + kBlockEntries - 1) / kBlockEntries;
    const bool stream = numel >= kStreamEntries;
    in_parallel(threads, blocks, [&](int64_t block) {
        const int64_t lo = block * kBlockEntries, hi = std::min(numel, lo + kBlockEntries);
        switch (n) {  // the common counts with their coefficients in registers
            case 2: return combine_range<2>(x, c, n, lo, hi, stream, out);
            case 3: return combine_range<3>(x, c, n, lo, hi, stream, out);
            case 4: return combine_range<4>(x, c, n, lo, hi, stream, out);
            default: return combine_range<0>(x, c, n, lo, hi, stream, out);
        }
    });
}

}  // namespace
}  // namespace evomerge

using namespace evomerge;

extern "C" {

// out[j] = Σ_k coeffs[k]·terms[k][j] over `numel` entries, all of one dtype (0 float32, 1
// bfloat16); 1 <= n <= 18; out may be one of the terms (each entry is read before it is written).
// Returns 0, 1 where this build declines (no FMA: see kFused), or -1 on bad arguments.
int evomerge_combine(int dtype, const void* const* terms, const float* coeffs, int n, int64_t numel, int threads,
                     void* out) {
    if (n < 1 || n > kMaxTerms || numel < 1 || threads < 1 || (dtype != 0 && dtype != 1)) return -1;
    if (!kFused) return 1;
    if (dtype == 0)
        combine(reinterpret_cast<const float* const*>(terms), coeffs, n, numel, threads, static_cast<float*>(out));
    else
        combine(reinterpret_cast<const uint16_t* const*>(terms), coeffs, n, numel, threads,
                static_cast<uint16_t*>(out));
    return 0;
}
}
