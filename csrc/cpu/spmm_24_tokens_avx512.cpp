// Token-lane AVX-512 kernels of the CPU 2:4 GEMM (driver: spmm_24.cpp; interface: spmm_24.h), used from M >= a
// threshold (decode-to-prefill batches). Compiled with function target attributes; called only after cpuid.
//
// Why a second family: the row kernels (spmm_24_avx512.cpp) put K in the vector lanes, so every 32 kept products
// cost a permute (the gather of x by the codes) plus a multiply-add, per activation row. From M ~ 8 on that issue
// rate, not memory, bounds them, and a dense vdpbf16ps GEMM (1 instruction per 32 dense products) catches up. Here
// the lanes run over 16 tokens instead:
//   out[n, t..t+15] += w[n, kept] * x^T[column, t..t+15]
// so the gather becomes an address computed once per (weight row, group) from its code and shared by all 16 lanes,
// and no horizontal reduction is needed. Per (row, group) and 16 tokens:
//   fp32 table (float32 weights; float16 / bfloat16 weights widened where AVX512_BF16 is absent): two broadcasts
//     and two FMAs — one instruction per 16 kept products, half of a dense FMA GEMM's count.
//   pair table (bfloat16 with AVX512_BF16; int8 as int16 pairs with or without VNNI): the group's two kept values
//     are adjacent in `values`, i.e. one 32-bit pair; the table stores, for each of the 6 valid codes, the matching
//     pair of x columns for 16 tokens (64 bytes), so ONE vdpbf16ps / vpdpwssd does 32 kept products — half of a
//     dense vdpbf16ps GEMM's count for the same output.
// Register tile: up to 4 weight rows x 4 token blocks (64 tokens), two accumulator sets. The table is walked in
// chunks of kChunkGroups groups, so a chunk of all 4 token blocks (<= 384 KB, contiguous by the table layout) stays
// in L2 while the 32 weight rows of the driver's tile stream through; partial sums park in a small per-tile buffer
// between chunks.
// Codes must be valid (as compress_24 writes them and the format loaders check); an invalid code reads slot 0.
#include <immintrin.h>

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/spmm_24.h"

#define SK_TOK_BASE "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"
#define SK_TOK __attribute__((target(SK_TOK_BASE)))
#define SK_TOK_BF16 __attribute__((target(SK_TOK_BASE ",avx512bf16")))
#define SK_TOK_VNNI __attribute__((target(SK_TOK_BASE ",avx512vnni")))

