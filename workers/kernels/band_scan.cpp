// The exact magnitude selection of workers/kernels/selection.py: for several (expert, k), one pass over
// every expert counts the entries whose |δ| bits lie above each cut's sampled bracket and collects
// those inside it, then the k-th is selected among the few collected. Plain C ABI, loaded with
// ctypes (workers/kernels/native.py builds it with -O3 -march=native -ffp-contract=off); no torch headers.
#include "magnitude.h"

namespace evomerge {
namespace {

struct Bucket {  // one expert's entries inside any of its bands, of one part, in the caller's buffer
    uint32_t* bits;
    uint32_t* index;
    int64_t capacity;   // entries the region holds
    int64_t size = 0;   // entries inside a band (counted on past the capacity)
    bool full = false;  // the region ran out: only counting from then on

    // Before `more` entries: whether they can all be stored (16-lane stores write up to 16 past
    // the last); once not, the bucket only counts.
    void room(int64_t more) { full = full || size + more + kBlock > capacity; }
};

template <typename T, uint32_t (*Mag)(const T*, const T*, int64_t)>
void scan(const T* base, const T* const* experts, int n_experts, const Slot* slots, int n_slots,
          int64_t start, int64_t stop, Bucket* buckets, int64_t* above) {
    for (int64_t tile = start; tile < stop; tile += kTile) {
        int64_t tile_end = std::min(stop, tile + kTile);
        for (int i = 0; i < n_experts; ++i) buckets[i].room(tile_end - tile);
        int64_t j = tile;
#ifdef __AVX512F__
        const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        int64_t over[kMaxSlots] = {};
        for (; j + kBlock <= tile_end; j += kBlock) {  // every expert per block: one stream each
            for (int i = 0; i < n_experts; ++i) {
                __m512i m = mags16(experts[i], base, j);
                __mmask16 in = 0;
                for (int s = 0; s < n_slots; ++s) {  // each cut: count above its band, mark inside
                    if (slots[s].expert != i) continue;
                    over[s] += __builtin_popcount(_mm512_cmpgt_epu32_mask(m, _mm512_set1_epi32(int32_t(slots[s].hi))));
                    in |= _mm512_cmple_epu32_mask(_mm512_sub_epi32(m, _mm512_set1_epi32(int32_t(slots[s].lo))),
                                                  _mm512_set1_epi32(int32_t(slots[s].hi - slots[s].lo)));
                }
                Bucket& f = buckets[i];
                if (!f.full) {  // all 16 lanes stored whatever the count: no branch to mispredict
                    __m512i at = _mm512_add_epi32(iota, _mm512_set1_epi32(int32_t(j)));
                    _mm512_storeu_si512(f.bits + f.size, _mm512_maskz_compress_epi32(in, m));
                    _mm512_storeu_si512(f.index + f.size, _mm512_maskz_compress_epi32(in, at));
                }
                f.size += __builtin_popcount(in);
            }
        }
        for (int s = 0; s < n_slots; ++s) above[s] += over[s];
#elif defined(__AVX2__)
        // 8 lanes (an AVX2 node: Zen 2/3, x86-64-v3 builds). Magnitudes and bands lie in
        // [0, 2^31), so signed compares order them as the unsigned ones above.
        const Compress8& table = compress8();
        const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        int64_t over[kMaxSlots] = {};
        for (; j + 8 <= tile_end; j += 8) {
            for (int i = 0; i < n_experts; ++i) {
                __m256i m = mags8(experts[i], base, j);
                int in = 0;  // lanes inside some band of this expert
                for (int s = 0; s < n_slots; ++s) {
                    if (slots[s].expert != i) continue;
                    __m256i over_hi = _mm256_cmpgt_epi32(m, _mm256_set1_epi32(int32_t(slots[s].hi)));
                    __m256i under_lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(slots[s].lo)), m);
                    over[s] += __builtin_popcount(unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(over_hi))));
                    in |= ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(over_hi, under_lo))) & 0xFF;
                }
                Bucket& f = buckets[i];
                if (!f.full) {  // all 8 lanes stored whatever the count, as the AVX-512 path
                    __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.lanes[in]));
                    __m256i at = _mm256_add_epi32(iota, _mm256_set1_epi32(int32_t(j)));
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(f.bits + f.size), _mm256_permutevar8x32_epi32(m, order));
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(f.index + f.size), _mm256_permutevar8x32_epi32(at, order));
                }
                f.size += __builtin_popcount(unsigned(in));
            }
        }
        for (int s = 0; s < n_slots; ++s) above[s] += over[s];
#endif
        for (; j < tile_end; ++j)
            for (int i = 0; i < n_experts; ++i) {  // branch-free as well
                uint32_t m = Mag(experts[i], base, j);
                bool in = false;
                for (int s = 0; s < n_slots; ++s) {
                    if (slots[s].expert != i) continue;
                    above[s] += m > slots[s].hi;
                    in = in || (m - slots[s].lo) <= slots[s].hi - slots[s].lo;
                }
                Bucket& f = buckets[i];
                if (!f.full) {
                    f.bits[f.size] = m;
                    f.index[f.size] = uint32_t(j);
                }
                f.size += in;
            }
    }
}

