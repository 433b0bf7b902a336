// The one entry file of the fastadapters C++/CUDA extension (built by fastadapters/ext.py through
// torch.utils.cpp_extension + ninja). The op is registered with the dispatcher (TORCH_LIBRARY_FRAGMENT, so
// torch.ops.fastadapters.multi_lora_bgmv_ runs through it and torch.compile sees it; its fake is registered in
// fastadapters/ext.py) and kept as a pybind11 function for direct callers. It checks arguments once, for every
// device, and dispatches to
//   multi_lora_bgmv_cpu   (csrc/multi_lora_cpu.cpp, always built)
//   multi_lora_bgmv_cuda  (csrc/multi_lora_cuda.cu, built when FASTADAPTERS_WITH_CUDA is defined)
//
// multi_lora_bgmv_(out, x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx):
//   out[m, :] += scalings[i] * lora_B_stack[i] @ (lora_A_stack[i] @ x[m, :])   for i = token_adapter_idx[m] >= 0
//   x (M, K), lora_A_stack (n, R, K), lora_B_stack (n, N, R): one dtype (float32/float16/bfloat16, float64 on CPU);
//   out (M, N) in x's dtype; scalings (n,) float32; token_adapter_idx (M,) int32 or int64, -1 = no adapter.
//   All contiguous and on one device. Returns out.

// Not <torch/extension.h>: it pulls in the whole C++ frontend and triples the compile time of this file.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <string>

void multi_lora_bgmv_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                         const at::Tensor& scalings, const at::Tensor& idx);
#ifdef FASTADAPTERS_WITH_CUDA
void multi_lora_bgmv_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                          const at::Tensor& scalings, const at::Tensor& idx);
#endif

namespace {

std::string shape_of(const at::Tensor& t) {  // "(16, 4095)", or "(8,)" for 1-D, like Python
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d > 0) s += ", ";
    s += std::to_string(t.size(d));
  }
  if (t.dim() == 1) s += ",";
  return s + ")";
}

void check_common(const at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& s, const at::Tensor& idx) {
  TORCH_CHECK(x.dim() == 2, "multi_lora_bgmv_: x has shape ", shape_of(x), " but must be 2-D (M, K)");
  TORCH_CHECK(A.dim() == 3, "multi_lora_bgmv_: lora_A_stack has shape ", shape_of(A), " but must be 3-D (n, R, K)");
  TORCH_CHECK(B.dim() == 3, "multi_lora_bgmv_: lora_B_stack has shape ", shape_of(B), " but must be 3-D (n, N, R)");
  const int64_t M = x.size(0), K = x.size(1), n = A.size(0), R = A.size(1), N = B.size(1);
  TORCH_CHECK(A.size(2) == K, "multi_lora_bgmv_: lora_A_stack has shape ", shape_of(A), " but x ", shape_of(x),
              " needs (n, R, ", K, ")");
  TORCH_CHECK(B.size(0) == n && B.size(2) == R, "multi_lora_bgmv_: lora_B_stack has shape ", shape_of(B),
              " but lora_A_stack ", shape_of(A), " needs (", n, ", N, ", R, ")");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N, "multi_lora_bgmv_: out has shape ",
              shape_of(out), " but must be (M, N) = (", M, ", ", N, ")");
  TORCH_CHECK(s.dim() == 1 && s.size(0) == n, "multi_lora_bgmv_: scalings has shape ", shape_of(s),
              " but must be (n,) = (", n, ",)");
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == M, "multi_lora_bgmv_: token_adapter_idx has shape ", shape_of(idx),
              " but must be (M,) = (", M, ",)");
  TORCH_CHECK(A.scalar_type() == x.scalar_type() && B.scalar_type() == x.scalar_type(),
              "multi_lora_bgmv_: x, lora_A_stack and lora_B_stack must share one dtype, got ", x.scalar_type(),
              ", ", A.scalar_type(), ", ", B.scalar_type(), ": cast the stacks to x's dtype");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "multi_lora_bgmv_: out has dtype ", out.scalar_type(),
              " but x has ", x.scalar_type(), ": the extension accumulates into out of x's dtype");
  TORCH_CHECK(s.scalar_type() == at::kFloat, "multi_lora_bgmv_: scalings has dtype ", s.scalar_type(),
              " but must be float32");
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
              "multi_lora_bgmv_: token_adapter_idx has dtype ", idx.scalar_type(), " but must be int64 or int32");
  const auto dev = x.device();
  for (const auto* t : {&out, &A, &B, &s, &idx}) {
    TORCH_CHECK(t->device() == dev, "multi_lora_bgmv_: all tensors must be on one device; x is on ", dev,
                " but another argument is on ", t->device());
  }
  const char* names[] = {"out", "x", "lora_A_stack", "lora_B_stack", "scalings", "token_adapter_idx"};
  const at::Tensor* ts[] = {&out, &x, &A, &B, &s, &idx};
  for (int i = 0; i < 6; ++i) {
    TORCH_CHECK(ts[i]->is_contiguous(), "multi_lora_bgmv_: ", names[i], " must be contiguous: call .contiguous()");
  }
}

}  // namespace

