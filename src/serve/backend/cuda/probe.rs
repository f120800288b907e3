//! Startup probe for the CUDA libraries. cudarc loads libcuda / libnvrtc / libcublas lazily and
//! panics when one is missing, so the backend checks each with cudarc's own non-panicking
//! `is_culib_present` (which tries the same candidate names) before touching any other cudarc
//! call, and turns a miss into a clear error naming the files it tried.

use super::CudaError;

/// One library the backend needs.
#[derive(Debug, Clone, Copy)]
pub struct Library {
    /// cudarc's base name (`cuda`, `nvrtc`, `cublas`).
    pub name: &'static str,
    /// What it is for, in the error message.
    pub role: &'static str,
    present: fn() -> bool,
}

impl Library {
    /// File names tried, in cudarc's order (e.g. `libcuda.so`, …, `libcuda.so.1`).
    pub fn candidates(&self) -> Vec<String> {
        cudarc::get_lib_name_candidates(self.name)
    }
}

#[allow(unsafe_code)]
fn cuda_present() -> bool {
    // SAFETY: only dlopens/dlcloses candidate names; no symbol from the library is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[allow(unsafe_code)]
fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

#[allow(unsafe_code)]
fn cublas_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Driver, runtime compiler, BLAS — in the order a missing one is reported.
pub const LIBRARIES: [Library; 3] = [
    Library {
        name: "cuda",
        role: "CUDA driver",
        present: cuda_present,
    },
    Library {
        name: "nvrtc",
        role: "NVRTC runtime compiler",
        present: nvrtc_present,
    },
    Library {
        name: "cublas",
        role: "cuBLAS",
        present: cublas_present,
    },
];

/// Checks `libs` with their probe functions; the first missing one becomes the error.
pub fn probe_with(libs: &[Library]) -> Result<(), CudaError> {
    for lib in libs {
        if !(lib.present)() {
            let tried = lib.candidates();
            // Keep the message readable: the Linux names, not the Windows-only variants.
            let mut shown: Vec<&str> = Vec::with_capacity(tried.len());
            for n in tried
                .iter()
                .map(String::as_str)
                .filter(|n| n.contains(".so"))
            {
                if !shown.contains(&n) {
                    shown.push(n);
                }
            }
            return Err(CudaError::MissingLibrary {
                role: lib.role,
                tried: if shown.is_empty() {
                    tried.join(", ")
                } else {
                    shown.join(", ")
                },
            });
        }
        tracing::debug!(library = lib.name, "CUDA library found");
    }
    Ok(())
}

/// Checks that the driver, NVRTC and cuBLAS can be loaded. Never panics.
pub fn probe() -> Result<(), CudaError> {
    probe_with(&LIBRARIES)
}

/// Only NVRTC (enough to compile kernels on a machine without a GPU, as the tests do).
pub fn probe_nvrtc() -> Result<(), CudaError> {
    probe_with(&LIBRARIES[1..2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_names_role_and_candidates() {
        let fake = Library {
            name: "cuda",
            role: "CUDA driver",
            present: || false,
        };
        let err = probe_with(&[fake]).unwrap_err().to_string();
        assert!(err.contains("CUDA driver not found"), "{err}");
        assert!(err.contains("libcuda.so.1"), "{err}");
        assert!(err.contains("libcuda.so,"), "{err}");
    }

    #[test]
    fn present_libraries_pass_in_order() {
        let ok = Library {
            name: "nvrtc",
            role: "NVRTC runtime compiler",
            present: || true,
        };
        let missing = Library {
            name: "cublas",
            role: "cuBLAS",
            present: || false,
        };
        assert!(probe_with(&[ok]).is_ok());
        let err = probe_with(&[ok, missing]).unwrap_err().to_string();
        assert!(err.starts_with("cuBLAS not found"), "{err}");
    }

    #[test]
    fn real_probe_never_panics() {
        // On a machine without a driver this is Err; with one, Ok. Either way no panic.
        match probe() {
            Ok(()) => {}
            Err(e) => assert!(e.to_string().contains("not found"), "{e}"),
        }
    }
}
