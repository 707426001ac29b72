// Decode step of an adapted NF4 layer: y[m] = dequant(W) x[m] + bias + B u[m], where u[m] =
// alpha * S_hat[seq(m)]^T (A x[m]) comes from lowrank_project. The packed weight is decoded in
// registers as it streams through; each warp owns one output row and a tile of up to 8 tokens,
// so a tile reads W once. Together with lowrank_project: two launches per layer.
#include "common.cuh"

namespace genadapter {
namespace {

// The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023): quantiles of a standard normal
// rescaled to [-1, 1], with an exact zero. Code c decodes to kNF4[c] * block absmax.
__constant__ float kNF4[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

constexpr int kRowsPerBlock = 8;  // one warp per output row

template <typename T, int TILE>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    nf4_lowrank_gemv_kernel(const T* __restrict__ x, int64_t tokens, const NF4Layout w,
                            const T* __restrict__ bias, const float* __restrict__ u_partial,
                            int groups, int r2, const float* __restrict__ B,
                            T* __restrict__ y, bool vectorized) {
  extern __shared__ float u_s[];  // TILE x r2: this tile's u, summed from its partials
  __shared__ float levels[16];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * TILE;
  const int count = static_cast<int>(min(static_cast<int64_t>(TILE), tokens - m0));
  if (threadIdx.x < 16) levels[threadIdx.x] = kNF4[threadIdx.x];
  for (int idx = threadIdx.x; idx < count * r2; idx += blockDim.x) {
    const int t = idx / r2;
    const int j = idx % r2;
    float v = 0.f;
    for (int g = 0; g < groups; ++g) v += u_partial[(g * tokens + m0 + t) * r2 + j];
    u_s[t * r2 + j] = v;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;
  if (row >= w.rows) return;
  const int64_t d_in = w.cols;
  const int64_t first = row * d_in;  // flat index of the row's first element

  float acc[TILE];
#pragma unroll
  for (int t = 0; t < TILE; ++t) acc[t] = 0.f;

  if (vectorized) {  // d_in % 8 == 0: eight codes per 32-bit word, all in one absmax block
    const uint32_t* words = reinterpret_cast<const uint32_t*>(w.packed) + first / 8;
    for (int64_t c = lane; c < d_in / 8; c += 32) {
      float wv[8];
      nf4_decode8(__ldg(words + c), levels, block_absmax(w, (first + 8 * c) / w.blocksize), wv);
#pragma unroll
      for (int t = 0; t < TILE; ++t) {
        if (t < count) {
          const T* xp = x + (m0 + t) * d_in + 8 * c;
          float xv[8];
          load4(xp, xv);
          load4(xp + 4, xv + 4);
          float s = 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i) s += wv[i] * xv[i];
          acc[t] += s;
        }
      }
    }
  } else {  // any shape: element by element
    for (int64_t k = lane; k < d_in; k += 32) {
      const float wv = nf4_element(w, levels, first + k);
#pragma unroll
      for (int t = 0; t < TILE; ++t)
        if (t < count) acc[t] += wv * to_float(x[(m0 + t) * d_in + k]);
    }
  }

  const float* b = B + row * r2;  // the delta: B[row] . u[m]
  for (int j = lane; j < r2; j += 32) {
    const float bv = b[j];
#pragma unroll
    for (int t = 0; t < TILE; ++t)
      if (t < count) acc[t] += bv * u_s[t * r2 + j];
  }

  const float bias_v = bias != nullptr ? to_float(bias[row]) : 0.f;
#pragma unroll
  for (int t = 0; t < TILE; ++t) {
    const float v = warp_sum(acc[t]);
    if (lane == 0 && t < count) y[(m0 + t) * w.rows + row] = from_float<T>(v + bias_v);
  }
}

}  // namespace

cudaError_t nf4_lowrank_gemv(const void* x, DType dtype, int64_t tokens, const NF4Layout& w,
                             const void* bias, const float* u_partial, int groups, int r2,
                             const float* B, void* y, cudaStream_t stream) {
  if (tokens <= 0 || w.rows <= 0) return cudaSuccess;
  if (r2 > kMaxRank || w.blocksize % 8 != 0) return cudaErrorInvalidValue;
  const int tile = token_tile(tokens);
  const int64_t tiles = (tokens + tile - 1) / tile;
  if (tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>((w.rows + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>(tiles));
  const size_t shared = static_cast<size_t>(tile) * r2 * sizeof(float);
  return GENADAPTER_DISPATCH_DTYPE(dtype, [&] {
    // With d_in % 8 == 0 every row of x starts 16-byte aligned when x does.
    const bool vectorized = w.cols % 8 == 0 && aligned(w.packed, 4) && aligned(x, 16);
    return GENADAPTER_DISPATCH_TILE(tile, [&] {
      nf4_lowrank_gemv_kernel<scalar_t, TILE><<<grid, kRowsPerBlock * 32, shared, stream>>>(
          static_cast<const scalar_t*>(x), tokens, w, static_cast<const scalar_t*>(bias),
          u_partial, groups, r2, B, static_cast<scalar_t*>(y), vectorized);
      return cudaGetLastError();
    });
  });
}

}  // namespace genadapter
