// Host entry points of the genadapter kernels. Plain C++ over raw device pointers, so the .cu
// files compile with nvcc alone (no torch headers); binding.cpp checks tensors and calls these.
//
// Shapes: `tokens` rows of activations (all sequences' tokens, sequence-major), d_in inputs,
// d_out outputs. The generator's A (r1 x d_in), B (d_out x r2) and each sequence's S_hat
// (r1 x r2) are float32; activations and outputs are float32, float16 or bfloat16.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace genadapter {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// bitsandbytes' NF4 layout of a row-major (rows x cols) weight, read in place.
struct NF4Layout {
  const uint8_t* packed;         // element e in byte e / 2: high nibble when e is even
  const float* absmax;           // float absmax per block of `blocksize` elements, or null when
  const uint8_t* absmax_codes;   // nested: an 8-bit code per block, decoded as
  const float* nested_code;      //   nested_code[c] * nested_absmax[block / nested_blocksize]
  const float* nested_absmax;    //   + *nested_offset
  const float* nested_offset;    // device pointer, so no host synchronization is needed
  int blocksize;
  int nested_blocksize;
  int64_t rows;  // d_out
  int64_t cols;  // d_in
};

// Largest r2 the kernels keep in shared memory (8 tokens x 1024 floats = 32 KiB).
constexpr int kMaxRank = 1024;

// How many partial sums lowrank_project writes per token (one per group of rows of A).
int lowrank_groups(int r1);

// u_partial[g][m][:] = alpha * S_hat[m / tokens_per_seq]^T restricted to the rows of group g,
// applied to (A x_m) restricted to those rows; summing over g gives alpha * S_hat^T (A x_m).
cudaError_t lowrank_project(const void* x, DType dtype, int64_t tokens, int64_t d_in,
                            const float* A, int r1, const float* s_hat, int64_t tokens_per_seq,
                            int r2, float alpha, float* u_partial, cudaStream_t stream);

// out[m][n] = sum_j B[n][j] * sum_g u_partial[g][m][j], written in `dtype`.
cudaError_t lowrank_expand(const float* u_partial, int groups, int64_t tokens, int r2,
                           const float* B, int64_t d_out, void* out, DType dtype,
                           cudaStream_t stream);

// y[m] = dequant(W) x[m] + bias + B u[m], u[m] = sum_g u_partial[g][m]: one pass over the
// packed weight for every tile of up to 8 tokens, no dequantized copy of W.
cudaError_t nf4_lowrank_gemv(const void* x, DType dtype, int64_t tokens, const NF4Layout& w,
                             const void* bias, const float* u_partial, int groups, int r2,
                             const float* B, void* y, cudaStream_t stream);

// weights[m] = mask[m] / (mean(x[m]^2) + eps): the squared RMSNorm scale of each token, which
// multiplies k_m v_m^T when k and v are projections of the unscaled x * norm.
cudaError_t kv_token_weights(const void* x, DType dtype, int64_t tokens, int64_t d_in,
                             const float* mask, float eps, float* weights, cudaStream_t stream);

// sums[s] = sum over the tokens t of sequence s of weights[t] k_t v_t^T, where row t of `kv`
// (float32, r1 + r2 wide) holds k_t then v_t.
cudaError_t weighted_outer_sum(const float* kv, int64_t seqs, int64_t tokens_per_seq, int r1,
                               int r2, const float* weights, float* sums, cudaStream_t stream);

}  // namespace genadapter
