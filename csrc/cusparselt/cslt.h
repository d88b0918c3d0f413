// sparsekern's cuSPARSELt wrapper: handles, the plan cache, algorithm search and its persistence, and the two
// torch ops built on them (cslt_compress, cslt_linear; schemas in csrc/registration.cpp).
//
// Layout (docs/cusparselt.md has the long form). For y[M, n] = x[M, k] @ W[n, k]^T:
//   A = W, structured, [n, k] row-major, op N         (the compressed operand; its 2:4 groups run along k)
//   B = x, dense,      [Mp, k] row-major, op T        (x as the caller holds it, no copy unless M is padded)
//   C = D = y^T,       [n, Mp] column-major, ld n     (== y [Mp, n] row-major, so no transpose afterwards)
// With W as the *rows* of D, cuSPARSELt's bias vector and alpha vector are per output channel, as a linear layer
// needs. Mp is M rounded up to the dense operand's multiple (8 for 16-bit inputs, 16 for 8-bit inputs); the padded
// rows of x are not cleared (each feeds only its own, discarded, row of y) and are sliced off, never returned.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace sparsekern {
namespace cslt {

// Counters of the wrapper's host-side work, for tests and the benchmarks' host-overhead report.
struct CacheStats {
  int64_t entries = 0;             // plans held by the cache now
  int64_t handles_created = 0;     // cusparseLtInit calls (one per device and thread)
  int64_t descriptors_created = 0; // matrix + matmul descriptors initialised (plan cache and compress)
  int64_t plans_created = 0;       // cusparseLtMatmulPlanInit calls
  int64_t hits = 0;                // cslt_linear calls served by a cached plan
  int64_t misses = 0;              // cslt_linear calls that built a plan
  int64_t evictions = 0;           // plans dropped by the LRU bound
  int64_t searches = 0;            // cusparseLtMatmulSearch runs
  int64_t epilogue_fallbacks = 0;  // plans whose bias/activation went to sparsekern's post-op (NOT_SUPPORTED)
  int64_t max_entries = 0;         // LRU bound (SPARSEKERN_CSLT_MAX_PLANS, default 4096)
};

CacheStats cache_stats();
// Drops every cached plan (and its workspace). Do not call while a captured CUDA graph that used them may replay.
void clear_cache();

// One algorithm-search result. Key: GPU name, cuSPARSELt runtime version and the GEMM configuration; value: what
// cusparseLtMatmulSearch picked. Dtypes are c10 names ("Half", "BFloat16", "Char", "Float8_e4m3fn", "Int",
// "Float"); bias is "none" or the bias dtype fused in the epilogue.
struct SearchRecord {
  std::string gpu, cusparselt;
  int64_t m = 0, n = 0, k = 0;  // m: the padded M the plan runs with
  std::string in_dtype, d_dtype, c_dtype, bias, activation;
  bool alpha_vector = false;
  int alg_id = 0, split_k = 1, split_k_mode = 0, split_k_buffers = 1, max_alg_id = 0;
};

// Runs cusparseLtMatmulSearch for exactly the configuration cslt_linear would run with these arguments, records the
// result (in memory; save with search_records()), and returns it. Later cslt_linear calls with alg_id < 0 and this
// configuration use it. Overwrites the rows of nothing the caller owns (works on its own output buffer).
SearchRecord search(const at::Tensor& x, const at::Tensor& compressed, int64_t n, int64_t k,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha,
                    const std::optional<at::Tensor>& row_scale, const std::string& activation,
                    std::optional<at::ScalarType> out_dtype);

std::vector<SearchRecord> search_records();
// Merges records (e.g. loaded from JSON); records of another GPU or cuSPARSELt version are kept but never match.
void add_search_records(const std::vector<SearchRecord>& records);
void clear_search_records();

// cuSPARSELt version of the loaded library ("0.8.1"), from cusparseLtGetProperty: no GPU needed.
std::string runtime_version();

// Bytes of the compressed buffer of a [n, k] 2:4 weight of `dtype` on `device` (-1: the current device), as
// cuSPARSELt's cusparseLtSpMMACompressedSize2 reports it (cached per GPU arch and shape). cslt_compress allocates
// exactly this; cslt_linear accepts a buffer of at least this size.
int64_t compressed_size(int64_t n, int64_t k, at::ScalarType dtype, c10::DeviceIndex device = -1);

// The ops (also registered as torch ops for CUDA in cslt.cpp).
at::Tensor compress(const at::Tensor& w);
at::Tensor linear(const at::Tensor& x, const at::Tensor& compressed, int64_t n, int64_t k,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha,
                  const std::optional<at::Tensor>& row_scale, c10::string_view activation,
                  std::optional<at::ScalarType> out_dtype, int64_t alg_id, int64_t split_k);

}  // namespace cslt
}  // namespace sparsekern
