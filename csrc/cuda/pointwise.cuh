// Grid-stride launcher shared by the CUDA kernels: each thread handles kVec neighbouring elements
// per step (more bytes in flight per thread), and the grid is capped so that large tensors are
// covered by the loop rather than by millions of blocks.
#pragma once
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers, which
// a bare CUDA toolkit (nvcc + cudart) need not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace pyibp {

constexpr int kThreads = 256;
constexpr int kVec = 4;

template <typename F>
__global__ void pointwise_kernel(int64_t n, F f) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x * kVec;
  for (int64_t base = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; base < n; base += stride) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (base + k < n) f(base + k);
    }
  }
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
  const int64_t blocks = std::min<int64_t>((n + int64_t(kThreads) * kVec - 1) / (int64_t(kThreads) * kVec),
                                           max_blocks);
  pointwise_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pyibp
