// The low-rank delta alpha * B (S_hat^T (A x)), each token with its sequence's S_hat, in two
// steps: lowrank_project reduces each token to r2 numbers (partial sums over groups of rows of
// A, so many blocks share the work even for one token), and lowrank_expand (or the fused NF4
// kernel in nf4_decode.cu) multiplies by B. No atomics: results do not depend on scheduling.
#include "common.cuh"

namespace genadapter {
namespace {

constexpr int kProjectRows = 4;  // rows of A per block, one warp each
constexpr int kExpandTokens = 16;
constexpr int kExpandOutputs = 64;
constexpr int kExpandChunk = 32;  // r2 columns staged in shared memory at a time

// Grid (groups, token tiles). Warp w of block g computes z_i = A_i . x_m for row i = 4g + w and
// the tile's tokens; the block then writes alpha * sum_{i in g} S_hat[seq][i][:] z_i.
template <typename T, int TILE>
__global__ void __launch_bounds__(kProjectRows * 32)
    lowrank_project_kernel(const T* __restrict__ x, int64_t tokens, int64_t d_in,
                           const float* __restrict__ A, int r1,
                           const float* __restrict__ s_hat, int64_t tokens_per_seq, int r2,
                           float alpha, float* __restrict__ u_partial, bool vectorized) {
  __shared__ float z[TILE][kProjectRows];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * kProjectRows + warp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * TILE;
  const int count = static_cast<int>(min(static_cast<int64_t>(TILE), tokens - m0));

  float acc[TILE];
#pragma unroll
  for (int t = 0; t < TILE; ++t) acc[t] = 0.f;
  if (row < r1) {
    const float* a = A + static_cast<int64_t>(row) * d_in;
    if (vectorized) {  // d_in % 4 == 0 and aligned rows
      for (int64_t c = lane; c < d_in / 4; c += 32) {
        float av[4];
        load4(a + 4 * c, av);
#pragma unroll
        for (int t = 0; t < TILE; ++t) {
          if (t < count) {
            float xv[4];
            load4(x + (m0 + t) * d_in + 4 * c, xv);
            acc[t] += av[0] * xv[0] + av[1] * xv[1] + av[2] * xv[2] + av[3] * xv[3];
          }
        }
      }
    } else {
      for (int64_t k = lane; k < d_in; k += 32) {
        const float av = a[k];
#pragma unroll
        for (int t = 0; t < TILE; ++t)
          if (t < count) acc[t] += av * to_float(x[(m0 + t) * d_in + k]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < TILE; ++t) {
    const float v = warp_sum(acc[t]);
    if (lane == 0) z[t][warp] = row < r1 ? v : 0.f;
  }
  __syncthreads();

  const int first_row = blockIdx.x * kProjectRows;
  for (int idx = threadIdx.x; idx < count * r2; idx += blockDim.x) {
    const int t = idx / r2;
    const int j = idx % r2;
    const int64_t m = m0 + t;
    const float* s = s_hat + (m / tokens_per_seq) * r1 * r2;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kProjectRows; ++w)
      if (first_row + w < r1) v += s[static_cast<int64_t>(first_row + w) * r2 + j] * z[t][w];
    u_partial[(static_cast<int64_t>(blockIdx.x) * tokens + m) * r2 + j] = alpha * v;
  }
}

// Grid (output tiles, token tiles): out[m][n] = B[n] . u[m], with u summed from its partials.
// Thread (ty, tx) computes outputs n0 + tx for tokens m0 + ty + 4 i.
template <typename T>
__global__ void __launch_bounds__(256)
    lowrank_expand_kernel(const float* __restrict__ u_partial, int groups, int64_t tokens, int r2,
                          const float* __restrict__ B, int64_t d_out, T* __restrict__ out) {
  __shared__ float u_s[kExpandTokens][kExpandChunk];
  __shared__ float b_s[kExpandOutputs][kExpandChunk + 1];  // +1: no bank conflicts on b_s[tx][j]
  const int tx = threadIdx.x % kExpandOutputs;
  const int ty = threadIdx.x / kExpandOutputs;  // 0..3
  constexpr int kPerThread = kExpandTokens / 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kExpandOutputs;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kExpandTokens;

  float acc[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) acc[i] = 0.f;

  for (int j0 = 0; j0 < r2; j0 += kExpandChunk) {
    for (int idx = threadIdx.x; idx < kExpandTokens * kExpandChunk; idx += blockDim.x) {
      const int t = idx / kExpandChunk;
      const int j = idx % kExpandChunk;
      float v = 0.f;
      if (m0 + t < tokens && j0 + j < r2)
        for (int g = 0; g < groups; ++g) v += u_partial[(g * tokens + m0 + t) * r2 + j0 + j];
      u_s[t][j] = v;
    }
    for (int idx = threadIdx.x; idx < kExpandOutputs * kExpandChunk; idx += blockDim.x) {
      const int n = idx / kExpandChunk;
      const int j = idx % kExpandChunk;
      b_s[n][j] = (n0 + n < d_out && j0 + j < r2) ? B[(n0 + n) * r2 + j0 + j] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < kExpandChunk; ++j) {
      const float bv = b_s[tx][j];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) acc[i] += u_s[ty + 4 * i][j] * bv;
    }
    __syncthreads();
  }
  if (n0 + tx < d_out) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t m = m0 + ty + 4 * i;
      if (m < tokens) out[m * d_out + n0 + tx] = from_float<T>(acc[i]);
    }
  }
}

}  // namespace

int lowrank_groups(int r1) { return (r1 + kProjectRows - 1) / kProjectRows; }

cudaError_t lowrank_project(const void* x, DType dtype, int64_t tokens, int64_t d_in,
                            const float* A, int r1, const float* s_hat, int64_t tokens_per_seq,
                            int r2, float alpha, float* u_partial, cudaStream_t stream) {
  if (tokens <= 0) return cudaSuccess;
  const int tile = token_tile(tokens);
  const dim3 grid(lowrank_groups(r1), static_cast<unsigned>((tokens + tile - 1) / tile));
  return GENADAPTER_DISPATCH_DTYPE(dtype, [&] {
    const scalar_t* xs = static_cast<const scalar_t*>(x);
    const bool vectorized = d_in % 4 == 0 && aligned(x, 4 * sizeof(scalar_t)) && aligned(A, 16);
    return GENADAPTER_DISPATCH_TILE(tile, [&] {
      lowrank_project_kernel<scalar_t, TILE><<<grid, kProjectRows * 32, 0, stream>>>(
          xs, tokens, d_in, A, r1, s_hat, tokens_per_seq, r2, alpha, u_partial, vectorized);
      return cudaGetLastError();
    });
  });
}

cudaError_t lowrank_expand(const float* u_partial, int groups, int64_t tokens, int r2,
                           const float* B, int64_t d_out, void* out, DType dtype,
                           cudaStream_t stream) {
  if (tokens <= 0 || d_out <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((d_out + kExpandOutputs - 1) / kExpandOutputs),
                  static_cast<unsigned>((tokens + kExpandTokens - 1) / kExpandTokens));
  return GENADAPTER_DISPATCH_DTYPE(dtype, [&] {
    lowrank_expand_kernel<scalar_t><<<grid, 256, 0, stream>>>(
        u_partial, groups, tokens, r2, B, d_out, static_cast<scalar_t*>(out));
    return cudaGetLastError();
  });
}

}  // namespace genadapter
