// Thin torch binding of the kernels in launch.h: checks shapes, dtypes and devices, allocates
// scratch, runs on the current CUDA stream. Built only where a CUDA build of torch exists
// (setup.py, or genadapter.kernels' JIT fallback). Python callers allocate the outputs.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "launch.h"

namespace {

using genadapter::DType;

// Decode-sized batches go through lowrank_project; above this, cuBLAS does the projection.
constexpr int64_t kProjectMaxTokens = 64;

DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32:
      return DType::kFloat32;
    case torch::kFloat16:
      return DType::kFloat16;
    case torch::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "genadapter kernels take float32, float16 or bfloat16, not ",
                  t.scalar_type());
  }
}

void check_cuda(const torch::Tensor& t, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_float32(const torch::Tensor& t, const char* name, const torch::Tensor& like) {
  check_cuda(t, name, like);
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
}

struct Projection {
  torch::Tensor u_partial;  // (groups, tokens, r2) float32
  int groups;
};

// alpha * S_hat^T (A x) per token, as partial sums over groups of rows of A.
Projection project(const torch::Tensor& x2d, const torch::Tensor& A, const torch::Tensor& s_hat,
                   double alpha) {
  const int64_t tokens = x2d.size(0), d_in = x2d.size(1);
  const int64_t seqs = s_hat.size(0);
  const int r1 = static_cast<int>(A.size(0)), r2 = static_cast<int>(s_hat.size(2));
  TORCH_CHECK(A.size(1) == d_in, "A is ", A.sizes(), " for inputs of size ", d_in);
  TORCH_CHECK(s_hat.size(1) == r1, "S_hat is ", s_hat.sizes(), " for A of rank ", r1);
  TORCH_CHECK(seqs > 0 && tokens % seqs == 0, tokens, " tokens do not split into ", seqs,
              " sequences");
  TORCH_CHECK(r2 <= genadapter::kMaxRank, "r2 above ", genadapter::kMaxRank);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (tokens <= kProjectMaxTokens) {
    const int groups = genadapter::lowrank_groups(r1);
    auto u = torch::empty({groups, tokens, r2}, x2d.options().dtype(torch::kFloat32));
    C10_CUDA_CHECK(genadapter::lowrank_project(
        x2d.data_ptr(), dtype_of(x2d), tokens, d_in, A.data_ptr<float>(), r1,
        s_hat.data_ptr<float>(), tokens / seqs, r2, static_cast<float>(alpha),
        u.data_ptr<float>(), stream));
    return {u, groups};
  }
  // Prefill: one GEMM for A x over all tokens, one batched GEMM with each sequence's S_hat.
  auto z = torch::matmul(x2d.to(torch::kFloat32), A.t()).view({seqs, tokens / seqs, r1});
  auto u = torch::bmm(z, s_hat).mul_(alpha).view({1, tokens, r2}).contiguous();
  return {u, 1};
}

// out = alpha * B (S_hat^T (A x)) in x's dtype; x (tokens, d_in), out (tokens, d_out).
void lowrank_delta(torch::Tensor x, torch::Tensor A, torch::Tensor B, torch::Tensor s_hat,
                   double alpha, torch::Tensor out) {
  check_cuda(x, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_float32(A, "A", x);
  check_float32(B, "B", x);
  check_float32(s_hat, "S_hat", x);
  check_cuda(out, "out", x);
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0), "bad shapes");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out must have x's dtype");
  TORCH_CHECK(B.size(0) == out.size(1) && B.size(1) == s_hat.size(2), "B is ", B.sizes());
  const auto p = project(x, A, s_hat, alpha);
  C10_CUDA_CHECK(genadapter::lowrank_expand(p.u_partial.data_ptr<float>(), p.groups, x.size(0),
                                            static_cast<int>(B.size(1)), B.data_ptr<float>(),
                                            out.size(1), out.data_ptr(), dtype_of(out),
                                            c10::cuda::getCurrentCUDAStream()));
}