template <typename T, uint32_t (*Mag)(const T*, const T*, int64_t)>
void select_cuts(const T* base, const T* const* experts, int n_experts, int64_t n, const int* slot_expert,
            const int64_t* k, int n_slots, int64_t sample, double width, int threads, uint32_t* value, int64_t* until,
            int* ok) {
    Slot slots[kMaxSlots];
    int64_t expected[kMaxSlots];
    in_parallel(threads, n_experts, [&](int64_t i) {
        bracket_expert<T, Mag>(base, experts, int(i), n, slot_expert, k, n_slots, sample, width, slots, expected);
    });
    // scratch: per expert a region for the entries of its bands (twice those expected), each part
    // of the tensor (one per thread) filling its own share of it
    int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n / kTile)), cap = 0;
    for (int i = 0; i < n_experts; ++i) {
        int64_t mine = 0;
        for (int s = 0; s < n_slots; ++s) mine += slots[s].expert == i ? expected[s] : 0;
        cap = std::max(cap, 2 * mine + parts * (kTile + 4 * kBlock));
    }
    std::unique_ptr<uint32_t[]> bits(new uint32_t[n_experts * cap]), index(new uint32_t[n_experts * cap]);  // not zeroed
    std::vector<std::vector<Bucket>> buckets(parts);
    std::vector<std::vector<int64_t>> above(parts, std::vector<int64_t>(n_slots, 0));
    for (int64_t p = 0; p < parts; ++p)
        for (int i = 0; i < n_experts; ++i) {
            int64_t first = i * cap + cap * p / parts;
            buckets[p].push_back(Bucket{&bits[first], &index[first], cap * (p + 1) / parts - cap * p / parts});
        }
    in_parallel(threads, parts, [&](int64_t p) {
        scan<T, Mag>(base, experts, n_experts, slots, n_slots, n * p / parts, n * (p + 1) / parts, buckets[p].data(),
                     above[p].data());
    });
    std::vector<int64_t> count(n_experts);
    std::vector<bool> full(n_experts, false);
    for (int i = 0; i < n_experts; ++i) {  // close the gaps between the parts' shares, in part order
        int64_t seen = 0;
        for (int64_t p = 0; p < parts; ++p) {
            const Bucket& f = buckets[p][i];
            full[i] = full[i] || f.full;
            if (!full[i]) {
                std::memmove(&bits[i * cap + seen], f.bits, f.size * sizeof(uint32_t));
                std::memmove(&index[i * cap + seen], f.index, f.size * sizeof(uint32_t));
            }
            seen += f.size;
        }
        count[i] = seen;
    }
    in_parallel(threads, n_slots, [&](int64_t s) {
        int i = slots[s].expert;
        int64_t need = k[s];
        for (int64_t p = 0; p < parts; ++p) need -= above[p][s];
        bool alone = std::count_if(slots, slots + n_slots, [i](const Slot& o) { return o.expert == i; }) == 1;
        const uint32_t *b = &bits[i * cap], *at = &index[i * cap];
        ok[s] = !full[i] && (alone ? resolve(b, at, count[i], need, value + s, until + s)
                                   : resolve_among(b, at, count[i], slots[s], need, value + s, until + s));
    });
}

}  // namespace
}  // namespace evomerge

using namespace evomerge;

extern "C" {

// The exact cuts of several (expert, k) by one pass over every expert: dtype 0 float32, 1
// bfloat16; n < 2^31; base may be null (δ = θ_i). Slot s: expert slot_expert[s] and the k[s]-th
// largest of its |δ| bit patterns (0 < k[s] < n), bracketed by a sample of `sample` entries with
// a band of `width` binomial deviations. Writes value[s] and until[s] (the index + 1 where ties
// at the value stop being taken, -1: none) with ok[s] = 1, or ok[s] = 0 where the band missed the
// k-th entry (the caller retries wider, or selects otherwise). Returns 0, or -1 on bad arguments.
int evomerge_select(int dtype, const void* base, const void* const* experts, int n_experts, int64_t n,
                    const int* slot_expert, const int64_t* k, int n_slots, int64_t sample, double width, int threads,
                    uint32_t* value, int64_t* until, int* ok) {
    if (n_slots <= 0 || n_slots > kMaxSlots || n < 2 || n >= (int64_t(1) << 31) || threads < 1 || sample < 1 ||
        sample > n || !(width > 0) || (dtype != 0 && dtype != 1))
        return -1;
    for (int s = 0; s < n_slots; ++s)
        if (slot_expert[s] < 0 || slot_expert[s] >= n_experts || k[s] < 1 || k[s] >= n) return -1;
    if (dtype == 0)
        select_cuts<float, mag_f32>(static_cast<const float*>(base), reinterpret_cast<const float* const*>(experts),
                               n_experts, n, slot_expert, k, n_slots, sample, width, threads, value, until, ok);
    else
        select_cuts<uint16_t, mag_bf16>(static_cast<const uint16_t*>(base),
                                   reinterpret_cast<const uint16_t* const*>(experts), n_experts, n, slot_expert, k,
                                   n_slots, sample, width, threads, value, until, ok);
    return 0;
}
}
