// The CPU kernels' run-time choices in one place (interface and rules: dispatch.h): the CPU-feature probe, the
// settings (read from the environment once), the default crossover thresholds with the measurements behind them,
// and every ISA / kernel-family decision of spmm_24 (spmm::plan_call) and wanda_prune (wanda_isa).
#include "cpu/dispatch.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>

#include "cpu/spmm_24.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace sparsekern {
namespace cpu {

// ------------------------------------------------------------------------------------------------- feature probe
// GCC / Clang's cpuid builtins (which also check that the OS saves the AVX / AVX-512 registers). ATen's helpers
// (ATen/cpu/Utils.h) were considered: their names changed between torch releases (is_cpu_support_avx512,
// is_avx512_supported, then a capability map keyed by strings in torch 2.14) and a missing key would silently turn
// the fast kernels off, while these five rules are exactly what the kernels' target attributes need.
#if defined(__x86_64__) && defined(__GNUC__)
namespace {
// AMX tiles usable by this process: cpuid amx-tile, the OS saves the tile state (XCR0 bits 17 TILECFG, 18 TILEDATA),
// and (Linux >= 5.16) the process was granted the tile data state: arch_prctl(ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA), once per process, before any tile instruction (without it the first one faults). Refused
// (older kernel, seccomp, ...): the AMX kernels are reported unavailable, never run. cpuid is read directly: GCC 12's
// __builtin_cpu_supports("amx-tile") answers 0 on a Sapphire Rapids with AMX enabled (measured).
bool amx_usable() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  if (!((d >> 24) & 1)) return false;  // AMX-TILE
  __cpuid(1, a, b, c, d);
  if (!((c >> 27) & 1)) return false;  // OSXSAVE: xgetbv allowed
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3) != 3) return false;
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  return true;
#else
  return false;  // other systems: not probed, so not used
#endif
}
}  // namespace
#endif

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures c;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    c.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    c.avx512_bf16 = c.avx512 && __builtin_cpu_supports("avx512bf16");
    c.avx512_vnni = c.avx512 && __builtin_cpu_supports("avx512vnni");
    c.avx512_vbmi = c.avx512 && __builtin_cpu_supports("avx512vbmi");
    c.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#if defined(__GNUC__)
    if (c.avx512 && __builtin_cpu_supports("avx512vbmi2") && amx_usable()) {
      unsigned a = 0, b = 0, cx = 0, d = 0;
      __cpuid_count(7, 0, a, b, cx, d);
      c.amx_bf16 = ((d >> 22) & 1) && c.avx512_bf16;  // AMX-BF16
      c.amx_int8 = (d >> 25) & 1;                     // AMX-INT8
    }
#endif
#endif
    return c;
  }();
  return f;
}

Isa best_isa() {
  const CpuFeatures& f = cpu_features();
  return f.avx512 ? Isa::kAvx512 : f.avx2 ? Isa::kAvx2 : Isa::kScalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kScalar:
      return "scalar";
  }
  return "scalar";
}

