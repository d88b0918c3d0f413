// pybind11 module sparsekern._C: non-tensor utilities only (build info, the CPU dispatch settings, cuSPARSELt's shape
// rule, cuSPARSELt cache statistics and search persistence). The tensor ops are torch ops (csrc/registration.cpp),
// reached through torch.ops.sparsekern.
#include <torch/extension.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "build_info.h"
#include "core/cslt_shape.h"
#include "cpu/dispatch.h"

namespace sparsekern {
#ifdef SPARSEKERN_WITH_CUDA
// csrc/cusparselt/bindings.cpp
void bind_cusparselt(pybind11::module_& m);
#endif

namespace {

namespace py = pybind11;

// A TORCH_CHECK raised here reaches Python as a RuntimeError with the message alone (no C++ backtrace).
template <typename F>
auto plain_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

py::object threshold_value(int64_t v) { return v == cpu::kNever ? py::object(py::none()) : py::object(py::int_(v)); }

py::dict thresholds_dict(const cpu::Thresholds& t) {
  py::dict d;
  for (const cpu::ThresholdField& f : cpu::threshold_fields()) d[f.name] = threshold_value(t.*(f.member));
  return d;
}

py::dict dispatch_get() {
  const cpu::DispatchSettings& s = cpu::dispatch_settings();
  py::dict d;
  const std::string isa = cpu::isa_setting_name(s.isa);
  d["isa"] = isa.empty() ? py::object(py::none()) : py::object(py::str(isa));
  d["layout"] = cpu::layout_setting_name(s.layout);
  d["huge_page_hint"] = s.huge_page_hint;
  for (auto item : thresholds_dict(s.thresholds)) d[item.first] = item.second;
  return d;
}

void dispatch_set(const py::dict& values) {
  std::vector<std::pair<std::string, cpu::DispatchValue>> vs;
  for (auto item : values) {
    cpu::DispatchValue v;
    const py::handle o = item.second;
    if (o.is_none()) {
      v.kind = cpu::DispatchValue::Kind::kNone;
    } else if (py::isinstance<py::bool_>(o)) {  // before int: a Python bool is an int
      v.kind = cpu::DispatchValue::Kind::kBool;
      v.b = o.cast<bool>();
    } else if (py::isinstance<py::int_>(o)) {
      v.kind = cpu::DispatchValue::Kind::kInt;
      v.i = o.cast<int64_t>();
    } else if (py::isinstance<py::str>(o)) {
      v.kind = cpu::DispatchValue::Kind::kStr;
      v.s = o.cast<std::string>();
    } else {
      throw std::runtime_error("sparsekern.cpu_dispatch_set: " + py::str(item.first).cast<std::string>() +
                               " must be None, a bool, an int or a string (got " +
                               py::str(py::type::of(o).attr("__name__")).cast<std::string>() + ")");
    }
    vs.emplace_back(py::str(item.first).cast<std::string>(), std::move(v));
  }
  plain_errors([&] { cpu::set_dispatch_values(vs); });
}

py::dict cpu_features_dict() {
  const cpu::CpuFeatures& f = cpu::cpu_features();
  py::dict d;
  d["avx512"] = f.avx512;
  d["avx512_bf16"] = f.avx512_bf16;
  d["avx512_vnni"] = f.avx512_vnni;
  d["avx512_vbmi"] = f.avx512_vbmi;
  d["avx2"] = f.avx2;
  d["best_isa"] = cpu::isa_name(cpu::best_isa());
  return d;
}

}  // namespace
}  // namespace sparsekern

PYBIND11_MODULE(_C, m) {
  namespace sk = sparsekern;
  m.doc() = "sparsekern native utilities (ops live in torch.ops.sparsekern)";
  m.def("build_info", []() {
    const auto info = sk::build_info();
    pybind11::dict d;
    d["version"] = info.version;
    d["torch_version"] = info.torch_version;
    d["with_cuda"] = info.with_cuda;
    d["openmp"] = info.openmp;
    d["cuda_archs"] = info.cuda_archs;
    d["cuda_version"] = info.cuda_version;
    d["cusparselt_version"] = info.cusparselt_version;
    return d;
  });

  // CPU dispatch settings (csrc/cpu/dispatch.h; Python: sparsekern.envs.cpu_dispatch).
  m.def("cpu_dispatch_get", &sk::dispatch_get,
        "The CPU kernels' settings in effect: isa (None = the best the CPU supports), layout, huge_page_hint and "
        "the family thresholds (None = never).");
  m.def("cpu_dispatch_set", &sk::dispatch_set, pybind11::arg("values"),
        "Change some of the settings cpu_dispatch_get lists (all or nothing; a bad name or value raises "
        "RuntimeError and changes nothing).");
  m.def("cpu_dispatch_defaults", []() { return sk::thresholds_dict(sk::cpu::default_thresholds()); },
        "The built-in family thresholds.");
  m.def("cpu_dispatch_reset", []() { sk::cpu::reset_dispatch_settings(); },
        "Back to the settings read from the environment at load, with the built-in thresholds.");
  m.def("cpu_dispatch_version", []() { return sk::cpu::dispatch_version(); },
        "Number of the settings snapshot in effect (for cpu_dispatch_restore).");
  m.def("cpu_dispatch_restore", [](int64_t v) { sk::plain_errors([&] { sk::cpu::restore_dispatch_version(v); }); },
        pybind11::arg("version"), "Make an earlier settings snapshot current again.");
  m.def("cpu_dispatch_pending_errors", []() { return sk::cpu::pending_env_errors(sk::cpu::dispatch_settings()); },
        "Environment values read at load that the CPU ops will refuse (raised by the first call that needs them).");
  m.def("cpu_features", &sk::cpu_features_dict, "What the CPU-feature probe of the CPU kernels found.");
  m.def("cpu_spmm_kernel",
        [](int64_t m_rows, int64_t k, const std::string& dtype) {
          return sk::plain_errors([&] { return sk::cpu::spmm_kernel_for(m_rows, k, dtype); });
        },
        pybind11::arg("m"), pybind11::arg("k"), pybind11::arg("dtype"),
        "(family, kernel) the CPU spmm_24 runs for M rows, K columns and weights of dtype (float32, float16, "
        "bfloat16, int8) under the current settings.");

  // cuSPARSELt's shape rule (csrc/core/cslt_shape.h), in both builds.
  m.def("cslt_structured_multiple",
        [](int64_t element_size_bytes) { return sk::core::cslt_structured_multiple(element_size_bytes); },
        pybind11::arg("element_size_bytes"),
        "The multiple of n and k cuSPARSELt requires for a structured operand with elements of this many bytes "
        "(32 for 1-byte types, 16 for 2-byte ones, 0 where cuSPARSELt has none).");
#ifdef SPARSEKERN_WITH_CUDA
  sk::bind_cusparselt(m);
#endif
}
