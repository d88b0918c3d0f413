// The one home of the CPU kernels' run-time choices (spmm_24 and wanda_prune): the CPU-feature probe, the settings
// that force an ISA or a kernel family, and the crossover thresholds at which `auto` changes kernel family. Not part
// of the public C++ API; Python reaches it through sparsekern._C.cpu_dispatch_get / cpu_dispatch_set
// (csrc/python_bindings.cpp, python/sparsekern/envs.py).
//
// Settings are read from the environment ONCE, the first time a kernel (or the Python side) asks for them:
//   SPARSEKERN_CPU_ISA=avx512|avx512-base|avx2|scalar   force an ISA (unset: the best the CPU supports)
//   SPARSEKERN_CPU_SPMM_LAYOUT=auto|rows|pairs|tokens|amx   force spmm_24's kernel family (default auto)
//   SPARSEKERN_NO_HUGEPAGE_HINT=1                        no MADV_HUGEPAGE on wanda_prune's outputs
// A value that cannot be used does not fail at load (import never crashes): it is kept and raised, with the message
// the op always gave, by the first call that needs it. After load the settings change only through
// set_dispatch_values (validated there: a bad value raises at once and changes nothing). A call reads one immutable
// snapshot (an atomic pointer load, no lock, no getenv), so a concurrent set never tears a call's view.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace sparsekern {
namespace cpu {

// ------------------------------------------------------------------------------------------------- feature probe
// What cpuid says about the running CPU (cached; the one probe of the CPU kernels). One rule per ISA level:
struct CpuFeatures {
  bool avx512 = false;       // avx512f + bw + vl + dq: every AVX-512 kernel (spmm_24 and wanda_prune)
  bool avx512_bf16 = false;  // + AVX512_BF16 (vdpbf16ps)
  bool avx512_vnni = false;  // + AVX512_VNNI (vpdpwssd, vpdpbusd)
  bool avx512_vbmi = false;  // + AVX512_VBMI (vpermb, vpmultishiftqb)
  bool avx2 = false;         // avx2 + fma + f16c: the AVX2 kernels (spmm_24 and wanda_prune)
  // AMX (spmm_24's amx family): amx-tile + the dtype's AMX extension + AVX512_VBMI2 (the decompression's vpexpand),
  // enabled by the OS (XCR0 tile state) AND granted to this process (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM)).
  bool amx_bf16 = false;     // + AMX-BF16 (tdpbf16ps) and AVX512_BF16
  bool amx_int8 = false;     // + AMX-INT8 (tdpbssd)
};
const CpuFeatures& cpu_features();

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
Isa best_isa();  // the best level cpu_features() allows
const char* isa_name(Isa isa);

// ------------------------------------------------------------------------------------------------- settings
enum class IsaSetting { kAuto, kAvx512, kAvx512Base, kAvx2, kScalar };
enum class LayoutSetting { kAuto, kRows, kPairs, kTokens, kAmx };

// Batch sizes M (rows of x in one call, or one slab of it) from which `auto` takes a kernel family, and the slab
// size. The defaults and the measurements behind them are in dispatch.cpp (kDefaultThresholds); a measured policy
// table may override them by name (python/sparsekern/policy.py, "cpu_dispatch"). kNever: auto never takes it.
constexpr int64_t kNever = INT64_MAX;
struct Thresholds {
  int64_t rows_pair_bf16_min_m;  // rows family, bfloat16 (AVX512_BF16): unblocked row-pair kernel
  int64_t rows_pair_i8_min_m;    // rows family, int8 (AVX512_VNNI): unblocked int16-pair kernel
  int64_t pairs_bf16_min_m;      // K-blocked row-pair family, bfloat16 (AVX512_BF16)
  int64_t pairs_i8_min_m;        // K-blocked row-pair family, int8 as int16 pairs
  int64_t pairs_u8_min_m;        // K-blocked row-pair family, int8 by vpdpbusd (AVX512_VNNI + AVX512_VBMI)
  int64_t tokens_f32_min_m;      // token lanes with the fp32 table (float32 / float16 / bfloat16 without BF16)
  int64_t tokens_bf16_min_m;     // token lanes, bfloat16 pairs (AVX512_BF16)
  int64_t tokens_i8_min_m;       // token lanes, int8 pairs
  int64_t slab_rows;             // a call with more rows runs as slabs of this many rows (driver, spmm_24.cpp)
  int64_t amx_bf16_min_m;        // AMX tile kernels, bfloat16 (AMX-BF16)
  int64_t amx_i8_min_m;          // AMX tile kernels, int8 (AMX-INT8)
  int64_t amx_slab_rows;         // the slab size instead of slab_rows where the AMX family runs
};
// Name and member of every threshold, in one list (the pybind dict keys and the policy table's field names).
struct ThresholdField {
  const char* name;
  int64_t Thresholds::*member;
  bool never_allowed;  // may be kNever (None in Python)
};
const std::vector<ThresholdField>& threshold_fields();
const Thresholds& default_thresholds();

struct DispatchSettings {
  IsaSetting isa = IsaSetting::kAuto;
  LayoutSetting layout = LayoutSetting::kAuto;
  bool huge_page_hint = true;
  Thresholds thresholds{};
  // A value from the environment that could not be used, raised by the first call that needs it (never at load).
  enum class EnvProblem { kNone, kNotUnderstood, kUnsupported };
  EnvProblem isa_env_problem = EnvProblem::kNone;
  std::string isa_env_value;     // SPARSEKERN_CPU_ISA's value when isa_env_problem is set
  std::string layout_env_value;  // non-empty: SPARSEKERN_CPU_SPMM_LAYOUT held this value, not understood
};

// The settings in effect: an immutable snapshot, valid for the life of the process.
const DispatchSettings& dispatch_settings();

// One value of a setting, as Python hands it over: None, a bool, an int or a string.
struct DispatchValue {
  enum class Kind { kNone, kBool, kInt, kStr } kind = Kind::kNone;
  bool b = false;
  int64_t i = 0;
  std::string s;
};
// Sets settings by name ("isa", "layout", "huge_page_hint", or a threshold name): all or nothing; a name or value
// that is not understood raises (TORCH_CHECK) and changes nothing. "isa": None or "" = auto.
void set_dispatch_values(const std::vector<std::pair<std::string, DispatchValue>>& values);
// Back to what the environment said at load, and the default thresholds.
void reset_dispatch_settings();
// Every published snapshot has a number; restore_dispatch_version(v) makes snapshot v current again (what a Python
// context manager that changed settings does on exit, pending environment errors included).
int64_t dispatch_version();
void restore_dispatch_version(int64_t version);
// The environment values kept since load that an op will refuse (empty when none), as sentences.
std::vector<std::string> pending_env_errors(const DispatchSettings& s);

// Spellings: "avx512" / "avx512-base" / "avx2" / "scalar" / "" (auto); "auto" / "rows" / "pairs" / "tokens" / "amx".
std::string isa_setting_name(IsaSetting s);
std::string layout_setting_name(LayoutSetting s);

// ------------------------------------------------------------------------------------------------- decisions
// wanda_prune's ISA (avx512-base means avx512 there: it uses no extension). Raises a deferred environment error.
Isa wanda_isa(const DispatchSettings& s);
// (family, kernel name) spmm_24 runs for M rows, K columns and weights of `dtype` ("float32", "float16", "bfloat16",
// "int8") under the current settings; for M above slab_rows, what its first slab runs. For tests and diagnostics;
// raises as the op would.
std::pair<std::string, std::string> spmm_kernel_for(int64_t M, int64_t K, const std::string& dtype);

}  // namespace cpu
}  // namespace sparsekern
