// CUDA decode kernel for multi-LoRA (BGMV-style, after Punica): a few tokens per sequence, each with its own
// adapter, one launch per LoRA layer, shrink and expand fused:
//   h = s_i * A_i x[m]  (R floats in shared memory)      out[m, n0:n1] += B_i[n0:n1] h
// for i = idx[m] in [0, n); other tokens are skipped (an out-of-range index counts as "no adapter": checking it
// would need a host sync). Arguments are checked in csrc/fastadapters_ext.cpp.
//
// Grid (M, SPLITS), 256 threads. Block (m, y): warp w computes rows r = w, w + 8, ... of the shrink (lanes stride
// K with 16-byte vector loads, then a shuffle reduction), then every thread produces output columns of
// n-range y: one contiguous R-vector of B_i per column (16-byte loads; a warp reads 32 * R * 2 bytes
// contiguously), one read-modify-write of out. SPLITS = about two blocks per SM over the batch (capped by N / 256):
// each split recomputes the shrink (its A_i reads hit L2), which is cheaper than a second launch at decode sizes.
//
// Napkin math (H200, bf16, K = N = 4096, R = 16): per token A_i and B_i are 128 KiB each; batch 32 with
// SPLITS = 9 reads ~9 x 4 MiB mostly from L2 (~10 TB/s -> ~4 us) and ~2 MiB of distinct weights from HBM.
// One launch replaces PEFT's 5 launches per adapter and layer. Above a few hundred tokens the per-token
// re-reads lose to the grouped Triton kernels (kernels/multi_lora.py), so the dispatch sends prefill there.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxRank = 4096;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Element v of 16 bytes of scalar_t loaded as a uint4, widened to the accumulation type. Bit extraction instead
// of an array reinterpretation keeps the vector in registers (an array of c10::BFloat16 went to local memory).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t lane_of(const uint4& raw, int v) {
  const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (sizeof(scalar_t) == 2) {
    const unsigned short bits = static_cast<unsigned short>((v & 1) ? (w[v >> 1] >> 16) : (w[v >> 1] & 0xffffu));
    return static_cast<acc_t>(scalar_t(bits, scalar_t::from_bits()));
  } else if constexpr (sizeof(scalar_t) == 4) {
    return static_cast<acc_t>(__uint_as_float(w[v]));
  } else {
    return static_cast<acc_t>(__hiloint2double(static_cast<int>(w[2 * v + 1]), static_cast<int>(w[2 * v])));
  }
}

