// Paged attention over query rows (decode: one row per sequence; prefill and chunked prefill:
// one row per new token, causal because row j of a chunk sees keys 0 ..= context_len + j).
//
// grid (num_kv_heads, rows, partitions), SY_ATTN_THREADS threads. One block serves every query
// head of its KV head's group (GQA), so each K/V tile is read from memory once rather than once
// per query head: at Qwen2.5-7B's 7 heads per KV head, a block per query head was bound by L2
// traffic at ~30% of the copy bandwidth.
//
// Keys are split into `partition_size`-key partitions (flash-decoding / split-K; a multiple of
// 64 up to SY_PARTITION_SIZE, chosen per launch by launch.rs::choose_partition_size so a short
// batch still spreads over every SM): with one partition the kernel normalises and writes bf16
// output directly; with more, each block writes its normalised partial output plus its max
// logit and exp-sum, and `paged_attention_reduce` combines them.
//
// Shared memory (sized by launch.rs::attention_shared_bytes):
//   logits[group][logits_len rounded up to 4] | spare[warps] | stats[2][SY_MAX_GROUP] |
//   vacc[group][threads]   (Q, pre-scaled, is staged in vacc while the logits are computed)
// plus a static table of the partition's block ids.

#define SY_WARPS (SY_ATTN_THREADS / 32)
#if SY_MAX_GROUP > SY_WARPS
#error "the softmax step gives each head of a group its own warp"
#endif
#if SY_X != 8
#error "dot8 loads assume 8 bf16 per key-layout group (SY_X)"
#endif

// dot of 8 floats in registers with 8 floats in shared memory (two 16-byte loads).
__device__ __forceinline__ float dot8_smem(const float* f, const float* s) {
    const float4 a = *reinterpret_cast<const float4*>(s);
    const float4 b = *reinterpret_cast<const float4*>(s + 4);
    return f[0] * a.x + f[1] * a.y + f[2] * a.z + f[3] * a.w + f[4] * b.x + f[5] * b.y +
           f[6] * b.z + f[7] * b.w;
}

