// Row-wise and element-wise kernels of the Qwen2 forward: embedding gather, RMSNorm, rotary
// embedding (+ QKV bias), SiLU-and-mul and the residual add. The residual stream is f32; GEMM
// inputs and outputs are bf16.

// out[t, :] = table[ids[t], :]  (grid: tokens; the residual stream starts in f32)
extern "C" __global__ void embedding_gather(float* __restrict__ out,
                                            const bf16* __restrict__ table,
                                            const unsigned int* __restrict__ ids, int hidden) {
    const size_t t = blockIdx.x;
    const bf16* row = table + (size_t)ids[t] * hidden;
    float* o = out + t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        o[i] = bf2f(row[i]);
    }
}

// out[r, :] = x / rms(x) * weight with x = in[src, :], src = rows[r] when `gather` is set (the
// final norm only runs on the rows the engine wants logits for), else r.
// grid: output rows; shared: one float per warp.
extern "C" __global__ void rms_norm(bf16* __restrict__ out, const float* __restrict__ in,
                                    const bf16* __restrict__ weight,
                                    const int* __restrict__ rows, int gather, int hidden,
                                    float eps) {
    extern __shared__ float scratch[];
    const size_t r = blockIdx.x;
    const size_t src = gather ? (size_t)rows[r] : r;
    const float* x = in + src * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        ss += x[i] * x[i];
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    bf16* o = out + r * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        o[i] = f2bf(x[i] * inv * bf2f(weight[i]));
    }
}

// In place on the fused QKV projection `[tokens, (heads + 2 kv_heads) * head_size]`: adds the
// bias everywhere, then rotates Q and K (rotate-half / NeoX layout as in Qwen2).
// cos_sin: `[max_position, head_size / 2, 2]` f32, computed on the host in f64.
// grid: tokens.
extern "C" __global__ void qkv_bias_rope(bf16* __restrict__ qkv, const bf16* __restrict__ bias,
                                         const float* __restrict__ cos_sin,
                                         const int* __restrict__ positions, int num_heads,
                                         int num_kv_heads, int head_size) {
    const size_t t = blockIdx.x;
    const int width = (num_heads + 2 * num_kv_heads) * head_size;
    const int half = head_size / 2;
    bf16* row = qkv + t * width;
    const float* cs = cos_sin + (size_t)positions[t] * head_size;
    const int rope_heads = num_heads + num_kv_heads;
    for (int p = threadIdx.x; p < rope_heads * half; p += blockDim.x) {
        const int h = p / half;
        const int i = p - h * half;
        const int a = h * head_size + i;
        const int b = a + half;
        const float x1 = bf2f(row[a]) + bf2f(bias[a]);
        const float x2 = bf2f(row[b]) + bf2f(bias[b]);
        const float c = cs[2 * i];
        const float s = cs[2 * i + 1];
        row[a] = f2bf(x1 * c - x2 * s);
        row[b] = f2bf(x2 * c + x1 * s);
    }
    for (int i = rope_heads * head_size + threadIdx.x; i < width; i += blockDim.x) {
        row[i] = f2bf(bf2f(row[i]) + bf2f(bias[i]));
    }
}

// out[t, i] = silu(gate[t, i]) * up[t, i] over the fused `[tokens, 2 * inter]` projection.
extern "C" __global__ void silu_and_mul(bf16* __restrict__ out, const bf16* __restrict__ gate_up,
                                        int tokens, int inter) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)tokens * inter) {
        return;
    }
    const size_t t = idx / inter;
    const size_t i = idx - t * inter;
    const float g = bf2f(gate_up[t * 2 * inter + i]);
    const float u = bf2f(gate_up[t * 2 * inter + inter + i]);
    out[idx] = f2bf(g / (1.f + __expf(-g)) * u);
}

// hidden += x (f32 residual stream, bf16 branch output).
extern "C" __global__ void residual_add(float* __restrict__ hidden, const bf16* __restrict__ x,
                                        int n) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < n) {
        hidden[idx] += bf2f(x[idx]);
    }
}

// Fused residual add + RMSNorm (one launch instead of `residual_add` then `rms_norm`, and the
// residual row is read once): hidden[r] += branch[r]; out[r] = hidden[r] / rms · weight.
// Bit-identical to the two kernels: the same f32 add per element, the same thread-strided sum
// of squares and block reduction (emulate.rs pins it). grid: rows; shared: one float per warp.
extern "C" __global__ void fused_add_rms_norm(bf16* __restrict__ out, float* __restrict__ hidden,
                                              const bf16* __restrict__ branch,
                                              const bf16* __restrict__ weight, int hidden_size,
                                              float eps) {
    extern __shared__ float scratch[];
    const size_t r = blockIdx.x;
    float* x = hidden + r * hidden_size;
    const bf16* b = branch + r * hidden_size;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden_size; i += blockDim.x) {
        const float v = x[i] + bf2f(b[i]);
        x[i] = v;
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden_size + eps);
    bf16* o = out + r * hidden_size;
    for (int i = threadIdx.x; i < hidden_size; i += blockDim.x) {
        o[i] = f2bf(x[i] * inv * bf2f(weight[i]));
    }
}