namespace sparsekern {
namespace cpu {
namespace spmm {
namespace {

constexpr int kR = 4;                 // weight rows per register tile
constexpr int kT = 4;                 // token blocks (of 16) per register tile
constexpr int64_t kSumGroups = 64;     // groups summed in registers before adding into the partial sums (even)
constexpr int64_t kChunkGroups = 256;  // groups per L2 chunk of the table (even: micro kernels start at even groups)
constexpr int64_t kTileRows = kTileN;  // the largest tile the driver hands over (spmm_24.h)
constexpr int64_t kTileTokens = kT * kTokenBlock;

// code -> table slot (kSlotCodes order); invalid codes -> 0.
constexpr std::array<uint8_t, 16> make_slot_of() {
  std::array<uint8_t, 16> s{};
  for (int i = 0; i < 6; ++i) s[kSlotCodes[i]] = static_cast<uint8_t>(i);
  return s;
}
constexpr std::array<uint8_t, 16> kSlotOf = make_slot_of();


// ------------------------------------------------------------------------------------------------- code tables
// Both micro kernels walk groups two at a time (one code byte) and turn the byte into table byte offsets with one
// lookup, relative to the table entry of the even group g:
//   pair table: pair[byte] = {slot(lo), slot(hi)} * 64 (an entry is 6 slots x 64 bytes)
//   fp32 table: quad[byte] = {i0(lo), i1(lo), i0(hi), i1(hi)} * 64 (an entry is 4 columns x 64 bytes)
// (the odd group's offsets are relative to its own entries, which follow the even group's T entries).
// That keeps the scalar work per (row, group) at ~3 instructions next to the vector multiply-adds.
struct OffTables {
  uint16_t pair[256][2];
  uint16_t quad[256][4];
};
constexpr OffTables make_off_tables() {
  OffTables t{};
  for (int b = 0; b < 256; ++b) {
    const int lo = b & 0xF, hi = b >> 4;
    t.pair[b][0] = static_cast<uint16_t>(kSlotOf[lo] * 64);
    t.pair[b][1] = static_cast<uint16_t>(kSlotOf[hi] * 64);
    t.quad[b][0] = static_cast<uint16_t>((lo & 3) * 64);
    t.quad[b][1] = static_cast<uint16_t>(((lo >> 2) & 3) * 64);
    t.quad[b][2] = static_cast<uint16_t>((hi & 3) * 64);
    t.quad[b][3] = static_cast<uint16_t>(((hi >> 2) & 3) * 64);
  }
  return t;
}
constexpr OffTables kOff = make_off_tables();

// ------------------------------------------------------------------------------------------------- micro kernels
// Each adds, for weight rows n..n+R-1 and token blocks b..b+T-1, the products of groups [g0, g1) (g0 even) into the
// tile's partial sums scr (row r at scr[r * kTileTokens + 16 * t]; first: scr is written, not added to). A call's
// sum starts from zero in registers, so a long K is summed in blocks of one chunk (better rounding than one running
// sum). Two accumulator sets (even / odd group) keep two independent multiply-add chains per output vector.

// Scalar float of a stored weight (fp32-table kernels).
struct WF32 {
  using wt = float;
  static inline float at(const wt* v, int64_t i) { return v[i]; }
};
struct WBF16 {
  using wt = uint16_t;
  static inline float at(const wt* v, int64_t i) {
    const uint32_t bits = static_cast<uint32_t>(v[i]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};
struct WF16 {
  using wt = uint16_t;
  static inline float at(const wt* v, int64_t i) {
    return static_cast<float>(c10::Half(v[i], c10::Half::from_bits()));
  }
};

template <class W, int R, int T>
SK_TOK void micro_f32(const Problem& p, int64_t n, int64_t b, int64_t g0, int64_t g1, float* scr, bool first) {
  constexpr int64_t E = 256, bs = E, hi = T * E;  // entry bytes; next token block; group g + 1's entries
  const int64_t half_k = p.K / 2;
  const char* tbl = static_cast<const char*>(p.x) + b * (p.K / 4) * E;  // this token tile's region
  const typename W::wt* v[R];
  const uint8_t* c[R];
  for (int r = 0; r < R; ++r) {
    v[r] = static_cast<const typename W::wt*>(p.values) + (n + r) * half_k;
    c[r] = p.codes + (n + r) * p.code_stride;
  }
  // Two accumulator sets while they fit the 32 registers next to the broadcasts (R * T <= 8), else one.
  constexpr bool kTwo = R * T <= 8;
  __m512 a0[R][T], a1_own[R][T];
  __m512(&a1)[R][T] = kTwo ? a1_own : a0;
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) a0[r][t] = a1_own[r][t] = _mm512_setzero_ps();
  const int64_t ge = g0 + ((g1 - g0) & ~int64_t{1});
  for (int64_t g = g0; g < ge; g += 2) {
    const char* tg = tbl + g * T * E;  // group g's T entries (4 columns x 16 tokens x 4 bytes each), then g + 1's
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint16_t* o = kOff.quad[c[r][g >> 1]];
      const char* p0 = tg + o[0];
      const char* p1 = tg + o[1];
      const char* p2 = tg + hi + o[2];
      const char* p3 = tg + hi + o[3];
      const __m512 w0 = _mm512_set1_ps(W::at(v[r], 2 * g));
      const __m512 w1 = _mm512_set1_ps(W::at(v[r], 2 * g + 1));
      const __m512 w2 = _mm512_set1_ps(W::at(v[r], 2 * g + 2));
      const __m512 w3 = _mm512_set1_ps(W::at(v[r], 2 * g + 3));
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        a0[r][t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(reinterpret_cast<const float*>(p0 + t * bs)), a0[r][t]);
        a1[r][t] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(reinterpret_cast<const float*>(p2 + t * bs)), a1[r][t]);
        a0[r][t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(reinterpret_cast<const float*>(p1 + t * bs)), a0[r][t]);
        a1[r][t] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(reinterpret_cast<const float*>(p3 + t * bs)), a1[r][t]);
      }
    }
  }
  if (ge < g1) {  // odd group count: the last group alone (its code is the low nibble)
    const char* tg = tbl + ge * T * E;
    for (int r = 0; r < R; ++r) {
      const uint16_t* o = kOff.quad[c[r][ge >> 1] & 0xF];
      const __m512 w0 = _mm512_set1_ps(W::at(v[r], 2 * ge));
      const __m512 w1 = _mm512_set1_ps(W::at(v[r], 2 * ge + 1));
      for (int t = 0; t < T; ++t) {
        a0[r][t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(reinterpret_cast<const float*>(tg + o[0] + t * bs)), a0[r][t]);
        a1[r][t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(reinterpret_cast<const float*>(tg + o[1] + t * bs)), a1[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float* d = scr + r * kTileTokens + 16 * t;
      const __m512 s = kTwo ? _mm512_add_ps(a0[r][t], a1[r][t]) : a0[r][t];
      _mm512_storeu_ps(d, first ? s : _mm512_add_ps(_mm512_loadu_ps(d), s));
    }
}

// Pair-table kernels: Ops::pair(values row, g) -> the group's two kept values as one 32-bit word (low = i0's);
// Ops::dp(acc, w, x) accumulates w.lo * x.lo + w.hi * x.hi per 32-bit lane.
struct BF16PairOps {
  using wt = uint16_t;
  using vec = __m512;
  using acc_t = float;
  static inline int pair(const wt* v, int64_t g) {
    int w;
    std::memcpy(&w, v + 2 * g, 4);
    return w;
  }
  SK_TOK_BF16 static inline vec zero() { return _mm512_setzero_ps(); }
  SK_TOK_BF16 static inline vec load(const acc_t* s) { return _mm512_loadu_ps(s); }
  SK_TOK_BF16 static inline void store(acc_t* s, vec a) { _mm512_storeu_ps(s, a); }
  SK_TOK_BF16 static inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  SK_TOK_BF16 static inline vec dp(vec a, __m512i w, __m512i x) {
    return _mm512_dpbf16_ps(a, (__m512bh)w, (__m512bh)x);
  }
};
struct I8PairOpsBase {
  using wt = int8_t;
  using vec = __m512i;
  using acc_t = int32_t;
  static inline int pair(const wt* v, int64_t g) {
    return static_cast<int>(static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(v[2 * g]))) |
                            (static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(v[2 * g + 1]))) << 16));
  }
};
struct I8PairOpsVnni : I8PairOpsBase {
  SK_TOK_VNNI static inline vec zero() { return _mm512_setzero_si512(); }
  SK_TOK_VNNI static inline vec load(const acc_t* s) { return _mm512_loadu_si512(s); }
  SK_TOK_VNNI static inline void store(acc_t* s, vec a) { _mm512_storeu_si512(s, a); }
  SK_TOK_VNNI static inline vec add(vec a, vec b) { return _mm512_add_epi32(a, b); }
  SK_TOK_VNNI static inline vec dp(vec a, __m512i w, __m512i x) { return _mm512_dpwssd_epi32(a, w, x); }
};
struct I8PairOps : I8PairOpsBase {
  SK_TOK static inline vec zero() { return _mm512_setzero_si512(); }
  SK_TOK static inline vec load(const acc_t* s) { return _mm512_loadu_si512(s); }
  SK_TOK static inline void store(acc_t* s, vec a) { _mm512_storeu_si512(s, a); }
  SK_TOK static inline vec add(vec a, vec b) { return _mm512_add_epi32(a, b); }
  SK_TOK static inline vec dp(vec a, __m512i w, __m512i x) { return _mm512_add_epi32(a, _mm512_madd_epi16(w, x)); }
};

#define SK_DEFINE_PAIR_MICRO(NAME, ATTR)                                                                          \
  template <class Ops, int R, int T>                                                                              \
  ATTR void NAME(const Problem& p, int64_t n, int64_t b, int64_t g0, int64_t g1, typename Ops::acc_t* scr,       \
                 bool first) {                                                                                    \
    constexpr int64_t E = 384, bs = E, hi = T * E; /* entry bytes; next token block; group g + 1's entries */     \
    const int64_t half_k = p.K / 2;                                                                               \
    const char* tbl = static_cast<const char*>(p.x) + b * (p.K / 4) * E; /* this token tile's region */          \
    const typename Ops::wt* v[R];                                                                                 \
    const uint8_t* c[R];                                                                                          \
    for (int r = 0; r < R; ++r) {                                                                                 \
      v[r] = static_cast<const typename Ops::wt*>(p.values) + (n + r) * half_k;                                   \
      c[r] = p.codes + (n + r) * p.code_stride;                                                                   \
    }                                                                                                             \
    constexpr bool kTwo = R * T <= 8; /* two accumulator sets while they fit the registers */                   \
    typename Ops::vec a0[R][T], a1_own[R][T];                                                                     \
    typename Ops::vec(&a1)[R][T] = kTwo ? a1_own : a0;                                                            \
    for (int r = 0; r < R; ++r)                                                                                   \
      for (int t = 0; t < T; ++t) a0[r][t] = a1_own[r][t] = Ops::zero();                                          \
    const int64_t ge = g0 + ((g1 - g0) & ~int64_t{1});                                                            \
    for (int64_t g = g0; g < ge; g += 2) {                                                                        \
      const char* tg = tbl + g * T * E; /* group g's T entries (6 slots x 16 tokens x 4 bytes), then g + 1's */   \
      _Pragma("GCC unroll 4")                                                                                     \
      for (int r = 0; r < R; ++r) {                                                                               \
        const uint16_t* o = kOff.pair[c[r][g >> 1]];                                                              \
        const char* pl = tg + o[0];                                                                               \
        const char* ph = tg + hi + o[1];                                                                          \
        const __m512i wl = _mm512_set1_epi32(Ops::pair(v[r], g));                                                 \
        const __m512i wh = _mm512_set1_epi32(Ops::pair(v[r], g + 1));                                             \
        _Pragma("GCC unroll 4")                                                                                   \
        for (int t = 0; t < T; ++t) {                                                                             \
          a0[r][t] = Ops::dp(a0[r][t], wl, _mm512_loadu_si512(pl + t * bs));                                      \
          a1[r][t] = Ops::dp(a1[r][t], wh, _mm512_loadu_si512(ph + t * bs));                                      \
        }                                                                                                         \
      }                                                                                                           \
    }                                                                                                             \
    if (ge < g1) { /* odd group count: the last group alone (its code is the low nibble) */                      \
      const char* tg = tbl + ge * T * E;                                                                          \
      for (int r = 0; r < R; ++r) {                                                                               \
        const char* pl = tg + kOff.pair[c[r][ge >> 1] & 0xF][0];                                                  \
        const __m512i wl = _mm512_set1_epi32(Ops::pair(v[r], ge));                                                \
        for (int t = 0; t < T; ++t) a0[r][t] = Ops::dp(a0[r][t], wl, _mm512_loadu_si512(pl + t * bs));            \
      }                                                                                                           \
    }                                                                                                             \
    for (int r = 0; r < R; ++r)                                                                                   \
      for (int t = 0; t < T; ++t) {                                                                               \
        typename Ops::acc_t* d = scr + r * kTileTokens + 16 * t;                                                  \
        const typename Ops::vec s = kTwo ? Ops::add(a0[r][t], a1[r][t]) : a0[r][t];                              \
        Ops::store(d, first ? s : Ops::add(Ops::load(d), s));                                                     \
      }                                                                                                           \
  }                                                                                                               \
  /* NAME##_tok<Ops>::At<R, T>::run: the tile table's entry for this micro kernel */                             \
  template <class Ops>                                                                                            \
  struct NAME##_tok {                                                                                             \
    template <int R, int T>                                                                                       \
    struct At {                                                                                                   \
      static void run(const Problem& p, int64_t n, int64_t b, int64_t g0, int64_t g1, typename Ops::acc_t* scr,   \
                      bool first) {                                                                               \
        NAME<Ops, R, T>(p, n, b, g0, g1, scr, first);                                                             \
      }                                                                                                           \
    };                                                                                                            \
  };

