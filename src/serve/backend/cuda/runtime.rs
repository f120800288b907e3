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

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    sys as drv_sys, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream,
    DevicePtr, DevicePtrMut, DeviceRepr, DriverError, LaunchConfig, PushKernelArg,
};

use super::compile::{compile_cubin, ComputeCapability, KernelCache};
use super::fp8::Fp8Matrix;
use super::graphs::{self, GraphKey, GraphLimits};
use super::launch::{self, AttentionShape, Launch};
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
    _module: Arc<CudaModule>,
}

/// A projection weight `[n, k]` on the device.
enum Weight {
    Bf16(CudaSlice<u16>),
    /// E4M3 codes and one f32 scale per output row.
    Fp8 {
        codes: CudaSlice<u8>,
        scales: CudaSlice<f32>,
    },
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

/// Host arrays of a padded decode step (reused).
#[derive(Default)]
struct PaddedStep {
    token_ids: Vec<u32>,
    positions: Vec<i32>,
    slots: Vec<i32>,
    row_seq: Vec<i32>,
    row_keys: Vec<i32>,
    logits_rows: Vec<i32>,
    tables: Vec<i32>,
}

/// A captured graph, movable to the engine thread with the rest of the backend.
struct Graph(CudaGraph);

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialised
// (CUDA's graph thread-safety rule); it is owned by the backend, which the engine drives from
// one thread at a time (`&mut self` on every call that launches it).
#[allow(unsafe_code)]
unsafe impl Send for Graph {}

/// CUDA graphs of decode steps, one per [`GraphKey`].
struct GraphState {
    sizes: Vec<usize>,
    lim: GraphLimits,
    graphs: HashMap<GraphKey, Graph>,
    /// Block tables at a fixed row stride (`stride` = the longest context's block count).
    tables: CudaSlice<i32>,
    stride: usize,
    host: PaddedStep,
    _blas_workspace: CudaSlice<u8>,
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
            if m.cols % 16 != 0 {
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
        tracing::info!(
            device = opts.device,
            arch = %cc.arch(),
            sm_count,
            weights = ?format,
            weights_gib = dims.weight_bytes_as(lm_head.is_none(), format) as f64
                / (1u64 << 30) as f64,
            workspace_mib = ws.bytes() >> 20,
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

    /// `out[T, n] = x[T, k] · w[n, k]ᵀ` with bf16 inputs and f32 accumulation into columns
    /// `0..n` of an output whose rows are `ldc` wide; `out_f32` picks the output type (f32 for
    /// logits, else bf16).
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
        ldc: usize,
    ) -> Result<(), CudaError> {
        let (m_, n_, k_, ldc_) = (
            i32_of(n, "gemm n")?,
            i32_of(tokens, "gemm m")?,
            i32_of(k, "gemm k")?,
            i32_of(ldc, "gemm ldc")?,
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
                ldc_,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Blas(e.to_string()))
    }

    /// `out[T, n] = x[T, k] · w[n, k]ᵀ` for either weight format (bf16 or f32 `out`).
    #[allow(unsafe_code, clippy::too_many_arguments)]
    fn linear<T: DeviceRepr>(
        blas: &CudaBlas,
        stream: &CudaStream,
        kern: &Kernels,
        scratch: &mut CudaSlice<u16>,
        out: &mut CudaSlice<T>,
        out_f32: bool,
        w: &Weight,
        x: &CudaSlice<u16>,
        tokens: usize,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        let (codes, scales) = match w {
            Weight::Bf16(w) => {
                return Self::gemm(blas, stream, out, out_f32, w, x, tokens, n, k, n)
            }
            Weight::Fp8 { codes, scales } => (codes, scales),
        };
        let (n_i, k_i) = (i32_of(n, "linear n")?, i32_of(k, "linear k")?);
        if tokens <= launch::GEMV_MAX_ROWS {
            let rows_i = i32_of(tokens, "linear rows")?;
            let f = if out_f32 {
                &kern.gemv_fp8_f32
            } else {
                &kern.gemv_fp8
            };
            // SAFETY: `gemv_fp8(_f32)(out, w, scales, x, n, k, rows)`; w is [n, k] codes with n
            // scales, x holds `tokens` rows of k, out `tokens` rows of n (workspace-sized).
            unsafe {
                stream
                    .launch_builder(f)
                    .arg(&mut *out)
                    .arg(codes)
                    .arg(scales)
                    .arg(x)
                    .arg(&n_i)
                    .arg(&k_i)
                    .arg(&rows_i)
                    .launch(cfg(launch::gemv_launch(n, k, tokens)?))
                    .map_err(drv)?;
            }
            return Ok(());
        }
        // Larger batches: dequantize a slice of rows into the scratch, cuBLAS it into the
        // matching output columns, next slice.
        let slice_rows = (scratch.len() / k).clamp(1, n);
        let mut r0 = 0;
        while r0 < n {
            let rows = slice_rows.min(n - r0);
            let (r0_i, rows_i) = (i32_of(r0, "row")?, i32_of(rows, "rows")?);
            // SAFETY: `fp8_dequant_rows(out, w, scales, row0, rows, k)` writes rows × k ≤
            // scratch.len() elements and reads rows r0 .. r0 + rows < n of w.
            unsafe {
                stream
                    .launch_builder(&kern.fp8_dequant_rows)
                    .arg(&mut *scratch)
                    .arg(codes)
                    .arg(scales)
                    .arg(&r0_i)
                    .arg(&rows_i)
                    .arg(&k_i)
                    .launch(cfg(launch::elementwise_launch(rows * k)?))
                    .map_err(drv)?;
            }
            let mut cols = out.slice_mut(r0..);
            Self::gemm(
                blas, stream, &mut cols, out_f32, &*scratch, x, tokens, rows, k, n,
            )?;
            r0 += rows;
        }
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

    /// The graph a packed step replays, if graphs are on and it is a decode step: one row per
    /// sequence, each sequence's logits wanted, in row order.
    fn graph_key(&self) -> Option<GraphKey> {
        let g = self.graph.as_ref()?;
        let p = &self.packed;
        let rows = p.token_ids.len();
        let decode = p.logits_rows.len() == rows
            && p.row_seq.iter().enumerate().all(|(i, &s)| s as usize == i)
            && p.logits_rows
                .iter()
                .enumerate()
                .all(|(i, &r)| r as usize == i);
        if !decode || p.max_blocks > g.stride {
            return None;
        }
        graphs::graph_key(rows, p.max_keys, &g.sizes, &g.lim)
    }

    /// Pads the packed decode step to `key.rows` and uploads it (padding rows: token 0 at
    /// position 0, no cache slot, 0 keys; block tables at the graph stride).
    fn upload_padded(&mut self, key: GraphKey) -> Result<(), CudaError> {
        let Some(g) = self.graph.as_mut() else {
            return Err(CudaError::Launch("graphs are off".into()));
        };
        let p = &self.packed;
        let (n, b, w) = (p.token_ids.len(), key.rows, g.stride);
        let h = &mut g.host;
        let pad = |v: &mut Vec<i32>, src: &[i32], fill: i32| {
            v.clear();
            v.extend_from_slice(src);
            v.resize(b, fill);
        };
        h.token_ids.clear();
        h.token_ids.extend_from_slice(&p.token_ids);
        h.token_ids.resize(b, 0);
        pad(&mut h.positions, &p.positions, 0);
        pad(&mut h.slots, &p.slot_mapping, -1);
        pad(&mut h.row_seq, &p.row_seq, 0);
        pad(&mut h.row_keys, &p.row_keys, 0);
        h.logits_rows.clear();
        h.logits_rows.extend(0..b as i32);
        h.tables.clear();
        h.tables.resize(n * w, 0);
        for i in 0..n {
            h.tables[i * w..i * w + p.max_blocks]
                .copy_from_slice(&p.block_tables[i * p.max_blocks..(i + 1) * p.max_blocks]);
        }
        let s = &self.stream;
        let d = &mut self.buf;
        s.memcpy_htod(&h.token_ids, &mut d.token_ids.slice_mut(..b))
            .map_err(drv)?;
        s.memcpy_htod(&h.positions, &mut d.positions.slice_mut(..b))
            .map_err(drv)?;
        s.memcpy_htod(&h.slots, &mut d.slots.slice_mut(..b))
            .map_err(drv)?;
        s.memcpy_htod(&h.row_seq, &mut d.row_seq.slice_mut(..b))
            .map_err(drv)?;
        s.memcpy_htod(&h.row_keys, &mut d.row_keys.slice_mut(..b))
            .map_err(drv)?;
        s.memcpy_htod(&h.logits_rows, &mut d.logits_rows.slice_mut(..b))
            .map_err(drv)?;
        if n > 0 {
            s.memcpy_htod(&h.tables, &mut g.tables.slice_mut(..n * w))
                .map_err(drv)?;
        }
        Ok(())
    }

    /// The whole forward of `t` token rows with `l` logits rows, from the uploaded arrays.
    /// Captures cleanly into a graph in `Fixed` mode: no allocation, no host copy, no sync.
    #[allow(unsafe_code)]
    fn forward(&mut self, t: usize, l: usize, mode: AttnMode) -> Result<(), CudaError> {
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

    /// Runs a decode step from its graph, capturing the graph first if it is new (and running
    /// the same fixed-layout forward eagerly once [`graphs::MAX_GRAPHS`] are held).
    fn replay(&mut self, key: GraphKey) -> Result<(), CudaError> {
        self.upload_padded(key)?;
        let known = self
            .graph
            .as_ref()
            .is_some_and(|g| g.graphs.contains_key(&key));
        if !known {
            let full = self
                .graph
                .as_ref()
                .is_none_or(|g| g.graphs.len() >= graphs::MAX_GRAPHS);
            if full {
                return self.forward(key.rows, key.rows, AttnMode::Fixed(key));
            }
            let started = Instant::now();
            self.stream
                .begin_capture(drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(drv)?;
            let recorded = self.forward(key.rows, key.rows, AttnMode::Fixed(key));
            // End the capture whatever happened, so the stream is usable again.
            let ended = self
                .stream
                .end_capture(drv_sys::CUgraphInstantiate_flags(0))
                .map_err(drv);
            recorded?;
            let graph = ended?.ok_or_else(|| CudaError::Launch("empty graph capture".into()))?;
            tracing::debug!(
                rows = key.rows,
                partition_size = key.partition_size,
                partitions = key.num_partitions,
                elapsed_us = started.elapsed().as_micros() as u64,
                "captured decode graph"
            );
            if let Some(g) = self.graph.as_mut() {
                g.graphs.insert(key, Graph(graph));
            }
        }
        let graph = self
            .graph
            .as_ref()
            .and_then(|g| g.graphs.get(&key))
            .ok_or_else(|| CudaError::Launch("graph missing after capture".into()))?;
        graph.0.launch().map_err(drv)
    }
}
