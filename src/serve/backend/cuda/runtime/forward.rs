//! The forward pass of one step over the uploaded arrays: embedding, per layer the fused
//! QKV projection, RoPE into the cache, split-K paged attention, the o projection, fused
//! residual + RMSNorm, the MLP, then the final norm on the logits rows and the lm_head.

use cudarc::driver::PushKernelArg;

use super::{cfg, drv, i32_of, AttnMode, Gpu};
use crate::serve::backend::cuda::launch::{self, AttentionShape};
use crate::serve::backend::cuda::memory;
use crate::serve::backend::cuda::CudaError;

impl Gpu {
    /// The whole forward of `t` token rows with `l` logits rows, from the uploaded arrays.
    /// Captures cleanly into a graph in `Fixed` mode: no allocation, no host copy, no sync.
    #[allow(unsafe_code)]
    pub(super) fn forward(&mut self, t: usize, l: usize, mode: AttnMode) -> Result<(), CudaError> {
        let Gpu {
            stream: s,
            blas,
            k,
            dims: d,
            eps,
            block_size,
            sm_count,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            ws,
            buf: b,
            kv,
            packed: p,
            block_tables,
            graph,
            ..
        } = self;
        let d = *d;
        let (h, hq, hkv, hd) = (d.hidden, d.num_heads, d.num_kv_heads, d.head_size);
        let (hidden_i, hq_i, hkv_i, hd_i) = (
            i32_of(h, "hidden")?,
            i32_of(hq, "heads")?,
            i32_of(hkv, "kv heads")?,
            i32_of(hd, "head size")?,
        );
        let inter_i = i32_of(d.intermediate, "intermediate")?;
        let t_i = i32_of(t, "tokens")?;
        let bs_i = i32_of(*block_size, "block size")?;
        let (zero, one) = (0i32, 1i32);
        let eps = *eps;
        let scale = 1.0f32 / (hd as f32).sqrt();
        let row = launch::row_launch(t)?;
        let no_smem = launch::Launch {
            shared_mem_bytes: 0,
            ..row
        };
        let (bt, max_blocks) = match mode {
            AttnMode::Eager => (
                block_tables
                    .as_ref()
                    .ok_or_else(|| CudaError::Launch("block table buffer missing".into()))?,
                p.max_blocks,
            ),
            AttnMode::Fixed(_) => {
                let g = graph
                    .as_ref()
                    .ok_or_else(|| CudaError::Launch("graphs are off".into()))?;
                (&g.tables, g.stride)
            }
        };
        let max_blocks_i = i32_of(max_blocks, "max blocks")?;
        let Some(first) = layers.first() else {
            return Err(CudaError::Config("model has no layers".into()));
        };

        // SAFETY (every launch below): argument lists match the kernel signatures in
        // kernels/*.cu argument by argument; buffers were sized by `Workspace` for up to
        // `max_tokens` rows and `pack` bounds every index the kernels read (tokens < vocab,
        // positions < rope rows, slots and blocks < num_blocks, rows < tokens); padded graph
        // rows read token 0, position 0, no slot and no keys.
        unsafe {
            s.launch_builder(&k.embedding_gather)
                .arg(&mut b.hidden)
                .arg(&*embed)
                .arg(&b.token_ids)
                .arg(&hidden_i)
                .launch(cfg(no_smem))
                .map_err(drv)?;
            s.launch_builder(&k.rms_norm)
                .arg(&mut b.normed)
                .arg(&b.hidden)
                .arg(&first.input_norm)
                .arg(&b.logits_rows)
                .arg(&zero)
                .arg(&hidden_i)
                .arg(&eps)
                .launch(cfg(row))
                .map_err(drv)?;
        }
        for li in 0..layers.len() {
            let layer = &layers[li];
            let (kc, vc) = &mut kv[li];
            Self::linear(
                blas,
                s,
                k,
                &mut b.fp8_scratch,
                &mut b.qkv,
                false,
                &layer.qkv,
                &b.normed,
                t,
                d.qkv_width(),
                h,
            )?;
            unsafe {
                s.launch_builder(&k.qkv_bias_rope_cache)
                    .arg(&mut b.qkv)
                    .arg(&layer.qkv_bias)
                    .arg(&*rope)
                    .arg(&b.positions)
                    .arg(&mut *kc)
                    .arg(&mut *vc)
                    .arg(&b.slots)
                    .arg(&hq_i)
                    .arg(&hkv_i)
                    .arg(&hd_i)
                    .arg(&bs_i)
                    .launch(cfg(no_smem))
                    .map_err(drv)?;
            }
            // Attention in row chunks so the flash-decoding partials fit the workspace; each
            // chunk split over its context (split-K) so short batches fill the device.
            let chunk = match mode {
                AttnMode::Eager => {
                    memory::rows_per_attention_launch(p.max_keys, ws.partial_capacity)
                        .min(t)
                        // grid.y limit of the attention launch.
                        .min(65_535)
                }
                AttnMode::Fixed(_) => t,
            };
            let mut r0 = 0;
            while r0 < t {
                let rows = chunk.min(t - r0);
                let plan = match mode {
                    AttnMode::Eager => {
                        let max_keys = p.row_keys[r0..r0 + rows]
                            .iter()
                            .copied()
                            .max()
                            .unwrap_or(1)
                            .max(1) as usize;
                        let shape = AttentionShape {
                            num_heads: hq,
                            num_kv_heads: hkv,
                            head_size: hd,
                            num_rows: rows,
                            max_keys,
                        };
                        let part = launch::choose_partition_size(
                            hkv,
                            rows,
                            max_keys,
                            *sm_count,
                            ws.partial_capacity,
                        );
                        launch::plan_attention_split(&shape, part)?
                    }
                    AttnMode::Fixed(key) => {
                        let shape = AttentionShape {
                            num_heads: hq,
                            num_kv_heads: hkv,
                            head_size: hd,
                            num_rows: rows,
                            max_keys: key.num_partitions * key.partition_size,
                        };
                        launch::plan_attention_split(&shape, key.partition_size)?
                    }
                };
                if plan.num_partitions > 1 && rows * plan.num_partitions > ws.partial_capacity {
                    return Err(CudaError::Launch(format!(
                        "{rows} rows × {} partitions exceed the partial buffers",
                        plan.num_partitions
                    )));
                }
                let logits_len = i32_of(plan.logits_len, "logits")?;
                let part_i = i32_of(plan.partition_size, "partition size")?;
                let parts_i = i32_of(plan.num_partitions, "partitions")?;
                let group = i32_of(plan.group_size, "group")?;
                let width = d.qkv_width();
                let mut out_view = b.attn.slice_mut(r0 * hq * hd..(r0 + rows) * hq * hd);
                let qkv_view = b.qkv.slice(r0 * width..(r0 + rows) * width);
                let seq_view = b.row_seq.slice(r0..r0 + rows);
                let keys_view = b.row_keys.slice(r0..r0 + rows);
                unsafe {
                    s.launch_builder(&k.attention)
                        .arg(&mut out_view)
                        .arg(&mut b.partial_out)
                        .arg(&mut b.max_logits)
                        .arg(&mut b.exp_sums)
                        .arg(&qkv_view)
                        .arg(&*kc)
                        .arg(&*vc)
                        .arg(bt)
                        .arg(&seq_view)
                        .arg(&keys_view)
                        .arg(&hkv_i)
                        .arg(&group)
                        .arg(&bs_i)
                        .arg(&max_blocks_i)
                        .arg(&scale)
                        .arg(&logits_len)
                        .arg(&part_i)
                        .launch(cfg(plan.main))
                        .map_err(drv)?;
                    if let Some(red) = plan.reduce {
                        s.launch_builder(&k.reduce)
                            .arg(&mut out_view)
                            .arg(&b.partial_out)
                            .arg(&b.max_logits)
                            .arg(&b.exp_sums)
                            .arg(&keys_view)
                            .arg(&parts_i)
                            .arg(&part_i)
                            .launch(cfg(red))
                            .map_err(drv)?;
                    }
                }
                r0 += rows;
            }
            Self::linear(
                blas,
                s,
                k,
                &mut b.fp8_scratch,
                &mut b.branch,
                false,
                &layer.o_proj,
                &b.attn,
                t,
                h,
                hq * hd,
            )?;
            unsafe {
                s.launch_builder(&k.fused_add_rms_norm)
                    .arg(&mut b.normed)
                    .arg(&mut b.hidden)
                    .arg(&b.branch)
                    .arg(&layer.post_norm)
                    .arg(&hidden_i)
                    .arg(&eps)
                    .launch(cfg(row))
                    .map_err(drv)?;
            }
            Self::linear(
                blas,
                s,
                k,
                &mut b.fp8_scratch,
                &mut b.gate_up,
                false,
                &layer.gate_up,
                &b.normed,
                t,
                2 * d.intermediate,
                h,
            )?;
            unsafe {
                s.launch_builder(&k.silu_and_mul)
                    .arg(&mut b.act)
                    .arg(&b.gate_up)
                    .arg(&t_i)
                    .arg(&inter_i)
                    .launch(cfg(launch::elementwise_launch(t * d.intermediate)?))
                    .map_err(drv)?;
            }
            Self::linear(
                blas,
                s,
                k,
                &mut b.fp8_scratch,
                &mut b.branch,
                false,
                &layer.down,
                &b.act,
                t,
                h,
                d.intermediate,
            )?;
            // The MLP residual, fused with the next layer's input norm; the last layer's goes
            // alone (the final norm runs on the logits rows only).
            match layers.get(li + 1) {
                Some(next) => unsafe {
                    s.launch_builder(&k.fused_add_rms_norm)
                        .arg(&mut b.normed)
                        .arg(&mut b.hidden)
                        .arg(&b.branch)
                        .arg(&next.input_norm)
                        .arg(&hidden_i)
                        .arg(&eps)
                        .launch(cfg(row))
                        .map_err(drv)?;
                },
                None => {
                    let n_res = i32_of(t * h, "residual elements")?;
                    unsafe {
                        s.launch_builder(&k.residual_add)
                            .arg(&mut b.hidden)
                            .arg(&b.branch)
                            .arg(&n_res)
                            .launch(cfg(launch::elementwise_launch(t * h)?))
                            .map_err(drv)?;
                    }
                }
            }
        }
        if l == 0 {
            return Ok(());
        }
        unsafe {
            s.launch_builder(&k.rms_norm)
                .arg(&mut b.final_normed)
                .arg(&b.hidden)
                .arg(&*norm)
                .arg(&b.logits_rows)
                .arg(&one)
                .arg(&hidden_i)
                .arg(&eps)
                .launch(cfg(launch::row_launch(l)?))
                .map_err(drv)?;
        }
        match lm_head {
            Some(w) => Self::linear(
                blas,
                s,
                k,
                &mut b.fp8_scratch,
                &mut b.logits,
                true,
                w,
                &b.final_normed,
                l,
                d.vocab,
                h,
            ),
            None => Self::gemm(
                blas,
                s,
                &mut b.logits,
                true,
                &*embed,
                &b.final_normed,
                l,
                d.vocab,
                h,
                d.vocab,
            ),
        }
    }
}
