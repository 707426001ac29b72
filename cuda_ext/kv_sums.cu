// Context pass (absorb): S[s] = sum_t k_t v_t^T over the real tokens of each sequence, with
// k_t = RMSNorm(x_t) Wk^T and v_t = RMSNorm(x_t) Wv^T. RMSNorm(x_t) = r_t (x_t * norm) with
// r_t = 1 / sqrt(mean(x_t^2) + eps), so k_t v_t^T = r_t^2 k'_t v'_t^T where k', v' project the
// unscaled x * norm. The binding computes [k' | v'] for all tokens with one GEMM (norm folded
// into the weights); these kernels supply r_t^2 (times the padding mask) and the weighted sum.
#include "common.cuh"

namespace genadapter {
namespace {

constexpr int kWeightWarps = 8;  // tokens per block, one warp each
constexpr int kTile = 16;        // S tile edge
constexpr int kStage = 32;       // tokens staged in shared memory at a time

template <typename T>
__global__ void __launch_bounds__(kWeightWarps * 32)
    kv_token_weights_kernel(const T* __restrict__ x, int64_t tokens, int64_t d_in,
                            const float* __restrict__ mask, float eps,
                            float* __restrict__ weights) {
  const int lane = threadIdx.x % 32;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kWeightWarps + threadIdx.x / 32;
  if (m >= tokens) return;
  const T* row = x + m * d_in;
  float s = 0.f;
  for (int64_t k = lane; k < d_in; k += 32) {
    const float v = to_float(row[k]);
    s += v * v;
  }
  s = warp_sum(s);
  if (lane == 0) {
    const float keep = mask != nullptr ? mask[m] : 1.f;
    weights[m] = keep / (s / static_cast<float>(d_in) + eps);
  }
}

// Grid (r2 tiles, r1 tiles, sequences); thread (ty, tx) owns S[s][i0 + ty][j0 + tx]. Tokens are
// summed in a fixed order, so the result does not depend on scheduling.
__global__ void __launch_bounds__(kTile * kTile)
    weighted_outer_sum_kernel(const float* __restrict__ kv, int64_t tokens_per_seq, int r1,
                              int r2, const float* __restrict__ weights,
                              float* __restrict__ sums) {
  __shared__ float k_s[kStage][kTile];
  __shared__ float v_s[kStage][kTile];
  const int tx = threadIdx.x % kTile;
  const int ty = threadIdx.x / kTile;
  const int i0 = blockIdx.y * kTile;
  const int j0 = blockIdx.x * kTile;
  const int64_t seq = blockIdx.z;
  const int64_t ld = r1 + r2;
  const float* rows = kv + seq * tokens_per_seq * ld;
  const float* w = weights + seq * tokens_per_seq;

  float acc = 0.f;
  for (int64_t t0 = 0; t0 < tokens_per_seq; t0 += kStage) {
    for (int idx = threadIdx.x; idx < kStage * kTile; idx += blockDim.x) {
      const int t = idx / kTile;
      const int c = idx % kTile;
      const bool in = t0 + t < tokens_per_seq;
      const float* r = rows + (t0 + t) * ld;
      k_s[t][c] = in && i0 + c < r1 ? r[i0 + c] * w[t0 + t] : 0.f;
      v_s[t][c] = in && j0 + c < r2 ? r[r1 + j0 + c] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int t = 0; t < kStage; ++t) acc += k_s[t][ty] * v_s[t][tx];
    __syncthreads();
  }
  if (i0 + ty < r1 && j0 + tx < r2)
    sums[(seq * r1 + i0 + ty) * static_cast<int64_t>(r2) + j0 + tx] = acc;
}

}  // namespace

cudaError_t kv_token_weights(const void* x, DType dtype, int64_t tokens, int64_t d_in,
                             const float* mask, float eps, float* weights, cudaStream_t stream) {
  if (tokens <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((tokens + kWeightWarps - 1) / kWeightWarps);
  return GENADAPTER_DISPATCH_DTYPE(dtype, [&] {
    kv_token_weights_kernel<scalar_t><<<blocks, kWeightWarps * 32, 0, stream>>>(
        static_cast<const scalar_t*>(x), tokens, d_in, mask, eps, weights);
    return cudaGetLastError();
  });
}

cudaError_t weighted_outer_sum(const float* kv, int64_t seqs, int64_t tokens_per_seq, int r1,
                               int r2, const float* weights, float* sums, cudaStream_t stream) {
  if (seqs <= 0) return cudaSuccess;
  if (seqs > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid((r2 + kTile - 1) / kTile, (r1 + kTile - 1) / kTile,
                  static_cast<unsigned>(seqs));
  weighted_outer_sum_kernel<<<grid, kTile * kTile, 0, stream>>>(kv, tokens_per_seq, r1, r2,
                                                                weights, sums);
  return cudaGetLastError();
}

}  // namespace genadapter
