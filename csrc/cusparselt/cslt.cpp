// cuSPARSELt wrapper: handles, plan cache, algorithm search, and the cslt_compress / cslt_linear CUDA kernels.
// The layout and the reasons behind it are in cslt.h and docs/cusparselt.md.
//
// What makes a steady-state cslt_linear call cheap: everything cuSPARSELt needs on the host (matrix descriptors,
// matmul descriptor, algorithm selection, plan) lives in one cache entry, found by a hash lookup on (requested GEMM
// configuration, handle, fused-bias pointer). The call then allocates its output and its workspace from PyTorch's
// caching allocator, runs cusparseLtMatmul on the current stream and - when needed - one post-op kernel. No device
// synchronisation, no cudaMalloc. CUDA graphs: the stream is not part of the key (torch.cuda.graph captures on its
// own side stream; a warm-up on any stream builds the plan the capture uses), and everything device-side a call
// uses (workspace, padded x, D, the FP8 C buffer) is allocated per call from the caching allocator, so a captured
// graph's private pool keeps it alive: evicting or clearing cached plans (host objects) cannot free memory a graph
// replays into.
//
// Lifetime rules this file relies on (cuSPARSELt 0.8):
//   * a plan keeps pointers to its descriptors, so an entry is heap-allocated once and never moved;
//   * cusparseLtMatmulAlgSelectionDestroy is mandatory since 0.8.0;
//   * the bias pointer is a matmul-descriptor attribute read through the plan, so a fused bias is part of the key
//     (a layer's bias tensor is persistent, so each layer hits its own entry);
//   * building a plan takes milliseconds: it happens outside the cache's lock, once per key (a per-key slot).
#include "cusparselt/cslt.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusparseLt.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "core/cslt_shape.h"
#include "cuda/core_ops.h"

namespace sparsekern {
namespace cslt {
namespace {

using cuda::Activation;

std::string status_text(cusparseStatus_t st) {
  return std::string(cusparseLtGetErrorName(st)) + " - " + cusparseLtGetErrorString(st);
}

// The context string is only built when the call failed (TORCH_CHECK evaluates its message lazily).
#define SK_CSLT_CHECK(EXPR, CONTEXT)                                                                      \
  do {                                                                                                    \
    const cusparseStatus_t sk_st_ = (EXPR);                                                               \
    TORCH_CHECK(sk_st_ == CUSPARSE_STATUS_SUCCESS, "cuSPARSELt: ", #EXPR, " failed (", status_text(sk_st_), \
                ") ", CONTEXT);                                                                           \
  } while (0)

// ------------------------------------------------------------------------------------------------ counters
std::atomic<int64_t> g_handles{0}, g_descriptors{0}, g_plans{0}, g_hits{0}, g_misses{0}, g_evictions{0},
    g_searches{0}, g_fallbacks{0};
// Bumped by every search / record import, so cached plans that were built with "alg_id = -1" re-resolve.
std::atomic<uint64_t> g_search_epoch{1};

// ------------------------------------------------------------------------------------------------ dtypes, rules
bool is_8bit(at::ScalarType t) { return t == at::kChar || t == at::kFloat8_e4m3fn; }

cudaDataType cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kChar: return CUDA_R_8I;
    case at::kFloat8_e4m3fn: return CUDA_R_8F_E4M3;
    case at::kInt: return CUDA_R_32I;
    case at::kFloat: return CUDA_R_32F;
    default: TORCH_CHECK(false, "cuSPARSELt: no CUDA data type for ", t);
  }
  return CUDA_R_32F;  // unreachable
}

// cuSPARSELt 0.8: FP32 compute for FP16/BF16/FP8 inputs, INT32 for INT8.
cusparseComputeType compute_type(at::ScalarType in) {
  return in == at::kChar ? CUSPARSE_COMPUTE_32I : CUSPARSE_COMPUTE_32F;
}

// Multiples cuSPARSELt requires: the structured operand's rows and cols (W: n, k), the dense operand's rows (M). The
// rule is written once, in core/cslt_shape.h (shared with the Python side through sparsekern._C).
int64_t structured_multiple(at::ScalarType in) {
  return core::cslt_structured_multiple(static_cast<int64_t>(c10::elementSize(in)));
}
int64_t dense_multiple(at::ScalarType in) {
  return core::cslt_dense_multiple(static_cast<int64_t>(c10::elementSize(in)));
}

// Compressed buffers are sized by cuSPARSELt's own query (query_compressed_bytes, below), never by a formula: it pads
// small matrices beyond 9/16 (10/16) of the dense bytes. The formula survives only in Python (ops/cslt.py
// formula_nbytes) as the lower bound where no GPU can answer the query.

bool is_float_out(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; }

const char* act_name(int a) { return a == 1 ? "relu" : (a == 2 ? "gelu" : "none"); }

void check_input_dtype(const char* op, const char* name, at::ScalarType t) {
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kChar || t == at::kFloat8_e4m3fn, op, ": ", name,
              " must be float16, bfloat16, int8 or float8_e4m3fn for cuSPARSELt, got ", t);
}

void check_arch(const char* op, at::ScalarType in, c10::DeviceIndex device) {
  const cudaDeviceProp* p = at::cuda::getDeviceProperties(device);
  TORCH_CHECK(p->major >= 8, op, ": cuSPARSELt needs sparse tensor cores (sm80 or newer); ", p->name, " is sm",
              p->major, p->minor);
  if (in == at::kFloat8_e4m3fn) {
    TORCH_CHECK((p->major == 8 && p->minor == 9) || p->major >= 9, op,
                ": float8_e4m3fn needs sm89 or newer (cuSPARSELt's FP8 kernels); ", p->name, " is sm", p->major,
                p->minor);
  }
}

