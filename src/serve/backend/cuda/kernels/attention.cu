// Paged attention over query rows (decode: one row per sequence; prefill and chunked prefill:
// one row per new token, causal because row j of a chunk sees keys 0 ..= context_len + j).
//
// grid (num_heads, rows, partitions), SY_ATTN_THREADS threads. Keys are split into SY_PARTITION
// -key partitions (flash-decoding): with one partition the kernel normalises and writes bf16
// output directly; with more, each block writes its normalised partial output plus its max
// logit and exp-sum, and `paged_attention_reduce` rescales and combines them.
//
// Shared memory (sized by launch.rs::attention_shared_bytes):
//   logits[logits_len] | warp_max[warps] | warp_sum[warps] | vacc[v_groups * D]

#define SY_WARPS (SY_ATTN_THREADS / 32)

template <int D>
__device__ __forceinline__ void paged_attention_impl(
    bf16* __restrict__ out, float* __restrict__ tmp_out, float* __restrict__ max_logits,
    float* __restrict__ exp_sums, const bf16* __restrict__ qkv,
    const bf16* __restrict__ key_cache, const bf16* __restrict__ value_cache,
    const int* __restrict__ block_tables, const int* __restrict__ row_seq,
    const int* __restrict__ row_keys, int num_kv_heads, int block_size, int max_blocks,
    float scale, int logits_len) {
    constexpr int DPL = D / 32;                  // dims per lane in Q·K
    constexpr int V_GROUPS = SY_ATTN_THREADS / D;  // threads groups splitting keys for V
    const int head = blockIdx.x;
    const int row = blockIdx.y;
    const int part = blockIdx.z;
    const int num_heads = gridDim.x;
    const int num_parts = gridDim.z;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    const int n_keys = row_keys[row];
    const int start = part * SY_PARTITION_SIZE;
    if (start >= n_keys) {
        return;  // this row needs fewer partitions than the longest one
    }
    const int n = min(start + SY_PARTITION_SIZE, n_keys) - start;
    const int kv_head = head / (num_heads / num_kv_heads);
    const int* table = block_tables + (size_t)row_seq[row] * max_blocks;
    const size_t tile_len = (size_t)D * block_size;

    extern __shared__ float smem[];
    float* logits = smem;
    float* red_max = logits + logits_len;
    float* red_sum = red_max + SY_WARPS;
    float* vacc = red_sum + SY_WARPS;

    // Q slice of this lane, pre-scaled.
    const int qkv_stride = (num_heads + 2 * num_kv_heads) * D;
    const bf16* q = qkv + (size_t)row * qkv_stride + head * D;
    float qr[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
        qr[i] = bf2f(q[lane * DPL + i]) * scale;
    }

    // Q·K: one warp per key, lanes over dims.
    for (int t = warp; t < n; t += SY_WARPS) {
        const int k = start + t;
        const int b = table[k / block_size];
        const int off = k - (k / block_size) * block_size;
        const bf16* kp = key_cache + ((size_t)b * num_kv_heads + kv_head) * tile_len;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            const int d = lane * DPL + i;
            dot += qr[i] * bf2f(kp[(d / SY_X) * block_size * SY_X + off * SY_X + d % SY_X]);
        }
        dot = warp_sum(dot);
        if (lane == 0) {
            logits[t] = dot;
        }
    }
    __syncthreads();

    // Softmax over the partition.
    float m = __int_as_float(0xff800000);
    for (int t = tid; t < n; t += SY_ATTN_THREADS) {
        m = fmaxf(m, logits[t]);
    }
    m = warp_max(m);
    if (lane == 0) {
        red_max[warp] = m;
    }
    __syncthreads();
    m = red_max[0];
#pragma unroll
    for (int w = 1; w < SY_WARPS; ++w) {
        m = fmaxf(m, red_max[w]);
    }
    float s = 0.f;
    for (int t = tid; t < n; t += SY_ATTN_THREADS) {
        const float e = __expf(logits[t] - m);
        logits[t] = e;
        s += e;
    }
    s = warp_sum(s);
    if (lane == 0) {
        red_sum[warp] = s;
    }
    __syncthreads();
    s = 0.f;
