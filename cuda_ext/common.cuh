// Device helpers shared by the kernels: dtype conversion, vector loads, warp reduction, and the
// NF4 decoding of bitsandbytes' layout.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.h"

namespace genadapter {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Four consecutive values as floats; p must be aligned to 4 elements.
__device__ __forceinline__ void load4(const float* p, float out[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
__device__ __forceinline__ void load4(const __half* p, float out[4]) {
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  out[0] = a.x;
  out[1] = a.y;
  out[2] = b.x;
  out[3] = b.y;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float out[4]) {
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  out[0] = a.x;
  out[1] = a.y;
  out[2] = b.x;
  out[3] = b.y;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Absmax of one block of `w.blocksize` weights, double-quantized or plain.
__device__ __forceinline__ float block_absmax(const NF4Layout& w, int64_t block) {
  if (w.absmax_codes == nullptr) return __ldg(w.absmax + block);
  return __ldg(w.nested_code + w.absmax_codes[block]) *
             __ldg(w.nested_absmax + block / w.nested_blocksize) +
         __ldg(w.nested_offset);
}

// Element e of the weight, for any shape and alignment.
__device__ __forceinline__ float nf4_element(const NF4Layout& w, const float* levels, int64_t e) {
  const uint8_t byte = w.packed[e >> 1];
  const int code = (e & 1) ? (byte & 0xF) : (byte >> 4);
  return levels[code] * block_absmax(w, e / w.blocksize);
}

// Eight consecutive codes packed in four bytes (little-endian), in element order.
__device__ __forceinline__ void nf4_decode8(uint32_t q, const float* levels, float scale,
                                            float out[8]) {
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    out[2 * b] = levels[(q >> (8 * b + 4)) & 0xF] * scale;
    out[2 * b + 1] = levels[(q >> (8 * b)) & 0xF] * scale;
  }
}

inline int token_tile(int64_t tokens) {
  return tokens <= 1 ? 1 : tokens <= 2 ? 2 : tokens <= 4 ? 4 : 8;
}

inline bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

}  // namespace genadapter

// Instantiate `body` with `scalar_t` bound to the C++ type of a DType.
#define GENADAPTER_DISPATCH_DTYPE(dtype, ...)               \
  [&]() -> cudaError_t {                                    \
    switch (dtype) {                                        \
      case ::genadapter::DType::kFloat32: {                 \
        using scalar_t = float;                             \
        return __VA_ARGS__();                               \
      }                                                     \
      case ::genadapter::DType::kFloat16: {                 \
        using scalar_t = __half;                            \
        return __VA_ARGS__();                               \
      }                                                     \
      case ::genadapter::DType::kBFloat16: {                \
        using scalar_t = __nv_bfloat16;                     \
        return __VA_ARGS__();                               \
      }                                                     \
    }                                                       \
    return cudaErrorInvalidValue;                           \
  }()

// Instantiate `body` with the compile-time token tile TILE in {1, 2, 4, 8}.
#define GENADAPTER_DISPATCH_TILE(tile, ...)  \
  [&]() -> cudaError_t {                     \
    switch (tile) {                          \
      case 1: {                              \
        constexpr int TILE = 1;              \
        return __VA_ARGS__();                \
      }                                      \
      case 2: {                              \
        constexpr int TILE = 2;              \
        return __VA_ARGS__();                \
      }                                      \
      case 4: {                              \
        constexpr int TILE = 4;              \
        return __VA_ARGS__();                \
      }                                      \
      default: {                             \
        constexpr int TILE = 8;              \
        return __VA_ARGS__();                \
      }                                      \
    }                                        \
  }()
