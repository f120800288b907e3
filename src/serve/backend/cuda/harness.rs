//! Stand-alone launches of the paged-attention and reshape-and-cache kernels on host data, for
//! the kernel-level GPU tests (`tests/cuda_kernels.rs`) and the attention bandwidth benchmark
//! (`benches/cuda_decode.rs`). Not used by the serving path.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::compile::{compile_cubin, ComputeCapability};
use super::launch::{self, AttentionShape, Launch};
use super::CudaError;

fn drv(e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(e.to_string())
}

fn cfg(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: l.grid,
        block_dim: l.block,
        shared_mem_bytes: l.shared_mem_bytes,
    }
}

fn i32_of(v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Launch(format!("{v} exceeds i32")))
}

/// Attention geometry of a harness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HarnessShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_size: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl HarnessShape {
    fn width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_size
    }
}

/// Query rows of one attention launch (as `pack::PackedBatch` lays them out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rows {
    /// `[rows, num_heads · head_size]` bf16 bits.
    pub q: Vec<u16>,
    pub row_seq: Vec<i32>,
    pub row_keys: Vec<i32>,
    /// `[num_seqs, max_blocks]`.
    pub block_tables: Vec<i32>,
    pub max_blocks: usize,
}

/// One device, the kernels, and a single-layer paged KV cache.
pub struct AttentionHarness {
    shape: HarnessShape,
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    attention: CudaFunction,
    reduce: CudaFunction,
    cache_write: CudaFunction,
    key_cache: CudaSlice<u16>,
    value_cache: CudaSlice<u16>,
}

