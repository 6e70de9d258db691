// TIES / Breadcrumbs(-TIES) merges of float32 and bfloat16 tensors in one pass over the sources
// (workers/kernels/magnitude_merge.py). Their trims keep the top k of each expert's |δ|, so the cut is
// only known once every entry was read; a separate selection pass reads the sources twice. Here a
// sample brackets each cut (magnitude.h); the pass merges every entry whose magnitudes lie outside
// the brackets (its keep is already certain), counts the entries above each bracket and keeps the
// few inside one (index and values); the exact cuts then come from those, and only those entries
// are merged again. The arithmetic is eager's (workers/kernels/streaming.py), op for op, in float32 with
// no FMA contraction, so the result is bit-identical to the torch path. bfloat16 sources are
// widened exactly on load and the result rounded once on store (merge arithmetic 2): the float32
// merge of the widened sources, rounded.
#include "magnitude.h"

namespace evomerge {
namespace {

template <typename T>  // the sources' and output's element: float, or uint16_t for bfloat16
struct Plan {
    int n_experts;
    int64_t n;
    const T* base;
    const T* const* experts;
    T* out;
    float coef[kMaxExperts];    // per expert: the factor of its kept δ (eager's, rounded to float32)
    float weight[kMaxExperts];  // w_i, for the normalized election's divisor
    float scale;                // λ (election only)
    bool consensus, normalize;
    bool empty[kMaxExperts];    // keeps nothing
    int low[kMaxExperts];       // slot of the expert's low cut (keep the k largest), -1: none
    int high[kMaxExperts];      // slot of its high cut (drop the k largest), -1: none
    Slot slots[kMaxSlots];
    int n_slots;
};

struct Cut {  // entry j with bit pattern m is above the cut iff m >= value + (j >= until)
    uint32_t value;
    int64_t until;

    bool above(uint32_t m, int64_t j) const { return uint64_t(m) >= uint64_t(value) + (j >= until ? 1 : 0); }
};

// One entry by eager's ops: the sum θ_b·1 + Σ c_i·δ_i, or the TIES election of u_i = c_i·δ_i
// (P = Σ max(u_i, 0), N = Σ min(u_i, 0); N where P + N is negative, else P; normalized: divided by
// the agreeing experts' Σ w_i), then θ_b + λ·merged. Dropped entries are +0, as eager's bit mask.
template <typename T>
inline float merge1(const Plan<T>& p, float b, const float* e, const bool* keep) {
    if (!p.consensus) {
        float acc = b * 1.0f;
        for (int i = 0; i < p.n_experts; ++i) acc = acc + (keep[i] ? e[i] - b : 0.0f) * p.coef[i];
        return acc;
    }
    float u[kMaxExperts], pos = 0.0f, neg = 0.0f;
    for (int i = 0; i < p.n_experts; ++i) {
        u[i] = (keep[i] ? e[i] - b : 0.0f) * p.coef[i];
        float up = u[i] < 0.0f ? 0.0f : u[i], un = u[i] > 0.0f ? 0.0f : u[i];
        pos = i == 0 ? up : pos + up;
        neg = i == 0 ? un : neg + un;
    }
    float sum = pos + neg, merged = std::signbit(sum) ? neg : pos;
    if (p.normalize) {
        bool positive = sum >= 0.0f;
        float divisor = 0.0f;
        for (int i = 0; i < p.n_experts; ++i)
            divisor = divisor + ((positive ? u[i] > 0.0f : u[i] < 0.0f) ? 1.0f : 0.0f) * p.weight[i];
        merged = merged / (divisor == 0.0f ? 1.0f : divisor);
    }
    return b + merged * p.scale;
}

#ifdef __AVX512F__
// A plan's per-expert constants as vectors, for E experts (E > 0 known at compile time, so the
// loops unroll and everything stays in registers; 0: p.n_experts at run time).
template <int E>
struct Lanes {
    static constexpr int kCap = E ? E : kMaxExperts;
    int n;
    __m512 coef[kCap], weight[kCap], scale;
    __m512i lo[kCap][2], hi[kCap][2];  // per expert, per side (low, high cut): its bracket
    int slot[kCap][2];                 // the bracket's slot, -1: no such cut
    __mmask16 all[kCap];               // 0 where the expert keeps nothing

