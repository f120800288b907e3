//! The `cuda` backend: the Qwen2 forward on one NVIDIA GPU through cudarc, with our own
//! NVRTC-compiled kernels (`kernels/*.cu`) for paged attention, the KV-cache writes and the
//! element-wise ops, and cuBLAS for the GEMMs (bf16 in, f32 accumulation).
//!
//! The crate builds and runs without any CUDA installed: cudarc loads the libraries at run
//! time, and [`probe`] checks for them first (cudarc panics on a missing library), so
//! [`CudaBackend::load`] fails with [`BackendError::Unavailable`] naming what is missing.
//! Everything that does not need a device (launch geometry and split-K planning, batch
//! packing, kernel source and cache keys, memory budgeting, FP8 encoding and weight
//! conversion, CUDA-graph buckets) lives in its own module and is unit-tested on any machine;
//! `emulate` pins the kernels' arithmetic on the host. See docs/cuda-backend.md.

pub mod compile;
#[cfg(test)]
mod emulate;
pub mod fp8;
pub mod graphs;
pub mod harness;
pub mod launch;
pub mod memory;
pub mod pack;
pub mod probe;
mod runtime;
pub mod weights;

use std::path::{Path, PathBuf};

use super::{Backend, BackendError, KvSpec, StepBatch, StepOutput};
use crate::serve::model::{ModelConfig, ModelError};

/// Everything that can go wrong in the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("{role} not found (tried {tried}); install the NVIDIA driver / CUDA 12 libraries or add their directory to LD_LIBRARY_PATH")]
    MissingLibrary { role: &'static str, tried: String },
    #[error(
        "--tensor-parallel-size {0} is not supported yet: the cuda backend runs on one GPU \
         (multi-GPU over NCCL is designed in docs/multi-gpu.md); use --tensor-parallel-size 1"
    )]
    TensorParallel(usize),
    #[error("unsupported by the cuda backend: {0}")]
    Unsupported(String),
    #[error("invalid cuda backend configuration: {0}")]
    Config(String),
    #[error("kernel launch: {0}")]
    Launch(String),
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    #[error("kernel cache {path}: {reason}")]
    KernelCache { path: PathBuf, reason: String },
    #[error("NVRTC failed for {arch}: {log}")]
    Compile { arch: String, log: String },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error(transparent)]
    Fp8(#[from] weights::Fp8Error),
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::MissingLibrary { .. }
            | CudaError::TensorParallel(_)
            | CudaError::Unsupported(_) => BackendError::Unavailable(e.to_string()),
            other => BackendError::Failed(other.to_string()),
        }
    }
}

/// Options of the CUDA backend (the relevant `switchyard serve` flags).
#[derive(Debug, Clone, PartialEq)]
pub struct CudaOptions {
    /// Tokens per KV block (`--block-size`).
    pub block_size: usize,
    /// Fraction of device memory for weights + workspace + KV cache.
    pub gpu_memory_utilization: f64,
    /// `--tensor-parallel-size`; only 1 is implemented.
    pub tensor_parallel_size: usize,
    /// Use exactly this many KV blocks instead of the budget.
    pub num_gpu_blocks_override: Option<usize>,
    /// Most new tokens per step (`--max-num-batched-tokens`): sizes the activation workspace.
    pub max_num_batched_tokens: usize,
    /// Most sequences per step (`--max-num-seqs`): sizes the logits buffer.
    pub max_num_seqs: usize,
    /// Context length; default the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// CUDA device ordinal.
    pub device: usize,
    /// Where compiled kernels are cached; `None` compiles every start.
    pub kernel_cache_dir: Option<PathBuf>,
    /// Projection weights on the device (`--quantization fp8` → FP8 E4M3, quantized at load
    /// unless the checkpoint already is FP8, which selects FP8 by itself).
    pub weight_format: memory::WeightFormat,
    /// Replay decode steps from CUDA graphs captured per batch-size bucket (`--cuda-graphs`;
    /// off by default until measured on a GPU).
    pub cuda_graphs: bool,
    /// bf16 projections of ≤ `launch::GEMV_MAX_ROWS` tokens through the `gemv_bf16` kernel
    /// instead of cuBLAS (no flag yet: `benches/cuda_decode.rs` compares the two on a GPU).
    pub gemv_bf16: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            block_size: 16,
            gpu_memory_utilization: 0.9,
            tensor_parallel_size: 1,
            num_gpu_blocks_override: None,
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            max_model_len: None,
            device: 0,
            kernel_cache_dir: None,
            weight_format: memory::WeightFormat::Bf16,
            cuda_graphs: false,
            gemv_bf16: false,
        }
    }
}

impl CudaOptions {
    /// Checks the options that do not need a device; runs before any library is loaded.
    pub fn validate(&self) -> Result<(), CudaError> {
        if self.tensor_parallel_size != 1 {
            return Err(CudaError::TensorParallel(self.tensor_parallel_size));
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return Err(CudaError::Config(format!(
                "--gpu-memory-utilization must be in (0, 1], got {}",
                self.gpu_memory_utilization
            )));
        }
        if self.block_size == 0 || self.block_size > 256 {
            return Err(CudaError::Config(format!(
                "--block-size must be in 1..=256, got {}",
                self.block_size
            )));
        }
        if self.max_num_batched_tokens == 0 || self.max_num_seqs == 0 {
            return Err(CudaError::Config(
                "--max-num-batched-tokens and --max-num-seqs must be > 0".into(),
            ));
        }
        Ok(())
    }
}

