// CPU emulation of the CUDA small-M 2:4 kernel (csrc/cuda/spmm_24_skinny.cu), for tests: the same decoding, work
// partition (lanes, steps, split-K ranges from skinny_plan) and order of operations, all from csrc/core/skinny24.h,
// so that (a) every CPU test run checks the kernel's logic against a plain float64 reference, and (b) on a GPU the
// kernel's raw sums can be compared with this bit for bit (fp32 by explicit fma on both sides; int8 exactly).
//
//   _spmm_24_skinny_emulate(x [M, K], values [N, K/2], codes [N, ceil(K/8)], sm_count) -> sums [M, N]
//     float32 sums for float16 / bfloat16 x, int32 for int8; no epilogue. sm_count: the GPU's SM count the plan
//     is made for (the split-K depends on it).
//   _skinny24_plan(N, K, sm_count) -> [ksplit, steps_per_split]
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "core/nm.h"
#include "core/skinny24.h"

namespace sparsekern {
namespace cpu {
namespace {

using namespace sparsekern::core;

template <typename T, typename Acc>
void emulate(const T* x, const T* values, const uint8_t* codes, Acc* out, int64_t M, int64_t N, int64_t K,
             int sm_count) {
  const SkinnyPlan plan = skinny_plan(N, K, sm_count);
  const int64_t steps = (K + kSkinnyStepCols - 1) / kSkinnyStepCols;
  const int64_t vrow = K / 2, crow = code_bytes_per_row(K);
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        const T* xr = x + m * K;
        Acc total = 0;
        for (int s = 0; s < plan.ksplit; ++s) {
          Acc lanes[kSkinnyWarp];
          for (int l = 0; l < kSkinnyWarp; ++l) lanes[l] = 0;
          const int64_t st1 = std::min<int64_t>(steps, (s + 1) * plan.steps_per_split);
          for (int64_t st = s * plan.steps_per_split; st < st1; ++st) {
            for (int l = 0; l < kSkinnyWarp; ++l) {
              const int64_t col0 = st * kSkinnyStepCols + static_cast<int64_t>(l) * kSkinnyUnitCols;
              if (col0 >= K) continue;
              const int ngroups = static_cast<int>(std::min<int64_t>(kSkinnyUnitGroups, (K - col0) / 4));
              Acc acc[1] = {lanes[l]};
              skinny_unit<1>(acc, values + n * vrow + col0 / 2, codes + n * crow + col0 / 8, ngroups,
                             [&](int, int col) { return static_cast<Acc>(xr[col0 + col]); });
              lanes[l] = acc[0];
            }
          }
          const Acc part = skinny_butterfly(lanes);
          total = s == 0 ? part : total + part;
        }
        out[m * N + n] = total;
      }
    }
  });
}

at::Tensor skinny_emulate_cpu(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& codes_in,
                              int64_t sm_count) {
  TORCH_CHECK(x_in.dim() == 2 && values_in.dim() == 2 && codes_in.dim() == 2,
              "_spmm_24_skinny_emulate: x, values and codes must be 2-D");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = values_in.size(0);
  TORCH_CHECK(K % 4 == 0, "_spmm_24_skinny_emulate: K (", K, ") must be a multiple of 4");
  TORCH_CHECK(values_in.size(1) == K / 2 && codes_in.size(0) == N && codes_in.size(1) == code_bytes_per_row(K),
              "_spmm_24_skinny_emulate: values must be [N, K/2] and codes [N, ceil(K/8)] for K = ", K);
  TORCH_CHECK(values_in.scalar_type() == x_in.scalar_type() && codes_in.scalar_type() == at::kByte,
              "_spmm_24_skinny_emulate: values must have x's dtype and codes must be uint8");
  TORCH_CHECK(sm_count >= 1, "_spmm_24_skinny_emulate: sm_count must be >= 1");
  const auto x = x_in.contiguous(), values = values_in.contiguous(), codes = codes_in.contiguous();
  const auto st = x.scalar_type();
  if (st == at::kChar) {
    at::Tensor out = at::empty({M, N}, x.options().dtype(at::kInt));
    emulate<int8_t, int32_t>(x.const_data_ptr<int8_t>(), values.const_data_ptr<int8_t>(),
                             codes.const_data_ptr<uint8_t>(), out.data_ptr<int32_t>(), M, N, K,
                             static_cast<int>(sm_count));
    return out;
  }
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16, "_spmm_24_skinny_emulate: x must be float16, bfloat16 or "
              "int8 (the kernel's dtypes), got ", st);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  AT_DISPATCH_SWITCH(st, "_spmm_24_skinny_emulate",
                     AT_DISPATCH_CASE(at::kHalf, [&] {
                       emulate<scalar_t, float>(x.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(),
                                                codes.const_data_ptr<uint8_t>(), out.data_ptr<float>(), M, N, K,
                                                static_cast<int>(sm_count));
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       emulate<scalar_t, float>(x.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(),
                                                codes.const_data_ptr<uint8_t>(), out.data_ptr<float>(), M, N, K,
                                                static_cast<int>(sm_count));
                     }));
  return out;
}

std::vector<int64_t> skinny_plan_cpu(int64_t N, int64_t K, int64_t sm_count) {
  TORCH_CHECK(N >= 0 && K >= 0 && sm_count >= 1, "_skinny24_plan: N, K >= 0 and sm_count >= 1");
  const SkinnyPlan p = skinny_plan(N, K, static_cast<int>(sm_count));
  return {p.ksplit, p.steps_per_split};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("_spmm_24_skinny_emulate", &skinny_emulate_cpu); }
// No tensor argument, so no dispatch key: a catch-all kernel, defined with its schema.
TORCH_LIBRARY_FRAGMENT(sparsekern, m) { m.def("_skinny24_plan(int n, int k, int sm_count) -> int[]", &skinny_plan_cpu); }

}  // namespace cpu
}  // namespace sparsekern
