//! GGUF model files (llama.cpp's single-file format): the header and tensor table
//! ([`header`]), the file memory-mapped so quantized weights are used where they lie
//! ([`GgufFile`]), and what a Qwen2 model needs from it: hyper-parameters and weights
//! ([`qwen2`]), the tokenizer and chat template ([`tokenizer`]).

pub mod header;
pub mod qwen2;
pub mod tokenizer;
pub mod types;
pub mod writer;

use std::path::{Path, PathBuf};

pub use header::{Header, TensorInfo, Value};
pub use types::GgmlType;

use super::matrix::SharedBytes;

/// Everything wrong with a GGUF file, each naming what and where.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    #[error("not a GGUF file (first bytes {magic})")]
    NotGguf { magic: String },
    #[error("GGUF version {version} is not supported (supported: 2, 3){}", if *.big_endian { "; the file looks big-endian" } else { "" })]
    Version { version: u32, big_endian: bool },
    #[error("file is truncated: it ends at byte {len} while reading {what}")]
    Truncated { len: u64, what: String },
    #[error("corrupt header at byte {at}: {reason}")]
    Corrupt { at: u64, reason: String },
    #[error("metadata \"{key}\": {reason}")]
    Metadata { key: String, reason: String },
    #[error(
        "file is truncated: tensor \"{name}\" ends at byte {end} but the file has {len} bytes"
    )]
    TruncatedData { name: String, end: u64, len: u64 },
    #[error(
        "tensor \"{name}\" has type {ty}, which is not supported (supported: {})",
        types::SUPPORTED
    )]
    UnsupportedType { name: String, ty: String },
    #[error("tensor \"{name}\": {reason}")]
    Tensor { name: String, reason: String },
    #[error("missing tensor \"{0}\"")]
    MissingTensor(String),
}

/// A GGUF file: the parsed header over the memory-mapped bytes.
pub struct GgufFile {
    path: PathBuf,
    bytes: SharedBytes,
    header: Header,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("len", &self.bytes.len())
            .field("version", &self.header.version)
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

/// Why a GGUF file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: GgufError,
    },
}

impl GgufFile {
    /// Maps `path` and parses its header. Tensor data is checked lazily, per tensor, when it is
    /// taken (so the cost is the header's, and an unused tensor of an unknown type is no error).
    pub fn open(path: &Path) -> Result<GgufFile, OpenError> {
        let io = |source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let bytes = SharedBytes::map(&file).map_err(io)?;
        Self::from_bytes(path, bytes).map_err(|source| OpenError::Gguf {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses a file already in memory (tests); `path` only names it.
    pub fn from_bytes(path: &Path, bytes: SharedBytes) -> Result<GgufFile, GgufError> {
        let header = Header::parse(&bytes)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            bytes,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.header.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            other => Err(wrong_type(key, "a string", other)),
        }
    }

    /// A required non-negative integer of any width.
    pub fn usize(&self, key: &str) -> Result<usize, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| wrong_type(key, "a non-negative integer", v))
    }

    /// An optional non-negative integer.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }

    /// An optional float (f32 or f64).
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| wrong_type(key, "a float", v)),
        }
    }

    /// An optional bool.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(key, "a bool", v)),
        }
    }

    /// A required array, element by element.
    pub fn array(&self, key: &str) -> Result<&[Value], GgufError> {
        match self.require(key)? {
            Value::Array(items) => Ok(items),
            other => Err(wrong_type(key, "an array", other)),
        }
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::Metadata {
            key: key.to_string(),
            reason: "missing".into(),
        })
    }

    /// The bytes of tensor `name`, checked: a supported type, whole blocks per row, and every
    /// byte inside the file.
    pub fn tensor(&self, name: &str) -> Result<(GgmlType, Vec<usize>, SharedBytes), GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        let ty = GgmlType::from_id(info.type_id).ok_or_else(|| GgufError::UnsupportedType {
            name: name.to_string(),
            ty: types::describe_type_id(info.type_id),
        })?;
        let bad = |reason: String| GgufError::Tensor {
            name: name.to_string(),
            reason,
        };
        let dims: Vec<usize> = info
            .dims
            .iter()
            .map(|d| usize::try_from(*d))
            .collect::<Result<_, _>>()
            .map_err(|_| bad(format!("dimensions {:?} do not fit in memory", info.dims)))?;
        let row = dims[0];
        let row_bytes = ty.row_bytes(row).ok_or_else(|| {
            bad(format!(
                "rows of {row} elements are not whole {} blocks of {}",
                ty.name(),
                ty.block_len()
            ))
        })?;
        let rows = dims[1..].iter().product::<usize>();
        let len = row_bytes
            .checked_mul(rows)
            .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
        let start = self.header.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(len as u64));
        let file_len = self.bytes.len() as u64;
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => {
                Ok((ty, dims, self.bytes.slice(start as usize..end as usize)))
            }
            _ => Err(GgufError::TruncatedData {
                name: name.to_string(),
                end: end.unwrap_or(u64::MAX),
                len: file_len,
            }),
        }
    }
}

fn wrong_type(key: &str, want: &str, got: &Value) -> GgufError {
    GgufError::Metadata {
        key: key.to_string(),
        reason: format!("expected {want}, found {}", got.type_name()),
    }
}

#[cfg(test)]
mod tests;