SK_DEFINE_PAIR_MICRO(micro_pairs_bf16, SK_TOK_BF16)
SK_DEFINE_PAIR_MICRO(micro_pairs_vnni, SK_TOK_VNNI)
SK_DEFINE_PAIR_MICRO(micro_pairs_base, SK_TOK)
#undef SK_DEFINE_PAIR_MICRO

// ------------------------------------------------------------------------------------------------- tiles
template <typename acc_t>
using TokMicroFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t, acc_t*, bool);

// Micro<R, T>::fn for R, T in 1..4, as a table indexed (R - 1) * kT + (T - 1).
template <typename acc_t, template <int, int> class Micro>
struct TokTable {
  template <int... Is>
  static constexpr std::array<TokMicroFn<acc_t>, sizeof...(Is)> make(std::integer_sequence<int, Is...>) {
    return {&Micro<Is / kT + 1, Is % kT + 1>::run...};
  }
  static constexpr std::array<TokMicroFn<acc_t>, kR * kT> table = make(std::make_integer_sequence<int, kR * kT>{});
};

// One driver tile [m0, m1) x [n0, n1): sub-tiles of <= kTileRows rows x <= kTileTokens tokens; per sub-tile the
// table is walked in L2 chunks, and every chunk runs all the sub-tile's weight rows in register tiles of kR rows.
template <typename acc_t, template <int, int> class Micro>
void token_tile(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* accv, int64_t ld) {
  acc_t* acc = static_cast<acc_t*>(accv);
  const auto& table = TokTable<acc_t, Micro>::table;
  const int64_t G = p.K / 4;
  alignas(64) acc_t scr[kTileRows * kTileTokens];
  for (int64_t ms = m0; ms < m1; ms += kTileTokens) {
    const int64_t me = std::min(m1, ms + kTileTokens);
    // The register tile's token blocks are the layout's: tile ms / 64 holds min(4, B - 4 * (ms / 64)) blocks.
    const int64_t b = ms / kTokenBlock, B = (p.M + kTokenBlock - 1) / kTokenBlock;
    const int T = static_cast<int>(std::min<int64_t>(kT, B - b));
    for (int64_t ns = n0; ns < n1; ns += kTileRows) {
      const int64_t ne = std::min(n1, ns + kTileRows);
      for (int64_t g0 = 0; g0 < G; g0 += kChunkGroups) {
        const int64_t g1 = std::min(G, g0 + kChunkGroups);
        for (int64_t n = ns; n < ne; n += kR) {
          const int R = static_cast<int>(std::min<int64_t>(kR, ne - n));
          // Register sums restart every kSumGroups groups (added into scr): fp32 rounding of a block sum, not of
          // one running sum over all of K.
          for (int64_t gs = g0; gs < g1; gs += kSumGroups) {
            table[(R - 1) * kT + (T - 1)](p, n, b, gs, std::min(g1, gs + kSumGroups), scr + (n - ns) * kTileTokens,
                                          gs == 0);
          }
        }
      }
      for (int64_t m = ms; m < me; ++m)
        for (int64_t n = ns; n < ne; ++n) acc[(m - m0) * ld + (n - n0)] = scr[(n - ns) * kTileTokens + (m - ms)];
    }
  }
}