// ------------------------------------------------------------------------------------------------- thresholds
// The defaults, all in this one table. Measured on the 2-core Zen 4 development machine (AMD EPYC, 2 threads,
// 11008 x 4096 and 4096 x 11008; docs/benchmarks.md):
//
// rows_pair_bf16_min_m = 8, rows_pair_i8_min_m = 32: the rows family for bfloat16 (AVX512_BF16) and int8 (VNNI) runs
//   the one-row-per-vector kernels for few activation rows and the unblocked row-pair kernels from these M (the
//   call's M; medians of 15: bf16 1.04-1.06x the row kernels at M = 16, 32 and 64 but 0.88-0.98x at M = 4; int8
//   1.07-1.15x at M = 32 and 64, 0.58-1.09x below).
// pairs_bf16_min_m = pairs_i8_min_m = 80: the smallest M at which auto picks the K-blocked row-pair kernels
//   (2026-11-24): bf16 equal to the row kernels at M = 64 and ahead from 96 (M = 256: 1.27x the row kernels, 1.10x
//   dense F.linear); int8 (VNNI) equal at 64, 1.25x at 128, 1.43x at 256 (also ahead of the int8 token lanes, 1.26x
//   at 256). Below, building the panels is not paid back.
// pairs_u8_min_m = 24: int8 by vpdpbusd (VNNI + VBMI), same machine and shapes, medians of 7: ahead of the row kernels
//   from M = 24 (6.0 vs 6.9 ms, 5.9 vs 6.6 ms), behind at 16 (5.3 vs 4.7 ms: the panels cost ~3 ms a call); at
//   M = 256 27-28 ms against 59-61 for the row kernels and 29-36 ms for PyTorch's dense int8 GEMM (torch._int_mm).
// tokens_*: the smallest M at which auto picks the token lanes over the row kernels (2026-11-24):
//   fp32 table: equal at M = 16, ahead from M = 32-64 (M = 256: 1.3-1.5x the row kernels);
//   int8 pairs: behind up to M = 64, ~8 % ahead of the row kernels at M = 256 — but the row-pair kernels exist for
//   int8 wherever these do and auto takes them from M = 24 (VNNI + VBMI) or 80, so auto no longer reaches these for
//   int8; they stay selectable and tested;
//   bf16 pairs: never ahead there (one vdpbf16ps per 16 tokens is bound by its 64-byte table load, where the row
//   kernels share each activation load across 4 weight rows), so auto never takes it; it stays selectable with
//   SPARSEKERN_CPU_SPMM_LAYOUT=tokens (tested) for CPUs with more load bandwidth per multiply-add.
// slab_rows = 256: every kernel family streams all of x once per 32-row weight tile, so once x outgrows the caches
//   (M = 1024 x K = 11008 bf16: 22 MB) that traffic dominates; a slab's x stays in L2/L3 while the whole weight (read
//   once per slab) passes over it. Measured (4096 x 11008, bf16, 2 threads): M = 1024 0.86x -> 1.0x+ dense,
//   M = 2048 0.83x -> 1.0x+.
// amx_bf16_min_m = 12, amx_i8_min_m = 8: the AMX family (spmm_24_amx.cpp; Intel with AMX only, so these never apply
//   on the Zen 4 machine above). Measured 2026-12-05 on the 2-core Sapphire Rapids development VM (2 threads, best of
//   7, 1536 x 576 and 4096 x 4096) against what auto took without it: bf16 0.31-0.34x at M = 1, 0.67-0.71x at 4,
//   1.04-1.09x at 8, 1.8-2.0x at 16, 5x at 96-128, 7-8x at 256; int8 0.41-0.58x at M = 1, 0.73-0.87x at 4, 1.37-1.56x
//   at 8, 2.2-2.4x at 16-32, 2.7-3.1x at 128. Below, the per-call panel decompression (a 16-row tile for one row)
//   is not paid back.
// amx_slab_rows = 1024: the AMX family rebuilds its weight panels per slab, so it takes larger slabs than slab_rows
//   (same machine, bf16, M = 2048, us, slab 256 / 512 / 1024 / 2048: 1536 x 576 2809 / 2424 / 2269 / 2285, 576 x 1536
//   3732 / 3078 / 3129 / 3123, 4096 x 4096 51.5k / 47.7k / 46.4k / 44.5k); 1024 keeps x of K = 576 in L2.
constexpr Thresholds kDefaultThresholds{
    /*rows_pair_bf16_min_m=*/8,
    /*rows_pair_i8_min_m=*/32,
    /*pairs_bf16_min_m=*/80,
    /*pairs_i8_min_m=*/80,
    /*pairs_u8_min_m=*/24,
    /*tokens_f32_min_m=*/32,
    /*tokens_bf16_min_m=*/kNever,
    /*tokens_i8_min_m=*/256,
    /*slab_rows=*/256,
    /*amx_bf16_min_m=*/12,
    /*amx_i8_min_m=*/8,
    /*amx_slab_rows=*/1024,
};

const Thresholds& default_thresholds() { return kDefaultThresholds; }

