// The AMX kernel family of spmm_24 (SPARSEKERN_CPU_SPMM_LAYOUT=amx; auto from amx_*_min_m rows, dispatch.cpp):
// bfloat16 with AMX-BF16 (tdpbf16ps, fp32 accumulation) and int8 with AMX-INT8 (tdpbssd, exact int32), on Intel Xeon
// from Sapphire Rapids on. The 2:4 weight is decompressed per n-tile into a small thread-local panel (no dense copy of
// the whole weight is ever kept) and the tile unit multiplies it densely: it does ~8x the multiply-adds per cycle of
// AVX512_BF16, so dense math on the zeros beats exploiting the sparsity in vector registers from M ~ 8-12 rows.
//
// Operand choice: the tile instructions compute C[16][16] += A[16][K] . B[K][16] with B in "VNNI" layout (B row r
// holds, per output column, the 2 (bf16) or 4 (int8) consecutive k of k-quantum r). Two ways:
//   (a) C^T = W . X^T: A = rows of the decompressed W (a per-row vpexpand, no transpose), B = X in VNNI layout
//       (prepared per call, O(MK)), but every C tile comes out as [n][m] and must be transposed into acc[m][n]: one
//       16x16 transpose per C tile, i.e. per K/32 tile multiply-adds (~25 % extra at K = 576, for every M).
//   (b) C = X . W^T (this file): A = x itself (row-major), B = the weight panel in VNNI layout, C tiles stored
//       straight to the output rows (no output transpose, no per-call x layout). The panel's layout costs one 16x16
//       32-bit transpose per 16 weight rows x 64 bytes of K, paid once per n-tile and slab and shared by its M / 16
//       row blocks (measured 4-6 % of the call at M = 1024-2048, ~25 % at M = 256: the cost of this choice at small M).
//   (b) is the one here: at prefill sizes M >> 16 and (a)'s output transposes do not shrink with M.
// Panel: per n-tile of 32 or 64 weight rows (the driver's choice, amx_tile_n), built at m0 == 0 and reused for the
// later row blocks of the tile (the driver's contract, spmm_24.h): [column subtile][Kq k-quanta][16 columns] 32-bit
// words, Kq = chunks * 16 where a chunk is 32 bf16 / 64 int8 columns; a row's chunk is decompressed with one
// vpexpandw / vpexpandb (AVX512_VBMI2) of its kept values under a mask (bit per column) made from the 4-bit codes by
// two vpshufb of a nibble table, 16 rows at a time, transposed in registers and stored as one B tile. Rows past N and
// columns past K are zero.
// x (the driver, spmm_24.cpp, Problem::x_*): A tiles straight from x where K is whole chunks at an L1-friendly stride
// (its last M % 16 rows from a zero-padded copy), else from a per-call table of contiguous 1 KB tiles.
// Blocking: 2 x 2 tiles (2 A tiles of 16 activation rows, 2 B tiles of 16 weight rows, 4 C tiles: all 8 tile
// registers); K innermost up to 32 chunks, beyond that in blocks of 8 chunks (C parked in a buffer in between).
// Epilogue: fused (FusedOut, spmm_24.h) for float32 / bfloat16 / raw int32 outputs with bias, alpha, row_scale, relu:
// a finished block's rows are scaled, converted and stored between the next block's tile instructions, so the vector
// units and the tile unit work at the same time; other outputs / gelu go through the driver's epilogue (acc mode).
// Tile state: Linux grants AMX per process (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), dispatch.cpp's
// probe, which reports the family unavailable when the request fails). A worker thread loads its configuration
// (ldtilecfg) at its first tile of a call and releases the tiles after its last (Kernel::finish, called by the
// driver): other code on the thread (oneDNN) configures the tiles its own way, and a released state keeps context
// switches cheap.
// Speed (2-core Sapphire Rapids VM, 2 threads, bf16, ratio = dense F.linear time / ours): 0.5-0.9x of dense at
// M >= 128 for 1536x576 ... 11008x4096 (1.6x for 192x576 at M = 128); 5-8x the previous auto choice (row-pair
// kernels) at M >= 96 (dispatch.cpp, kDefaultThresholds).
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/spmm_24.h"

