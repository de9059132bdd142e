// Parallel loops shared by the CPU kernels. They hand each element's channel or example index
// to the body without dividing per element (a 64-bit division per element costs as much as the
// convolution it follows) and keep the innermost loop simple enough to vectorise.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>

#include "interval_products.h"

namespace pyibp {

constexpr int64_t kGrain = 16384;

// Calls f(i, c) for every element i of a dense (B, C, ...) tensor, row-major or channels_last,
// with c its channel.
template <typename F>
void for_each_with_channel(const at::Tensor& t, const F& f) {
  const int64_t n = t.numel(), channels = t.size(1);
  if (n == 0) return;
  if (is_channels_last(t)) {  // (B, H, W, C) in memory: the channel is the fastest index
    at::parallel_for(0, n / channels, std::max<int64_t>(1, kGrain / channels), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t base = row * channels;
        for (int64_t c = 0; c < channels; ++c) f(base + c, c);
      }
    });
    return;
  }
  const int64_t inner = inner_size(t);
  at::parallel_for(0, n / inner, std::max<int64_t>(1, kGrain / inner), [&](int64_t p0, int64_t p1) {
    for (int64_t plane = p0; plane < p1; ++plane) {
      const int64_t base = plane * inner, c = plane % channels;
      for (int64_t k = 0; k < inner; ++k) f(base + k, c);
    }
  });
}

// Calls f(i, example) for every element, walking each example's elements as one run.
template <typename F>
void for_each_with_example(int64_t n, int64_t per, const F& f) {
  if (n == 0) return;
  at::parallel_for(0, n / per, std::max<int64_t>(1, kGrain / per), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t k = 0; k < per; ++k) f(b * per + k, b);
    }
  });
}

}  // namespace pyibp