#pragma unroll
    for (int w = 0; w < SY_WARPS; ++w) {
        s += red_sum[w];
    }

    // P·V: thread (g, d) sums keys g, g + V_GROUPS, ...; value rows are contiguous per dim.
    const int g = tid / D;
    const int d = tid - g * D;
    float acc = 0.f;
    for (int t = g; t < n; t += V_GROUPS) {
        const int k = start + t;
        const int b = table[k / block_size];
        const int off = k - (k / block_size) * block_size;
        const bf16* vp = value_cache + ((size_t)b * num_kv_heads + kv_head) * tile_len;
        acc += logits[t] * bf2f(vp[(size_t)d * block_size + off]);
    }
    vacc[g * D + d] = acc;
    __syncthreads();
    if (tid < D) {
        float o = 0.f;
#pragma unroll
        for (int j = 0; j < V_GROUPS; ++j) {
            o += vacc[j * D + tid];
        }
        o /= s;
        const size_t rh = (size_t)row * num_heads + head;
        if (num_parts == 1) {
            out[rh * D + tid] = f2bf(o);
        } else {
            tmp_out[(rh * num_parts + part) * D + tid] = o;
            if (tid == 0) {
                max_logits[rh * num_parts + part] = m;
                exp_sums[rh * num_parts + part] = s;
            }
        }
    }
}

// Combines partitions: weight_p = exp_sum_p · exp(max_p − max) over the row's own partitions.
// grid (num_heads, rows), D threads; shared: 2 × partitions floats.
template <int D>
__device__ __forceinline__ void paged_attention_reduce_impl(
    bf16* __restrict__ out, const float* __restrict__ tmp_out,
    const float* __restrict__ max_logits, const float* __restrict__ exp_sums,
    const int* __restrict__ row_keys, int num_parts) {
    extern __shared__ float weights[];
    const int head = blockIdx.x;
    const int row = blockIdx.y;
    const int num_heads = gridDim.x;
    const int tid = threadIdx.x;
    const int parts = (row_keys[row] + SY_PARTITION_SIZE - 1) / SY_PARTITION_SIZE;
    const size_t rh = (size_t)row * num_heads + head;
    const float* ml = max_logits + rh * num_parts;
    const float* es = exp_sums + rh * num_parts;
    float m = __int_as_float(0xff800000);
    for (int p = 0; p < parts; ++p) {
        m = fmaxf(m, ml[p]);
    }
    for (int p = tid; p < parts; p += blockDim.x) {
        weights[p] = es[p] * __expf(ml[p] - m);
    }
    __syncthreads();
    float total = 0.f;
    float o = 0.f;
    for (int p = 0; p < parts; ++p) {
        total += weights[p];
        o += weights[p] * tmp_out[(rh * num_parts + p) * D + tid];
    }
    out[rh * D + tid] = f2bf(o / total);
}

#define SY_ATTENTION_ENTRY(D)                                                                   \
    extern "C" __global__ void __launch_bounds__(SY_ATTN_THREADS) paged_attention_d##D(        \
        bf16* out, float* tmp_out, float* max_logits, float* exp_sums, const bf16* qkv,        \
        const bf16* key_cache, const bf16* value_cache, const int* block_tables,               \
        const int* row_seq, const int* row_keys, int num_kv_heads, int block_size,             \
        int max_blocks, float scale, int logits_len) {                                         \
        paged_attention_impl<D>(out, tmp_out, max_logits, exp_sums, qkv, key_cache,            \
                                value_cache, block_tables, row_seq, row_keys, num_kv_heads,    \
                                block_size, max_blocks, scale, logits_len);                    \
    }                                                                                          \
    extern "C" __global__ void paged_attention_reduce_d##D(                                    \
        bf16* out, const float* tmp_out, const float* max_logits, const float* exp_sums,       \
        const int* row_keys, int num_parts) {                                                  \
        paged_attention_reduce_impl<D>(out, tmp_out, max_logits, exp_sums, row_keys,           \
                                       num_parts);                                             \
    }

SY_ATTENTION_ENTRY(64)
SY_ATTENTION_ENTRY(128)