void check_dims(const char* op, at::ScalarType in, int64_t n, int64_t k) {
  const int64_t mult = structured_multiple(in);
  TORCH_CHECK(mult > 0, op, ": cuSPARSELt has no structured operand of ", in);
  TORCH_CHECK(n > 0 && n % mult == 0, op, ": n (out_features) = ", n, " must be a positive multiple of ", mult,
              " for ", in, " (cuSPARSELt's rule for the structured operand)");
  TORCH_CHECK(k > 0 && k % mult == 0, op, ": k (in_features) = ", k, " must be a positive multiple of ", mult,
              " for ", in, " (cuSPARSELt's rule for the structured operand)");
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ------------------------------------------------------------------------------------------------ handles
struct HandleSlot {
  cusparseLtHandle_t handle;
  int64_t id = 0;
};

// One handle per (device, thread), as cuSPARSELt's context is tied to a device and a handle is not meant to be
// shared by threads. Slots are never freed: plans built with a handle may outlive its thread, and a never-reused
// address keeps handle ids unique for the key.
HandleSlot& handle_for(c10::DeviceIndex device) {
  thread_local std::vector<HandleSlot*> slots;
  if (static_cast<size_t>(device) >= slots.size()) slots.resize(device + 1, nullptr);
  if (slots[device] == nullptr) {
    auto slot = std::make_unique<HandleSlot>();
    const c10::cuda::CUDAGuard guard(device);
    SK_CSLT_CHECK(cusparseLtInit(&slot->handle), "(creating the handle of device " + std::to_string(device) + ")");
    slot->id = ++g_handles;
    slots[device] = slot.release();
  }
  return *slots[device];
}

// ------------------------------------------------------------------------------------------------ compressed size
// cusparseLtSpMMACompressedSize2 for a [n, k] structured operand of `in` on `device`'s architecture; cached per
// (arch, n, k, dtype), so compress, the op's checks and the fake kernel (through sparsekern._C) agree on one number.
int64_t query_compressed_bytes(int64_t n, int64_t k, at::ScalarType in, c10::DeviceIndex device) {
  static std::mutex mu;
  static auto* cache = new std::map<std::tuple<int, int, int64_t, int64_t, int>, int64_t>();
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  const auto key = std::make_tuple(prop->major, prop->minor, n, k, static_cast<int>(in));
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  auto& slot = handle_for(device);
  cusparseLtMatDescriptor_t desc;
  const std::string what = "(the compressed size of a [" + std::to_string(n) + ", " + std::to_string(k) + "] weight)";
  SK_CSLT_CHECK(cusparseLtStructuredDescriptorInit(&slot.handle, &desc, n, k, k, 16, cuda_type(in), CUSPARSE_ORDER_ROW,
                                                   CUSPARSELT_SPARSITY_50_PERCENT), what);
  ++g_descriptors;
  size_t size = 0, tmp_size = 0;
  const cusparseStatus_t st = cusparseLtSpMMACompressedSize2(&slot.handle, &desc, &size, &tmp_size);
  cusparseLtMatDescriptorDestroy(&desc);
  SK_CSLT_CHECK(st, what);
  std::lock_guard<std::mutex> lock(mu);
  (*cache)[key] = static_cast<int64_t>(size);
  return static_cast<int64_t>(size);
}

// ------------------------------------------------------------------------------------------------ configuration
// What the descriptors and the plan depend on. `bias` / `act` are the *requested* fused epilogue.
struct GemmConfig {
  int64_t mp = 0, n = 0, k = 0;
  at::ScalarType in = at::kHalf, d = at::kHalf, c = at::kHalf;
  bool alpha_vector = false;
  bool bias = false;
  at::ScalarType bias_dtype = at::kFloat;
  int act = 0;
  int alg_id = -1;
  int split_k = 1;

  bool operator==(const GemmConfig& o) const {
    return mp == o.mp && n == o.n && k == o.k && in == o.in && d == o.d && c == o.c &&
           alpha_vector == o.alpha_vector && bias == o.bias && (!bias || bias_dtype == o.bias_dtype) &&
           act == o.act && alg_id == o.alg_id && split_k == o.split_k;
  }
};

std::string describe(const GemmConfig& c) {
  std::ostringstream s;
  s << "(W [n=" << c.n << ", k=" << c.k << "] " << c.in << ", x [M=" << c.mp << " (padded), k=" << c.k
    << "], D " << c.d << ", C " << c.c << ", bias " << (c.bias ? c10::toString(c.bias_dtype) : "none")
    << ", alpha vector " << (c.alpha_vector ? "yes" : "no") << ", activation " << act_name(c.act) << ", alg_id "
    << c.alg_id << ", split_k " << c.split_k << ")";
  return s.str();
}

struct PlanKey {
  GemmConfig cfg;
  int64_t handle_id = 0;
  c10::DeviceIndex device = 0;
  const void* bias_ptr = nullptr;
  // No stream: a plan is a host object usable on any stream, and every call takes its own workspace (see the top).

  bool operator==(const PlanKey& o) const {
    return cfg == o.cfg && handle_id == o.handle_id && device == o.device && bias_ptr == o.bias_ptr;
  }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    const GemmConfig& c = key.cfg;
    size_t h = 1469598103934665603ull;
    auto mix = [&h](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    mix(c.mp); mix(c.n); mix(c.k);
    mix(static_cast<uint64_t>(c.in)); mix(static_cast<uint64_t>(c.d)); mix(static_cast<uint64_t>(c.c));
    mix(c.alpha_vector); mix(c.bias); mix(c.bias ? static_cast<uint64_t>(c.bias_dtype) : 0); mix(c.act);
    mix(static_cast<uint64_t>(c.alg_id + 1)); mix(c.split_k);
    mix(key.handle_id); mix(key.device); mix(reinterpret_cast<uintptr_t>(key.bias_ptr));
    return h;
  }
};

// ------------------------------------------------------------------------------------------------ search table
struct SearchTable {
  std::mutex mu;
  std::map<std::string, SearchRecord> records;
};
SearchTable& search_table() {
  static auto* t = new SearchTable();  // leaked on purpose: no destructor ordering issues at exit
  return *t;
}

std::string record_key(const SearchRecord& r) {
  std::ostringstream s;
  s << r.gpu << '|' << r.cusparselt << '|' << r.m << '|' << r.n << '|' << r.k << '|' << r.in_dtype << '|'
    << r.d_dtype << '|' << r.c_dtype << '|' << r.bias << '|' << r.activation << '|' << r.alpha_vector;
  return s.str();
}

SearchRecord record_for(const GemmConfig& c, c10::DeviceIndex device) {
  SearchRecord r;
  r.gpu = at::cuda::getDeviceProperties(device)->name;
  r.cusparselt = runtime_version();
  r.m = c.mp;
  r.n = c.n;
  r.k = c.k;
  r.in_dtype = c10::toString(c.in);
  r.d_dtype = c10::toString(c.d);
  r.c_dtype = c10::toString(c.c);
  r.bias = c.bias ? c10::toString(c.bias_dtype) : "none";
  r.activation = act_name(c.act);
  r.alpha_vector = c.alpha_vector;
  return r;
}

std::optional<SearchRecord> find_record(const GemmConfig& c, c10::DeviceIndex device) {
  const std::string key = record_key(record_for(c, device));
  auto& t = search_table();
  std::lock_guard<std::mutex> lock(t.mu);
  auto it = t.records.find(key);
  if (it == t.records.end()) return std::nullopt;
  return it->second;
}

// ------------------------------------------------------------------------------------------------ plan entries
struct PlanEntry {
  const cusparseLtHandle_t* handle = nullptr;
  cusparseLtMatDescriptor_t a, b, c, d;
  cusparseLtMatmulDescriptor_t matmul;
  cusparseLtMatmulAlgSelection_t alg_sel;
  cusparseLtMatmulPlan_t plan;
  bool have_a = false, have_b = false, have_c = false, have_d = false, have_alg = false, have_plan = false;

  // What the plan really does (an epilogue cuSPARSELt refuses falls back to the plain product + the post-op, with
  // D in the accumulator's type; run() allocates D and finishes the call from these, not from the request).
  bool fused_bias = false;
  int fused_act = 0;
  bool fused_alpha = false;
  at::ScalarType d_type = at::kHalf, c_type = at::kHalf;
  uint64_t search_epoch = 0;  // for alg_id = -1 entries: the search results they were resolved against
  std::optional<SearchRecord> record;  // the search result the plan was built with (alg_id = -1 entries)
  size_t workspace_size = 0;  // allocated per call (caching allocator): see the top of the file
  size_t compressed_size = 0;  // cusparseLtSpMMACompressedSize for this plan

  PlanEntry() = default;
  PlanEntry(const PlanEntry&) = delete;
  PlanEntry& operator=(const PlanEntry&) = delete;
  ~PlanEntry() {
    // Destruction errors are ignored: nothing sensible can be done with them in a destructor.
    if (have_plan) cusparseLtMatmulPlanDestroy(&plan);
    if (have_alg) cusparseLtMatmulAlgSelectionDestroy(&alg_sel);
    if (have_d) cusparseLtMatDescriptorDestroy(&d);
    if (have_c) cusparseLtMatDescriptorDestroy(&c);
    if (have_b) cusparseLtMatDescriptorDestroy(&b);
    if (have_a) cusparseLtMatDescriptorDestroy(&a);
  }
};

// Builds descriptors, algorithm selection and plan into `e`. Returns the first failing status and names the call.
cusparseStatus_t build_plan(PlanEntry& e, const cusparseLtHandle_t* h, const GemmConfig& cfg, const void* bias_ptr,
                            bool fuse_bias, int fuse_act, const std::optional<SearchRecord>& rec,
                            std::string* failed) {
  cusparseStatus_t st = CUSPARSE_STATUS_SUCCESS;
#define SK_TRY(EXPR)                           \
  do {                                         \
    st = (EXPR);                               \
    if (st != CUSPARSE_STATUS_SUCCESS) {       \
      *failed = #EXPR;                         \
      return st;                               \
    }                                          \
  } while (0)
  e.handle = h;
  SK_TRY(cusparseLtStructuredDescriptorInit(h, &e.a, cfg.n, cfg.k, cfg.k, 16, cuda_type(cfg.in), CUSPARSE_ORDER_ROW,
                                            CUSPARSELT_SPARSITY_50_PERCENT));
  e.have_a = true;
  SK_TRY(cusparseLtDenseDescriptorInit(h, &e.b, cfg.mp, cfg.k, cfg.k, 16, cuda_type(cfg.in), CUSPARSE_ORDER_ROW));
  e.have_b = true;
  SK_TRY(cusparseLtDenseDescriptorInit(h, &e.d, cfg.n, cfg.mp, cfg.n, 16, cuda_type(cfg.d), CUSPARSE_ORDER_COL));
  e.have_d = true;
  if (cfg.c != cfg.d) {
    // FP8 output: cuSPARSELt wants C in FP16 (it is never read: beta = 0).
    SK_TRY(cusparseLtDenseDescriptorInit(h, &e.c, cfg.n, cfg.mp, cfg.n, 16, cuda_type(cfg.c), CUSPARSE_ORDER_COL));
    e.have_c = true;
  }
  g_descriptors += 3 + (e.have_c ? 1 : 0);
  SK_TRY(cusparseLtMatmulDescriptorInit(h, &e.matmul, CUSPARSE_OPERATION_NON_TRANSPOSE, CUSPARSE_OPERATION_TRANSPOSE,
                                        &e.a, &e.b, e.have_c ? &e.c : &e.d, &e.d, compute_type(cfg.in)));
  ++g_descriptors;
  const int one = 1;
  if (fuse_bias) {
    void* p = const_cast<void*>(bias_ptr);
    SK_TRY(cusparseLtMatmulDescSetAttribute(h, &e.matmul, CUSPARSELT_MATMUL_BIAS_POINTER, &p, sizeof(p)));
  }
  if (fuse_act == static_cast<int>(Activation::kRelu)) {
    SK_TRY(cusparseLtMatmulDescSetAttribute(h, &e.matmul, CUSPARSELT_MATMUL_ACTIVATION_RELU, &one, sizeof(one)));
  } else if (fuse_act == static_cast<int>(Activation::kGelu)) {
    SK_TRY(cusparseLtMatmulDescSetAttribute(h, &e.matmul, CUSPARSELT_MATMUL_ACTIVATION_GELU, &one, sizeof(one)));
  }
  if (cfg.alpha_vector) {
    SK_TRY(cusparseLtMatmulDescSetAttribute(h, &e.matmul, CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING, &one,
                                            sizeof(one)));
  }
  SK_TRY(cusparseLtMatmulAlgSelectionInit(h, &e.alg_sel, &e.matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
  e.have_alg = true;
  int alg_id = cfg.alg_id, split_k = cfg.split_k;
  int split_k_mode = CUSPARSELT_SPLIT_K_MODE_ONE_KERNEL, split_k_buffers = -1;
  if (rec.has_value()) {
    alg_id = rec->alg_id;
    split_k = rec->split_k;
    split_k_mode = rec->split_k_mode;
    split_k_buffers = rec->split_k_buffers;
  }
  if (alg_id >= 0) {
    SK_TRY(cusparseLtMatmulAlgSetAttribute(h, &e.alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg_id, sizeof(alg_id)));
  }
  if (split_k > 1) {
    SK_TRY(cusparseLtMatmulAlgSetAttribute(h, &e.alg_sel, CUSPARSELT_MATMUL_SPLIT_K, &split_k, sizeof(split_k)));
    // Every mode a search can report (ONE_KERNEL, TWO_KERNELS, HEURISTIC, DATAPARALLEL, SPLITK, STREAMK = 1..6) is
    // re-applied; 0 is "not set".
    if (split_k_mode >= CUSPARSELT_SPLIT_K_MODE_ONE_KERNEL && split_k_mode <= CUSPARSELT_STREAMK) {
      const auto mode = static_cast<cusparseLtSplitKMode_t>(split_k_mode);
      SK_TRY(cusparseLtMatmulAlgSetAttribute(h, &e.alg_sel, CUSPARSELT_MATMUL_SPLIT_K_MODE, &mode, sizeof(mode)));
    }
    if (split_k_buffers > 0) {
      SK_TRY(cusparseLtMatmulAlgSetAttribute(h, &e.alg_sel, CUSPARSELT_MATMUL_SPLIT_K_BUFFERS, &split_k_buffers,
                                             sizeof(split_k_buffers)));
    }
  }
  SK_TRY(cusparseLtMatmulPlanInit(h, &e.plan, &e.matmul, &e.alg_sel));
  e.have_plan = true;
  ++g_plans;
  SK_TRY(cusparseLtMatmulGetWorkspace(h, &e.plan, &e.workspace_size));
  size_t compress_tmp = 0;
  SK_TRY(cusparseLtSpMMACompressedSize(h, &e.plan, &e.compressed_size, &compress_tmp));
  e.fused_bias = fuse_bias;
  e.fused_act = fuse_act;
  e.fused_alpha = cfg.alpha_vector;
  e.d_type = cfg.d;
  e.c_type = cfg.c;
#undef SK_TRY
  return st;
}

// The configuration of the plain product a refused epilogue falls back to: no bias, activation or alpha vector, D in
// the accumulator's type (int32 for int8, float32 for float8, x's type for 16-bit inputs); the post-op applies the
// rest. An FP8 output cannot be finished outside cuSPARSELt, so it has no fallback.
std::optional<GemmConfig> plain_product(const GemmConfig& cfg) {
  if (cfg.d == at::kFloat8_e4m3fn || !(cfg.bias || cfg.act != 0 || cfg.alpha_vector)) return std::nullopt;
  GemmConfig plain = cfg;
  plain.bias = false;
  plain.act = 0;
  plain.alpha_vector = false;
  const bool in16 = cfg.in == at::kHalf || cfg.in == at::kBFloat16;
  plain.d = in16 ? cfg.in : (cfg.in == at::kChar ? at::kInt : at::kFloat);
  plain.c = plain.d;
  return plain;
}

// Builds an entry for `cfg`. When cuSPARSELt refuses the requested epilogue (NOT_SUPPORTED at plan init, or
// INVALID_VALUE at an epilogue attribute), it falls back to the plain product and sparsekern's post-op for every
// output type the post-op can write (all but float8), so e.g. int8 -> int32 with a bias and GELU runs instead of
// raising. Counted in cache_stats().epilogue_fallbacks.
std::shared_ptr<PlanEntry> make_entry(const cusparseLtHandle_t* h, const GemmConfig& cfg, const void* bias_ptr,
                                      c10::DeviceIndex device) {
  // Read the epoch before the record: a search finishing in between then leaves this entry stale (re-resolved on
  // its next use) instead of marking a plan built without the new record as up to date.
  const uint64_t epoch = g_search_epoch.load();
  std::optional<SearchRecord> rec;
  if (cfg.alg_id < 0) rec = find_record(cfg, device);
  auto e = std::make_shared<PlanEntry>();
  std::string failed;
  cusparseStatus_t st = build_plan(*e, h, cfg, bias_ptr, cfg.bias, cfg.act, rec, &failed);
  // cuSPARSELt may refuse an epilogue attribute it does not support for these types with INVALID_VALUE (at
  // cusparseLtMatmulDescSetAttribute) rather than NOT_SUPPORTED (at plan init): fall back on both. A rebuild that
  // fails again reports its own failing call, so a real argument error still surfaces.
  const std::optional<GemmConfig> plain = plain_product(cfg);
  if ((st == CUSPARSE_STATUS_NOT_SUPPORTED || st == CUSPARSE_STATUS_INVALID_VALUE) && plain.has_value()) {
    e = std::make_shared<PlanEntry>();
    st = build_plan(*e, h, *plain, nullptr, false, 0, rec, &failed);
    if (st == CUSPARSE_STATUS_SUCCESS) ++g_fallbacks;
  }
  TORCH_CHECK(st == CUSPARSE_STATUS_SUCCESS, "cuSPARSELt: ", failed, " failed (", status_text(st), ") for ",
              describe(cfg),
              st == CUSPARSE_STATUS_NOT_SUPPORTED
                  ? "; this combination of dtypes / epilogue / shape is not supported by cuSPARSELt on this GPU"
                  : "");
  e->search_epoch = epoch;
  e->record = rec;
  return e;
}

// ------------------------------------------------------------------------------------------------ plan cache (LRU)
// A cache slot: the entry of one key, built once under the slot's own lock (not the cache's).
struct PlanSlot {
  std::mutex mu;
  std::shared_ptr<PlanEntry> entry;
};

struct PlanCache {
  using Item = std::pair<PlanKey, std::shared_ptr<PlanSlot>>;
  std::mutex mu;
  std::list<Item> lru;  // most recently used first
  std::unordered_map<PlanKey, std::list<Item>::iterator, PlanKeyHash> index;
  size_t max_entries = 4096;

  PlanCache() {  // built once per process (plan_cache()), so the variable is read once, at the first cuSPARSELt use
    if (const char* s = std::getenv("SPARSEKERN_CSLT_MAX_PLANS")) {
      const long v = std::strtol(s, nullptr, 10);
      if (v > 0) max_entries = static_cast<size_t>(v);
    }
  }
};
PlanCache& plan_cache() {
  static auto* c = new PlanCache();  // leaked on purpose: plans must not be destroyed after the CUDA context
  return *c;
}

bool same_record(const std::optional<SearchRecord>& a, const std::optional<SearchRecord>& b) {
  if (a.has_value() != b.has_value()) return false;
  return !a.has_value() || (a->alg_id == b->alg_id && a->split_k == b->split_k &&
                            a->split_k_mode == b->split_k_mode && a->split_k_buffers == b->split_k_buffers);
}

// The cached entry for `key`, built on a miss. The plan is built outside the cache's lock (cusparseLtMatmulPlanInit
// takes milliseconds; other keys must not wait) and once per key: concurrent callers of the same new key wait on
// that key's slot, not on the cache. A search or record import (which bumps the epoch) re-resolves an "alg_id = -1"
// entry only when the record for its own configuration changed; other entries just take the new epoch.
std::shared_ptr<PlanEntry> get_entry(const PlanKey& key, const cusparseLtHandle_t* h) {
  auto& cache = plan_cache();
  std::shared_ptr<PlanSlot> slot;
  {
    std::lock_guard<std::mutex> lock(cache.mu);
    auto it = cache.index.find(key);
    if (it != cache.index.end()) {
      cache.lru.splice(cache.lru.begin(), cache.lru, it->second);
      slot = it->second->second;
    } else {
      slot = std::make_shared<PlanSlot>();
      cache.lru.emplace_front(key, slot);
      cache.index.emplace(key, cache.lru.begin());
      // Never evict while a CUDA graph is being captured (a capture must not pay for rebuilding plans it needs).
      if (cache.lru.size() > cache.max_entries &&
          c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
        while (cache.lru.size() > cache.max_entries) {
          cache.index.erase(cache.lru.back().first);
          cache.lru.pop_back();  // shared_ptr: an entry in use by another thread lives until that call returns
          ++g_evictions;
        }
      }
    }
  }
  std::lock_guard<std::mutex> slot_lock(slot->mu);
  const uint64_t epoch = g_search_epoch.load();
  if (slot->entry && key.cfg.alg_id < 0 && slot->entry->search_epoch != epoch) {
    if (same_record(slot->entry->record, find_record(key.cfg, key.device))) {
      slot->entry->search_epoch = epoch;  // the search was about another configuration: keep the plan
    } else {
      slot->entry.reset();  // re-resolve against the new search result
    }
  }
  if (slot->entry) {
    ++g_hits;
    return slot->entry;
  }
  ++g_misses;
  slot->entry = make_entry(h, key.cfg, key.bias_ptr, key.device);
  return slot->entry;
}

// ------------------------------------------------------------------------------------------------ linear
struct Prepared {
  GemmConfig cfg;
  at::ScalarType out = at::kHalf;
  Activation act = Activation::kNone;
  int64_t M = 0;
  c10::DeviceIndex device = 0;
};

void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t len, const at::Tensor& x,
                  const char* len_name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; all tensors must be on the same device");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, op, ": ", name, " must be 1-D [", len_name, " = ", len, "], got ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", t.scalar_type());
}

// A tensor cuSPARSELt may read through a pointer fixed in a plan: contiguous and 16-byte aligned.
bool plan_ready(const at::Tensor& t) { return t.is_contiguous() && aligned16(t.data_ptr()); }

Prepared prepare(const char* op, const at::Tensor& x, const at::Tensor& compressed, int64_t n, int64_t k,
                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha,
                 const std::optional<at::Tensor>& row_scale, c10::string_view activation,
                 std::optional<at::ScalarType> out_dtype, int64_t alg_id, int64_t split_k) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(compressed.device() == x.device(), op, ": compressed is on ", compressed.device(), " but x is on ",
              x.device(), "; all tensors must be on the same device");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, k] (the Python wrapper flattens leading dims), got ", x.dim(),
              "-D");
  const auto in = x.scalar_type();
  check_input_dtype(op, "x", in);
  check_dims(op, in, n, k);
  TORCH_CHECK(x.size(1) == k, op, ": x's last dim (", x.size(1), ") must equal k = ", k);
  TORCH_CHECK(split_k >= 1, op, ": split_k must be >= 1, got ", split_k);
  TORCH_CHECK(alg_id >= -1, op, ": alg_id must be >= 0, or -1 for the searched / default algorithm, got ", alg_id);
  check_arch(op, in, x.device().index());
  // Sized by cuSPARSELt's own query (cached per arch and shape); a larger buffer is accepted.
  const int64_t need = query_compressed_bytes(n, k, in, x.device().index());
  TORCH_CHECK(compressed.scalar_type() == at::kByte && compressed.dim() == 1 && compressed.numel() >= need,
              op, ": compressed must be the uint8 buffer cslt_compress returned for a [", n, ", ", k, "] ", in,
              " weight (at least ", need, " bytes), got ", compressed.scalar_type(), " ", compressed.sizes());
  TORCH_CHECK(aligned16(compressed.data_ptr()), op, ": compressed must be 16-byte aligned");

  Prepared p;
  p.M = x.size(0);
  p.device = x.device().index();
  p.act = cuda::parse_activation(std::string(activation), op);
  const bool has_rs = row_scale.has_value();
  if (has_rs) check_vector(op, "row_scale", *row_scale, p.M, x, "M");
  if (alpha.has_value()) check_vector(op, "alpha", *alpha, n, x, "n");
  if (bias.has_value()) check_vector(op, "bias", *bias, n, x, "n");

  // Output dtypes: cuSPARSELt 0.8's combinations, widened by the post-op. Defaults follow spmm_24 (CPU): x's dtype
  // for 16-bit inputs, the accumulator's for 8-bit ones (int32 for int8, float32 for float8).
  const bool in16 = in == at::kHalf || in == at::kBFloat16;
  at::ScalarType out;
  if (in16) {
    out = out_dtype.value_or(in);
    TORCH_CHECK(is_float_out(out), op, ": out_dtype for ", in, " inputs must be float16, bfloat16 or float32, got ",
                out);
  } else if (in == at::kChar) {
    out = out_dtype.value_or(at::kInt);
    TORCH_CHECK(out == at::kChar || out == at::kInt || is_float_out(out), op,
                ": out_dtype for int8 inputs must be int8, int32, float16, bfloat16 or float32, got ", out);
  } else {
    out = out_dtype.value_or(at::kFloat);
    TORCH_CHECK(out == at::kFloat8_e4m3fn || is_float_out(out), op,
                ": out_dtype for float8_e4m3fn inputs must be float8_e4m3fn, float16, bfloat16 or float32, got ", out);
  }
  p.out = out;

  GemmConfig& c = p.cfg;
  c.mp = (p.M + dense_multiple(in) - 1) / dense_multiple(in) * dense_multiple(in);
  c.n = n;
  c.k = k;
  c.in = in;
  c.alg_id = static_cast<int>(alg_id);
  c.split_k = static_cast<int>(split_k);
  const at::ScalarType c_direct = out == at::kFloat8_e4m3fn ? at::kHalf : out;  // an FP8 output takes an FP16 C
  // The epilogue's bias dtype is C's dtype for 16-bit and float8 inputs (NVIDIA's matmul_advanced sample). For int8
  // inputs the documentation does not pin it down (float32 was assumed here before; NVIDIA's sample uses the C/D
  // type) and a wrong guess is not detectable (an untyped pointer: silent garbage), so an int8 bias is never fused:
  // the post-op adds it to the exact int32 product.
  const at::ScalarType fused_bias_dtype = c_direct;
  const bool bias_fusable =
      !bias.has_value() || (in != at::kChar && bias->scalar_type() == fused_bias_dtype && plan_ready(*bias));
  // "Direct": cuSPARSELt writes the final output and its epilogue does everything. Otherwise cuSPARSELt writes the
  // plain product (x's dtype with the alpha vector for 16-bit inputs; exact int32 / fp32 without alpha for 8-bit
  // inputs) and sparsekern's post-op applies the rest: cuSPARSELt's alpha vector scales output channels only, so a
  // per-token row_scale is always a post-op; so are a bias of another dtype and the outputs cuSPARSELt cannot
  // write for these inputs (16-bit -> another float type, int8 -> float32).
  const bool direct = !has_rs && bias_fusable && !(in16 && out != in) && !(in == at::kChar && out == at::kFloat);
  if (direct) {
    c.d = out;
    c.c = c_direct;
    c.alpha_vector = alpha.has_value();
    c.bias = bias.has_value();
    c.bias_dtype = fused_bias_dtype;
    c.act = static_cast<int>(p.act);
  } else {
    TORCH_CHECK(out != at::kFloat8_e4m3fn, op, ": a float8_e4m3fn output needs everything in cuSPARSELt's epilogue: ",
                "no row_scale, and a bias (if any) of dtype ", fused_bias_dtype, "; ask for a float out_dtype");
    c.d = in16 ? in : (in == at::kChar ? at::kInt : at::kFloat);
    c.c = c.d;
    c.alpha_vector = alpha.has_value() && in16;
  }
  return p;
}

