// Last-layer elision, per (example, class): the lower bound of (W[y] - W[j]) z + b[y] - b[j] over
// the box (mu, rad), accumulated in double in one fixed order on both backends. The CUDA kernel
// gives feature f to lane f % kElisionLanes of a warp and reduces the lanes as a shuffle-down
// tree; the CPU loop emulates exactly that, so both round alike (and nvcc does not contract to FMA,
// see setup.py).
#pragma once
#include <c10/macros/Macros.h>

#include "math/box.h"

namespace pyibp {

constexpr int kElisionLanes = 32;

// One feature's term.
C10_HOST_DEVICE inline double elision_term(double w_y, double w_j, double m, double r) {
  const double d = w_y - w_j;
  return d * m - abs_keep_nan(d) * r;
}

// The lanes' partial sums reduced in the order of __shfl_down_sync with offsets 16, 8, 4, 2, 1.
C10_HOST_DEVICE inline double reduce_lanes(double* lanes) {
  for (int offset = kElisionLanes / 2; offset > 0; offset /= 2) {
    for (int lane = 0; lane < offset; ++lane) lanes[lane] += lanes[lane + offset];
  }
  return lanes[0];
}

// The bias added last: the sum of the terms, then b[y] - b[j].
C10_HOST_DEVICE inline double elision_with_bias(double sum, double b_y, double b_j) { return sum + (b_y - b_j); }

}  // namespace pyibp