template <class W>
struct F32Tok {
  template <int R, int T>
  struct At {
    static void run(const Problem& p, int64_t n, int64_t b, int64_t g0, int64_t g1, float* scr, bool first) {
      micro_f32<W, R, T>(p, n, b, g0, g1, scr, first);
    }
  };
};
// ------------------------------------------------------------------------------------------------- tables
// Plain C++ (the compiler vectorises what it can); a small share of a call: the table is ~3x (pairs) or 1x (fp32)
// the prepared activations, written once per call, against M x N x K / 32 multiply-add instructions.
// Token tile j (blocks 4j .. 4j + Tj - 1, Tj = min(4, B - 4j)) occupies bytes [4j * G * E, ...) of the table, its
// entry (group g, block t) at (g * Tj + t) * E: the T entries a register tile reads for one group are adjacent and a
// chunk of groups is one contiguous range (no cache-set conflicts between token blocks).
// fill(entry, tok, x4) writes token tok's part of one entry from x4 = the token's 4 columns of the group.
template <int kEntryBytes, typename XT, typename ET, class Fill>
void build_tiles(const XT* xp, int64_t ldx, int64_t M, int64_t K, char* table, int64_t j0, int64_t j1, Fill fill) {
  const int64_t G = K / 4, B = (M + kTokenBlock - 1) / kTokenBlock;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t Tj = std::min<int64_t>(kT, B - kT * j);
    char* base = table + kT * j * G * kEntryBytes;
    for (int64_t t = 0; t < Tj; ++t) {
      const XT* xb = xp + (kT * j + t) * kTokenBlock * ldx;
      for (int64_t g = 0; g < G; ++g) {
        ET* e = reinterpret_cast<ET*>(base + (g * Tj + t) * kEntryBytes);
        for (int tok = 0; tok < kTokenBlock; ++tok) fill(e, tok, xb + tok * ldx + 4 * g);
      }
    }
  }
}

}  // namespace

