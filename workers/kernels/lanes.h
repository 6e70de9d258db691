// float32 and bfloat16 values as torch reads and rounds them, one at a time, 8 at a time (AVX2)
// and 16 at a time (AVX-512): bfloat16 widened exactly (its bits are a float32's upper half),
// float32 rounded to bfloat16 to nearest even with NaN as 0x7FC0 (c10's round_to_nearest_even).
// Header-only.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace evomerge {

inline float widen(float x) { return x; }
inline float widen(uint16_t x) {
    uint32_t u = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t bf16_bits(float v) {
    if (v != v) return 0x7FC0;
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return uint16_t((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16);
}

inline void store(float v, float* out) { *out = v; }
inline void store(float v, uint16_t* out) { *out = bf16_bits(v); }

#ifdef __AVX2__
inline __m256 load8(const float* x, int64_t j) { return _mm256_loadu_ps(x + j); }
inline __m256 load8(const uint16_t* x, int64_t j) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
#endif

#ifdef __AVX512F__
inline __m512 load16(const float* x, int64_t j) { return _mm512_loadu_ps(x + j); }
inline __m512 load16(const uint16_t* x, int64_t j) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// bf16_bits of 16 values, each in the low half of a 32-bit lane.
inline __m512i bf16_bits16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                    _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

inline void store16(__m512 v, float* out, int64_t j) { _mm512_storeu_ps(out + j, v); }
inline void store16(__m512 v, uint16_t* out, int64_t j) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm512_cvtepi32_epi16(bf16_bits16(v)));
}
#endif

}  // namespace evomerge
