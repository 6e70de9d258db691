// Shared by the magnitude kernels (band_scan.cpp, band_merge.cpp): |δ| bit patterns formed
// exactly as torch forms δ = θ_i − θ_b (float32: one IEEE subtraction; bfloat16: the float32
// difference rounded to nearest even, NaN as 0x7FC0), a sample's bracket of the k-th largest, and
// the exact cut from the entries inside a bracket. Header-only; compiled into each library.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "lanes.h"
#include "threads.h"

namespace evomerge {

constexpr int64_t kBlock = 16;         // entries per vectorized step
constexpr int64_t kTile = 1 << 14;     // entries per tile: the base's tile stays in cache across experts
constexpr int kMaxSlots = 32;          // cuts per call
constexpr int kMaxExperts = 16;        // experts per call
constexpr int64_t kSampleBlocks = 64;  // contiguous blocks a sample is drawn in

inline uint32_t mag_f32(const float* e, const float* b, int64_t j) {
    float d = b ? e[j] - b[j] : e[j];
    uint32_t u;
    std::memcpy(&u, &d, 4);
    return u & 0x7FFFFFFFu;
}

// bfloat16 sources: the float32 δ of the exactly widened values (merge arithmetic 2), as float32.
inline uint32_t mag_bf16(const uint16_t* e, const uint16_t* b, int64_t j) {
    float d = b ? widen(e[j]) - widen(b[j]) : widen(e[j]);
    uint32_t u;
    std::memcpy(&u, &d, 4);
    return u & 0x7FFFFFFFu;
}

// mag_f32 / mag_bf16 by the sources' element type (a template argument of the scans).
template <typename T>
uint32_t mag(const T* e, const T* b, int64_t j);
template <>
inline uint32_t mag<float>(const float* e, const float* b, int64_t j) { return mag_f32(e, b, j); }
template <>
inline uint32_t mag<uint16_t>(const uint16_t* e, const uint16_t* b, int64_t j) { return mag_bf16(e, b, j); }

#ifdef __AVX2__
// 8 magnitudes from entry j (float32 or bfloat16 sources, as mags16 below).
template <typename T>
inline __m256i mags8(const T* e, const T* b, int64_t j) {
    __m256 d = load8(e, j);
    if (b) d = _mm256_sub_ps(d, load8(b, j));
    return _mm256_and_si256(_mm256_castps_si256(d), _mm256_set1_epi32(0x7FFFFFFF));
}

// AVX2 has no compress: row m of this table moves the lanes set in mask m to the front, in
// order (for _mm256_permutevar8x32_epi32).
struct Compress8 {
    alignas(32) int32_t lanes[256][8];
    Compress8() {
        for (int m = 0; m < 256; ++m) {
            int at = 0;
            for (int lane = 0; lane < 8; ++lane)
                if (m >> lane & 1) lanes[m][at++] = lane;
            while (at < 8) lanes[m][at++] = 0;
        }
    }
};

inline const Compress8& compress8() {
    static const Compress8 table;
    return table;
}
#endif

#ifdef __AVX512F__
// 16 magnitudes from entry j: float32 δ's bits without the sign.
inline __m512i mags16(const float* e, const float* b, int64_t j) {
    __m512 d = _mm512_loadu_ps(e + j);
    if (b) d = _mm512_sub_ps(d, _mm512_loadu_ps(b + j));
    return _mm512_and_si512(_mm512_castps_si512(d), _mm512_set1_epi32(0x7FFFFFFF));
}

// bfloat16: the float32 difference of the widened values, unrounded (merge arithmetic 2).
inline __m512i mags16(const uint16_t* e, const uint16_t* b, int64_t j) {
    __m512 d = load16(e, j);
    if (b) d = _mm512_sub_ps(d, load16(b, j));
    return _mm512_and_si512(_mm512_castps_si512(d), _mm512_set1_epi32(0x7FFFFFFF));
}
#endif

struct Slot {  // one cut of one expert: band [lo, hi] (inclusive, unsigned)
    int expert;
    uint32_t lo, hi;
};


// Order statistics of n unsigned values (left as they are): a histogram of their top bits over
// their range, made once, finds the bin holding any rank; nth_element on a copy of that bin
// finishes. About one pass per query after two, instead of nth_element's several over all n.
class Ranks {
   public:
    Ranks(const uint32_t* values, int64_t n) : values_(values), n_(n) {
        if (n_ <= 4096) return;  // small: nth_element on a copy of all
        uint32_t low = values[0], high = values[0];
        for (int64_t j = 0; j < n; ++j) {  // vectorizes (std::minmax_element does not)
            low = std::min(low, values[j]);
            high = std::max(high, values[j]);
        }
        lo_ = low;
        uint32_t span = high - low;
        while ((span >> shift_) >= 4096) ++shift_;
        above_.assign((span >> shift_) + 2, 0);  // above_[b]: values in bins above b
        std::vector<int64_t> hist((span >> shift_) + 1, 0);
        for (int64_t j = 0; j < n; ++j) ++hist[(values[j] - lo_) >> shift_];
        for (int64_t bin = int64_t(hist.size()) - 1; bin >= 0; --bin) above_[bin] = above_[bin + 1] + hist[bin];
    }

