//! Device side of the CUDA backend: context and stream, kernel module (NVRTC + CUBIN cache),
//! weights (bf16, or FP8 E4M3 with per-channel scales) and KV cache in device memory, the
//! per-step forward over a packed batch, and CUDA-graph capture and replay of decode steps.
//!
//! Per layer: `GEMM/GEMV qkv → qkv_bias_rope_cache (RoPE into the cache write) →
//! paged_attention (split-K, → reduce) → GEMM/GEMV o → fused_add_rms_norm → GEMM/GEMV gate_up
//! → silu_and_mul → GEMM/GEMV down → fused_add_rms_norm (the next layer's input norm)`; the
//! first layer's input norm is a plain `rms_norm`, the last residual a `residual_add`; then
//! the final norm on the logits rows only and the lm_head straight into f32 logits, copied out
//! for the engine to sample. Projections: cuBLAS for bf16 weights; for FP8, the GEMV kernel at
//! ≤ `GEMV_MAX_ROWS` tokens, else cuBLAS over slices of rows dequantized into a scratch buffer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{
    sys as drv_sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DriverError, LaunchConfig,
};

mod forward;
mod graph;
mod linear;

use graph::GraphState;
use linear::Weight;

use super::compile::{compile_cubin, ComputeCapability, KernelCache};
use super::fp8::Fp8Matrix;
use super::graphs::{self, GraphKey, GraphLimits, PaddedStep};
use super::launch::Launch;
use super::memory::{self, Dims, WeightFormat, Workspace};
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

/// cuBLAS workspace set explicitly when graphs are on: cuBLAS must not allocate while a
/// stream is being captured (32 MiB: what cuBLAS itself uses on Hopper).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

struct Kernels {
    embedding_gather: CudaFunction,
    rms_norm: CudaFunction,
    fused_add_rms_norm: CudaFunction,
    qkv_bias_rope_cache: CudaFunction,
    silu_and_mul: CudaFunction,
    residual_add: CudaFunction,
    attention: CudaFunction,
    reduce: CudaFunction,
    gemv_fp8: CudaFunction,
    gemv_fp8_f32: CudaFunction,
    fp8_dequant_rows: CudaFunction,
    /// `gemv_bf16` / `gemv_bf16_f32`, when `CudaOptions::gemv_bf16` routes small bf16 batches
    /// to them.
    gemv_bf16: Option<(CudaFunction, CudaFunction)>,
    _module: Arc<CudaModule>,
}

struct Layer {
    input_norm: CudaSlice<u16>,
    qkv: Weight,
    qkv_bias: CudaSlice<u16>,
    o_proj: Weight,
    post_norm: CudaSlice<u16>,
    gate_up: Weight,
    down: Weight,
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
    fp8_scratch: CudaSlice<u16>,
    token_ids: CudaSlice<u32>,
    positions: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    row_seq: CudaSlice<i32>,
    row_keys: CudaSlice<i32>,
    logits_rows: CudaSlice<i32>,
}

/// How the attention launches of one forward are laid out.
#[derive(Clone, Copy)]
enum AttnMode {
    /// Planned from the step's own rows (row chunks, split-K by context).
    Eager,
    /// Fixed by a graph key: one launch over the padded rows, fixed partitions and the graph
    /// block-table stride.
    Fixed(GraphKey),
}