namespace sparsekern {
namespace cpu {
namespace spmm {

#if defined(__x86_64__) && defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 11)
#define SK_HAVE_AMX_BUILD 1
#define SK_AMX                                                                                                   \
  __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16," \
                        "bmi,bmi2")))

namespace {

// 16 x 16 transpose of 32-bit words: out[j] word i = in[i] word j.
SK_AMX inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4a + b] now holds, in each 128-bit lane L, words (4a..4a+3 rows) of column 4L + b ... : combine lanes.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xdd);
  }
}

// Per element type: columns per chunk (= 64 bytes, one tile row), values per chunk (half), code bytes per chunk.
template <bool kInt8>
struct Elem {
  static constexpr int kChunk = kInt8 ? 64 : 32;
  static constexpr int kGroups = kChunk / 4;
  static constexpr int kCodeBytes = kGroups / 2;
  static constexpr int kEsz = kInt8 ? 1 : 2;
};

// Keep masks of weight rows: per code byte one mask byte (bits 4h + i set for the kept positions i of group 2b + h),
// 64 code bytes per step (two vpshufb of a nibble table). The row's mask array has `stride` bytes, zero past the codes.
SK_AMX inline void row_masks(const uint8_t* codes, int64_t cb, uint8_t* out, int64_t stride) {
  // kNib[c] = (1 << (c & 3)) | (1 << (c >> 2)); an invalid code (compress_24 never writes one) keeps other positions.
  alignas(64) static constexpr uint8_t kNib[16] = {1, 3, 5, 9, 3, 2, 6, 10, 5, 6, 4, 12, 9, 10, 12, 8};
  const __m512i lut = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kNib)));
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  for (int64_t i = 0; i < stride; i += 64) {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(64, cb - i));
    const __mmask64 k = n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
    const __m512i b = _mm512_maskz_loadu_epi8(k, codes + i);
    const __m512i ml = _mm512_shuffle_epi8(lut, _mm512_and_si512(b, lo4));
    const __m512i mh = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(b, 4), lo4));
    const __m512i m = _mm512_or_si512(ml, _mm512_slli_epi16(mh, 4));
    const int64_t w = std::min<int64_t>(64, stride - i);
    _mm512_mask_storeu_epi8(out + i, w >= 64 ? ~__mmask64{0} : (__mmask64{1} << w) - 1, _mm512_maskz_mov_epi8(k, m));
  }
}

// The decompressed chunk ch of weight row n (zero past K), from its keep masks (row_masks).
template <bool kInt8>
SK_AMX inline __m512i decompress_chunk(const Problem& p, int64_t n, const uint8_t* masks, int64_t ch) {
  using E = Elem<kInt8>;
  const int64_t G = p.K / 4;
  const int64_t g0 = ch * E::kGroups;
  const char* v = static_cast<const char*>(p.values) + (n * (p.K / 2) + 2 * g0) * E::kEsz;
  uint64_t mask = 0;
  std::memcpy(&mask, masks + ch * E::kCodeBytes, E::kCodeBytes);
  __m256i vals;
  if (g0 + E::kGroups <= G) {
    vals = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  } else {
    const int ng = static_cast<int>(G - g0);
    mask &= (uint64_t{1} << (4 * ng)) - 1;  // the last code byte's unused nibble
    const int nv = 2 * ng;                   // values present
    vals = kInt8 ? _mm256_maskz_loadu_epi8(static_cast<__mmask32>((uint64_t{1} << nv) - 1), v)
                 : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((uint32_t{1} << nv) - 1), v);
  }
  if constexpr (kInt8) {
    return _mm512_maskz_expand_epi8(static_cast<__mmask64>(mask), _mm512_castsi256_si512(vals));
  } else {
    return _mm512_maskz_expand_epi16(static_cast<__mmask32>(mask), _mm512_castsi256_si512(vals));
  }
}

