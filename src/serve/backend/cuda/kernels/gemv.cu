// Weight-streaming matrix-vector products for small batches (decode at batch ≤ SY_GEMV_MAX_ROWS):
//   out[t, n] = scale[n] · Σ_k W[n, k] · x[t, k]      (t < rows, W row-major [N, K])
// with W in FP8 E4M3 (per-output-channel f32 scales, dequantized in the prologue of each
// 16-weight chunk) or bf16 (scale 1). One warp per output channel, SY_GEMV_WARPS warps per
// block; lane l streams 16-byte weight chunks l, l + 32, ... (each warp reads its row as whole
// 512-byte runs), x comes through L1/L2 (every warp of the grid reads the same few rows), then
// a butterfly warp sum. Host emulation: emulate.rs::gemv (pins the order of the sums).
// Needs K % 16 == 0 (launch.rs::gemv_launch checks it; every Qwen2 projection is a multiple of
// 128).

#if SY_GEMV_WARPS * 32 > 1024
#error "a GEMV block is SY_GEMV_WARPS warps"
#endif

// E4M3 → f32 (fp8.rs::decode_like_kernel): the seven magnitude bits at the top of an f32's
// exponent/mantissa are value · 2^-120 for normal and subnormal codes alike; × 2^120 is exact.
// NaN codes would decode as ±480; loading rejects them.
__device__ __forceinline__ float fp8_to_f32(unsigned int code) {
    return __uint_as_float(((code & 0x80u) << 24) | ((code & 0x7fu) << 20)) *
           __uint_as_float(0x7b800000u);
}

// 16 E4M3 codes (one 16-byte load) to floats.
__device__ __forceinline__ void unpack16_fp8(uint4 w, float* f) {
    const unsigned int u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            f[4 * i + b] = fp8_to_f32((u[i] >> (8 * b)) & 0xffu);
        }
    }
}

template <bool FP8, bool F32_OUT>
__device__ __forceinline__ void gemv_impl(void* __restrict__ out,
                                          const unsigned char* __restrict__ w,
                                          const float* __restrict__ scales,
                                          const bf16* __restrict__ x, int n, int k, int rows) {
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int o = blockIdx.x * SY_GEMV_WARPS + warp;
    if (o >= n) {
        return;  // the whole warp leaves together: no shuffle below is left half-full
    }
    const int chunks = k >> 4;  // 16 weights per chunk
    const size_t row_bytes = (size_t)k * (FP8 ? 1 : 2);
    const uint4* wrow = reinterpret_cast<const uint4*>(w + (size_t)o * row_bytes);
    float acc[SY_GEMV_MAX_ROWS];
#pragma unroll
    for (int t = 0; t < SY_GEMV_MAX_ROWS; ++t) {
        acc[t] = 0.f;
    }
#pragma unroll 4
    for (int c = lane; c < chunks; c += 32) {
        float wf[16];
        if (FP8) {
            unpack16_fp8(wrow[c], wf);
        } else {
            unpack8(wrow[2 * c], wf);
            unpack8(wrow[2 * c + 1], wf + 8);
        }
#pragma unroll
        for (int t = 0; t < SY_GEMV_MAX_ROWS; ++t) {
            if (t < rows) {
                const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)t * k) + 2 * c;
                float xf[16];
                unpack8(xp[0], xf);
                unpack8(xp[1], xf + 8);
                float a = acc[t];
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    a = fmaf(wf[i], xf[i], a);
                }
                acc[t] = a;
            }
        }
    }
    const float s = FP8 ? scales[o] : 1.f;
#pragma unroll
    for (int t = 0; t < SY_GEMV_MAX_ROWS; ++t) {
        if (t < rows) {
            const float v = warp_sum(acc[t]);
            if (lane == 0) {
                if (F32_OUT) {
                    static_cast<float*>(out)[(size_t)t * n + o] = v * s;
                } else {
                    static_cast<bf16*>(out)[(size_t)t * n + o] = f2bf(v * s);
                }
            }
        }
    }
}

// grid (ceil(n / SY_GEMV_WARPS)), SY_GEMV_WARPS * 32 threads. bf16 out: the projections;
// f32 out: an FP8 lm_head writing logits at full precision.
extern "C" __global__ void gemv_fp8(bf16* __restrict__ out, const unsigned char* __restrict__ w,
                                    const float* __restrict__ scales,
                                    const bf16* __restrict__ x, int n, int k, int rows) {
    gemv_impl<true, false>(out, w, scales, x, n, k, rows);
}

extern "C" __global__ void gemv_fp8_f32(float* __restrict__ out,
                                        const unsigned char* __restrict__ w,
                                        const float* __restrict__ scales,
                                        const bf16* __restrict__ x, int n, int k, int rows) {
    gemv_impl<true, true>(out, w, scales, x, n, k, rows);
}

extern "C" __global__ void gemv_bf16(bf16* __restrict__ out, const bf16* __restrict__ w,
                                     const bf16* __restrict__ x, int n, int k, int rows) {
    gemv_impl<false, false>(out, reinterpret_cast<const unsigned char*>(w), nullptr, x, n, k,
                            rows);
}

extern "C" __global__ void gemv_bf16_f32(float* __restrict__ out, const bf16* __restrict__ w,
                                         const bf16* __restrict__ x, int n, int k, int rows) {
    gemv_impl<false, true>(out, reinterpret_cast<const unsigned char*>(w), nullptr, x, n, k,
                           rows);
}

// Rows [row0, row0 + rows) of an FP8 weight to bf16 (value × scale rounded once to bf16:
// relative error ≤ 2^-8, the rounding any bf16 checkpoint carries), for batches above
// SY_GEMV_MAX_ROWS, which run cuBLAS on a bounded slice of dequantized rows at a time.
// out is [rows, k]; one thread per element.
extern "C" __global__ void fp8_dequant_rows(bf16* __restrict__ out,
                                            const unsigned char* __restrict__ w,
                                            const float* __restrict__ scales, int row0, int rows,
                                            int k) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)rows * k) {
        return;
    }
    const size_t r = idx / k;
    const size_t src = ((size_t)row0 + r) * k + (idx - r * k);
    out[idx] = f2bf(fp8_to_f32(w[src]) * scales[row0 + r]);
}
