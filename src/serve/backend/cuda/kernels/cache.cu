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
