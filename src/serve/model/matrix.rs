//! Weight matrices as the forward pass sees them: f32 rows (safetensors checkpoints, tests) or
//! ggml-quantized rows left where they lie in a memory-mapped GGUF file.

use std::ops::Range;
use std::sync::Arc;

use super::gguf::GgmlType;

/// A shared, immutable byte range: a slice of a memory-mapped file, or of an owned buffer.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({:?})", self.range)
    }
}

impl SharedBytes {
    /// Maps `file` read-only.
    #[allow(unsafe_code)]
    pub fn map(file: &std::fs::File) -> std::io::Result<SharedBytes> {
        // SAFETY: the map is read-only and never handed out mutably. As with every mmap, a
        // process that truncates or rewrites the file while it is mapped changes what we read
        // (or raises SIGBUS); model files are not modified while served, and the alternative,
        // reading 0.5-2 GB into anonymous memory, costs that much RSS per replica.
        let map = unsafe { memmap2::Mmap::map(file)? };
        let len = map.len();
        Ok(SharedBytes {
            owner: Arc::new(map),
            range: 0..len,
        })
    }

    pub fn from_vec(bytes: Vec<u8>) -> SharedBytes {
        let len = bytes.len();
        SharedBytes {
            owner: Arc::new(bytes),
            range: 0..len,
        }
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// A sub-range (relative to this one). Panics when out of range: callers check first.
    pub fn slice(&self, r: Range<usize>) -> SharedBytes {
        assert!(
            r.start <= r.end && r.end <= self.len(),
            "slice {r:?} of {}",
            self.len()
        );
        SharedBytes {
            owner: Arc::clone(&self.owner),
            range: self.range.start + r.start..self.range.start + r.end,
        }
    }
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }
}

/// A `[rows × cols]` matrix of ggml blocks, row-major; each row is `cols / block_len` blocks.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    data: SharedBytes,
}

impl QuantMatrix {
    /// Checks that `data` is exactly `rows` rows of `cols` elements of `ty`.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: SharedBytes,
    ) -> Result<QuantMatrix, String> {
        let row_bytes = ty
            .row_bytes(cols)
            .ok_or_else(|| format!("{cols} columns are not whole {} blocks", ty.name()))?;
        if row_bytes.checked_mul(rows) != Some(data.len()) {
            return Err(format!(
                "{} bytes for {rows} rows of {cols} {} elements",
                data.len(),
                ty.name()
            ));
        }
        Ok(QuantMatrix {
            ty,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The blocks of row `r` (`r < rows`).
    #[inline]
    pub fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// The blocks of rows `range`.
    #[inline]
    pub fn rows_bytes(&self, range: Range<usize>) -> &[u8] {
        &self.data[range.start * self.row_bytes..range.end * self.row_bytes]
    }
}

/// A linear layer's weight `[out_features × in_features]`, row-major.
#[derive(Debug, Clone)]
pub enum Matrix {
    F32(Vec<f32>),
    Quant(QuantMatrix),
}

impl Matrix {
    /// Bytes the weights occupy (mapped or owned).
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::F32(v) => v.len() * 4,
            Matrix::Quant(q) => q.rows * q.row_bytes,
        }
    }
}

impl From<Vec<f32>> for Matrix {
    fn from(v: Vec<f32>) -> Matrix {
        Matrix::F32(v)
    }
}