const std::vector<ThresholdField>& threshold_fields() {
  static const std::vector<ThresholdField> fields = {
      {"rows_pair_bf16_min_m", &Thresholds::rows_pair_bf16_min_m, true},
      {"rows_pair_i8_min_m", &Thresholds::rows_pair_i8_min_m, true},
      {"pairs_bf16_min_m", &Thresholds::pairs_bf16_min_m, true},
      {"pairs_i8_min_m", &Thresholds::pairs_i8_min_m, true},
      {"pairs_u8_min_m", &Thresholds::pairs_u8_min_m, true},
      {"tokens_f32_min_m", &Thresholds::tokens_f32_min_m, true},
      {"tokens_bf16_min_m", &Thresholds::tokens_bf16_min_m, true},
      {"tokens_i8_min_m", &Thresholds::tokens_i8_min_m, true},
      {"slab_rows", &Thresholds::slab_rows, false},
      {"amx_bf16_min_m", &Thresholds::amx_bf16_min_m, true},
      {"amx_i8_min_m", &Thresholds::amx_i8_min_m, true},
      {"amx_slab_rows", &Thresholds::amx_slab_rows, false},
  };
  return fields;
}

// ------------------------------------------------------------------------------------------------- settings
namespace {

constexpr const char* kIsaChoices =
    "use avx512, avx512-base (no BF16/VNNI kernels), avx2 or scalar (or unset it for the best the CPU supports)";
constexpr const char* kIsaNeeds = "avx512 needs avx512f+bw+vl+dq; avx2 needs avx2+fma+f16c";
constexpr const char* kLayoutChoices = "use auto (default), rows, pairs or tokens, or amx on CPUs with AMX";

bool parse_isa(const std::string& v, IsaSetting* out) {
  if (v.empty()) {
    *out = IsaSetting::kAuto;
  } else if (v == "avx512") {
    *out = IsaSetting::kAvx512;
  } else if (v == "avx512-base") {
    *out = IsaSetting::kAvx512Base;
  } else if (v == "avx2") {
    *out = IsaSetting::kAvx2;
  } else if (v == "scalar") {
    *out = IsaSetting::kScalar;
  } else {
    return false;
  }
  return true;
}

bool parse_layout(const std::string& v, LayoutSetting* out) {
  if (v.empty() || v == "auto") {
    *out = LayoutSetting::kAuto;
  } else if (v == "rows") {
    *out = LayoutSetting::kRows;
  } else if (v == "pairs") {
    *out = LayoutSetting::kPairs;
  } else if (v == "tokens") {
    *out = LayoutSetting::kTokens;
  } else if (v == "amx") {
    *out = LayoutSetting::kAmx;
  } else {
    return false;
  }
  return true;
}

Isa level_of(IsaSetting s) {
  switch (s) {
    case IsaSetting::kAvx512:
    case IsaSetting::kAvx512Base:
      return Isa::kAvx512;
    case IsaSetting::kAvx2:
      return Isa::kAvx2;
    case IsaSetting::kScalar:
      return Isa::kScalar;
    case IsaSetting::kAuto:
      break;
  }
  return best_isa();
}

// A value as it may appear in a message: at most 48 characters (a 100 kB variable must not be echoed whole).
std::string shown(const std::string& v) { return v.size() <= 48 ? v : v.substr(0, 45) + "..."; }

DispatchSettings from_environment() {
  DispatchSettings s;
  s.thresholds = kDefaultThresholds;
  if (const char* env = std::getenv("SPARSEKERN_CPU_ISA")) {
    const std::string v(env);
    IsaSetting isa;
    if (!parse_isa(v, &isa)) {
      s.isa_env_problem = DispatchSettings::EnvProblem::kNotUnderstood;
      s.isa_env_value = shown(v);
    } else if (static_cast<int>(level_of(isa)) > static_cast<int>(best_isa())) {
      s.isa_env_problem = DispatchSettings::EnvProblem::kUnsupported;
      s.isa_env_value = shown(v);
    } else {
      s.isa = isa;
    }
  }
  if (const char* env = std::getenv("SPARSEKERN_CPU_SPMM_LAYOUT")) {
    const std::string v(env);
    if (!parse_layout(v, &s.layout)) s.layout_env_value = shown(v);  // not empty: "" parses as auto
  }
  // Any value but unset, "" and "0" turns the hint off (as before: "1", "yes", ...).
  const char* hp = std::getenv("SPARSEKERN_NO_HUGEPAGE_HINT");
  s.huge_page_hint = !(hp != nullptr && hp[0] != '\0' && hp[0] != '0');
  return s;
}

// Every snapshot ever published stays alive (a reader may still hold one): settings change rarely (tests, a policy
// table becoming active), and each snapshot is a few hundred bytes. Leaked on purpose, like the cuSPARSELt plan cache:
// no destructor may run while another thread still reads.
struct Registry {
  std::mutex mu;  // serialises writers
  std::vector<std::unique_ptr<const DispatchSettings>> all;
  std::atomic<const DispatchSettings*> current{nullptr};
  DispatchSettings initial;