    template <typename T>
    explicit Lanes(const Plan<T>& p) : n(E ? E : p.n_experts), scale(_mm512_set1_ps(p.scale)) {
        for (int i = 0; i < n; ++i) {
            coef[i] = _mm512_set1_ps(p.coef[i]);
            weight[i] = _mm512_set1_ps(p.weight[i]);
            all[i] = p.empty[i] ? 0 : 0xFFFF;
            for (int side = 0; side < 2; ++side) {
                int s = side == 0 ? p.low[i] : p.high[i];
                slot[i][side] = s;
                lo[i][side] = _mm512_set1_epi32(s < 0 ? 0 : int32_t(p.slots[s].lo));
                hi[i][side] = _mm512_set1_epi32(s < 0 ? 0 : int32_t(p.slots[s].hi));
            }
        }
    }
};

// merge1 for 16 entries at once: the same ops in the same order (dk: the kept δ_i, +0 if dropped).
template <int E>
inline __m512 merge16(const Lanes<E>& l, bool consensus, bool normalize, __m512 b, const __m512* dk) {
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    if (!consensus) {
        __m512 acc = _mm512_mul_ps(b, one);
        for (int i = 0; i < l.n; ++i) acc = _mm512_add_ps(acc, _mm512_mul_ps(dk[i], l.coef[i]));
        return acc;
    }
    __m512 u[Lanes<E>::kCap], pos = zero, neg = zero;
    for (int i = 0; i < l.n; ++i) {
        u[i] = _mm512_mul_ps(dk[i], l.coef[i]);
        __m512 up = _mm512_mask_mov_ps(u[i], _mm512_cmp_ps_mask(u[i], zero, _CMP_LT_OQ), zero);
        __m512 un = _mm512_mask_mov_ps(u[i], _mm512_cmp_ps_mask(u[i], zero, _CMP_GT_OQ), zero);
        pos = i == 0 ? up : _mm512_add_ps(pos, up);
        neg = i == 0 ? un : _mm512_add_ps(neg, un);
    }
    __m512 sum = _mm512_add_ps(pos, neg);
    __m512 merged = _mm512_mask_mov_ps(pos, _mm512_movepi32_mask(_mm512_castps_si512(sum)), neg);
    if (normalize) {
        __mmask16 positive = _mm512_cmp_ps_mask(sum, zero, _CMP_GE_OQ);
        __m512 divisor = zero;
        for (int i = 0; i < l.n; ++i) {
            __mmask16 agree = (positive & _mm512_cmp_ps_mask(u[i], zero, _CMP_GT_OQ)) |
                              (__mmask16(~positive) & _mm512_cmp_ps_mask(u[i], zero, _CMP_LT_OQ));
            divisor = _mm512_add_ps(divisor, _mm512_mul_ps(_mm512_mask_mov_ps(zero, agree, one), l.weight[i]));
        }
        divisor = _mm512_mask_mov_ps(divisor, _mm512_cmp_ps_mask(divisor, zero, _CMP_EQ_OQ), one);
        merged = _mm512_div_ps(merged, divisor);
    }
    return _mm512_add_ps(b, _mm512_mul_ps(merged, l.scale));
}
#endif

struct Pending {  // one part's entries inside a bracket: index, base and expert values
    std::unique_ptr<uint32_t[]> index;
    std::unique_ptr<float[]> values;  // per source (base, then experts) cap entries: values[s * cap + q]
    int64_t cap = 0, size = 0, limit = 0;
    int sources = 0;
    bool full = false;
    std::vector<int64_t> above;  // per slot: entries above its bracket

    void allocate(int64_t entries) {  // not zeroed: only what the pass writes is read
        std::unique_ptr<uint32_t[]> at(new uint32_t[entries]);
        std::unique_ptr<float[]> vals(new float[sources * entries]);
        if (size > 0) {
            std::copy(index.get(), index.get() + size, at.get());
            for (int s = 0; s < sources; ++s) std::copy(&values[s * cap], &values[s * cap] + size, &vals[s * entries]);
        }
        index = std::move(at), values = std::move(vals), cap = entries;
    }