// float32, contiguous, 16-byte aligned (a copy only when needed).
at::Tensor as_float32(const at::Tensor& t) {
  at::Tensor r = t.to(at::kFloat).contiguous();
  return aligned16(r.data_ptr()) ? r : r.clone();
}

// Runs the prepared GEMM. With `record`: run cusparseLtMatmulSearch on a fresh plan instead and fill *record.
at::Tensor run(const Prepared& p, const at::Tensor& x_in, const at::Tensor& compressed,
               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha,
               const std::optional<at::Tensor>& row_scale, SearchRecord* record) {
  const GemmConfig& cfg = p.cfg;
  const auto opts = x_in.options();
  if (p.M == 0) return at::empty({0, cfg.n}, opts.dtype(p.out));

  // Dense operand: x as is when it is already [Mp, k] contiguous and aligned, else a padded copy. The padding rows
  // are not cleared: row r of x only feeds column r of D, and the padded columns of D are never read.
  at::Tensor x = x_in;
  if (cfg.mp != p.M || !x.is_contiguous() || !aligned16(x.data_ptr())) {
    x = at::empty({cfg.mp, cfg.k}, opts);
    x.narrow(0, 0, p.M).copy_(x_in);
  }

  auto& slot = handle_for(p.device);
  const auto stream = at::cuda::getCurrentCUDAStream(p.device);
  cudaStream_t raw_stream = stream.stream();

  std::shared_ptr<PlanEntry> entry;
  if (record == nullptr) {
    PlanKey key;
    key.cfg = cfg;
    key.handle_id = slot.id;
    key.device = p.device;
    key.bias_ptr = cfg.bias ? bias->data_ptr() : nullptr;
    entry = get_entry(key, &slot.handle);
  } else {
    GemmConfig fresh = cfg;
    fresh.alg_id = 0;
    fresh.split_k = 1;
    entry = make_entry(&slot.handle, fresh, cfg.bias ? bias->data_ptr() : nullptr, p.device);
  }
  TORCH_CHECK(entry->compressed_size <= static_cast<size_t>(compressed.numel()),
              "cuSPARSELt: the plan expects a compressed buffer of ", entry->compressed_size, " bytes but got ",
              compressed.numel(), " for ", describe(cfg));

  // D: the output itself when cuSPARSELt writes the final dtype, else an int32 / fp32 product for the post-op. The
  // entry says what the plan writes (an epilogue fallback writes the plain product).
  const bool temp = entry->d_type != p.out;
  at::Tensor d = at::empty({cfg.mp, cfg.n}, opts.dtype(entry->d_type));
  at::Tensor y = temp ? at::empty({p.M, cfg.n}, opts.dtype(p.out)) : d.narrow(0, 0, p.M);

  const float one = 1.f, zero = 0.f;
  at::Tensor alpha_vec;
  if (entry->fused_alpha) alpha_vec = as_float32(*alpha);  // read at call time: a per-call copy is fine
  const void* alpha_ptr = entry->fused_alpha ? alpha_vec.data_ptr() : static_cast<const void*>(&one);
  // Per-call device memory from the caching allocator (graph-safe, see the top of the file). The FP8 output's C is
  // FP16 and never read (beta = 0); it is zeroed so that even a read could not bring NaN into D.
  at::Tensor workspace;
  if (entry->workspace_size > 0) {
    workspace = at::empty({static_cast<int64_t>(entry->workspace_size)}, opts.dtype(at::kByte));
  }
  at::Tensor c_buffer;
  if (entry->c_type != entry->d_type) c_buffer = at::zeros({cfg.mp, cfg.n}, opts.dtype(entry->c_type));
  void* ws = workspace.defined() ? workspace.data_ptr() : nullptr;
  void* c_ptr = c_buffer.defined() ? c_buffer.data_ptr() : d.data_ptr();
  if (record != nullptr) {
    SK_CSLT_CHECK(cusparseLtMatmulSearch(&slot.handle, &entry->plan, alpha_ptr, compressed.data_ptr(), x.data_ptr(),
                                         &zero, c_ptr, d.data_ptr(), ws, &raw_stream, 1),
                  describe(cfg));
    ++g_searches;
    int alg = 0, sk = 1, skb = 1, max_alg = 0;
    cusparseLtSplitKMode_t mode = CUSPARSELT_SPLIT_K_MODE_ONE_KERNEL;
    const auto* h = &slot.handle;
    SK_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h, &entry->alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg,
                                                  sizeof(alg)), describe(cfg));
    SK_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h, &entry->alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID, &max_alg,
                                                  sizeof(max_alg)), describe(cfg));
    SK_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h, &entry->alg_sel, CUSPARSELT_MATMUL_SPLIT_K, &sk, sizeof(sk)),
                  describe(cfg));
    SK_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h, &entry->alg_sel, CUSPARSELT_MATMUL_SPLIT_K_MODE, &mode,
                                                  sizeof(mode)), describe(cfg));
    SK_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h, &entry->alg_sel, CUSPARSELT_MATMUL_SPLIT_K_BUFFERS, &skb,
                                                  sizeof(skb)), describe(cfg));
    *record = record_for(cfg, p.device);
    record->alg_id = alg;
    record->max_alg_id = max_alg;
    record->split_k = sk;
    record->split_k_mode = static_cast<int>(mode);
    record->split_k_buffers = skb;
  } else {
    SK_CSLT_CHECK(cusparseLtMatmul(&slot.handle, &entry->plan, alpha_ptr, compressed.data_ptr(), x.data_ptr(), &zero,
                                   c_ptr, d.data_ptr(), ws, &raw_stream, 1),
                  describe(cfg));
  }

  // Post-op: whatever the plan did not apply, in the order of the semantics (scales, bias, activation).
  const bool bias_left = bias.has_value() && !entry->fused_bias;
  const bool act_left = p.act != Activation::kNone && entry->fused_act != static_cast<int>(p.act);
  const bool alpha_left = alpha.has_value() && !entry->fused_alpha;
  if (temp || row_scale.has_value() || bias_left || act_left || alpha_left) {
    TORCH_CHECK(p.out != at::kFloat8_e4m3fn, "cuSPARSELt: cannot finish ", describe(cfg),
                " for a float8_e4m3fn output outside cuSPARSELt's epilogue");
    std::optional<at::Tensor> b;
    if (bias_left) {
      // The post-op reads a float32 bias, or one of the (floating) output dtype.
      b = (bias->scalar_type() == p.out && is_float_out(p.out) && bias->is_contiguous()) ? *bias : as_float32(*bias);
    }
    std::optional<at::Tensor> rs, al;
    if (row_scale.has_value()) rs = as_float32(*row_scale);
    if (alpha_left) al = as_float32(*alpha);
    cuda::linear_postop(d, y, rs, al, b, act_left ? p.act : Activation::kNone);
  }
  return y;
}

}  // namespace