int64_t token_table_bytes(TokenTable t, int64_t M, int64_t K) {
  const int64_t B = (M + kTokenBlock - 1) / kTokenBlock;
  return B * (K / 4) * (t == TokenTable::kF32 ? 256 : 384);
}

int64_t token_tiles(int64_t M) { return (M + kT * kTokenBlock - 1) / (kT * kTokenBlock); }

void build_token_table(TokenTable t, const void* xp, int64_t ldx, int64_t M, int64_t K, void* table, int64_t j0,
                       int64_t j1) {
  char* tb = static_cast<char*>(table);
  if (t == TokenTable::kF32) {  // entry [4 columns][16 tokens] of float
    build_tiles<256, float, float>(static_cast<const float*>(xp), ldx, M, K, tb, j0, j1,
                                   [](float* e, int tok, const float* x4) {
                                     for (int c = 0; c < 4; ++c) e[16 * c + tok] = x4[c];
                                   });
  } else {  // entry [6 slots][16 tokens] of 32-bit (x[i0], x[i1]) pairs
    build_tiles<384, uint16_t, uint32_t>(static_cast<const uint16_t*>(xp), ldx, M, K, tb, j0, j1,
                                         [](uint32_t* e, int tok, const uint16_t* x4) {
                                           for (int sl = 0; sl < 6; ++sl) {
                                             const int i0 = kSlotCodes[sl] & 3, i1 = kSlotCodes[sl] >> 2;
                                             e[16 * sl + tok] = static_cast<uint32_t>(x4[i0]) |
                                                                (static_cast<uint32_t>(x4[i1]) << 16);
                                           }
                                         });
  }
}

