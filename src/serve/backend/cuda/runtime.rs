//! Device side of the CUDA backend: context and stream, kernel module (NVRTC + CUBIN cache),
//! weights and KV cache in device memory, and the per-step forward over a packed batch.
//!
//! Per layer: `rms_norm → GEMM qkv → qkv_bias_rope → reshape_and_cache → paged_attention
//! (→ reduce) → GEMM o → residual_add → rms_norm → GEMM gate_up → silu_and_mul → GEMM down →
//! residual_add`; then the final norm on the logits rows only and the lm_head GEMM straight
//! into f32 logits, copied out for the engine to sample.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DriverError, LaunchConfig, PushKernelArg,
};

use super::compile::{compile_cubin, ComputeCapability, KernelCache};
use super::launch::{self, AttentionShape, Launch};
use super::memory::{self, Dims, Workspace};
use super::pack::{PackLimits, PackedBatch};
use super::weights::{self, Bf16Store};
use super::{CudaError, CudaOptions};
use crate::serve::backend::{KvSpec, StepBatch, StepOutput};
use crate::serve::model::ModelConfig;

fn drv(e: DriverError) -> CudaError {
    CudaError::Driver(e.to_string())
}

fn cfg(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: l.grid,
        block_dim: l.block,
        shared_mem_bytes: l.shared_mem_bytes,
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Launch(format!("{what} {v} exceeds i32")))
}

struct Kernels {
    embedding_gather: CudaFunction,
    rms_norm: CudaFunction,
    qkv_bias_rope: CudaFunction,
    silu_and_mul: CudaFunction,
    residual_add: CudaFunction,
    reshape_and_cache: CudaFunction,
    attention: CudaFunction,
    reduce: CudaFunction,
    _module: Arc<CudaModule>,
}

struct Layer {
    input_norm: CudaSlice<u16>,
    qkv: CudaSlice<u16>,
    qkv_bias: CudaSlice<u16>,
    o_proj: CudaSlice<u16>,
    post_norm: CudaSlice<u16>,
    gate_up: CudaSlice<u16>,
    down: CudaSlice<u16>,
}

struct Buffers {
    hidden: CudaSlice<f32>,
    normed: CudaSlice<u16>,
    qkv: CudaSlice<u16>,
    attn: CudaSlice<u16>,
    branch: CudaSlice<u16>,
    gate_up: CudaSlice<u16>,
    act: CudaSlice<u16>,
    final_normed: CudaSlice<u16>,
    logits: CudaSlice<f32>,
    partial_out: CudaSlice<f32>,
    max_logits: CudaSlice<f32>,
    exp_sums: CudaSlice<f32>,
    token_ids: CudaSlice<u32>,
    positions: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    row_seq: CudaSlice<i32>,
    row_keys: CudaSlice<i32>,
    logits_rows: CudaSlice<i32>,
}

pub(super) struct Gpu {
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    dims: Dims,
    eps: f32,
    block_size: usize,
    max_model_len: usize,
    embed: CudaSlice<u16>,
    layers: Vec<Layer>,
    norm: CudaSlice<u16>,
    lm_head: Option<CudaSlice<u16>>,
    rope: CudaSlice<f32>,
    ws: Workspace,
    buf: Buffers,
    /// Per layer (key, value) caches, allocated by `init_kv`.
    kv: Vec<(CudaSlice<u16>, CudaSlice<u16>)>,
    num_blocks: usize,
    budget_blocks: usize,
    packed: PackedBatch,
    block_tables: Option<CudaSlice<i32>>,
}

impl Gpu {
    pub fn new(dir: &Path, mc: ModelConfig, opts: &CudaOptions) -> Result<Gpu, CudaError> {
        let store = Bf16Store::load(dir)?;
        Self::with_store(mc, store, opts)
    }