  Registry() : initial(from_environment()) { publish(initial); }
  void publish(const DispatchSettings& s) {
    all.push_back(std::make_unique<const DispatchSettings>(s));
    current.store(all.back().get(), std::memory_order_release);
  }
};

Registry& registry() {
  static Registry* r = new Registry();  // environment read here, once
  return *r;
}

std::string describe(const DispatchValue& v) {
  switch (v.kind) {
    case DispatchValue::Kind::kNone:
      return "None";
    case DispatchValue::Kind::kBool:
      return v.b ? "True" : "False";
    case DispatchValue::Kind::kInt:
      return std::to_string(v.i);
    case DispatchValue::Kind::kStr:
      return v.s;
  }
  return "?";
}

}  // namespace

const DispatchSettings& dispatch_settings() { return *registry().current.load(std::memory_order_acquire); }

std::string isa_setting_name(IsaSetting s) {
  switch (s) {
    case IsaSetting::kAvx512:
      return "avx512";
    case IsaSetting::kAvx512Base:
      return "avx512-base";
    case IsaSetting::kAvx2:
      return "avx2";
    case IsaSetting::kScalar:
      return "scalar";
    case IsaSetting::kAuto:
      break;
  }
  return "";
}

std::string layout_setting_name(LayoutSetting s) {
  switch (s) {
    case LayoutSetting::kRows:
      return "rows";
    case LayoutSetting::kPairs:
      return "pairs";
    case LayoutSetting::kTokens:
      return "tokens";
    case LayoutSetting::kAmx:
      return "amx";
    case LayoutSetting::kAuto:
      break;
  }
  return "auto";
}

void set_dispatch_values(const std::vector<std::pair<std::string, DispatchValue>>& values) {
  using K = DispatchValue::Kind;
  constexpr const char* op = "sparsekern.cpu_dispatch_set: ";
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  DispatchSettings s = *r.current.load(std::memory_order_acquire);
  for (const auto& [name, v] : values) {
    if (name == "isa") {
      TORCH_CHECK(v.kind == K::kNone || v.kind == K::kStr, op, "isa must be a string or None (got ", describe(v), ")");
      const std::string text = v.kind == K::kNone ? std::string() : v.s;
      IsaSetting isa;
      TORCH_CHECK(parse_isa(text, &isa), op, "SPARSEKERN_CPU_ISA=", shown(text), " is not understood; ", kIsaChoices);
      TORCH_CHECK(static_cast<int>(level_of(isa)) <= static_cast<int>(best_isa()), op, "SPARSEKERN_CPU_ISA=",
                  shown(text),
                  " but this CPU does not support it (", kIsaNeeds, ")");
      s.isa = isa;
      s.isa_env_problem = DispatchSettings::EnvProblem::kNone;
      s.isa_env_value.clear();
    } else if (name == "layout") {
      TORCH_CHECK(v.kind == K::kNone || v.kind == K::kStr, op, "layout must be a string or None (got ", describe(v),
                  ")");
      const std::string text = v.kind == K::kNone ? std::string() : v.s;
      TORCH_CHECK(parse_layout(text, &s.layout), op, "SPARSEKERN_CPU_SPMM_LAYOUT=", shown(text), " is not understood; ",
                  kLayoutChoices);
      s.layout_env_value.clear();
    } else if (name == "huge_page_hint") {
      TORCH_CHECK(v.kind == K::kBool, op, "huge_page_hint must be True or False (got ", describe(v), ")");
      s.huge_page_hint = v.b;
    } else {
      const ThresholdField* field = nullptr;
      for (const ThresholdField& f : threshold_fields()) {
        if (name == f.name) field = &f;
      }
      if (field == nullptr) {
        std::string known = "isa, layout, huge_page_hint";
        for (const ThresholdField& f : threshold_fields()) known += std::string(", ") + f.name;
        TORCH_CHECK(false, op, "unknown setting '", name, "'; known: ", known);
      }
      if (v.kind == K::kNone) {
        TORCH_CHECK(field->never_allowed, op, name, " must be a positive integer (got None)");
        s.thresholds.*(field->member) = kNever;
      } else {
        TORCH_CHECK(v.kind == K::kInt && v.i >= 1, op, name, " must be a positive integer",
                    field->never_allowed ? " (the smallest M from which auto takes that kernel) or None (never)" : "",
                    " (got ", describe(v), ")");
        s.thresholds.*(field->member) = v.i;
      }
    }
  }
  r.publish(s);
}