    // The k-th largest (1-based, 1 <= k <= n).
    uint32_t largest(int64_t k) const {
        auto larger = [](uint32_t a, uint32_t b) { return a > b; };
        if (n_ <= 4096) {
            std::vector<uint32_t> work(values_, values_ + n_);
            std::nth_element(work.begin(), work.begin() + (k - 1), work.end(), larger);
            return work[k - 1];
        }
        int64_t bin = 0;  // the highest bin with at least k values at or above it
        while (above_[bin + 1] >= k) ++bin;
        std::vector<uint32_t> inside(above_[bin] - above_[bin + 1] + 1);
        for (int64_t j = 0, m = 0; j < n_; ++j) {  // branch-free: the slot past the last is spare
            inside[m] = values_[j];
            m += ((values_[j] - lo_) >> shift_) == uint64_t(bin);
        }
        inside.pop_back();
        int64_t r = k - above_[bin + 1] - 1;
        std::nth_element(inside.begin(), inside.begin() + r, inside.end(), larger);
        return inside[r];
    }

   private:
    const uint32_t* values_;
    int64_t n_;
    uint32_t lo_ = 0;
    int shift_ = 0;
    std::vector<int64_t> above_;
};

// The cut of one slot from its band's entries (bits and indices in index order): the need-th
// largest bit pattern, and where ties at it stop being taken (index + 1 of the last taken; -1:
// all taken). False if fewer than need entries are given.
bool resolve(const uint32_t* bits, const uint32_t* index, int64_t count, int64_t need, uint32_t* value,
             int64_t* until) {
    if (need < 1 || need > count) return false;
    uint32_t v = Ranks(bits, count).largest(need);
    int64_t greater = 0, ties = 0;
    for (int64_t j = 0; j < count; ++j) {
        greater += bits[j] > v;
        ties += bits[j] == v;
    }
    int64_t take = need - greater;  // of the entries equal to v, the first `take` in index order
    *value = v;
    *until = -1;
    for (int64_t j = 0, seen = 0; take < ties && j < count; ++j)
        if (bits[j] == v && ++seen == take) {
            *until = int64_t(index[j]) + 1;
            break;
        }
    return true;
}

// resolve() for a slot whose expert has other cuts too: its bucket holds the entries of all their
// bands, so first keep those in this slot's band.
bool resolve_among(const uint32_t* bits, const uint32_t* index, int64_t count, const Slot& slot, int64_t need,
                   uint32_t* value, int64_t* until) {
    std::vector<uint32_t> mine, at;
    mine.reserve(count);
    at.reserve(count);
    for (int64_t j = 0; j < count; ++j)
        if (bits[j] - slot.lo <= slot.hi - slot.lo) {
            mine.push_back(bits[j]);
            at.push_back(index[j]);
        }
    return resolve(mine.data(), at.data(), int64_t(mine.size()), need, value, until);
}

// The sample's brackets of the k[t]-th largest of n entries (t < count) of one expert: bits in
// [lo, hi] unless the sample misleads, `width` binomial deviations of the rank either side of
// k's, and the number of entries expected inside each. One sample and one histogram serve all.
template <typename T, uint32_t (*Mag)(const T*, const T*, int64_t)>
void brackets(const T* e, const T* base, int64_t n, const int64_t* k, int count, int64_t sample, double width,
              int expert, Slot* out, int64_t* expected) {
    int64_t block = std::max<int64_t>(1, sample / kSampleBlocks);
    std::vector<uint32_t> drawn(block * kSampleBlocks);
    for (int64_t b = 0; b < kSampleBlocks; ++b) {  // contiguous blocks spread evenly over the tensor
        int64_t first = b * (n - block) / (kSampleBlocks - 1);
        uint32_t* into = drawn.data() + b * block;
        for (int64_t j = 0; j < block; ++j) into[j] = Mag(e, base, first + j);
    }
    const int64_t size = int64_t(drawn.size());
    const Ranks ranks(drawn.data(), size);
    for (int t = 0; t < count; ++t) {
        double p = double(k[t]) / double(n), rank = p * double(size);
        double spread = width * std::sqrt(double(size) * p * (1 - p)) + 2;
        int64_t hi_rank = int64_t(std::floor(rank - spread)), lo_rank = int64_t(std::ceil(rank + spread));
        uint32_t hi = hi_rank < 1 ? 0x7FFFFFFFu : ranks.largest(hi_rank);
        uint32_t lo = lo_rank > size ? 0u : ranks.largest(lo_rank);
        // entries expected inside: by rank, or more where the sample holds ties at the band's
        // edges (δ of 16-bit sources takes few distinct values: a band can be one value held by
        // a tenth of the tensor, which the rank estimate alone would under-provision)
        int64_t inside = 0;
        const uint32_t top = std::max(lo, hi);
        for (int64_t j = 0; j < size; ++j) inside += (drawn[j] - lo) <= (top - lo);
        expected[t] = int64_t(std::ceil(double(n) * double(std::max(std::min(lo_rank, size) - std::max<int64_t>(hi_rank, 0),
                                                                    inside)) / double(size)));
        out[t] = Slot{expert, lo, top};
    }
}

// brackets() for the slots of expert i (slot s: expert slot_expert[s], rank k[s]).
template <typename T, uint32_t (*Mag)(const T*, const T*, int64_t)>
void bracket_expert(const T* base, const T* const* experts, int i, int64_t n, const int* slot_expert, const int64_t* k,
                    int n_slots, int64_t sample, double width, Slot* slots, int64_t* expected) {
    int64_t ks[kMaxSlots], got[kMaxSlots];
    int mine[kMaxSlots], count = 0;
    for (int s = 0; s < n_slots; ++s)
        if (slot_expert[s] == i) mine[count] = s, ks[count++] = k[s];
    if (count == 0) return;
    Slot found[kMaxSlots];
    brackets<T, Mag>(experts[i], base, n, ks, count, sample, width, i, found, got);
    for (int t = 0; t < count; ++t) slots[mine[t]] = found[t], expected[mine[t]] = got[t];
}

}  // namespace evomerge
