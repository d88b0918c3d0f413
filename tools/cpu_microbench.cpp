// Instruction-pair throughput on the development CPU, behind the design of the CPU 2:4 kernels
// (csrc/cpu/spmm_24_avx512.cpp). Not part of the build. Run:
//   g++ -O2 -march=native -o /tmp/cpu_microbench tools/cpu_microbench.cpp && /tmp/cpu_microbench
// Each line is the time of one loop step (12 independent accumulators, inputs from L1, 64-byte aligned), in ns and
// in cycles at the clock measured by a chain of dependent integer adds. Measured 2026-11-24 on the 2-core AMD EPYC
// (Zen 4) development VM, one thread, ~3.66 GHz:
//   vdpbf16ps, register input             1.01 cycles
//   load + vdpbf16ps                      1.11
//   load + vpermw + vdpbf16ps             1.39   <- one-source gather: the row-pair kernels
//   load + vpermt2w + vdpbf16ps           1.95   <- two-source gather: the row kernels (no better than dense's 2
//                                                   vdpbf16ps per 32 kept products)
//   load + vfmadd (fp32)                  1.14
//   load + vpermps + vfmadd               1.35
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>

namespace {

constexpr int kAcc = 12;

template <int W>
__attribute__((noinline)) float run(long iters, const uint16_t* xs, __m512i iw) {
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i w = _mm512_set1_epi32(0x3f803f80);
  const __m512i b = _mm512_loadu_si512(xs + 32);
  const __m512i a = _mm512_loadu_si512(xs);
  for (long it = 0; it < iters; ++it) {
    const uint16_t* xp = xs + (it & 3) * 64 * 6;
#pragma GCC unroll 12
    for (int i = 0; i < kAcc; ++i) {
      const uint16_t* src = xp + 32 * (i & 1) + 64 * (i >> 1);  // aligned, distinct lines
      __m512i x;
      if (W == 0) {
        x = a;
      } else if (W == 1) {
        x = _mm512_load_si512(src);
      } else if (W == 2) {
        x = _mm512_permutexvar_epi16(iw, _mm512_load_si512(src));
      } else if (W == 3) {
        x = _mm512_permutex2var_epi16(_mm512_load_si512(src), iw, b);
      } else if (W == 4) {
        acc[i] = _mm512_fmadd_ps(_mm512_castsi512_ps(w), _mm512_load_ps(reinterpret_cast<const float*>(src)), acc[i]);
        continue;
      } else {
        acc[i] = _mm512_fmadd_ps(_mm512_castsi512_ps(w),
                                 _mm512_permutexvar_ps(iw, _mm512_load_ps(reinterpret_cast<const float*>(src))), acc[i]);
        continue;
      }
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)w, (__m512bh)x);
    }
  }
  float s = 0;
  for (int i = 0; i < kAcc; ++i) s += _mm512_reduce_add_ps(acc[i]);
  return s;
}

double clock_ghz() {
  const long n = 500000000;
  long x = 0;
  const auto t = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  return 4.0 * n / std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count() / 1e9;
}

}  // namespace

int main() {
  alignas(64) static uint16_t xs[64 * 64];
  for (int i = 0; i < 64 * 64; ++i) xs[i] = static_cast<uint16_t>(0x3f80 + (i & 7));
  const __m512i iw = _mm512_set1_epi16(3);
  const double ghz = clock_ghz();
  std::printf("clock ~%.2f GHz\n", ghz);
  const long iters = 10000000;
  const char* names[] = {"vdpbf16ps, register input", "load + vdpbf16ps", "load + vpermw + vdpbf16ps",
                         "load + vpermt2w + vdpbf16ps", "load + vfmadd (fp32)", "load + vpermps + vfmadd"};
  float (*fns[])(long, const uint16_t*, __m512i) = {run<0>, run<1>, run<2>, run<3>, run<4>, run<5>};
  float sink = 0;
  for (int k = 0; k < 6; ++k) {
    const auto t = std::chrono::steady_clock::now();
    sink += fns[k](iters, xs, iw);
    const double ns = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count() / (iters * kAcc) * 1e9;
    std::printf("%-30s %.3f ns  %.2f cycles\n", names[k], ns, ns * ghz);
  }
  return sink == 12345.f;
}
