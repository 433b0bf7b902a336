// CPU implementation of the fused multi-LoRA (BGMV-style) op: for every token m with adapter i = idx[m] >= 0,
//   h = s_i * A_i x[m]          (R values, accumulated in float (double for float64 inputs), never rounded)
//   out[m, :] += B_i h          (accumulated in the same type, rounded once into out)
// the same arithmetic as the CUDA decode kernel (csrc/multi_lora_cuda.cu). Tokens run in parallel
// (at::parallel_for); each token's rows of A_i and B_i are read contiguously. Arguments are checked in
// csrc/fastadapters_ext.cpp; an adapter index outside [-1, n) is an error here (it is cheap to check on the CPU).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace {

template <typename scalar_t, typename index_t>
void bgmv_cpu_kernel(scalar_t* out, const scalar_t* x, const scalar_t* A, const scalar_t* B, const float* s,
                     const index_t* idx, int64_t M, int64_t K, int64_t N, int64_t R, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t i = static_cast<int64_t>(idx[m]);
    TORCH_CHECK(i >= -1 && i < n, "multi_lora_bgmv_: token_adapter_idx[", m, "] = ", i, " is outside [-1, ", n,
                "): use -1 for no adapter, else an index into the ", n, " stacked adapters");
  }
  // grain: about 64k multiply-adds per task
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, R * (K + N)));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> h(static_cast<size_t>(R));
    for (int64_t m = begin; m < end; ++m) {
      const int64_t i = static_cast<int64_t>(idx[m]);
      if (i < 0) continue;
      const scalar_t* xm = x + m * K;
      const scalar_t* Ai = A + i * R * K;
      const scalar_t* Bi = B + i * N * R;
      const acc_t scale = static_cast<acc_t>(s[i]);
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* a = Ai + r * K;
        acc_t acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += static_cast<acc_t>(xm[k]) * static_cast<acc_t>(a[k]);
        h[r] = acc * scale;
      }
      scalar_t* om = out + m * N;
      for (int64_t j = 0; j < N; ++j) {
        const scalar_t* b = Bi + j * R;
        acc_t acc = 0;
        for (int64_t r = 0; r < R; ++r) acc += h[r] * static_cast<acc_t>(b[r]);
        om[j] = static_cast<scalar_t>(static_cast<acc_t>(om[j]) + acc);
      }
    }
  });
}

}  // namespace

void multi_lora_bgmv_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                         const at::Tensor& scalings, const at::Tensor& idx) {
  const int64_t M = x.size(0), K = x.size(1), n = lora_A.size(0), R = lora_A.size(1), N = lora_B.size(1);
  if (M == 0 || N == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_bgmv_cpu", [&] {
    if (idx.scalar_type() == at::kLong) {
      bgmv_cpu_kernel<scalar_t, int64_t>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                         lora_A.data_ptr<scalar_t>(), lora_B.data_ptr<scalar_t>(),
                                         scalings.data_ptr<float>(), idx.data_ptr<int64_t>(), M, K, N, R, n);
    } else {
      bgmv_cpu_kernel<scalar_t, int32_t>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                         lora_A.data_ptr<scalar_t>(), lora_B.data_ptr<scalar_t>(),
                                         scalings.data_ptr<float>(), idx.data_ptr<int32_t>(), M, K, N, R, n);
    }
  });
}