    #[allow(unsafe_code)]
    pub fn with_store(
        mc: ModelConfig,
        mut store: Bf16Store,
        opts: &CudaOptions,
    ) -> Result<Gpu, CudaError> {
        let started = Instant::now();
        let ctx = CudaContext::new(opts.device).map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let cc = ComputeCapability {
            major: major.max(0) as u32,
            minor: minor.max(0) as u32,
        };
        if cc < ComputeCapability::MIN {
            return Err(CudaError::Unsupported(format!(
                "compute capability {major}.{minor} (need ≥ 7.0)"
            )));
        }
        // SAFETY: the backend uses this one stream for every allocation, copy and launch, so
        // cudarc's cross-stream event tracking (two event records per launch) is pure overhead.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let cache = opts.kernel_cache_dir.clone().map(KernelCache::new);
        let cubin = compile_cubin(cc, cache.as_ref())?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| {
                CudaError::Driver(format!(
                    "loading the compiled kernels failed ({e}); a CUBIN from a newer CUDA \
                     major version than the driver cannot load: match libnvrtc to the driver"
                ))
            })?;
        let head = mc.head_dim();
        let f = |n: &str| module.load_function(n).map_err(drv);
        let k = Kernels {
            embedding_gather: f("embedding_gather")?,
            rms_norm: f("rms_norm")?,
            qkv_bias_rope: f("qkv_bias_rope")?,
            silu_and_mul: f("silu_and_mul")?,
            residual_add: f("residual_add")?,
            reshape_and_cache: f("reshape_and_cache")?,
            attention: f(&format!("paged_attention_d{head}"))?,
            reduce: f(&format!("paged_attention_reduce_d{head}"))?,
            _module: module,
        };
        let blas =
            CudaBlas::new(Arc::clone(&stream)).map_err(|e| CudaError::Blas(e.to_string()))?;

        let dims = Dims {
            hidden: mc.hidden_size,
            intermediate: mc.intermediate_size,
            num_heads: mc.num_attention_heads,
            num_kv_heads: mc.num_key_value_heads,
            head_size: head,
            num_layers: mc.num_hidden_layers,
            vocab: mc.vocab_size,
        };
        let max_model_len = opts.max_model_len.unwrap_or(mc.max_position_embeddings);

        // Weights: bf16 on the host, uploaded a layer at a time (host copy dropped after).
        let up = |v: Vec<u16>| stream.clone_htod(&v).map_err(drv);
        let h = dims.hidden;
        let embed = up(store.take("model.embed_tokens.weight", &[dims.vocab, h])?)?;
        let mut layers = Vec::with_capacity(dims.num_layers);
        for i in 0..dims.num_layers {
            let l = weights::take_layer(&mut store, &mc, i)?;
            layers.push(Layer {
                input_norm: up(l.input_norm)?,
                qkv: up(l.qkv)?,
                qkv_bias: up(l.qkv_bias)?,
                o_proj: up(l.o_proj)?,
                post_norm: up(l.post_norm)?,
                gate_up: up(l.gate_up)?,
                down: up(l.down)?,
            });
        }
        let norm = up(store.take("model.norm.weight", &[h])?)?;
        let lm_head = if mc.tie_word_embeddings && !store.contains("lm_head.weight") {
            None
        } else {
            Some(up(store.take("lm_head.weight", &[dims.vocab, h])?)?)
        };
        drop(store);
        let rope = stream
            .clone_htod(&weights::rope_table(head, mc.rope_theta, max_model_len))
            .map_err(drv)?;

