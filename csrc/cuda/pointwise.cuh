// Grid-stride launcher and index helpers shared by the CUDA kernels. One element per thread per
// step: neighbouring threads touch neighbouring elements, so every warp load is coalesced, and the
// grid is capped so that large tensors are covered by the loop rather than by millions of blocks.
#pragma once
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers, which
// a bare CUDA toolkit (nvcc + cudart) need not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace pyibp {

constexpr int kThreads = 256;

// Indices in 32 bits whenever the tensor allows: the loop counter and every division by a
// channel or example size then cost a few instructions instead of a 64-bit division's dozens.
template <typename index_t, typename F>
__global__ void pointwise_kernel(index_t n, F f) {
  const index_t stride = index_t(blockDim.x) * gridDim.x;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(int64_t(i));
}

// i / d and i % d for indices below `n`, in 32 bits when n allows.
struct IndexDivider {
  int64_t d;
  bool narrow;
  __device__ __forceinline__ int64_t div(int64_t i) const {
    return narrow ? int64_t(uint32_t(i) / uint32_t(d)) : i / d;
  }
  __device__ __forceinline__ int64_t mod(int64_t i) const {
    return narrow ? int64_t(uint32_t(i) % uint32_t(d)) : i % d;
  }
};

inline IndexDivider index_divider(int64_t d, int64_t n) {
  return {std::max<int64_t>(d, 1), n <= int64_t(std::numeric_limits<uint32_t>::max())};
}

// The channel (dim 1) of element i of a dense (B, C, ...) tensor, row-major or channels_last.
struct ChannelOf {
  IndexDivider inner, channels;
  bool channels_last;
  __device__ __forceinline__ int64_t operator()(int64_t i) const {
    return channels_last ? channels.mod(i) : channels.mod(inner.div(i));
  }
};

inline ChannelOf channel_of(int64_t inner, int64_t channels, bool channels_last, int64_t n) {
  return {index_divider(inner, n), index_divider(channels, n), channels_last};
}

inline int64_t multiprocessor_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

// Calls f(i) for every i in [0, n) on the current stream.
template <typename F>
void launch_pointwise(int64_t n, const F& f) {
  if (n == 0) return;
  const int64_t max_blocks = multiprocessor_count() * 16;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The loop's i + stride must not overflow the index type either.
  if (n + blocks * kThreads <= int64_t(std::numeric_limits<int32_t>::max())) {
    pointwise_kernel<int32_t><<<blocks, kThreads, 0, stream>>>(int32_t(n), f);
  } else {
    pointwise_kernel<int64_t><<<blocks, kThreads, 0, stream>>>(n, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pyibp
