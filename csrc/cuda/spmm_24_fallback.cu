// CUDA kernel of spmm_24: the portable-format GEMM on a GPU. For M <= 16 with float16 / bfloat16 / int8 inputs it
// is the small-M decode kernel (spmm_24_skinny.cu), which reads the values and codes directly; otherwise
// decompress + one cuBLAS GEMM + our fused post-op (below).
//
// SparseLinear on CUDA runs cuSPARSELt (cslt_linear) or this op as the policy says (sparsekern.policy); this path
// also serves the shapes cuSPARSELt refuses (N or K not a multiple of 16/32) and direct calls of spmm_24 on CUDA
// tensors, with exactly the CPU kernel's semantics (csrc/cpu/spmm_24.cpp): y = act(row_scale[:, None] * alpha[None, :] * (x @ W^T) + bias),
// fp32 accumulation for float inputs, exact integer accumulation for int8 (done in float64, exact for |sum| < 2^53),
// out_dtype defaulting to x's dtype (int32 for int8). The large-M path materialises the dense weight for the call:
// a correctness path, not a fast one (SparseLinear takes cuSPARSELt there).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "core/nm.h"
#include "cuda/core_ops.h"
#include "cuda/spmm_24_skinny.h"

namespace sparsekern {
namespace cuda {
namespace {

at::Tensor epilogue_vector(const std::optional<at::Tensor>& t, const char* name, int64_t len, const at::Tensor& x) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->device() == x.device(), "sparsekern.spmm_24: ", name, " is on ", t->device(), " but x is on ",
              x.device(), "; all tensors must be on the same device");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == len, "sparsekern.spmm_24: ", name, " must be 1-D of length ", len,
              " (got ", t->sizes(), ")");
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "sparsekern.spmm_24: ", name,
              " must be a floating dtype (got ", t->scalar_type(), ")");
  return t->to(at::kFloat).contiguous();
}

at::Tensor spmm_24_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& codes,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha,
                        const std::optional<at::Tensor>& row_scale, c10::string_view activation,
                        std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(values.device() == x.device() && codes.device() == x.device(), "sparsekern.spmm_24: values (",
              values.device(), ") and codes (", codes.device(), ") must be on x's device (", x.device(), ")");
  TORCH_CHECK(x.dim() == 2, "sparsekern.spmm_24: x must be 2-D [M, K] (got ", x.dim(),
              " dims; the Python wrapper sparse_linear flattens leading dims)");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 4 == 0, "sparsekern.spmm_24: K = x.size(1) (", K,
              ") must be a multiple of 4 (2:4 groups run along K)");
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "sparsekern.spmm_24: values dtype ", values.scalar_type(),
              " must equal x dtype ", x.scalar_type(), " (float32/float16/bfloat16 pairs, or int8 with int8)");
  const auto xt = x.scalar_type();
  const bool is_int = xt == at::kChar;
  TORCH_CHECK(is_int || xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16, "sparsekern.spmm_24: x has "
              "unsupported dtype ", xt, "; supported: float32, float16, bfloat16 and int8");
  const at::ScalarType od = out_dtype.value_or(is_int ? at::kInt : xt);
  const bool od_float = od == at::kFloat || od == at::kHalf || od == at::kBFloat16;
  TORCH_CHECK(od_float || (is_int && (od == at::kInt || od == at::kChar)), "sparsekern.spmm_24: out_dtype ", od,
              " is not supported for ", xt, " inputs");
  // int8: |each product| <= 2^14 and K/2 of them are summed in int32 (the decode kernel) or converted to it
  TORCH_CHECK(!is_int || K <= 262140, "sparsekern.spmm_24: int8 inputs with K = ", K,
              " > 262140 could overflow the int32 accumulator (K/2 products of up to 2^14)");
  const Activation act = parse_activation(std::string(activation), "sparsekern.spmm_24");
  c10::cuda::CUDAGuard guard(x.device());

  // Shapes and dtypes are checked on the host; the codes are not re-validated (that needs a device-to-host read,
  // i.e. a synchronisation per call, and would make this path impossible to capture in a CUDA graph; issue 17,
  // finding 8). They come from a Sparse24Weight, which validates them when it is built.
  TORCH_CHECK(values.dim() == 2 && values.size(1) == K / 2, "sparsekern.spmm_24: values must be [N, K/2] = [N, ",
              K / 2, "] for x of K = ", K, " columns, got ", values.sizes());
  const int64_t N = values.size(0);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.size(0) == N &&
                  codes.size(1) == core::code_bytes_per_row(K),
              "sparsekern.spmm_24: codes must be uint8 [N, ceil(K/8)] = [", N, ", ", core::code_bytes_per_row(K),
              "], got ", codes.scalar_type(), " ", codes.sizes());
  const at::Tensor a = epilogue_vector(alpha, "alpha", N, x);
  const at::Tensor b = epilogue_vector(bias, "bias", N, x);
  const at::Tensor r = epilogue_vector(row_scale, "row_scale", M, x);
  // M <= 16, 16-bit or int8: the decode kernel reads the portable format directly (no dense weight)
  if (skinny24_supports(x)) return spmm_24_skinny(x, values, codes, a, b, r, act, od);
  const at::Tensor w = decompress_24_trusted(values, codes, K);
  at::Tensor out = at::empty({M, N}, x.options().dtype(od));
  if (M == 0 || N == 0) return out;

  at::Tensor acc;
  if (is_int) {
    acc = at::matmul(x.to(at::kDouble), w.to(at::kDouble).t()).to(at::kInt);  // exact: |sum| << 2^53
  } else {
    acc = at::matmul(x.to(at::kFloat), w.to(at::kFloat).t());  // fp32 accumulation, as the CPU kernel
  }
  acc = acc.contiguous();
  const bool plain = !a.defined() && !b.defined() && !r.defined() && act == Activation::kNone;
  if (plain && acc.scalar_type() == od) return acc;
  auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  linear_postop(acc, out, opt(r), opt(a), opt(b), act);
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("spmm_24", &sparsekern::cuda::spmm_24_cuda);
}