// Panel of weight rows [n0, n0 + 16 * ns) (ns column subtiles of 16; rows past n1 zero): subtile s, chunk ch = 16
// words x 16 columns at panel + (s * nch + ch) * 256.
template <bool kInt8>
SK_AMX void build_panel(const Problem& p, int64_t n0, int64_t n1, int ns, int64_t nch, uint32_t* panel) {
  using E = Elem<kInt8>;
  const int64_t mstride = (nch * E::kCodeBytes + 63) / 64 * 64;  // >= code_stride, whole chunks
  thread_local std::vector<uint8_t> mbuf;
  if (mbuf.size() < static_cast<size_t>(16 * mstride)) mbuf.resize(16 * mstride);
  for (int s = 0; s < ns; ++s) {
    const int64_t r0 = n0 + 16 * s;
    const int rows = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(16, n1 - r0)));
    uint32_t* dst = panel + s * nch * 256;
    if (rows == 0) {
      std::memset(dst, 0, nch * 256 * sizeof(uint32_t));
      continue;
    }
    for (int i = 0; i < rows; ++i) row_masks(p.codes + (r0 + i) * p.code_stride, p.code_stride, &mbuf[i * mstride],
                                             mstride);
    for (int64_t ch = 0; ch < nch; ++ch) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = i < rows ? decompress_chunk<kInt8>(p, r0 + i, &mbuf[i * mstride], ch) : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_store_si512(dst + ch * 256 + j * 16, r[j]);
    }
  }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0-3 C (m subtile a, n subtile b at 2a + b), 4-5 A (x rows), 6-7 B (panel subtiles); all 16 x 64 bytes.
// A static object: GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes only, so the stores filling a local
// configuration could be dropped as dead (seen: SIGILL at the first tile load after an unrelated change).
constexpr TileConfig make_config() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  return c;
}
alignas(64) constexpr TileConfig kTileConfig = make_config();

SK_AMX inline void configure() {
  __asm__ volatile("ldtilecfg %0" ::"m"(kTileConfig));
}

// Chunks per K block: the loop nest runs K blocks outermost so that a block's x rows (kTileM x 256 bytes) and panel
// rows (up to 64 x 256 bytes) stay in L1 while every (m, n) subtile pair of the tile passes over them; the C tiles
// park in acc between blocks.
// nch <= kFullK: no K blocks (C stays in the tiles for all of K); else blocks of kKBlock chunks.
constexpr int64_t kFullK = 32, kKBlock = 8;

// acc rows [m, m + 16 * NM) x panel subtiles (b, b + 1) for chunks [c0, c1); C starts from zero (first) or from acc.
// A finished 32 x 32 (or 16 x 32) accumulator block whose fused epilogue and store still have to run (fused mode): its
// row segments (16 columns of a row) are done a few at a time between the next block's tile instructions, so the
// vector units work while the tile unit does (program order decides what the out-of-order core can overlap).
struct Pending {
  const FusedOut* fo = nullptr;  // null: nothing pending
  const char* acc = nullptr;     // the block in the accumulator buffer, row stride sa bytes
  int64_t sa = 0, m = 0, n = 0, n1 = 0;  // output row / column of its element (0, 0); columns end at n1
  int seg = 0, nseg = 0;                 // segments done / in all (rows x 2)
};
thread_local Pending t_pending;

template <bool kInt8>
SK_AMX __attribute__((always_inline)) inline void epilogue_segment(const FusedOut& fo, const char* src, int64_t row, int64_t nn, int64_t n1) {
  const __mmask16 k = n1 - nn >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n1 - nn)) - 1);
  if (fo.type == FusedOut::Type::kI32Raw) {
    _mm512_mask_storeu_epi32(static_cast<int32_t*>(fo.out) + row * fo.ldo + nn, k, _mm512_loadu_si512(src));
    return;
  }
  __m512 v = kInt8 ? _mm512_cvtepi32_ps(_mm512_loadu_si512(src)) : _mm512_loadu_ps(reinterpret_cast<const float*>(src));
  if (fo.alpha != nullptr) {
    __m512 sc = _mm512_maskz_loadu_ps(k, fo.alpha + nn);
    if (fo.row_scale != nullptr) sc = _mm512_mul_ps(_mm512_set1_ps(fo.row_scale[row]), sc);
    v = _mm512_mul_ps(v, sc);
  } else if (fo.row_scale != nullptr) {
    v = _mm512_mul_ps(v, _mm512_set1_ps(fo.row_scale[row]));
  }
  if (fo.bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, fo.bias + nn));
  if (fo.relu) v = _mm512_max_ps(v, _mm512_setzero_ps());  // NaN -> 0, -0 -> +0: as the driver's a > 0 ? a : 0
  if (fo.type == FusedOut::Type::kBF16) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(fo.out) + row * fo.ldo + nn, k, (__m256i)_mm512_cvtneps_pbh(v));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(fo.out) + row * fo.ldo + nn, k, v);
  }
}