// ------------------------------------------------------------------------------------------------ public
std::string runtime_version() {
  static const std::string v = [] {
    int major = 0, minor = 0, patch = 0;
    if (cusparseLtGetProperty(MAJOR_VERSION, &major) != CUSPARSE_STATUS_SUCCESS ||
        cusparseLtGetProperty(MINOR_VERSION, &minor) != CUSPARSE_STATUS_SUCCESS ||
        cusparseLtGetProperty(PATCH_LEVEL, &patch) != CUSPARSE_STATUS_SUCCESS) {
      return std::string("unknown");
    }
    return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
  }();
  return v;
}

CacheStats cache_stats() {
  CacheStats s;
  {
    auto& c = plan_cache();
    std::lock_guard<std::mutex> lock(c.mu);
    s.entries = static_cast<int64_t>(c.lru.size());
    s.max_entries = static_cast<int64_t>(c.max_entries);
  }
  s.handles_created = g_handles.load();
  s.descriptors_created = g_descriptors.load();
  s.plans_created = g_plans.load();
  s.hits = g_hits.load();
  s.misses = g_misses.load();
  s.evictions = g_evictions.load();
  s.searches = g_searches.load();
  s.epilogue_fallbacks = g_fallbacks.load();
  return s;
}

void clear_cache() {
  auto& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.index.clear();
  c.lru.clear();
}

