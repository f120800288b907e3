//! The GGUF header (magic, version, metadata key/values, tensor infos) parsed from bytes, with
//! every length and count checked against the bytes that are actually there before anything is
//! allocated, so a corrupt or hostile file is an error, never a panic or a huge allocation.
//!
//! Format (little-endian, GGUF v2/v3, ggml's `docs/gguf.md`):
//! ```text
//! "GGUF" u32 version  u64 n_tensors  u64 n_kv
//! n_kv ×      { string key, u32 value_type, value }
//! n_tensors × { string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset }
//! padding to `general.alignment` (default 32), then the tensor data; offsets are relative to it
//! string = u64 len + UTF-8 bytes;  array = u32 elem_type + u64 count + elements
//! ```

use std::collections::HashMap;

use super::GgufError;

/// Value types of metadata (`gguf_type`).
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Arrays of arrays are legal; real files nest at most once. A bound keeps recursion shallow.
const MAX_NESTING: usize = 4;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;
/// Metadata values (array elements included) a header may hold. Qwen2.5's vocabulary, merges
/// and token types are ~455k; the cap bounds the in-memory form of a hostile header (an array
/// of a million u8 would otherwise cost 32 bytes per file byte).
const MAX_VALUES: u64 = 4_000_000;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type that is non-negative and fits.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The type name used in errors (`gguf_type_name`).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// One tensor's header entry. `dims[0]` is the contiguous (innermost) dimension, so a linear
/// weight `[out, in]` in PyTorch terms has `dims = [in, out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    /// Raw ggml type id (types this crate cannot compute with are refused when used, not here,
    /// so a file with an unused exotic tensor still loads).
    pub type_id: u32,
    /// Offset of the tensor's first byte from the start of the data section.
    pub offset: u64,
}

/// A parsed header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
}

