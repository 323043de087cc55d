// SA_HOST_DEVICE marks the math in csrc/common/ that both the CPU kernels (a host compiler) and
// the CUDA kernels (nvcc, device code) call.
#pragma once

#if defined(__CUDACC__)
#define SA_HOST_DEVICE __host__ __device__
#else
#define SA_HOST_DEVICE
#endif