template <bool kInt8>
SK_AMX __attribute__((always_inline)) inline void pending_step(Pending& pd, int count) {
  if (pd.fo == nullptr) return;
  const int end = std::min(pd.nseg, pd.seg + count);
  for (; pd.seg < end; ++pd.seg) {
    const int r = pd.seg >> 1, h = pd.seg & 1;
    const int64_t nn = pd.n + 16 * h;
    if (nn < pd.n1) epilogue_segment<kInt8>(*pd.fo, pd.acc + r * pd.sa + 64 * h, pd.m + r, nn, pd.n1);
  }
  if (pd.seg == pd.nseg) pd.fo = nullptr;
}

template <bool kInt8, int NM>
SK_AMX inline void block(const Problem& p, int64_t m, const uint32_t* b0, const uint32_t* b1, int64_t c0, int64_t c1,
                         bool first, char* a, int64_t sa, Pending& pd) {
  const int per = pd.fo == nullptr ? 0 : static_cast<int>((pd.nseg - pd.seg + (c1 - c0) - 1) / (c1 - c0));
  // A tiles (Problem's x fields): rows [m, m + 16) of chunk ch at xa + ch * sch, row stride sx.
  const int64_t sx = p.x_row_bytes, sch = p.x_chunk_bytes;
  const char* xa = m < p.x_tail_m ? static_cast<const char*>(p.x) + m * sx
                                  : static_cast<const char*>(p.x_tail) + (m - p.x_tail_m) * sx;
  const char* xb = m + 16 < p.x_tail_m ? xa + 16 * sx : static_cast<const char*>(p.x_tail) + (m + 16 - p.x_tail_m) * sx;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    if (NM == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, a, sa);
    _tile_loadd(1, a + 64, sa);
    if (NM == 2) {
      _tile_loadd(2, a + 16 * sa, sa);
      _tile_loadd(3, a + 16 * sa + 64, sa);
    }
  }
  for (int64_t ch = c0; ch < c1; ++ch) {
    _tile_loadd(4, xa + ch * sch, sx);
    _tile_loadd(6, b0 + ch * 256, 64);
    _tile_loadd(7, b1 + ch * 256, 64);
    if (NM == 2) _tile_loadd(5, xb + ch * sch, sx);
    if constexpr (kInt8) {
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      if (NM == 2) {
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
    } else {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (NM == 2) {
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    if (per > 0) pending_step<kInt8>(pd, per);
  }
  pending_step<kInt8>(pd, 1 << 30);  // whatever is left (the C stores below overwrite no pending block)
  _tile_stored(0, a, sa);
  _tile_stored(1, a + 64, sa);
  if (NM == 2) {
    _tile_stored(2, a + 16 * sa, sa);
    _tile_stored(3, a + 16 * sa + 64, sa);
  }
}

// Whether this thread has loaded the configuration (tiles in use). A thread keeps it across its tiles of one call
// (ldtilecfg measured ~7 % of the kernel's time when loaded per tile) and releases the tiles when the driver says its
// work is done (amx_finish): between the two only the driver's epilogue runs on the thread, so nothing else (oneDNN)
// can see or change the configuration.
thread_local bool t_configured = false;

template <bool kInt8>
SK_AMX void amx_finish() {
  pending_step<kInt8>(t_pending, 1 << 30);
  if (t_configured) {
    _tile_release();
    t_configured = false;
  }
}

// Accumulator row to bfloat16, rounded to nearest even (vcvtneps2bf16; NaN stays NaN).
SK_AMX void amx_store_bf16(const float* a, int64_t cnt, void* yv) {
  uint16_t* y = static_cast<uint16_t*>(yv);
  int64_t j = 0;
  for (; j + 16 <= cnt; j += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a + j)));
  }
  if (j < cnt) {
    const __mmask16 k = static_cast<__mmask16>((1u << (cnt - j)) - 1);
    _mm256_mask_storeu_epi16(y + j, k, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, a + j)));
  }
}

