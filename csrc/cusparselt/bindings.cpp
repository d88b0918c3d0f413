// pybind11 side of the cuSPARSELt wrapper (declared and called from csrc/python_bindings.cpp in CUDA builds):
// cache statistics and clearing, algorithm search, search-result export / import (the JSON file itself is
// written by python/sparsekern/ops/cslt.py), and the cuSPARSELt runtime version. Tensor ops are torch ops, not here.
#include <torch/extension.h>

#include <map>
#include <string>

#include "cusparselt/cslt.h"

namespace sparsekern {
namespace {

namespace py = pybind11;

py::dict record_to_dict(const cslt::SearchRecord& r) {
  py::dict d;
  d["gpu"] = r.gpu;
  d["cusparselt"] = r.cusparselt;
  d["m"] = r.m;
  d["n"] = r.n;
  d["k"] = r.k;
  d["in_dtype"] = r.in_dtype;
  d["d_dtype"] = r.d_dtype;
  d["c_dtype"] = r.c_dtype;
  d["bias"] = r.bias;
  d["activation"] = r.activation;
  d["alpha_vector"] = r.alpha_vector;
  d["alg_id"] = r.alg_id;
  d["max_alg_id"] = r.max_alg_id;
  d["split_k"] = r.split_k;
  d["split_k_mode"] = r.split_k_mode;
  d["split_k_buffers"] = r.split_k_buffers;
  return d;
}

template <typename T>
T field(const py::dict& d, const char* name) {
  if (!d.contains(name)) throw py::key_error(std::string("cuSPARSELt search record lacks the field '") + name + "'");
  return d[name].cast<T>();
}

cslt::SearchRecord record_from_dict(const py::dict& d) {
  cslt::SearchRecord r;
  r.gpu = field<std::string>(d, "gpu");
  r.cusparselt = field<std::string>(d, "cusparselt");
  r.m = field<int64_t>(d, "m");
  r.n = field<int64_t>(d, "n");
  r.k = field<int64_t>(d, "k");
  r.in_dtype = field<std::string>(d, "in_dtype");
  r.d_dtype = field<std::string>(d, "d_dtype");
  r.c_dtype = field<std::string>(d, "c_dtype");
  r.bias = field<std::string>(d, "bias");
  r.activation = field<std::string>(d, "activation");
  r.alpha_vector = field<bool>(d, "alpha_vector");
  r.alg_id = field<int>(d, "alg_id");
  r.split_k = field<int>(d, "split_k");
  r.split_k_mode = field<int>(d, "split_k_mode");
  r.split_k_buffers = field<int>(d, "split_k_buffers");
  r.max_alg_id = d.contains("max_alg_id") ? d["max_alg_id"].cast<int>() : 0;
  return r;
}

}  // namespace

void bind_cusparselt(pybind11::module_& m) {
  m.def("cslt_version", &cslt::runtime_version, "cuSPARSELt version of the loaded library, e.g. '0.8.1'");
  m.def(
      "cslt_cache_stats",
      []() {
        const auto s = cslt::cache_stats();
        py::dict d;
        d["entries"] = s.entries;
        d["max_entries"] = s.max_entries;
        d["handles_created"] = s.handles_created;
        d["descriptors_created"] = s.descriptors_created;
        d["plans_created"] = s.plans_created;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        d["evictions"] = s.evictions;
        d["searches"] = s.searches;
        d["epilogue_fallbacks"] = s.epilogue_fallbacks;
        return d;
      },
      "Counters of the cuSPARSELt wrapper's host-side work (cumulative, except entries)");
  m.def("cslt_cache_clear", &cslt::clear_cache, "Drop every cached cuSPARSELt plan (host objects; device memory is "
        "per call, from PyTorch's caching allocator)");
  m.def(
      "cslt_compressed_size",
      [](int64_t n, int64_t k, const std::string& dtype) {
        static const std::map<std::string, at::ScalarType> kTypes = {
            {"float16", at::kHalf}, {"bfloat16", at::kBFloat16}, {"int8", at::kChar},
            {"float8_e4m3fn", at::kFloat8_e4m3fn}};
        auto it = kTypes.find(dtype);
        TORCH_CHECK(it != kTypes.end(), "cslt_compressed_size: dtype must be float16, bfloat16, int8 or "
                    "float8_e4m3fn, got ", dtype);
        return cslt::compressed_size(n, k, it->second);
      },
      py::arg("n"), py::arg("k"), py::arg("dtype"),
      "Bytes cslt_compress allocates for a [n, k] weight of dtype on the current GPU (cuSPARSELt's own "
      "cusparseLtSpMMACompressedSize2, cached per arch and shape)");
  m.def(
      "cslt_search",
      [](const at::Tensor& x, const at::Tensor& compressed, int64_t n, int64_t k, std::optional<at::Tensor> bias,
         std::optional<at::Tensor> alpha, std::optional<at::Tensor> row_scale, const std::string& activation,
         std::optional<at::ScalarType> out_dtype) {
        // Release the GIL while cuSPARSELt benchmarks its kernels.
        cslt::SearchRecord r;
        {
          py::gil_scoped_release nogil;
          r = cslt::search(x, compressed, n, k, bias, alpha, row_scale, activation, out_dtype);
        }
        return record_to_dict(r);
      },
      py::arg("x"), py::arg("compressed"), py::arg("n"), py::arg("k"), py::arg("bias") = py::none(),
      py::arg("alpha") = py::none(), py::arg("row_scale") = py::none(), py::arg("activation") = "none",
      py::arg("out_dtype") = py::none(),
      "Run cusparseLtMatmulSearch for this cslt_linear configuration and remember the result");
  m.def(
      "cslt_search_records",
      []() {
        py::list out;
        for (const auto& r : cslt::search_records()) out.append(record_to_dict(r));
        return out;
      },
      "Every remembered search result, as dicts (for JSON persistence)");
  m.def(
      "cslt_add_search_records",
      [](const py::list& records) {
        std::vector<cslt::SearchRecord> rs;
        for (const auto& item : records) rs.push_back(record_from_dict(item.cast<py::dict>()));
        cslt::add_search_records(rs);
      },
      "Merge search results (dicts as cslt_search_records returns them)");
  m.def("cslt_clear_search_records", &cslt::clear_search_records, "Forget every search result");
}

}  // namespace sparsekern
