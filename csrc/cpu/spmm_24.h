// Internal interface between the CPU 2:4 GEMM driver (spmm_24.cpp) and its ISA-specific tile kernels
// (spmm_24_avx512.cpp, spmm_24_avx2.cpp). Not part of the public C++ API.
//
// The driver validates arguments, prepares the activations once per call (converted to the kernel's input type,
// contiguous, rows zero-padded to a multiple of kXPad columns so a kernel may read whole chunks past K without a
// tail case on x), splits the output into tiles over threads and applies the fused epilogue. A tile kernel only
// computes raw dot products acc[m][n] = sum_k x[m, k] * W[n, k] from the portable format.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "cpu/dispatch.h"

namespace sparsekern {
namespace cpu {
namespace spmm {

// Prepared activation rows are zero-padded to a multiple of this many columns (the widest kernel chunk).
constexpr int64_t kXPad = 64;
// The driver's output tiles: at most kTileN weight rows x kTileM activation rows per TileFn call.
constexpr int64_t kTileN = 32, kTileM = 64;
// The AMX family's tiles (spmm_24_amx.cpp): up to kAmxTileN weight rows (the driver takes 32 or 64, amx_tile_n) x
// kTileM activation rows; it writes whole 16-row x 32-column blocks of acc (rows up to a multiple of 16).
constexpr int64_t kAmxTileN = 64;
// The n-tile width of an AMX call: 64 (each x tile loaded from L2 feeds 4 weight subtiles instead of 2) where there
// are enough 64-row tiles for the threads (dynamic tiles: a thread idles at most one tile at the end), else 32.
// Measured (2 threads, bf16, M = 2048): 576 x 1536 2.2-2.3 ms with 64 (9 tiles, 5 + 4) against 2.8-3.9 ms with 32
// (18 tiles, 9 + 9): the x reuse outweighs the balance.
inline int64_t amx_tile_n(int64_t N, int64_t threads) { return (N + 63) / 64 >= 4 * threads ? 64 : 32; }

// Dtype of the compressed weight values ([N, K/2], contiguous).
enum class WType { kF32, kF16, kBF16, kI8 };

// Dtype of the prepared activations ([M, ldx], contiguous, zero-padded): chosen by the kernel (x_type_for).
enum class XType {
  kF32,
  kBF16,
  kI16,
  kI32,
  kU8,  // int8 activations stored as x + 128 (uint8 bits: the sign bit flipped), for vpdpbusd
  kI8   // int8 activations as they are (AMX-INT8's tdpbssd: signed x signed)
};

struct Problem {
  int64_t M = 0, N = 0, K = 0;  // K is a multiple of 4
  WType wtype = WType::kF32;
  const void* values = nullptr;  // [N, K/2]
  const uint8_t* codes = nullptr;  // [N, code_stride] packed 4-bit codes, nm.h layout
  int64_t code_stride = 0;
  XType xtype = XType::kF32;
  const void* x = nullptr;  // [M, ldx]
  int64_t ldx = 0;
  // AMX only (spmm_24_amx.cpp): the A tile of rows [m, m + 16), chunk ch (64 bytes of each row) is at
  // x + m * x_row_bytes + ch * x_chunk_bytes, with row stride x_row_bytes; for m >= x_tail_m at x_tail (same
  // strides, rows counted from x_tail_m; 16 rows, zero past M).
  int64_t x_row_bytes = 0, x_chunk_bytes = 0;
  const void* x_tail = nullptr;
  int64_t x_tail_m = INT64_MAX;
};

// Fills acc[(m - m0) * ld_acc + (n - n0)] for m in [m0, m1), n in [n0, n1) with the raw dot products: float for
// floating weights, int32 (exact) for int8 weights.
using TileFn = void (*)(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* acc, int64_t ld_acc);

struct Kernel {
  XType xtype;
  TileFn tile;
  const char* name;  // for error messages / debugging
  // 0: the kernel reads x as prepared ([M, ldx] row-major). > 0: as K blocks of x_block columns (a multiple of
  // x_chunk, the kernel's chunk width, 32 or 64) plus one more chunk (room for the partial last chunk of K): block b
  // is [M][x_block + x_chunk] holding columns [b * x_block, (b + 1) * x_block + x_chunk) (past K: the prepared
  // padding, then zeros), the blocks one after another (x_blocks() of them); p.ldx = x_block + x_chunk.
  int64_t x_block = 0;
  int64_t x_chunk = 32;
  // Optional (amx): called by each worker thread of the driver after its last tile of a call (the AMX kernels keep
  // their tile configuration loaded across a thread's tiles and release the tiles here).
  void (*finish)() = nullptr;
  // Optional (amx): the driver's store of a finished fp32 accumulator row (epilogue applied) to bfloat16 output, in
  // place of its portable loop (same rounding: to nearest even).
  void (*store_bf16)(const float* a, int64_t cnt, void* y) = nullptr;
  // Optional (amx): the tile with the epilogue and the store fused (FusedOut below), for the outputs and epilogues
  // FusedOut covers; same call contract as tile otherwise. Why: at small K the driver's per-tile epilogue cost as much
  // as the tile unit's work, and fused it runs on the vector units while the tile unit works on the next block.
  void (*tile_fused)(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const struct FusedOut& fo) =
      nullptr;
};

// The fused epilogue and store: y[m, n] = act(row_scale[m] * alpha[n] * acc + bias[n]) (each optional; act none or
// relu) in fp32, stored as float32 / bfloat16 (to nearest even), or the raw int32 accumulator (int8 inputs, int32 out,
// no epilogue). Same arithmetic, in the same order, as the driver's apply_epilogue / store_row.
struct FusedOut {
  enum class Type { kF32, kBF16, kI32Raw };
  Type type = Type::kF32;
  void* out = nullptr;  // [M, ldo] of the call (or slab)
  int64_t ldo = 0;
  const float* alpha = nullptr;      // [N] or null
  const float* bias = nullptr;       // [N] or null
  const float* row_scale = nullptr;  // [M] or null
  bool relu = false;
};
// Number of K blocks of a blocked-x kernel: its whole chunks in blocks of x_block columns, at least one (the partial
// last chunk rides in the last block's extra chunk).
inline int64_t x_blocks(int64_t K, int64_t x_block, int64_t x_chunk) {
  const int64_t whole = K / x_chunk * x_chunk;
  return std::max<int64_t>(1, (whole + x_block - 1) / x_block);
}

// Runs a tile as register tiles of NB weight rows x MB activation rows: Micro<nb, mb>::run(p, n, m, acc, ld) for
// nb <= NB, mb <= MB computes acc[j * ld + i] for the nb x mb block at (n, m). Edge blocks use the smaller
// instantiations through a table built at compile time.
template <typename acc_t>
using MicroFn = void (*)(const Problem&, int64_t, int64_t, acc_t*, int64_t);

template <typename acc_t, template <int, int> class Micro, int NB, int MB>
struct MicroTable {
  template <int... Is>
  static constexpr std::array<MicroFn<acc_t>, sizeof...(Is)> make(std::integer_sequence<int, Is...>) {
    return {&Micro<Is / MB + 1, Is % MB + 1>::run...};
  }
  static constexpr std::array<MicroFn<acc_t>, NB * MB> table = make(std::make_integer_sequence<int, NB * MB>{});
};

template <typename acc_t, template <int, int> class Micro, int NB, int MB>
void tile_loop(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* accv, int64_t ld) {
  acc_t* acc = static_cast<acc_t*>(accv);
  const auto& table = MicroTable<acc_t, Micro, NB, MB>::table;
  for (int64_t n = n0; n < n1; n += NB) {
    const int nb = static_cast<int>(std::min<int64_t>(NB, n1 - n));
    for (int64_t m = m0; m < m1; m += MB) {
      const int mb = static_cast<int>(std::min<int64_t>(MB, m1 - m));
      table[(nb - 1) * MB + (mb - 1)](p, n, m, acc + (m - m0) * ld + (n - n0), ld);
    }
  }
}

// The kernels on offer. Which one runs is decided in one place, dispatch.cpp (plan_call below); the CPU features come
// from its probe (cpu_features(), dispatch.h). Each returns false when the running CPU lacks the ISA (the kernel is
// then not callable) or none exists for w.
// extensions = false: only AVX-512 F/BW/VL/DQ kernels, even where the CPU has AVX512_BF16 / AVX512_VNNI (the paths
// such CPUs take; forced with SPARSEKERN_CPU_ISA=avx512-base so they are tested on any AVX-512 machine).
// One weight row per vector (spmm_24_avx512.cpp).
bool avx512_kernel(WType w, bool extensions, Kernel* out);
// Unblocked row-pair kernels of the rows family (spmm_24_avx512.cpp; bfloat16 with AVX512_BF16, int8 with
// AVX512_VNNI): two weight rows per vector, x as prepared (x_block = 0); for more activation rows.
bool avx512_row_pair_kernel(WType w, bool extensions, Kernel* out);
// Row-pair kernels (spmm_24_avx512.cpp; bfloat16 with AVX512_BF16, int8): two weight rows per vector, one-source
// permutes, K-blocked with prepared index panels (x_block > 0). int8 with VNNI + VBMI and K small enough for its
// int32 bound: the vpdpbusd variant (xtype kU8).
bool avx512_pair_kernel(WType w, bool extensions, int64_t K, Kernel* out);
bool avx2_kernel(WType w, Kernel* out);
// The AMX family (spmm_24_amx.cpp): bfloat16 with AMX-BF16 (xtype kBF16), int8 with AMX-INT8 (xtype kI8); x as
// prepared (x_block = 0). Per n-tile it decompresses the weight rows into a thread-local panel at m0 == 0 and runs the
// tile unit on it; it writes whole 16 x 32 blocks of acc (see kAmxTileN) and needs x prepared with its rows padded to
// a multiple of 16 (zero). False when the
// CPU or the OS (no AMX permission) lacks it, or no kernel exists for w.
bool amx_kernel(WType w, Kernel* out);
// The portable scalar kernel (spmm_24.cpp): every dtype, every CPU.
Kernel scalar_kernel(WType w);

// ------------------------------------------------------------------------------------------------- token lanes
// The second kernel family (spmm_24_tokens_avx512.cpp), for M >= a threshold: vector lanes run over 16 activation
// rows ("tokens") instead of along K, so no horizontal reductions or per-chunk permutes are needed and every kept
// weight (fp32) or kept pair of a group (bf16 / int8) costs one multiply-add instruction for 16 tokens.
// The activations are prepared once per call as a table laid out for those loads (TokenTable), from the row-major
// prepared activations ([Mp, ldx] of the kernel's XType, rows >= M zero) that the driver builds anyway.
enum class TokenTable {
  kF32,     // float: per (group g, token block) an entry [4 columns][16 tokens] (256 bytes)
  kPairs16  // 16-bit pairs: per (group g, token block) an entry [6 slots][16 tokens][2] (384 bytes): for each valid
            // code (slot order kSlotCodes), the (x[t, 4g+i0], x[t, 4g+i1]) pair of every token t of the block
};
// Entries are grouped by token tiles of 4 blocks (64 tokens; the last tile may hold fewer): tile j's region starts at
// 4j * (K/4) * entry bytes and holds entry (g, t) at (g * Tj + t) * entry bytes, Tj = the tile's block count.
constexpr int kTokenBlock = 16;
// Valid 2:4 codes in table slot order (pairs (0,1), (0,2), (0,3), (1,2), (1,3), (2,3)).
constexpr uint8_t kSlotCodes[6] = {4, 8, 12, 9, 13, 14};

struct TokenKernel {
  XType xtype;        // element type of the prepared row-major activations the table is built from
  TokenTable table;
  TileFn tile;        // p.x = the table (p.ldx unused); m0 must be a multiple of 64 (a token tile)
  const char* name;
};

// Bytes of the table for M tokens (rounded up to whole blocks) and K columns.
int64_t token_table_bytes(TokenTable t, int64_t M, int64_t K);
// Number of token tiles (64 tokens) for M tokens.
int64_t token_tiles(int64_t M);
// Fills token tiles [j0, j1) of the table from the prepared activations xp ([M rounded up to 16, ldx], rows past M
// zero).
void build_token_table(TokenTable t, const void* xp, int64_t ldx, int64_t M, int64_t K, void* table, int64_t j0,
                       int64_t j1);
// False when the running CPU lacks AVX-512 (token-lane kernels exist only for AVX-512).
bool avx512_token_kernel(WType w, bool extensions, TokenKernel* out);

// ------------------------------------------------------------------------------------------------- the choice
// What one call (or one slab of a large-M call) runs: decided by dispatch.cpp from the call's M, K and weight dtype
// and the settings snapshot (ISA, kernel family, thresholds). Raises the errors of a forced ISA / family that cannot
// run (and a bad environment value kept since load).
enum class Family { kRows, kPairs, kTokens, kAmx };
struct Plan {
  Family family = Family::kRows;
  Kernel kernel{};       // rows / pairs / amx
  TokenKernel tokens{};  // tokens
};
Plan plan_call(int64_t M, int64_t K, WType w, const DispatchSettings& s);
// The slab size (driver, spmm_24.cpp) of a call with M rows: amx_slab_rows where the AMX family runs the call's first
// slab of that size (its panels are rebuilt per slab, so it wants larger slabs), else slab_rows.
int64_t slab_rows_for(int64_t M, int64_t K, WType w, const DispatchSettings& s);

}  // namespace spmm
}  // namespace cpu
}  // namespace sparsekern
