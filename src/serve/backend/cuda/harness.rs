//! Stand-alone launches of the kernels on host data, for the kernel-level GPU tests
//! (`tests/cuda_kernels.rs`) and the benchmarks (`benches/cuda_decode.rs`): paged attention
//! (any split-K partition size) and reshape-and-cache ([`AttentionHarness`]), the GEMV and FP8
//! dequantization, and the fused kernels next to the pairs they replace ([`KernelHarness`]).
//! Not used by the serving path.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::compile::{compile_cubin, ComputeCapability};
use super::fp8::Fp8Matrix;
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

    /// Runs attention over `rows` `iters` times with 512-key partitions; returns the output
    /// (`[rows, heads · head_size]` bf16 bits) and the mean seconds per launch (main + reduce).
    pub fn attention(&mut self, rows: &Rows, iters: usize) -> Result<(Vec<u16>, f64), CudaError> {
        self.attention_split(rows, iters, launch::PARTITION_SIZE)
    }

    /// [`AttentionHarness::attention`] with `partition_size`-key partitions (split-K).
    #[allow(unsafe_code)]
    pub fn attention_split(
        &mut self,
        rows: &Rows,
        iters: usize,
        partition_size: usize,
    ) -> Result<(Vec<u16>, f64), CudaError> {
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
        let plan = launch::plan_attention_split(&shape, partition_size)?;
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
        let logits_len = i32_of(plan.logits_len)?;
        let part_size = i32_of(plan.partition_size)?;
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
                    .arg(&part_size)
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
                        .arg(&part_size)
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

/// The device's SM count (split-K planning in benchmarks and tests).
pub fn sm_count() -> Result<usize, CudaError> {
    super::probe::probe()?;
    let ctx = CudaContext::new(0).map_err(drv)?;
    let n = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .map_err(drv)?;
    Ok(n.max(1) as usize)
}

/// One prepared launch, repeated for timing.
type Launcher<'a> = Box<dyn FnMut(&mut CudaSlice<u16>) -> Result<(), CudaError> + 'a>;

/// Weights of a stand-alone GEMV.
pub enum GemvWeights<'a> {
    Bf16(&'a [u16]),
    Fp8(&'a Fp8Matrix),
}

/// Output of the rotary-embedding + cache-write launches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopeCacheOut {
    /// The QKV buffer after the launch (Q rotated in place).
    pub qkv: Vec<u16>,
    pub key_cache: Vec<u16>,
    pub value_cache: Vec<u16>,
}

/// One device and the whole kernel module, for the non-attention kernels.
pub struct KernelHarness {
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    f: std::collections::HashMap<&'static str, CudaFunction>,
}

impl KernelHarness {
    pub fn new() -> Result<KernelHarness, CudaError> {
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
        let mut f = std::collections::HashMap::new();
        for name in super::compile::KERNEL_NAMES {
            f.insert(name, module.load_function(name).map_err(drv)?);
        }
        Ok(KernelHarness {
            stream: ctx.default_stream(),
            _ctx: ctx,
            f,
        })
    }

    fn func(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.f
            .get(name)
            .ok_or_else(|| CudaError::Launch(format!("kernel {name} not loaded")))
    }

    /// `out[rows, n]` (bf16 bits) = x `[rows, k]` (bf16 bits) · wᵀ through `gemv_fp8` or
    /// `gemv_bf16`; also the mean seconds per launch over `iters` more launches.
    #[allow(unsafe_code)]
    pub fn gemv(
        &self,
        w: GemvWeights<'_>,
        x: &[u16],
        n: usize,
        k: usize,
        rows: usize,
        iters: usize,
    ) -> Result<(Vec<u16>, f64), CudaError> {
        let st = &self.stream;
        if x.len() != rows * k {
            return Err(CudaError::Launch("x is not rows × k".into()));
        }
        let l = launch::gemv_launch(n, k, rows)?;
        let x_d = st.clone_htod(x).map_err(drv)?;
        let mut out = st.alloc_zeros::<u16>(rows * n).map_err(drv)?;
        let (n_i, k_i, r_i) = (i32_of(n)?, i32_of(k)?, i32_of(rows)?);
        let mut run: Launcher<'_> = match w {
            GemvWeights::Bf16(w) => {
                if w.len() != n * k {
                    return Err(CudaError::Launch("w is not n × k".into()));
                }
                let w_d = st.clone_htod(w).map_err(drv)?;
                let f = self.func("gemv_bf16")?.clone();
                Box::new(move |out| {
                    // SAFETY: `gemv_bf16(out, w, x, n, k, rows)` with buffers of those sizes.
                    unsafe {
                        st.launch_builder(&f)
                            .arg(out)
                            .arg(&w_d)
                            .arg(&x_d)
                            .arg(&n_i)
                            .arg(&k_i)
                            .arg(&r_i)
                            .launch(cfg(l))
                            .map_err(drv)?;
                    }
                    Ok(())
                })
            }
            GemvWeights::Fp8(m) => {
                if m.rows != n || m.cols != k {
                    return Err(CudaError::Launch("FP8 matrix is not n × k".into()));
                }
                let c_d = st.clone_htod(&m.codes).map_err(drv)?;
                let s_d = st.clone_htod(&m.scales).map_err(drv)?;
                let f = self.func("gemv_fp8")?.clone();
                Box::new(move |out| {
                    // SAFETY: `gemv_fp8(out, w, scales, x, n, k, rows)` with buffers of those
                    // sizes.
                    unsafe {
                        st.launch_builder(&f)
                            .arg(out)
                            .arg(&c_d)
                            .arg(&s_d)
                            .arg(&x_d)
                            .arg(&n_i)
                            .arg(&k_i)
                            .arg(&r_i)
                            .launch(cfg(l))
                            .map_err(drv)?;
                    }
                    Ok(())
                })
            }
        };
        run(&mut out)?;
        st.synchronize().map_err(drv)?;
        let started = Instant::now();
        for _ in 0..iters {
            run(&mut out)?;
        }
        st.synchronize().map_err(drv)?;
        let per = started.elapsed().as_secs_f64() / iters.max(1) as f64;
        Ok((st.clone_dtoh(&out).map_err(drv)?, per))
    }

    /// Every row of `m` dequantized to bf16 bits by `fp8_dequant_rows`.
    #[allow(unsafe_code)]
    pub fn fp8_dequant(&self, m: &Fp8Matrix) -> Result<Vec<u16>, CudaError> {
        let st = &self.stream;
        let c_d = st.clone_htod(&m.codes).map_err(drv)?;
        let s_d = st.clone_htod(&m.scales).map_err(drv)?;
        let mut out = st
            .alloc_zeros::<u16>((m.rows * m.cols).max(1))
            .map_err(drv)?;
        let (zero, r_i, k_i) = (0i32, i32_of(m.rows)?, i32_of(m.cols)?);
        // SAFETY: `fp8_dequant_rows(out, w, scales, row0, rows, k)` over the whole matrix.
        unsafe {
            st.launch_builder(self.func("fp8_dequant_rows")?)
                .arg(&mut out)
                .arg(&c_d)
                .arg(&s_d)
                .arg(&zero)
                .arg(&r_i)
                .arg(&k_i)
                .launch(cfg(launch::elementwise_launch(m.rows * m.cols)?))
                .map_err(drv)?;
        }
        st.clone_dtoh(&out).map_err(drv)
    }

    /// `hidden += branch; out = rms_norm(hidden) · weight` over `rows` rows, fused
    /// (`fused_add_rms_norm`) or as `residual_add` then `rms_norm`; returns (hidden, out bits).
    #[allow(unsafe_code)]
    pub fn add_rms_norm(
        &self,
        fused: bool,
        hidden: &[f32],
        branch: &[u16],
        weight: &[u16],
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<u16>), CudaError> {
        let st = &self.stream;
        let h = weight.len();
        let rows = hidden.len() / h.max(1);
        let mut hid = st.clone_htod(hidden).map_err(drv)?;
        let br = st.clone_htod(branch).map_err(drv)?;
        let w = st.clone_htod(weight).map_err(drv)?;
        let mut out = st.alloc_zeros::<u16>(hidden.len().max(1)).map_err(drv)?;
        let rows_d = st.alloc_zeros::<i32>(1).map_err(drv)?;
        let (h_i, zero) = (i32_of(h)?, 0i32);
        let n_i = i32_of(hidden.len())?;
        let row = launch::row_launch(rows)?;
        // SAFETY: argument lists match the kernels; buffers hold rows × h elements.
        unsafe {
            if fused {
                st.launch_builder(self.func("fused_add_rms_norm")?)
                    .arg(&mut out)
                    .arg(&mut hid)
                    .arg(&br)
                    .arg(&w)
                    .arg(&h_i)
                    .arg(&eps)
                    .launch(cfg(row))
                    .map_err(drv)?;
            } else {
                st.launch_builder(self.func("residual_add")?)
                    .arg(&mut hid)
                    .arg(&br)
                    .arg(&n_i)
                    .launch(cfg(launch::elementwise_launch(hidden.len())?))
                    .map_err(drv)?;
                st.launch_builder(self.func("rms_norm")?)
                    .arg(&mut out)
                    .arg(&hid)
                    .arg(&w)
                    .arg(&rows_d)
                    .arg(&zero)
                    .arg(&h_i)
                    .arg(&eps)
                    .launch(cfg(row))
                    .map_err(drv)?;
            }
        }
        Ok((
            st.clone_dtoh(&hid).map_err(drv)?,
            st.clone_dtoh(&out).map_err(drv)?,
        ))
    }

    /// Bias + RoPE on a `[tokens, width]` QKV buffer and the K/V cache write, fused
    /// (`qkv_bias_rope_cache`) or as `qkv_bias_rope` then `reshape_and_cache`.
    #[allow(unsafe_code, clippy::too_many_arguments)]
    pub fn rope_cache(
        &self,
        fused: bool,
        shape: HarnessShape,
        qkv: &[u16],
        bias: &[u16],
        cos_sin: &[f32],
        positions: &[i32],
        slots: &[i32],
    ) -> Result<RopeCacheOut, CudaError> {
        let st = &self.stream;
        let t = slots.len();
        let len = shape.num_blocks * shape.num_kv_heads * shape.head_size * shape.block_size;
        let mut q = st.clone_htod(qkv).map_err(drv)?;
        let b = st.clone_htod(bias).map_err(drv)?;
        let cs = st.clone_htod(cos_sin).map_err(drv)?;
        let pos = st.clone_htod(positions).map_err(drv)?;
        let sl = st.clone_htod(slots).map_err(drv)?;
        let mut kc = st.alloc_zeros::<u16>(len.max(1)).map_err(drv)?;
        let mut vc = st.alloc_zeros::<u16>(len.max(1)).map_err(drv)?;
        let (h, kvh, d, bs) = (
            i32_of(shape.num_heads)?,
            i32_of(shape.num_kv_heads)?,
            i32_of(shape.head_size)?,
            i32_of(shape.block_size)?,
        );
        let row = launch::Launch {
            shared_mem_bytes: 0,
            ..launch::row_launch(t)?
        };
        // SAFETY: argument lists match the kernels; slots < num_blocks × block_size and
        // positions < cos_sin rows (the caller builds them so).
        unsafe {
            if fused {
                st.launch_builder(self.func("qkv_bias_rope_cache")?)
                    .arg(&mut q)
                    .arg(&b)
                    .arg(&cs)
                    .arg(&pos)
                    .arg(&mut kc)
                    .arg(&mut vc)
                    .arg(&sl)
                    .arg(&h)
                    .arg(&kvh)
                    .arg(&d)
                    .arg(&bs)
                    .launch(cfg(row))
                    .map_err(drv)?;
            } else {
                st.launch_builder(self.func("qkv_bias_rope")?)
                    .arg(&mut q)
                    .arg(&b)
                    .arg(&cs)
                    .arg(&pos)
                    .arg(&h)
                    .arg(&kvh)
                    .arg(&d)
                    .launch(cfg(row))
                    .map_err(drv)?;
                st.launch_builder(self.func("reshape_and_cache")?)
                    .arg(&q)
                    .arg(&mut kc)
                    .arg(&mut vc)
                    .arg(&sl)
                    .arg(&h)
                    .arg(&kvh)
                    .arg(&d)
                    .arg(&bs)
                    .launch(cfg(launch::cache_write_launch(
                        t,
                        shape.num_kv_heads,
                        shape.head_size,
                    )?))
                    .map_err(drv)?;
            }
        }
        let mut out = RopeCacheOut {
            qkv: st.clone_dtoh(&q).map_err(drv)?,
            key_cache: st.clone_dtoh(&kc).map_err(drv)?,
            value_cache: st.clone_dtoh(&vc).map_err(drv)?,
        };
        // Only Q is an output of the fused kernel (K/V go to the cache, V unbiased in QKV).
        let w = shape.width();
        let qw = shape.num_heads * shape.head_size;
        for r in 0..t {
            out.qkv[r * w + qw..(r + 1) * w].fill(0);
        }
        Ok(out)
    }
}
