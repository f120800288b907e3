//! Projections for either weight format: cuBLAS GEMM for bf16 weights; for FP8, the GEMV
//! kernel at ≤ `GEMV_MAX_ROWS` tokens, else cuBLAS over slices of rows dequantized into the
//! scratch buffer.

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg};

use super::{cfg, drv, i32_of, Gpu, Kernels};
use crate::serve::backend::cuda::launch;
use crate::serve::backend::cuda::CudaError;

/// A projection weight `[n, k]` on the device.
pub(super) enum Weight {
    Bf16(CudaSlice<u16>),
    /// E4M3 codes and one f32 scale per output row.
    Fp8 {
        codes: CudaSlice<u8>,
        scales: CudaSlice<f32>,
    },
}

impl Gpu {
    /// `out[T, n] = x[T, k] · w[n, k]ᵀ` with bf16 inputs and f32 accumulation into columns
    /// `0..n` of an output whose rows are `ldc` wide; `out_f32` picks the output type (f32 for
    /// logits, else bf16).
    #[allow(unsafe_code, clippy::too_many_arguments)]
    pub(super) fn gemm<W: DevicePtr<u16>, X: DevicePtr<u16>, O: DevicePtrMut<T>, T>(
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
    pub(super) fn linear<T: DeviceRepr>(
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
        let (n_i, k_i) = (i32_of(n, "linear n")?, i32_of(k, "linear k")?);
        let (codes, scales) = match (w, &kern.gemv_bf16) {
            (Weight::Bf16(w), Some((bf, bf_f32)))
                if tokens <= launch::GEMV_MAX_ROWS && k.is_multiple_of(16) =>
            {
                let rows_i = i32_of(tokens, "linear rows")?;
                // SAFETY: `gemv_bf16(_f32)(out, w, x, n, k, rows)`; w is [n, k], x holds
                // `tokens` rows of k, out `tokens` rows of n (workspace-sized).
                unsafe {
                    stream
                        .launch_builder(if out_f32 { bf_f32 } else { bf })
                        .arg(&mut *out)
                        .arg(w)
                        .arg(x)
                        .arg(&n_i)
                        .arg(&k_i)
                        .arg(&rows_i)
                        .launch(cfg(launch::gemv_launch(n, k, tokens)?))
                        .map_err(drv)?;
                }
                return Ok(());
            }
            (Weight::Bf16(w), _) => {
                return Self::gemm(blas, stream, out, out_f32, w, x, tokens, n, k, n)
            }
            (Weight::Fp8 { codes, scales }, _) => (codes, scales),
        };
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
        // Whole multiples of 8 rows, so every slice's output columns start 16-byte aligned
        // (cuBLAS picks its vectorised kernels by pointer alignment).
        let slice_rows = (scratch.len() / k / 8 * 8).clamp(1, n);
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
}