void reset_dispatch_settings() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.publish(r.initial);
}

int64_t dispatch_version() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  const DispatchSettings* cur = r.current.load(std::memory_order_acquire);
  for (size_t i = r.all.size(); i-- > 0;) {
    if (r.all[i].get() == cur) return static_cast<int64_t>(i);
  }
  return 0;  // unreachable: the current snapshot is always in the list
}

void restore_dispatch_version(int64_t version) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  TORCH_CHECK(version >= 0 && version < static_cast<int64_t>(r.all.size()),
              "sparsekern.cpu_dispatch_restore: no settings snapshot number ", version);
  r.current.store(r.all[static_cast<size_t>(version)].get(), std::memory_order_release);
}

std::vector<std::string> pending_env_errors(const DispatchSettings& s) {
  using P = DispatchSettings::EnvProblem;
  std::vector<std::string> out;
  if (s.isa_env_problem == P::kNotUnderstood) {
    out.push_back("SPARSEKERN_CPU_ISA=" + s.isa_env_value + " is not understood; " + kIsaChoices);
  } else if (s.isa_env_problem == P::kUnsupported) {
    out.push_back("SPARSEKERN_CPU_ISA=" + s.isa_env_value + " but this CPU does not support it (" + kIsaNeeds + ")");
  }
  if (!s.layout_env_value.empty()) {
    out.push_back("SPARSEKERN_CPU_SPMM_LAYOUT=" + s.layout_env_value + " is not understood; " + kLayoutChoices);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------- wanda_prune
Isa wanda_isa(const DispatchSettings& s) {
  using P = DispatchSettings::EnvProblem;
  TORCH_CHECK(s.isa_env_problem != P::kNotUnderstood, "wanda_prune: SPARSEKERN_CPU_ISA=", s.isa_env_value,
              " is not understood; use avx512, avx2 or scalar (or unset it for the best the CPU supports)");
  TORCH_CHECK(s.isa_env_problem != P::kUnsupported, "wanda_prune: SPARSEKERN_CPU_ISA=", s.isa_env_value,
              " but this CPU does not support it (", kIsaNeeds, ")");
  return level_of(s.isa);
}

// ------------------------------------------------------------------------------------------------- spmm_24
namespace spmm {
namespace {

struct IsaChoice {
  Isa isa;
  bool extensions;  // AVX512_BF16 / AVX512_VNNI kernels allowed (where the CPU has them)
};

// ISA choice: the best the CPU supports (avx512 > avx2 > scalar), or the one forced (SPARSEKERN_CPU_ISA or
// cpu_dispatch_set; avx512-base skips the AVX512_BF16 / AVX512_VNNI kernels); forcing an ISA the CPU lacks is an
// error, never a silent fallback.
IsaChoice spmm_isa(const DispatchSettings& s) {
  using P = DispatchSettings::EnvProblem;
  TORCH_CHECK(s.isa_env_problem != P::kNotUnderstood, "sparsekern.spmm_24: SPARSEKERN_CPU_ISA=", s.isa_env_value,
              " is not understood; ", kIsaChoices);
  TORCH_CHECK(s.isa_env_problem != P::kUnsupported, "sparsekern.spmm_24: SPARSEKERN_CPU_ISA=", s.isa_env_value,
              " but this CPU does not support it (", kIsaNeeds, ")");
  return {level_of(s.isa), s.isa != IsaSetting::kAvx512Base};
}

// The rows family (K in the vector lanes, one weight row per vector; every ISA). With AVX512_BF16 / AVX512_VNNI it
// switches to the unblocked row-pair kernels from rows_pair_*_min_m rows.
Kernel rows_kernel(WType w, const IsaChoice& c, int64_t M, const Thresholds& t) {
  Kernel k{};
  if (c.isa == Isa::kAvx512) {
    Kernel pair{};
    if (avx512_row_pair_kernel(w, c.extensions, &pair) &&
        M >= (w == WType::kBF16 ? t.rows_pair_bf16_min_m : t.rows_pair_i8_min_m)) {
      return pair;
    }
    if (avx512_kernel(w, c.extensions, &k)) return k;
  }
  if (c.isa >= Isa::kAvx2 && avx2_kernel(w, &k)) return k;
  return scalar_kernel(w);
}

}  // namespace

// Kernel family (SPARSEKERN_CPU_SPMM_LAYOUT=auto|rows|pairs|tokens, or cpu_dispatch_set's "layout"):
//   rows:   K in the vector lanes, one weight row per vector (best for a few activation rows; every ISA);
//   pairs:  K in the lanes, two weight rows per vector, K-blocked (AVX-512; bfloat16 with AVX512_BF16, int8);
//   tokens: 16 activation rows in the lanes (AVX-512), see spmm_24.h;
//   amx:    the weight decompressed per n-tile and multiplied on the AMX tile unit (bfloat16 / int8; full avx512 ISA
//           only, never avx512-base), see spmm_24_amx.cpp.
// auto takes amx from its threshold where it exists for the dtype, else pairs from theirs, else tokens from theirs,
// else rows (the thresholds and their measurements: kDefaultThresholds above).
Plan plan_call(int64_t M, int64_t K, WType w, const DispatchSettings& s) {
  const IsaChoice c = spmm_isa(s);
  TORCH_CHECK(s.layout_env_value.empty(), "sparsekern.spmm_24: SPARSEKERN_CPU_SPMM_LAYOUT=", s.layout_env_value,
              " is not understood; ", kLayoutChoices);
  const Thresholds& t = s.thresholds;
  Plan plan;
  if (s.layout == LayoutSetting::kRows) {
    plan.kernel = rows_kernel(w, c, M, t);
    return plan;
  }
  const bool avx512 = c.isa == Isa::kAvx512;
  Kernel ak{};
  const bool have_amx = avx512 && c.extensions && amx_kernel(w, &ak);
  if (s.layout == LayoutSetting::kAmx) {
    TORCH_CHECK(have_amx, "sparsekern.spmm_24: SPARSEKERN_CPU_SPMM_LAYOUT=amx needs Intel AMX (amx-tile with amx-bf16 "
                "for bfloat16 or amx-int8 for int8 weights, AVX512_VBMI2, and the OS granting the tile state), the "
                "full avx512 ISA (not avx512-base / avx2 / scalar) and bfloat16 or int8 weights; ",
                !cpu_features().amx_bf16 && !cpu_features().amx_int8 ? "this CPU (or OS) has no usable AMX"
                : !(avx512 && c.extensions) ? "the ISA in use (SPARSEKERN_CPU_ISA) is not avx512"
                                            : "the weight dtype has no AMX kernel here",
                "; use rows, pairs, tokens or auto");
    plan.family = Family::kAmx;
    plan.kernel = ak;
    return plan;
  }
  const int64_t amx_min_m = w == WType::kBF16 ? t.amx_bf16_min_m : t.amx_i8_min_m;
  if (s.layout == LayoutSetting::kAuto && have_amx && M >= amx_min_m) {
    plan.family = Family::kAmx;
    plan.kernel = ak;
    return plan;
  }
  Kernel pk{};
  TokenKernel tk{};
  const bool have_pairs = avx512 && avx512_pair_kernel(w, c.extensions, K, &pk);
  const bool have_tokens = avx512 && avx512_token_kernel(w, c.extensions, &tk);
  if (s.layout == LayoutSetting::kPairs) {
    TORCH_CHECK(have_pairs, "sparsekern.spmm_24: SPARSEKERN_CPU_SPMM_LAYOUT=pairs needs the AVX-512 kernels and "
                "bfloat16 (with AVX512_BF16) or int8 weights; the ISA in use (SPARSEKERN_CPU_ISA or the CPU) or the "
                "weight dtype has none; use rows, tokens or auto");
    plan.family = Family::kPairs;
    plan.kernel = pk;
    return plan;
  }
  if (s.layout == LayoutSetting::kTokens) {
    TORCH_CHECK(have_tokens, "sparsekern.spmm_24: SPARSEKERN_CPU_SPMM_LAYOUT=tokens needs the AVX-512 kernels, but the "
                "ISA in use is not AVX-512 (SPARSEKERN_CPU_ISA or the CPU); use rows or auto");
    plan.family = Family::kTokens;
    plan.tokens = tk;
    return plan;
  }
  // The pair kernel's variant picks its threshold: bfloat16 pairs, int8 by vpdpbusd (x stored as uint8), or int8 as
  // int16 pairs.
  const int64_t pairs_min_m = w == WType::kBF16         ? t.pairs_bf16_min_m
                              : pk.xtype == XType::kU8 ? t.pairs_u8_min_m
                                                       : t.pairs_i8_min_m;
  const int64_t tokens_min_m = tk.table == TokenTable::kF32 ? t.tokens_f32_min_m
                               : w == WType::kBF16           ? t.tokens_bf16_min_m
                                                             : t.tokens_i8_min_m;
  if (have_pairs && M >= pairs_min_m) {
    plan.family = Family::kPairs;
    plan.kernel = pk;
  } else if (have_tokens && M >= tokens_min_m) {
    plan.family = Family::kTokens;
    plan.tokens = tk;
  } else {
    plan.kernel = rows_kernel(w, c, M, t);
  }
  return plan;
}

int64_t slab_rows_for(int64_t M, int64_t K, WType w, const DispatchSettings& s) {
  const Thresholds& t = s.thresholds;
  if (M > t.slab_rows && plan_call(std::min(M, t.amx_slab_rows), K, w, s).family == Family::kAmx) {
    return t.amx_slab_rows;
  }
  return t.slab_rows;
}

}  // namespace spmm

std::pair<std::string, std::string> spmm_kernel_for(int64_t M, int64_t K, const std::string& dtype) {
  using spmm::WType;
  WType w;
  if (dtype == "float32") {
    w = WType::kF32;
  } else if (dtype == "float16") {
    w = WType::kF16;
  } else if (dtype == "bfloat16") {
    w = WType::kBF16;
  } else if (dtype == "int8") {
    w = WType::kI8;
  } else {
    TORCH_CHECK(false, "sparsekern.cpu_spmm_kernel: dtype must be float32, float16, bfloat16 or int8 (got ", dtype,
                ")");
  }
  TORCH_CHECK(M >= 1 && K >= 4 && K % 4 == 0, "sparsekern.cpu_spmm_kernel: need M >= 1 and K a positive multiple of 4");
  const DispatchSettings& s = dispatch_settings();
  const spmm::Plan p = spmm::plan_call(std::min(M, spmm::slab_rows_for(M, K, w, s)), K, w, s);  // the first slab
  switch (p.family) {
    case spmm::Family::kTokens:
      return {"tokens", p.tokens.name};
    case spmm::Family::kPairs:
      return {"pairs", p.kernel.name};
    case spmm::Family::kAmx:
      return {"amx", p.kernel.name};
    case spmm::Family::kRows:
      break;
  }
  return {"rows", p.kernel.name};
}

}  // namespace cpu
}  // namespace sparsekern
