// reshape_and_cache: writes each new token's K and V (from the fused QKV buffer, after RoPE)
// into its slot of the paged cache (REFERENCE.md §6):
//   key   [num_blocks, num_kv_heads, head_size / SY_X, block_size, SY_X]
//   value [num_blocks, num_kv_heads, head_size, block_size]
// grid: tokens; threads stride over (kv head, dim).
extern "C" __global__ void reshape_and_cache(const bf16* __restrict__ qkv,
                                             bf16* __restrict__ key_cache,
                                             bf16* __restrict__ value_cache,
                                             const int* __restrict__ slot_mapping, int num_heads,
                                             int num_kv_heads, int head_size, int block_size) {
    const size_t t = blockIdx.x;
    const int slot = slot_mapping[t];
    if (slot < 0) {
        return;  // padding token
    }
    const int block = slot / block_size;
    const int off = slot - block * block_size;
    const int width = (num_heads + 2 * num_kv_heads) * head_size;
    const bf16* k = qkv + t * width + num_heads * head_size;
    const bf16* v = k + num_kv_heads * head_size;
    for (int i = threadIdx.x; i < num_kv_heads * head_size; i += blockDim.x) {
        const int h = i / head_size;
        const int d = i - h * head_size;
        const size_t tile = ((size_t)block * num_kv_heads + h) * head_size * block_size;
        key_cache[tile + (size_t)(d / SY_X) * block_size * SY_X + off * SY_X + d % SY_X] = k[i];
        value_cache[tile + (size_t)d * block_size + off] = v[i];
    }
}

// qkv_bias_rope + reshape_and_cache in one launch: bias and rotary embedding on Q (in place; the
// attention kernel reads Q from the QKV buffer) and on K, which goes with V (+ bias) straight
// into its cache slot instead of back into the QKV buffer and out again. Every value is rounded
// to bf16 exactly where the two kernels round it, so the cache and Q are bit-identical
// (emulate.rs pins it). grid: tokens; shared: none.
extern "C" __global__ void qkv_bias_rope_cache(bf16* __restrict__ qkv,
                                               const bf16* __restrict__ bias,
                                               const float* __restrict__ cos_sin,
                                               const int* __restrict__ positions,
                                               bf16* __restrict__ key_cache,
                                               bf16* __restrict__ value_cache,
                                               const int* __restrict__ slot_mapping,
                                               int num_heads, int num_kv_heads, int head_size,
                                               int block_size) {
    const size_t t = blockIdx.x;
    const int width = (num_heads + 2 * num_kv_heads) * head_size;
    const int half = head_size / 2;
    bf16* row = qkv + t * width;
    const float* cs = cos_sin + (size_t)positions[t] * head_size;
    const int slot = slot_mapping[t];
    const int block = slot / block_size;
    const int off = slot - block * block_size;
    // Q heads, then K heads: rotate-half pairs (i, i + half).
    for (int p = threadIdx.x; p < (num_heads + num_kv_heads) * half; p += blockDim.x) {
        const int h = p / half;
        const int i = p - h * half;
        const int a = h * head_size + i;
        const int b = a + half;
        const float x1 = bf2f(row[a]) + bf2f(bias[a]);
        const float x2 = bf2f(row[b]) + bf2f(bias[b]);
        const float c = cs[2 * i];
        const float s = cs[2 * i + 1];
        const bf16 ra = f2bf(x1 * c - x2 * s);
        const bf16 rb = f2bf(x2 * c + x1 * s);
        if (h < num_heads) {
            row[a] = ra;
            row[b] = rb;
        } else if (slot >= 0) {
            const int kh = h - num_heads;
            const size_t tile = ((size_t)block * num_kv_heads + kh) * head_size * block_size;
            key_cache[tile + (size_t)(i / SY_X) * block_size * SY_X + off * SY_X + i % SY_X] = ra;
            const int j = i + half;
            key_cache[tile + (size_t)(j / SY_X) * block_size * SY_X + off * SY_X + j % SY_X] = rb;
        }
    }
    if (slot < 0) {
        return;  // padding token: Q is done, nothing to cache
    }
    const int v0 = (num_heads + num_kv_heads) * head_size;
    for (int i = threadIdx.x; i < num_kv_heads * head_size; i += blockDim.x) {
        const int h = i / head_size;
        const int d = i - h * head_size;
        const size_t tile = ((size_t)block * num_kv_heads + h) * head_size * block_size;
        value_cache[tile + (size_t)d * block_size + off] =
            f2bf(bf2f(row[v0 + i]) + bf2f(bias[v0 + i]));
    }
}