std::vector<SearchRecord> search_records() {
  auto& t = search_table();
  std::lock_guard<std::mutex> lock(t.mu);
  std::vector<SearchRecord> out;
  out.reserve(t.records.size());
  for (const auto& kv : t.records) out.push_back(kv.second);
  return out;
}

void add_search_records(const std::vector<SearchRecord>& records) {
  auto& t = search_table();
  {
    std::lock_guard<std::mutex> lock(t.mu);
    for (const auto& r : records) t.records[record_key(r)] = r;
  }
  ++g_search_epoch;
}

void clear_search_records() {
  auto& t = search_table();
  {
    std::lock_guard<std::mutex> lock(t.mu);
    t.records.clear();
  }
  ++g_search_epoch;
}

SearchRecord search(const at::Tensor& x, const at::Tensor& compressed, int64_t n, int64_t k,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha,
                    const std::optional<at::Tensor>& row_scale, const std::string& activation,
                    std::optional<at::ScalarType> out_dtype) {
  const auto p = prepare("cslt search", x, compressed, n, k, bias, alpha, row_scale, activation, out_dtype, -1, 1);
  const c10::cuda::CUDAGuard guard(x.device());
  SearchRecord rec;
  if (p.M == 0) return rec;
  run(p, x, compressed, bias, alpha, row_scale, &rec);
  add_search_records({rec});
  return rec;
}

