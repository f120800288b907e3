// Shared helpers of every Switchyard CUDA kernel. Compiled at startup by NVRTC (no nvcc, no CUDA
// headers): bfloat16 is carried as raw `unsigned short` bits and converted by hand, so the
// kernels need nothing beyond what NVRTC provides built in.
//
// The host prepends the SY_* constants (see src/serve/backend/cuda/compile.rs).

typedef unsigned short bf16;

__device__ __forceinline__ float bf2f(bf16 v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

// Round to nearest even; NaN stays a (quiet) NaN instead of rounding into infinity.
__device__ __forceinline__ bf16 f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

// Sum over the whole block; `scratch` holds one float per warp. Every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // earlier readers of scratch are done
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < warps; ++i) {
        total += scratch[i];
    }
    return total;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    float m = __int_as_float(0xff800000);  // -inf without math headers
    for (int i = 0; i < warps; ++i) {
        m = fmaxf(m, scratch[i]);
    }
    return m;
}

// 8 packed bf16 (one 16-byte load, little-endian pairs) to floats.
__device__ __forceinline__ void unpack8(uint4 w, float* f) {
    const unsigned int u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(u[i] << 16);
        f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
}