at::Tensor multi_lora_bgmv_(at::Tensor out, const at::Tensor& x, const at::Tensor& lora_A_stack,
                            const at::Tensor& lora_B_stack, const at::Tensor& scalings,
                            const at::Tensor& token_adapter_idx) {
  check_common(out, x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx);
  if (x.is_cuda()) {
#ifdef FASTADAPTERS_WITH_CUDA
    multi_lora_bgmv_cuda(out, x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx);
#else
    TORCH_CHECK(false, "multi_lora_bgmv_: this build of the fastadapters extension has no CUDA code (built without "
                "a CUDA toolchain or GPU): rebuild on a CUDA machine, or use the 'triton' / 'torch' backend");
#endif
  } else {
    TORCH_CHECK(x.device().is_cpu(), "multi_lora_bgmv_: tensors on ", x.device(), " are not supported");
    multi_lora_bgmv_cpu(out, x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx);
  }
  return out;
}

bool has_cuda() {
#ifdef FASTADAPTERS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The dispatcher's entry: a fragment of the "fastadapters" namespace (the Triton ops of fastadapters.ops live in
// the same namespace, defined from Python). One implementation serves CPU and CUDA: it checks and branches on the
// device itself, as the pybind entry does.
// It returns nothing (the schema's "-> ()"): torch.compile functionalizes a custom op that mutates `out` only
// when no output aliases an input.
void multi_lora_bgmv_op(at::Tensor out, const at::Tensor& x, const at::Tensor& lora_A_stack,
                        const at::Tensor& lora_B_stack, const at::Tensor& scalings,
                        const at::Tensor& token_adapter_idx) {
  multi_lora_bgmv_(out, x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx);
}

TORCH_LIBRARY_FRAGMENT(fastadapters, m) {
  m.def("multi_lora_bgmv_(Tensor(a!) out, Tensor x, Tensor lora_A_stack, Tensor lora_B_stack, Tensor scalings, "
        "Tensor token_adapter_idx) -> ()");
}

TORCH_LIBRARY_IMPL(fastadapters, CPU, m) { m.impl("multi_lora_bgmv_", &multi_lora_bgmv_op); }

#ifdef FASTADAPTERS_WITH_CUDA
TORCH_LIBRARY_IMPL(fastadapters, CUDA, m) { m.impl("multi_lora_bgmv_", &multi_lora_bgmv_op); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastadapters C++/CUDA kernels (optional; see fastadapters/ext.py)";
  m.def("multi_lora_bgmv_", &multi_lora_bgmv_,
        "out[m] += s[i] * B_i (A_i x[m]) for i = token_adapter_idx[m] >= 0, in place; returns out",
        py::arg("out"), py::arg("x"), py::arg("lora_A_stack"), py::arg("lora_B_stack"), py::arg("scalings"),
        py::arg("token_adapter_idx"));
  m.def("has_cuda", &has_cuda, "whether this build holds the CUDA kernels");
  m.attr("ABI_VERSION") = 2;  // 2: the op is also registered as torch.ops.fastadapters.multi_lora_bgmv_
}