at::Tensor compress(const at::Tensor& w_in) {
  const char* op = "cslt_compress";
  TORCH_CHECK(w_in.is_cuda(), op, ": w must be a CUDA tensor, got device ", w_in.device());
  TORCH_CHECK(w_in.dim() == 2, op, ": w must be 2-D [n, k], got ", w_in.dim(), "-D");
  const auto in = w_in.scalar_type();
  check_input_dtype(op, "w", in);
  const int64_t n = w_in.size(0), k = w_in.size(1);
  check_dims(op, in, n, k);
  check_arch(op, in, w_in.device().index());
  const c10::cuda::CUDAGuard guard(w_in.device());
  at::Tensor w = w_in.contiguous();
  if (!aligned16(w.data_ptr())) w = w.clone();

  // cuSPARSELt compresses whatever it is given; a weight that is not 2:4 would silently compute garbage.
  const int64_t bad = cuda::first_nm_violation(w, 2, 4);
  if (bad >= 0) {
    const int64_t r = bad / (k / 4), g = bad % (k / 4);
    TORCH_CHECK(false, op, ": w is not 2:4: row ", r, ", group ", g, " (columns ", 4 * g, "..", 4 * g + 3,
                ") holds more than 2 non-zeros; prune it first (sparsekern.prune_nm(w, 2, 4))");
  }

  auto& slot = handle_for(w.device().index());
  cusparseLtMatDescriptor_t desc;
  SK_CSLT_CHECK(cusparseLtStructuredDescriptorInit(&slot.handle, &desc, n, k, k, 16, cuda_type(in), CUSPARSE_ORDER_ROW,
                                                   CUSPARSELT_SPARSITY_50_PERCENT),
                "(cslt_compress of a [" + std::to_string(n) + ", " + std::to_string(k) + "] weight)");
  ++g_descriptors;
  // Destroy the descriptor on every path out of here.
  struct DescGuard {
    cusparseLtMatDescriptor_t* d;
    ~DescGuard() { cusparseLtMatDescriptorDestroy(d); }
  } desc_guard{&desc};
  size_t size = 0, tmp_size = 0;
  SK_CSLT_CHECK(cusparseLtSpMMACompressedSize2(&slot.handle, &desc, &size, &tmp_size),
                "(cslt_compress of a [" + std::to_string(n) + ", " + std::to_string(k) + "] weight)");
  // Exactly the size cuSPARSELt asks for (its padding of small matrices included; issue 17, finding 1): the same
  // number query_compressed_bytes() caches for the op's checks and for the fake kernel.
  auto out = at::empty({static_cast<int64_t>(size)}, w.options().dtype(at::kByte));
  at::Tensor tmp;
  if (tmp_size > 0) tmp = at::empty({static_cast<int64_t>(tmp_size)}, w.options().dtype(at::kByte));
  const auto stream = at::cuda::getCurrentCUDAStream(w.device().index());
  SK_CSLT_CHECK(cusparseLtSpMMACompress2(&slot.handle, &desc, 1, CUSPARSE_OPERATION_NON_TRANSPOSE, w.data_ptr(),
                                         out.data_ptr(), tmp.defined() ? tmp.data_ptr() : nullptr, stream.stream()),
                "(cslt_compress of a [" + std::to_string(n) + ", " + std::to_string(k) + "] weight)");
  return out;
}

int64_t compressed_size(int64_t n, int64_t k, at::ScalarType dtype, c10::DeviceIndex device) {
  check_input_dtype("cslt_compressed_size", "dtype", dtype);
  check_dims("cslt_compressed_size", dtype, n, k);
  const c10::DeviceIndex dev = device < 0 ? c10::cuda::current_device() : device;
  check_arch("cslt_compressed_size", dtype, dev);
  const c10::cuda::CUDAGuard guard(dev);
  return query_compressed_bytes(n, k, dtype, dev);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& compressed, int64_t n, int64_t k,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha,
                  const std::optional<at::Tensor>& row_scale, c10::string_view activation,
                  std::optional<at::ScalarType> out_dtype, int64_t alg_id, int64_t split_k) {
  const auto p =
      prepare("cslt_linear", x, compressed, n, k, bias, alpha, row_scale, activation, out_dtype, alg_id, split_k);
  const c10::cuda::CUDAGuard guard(x.device());
  return run(p, x, compressed, bias, alpha, row_scale, nullptr);
}

}  // namespace cslt
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("cslt_compress", &sparsekern::cslt::compress);
  m.impl("cslt_linear", &sparsekern::cslt::linear);
}