template <int D>
__device__ __forceinline__ void paged_attention_impl(
    bf16* __restrict__ out, float* __restrict__ tmp_out, float* __restrict__ max_logits,
    float* __restrict__ exp_sums, const bf16* __restrict__ qkv,
    const bf16* __restrict__ key_cache, const bf16* __restrict__ value_cache,
    const int* __restrict__ block_tables, const int* __restrict__ row_seq,
    const int* __restrict__ row_keys, int num_kv_heads, int group, int block_size,
    int max_blocks, float scale, int logits_len, int partition_size) {
    constexpr int V_GROUPS = SY_ATTN_THREADS / D;  // thread groups splitting keys for V
    const int kv_head = blockIdx.x;
    const int row = blockIdx.y;
    const int part = blockIdx.z;
    const int num_heads = num_kv_heads * group;
    const int num_parts = gridDim.z;
    const int tid = threadIdx.x;

    const int n_keys = row_keys[row];
    const int start = part * partition_size;
    if (start >= n_keys) {
        return;  // this row needs fewer partitions than the longest one (or is padding)
    }
    const int n = min(start + partition_size, n_keys) - start;
    const size_t tile_len = (size_t)D * block_size;

    // Each head's logits row is padded to a multiple of 4 floats so every area below starts
    // 16-byte aligned for float4 reads.
    const int lstride = (logits_len + 3) & ~3;
    extern __shared__ float smem[];
    float* logits = smem;
    float* scratch = logits + group * lstride;
    float* stats = scratch + SY_WARPS;
    float* vacc = stats + 2 * SY_MAX_GROUP;
    // The partition's block ids, read once: both passes look one up per key or 8-key chunk.
    __shared__ int btab[SY_PARTITION_SIZE + 1];
    const int first_block = start / block_size;
    const int n_blocks = (start + n - 1) / block_size - first_block + 1;
    const int* table = block_tables + (size_t)row_seq[row] * max_blocks + first_block;
    for (int i = tid; i < n_blocks; i += SY_ATTN_THREADS) {
        btab[i] = table[i];
    }

    // The group's Q rows are adjacent in the fused QKV row: stage them pre-scaled.
    const int qkv_stride = (num_heads + 2 * num_kv_heads) * D;
    const bf16* q = qkv + (size_t)row * qkv_stride + (size_t)kv_head * group * D;
    float* qs = vacc;
    for (int i = tid; i < group * D; i += SY_ATTN_THREADS) {
        qs[i] = bf2f(q[i]) * scale;
    }
    __syncthreads();

    // Q·K: one thread per key, every head of the group. In the [D/X][block][X] key layout the
    // X = 8 dims of one key are 16 contiguous bytes and consecutive keys of a block are adjacent,
    // so a warp's loads of one dim group cover whole 256-byte runs (fully coalesced).
    for (int t = tid; t < n; t += SY_ATTN_THREADS) {
        const int k = start + t;
        const int bi = k / block_size;
        const int off = k - bi * block_size;
        const uint4* kp = reinterpret_cast<const uint4*>(
            key_cache + ((size_t)btab[bi - first_block] * num_kv_heads + kv_head) * tile_len +
            (size_t)off * SY_X);
        float dots[SY_MAX_GROUP];
#pragma unroll
        for (int h = 0; h < SY_MAX_GROUP; ++h) {
            dots[h] = 0.f;
        }
        // Eight 16-byte loads in flight, then their math: enough memory parallelism while the
        // register count stays within the occupancy bound set by __launch_bounds__ (holding all
        // D / 8 loads took 115 registers and capped occupancy at 25%).
#pragma unroll
        for (int c0 = 0; c0 < D / SY_X; c0 += 8) {
            uint4 kw[8];
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                kw[c] = kp[(size_t)(c0 + c) * block_size];
            }
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                float kf[8];
                unpack8(kw[c], kf);
#pragma unroll
                for (int h = 0; h < SY_MAX_GROUP; ++h) {
                    if (h < group) {
                        dots[h] += dot8_smem(kf, qs + h * D + (c0 + c) * SY_X);
                    }
                }
            }
        }
#pragma unroll
        for (int h = 0; h < SY_MAX_GROUP; ++h) {
            if (h < group) {
                logits[h * lstride + t] = dots[h];
            }
        }
    }
    __syncthreads();

    // Softmax over the partition: one warp per head (group ≤ SY_MAX_GROUP ≤ warps), shuffles
    // only, so the whole step costs one barrier instead of four per head.
    const int lane = tid & 31;
    for (int h = tid >> 5; h < group; h += SY_WARPS) {
        float* lg = logits + h * lstride;
        float m = __int_as_float(0xff800000);
        for (int t = lane; t < n; t += 32) {
            m = fmaxf(m, lg[t]);
        }
        m = warp_max(m);
        float s = 0.f;
        for (int t = lane; t < n; t += 32) {
            const float e = __expf(lg[t] - m);
            lg[t] = e;
            s += e;
        }
        s = warp_sum(s);
        if (lane == 0) {
            stats[h] = m;
            stats[SY_MAX_GROUP + h] = s;
        }
    }
    __syncthreads();

    // P·V: thread (g, d) owns dim d over 8-key chunks g, g + V_GROUPS, ... of the partition. A
    // value tile stores each dim's block_size tokens contiguously, so one 16-byte load brings a
    // chunk and a warp's 32 dims read one contiguous run of the tile.
    const int g = tid / D;
    const int d = tid - g * D;
    float acc[SY_MAX_GROUP];
#pragma unroll
    for (int h = 0; h < SY_MAX_GROUP; ++h) {
        acc[h] = 0.f;
    }
    // 8-key chunks never straddle a block when block_size is a multiple of 8 (partition starts
    // are multiples of 64).
    const int full_chunks = (block_size & 7) == 0 ? n / 8 : 0;