pub(super) struct Gpu {
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    dims: Dims,
    format: WeightFormat,
    eps: f32,
    block_size: usize,
    max_model_len: usize,
    sm_count: usize,
    embed: CudaSlice<u16>,
    layers: Vec<Layer>,
    norm: CudaSlice<u16>,
    lm_head: Option<Weight>,
    rope: CudaSlice<f32>,
    ws: Workspace,
    buf: Buffers,
    /// Per layer (key, value) caches, allocated by `init_kv`.
    kv: Vec<(CudaSlice<u16>, CudaSlice<u16>)>,
    num_blocks: usize,
    budget_blocks: usize,
    packed: PackedBatch,
    block_tables: Option<CudaSlice<i32>>,
    graph: Option<GraphState>,
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
        // An FP8 checkpoint selects the FP8 path by itself (vLLM reads it from the checkpoint's
        // quantization_config); `--quantization fp8` quantizes a bf16 one at load.
        let format = if store.has_fp8() {
            store.check_fp8_names()?;
            if opts.weight_format != WeightFormat::Fp8 {
                tracing::info!("checkpoint holds FP8 weights: using the FP8 path");
            }
            WeightFormat::Fp8
        } else {
            opts.weight_format
        };
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
        let sm_count = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv)?
            .max(1) as usize;
        // SAFETY: the backend uses this one stream for every allocation, copy and launch, so
        // cudarc's cross-stream event tracking (two event records per launch) is pure overhead
        // (and event records would break graph capture).
        unsafe { ctx.disable_event_tracking() };
        // The legacy default stream cannot be captured into a graph: graphs get their own.
        let stream = if opts.cuda_graphs {
            ctx.new_stream().map_err(drv)?
        } else {
            ctx.default_stream()
        };
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
            fused_add_rms_norm: f("fused_add_rms_norm")?,
            qkv_bias_rope_cache: f("qkv_bias_rope_cache")?,
            silu_and_mul: f("silu_and_mul")?,
            residual_add: f("residual_add")?,
            attention: f(&format!("paged_attention_d{head}"))?,
            reduce: f(&format!("paged_attention_reduce_d{head}"))?,
            gemv_fp8: f("gemv_fp8")?,
            gemv_fp8_f32: f("gemv_fp8_f32")?,
            fp8_dequant_rows: f("fp8_dequant_rows")?,
            gemv_bf16: if opts.gemv_bf16 {
                Some((f("gemv_bf16")?, f("gemv_bf16_f32")?))
            } else {
                None
            },
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

        // Weights: on the host, uploaded a layer at a time (host copy dropped after).
        let up = |v: Vec<u16>| stream.clone_htod(&v).map_err(drv);
        let up8 = |m: Fp8Matrix| -> Result<Weight, CudaError> {
            if !m.cols.is_multiple_of(16) {
                return Err(CudaError::Unsupported(format!(
                    "FP8 weight with {} columns (the GEMV needs a multiple of 16)",
                    m.cols
                )));
            }
            Ok(Weight::Fp8 {
                codes: stream.clone_htod(&m.codes).map_err(drv)?,
                scales: stream.clone_htod(&m.scales).map_err(drv)?,
            })
        };
        let h = dims.hidden;
        let embed = up(store.take("model.embed_tokens.weight", &[dims.vocab, h])?)?;
        let mut layers = Vec::with_capacity(dims.num_layers);
        for i in 0..dims.num_layers {
            layers.push(match format {
                WeightFormat::Bf16 => {
                    let l = weights::take_layer(&mut store, &mc, i)?;
                    Layer {
                        input_norm: up(l.input_norm)?,
                        qkv: Weight::Bf16(up(l.qkv)?),
                        qkv_bias: up(l.qkv_bias)?,
                        o_proj: Weight::Bf16(up(l.o_proj)?),
                        post_norm: up(l.post_norm)?,
                        gate_up: Weight::Bf16(up(l.gate_up)?),
                        down: Weight::Bf16(up(l.down)?),
                    }
                }
                WeightFormat::Fp8 => {
                    let l = weights::take_layer_fp8(&mut store, &mc, i)?;
                    Layer {
                        input_norm: up(l.input_norm)?,
                        qkv: up8(l.qkv)?,
                        qkv_bias: up(l.qkv_bias)?,
                        o_proj: up8(l.o_proj)?,
                        post_norm: up(l.post_norm)?,
                        gate_up: up8(l.gate_up)?,
                        down: up8(l.down)?,
                    }
                }
            });
        }
        let norm = up(store.take("model.norm.weight", &[h])?)?;
        let lm_head = if mc.tie_word_embeddings && !store.contains("lm_head.weight") {
            None
        } else {
            Some(match format {
                WeightFormat::Bf16 => {
                    Weight::Bf16(up(store.take("lm_head.weight", &[dims.vocab, h])?)?)
                }
                // FP8 lm_head: what lets Qwen2.5-14B keep ≥ 1 500 KV blocks on an L4
                // (memory.rs); vLLM keeps it bf16.
                WeightFormat::Fp8 => up8(store.take_fp8("lm_head.weight", dims.vocab, h)?)?,
            })
        };
        drop(store);
        let rope = stream
            .clone_htod(&weights::rope_table(head, mc.rope_theta, max_model_len))
            .map_err(drv)?;

        let max_tokens = opts.max_num_batched_tokens;
        let max_logits = opts.max_num_seqs.min(max_tokens);
        let ws = Workspace::with_format(&dims, max_tokens, max_logits, max_model_len, format)?;
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
            fp8_scratch: z16(ws.fp8_scratch)?,
            token_ids: stream.alloc_zeros::<u32>(max_tokens).map_err(drv)?,
            positions: zi(max_tokens)?,
            slots: zi(max_tokens)?,
            row_seq: zi(max_tokens)?,
            row_keys: zi(max_tokens)?,
            logits_rows: zi(max_logits)?,
        };
        let graph = if opts.cuda_graphs {
            let stride = max_model_len.div_ceil(opts.block_size);
            let sizes = graphs::capture_sizes(max_logits);
            let rows = sizes.last().copied().unwrap_or(1);
            let ws_bytes = stream
                .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
                .map_err(drv)?;
            {
                let (wp, _g) = ws_bytes.device_ptr(&stream);
                // SAFETY: the workspace lives in GraphState as long as the handle is used.
                unsafe {
                    blas_sys::cublasSetWorkspace_v2(
                        *blas.handle(),
                        wp as *mut _,
                        BLAS_WORKSPACE_BYTES,
                    )
                }
                .result()
                .map_err(|e| CudaError::Blas(format!("cublasSetWorkspace: {e:?}")))?;
            }
            Some(GraphState {
                sizes,
                lim: GraphLimits {
                    num_kv_heads: dims.num_kv_heads,
                    sm_count,
                    partial_capacity: ws.partial_capacity,
                    max_model_len,
                },
                graphs: HashMap::new(),
                tables: zi(rows * stride)?,
                stride,
                host: PaddedStep::default(),
                _blas_workspace: ws_bytes,
            })
        } else {
            None
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
        // What the context, cuBLAS and the allocator took beyond our own buffers: the figure
        // `memory::CONTEXT_RESERVE_BYTES` estimates for planning (logged to calibrate it).
        let weight_bytes = dims.weight_bytes_as(lm_head.is_none(), format);
        let graph_bytes = if opts.cuda_graphs {
            BLAS_WORKSPACE_BYTES + 4 * max_logits * max_model_len.div_ceil(opts.block_size)
        } else {
            0
        };
        let overhead = used.saturating_sub(weight_bytes + ws.bytes() + graph_bytes);
        let planned = memory::kv_blocks_for_budget(
            total,
            weight_bytes + ws.bytes() + graph_bytes + memory::CONTEXT_RESERVE_BYTES,
            opts.gpu_memory_utilization,
            block_bytes,
        )
        .unwrap_or(0);
        tracing::info!(
            device = opts.device,
            arch = %cc.arch(),
            sm_count,
            total_mib = total >> 20,
            weights = ?format,
            weights_gib = weight_bytes as f64 / (1u64 << 30) as f64,
            workspace_mib = ws.bytes() >> 20,
            context_overhead_mib = overhead >> 20,
            planned_kv_blocks = planned,
            kv_blocks = budget_blocks,
            cuda_graphs = opts.cuda_graphs,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "cuda backend loaded"
        );
        Ok(Gpu {
            _ctx: ctx,
            stream,
            blas,
            k,
            dims,
            format,
            eps: mc.rms_norm_eps as f32,
            block_size: opts.block_size,
            max_model_len,
            sm_count,
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
            graph,
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

    /// The projection format in use (FP8 when the checkpoint or `--quantization` says so).
    pub fn weight_format(&self) -> WeightFormat {
        self.format
    }

    /// Graphs captured so far (0 without `--cuda-graphs`).
    pub fn graphs_captured(&self) -> usize {
        self.graph.as_ref().map_or(0, |g| g.graphs.len())
    }

    pub fn init_kv(&mut self, num_blocks: usize) -> Result<(), CudaError> {
        if num_blocks == 0 || num_blocks > self.budget_blocks {
            return Err(CudaError::OutOfMemory(format!(
                "{num_blocks} KV blocks requested, {} fit",
                self.budget_blocks
            )));
        }
        let per_layer = num_blocks * self.dims.num_kv_heads * self.dims.head_size * self.block_size;
        // Graphs hold the cache pointers they were captured with.
        if let Some(g) = self.graph.as_mut() {
            g.graphs.clear();
        }
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

    /// Uploads an eager step's arrays (after `pack`).
    fn upload_eager(&mut self) -> Result<(), CudaError> {
        let p = &self.packed;
        let (t, l) = (p.token_ids.len(), p.logits_rows.len());
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
        Ok(())
    }

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
        let t = self.packed.token_ids.len();
        let l = self.packed.logits_rows.len();
        if l > self.ws.max_logits {
            return Err(CudaError::Launch(format!(
                "{l} logits rows exceed {}",
                self.ws.max_logits
            )));
        }
        match self.graph_key() {
            Some(key) => self.replay(key)?,
            None => {
                self.upload_eager()?;
                self.forward(t, l, AttnMode::Eager)?;
            }
        }
        let s = &self.stream;
        out.clear();
        out.vocab_size = self.dims.vocab;
        if l == 0 {
            // Nothing to copy out, but the next step rewrites the host arrays uploaded above.
            s.synchronize().map_err(drv)?;
            return Ok(());
        }
        let v = self.dims.vocab;
        out.logits.resize(l * v, 0.0);
        s.memcpy_dtoh(&self.buf.logits.slice(..l * v), &mut out.logits)
            .map_err(drv)?;
        s.synchronize().map_err(drv)?;
        Ok(())
    }
}