    // Room for `more` entries (16-lane stores write up to 16 past the last): grows the buffers, up
    // to `limit` (many ties at a cut put them all in its bracket); false past it.
    bool room(int64_t more) {
        if (size + more + kBlock <= cap) return true;
        if (size + more + kBlock > limit) return false;
        allocate(std::min(limit, std::max(2 * cap, size + more + kBlock)));
        return true;
    }
};

// Where entry j's keep is still open: some cut of some expert brackets its magnitude.
// keep[i] is the provisional keep (certain where no bracket holds the entry).
template <typename T>
inline bool classify1(const Plan<T>& p, const uint32_t* mag, bool* keep, int64_t* above) {
    bool open = false;
    for (int i = 0; i < p.n_experts; ++i) {
        keep[i] = !p.empty[i];
        for (int side = 0; side < 2; ++side) {
            int s = side == 0 ? p.low[i] : p.high[i];
            if (s < 0) continue;
            const Slot& c = p.slots[s];
            bool over = mag[i] > c.hi, under = mag[i] < c.lo;
            above[s] += over;
            open = open || !(over || under);
            keep[i] = keep[i] && (side == 0 ? over : under);
        }
    }
    return open;
}

#ifdef __AVX512F__
// The blocks of 16 from j to end (a multiple of 16 apart) of one tile, E experts (0: any).
template <int E, typename T>
void blocks(const Plan<T>& p, int64_t j, int64_t end, Pending& pend) {
    const Lanes<E> l(p);
    const bool consensus = p.consensus, normalize = p.normalize;
    const T* base = p.base;
    const T* src[Lanes<E>::kCap];
    float* keep_values[Lanes<E>::kCap + 1];
    for (int i = 0; i < l.n; ++i) src[i] = p.experts[i];
    for (int i = 0; i <= l.n; ++i) keep_values[i] = pend.values.get() + i * pend.cap;
    uint32_t* keep_index = pend.index.get();
    T* out = p.out;
    const __m512i sign_off = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t size = pend.size, over[Lanes<E>::kCap][2] = {};
    for (; j < end; j += kBlock) {
        __m512 b = load16(base, j), e[Lanes<E>::kCap], dk[Lanes<E>::kCap];
        __mmask16 open = 0;
        for (int i = 0; i < l.n; ++i) {
            e[i] = load16(src[i], j);
            __m512 d = _mm512_sub_ps(e[i], b);
            __m512i mag = _mm512_and_si512(_mm512_castps_si512(d), sign_off);
            __mmask16 keep = l.all[i];
            for (int side = 0; side < 2; ++side) {
                if (l.slot[i][side] < 0) continue;
                __mmask16 hi = _mm512_cmpgt_epu32_mask(mag, l.hi[i][side]);
                __mmask16 lo = _mm512_cmplt_epu32_mask(mag, l.lo[i][side]);
                over[i][side] += __builtin_popcount(hi);
                open |= __mmask16(~(hi | lo));
                keep &= side == 0 ? hi : lo;
            }
            dk[i] = _mm512_maskz_mov_ps(keep, d);
        }
        store16(merge16<E>(l, consensus, normalize, b, dk), out, j);
        // the open entries' index and values, 16 lanes stored whatever the count (no branch)
        _mm512_storeu_si512(keep_index + size, _mm512_maskz_compress_epi32(open, _mm512_add_epi32(iota, _mm512_set1_epi32(int32_t(j)))));
        _mm512_storeu_ps(keep_values[0] + size, _mm512_maskz_compress_ps(open, b));
        for (int i = 0; i < l.n; ++i) _mm512_storeu_ps(keep_values[1 + i] + size, _mm512_maskz_compress_ps(open, e[i]));
        size += __builtin_popcount(open);
    }
    pend.size = size;
    for (int i = 0; i < l.n; ++i)
        for (int side = 0; side < 2; ++side)
            if (l.slot[i][side] >= 0) pend.above[l.slot[i][side]] += over[i][side];
}
#endif

#ifdef __AVX512F__
// 16 results to their indices in out: float32 by a scatter, bfloat16 rounded then one by one
// (no 16-bit scatter; only the few open entries take this path).
inline void scatter16(float* out, __m512i at, __m512 v) { _mm512_i32scatter_ps(out, at, v, 4); }
inline void scatter16(uint16_t* out, __m512i at, __m512 v) {
    alignas(64) int32_t index[kBlock], bits[kBlock];
    _mm512_store_si512(index, at);
    _mm512_store_si512(bits, bf16_bits16(v));
    for (int64_t q = 0; q < kBlock; ++q) out[index[q]] = uint16_t(bits[q]);
}

// The open entries r0 .. r1 (a multiple of 16 apart) merged again with the exact cuts, scattered
// to their places in out.
template <int E, typename T>
void refine(const Plan<T>& p, const Cut* cuts, const Pending& pend, int64_t r0, int64_t r1) {
    const Lanes<E> l(p);
    const __m512i sign_off = _mm512_set1_epi32(0x7FFFFFFF), one = _mm512_set1_epi32(1);
    __m512i value[Lanes<E>::kCap][2], until[Lanes<E>::kCap][2];
    for (int i = 0; i < l.n; ++i)
        for (int side = 0; side < 2; ++side) {
            int s = l.slot[i][side];
            value[i][side] = _mm512_set1_epi32(s < 0 ? 0 : int32_t(cuts[s].value));
            until[i][side] = _mm512_set1_epi32(s < 0 ? INT32_MAX : int32_t(std::min<int64_t>(cuts[s].until, INT32_MAX)));
        }
    for (int64_t r = r0; r < r1; r += kBlock) {
        __m512i at = _mm512_loadu_si512(pend.index.get() + r);
        __m512 b = _mm512_loadu_ps(pend.values.get() + r), dk[Lanes<E>::kCap];
        for (int i = 0; i < l.n; ++i) {
            __m512 d = _mm512_sub_ps(_mm512_loadu_ps(pend.values.get() + (1 + i) * pend.cap + r), b);
            __m512i mag = _mm512_and_si512(_mm512_castps_si512(d), sign_off);
            __mmask16 keep = l.all[i];
            for (int side = 0; side < 2; ++side) {
                if (l.slot[i][side] < 0) continue;
                // above the cut: m >= value + (j >= until)
                __m512i threshold = _mm512_mask_add_epi32(value[i][side], _mm512_cmpge_epu32_mask(at, until[i][side]),
                                                          value[i][side], one);
                __mmask16 above = _mm512_cmpge_epu32_mask(mag, threshold);
                keep &= side == 0 ? above : __mmask16(~above);
            }
            dk[i] = _mm512_maskz_mov_ps(keep, d);
        }
        scatter16(p.out, at, merge16<E>(l, p.consensus, p.normalize, b, dk));
    }
}
#endif

template <typename T>
void pass(const Plan<T>& p, int64_t start, int64_t stop, Pending& pend) {
    for (int64_t tile = start; tile < stop; tile += kTile) {
        int64_t tile_end = std::min(stop, tile + kTile), j = tile;
        if (!pend.room(tile_end - tile)) {
            pend.full = true;  // a bracket holds a large share of the tensor: the caller takes the other path
            return;
        }
#ifdef __AVX512F__
        int64_t end = tile + (tile_end - tile) / kBlock * kBlock;
        switch (p.n_experts) {
            case 1: blocks<1, T>(p, j, end, pend); break;
            case 2: blocks<2, T>(p, j, end, pend); break;
            case 3: blocks<3, T>(p, j, end, pend); break;
            case 4: blocks<4, T>(p, j, end, pend); break;
            default: blocks<0, T>(p, j, end, pend);
        }
        j = end;
#endif
        for (; j < tile_end; ++j) {  // the tail (and every entry without AVX-512), branch-free too
            float b = widen(p.base[j]), e[kMaxExperts];
            uint32_t mag[kMaxExperts];
            bool keep[kMaxExperts];
            for (int i = 0; i < p.n_experts; ++i) {
                e[i] = widen(p.experts[i][j]);
                mag[i] = mag_f32(e + i, &b, 0);
            }
            bool open = classify1(p, mag, keep, pend.above.data());
            store(merge1(p, b, e, keep), &p.out[j]);
            pend.index[pend.size] = uint32_t(j);
            pend.values[pend.size] = b;
            for (int i = 0; i < p.n_experts; ++i) pend.values[(1 + i) * pend.cap + pend.size] = e[i];
            pend.size += open;
        }
    }
}

// The exact cut of slot s (rank k) from the open entries in index order (parts in order); false
// where its bracket missed the k-th entry.
template <typename T>
bool exact_cut(const Plan<T>& p, const std::vector<Pending>& pending, int s, int64_t k, Cut* cut) {
    const Slot& c = p.slots[s];
    int64_t need = k, open = 0, count = 0;
    for (const auto& pend : pending) open += pend.size;
    std::unique_ptr<uint32_t[]> bits(new uint32_t[open + 1]), at(new uint32_t[open + 1]);
    for (const auto& pend : pending) {  // this slot's bracket among the open entries, branch-free
        need -= pend.above[s];
        const float* b = pend.values.get();
        const float* e = pend.values.get() + (1 + c.expert) * pend.cap;
        for (int64_t q = 0; q < pend.size; ++q) {
            uint32_t m = mag_f32(e + q, b + q, 0);
            bits[count] = m;
            at[count] = pend.index[q];
            count += m - c.lo <= c.hi - c.lo;
        }
    }
    int64_t until = -1;
    bool found = resolve(bits.get(), at.get(), count, need, &cut->value, &until);
    cut->until = until < 0 ? INT64_MAX : until;
    return found;
}

// One part's open entries merged again with the exact keeps, written to their places in out.
template <typename T>
void refine_part(const Plan<T>& p, const Cut* cuts, const Pending& pend) {
    int64_t r = 0;
#ifdef __AVX512F__
    r = pend.size / kBlock * kBlock;
    switch (p.n_experts) {
        case 1: refine<1, T>(p, cuts, pend, 0, r); break;
        case 2: refine<2, T>(p, cuts, pend, 0, r); break;
        case 3: refine<3, T>(p, cuts, pend, 0, r); break;
        case 4: refine<4, T>(p, cuts, pend, 0, r); break;
        default: refine<0, T>(p, cuts, pend, 0, r);
    }
#endif
    for (; r < pend.size; ++r) {
        int64_t j = pend.index[r];
        float b = pend.values[r], e[kMaxExperts];
        bool keep[kMaxExperts];
        for (int i = 0; i < p.n_experts; ++i) {
            e[i] = pend.values[(1 + i) * pend.cap + r];
            uint32_t m = mag_f32(e + i, &b, 0);
            keep[i] = !p.empty[i] && (p.low[i] < 0 || cuts[p.low[i]].above(m, j)) &&
                      (p.high[i] < 0 || !cuts[p.high[i]].above(m, j));
        }
        store(merge1(p, b, e, keep), &p.out[j]);
    }
}

// The exact band merge (see evomerge_band_merge) of one source element type.
template <typename T>
int band_merge(const T* base, const T* const* experts, int n_experts, int64_t n, T* out,
               const int64_t* low_k, const int64_t* high_k, const float* coef, const float* weight,
               float scale, int consensus, int normalize, int64_t sample, double width, int threads) {
    Plan<T> p{};
    p.n_experts = n_experts, p.n = n, p.base = base, p.experts = experts, p.out = out, p.scale = scale;
    p.consensus = consensus != 0, p.normalize = normalize != 0;
    int64_t ks[kMaxSlots];
    for (int i = 0; i < n_experts; ++i) {
        p.coef[i] = coef[i], p.weight[i] = weight[i], p.empty[i] = low_k[i] < 0, p.low[i] = p.high[i] = -1;
        for (int side = 0; side < 2; ++side) {
            int64_t k = side == 0 ? low_k[i] : high_k[i];
            if (k == 0 || (side == 0 && k < 0)) continue;
            if (k < 0 || k >= n || p.n_slots >= kMaxSlots) return -1;
            (side == 0 ? p.low : p.high)[i] = p.n_slots;
            p.slots[p.n_slots].expert = i;
            ks[p.n_slots++] = k;
        }
    }
    int slot_expert[kMaxSlots];
    for (int s = 0; s < p.n_slots; ++s) slot_expert[s] = p.slots[s].expert;
    int64_t expected[kMaxSlots] = {}, parts = std::max<int64_t>(1, std::min<int64_t>(threads, n / kTile));
    std::vector<Pending> pending(parts);
    Cut cuts[kMaxSlots];
    bool ok[kMaxSlots];
    bool merged = true;  // read and written by thread 0 only, between barriers
    team(threads, [&](int t, Barrier& sync) {
        for (int i = t; i < n_experts; i += threads)  // 1. the brackets
            bracket_expert<T, mag<T>>(base, experts, i, n, slot_expert, ks, p.n_slots, sample, width, p.slots,
                                      expected);
        sync.wait();
        int64_t total = 0;
        for (int s = 0; s < p.n_slots; ++s) total += expected[s];
        for (int64_t q = t; q < parts; q += threads) {  // 2. the pass, one part per thread
            Pending& pend = pending[q];
            pend.sources = 1 + n_experts;
            pend.limit = n / parts / 4 + kTile + 4 * kBlock;
            pend.allocate(std::min(pend.limit, 2 * total / parts + kTile + 4 * kBlock));
            pend.above.assign(p.n_slots, 0);
            pass(p, n * q / parts, n * (q + 1) / parts, pend);
        }
        sync.wait();
        bool full = std::any_of(pending.begin(), pending.end(), [](const Pending& pend) { return pend.full; });
        for (int s = t; s < p.n_slots && !full; s += threads) ok[s] = exact_cut(p, pending, s, ks[s], &cuts[s]);
        sync.wait();  // 3. the exact cuts (each slot on one thread)
        if (full || !std::all_of(ok, ok + p.n_slots, [](bool b) { return b; })) {
            if (t == 0) merged = false;
            return;  // every thread decides alike: none waits at a barrier again
        }
        for (int64_t q = t; q < parts; q += threads) refine_part(p, cuts, pending[q]);  // 4. the open entries
    });
    return merged ? 1 : 0;
}

}  // namespace
}  // namespace evomerge