        let max_tokens = opts.max_num_batched_tokens;
        let max_logits = opts.max_num_seqs.min(max_tokens);
        let ws = Workspace::new(&dims, max_tokens, max_logits, max_model_len)?;
        let z16 = |n: usize| stream.alloc_zeros::<u16>(n.max(1)).map_err(drv);
        let z32 = |n: usize| stream.alloc_zeros::<f32>(n.max(1)).map_err(drv);
        let zi = |n: usize| stream.alloc_zeros::<i32>(n.max(1)).map_err(drv);
        let buf = Buffers {
            hidden: z32(ws.hidden)?,
            normed: z16(ws.normed)?,
            qkv: z16(ws.qkv)?,
            attn: z16(ws.attn)?,
            branch: z16(ws.normed)?,
            gate_up: z16(ws.gate_up)?,
            act: z16(ws.act)?,
            final_normed: z16(ws.final_normed)?,
            logits: z32(ws.logits)?,
            partial_out: z32(ws.partial_out)?,
            max_logits: z32(ws.partial_stats)?,
            exp_sums: z32(ws.partial_stats)?,
            token_ids: stream.alloc_zeros::<u32>(max_tokens).map_err(drv)?,
            positions: zi(max_tokens)?,
            slots: zi(max_tokens)?,
            row_seq: zi(max_tokens)?,
            row_keys: zi(max_tokens)?,
            logits_rows: zi(max_logits)?,
        };
        stream.synchronize().map_err(drv)?;
        // Measured, not computed: includes the context, cuBLAS workspace and allocator slack.
        let (free, total) = ctx.mem_get_info().map_err(drv)?;
        let used = total.saturating_sub(free);
        let block_bytes = dims.kv_block_bytes(opts.block_size);
        let budget_blocks = match opts.num_gpu_blocks_override {
            Some(n) => n,
            None => {
                memory::kv_blocks_for_budget(total, used, opts.gpu_memory_utilization, block_bytes)?
            }
        };
        tracing::info!(
            device = opts.device,
            arch = %cc.arch(),
            weights_gib = dims.weight_bytes(lm_head.is_none()) as f64 / (1u64 << 30) as f64,
            workspace_mib = ws.bytes() >> 20,
            kv_blocks = budget_blocks,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "cuda backend loaded"
        );
        Ok(Gpu {
            _ctx: ctx,
            stream,
            blas,
            k,
            dims,
            eps: mc.rms_norm_eps as f32,
            block_size: opts.block_size,
            max_model_len,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            ws,
            buf,
            kv: Vec::new(),
            num_blocks: 0,
            budget_blocks,
            packed: PackedBatch::default(),
            block_tables: None,
        })
    }

    pub fn kv_spec(&self) -> KvSpec {
        KvSpec {
            num_layers: self.dims.num_layers,
            num_kv_heads: self.dims.num_kv_heads,
            head_size: self.dims.head_size,
            block_size: self.block_size,
            bytes_per_block: self.dims.kv_block_bytes(self.block_size),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.dims.vocab
    }

    pub fn available_kv_blocks(&self) -> usize {
        self.budget_blocks
    }

    pub fn init_kv(&mut self, num_blocks: usize) -> Result<(), CudaError> {
        if num_blocks == 0 || num_blocks > self.budget_blocks {
            return Err(CudaError::OutOfMemory(format!(
                "{num_blocks} KV blocks requested, {} fit",
                self.budget_blocks
            )));
        }
        let per_layer = num_blocks * self.dims.num_kv_heads * self.dims.head_size * self.block_size;
        self.kv.clear();
        for _ in 0..self.dims.num_layers {
            let kc = self.stream.alloc_zeros::<u16>(per_layer).map_err(drv)?;
            let vc = self.stream.alloc_zeros::<u16>(per_layer).map_err(drv)?;
            self.kv.push((kc, vc));
        }
        self.num_blocks = num_blocks;
        tracing::info!(num_blocks, "cuda KV cache allocated");
        Ok(())
    }

    /// `out[T, n] = x[T, k] · w[n, k]ᵀ` with bf16 inputs and f32 accumulation; `out_f32` picks
    /// the output type (f32 for logits, else bf16).
    #[allow(unsafe_code, clippy::too_many_arguments)]
    fn gemm<W: DevicePtr<u16>, X: DevicePtr<u16>, O: DevicePtrMut<T>, T>(
        blas: &CudaBlas,
        stream: &CudaStream,
        out: &mut O,
        out_f32: bool,
        w: &W,
        x: &X,
        tokens: usize,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        let (m_, n_, k_) = (
            i32_of(n, "gemm n")?,
            i32_of(tokens, "gemm m")?,
            i32_of(k, "gemm k")?,
        );
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (wp, _gw) = w.device_ptr(stream);
        let (xp, _gx) = x.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let c_type = if out_f32 {
            blas_sys::cudaDataType::CUDA_R_32F
        } else {
            blas_sys::cudaDataType::CUDA_R_16BF
        };
        // Column-major view: C[n × T] = W[k × n]ᵀ · X[k × T].
        // SAFETY: the pointers come from live device slices sized by the caller for these
        // shapes (checked by the workspace sizing); the scalars outlive the call.
        unsafe {
            blas_result::gemm_ex(
                *blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m_,
                n_,
                k_,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k_,
                xp as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k_,
                (&beta) as *const f32 as *const _,
                op as *mut _,
                c_type,
                m_,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Blas(e.to_string()))
    }

    #[allow(unsafe_code)]
    pub fn execute(&mut self, batch: &StepBatch, out: &mut StepOutput) -> Result<(), CudaError> {
        if self.kv.is_empty() {
            return Err(CudaError::Config("KV cache not initialised".into()));
        }
        let lim = PackLimits {
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            vocab_size: self.dims.vocab,
            max_position: self.max_model_len,
            max_tokens: self.ws.max_tokens,
        };
        self.packed
            .pack(batch, &lim)
            .map_err(|e| CudaError::Launch(e.to_string()))?;
        let p = &self.packed;
        let t = p.token_ids.len();
        let l = p.logits_rows.len();
        if l > self.ws.max_logits {
            return Err(CudaError::Launch(format!(
                "{l} logits rows exceed {}",
                self.ws.max_logits
            )));
        }
        let s = &self.stream;
        let b = &mut self.buf;
        s.memcpy_htod(&p.token_ids, &mut b.token_ids.slice_mut(..t))
            .map_err(drv)?;
        s.memcpy_htod(&p.positions, &mut b.positions.slice_mut(..t))
            .map_err(drv)?;
        s.memcpy_htod(&p.slot_mapping, &mut b.slots.slice_mut(..t))
            .map_err(drv)?;
        s.memcpy_htod(&p.row_seq, &mut b.row_seq.slice_mut(..t))
            .map_err(drv)?;
        s.memcpy_htod(&p.row_keys, &mut b.row_keys.slice_mut(..t))
            .map_err(drv)?;
        if l > 0 {
            s.memcpy_htod(&p.logits_rows, &mut b.logits_rows.slice_mut(..l))
                .map_err(drv)?;
        }
        // Block tables vary in width per step; reuse the buffer while it is big enough.
        let bt_len = p.block_tables.len().max(1);
        if self.block_tables.as_ref().is_none_or(|d| d.len() < bt_len) {
            self.block_tables = Some(
                s.alloc_zeros::<i32>(bt_len.next_power_of_two())
                    .map_err(drv)?,
            );
        }
        let Some(bt) = self.block_tables.as_mut() else {
            return Err(CudaError::Launch("block table buffer missing".into()));
        };
        if !p.block_tables.is_empty() {
            s.memcpy_htod(&p.block_tables, &mut bt.slice_mut(..p.block_tables.len()))
                .map_err(drv)?;
        }

        let d = self.dims;
        let (h, hq, hkv, hd) = (d.hidden, d.num_heads, d.num_kv_heads, d.head_size);
        let (hidden_i, hq_i, hkv_i, hd_i) = (
            i32_of(h, "hidden")?,
            i32_of(hq, "heads")?,
            i32_of(hkv, "kv heads")?,
            i32_of(hd, "head size")?,
        );
        let inter_i = i32_of(d.intermediate, "intermediate")?;
        let t_i = i32_of(t, "tokens")?;
        let bs_i = i32_of(self.block_size, "block size")?;
        let max_blocks_i = i32_of(p.max_blocks, "max blocks")?;
        let (zero, one) = (0i32, 1i32);
        let eps = self.eps;
        let scale = 1.0f32 / (hd as f32).sqrt();
        let k = &self.k;
        let row = launch::row_launch(t)?;

        // SAFETY (every launch below): argument lists match the kernel signatures in
        // kernels/*.cu argument by argument; buffers were sized by `Workspace` for up to
        // `max_tokens` rows and `pack` bounds every index the kernels read (tokens < vocab,
        // positions < rope rows, slots and blocks < num_blocks, rows < tokens).
        unsafe {
            s.launch_builder(&k.embedding_gather)
                .arg(&mut b.hidden)
                .arg(&self.embed)
                .arg(&b.token_ids)
                .arg(&hidden_i)
                .launch(cfg(launch::Launch {
                    shared_mem_bytes: 0,
                    ..row
                }))
                .map_err(drv)?;
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let (kc, vc) = &mut self.kv[li];
            unsafe {
                s.launch_builder(&k.rms_norm)
                    .arg(&mut b.normed)
                    .arg(&b.hidden)
                    .arg(&layer.input_norm)
                    .arg(&b.logits_rows)
                    .arg(&zero)
                    .arg(&hidden_i)
                    .arg(&eps)
                    .launch(cfg(row))
                    .map_err(drv)?;
            }
            Self::gemm(
                &self.blas,
                s,
                &mut b.qkv,
                false,
                &layer.qkv,
                &b.normed,
                t,
                d.qkv_width(),
                h,
            )?;
            unsafe {
                s.launch_builder(&k.qkv_bias_rope)
                    .arg(&mut b.qkv)
                    .arg(&layer.qkv_bias)
                    .arg(&self.rope)
                    .arg(&b.positions)
                    .arg(&hq_i)
                    .arg(&hkv_i)
                    .arg(&hd_i)
                    .launch(cfg(launch::Launch {
                        shared_mem_bytes: 0,
                        ..row
                    }))
                    .map_err(drv)?;
                s.launch_builder(&k.reshape_and_cache)
                    .arg(&b.qkv)
                    .arg(&mut *kc)
                    .arg(&mut *vc)
                    .arg(&b.slots)
                    .arg(&hq_i)
                    .arg(&hkv_i)
                    .arg(&hd_i)
                    .arg(&bs_i)
                    .launch(cfg(launch::cache_write_launch(t, hkv, hd)?))
                    .map_err(drv)?;
            }
            // Attention in row chunks so the flash-decoding partials fit the workspace.
            let chunk = memory::rows_per_attention_launch(p.max_keys, self.ws.partial_capacity)
                .min(t)
                // grid.y limit of the attention launch.
                .min(65_535);
            let mut r0 = 0;
            while r0 < t {
                let rows = chunk.min(t - r0);
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
                let plan = launch::plan_attention(&shape)?;
                let logits_len = i32_of(max_keys.min(launch::PARTITION_SIZE), "logits")?;
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
                        .arg(&*bt)
                        .arg(&seq_view)
                        .arg(&keys_view)
                        .arg(&hkv_i)
                        .arg(&group)
                        .arg(&bs_i)
                        .arg(&max_blocks_i)
                        .arg(&scale)
                        .arg(&logits_len)
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
                            .launch(cfg(red))
                            .map_err(drv)?;
                    }
                }
                r0 += rows;
            }
            Self::gemm(
                &self.blas,
                s,
                &mut b.branch,
                false,
                &layer.o_proj,
                &b.attn,
                t,
                h,
                hq * hd,
            )?;
            let n_res = i32_of(t * h, "residual elements")?;
            let ew = launch::elementwise_launch(t * h)?;
            unsafe {
                s.launch_builder(&k.residual_add)
                    .arg(&mut b.hidden)
                    .arg(&b.branch)
                    .arg(&n_res)
                    .launch(cfg(ew))
                    .map_err(drv)?;
                s.launch_builder(&k.rms_norm)
                    .arg(&mut b.normed)
                    .arg(&b.hidden)
                    .arg(&layer.post_norm)
                    .arg(&b.logits_rows)
                    .arg(&zero)
                    .arg(&hidden_i)
                    .arg(&eps)
                    .launch(cfg(row))
                    .map_err(drv)?;
            }
            Self::gemm(
                &self.blas,
                s,
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
            Self::gemm(
                &self.blas,
                s,
                &mut b.branch,
                false,
                &layer.down,
                &b.act,
                t,
                h,
                d.intermediate,
            )?;
            unsafe {
                s.launch_builder(&k.residual_add)
                    .arg(&mut b.hidden)
                    .arg(&b.branch)
                    .arg(&n_res)
                    .launch(cfg(ew))
                    .map_err(drv)?;
            }
        }

        out.clear();
        out.vocab_size = d.vocab;
        if l == 0 {
            // Nothing to copy out, but the next step rewrites the host arrays uploaded above.
            s.synchronize().map_err(drv)?;
            return Ok(());
        }
        unsafe {
            s.launch_builder(&k.rms_norm)
                .arg(&mut b.final_normed)
                .arg(&b.hidden)
                .arg(&self.norm)
                .arg(&b.logits_rows)
                .arg(&one)
                .arg(&hidden_i)
                .arg(&eps)
                .launch(cfg(launch::row_launch(l)?))
                .map_err(drv)?;
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        Self::gemm(
            &self.blas,
            s,
            &mut b.logits,
            true,
            head,
            &b.final_normed,
            l,
            d.vocab,
            h,
        )?;
        out.logits.resize(l * d.vocab, 0.0);
        s.memcpy_dtoh(&b.logits.slice(..l * d.vocab), &mut out.logits)
            .map_err(drv)?;
        s.synchronize().map_err(drv)?;
        Ok(())
    }
}