// out = dequant(W) x + bias + alpha * B (S_hat^T (A x)), W in bitsandbytes' NF4 layout.
void nf4_lowrank_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor absmax,
                        c10::optional<torch::Tensor> nested_code,
                        c10::optional<torch::Tensor> nested_absmax,
                        c10::optional<torch::Tensor> nested_offset, int64_t blocksize,
                        int64_t nested_blocksize, int64_t rows, c10::optional<torch::Tensor> bias,
                        torch::Tensor A, torch::Tensor B, torch::Tensor s_hat, double alpha,
                        torch::Tensor out) {
  check_cuda(x, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(packed, "packed weight", x);
  check_cuda(absmax, "absmax", x);
  check_float32(A, "A", x);
  check_float32(B, "B", x);
  check_float32(s_hat, "S_hat", x);
  check_cuda(out, "out", x);
  const int64_t tokens = x.size(0), cols = x.size(1);
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == tokens && out.size(1) == rows,
              "bad shapes");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out must have x's dtype");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.numel() == (rows * cols + 1) / 2,
              "packed weight must be uint8 with ", (rows * cols + 1) / 2, " bytes");
  const int64_t blocks = (rows * cols + blocksize - 1) / blocksize;
  TORCH_CHECK(blocksize > 0 && blocksize % 8 == 0 && absmax.numel() == blocks,
              "absmax must have one entry per block of ", blocksize);
  TORCH_CHECK(B.size(0) == rows && B.size(1) == s_hat.size(2), "B is ", B.sizes());

  genadapter::NF4Layout w{};
  w.packed = packed.data_ptr<uint8_t>();
  w.blocksize = static_cast<int>(blocksize);
  w.nested_blocksize = static_cast<int>(nested_blocksize);
  w.rows = rows;
  w.cols = cols;
  if (nested_code.has_value()) {
    TORCH_CHECK(absmax.scalar_type() == torch::kUInt8, "nested absmax codes must be uint8");
    check_float32(*nested_code, "nested code", x);
    check_float32(*nested_absmax, "nested absmax", x);
    check_float32(*nested_offset, "nested offset", x);
    TORCH_CHECK(nested_code->numel() == 256 && nested_offset->numel() == 1 &&
                    nested_absmax->numel() == (blocks + nested_blocksize - 1) / nested_blocksize,
                "malformed nested absmax");
    w.absmax_codes = absmax.data_ptr<uint8_t>();
    w.nested_code = nested_code->data_ptr<float>();
    w.nested_absmax = nested_absmax->data_ptr<float>();
    w.nested_offset = nested_offset->data_ptr<float>();
  } else {
    check_float32(absmax, "absmax", x);
    w.absmax = absmax.data_ptr<float>();
  }
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    check_cuda(*bias, "bias", x);
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == rows,
                "bias must have x's dtype and one entry per output");
    bias_ptr = bias->data_ptr();
  }
  const auto p = project(x, A, s_hat, alpha);
  C10_CUDA_CHECK(genadapter::nf4_lowrank_gemv(
      x.data_ptr(), dtype_of(x), tokens, w, bias_ptr, p.u_partial.data_ptr<float>(), p.groups,
      static_cast<int>(B.size(1)), B.data_ptr<float>(), out.data_ptr(),
      c10::cuda::getCurrentCUDAStream()));
}

// (seqs, r1, r2) float32 sums of k_t v_t^T over each sequence's unmasked tokens.
void kv_sums(torch::Tensor x, torch::Tensor norm, torch::Tensor Wk, torch::Tensor Wv,
             c10::optional<torch::Tensor> mask, double eps, torch::Tensor out) {
  check_cuda(x, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_float32(norm, "norm", x);
  check_float32(Wk, "Wk", x);
  check_float32(Wv, "Wv", x);
  check_float32(out, "out", x);
  TORCH_CHECK(x.dim() == 3, "x must be (sequences, tokens, d_in)");
  const int64_t seqs = x.size(0), per_seq = x.size(1), d_in = x.size(2);
  const int64_t tokens = seqs * per_seq;
  const int r1 = static_cast<int>(Wk.size(0)), r2 = static_cast<int>(Wv.size(0));
  TORCH_CHECK(Wk.size(1) == d_in && Wv.size(1) == d_in && norm.numel() == d_in, "bad shapes");
  TORCH_CHECK(out.size(0) == seqs && out.size(1) == r1 && out.size(2) == r2, "bad out shape");
  const float* mask_ptr = nullptr;
  torch::Tensor mask_f;
  if (mask.has_value()) {
    TORCH_CHECK(mask->numel() == tokens, "mask must be (sequences, tokens)");
    mask_f = mask->to(x.device(), torch::kFloat32).contiguous();
    mask_ptr = mask_f.data_ptr<float>();
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto weights = torch::empty({tokens}, x.options().dtype(torch::kFloat32));
  C10_CUDA_CHECK(genadapter::kv_token_weights(x.data_ptr(), dtype_of(x), tokens, d_in, mask_ptr,
                                              static_cast<float>(eps), weights.data_ptr<float>(),
                                              stream));
  // [k' | v'] = (x * norm) [Wk; Wv]^T = x ([Wk; Wv] * norm)^T: one GEMM, no normalized copy of x.
  auto w_kv = torch::cat({Wk, Wv}, 0).mul_(norm);
  auto kv = torch::matmul(x.view({tokens, d_in}).to(torch::kFloat32), w_kv.t()).contiguous();
  C10_CUDA_CHECK(genadapter::weighted_outer_sum(kv.data_ptr<float>(), seqs, per_seq, r1, r2,
                                                weights.data_ptr<float>(), out.data_ptr<float>(),
                                                stream));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "genadapter's fused CUDA kernels (see genadapter/kernels.py for the reference)";
  m.def("lowrank_delta", &lowrank_delta, "out = alpha * B (S_hat^T (A x))");
  m.def("nf4_lowrank_linear", &nf4_lowrank_linear,
        "out = dequant_nf4(W) x + bias + alpha * B (S_hat^T (A x))");
  m.def("kv_sums", &kv_sums, "out[s] = sum_t RMSNorm(x_t) Wk^T (RMSNorm(x_t) Wv^T)^T");
}
