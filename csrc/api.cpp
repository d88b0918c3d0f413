// C++ API (include/sparsekern/sparsekern.h): thin calls through the torch dispatcher.
#include "sparsekern/sparsekern.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>

namespace sparsekern {
namespace {

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prune_nm(const at::Tensor& w, int64_t n, int64_t m,
                                            const std::optional<at::Tensor>& scores) {
  static auto h = op("sparsekern::prune_nm")
                      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t,
                                                                const std::optional<at::Tensor>&)>();
  return h.call(w, n, m, scores);
}

bool is_nm(const at::Tensor& w, int64_t n, int64_t m) {
  static auto h = op("sparsekern::nm_violation").typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  return h.call(w, n, m)[0].item<int64_t>() < 0;
}

std::tuple<at::Tensor, at::Tensor> compress_24(const at::Tensor& w) {
  static auto h = op("sparsekern::compress_24").typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return h.call(w);
}

at::Tensor decompress_24(const at::Tensor& values, const at::Tensor& codes, int64_t cols) {
  static auto h =
      op("sparsekern::decompress_24").typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return h.call(values, codes, cols);
}

at::Tensor spmm_24(const at::Tensor& x, const at::Tensor& values, const at::Tensor& codes,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha,
                   const std::string& activation) {
  static auto h = op("sparsekern::spmm_24")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                        const std::optional<at::Tensor>&, c10::string_view,
                                        std::optional<at::ScalarType>)>();
  const auto k = x.size(-1);
  auto x2 = x.reshape({-1, k});
  auto y = h.call(x2, values, codes, bias, alpha, std::nullopt, activation, std::nullopt);
  auto out_shape = x.sizes().vec();
  out_shape.back() = values.size(0);
  return y.reshape(out_shape);
}

// cslt_* have CUDA kernels only (csrc/cusparselt/cslt.cpp); in a CPU-only build the dispatcher's "no CUDA kernel"
// error is what a caller gets, as from Python.
at::Tensor cslt_compress(const at::Tensor& w) {
  static auto h = op("sparsekern::cslt_compress").typed<at::Tensor(const at::Tensor&)>();
  return h.call(w);
}

at::Tensor cslt_linear(const at::Tensor& x, const at::Tensor& compressed, int64_t n, int64_t k,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha,
                       const std::string& activation, std::optional<at::ScalarType> out_dtype) {
  static auto h = op("sparsekern::cslt_linear")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                        const std::optional<at::Tensor>&, c10::string_view,
                                        std::optional<at::ScalarType>, int64_t, int64_t)>();
  auto x2 = x.reshape({-1, x.size(-1)});
  auto y = h.call(x2, compressed, n, k, bias, alpha, std::nullopt, activation, out_dtype, /*alg_id=*/-1,
                  /*split_k=*/1);
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  return y.reshape(out_shape);
}

}  // namespace sparsekern