using namespace evomerge;

extern "C" {

// θ_b + λ·merge of trimmed task vectors into out, in one pass (dtype 0 float32, 1 bfloat16; n < 2^31). Per expert i:
// coef[i], weight[i]; low_k[i] > 0 keeps its low_k largest |δ| (0: no low cut; -1: keeps nothing),
// high_k[i] > 0 drops its high_k largest (0: none); every k < n. consensus: the TIES election
// (normalize: the agreeing weights' mean), else the sum. Brackets: a sample of `sample` entries,
// `width` binomial deviations. Returns 1 when out holds the merge, 0 when a bracket missed its cut
// or held too many entries (out is then partly written: the caller merges another way), 2 when
// this build declines (no AVX-512: nothing written), -1 on bad arguments.
int evomerge_band_merge(int dtype, const void* base, const void* const* experts, int n_experts, int64_t n, void* out,
                        const int64_t* low_k, const int64_t* high_k, const float* coef, const float* weight,
                        float scale, int consensus, int normalize, int64_t sample, double width, int threads) {
    if (n_experts < 1 || n_experts > kMaxExperts || n < 2 || n >= (int64_t(1) << 31) || threads < 1 ||
        sample < 1 || sample > n || !(width > 0) || (dtype != 0 && dtype != 1))
        return -1;
#ifndef __AVX512F__
    // Built without AVX-512 (an AVX2 cluster node, EVOMERGE_NATIVE_ARCH=x86-64-v3) the one pass runs
    // its scalar path, ~25 ns/param: the selection plus the compiled merge (~6.5) is faster.
    return 2;
#endif
    if (dtype == 0)
        return band_merge<float>(static_cast<const float*>(base), reinterpret_cast<const float* const*>(experts),
                                 n_experts, n, static_cast<float*>(out), low_k, high_k, coef, weight, scale, consensus,
                                 normalize, sample, width, threads);
    return band_merge<uint16_t>(static_cast<const uint16_t*>(base), reinterpret_cast<const uint16_t* const*>(experts),
                                n_experts, n, static_cast<uint16_t*>(out), low_k, high_k, coef, weight, scale,
                                consensus, normalize, sample, width, threads);
}
}