/// Checks a model's shapes against what the kernels implement.
pub fn check_model(cfg: &ModelConfig) -> Result<(), CudaError> {
    let d = cfg.head_dim();
    if !launch::SUPPORTED_HEAD_SIZES.contains(&d) {
        return Err(CudaError::Unsupported(format!(
            "head size {d} (kernels are built for {:?})",
            launch::SUPPORTED_HEAD_SIZES
        )));
    }
    if cfg.num_key_value_heads == 0
        || !cfg
            .num_attention_heads
            .is_multiple_of(cfg.num_key_value_heads)
    {
        return Err(CudaError::Unsupported(format!(
            "{} heads over {} KV heads",
            cfg.num_attention_heads, cfg.num_key_value_heads
        )));
    }
    let group = cfg.num_attention_heads / cfg.num_key_value_heads;
    if group > launch::MAX_GROUP {
        return Err(CudaError::Unsupported(format!(
            "{group} attention heads per KV head (kernels support up to {})",
            launch::MAX_GROUP
        )));
    }
    Ok(())
}

/// Whether a GPU can be used here: the libraries load and the driver reports a device.
/// `Err` carries the reason, for tests and benchmarks that print `SKIPPED: <why>`.
pub fn gpu_available() -> Result<(), String> {
    probe::probe().map_err(|e| e.to_string())?;
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err("no CUDA device (driver reports 0 devices)".into()),
        Err(e) => Err(format!("no usable CUDA device ({e})")),
    }
}

/// The CUDA backend.
pub struct CudaBackend {
    gpu: runtime::Gpu,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("kv", &self.gpu.kv_spec())
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Loads the model in `dir` onto the GPU: validates options, probes the CUDA libraries,
    /// compiles (or loads cached) kernels for the device, uploads bf16 weights, allocates the
    /// activation workspace and measures what is left for KV blocks.
    pub fn load(dir: &Path, opts: CudaOptions) -> Result<CudaBackend, BackendError> {
        opts.validate()?;
        let cfg = ModelConfig::load(dir).map_err(CudaError::from)?;
        check_model(&cfg)?;
        probe::probe()?;
        let gpu = runtime::Gpu::new(dir, cfg, &opts)?;
        Ok(CudaBackend { gpu })
    }

    /// Like [`CudaBackend::load`] with weights already in host memory (tests and benchmarks
    /// with random weights of a real model's shapes).
    pub fn from_store(
        cfg: ModelConfig,
        store: weights::Bf16Store,
        opts: CudaOptions,
    ) -> Result<CudaBackend, BackendError> {
        opts.validate()?;
        check_model(&cfg)?;
        probe::probe()?;
        let gpu = runtime::Gpu::with_store(cfg, store, &opts)?;
        Ok(CudaBackend { gpu })
    }
}

impl CudaBackend {
    /// The projection format in use (FP8 when the checkpoint or `--quantization fp8` says so).
    pub fn weight_format(&self) -> memory::WeightFormat {
        self.gpu.weight_format()
    }

    /// CUDA graphs captured so far (0 without `--cuda-graphs`).
    pub fn graphs_captured(&self) -> usize {
        self.gpu.graphs_captured()
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn kv_spec(&self) -> KvSpec {
        self.gpu.kv_spec()
    }

    fn vocab_size(&self) -> usize {
        self.gpu.vocab_size()
    }

    fn available_kv_blocks(&self) -> usize {
        self.gpu.available_kv_blocks()
    }

    fn init_kv(&mut self, num_blocks: usize) -> Result<(), BackendError> {
        Ok(self.gpu.init_kv(num_blocks)?)
    }

    fn execute(&mut self, batch: &StepBatch, out: &mut StepOutput) -> Result<(), BackendError> {
        Ok(self.gpu.execute(batch, out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_parallel_2_is_rejected_before_probing() {
        let opts = CudaOptions {
            tensor_parallel_size: 2,
            ..CudaOptions::default()
        };
        let err = CudaBackend::load(Path::new("/nonexistent"), opts).unwrap_err();
        match err {
            BackendError::Unavailable(msg) => {
                assert!(
                    msg.contains("--tensor-parallel-size 2 is not supported"),
                    "{msg}"
                );
                assert!(msg.contains("docs/multi-gpu.md"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn option_validation() {
        assert!(CudaOptions::default().validate().is_ok());
        for bad in [
            CudaOptions {
                gpu_memory_utilization: 0.0,
                ..CudaOptions::default()
            },
            CudaOptions {
                block_size: 0,
                ..CudaOptions::default()
            },
            CudaOptions {
                max_num_seqs: 0,
                ..CudaOptions::default()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(CudaError::Config(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn missing_library_maps_to_unavailable() {
        let e: BackendError = CudaError::MissingLibrary {
            role: "CUDA driver",
            tried: "libcuda.so.1".into(),
        }
        .into();
        assert!(
            matches!(e, BackendError::Unavailable(m) if m.starts_with("CUDA driver not found"))
        );
    }

    #[test]
    fn model_shapes_outside_the_kernels_are_rejected() {
        let cfg = |heads: usize, kv: usize, head: usize| {
            ModelConfig::from_json(&serde_json::json!({
                "model_type": "qwen2",
                "hidden_size": heads * head,
                "intermediate_size": 64,
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "num_hidden_layers": 1,
                "vocab_size": 32
            }))
            .unwrap()
        };
        // Qwen2.5-72B: 64 / 8 heads, head 128.
        assert!(check_model(&cfg(64, 8, 128)).is_ok());
        let msg = |c| check_model(&c).unwrap_err().to_string();
        assert!(msg(cfg(32, 2, 128))
            .contains("16 attention heads per KV head (kernels support up to 8)"));
        assert!(msg(cfg(4, 2, 96)).contains("head size 96"));
    }
}