// VEC: K and R are multiples of the 16-byte vector width and the base pointers are 16-byte aligned.
template <typename scalar_t, typename index_t, bool VEC>
__global__ void __launch_bounds__(kThreads)
    multi_lora_bgmv_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                           const scalar_t* __restrict__ A, const scalar_t* __restrict__ B,
                           const float* __restrict__ scalings, const index_t* __restrict__ idx, int64_t K,
                           int64_t N, int64_t R, int64_t n, int64_t n_per_block) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = 16 / sizeof(scalar_t);
  extern __shared__ unsigned char smem_raw[];
  acc_t* h = reinterpret_cast<acc_t*>(smem_raw);

  const int64_t m = blockIdx.x;
  const int64_t i = static_cast<int64_t>(idx[m]);
  if (i < 0 || i >= n) return;  // uniform over the block: no __syncthreads is skipped by part of it

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const scalar_t* xm = x + m * K;
  const scalar_t* Ai = A + i * R * K;
  const acc_t scale = static_cast<acc_t>(scalings[i]);

  // shrink: h[r] = s_i * <A_i[r, :], x[m, :]>
  for (int64_t r = warp; r < R; r += kWarps) {
    const scalar_t* a = Ai + r * K;
    acc_t acc = 0;
    if constexpr (VEC) {
      for (int64_t k = static_cast<int64_t>(lane) * V; k < K; k += 32 * V) {
        const uint4 xv = *reinterpret_cast<const uint4*>(xm + k);
        const uint4 av = *reinterpret_cast<const uint4*>(a + k);
#pragma unroll
        for (int v = 0; v < V; ++v) acc += lane_of<scalar_t, acc_t>(xv, v) * lane_of<scalar_t, acc_t>(av, v);
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) acc += static_cast<acc_t>(xm[k]) * static_cast<acc_t>(a[k]);
    }
    acc = warp_sum(acc);
    if (lane == 0) h[r] = acc * scale;
  }
  __syncthreads();

  // expand: out[m, j] += <B_i[j, :], h> for this block's columns
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * n_per_block;
  const int64_t n1 = n0 + n_per_block < N ? n0 + n_per_block : N;
  const scalar_t* Bi = B + i * N * R;
  scalar_t* om = out + m * N;
  for (int64_t j = n0 + threadIdx.x; j < n1; j += kThreads) {
    const scalar_t* b = Bi + j * R;
    acc_t acc = 0;
    if constexpr (VEC) {
      for (int64_t r = 0; r < R; r += V) {
        const uint4 bv = *reinterpret_cast<const uint4*>(b + r);
#pragma unroll
        for (int v = 0; v < V; ++v) acc += h[r + v] * lane_of<scalar_t, acc_t>(bv, v);
      }
    } else {
      for (int64_t r = 0; r < R; ++r) acc += h[r] * static_cast<acc_t>(b[r]);
    }
    om[j] = static_cast<scalar_t>(static_cast<acc_t>(om[j]) + acc);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

template <typename scalar_t, typename index_t>
void launch(at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& s,
            const at::Tensor& idx) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t M = x.size(0), K = x.size(1), n = A.size(0), R = A.size(1), N = B.size(1);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  int64_t splits = (2 * static_cast<int64_t>(sms) + M - 1) / M;
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, (N + kThreads - 1) / kThreads, 65535}));
  const int64_t n_per_block = (N + splits - 1) / splits;
  splits = (N + n_per_block - 1) / n_per_block;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(splits));
  const size_t smem = static_cast<size_t>(R) * sizeof(acc_t);
  const bool vec = K % V == 0 && R % V == 0 && aligned16(x.data_ptr()) && aligned16(A.data_ptr()) &&
                   aligned16(B.data_ptr());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  scalar_t* o = out.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* ap = A.data_ptr<scalar_t>();
  const scalar_t* bp = B.data_ptr<scalar_t>();
  const float* sp = s.data_ptr<float>();
  const index_t* ip = idx.data_ptr<index_t>();
  if (vec) {
    multi_lora_bgmv_kernel<scalar_t, index_t, true>
        <<<grid, kThreads, smem, stream>>>(o, xp, ap, bp, sp, ip, K, N, R, n, n_per_block);
  } else {
    multi_lora_bgmv_kernel<scalar_t, index_t, false>
        <<<grid, kThreads, smem, stream>>>(o, xp, ap, bp, sp, ip, K, N, R, n, n_per_block);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void multi_lora_bgmv_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                          const at::Tensor& scalings, const at::Tensor& idx) {
  const int64_t M = x.size(0), n = lora_A.size(0), R = lora_A.size(1), N = lora_B.size(1);
  TORCH_CHECK(R <= kMaxRank, "multi_lora_bgmv_: rank ", R, " is above the CUDA kernel's limit ", kMaxRank,
              ": use the 'triton' or 'torch' backend");
  TORCH_CHECK(M <= 2147483647, "multi_lora_bgmv_: ", M, " tokens is above the CUDA grid limit");
  if (M == 0 || N == 0 || n == 0 || R == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_bgmv_cuda", [&] {
    if (idx.scalar_type() == at::kLong) {
      launch<scalar_t, int64_t>(out, x, lora_A, lora_B, scalings, idx);
    } else {
      launch<scalar_t, int32_t>(out, x, lora_A, lora_B, scalings, idx);
    }
  });
}