// The tile: x rows [m0, m1), weight rows [n0, n1) (at most kAmxTileN). fo == null: acc gets 16-row, 32-column
// blocks (rows up to m1 rounded up to 16, columns up to n1 - n0 rounded up to 32: ld_acc and the driver's buffer leave
// room for both). fo != null (fused): the blocks go to a thread-local buffer (two, alternating per call: the last
// block of a call stays pending into the next call, or amx_finish) and the epilogue writes the output.
template <bool kInt8>
SK_AMX void amx_run(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* acc, int64_t ld,
                    const FusedOut* fo) {
  using E = Elem<kInt8>;
  const int64_t nch = (p.K + E::kChunk - 1) / E::kChunk;
  const int npairs = static_cast<int>((n1 - n0 + 31) / 32);
  thread_local std::vector<uint32_t> store;
  thread_local uint32_t* panel = nullptr;
  if (m0 == 0) {
    const size_t words = static_cast<size_t>(2 * npairs * nch * 256 + 16);
    if (store.size() < words) store.assign(words, 0);
    panel = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(store.data()) + 63) & ~uintptr_t{63});
    build_panel<kInt8>(p, n0, n1, 2 * npairs, nch, panel);
  }
  if (!t_configured) {
    configure();
    t_configured = true;
  }
  Pending pd;  // local copy (the thread_local is reached through __tls_get_addr: measured 9 % in the loop)
  if (fo != nullptr) pd = t_pending;
  if (fo != nullptr) {
    alignas(64) thread_local float bufs[2][kTileM * kAmxTileN];
    thread_local int which = 0;
    which ^= 1;
    acc = bufs[which];
    ld = kAmxTileN;
  }
  char* a = static_cast<char*>(acc);
  const int64_t sa = ld * 4;
  const int64_t msub = (m1 - m0 + 15) / 16;
  const int64_t kb = nch <= kFullK ? nch : kKBlock;
  for (int64_t c0 = 0; c0 < nch; c0 += kb) {
    const int64_t c1 = std::min(nch, c0 + kb);
    const bool first = c0 == 0, last = c1 == nch;
    for (int64_t i = 0; i < msub; i += 2) {
      const int nm = msub - i >= 2 ? 2 : 1;
      for (int j = 0; j < npairs; ++j) {
        char* blk = a + 16 * i * sa + 128 * j;
        const uint32_t* b0 = panel + 2 * j * nch * 256;
        const uint32_t* b1 = panel + (2 * j + 1) * nch * 256;
        if (nm == 2) {
          block<kInt8, 2>(p, m0 + 16 * i, b0, b1, c0, c1, first, blk, sa, pd);
        } else {
          block<kInt8, 1>(p, m0 + 16 * i, b0, b1, c0, c1, first, blk, sa, pd);
        }
        if (fo != nullptr && last) {  // final: its epilogue runs during the next block (block() left none pending)
          pd.fo = fo;
          pd.acc = blk;
          pd.sa = sa;
          pd.m = m0 + 16 * i;
          pd.n = n0 + 32 * j;
          pd.n1 = n1;
          pd.seg = 0;
          pd.nseg = 2 * static_cast<int>(std::min<int64_t>(16 * nm, m1 - pd.m));
        }
      }
    }
  }
  if (fo != nullptr) t_pending = pd;
}

template <bool kInt8>
SK_AMX void amx_tile(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* acc, int64_t ld) {
  amx_run<kInt8>(p, m0, m1, n0, n1, acc, ld, nullptr);
}

template <bool kInt8>
SK_AMX void amx_tile_fused(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const FusedOut& fo) {
  amx_run<kInt8>(p, m0, m1, n0, n1, nullptr, 0, &fo);
}

}  // namespace
#endif  // SK_HAVE_AMX_BUILD

bool amx_kernel(WType w, Kernel* out) {
#ifdef SK_HAVE_AMX_BUILD
  const CpuFeatures& f = cpu_features();
  if (w == WType::kBF16 && f.amx_bf16) {
    *out = Kernel{XType::kBF16, &amx_tile<false>, "amx-bf16"};
    out->x_chunk = 32;  // the driver's x table: chunks of 32 columns (spmm_24.cpp)
    out->finish = &amx_finish<false>;
    out->store_bf16 = &amx_store_bf16;
    out->tile_fused = &amx_tile_fused<false>;
    return true;
  }
  if (w == WType::kI8 && f.amx_int8) {
    *out = Kernel{XType::kI8, &amx_tile<true>, "amx-i8"};
    out->x_chunk = 64;
    out->finish = &amx_finish<true>;
    out->store_bf16 = &amx_store_bf16;
    out->tile_fused = &amx_tile_fused<true>;
    return true;
  }
#endif
  (void)w;
  (void)out;
  return false;
}

}  // namespace spmm
}  // namespace cpu
}  // namespace sparsekern
