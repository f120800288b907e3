//! A minimal GGUF v3 writer (metadata, tensors, alignment) and the two simplest ggml quantizers
//! (Q8_0, Q5_0, ggml's reference rounding), for building test files and tiny models; the
//! server only reads GGUF.

use half::f16;

use super::header::Value;
use super::GgmlType;

/// Collects metadata and tensors, then serialises them.
#[derive(Debug, Default, Clone)]
pub struct GgufWriter {
    kv: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    alignment: Option<u64>,
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Adds a metadata entry (`general.alignment` also sets the data alignment).
    pub fn kv(&mut self, key: &str, v: Value) -> &mut Self {
        if key == "general.alignment" {
            self.alignment = v.as_u64();
        }
        self.kv.push((key.to_string(), v));
        self
    }

    /// Adds a tensor: `dims[0]` is the contiguous dimension; `data` its encoded blocks.
    pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), type_id, data));
        self
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment.unwrap_or(32).max(1) as usize;
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend(type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len()).div_ceil(align) * align;
        }
        out.resize(out.len().div_ceil(align) * align, 0);
        let base = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(base + off, 0);
            out.extend(data);
        }
        out
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            // An empty array is written as an array of u8.
            out.extend(items.first().map_or(0, type_id).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
    }
}

/// Strings as a metadata array.
pub fn strings<S: AsRef<str>>(items: &[S]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|s| Value::String(s.as_ref().to_string()))
            .collect(),
    )
}

/// Encodes `x` (a whole number of blocks) as `ty`; only F32, Q8_0 and Q5_0 have an encoder here.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => out.extend(x.iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::Q8_0 => {
            for blk in x.chunks_exact(32) {
                let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_bits().to_le_bytes());
                out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q5_0 => {
            for blk in x.chunks_exact(32) {
                // ggml's quantize_row_q5_0_ref: the largest-magnitude value maps to -16.
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in blk {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -16.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u32> = blk
                    .iter()
                    .map(|v| ((v * id + 16.5) as i32).clamp(0, 31) as u32)
                    .collect();
                let mut qh = 0u32;
                let mut qs = [0u8; 16];
                for j in 0..16 {
                    qs[j] = (q[j] & 15) as u8 | (((q[j + 16] & 15) as u8) << 4);
                    qh |= ((q[j] >> 4) << j) | ((q[j + 16] >> 4) << (j + 16));
                }
                out.extend(f16::from_f32(d).to_bits().to_le_bytes());
                out.extend(qh.to_le_bytes());
                out.extend(qs);
            }
        }
        GgmlType::Q4K | GgmlType::Q6K => return None,
    }
    if !x.len().is_multiple_of(ty.block_len()) {
        return None;
    }
    Some(out)
}