// The M from which auto picks these kernels (per table kind: fp32, bf16 pairs, int8 pairs) and the measurements
// behind it: dispatch.cpp (kDefaultThresholds, tokens_*).
bool avx512_token_kernel(WType w, bool extensions, TokenKernel* out) {
  const CpuFeatures& f = cpu_features();
  if (!f.avx512) return false;
  const bool bf16 = extensions && f.avx512_bf16, vnni = extensions && f.avx512_vnni;
  using TT = TokenTable;
  static constexpr TokenKernel kernels[] = {
      {XType::kF32, TT::kF32, &token_tile<float, F32Tok<WF32>::At>, "avx512-tokens-f32"},
      {XType::kF32, TT::kF32, &token_tile<float, F32Tok<WF16>::At>, "avx512-tokens-f16"},
      {XType::kBF16, TT::kPairs16, &token_tile<float, micro_pairs_bf16_tok<BF16PairOps>::At>, "avx512-tokens-bf16-dp"},
      {XType::kF32, TT::kF32, &token_tile<float, F32Tok<WBF16>::At>, "avx512-tokens-bf16-f32"},
      {XType::kI16, TT::kPairs16, &token_tile<int32_t, micro_pairs_vnni_tok<I8PairOpsVnni>::At>, "avx512-tokens-i8-vnni"},
      {XType::kI16, TT::kPairs16, &token_tile<int32_t, micro_pairs_base_tok<I8PairOps>::At>, "avx512-tokens-i8"},
  };
  const int i = w == WType::kF32 ? 0 : w == WType::kF16 ? 1 : w == WType::kBF16 ? (bf16 ? 2 : 3) : (vnni ? 4 : 5);
  *out = kernels[i];
  return true;
}

}  // namespace spmm
}  // namespace cpu
}  // namespace sparsekern