impl Header {
    /// Parses the header at the start of `bytes` (the whole file, or at least its header).
    pub fn parse(bytes: &[u8]) -> Result<Header, GgufError> {
        let mut r = Reader {
            bytes,
            pos: 0,
            values: 0,
        };
        let magic = r.take(4, "the magic number")?;
        if magic != b"GGUF" {
            return Err(GgufError::NotGguf {
                magic: format!(
                    "{:02x} {:02x} {:02x} {:02x}",
                    magic[0], magic[1], magic[2], magic[3]
                ),
            });
        }
        let version = r.u32("the version")?;
        if version != 2 && version != 3 {
            // A big-endian file reads as a huge little-endian version number.
            return Err(GgufError::Version {
                version,
                big_endian: version.swap_bytes() == 2 || version.swap_bytes() == 3,
            });
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        // Each key/value takes at least 12 bytes, each tensor info at least 28: counts beyond
        // what the file can hold are corrupt, refused before anything is reserved.
        r.check_count(n_kv, 12, "metadata entries")?;
        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            let at = r.pos as u64;
            let key = r.string(&format!("the key of metadata entry {i}"))?;
            let ty = r.u32(&format!("the type of metadata \"{key}\""))?;
            let value = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::Corrupt {
                    at,
                    reason: format!("metadata key \"{key}\" appears twice"),
                });
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::Metadata {
                        key: "general.alignment".into(),
                        reason: format!("{v:?} is not a power of two"),
                    })
                }
            },
        };

        r.check_count(n_tensors, 28, "tensor infos")?;
        let mut tensors: Vec<TensorInfo> = Vec::new();
        let mut seen = HashMap::new();
        for i in 0..n_tensors {
            let at = r.pos as u64;
            let name = r.string(&format!("the name of tensor {i}"))?;
            let n_dims = r.u32(&format!("the dimension count of tensor \"{name}\""))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Corrupt {
                    at,
                    reason: format!("tensor \"{name}\" has {n_dims} dimensions (1 to {MAX_DIMS})"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("the dimensions of tensor \"{name}\""))?);
            }
            let elements = dims.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d));
            if elements.is_none() || dims.contains(&0) {
                return Err(GgufError::Corrupt {
                    at,
                    reason: format!("tensor \"{name}\" has dimensions {dims:?}"),
                });
            }
            let type_id = r.u32(&format!("the type of tensor \"{name}\""))?;
            let offset = r.u64(&format!("the offset of tensor \"{name}\""))?;
            if offset % alignment != 0 {
                return Err(GgufError::Corrupt {
                    at,
                    reason: format!(
                        "tensor \"{name}\" starts at data offset {offset}, not a multiple of the alignment {alignment}"
                    ),
                });
            }
            if seen.insert(name.clone(), i).is_some() {
                return Err(GgufError::Corrupt {
                    at,
                    reason: format!("tensor \"{name}\" appears twice"),
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                type_id,
                offset,
            });
        }
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        Ok(Header {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Metadata values read so far (see [`MAX_VALUES`]).
    values: u64,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                len: self.bytes.len() as u64,
                what: what.to_string(),
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Refuses `count` items of at least `min_bytes` each when the rest of the input cannot
    /// hold them.
    fn check_count(&self, count: u64, min_bytes: u64, what: &str) -> Result<(), GgufError> {
        let fits = count
            .checked_mul(min_bytes)
            .is_some_and(|n| n <= self.remaining() as u64);
        if fits {
            Ok(())
        } else {
            Err(GgufError::Corrupt {
                at: self.pos as u64,
                reason: format!(
                    "{count} {what} cannot fit in the {} bytes left (truncated or corrupt file)",
                    self.remaining()
                ),
            })
        }
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let at = self.pos as u64;
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|n| *n <= self.remaining())
            .ok_or_else(|| GgufError::Truncated {
                len: self.bytes.len() as u64,
                what: format!("{what} ({len} bytes)"),
            })?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| GgufError::Corrupt {
            at,
            reason: format!("{what} is not UTF-8: {e}"),
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, GgufError> {
        let what = || format!("the value of metadata \"{key}\"");
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(GgufError::Corrupt {
                at: self.pos as u64,
                reason: format!("more than {MAX_VALUES} metadata values"),
            });
        }
        Ok(match ty {
            T_U8 => Value::U8(self.array::<1>(&what())?[0]),
            T_I8 => Value::I8(i8::from_le_bytes(self.array(&what())?)),
            T_U16 => Value::U16(u16::from_le_bytes(self.array(&what())?)),
            T_I16 => Value::I16(i16::from_le_bytes(self.array(&what())?)),
            T_U32 => Value::U32(self.u32(&what())?),
            T_I32 => Value::I32(i32::from_le_bytes(self.array(&what())?)),
            T_U64 => Value::U64(self.u64(&what())?),
            T_I64 => Value::I64(i64::from_le_bytes(self.array(&what())?)),
            T_F32 => Value::F32(f32::from_le_bytes(self.array(&what())?)),
            T_F64 => Value::F64(f64::from_le_bytes(self.array(&what())?)),
            T_BOOL => {
                let at = self.pos as u64;
                match self.array::<1>(&what())?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(GgufError::Corrupt {
                            at,
                            reason: format!("metadata \"{key}\": bool byte {b}"),
                        })
                    }
                }
            }
            T_STRING => Value::String(self.string(&what())?),
            T_ARRAY => {
                let at = self.pos as u64;
                if depth >= MAX_NESTING {
                    return Err(GgufError::Corrupt {
                        at,
                        reason: format!(
                            "metadata \"{key}\": arrays nested deeper than {MAX_NESTING}"
                        ),
                    });
                }
                let elem = self.u32(&what())?;
                let n = self.u64(&what())?;
                self.check_count(
                    n,
                    min_value_bytes(elem),
                    &format!("elements of metadata \"{key}\""),
                )?;
                // Capacity grows with what is actually read, not with the claimed count.
                let mut items = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            other => {
                return Err(GgufError::Corrupt {
                    at: self.pos.saturating_sub(4) as u64,
                    reason: format!("metadata \"{key}\" has unknown value type {other}"),
                })
            }
        })
    }
}

/// The fewest bytes a value of type `ty` can take (unknown types fail when read).
fn min_value_bytes(ty: u32) -> u64 {
    match ty {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 | T_STRING => 8,
        T_ARRAY => 12,
        _ => 1,
    }
}