#pragma unroll 8
    for (int c = g; c < full_chunks; c += V_GROUPS) {
        const int k = start + c * 8;
        const int bi = k / block_size;
        const int off = k - bi * block_size;
        const bf16* vp = value_cache +
                         ((size_t)btab[bi - first_block] * num_kv_heads + kv_head) * tile_len +
                         (size_t)d * block_size + off;
        float vf[8];
        unpack8(*reinterpret_cast<const uint4*>(vp), vf);
#pragma unroll
        for (int h = 0; h < SY_MAX_GROUP; ++h) {
            if (h < group) {
                acc[h] += dot8_smem(vf, logits + h * lstride + c * 8);
            }
        }
    }
    for (int t = full_chunks * 8 + g; t < n; t += V_GROUPS) {
        const int k = start + t;
        const int bi = k / block_size;
        const int off = k - bi * block_size;
        const float v = bf2f(value_cache[((size_t)btab[bi - first_block] * num_kv_heads + kv_head) *
                                             tile_len +
                                         (size_t)d * block_size + off]);
#pragma unroll
        for (int h = 0; h < SY_MAX_GROUP; ++h) {
            if (h < group) {
                acc[h] += logits[h * lstride + t] * v;
            }
        }
    }
#pragma unroll
    for (int h = 0; h < SY_MAX_GROUP; ++h) {
        if (h < group) {
            vacc[(g * group + h) * D + d] = acc[h];
        }
    }
    __syncthreads();
    for (int i = tid; i < group * D; i += SY_ATTN_THREADS) {
        const int h = i / D;
        const int dd = i - h * D;
        float o = 0.f;
#pragma unroll
        for (int j = 0; j < V_GROUPS; ++j) {
            o += vacc[(j * group + h) * D + dd];
        }
        const float s = stats[SY_MAX_GROUP + h];
        o /= s;
        const size_t rh = (size_t)row * num_heads + kv_head * group + h;
        if (num_parts == 1) {
            out[rh * D + dd] = f2bf(o);
        } else {
            tmp_out[(rh * num_parts + part) * D + dd] = o;
            if (dd == 0) {
                max_logits[rh * num_parts + part] = stats[h];
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
    const int* __restrict__ row_keys, int num_parts, int partition_size) {
    extern __shared__ float weights[];
    const int head = blockIdx.x;
    const int row = blockIdx.y;
    const int num_heads = gridDim.x;
    const int tid = threadIdx.x;
    // The row's own partitions (num_parts, the buffer stride, covers the longest row; a padding
    // row of a CUDA-graph bucket has 0 keys and its output is never read).
    const int parts = (row_keys[row] + partition_size - 1) / partition_size;
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
    // total is 0 only for a 0-key padding row (CUDA-graph bucket): write 0, not 0/0.
    out[rh * D + tid] = f2bf(total > 0.f ? o / total : 0.f);
}

#define SY_ATTENTION_ENTRY(D)                                                                   \
    extern "C" __global__ void __launch_bounds__(SY_ATTN_THREADS, 3) paged_attention_d##D(        \
        bf16* out, float* tmp_out, float* max_logits, float* exp_sums, const bf16* qkv,        \
        const bf16* key_cache, const bf16* value_cache, const int* block_tables,               \
        const int* row_seq, const int* row_keys, int num_kv_heads, int group, int block_size,  \
        int max_blocks, float scale, int logits_len, int partition_size) {                     \
        paged_attention_impl<D>(out, tmp_out, max_logits, exp_sums, qkv, key_cache,            \
                                value_cache, block_tables, row_seq, row_keys, num_kv_heads,    \
                                group, block_size, max_blocks, scale, logits_len,              \
                                partition_size);                                               \
    }                                                                                          \
    extern "C" __global__ void paged_attention_reduce_d##D(                                    \
        bf16* out, const float* tmp_out, const float* max_logits, const float* exp_sums,       \
        const int* row_keys, int num_parts, int partition_size) {                              \
        paged_attention_reduce_impl<D>(out, tmp_out, max_logits, exp_sums, row_keys,           \
                                       num_parts, partition_size);                             \
    }

SY_ATTENTION_ENTRY(64)
SY_ATTENTION_ENTRY(128)
