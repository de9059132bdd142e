// The dtypes every pyibp kernel takes: float32, float64, float16 and bfloat16 (the last two
// computed in float, see at::opmath_type). One definition for the CPU and CUDA backends.
#pragma once
#include <ATen/Dispatch.h>

#define PYIBP_DISPATCH(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, type, name, __VA_ARGS__)