impl AttentionHarness {
    pub fn new(shape: HarnessShape) -> Result<AttentionHarness, CudaError> {
        super::probe::probe()?;
        let ctx = CudaContext::new(0).map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let cc = ComputeCapability {
            major: major.max(0) as u32,
            minor: minor.max(0) as u32,
        };
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(compile_cubin(cc, None)?))
            .map_err(drv)?;
        let d = shape.head_size;
        let f = |n: &str| module.load_function(n).map_err(drv);
        let stream = ctx.default_stream();
        let len = shape.num_blocks * shape.num_kv_heads * d * shape.block_size;
        Ok(AttentionHarness {
            shape,
            attention: f(&format!("paged_attention_d{d}"))?,
            reduce: f(&format!("paged_attention_reduce_d{d}"))?,
            cache_write: f("reshape_and_cache")?,
            key_cache: stream.alloc_zeros::<u16>(len.max(1)).map_err(drv)?,
            value_cache: stream.alloc_zeros::<u16>(len.max(1)).map_err(drv)?,
            stream,
            _ctx: ctx,
        })
    }

    /// Writes `k`, `v` (`[tokens, kv_heads · head_size]` bf16 bits) into `slots` with
    /// `reshape_and_cache`.
    #[allow(unsafe_code)]
    pub fn write_kv(&mut self, k: &[u16], v: &[u16], slots: &[i32]) -> Result<(), CudaError> {
        let s = self.shape;
        let kvw = s.num_kv_heads * s.head_size;
        let t = slots.len();
        if k.len() != t * kvw || v.len() != t * kvw {
            return Err(CudaError::Launch("k/v length does not match slots".into()));
        }
        let mut qkv = vec![0u16; t * s.width()];
        for i in 0..t {
            let row = &mut qkv[i * s.width()..(i + 1) * s.width()];
            let q_end = s.num_heads * s.head_size;
            row[q_end..q_end + kvw].copy_from_slice(&k[i * kvw..(i + 1) * kvw]);
            row[q_end + kvw..].copy_from_slice(&v[i * kvw..(i + 1) * kvw]);
        }
        let st = &self.stream;
        let qkv_d = st.clone_htod(&qkv).map_err(drv)?;
        let slots_d = st.clone_htod(slots).map_err(drv)?;
        let (h, kvh, d, bs) = (
            i32_of(s.num_heads)?,
            i32_of(s.num_kv_heads)?,
            i32_of(s.head_size)?,
            i32_of(s.block_size)?,
        );
        // SAFETY: arguments match `reshape_and_cache`; slots are checked by the caller to be
        // below num_blocks × block_size (tests build them so).
        unsafe {
            st.launch_builder(&self.cache_write)
                .arg(&qkv_d)
                .arg(&mut self.key_cache)
                .arg(&mut self.value_cache)
                .arg(&slots_d)
                .arg(&h)
                .arg(&kvh)
                .arg(&d)
                .arg(&bs)
                .launch(cfg(launch::cache_write_launch(
                    t,
                    s.num_kv_heads,
                    s.head_size,
                )?))
                .map_err(drv)?;
        }
        st.synchronize().map_err(drv)
    }

    /// Runs attention over `rows` `iters` times; returns the output (`[rows, heads · head_size]`
    /// bf16 bits) and the mean seconds per launch (main + reduce).
    #[allow(unsafe_code)]
    pub fn attention(&mut self, rows: &Rows, iters: usize) -> Result<(Vec<u16>, f64), CudaError> {
        let s = self.shape;
        let n = rows.row_keys.len();
        let max_keys = rows.row_keys.iter().copied().max().unwrap_or(0).max(0) as usize;
        let shape = AttentionShape {
            num_heads: s.num_heads,
            num_kv_heads: s.num_kv_heads,
            head_size: s.head_size,
            num_rows: n,
            max_keys,
        };
        let plan = launch::plan_attention(&shape)?;
        if rows.q.len() != n * s.num_heads * s.head_size || rows.row_seq.len() != n {
            return Err(CudaError::Launch(
                "rows: q / row_seq length mismatch".into(),
            ));
        }
        let hd = s.num_heads * s.head_size;
        let mut qkv = vec![0u16; n * s.width()];
        for i in 0..n {
            qkv[i * s.width()..i * s.width() + hd].copy_from_slice(&rows.q[i * hd..(i + 1) * hd]);
        }
        let st = &self.stream;
        let qkv_d = st.clone_htod(&qkv).map_err(drv)?;
        let seq_d = st.clone_htod(&rows.row_seq).map_err(drv)?;
        let keys_d = st.clone_htod(&rows.row_keys).map_err(drv)?;
        let bt_d = st.clone_htod(&rows.block_tables).map_err(drv)?;
        let mut out = st.alloc_zeros::<u16>(n * hd).map_err(drv)?;
        let mut tmp = st
            .alloc_zeros::<f32>(plan.partial_out_len(&shape).max(1))
            .map_err(drv)?;
        let mut ml = st
            .alloc_zeros::<f32>(plan.partial_stats_len(&shape).max(1))
            .map_err(drv)?;
        let mut es = st
            .alloc_zeros::<f32>(plan.partial_stats_len(&shape).max(1))
            .map_err(drv)?;
        let (kvh, bs, mb) = (
            i32_of(s.num_kv_heads)?,
            i32_of(s.block_size)?,
            i32_of(rows.max_blocks)?,
        );
        let scale = 1.0f32 / (s.head_size as f32).sqrt();
        let logits_len = i32_of(max_keys.min(launch::PARTITION_SIZE))?;
        let parts = i32_of(plan.num_partitions)?;
        let group = i32_of(plan.group_size)?;
        let mut run = |out: &mut CudaSlice<u16>| -> Result<(), CudaError> {
            // SAFETY: arguments match `paged_attention_d*` / `paged_attention_reduce_d*`;
            // buffers are sized by the plan for these rows.
            unsafe {
                st.launch_builder(&self.attention)
                    .arg(&mut *out)
                    .arg(&mut tmp)
                    .arg(&mut ml)
                    .arg(&mut es)
                    .arg(&qkv_d)
                    .arg(&self.key_cache)
                    .arg(&self.value_cache)
                    .arg(&bt_d)
                    .arg(&seq_d)
                    .arg(&keys_d)
                    .arg(&kvh)
                    .arg(&group)
                    .arg(&bs)
                    .arg(&mb)
                    .arg(&scale)
                    .arg(&logits_len)
                    .launch(cfg(plan.main))
                    .map_err(drv)?;
                if let Some(red) = plan.reduce {
                    st.launch_builder(&self.reduce)
                        .arg(&mut *out)
                        .arg(&tmp)
                        .arg(&ml)
                        .arg(&es)
                        .arg(&keys_d)
                        .arg(&parts)
                        .launch(cfg(red))
                        .map_err(drv)?;
                }
            }
            Ok(())
        };
        run(&mut out)?;
        st.synchronize().map_err(drv)?;
        let started = Instant::now();
        for _ in 0..iters {
            run(&mut out)?;
        }
        st.synchronize().map_err(drv)?;
        let per = started.elapsed().as_secs_f64() / iters.max(1) as f64;
        let host = st.clone_dtoh(&out).map_err(drv)?;
        Ok((host, per))
    }
}
