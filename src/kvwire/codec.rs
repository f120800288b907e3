//! msgpack encoding and decoding of [`EventBatch`]es.
//!
//! Encoding writes exactly what msgspec writes for vLLM's array-like structs (smallest integer
//! forms, float64 timestamps, `nil` for `None` fields that have no default). Decoding reads the
//! payload into a small borrowed value tree first, with limits on depth and element counts (an
//! element takes at least one byte, so no length header can make it allocate more than the
//! payload's size), then maps it to events; any mismatch is a [`WireError`], never a panic.

use super::{BlockRemoved, BlockStored, Event, EventBatch};

/// Why a payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated msgpack at byte {0}")]
    Truncated(usize),
    #[error("msgpack marker 0x{marker:02x} at byte {at} is reserved or unsupported")]
    BadMarker { marker: u8, at: usize },
    #[error("msgpack nesting deeper than {0}")]
    TooDeep(usize),
    #[error("{0} trailing bytes after the batch")]
    Trailing(usize),
    #[error("invalid UTF-8 in a msgpack string at byte {0}")]
    Utf8(usize),
    #[error("{what}: expected {expected}")]
    Shape {
        what: &'static str,
        expected: &'static str,
    },
    #[error("unknown event tag {0:?}")]
    UnknownTag(String),
    #[error("batch has {got} events, more than the limit {limit}")]
    TooManyEvents { got: usize, limit: usize },
}

/// Bounds on what one payload may hold.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_events: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_events: 65_536 }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn put_uint(out: &mut Vec<u8>, v: u64) {
    let _ = rmp::encode::write_uint(out, v);
}

fn put_int(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        put_uint(out, v as u64);
    } else {
        let _ = rmp::encode::write_sint(out, v);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let _ = rmp::encode::write_str(out, s);
}

fn put_nil(out: &mut Vec<u8>) {
    let _ = rmp::encode::write_nil(out);
}

fn put_array_len(out: &mut Vec<u8>, n: usize) {
    let _ = rmp::encode::write_array_len(out, u32::try_from(n).unwrap_or(u32::MAX));
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(out, s),
        None => put_nil(out),
    }
}

fn put_hashes(out: &mut Vec<u8>, hashes: &[u64]) {
    put_array_len(out, hashes.len());
    for &h in hashes {
        put_uint(out, h);
    }
}

/// Appends the msgpack encoding of `batch` to `out` (hashes as integers, as vLLM writes them
/// with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`).
pub fn encode_batch(batch: &EventBatch, out: &mut Vec<u8>) {
    // msgspec writes every field of an array-like struct, defaults included (None as nil).
    put_array_len(out, 3);
    let _ = rmp::encode::write_f64(out, batch.ts);
    put_array_len(out, batch.events.len());
    for ev in &batch.events {
        match ev {
            Event::Stored(s) => {
                // lora_id, medium and lora_name have no default: always written.
                put_array_len(out, 8);
                put_str(out, "BlockStored");
                put_hashes(out, &s.block_hashes);
                match s.parent_block_hash {
                    Some(h) => put_uint(out, h),
                    None => put_nil(out),
                }
                put_array_len(out, s.token_ids.len());
                for &t in &s.token_ids {
                    put_uint(out, u64::from(t));
                }
                put_uint(out, u64::from(s.block_size));
                match s.lora_id {
                    Some(id) => put_int(out, id),
                    None => put_nil(out),
                }
                put_opt_str(out, s.medium.as_deref());
                put_opt_str(out, s.lora_name.as_deref());
            }
            Event::Removed(r) => {
                put_array_len(out, 3);
                put_str(out, "BlockRemoved");
                put_hashes(out, &r.block_hashes);
                put_opt_str(out, r.medium.as_deref());
            }
            Event::AllCleared => {
                put_array_len(out, 1);
                put_str(out, "AllBlocksCleared");
            }
        }
    }
    match batch.data_parallel_rank {
        Some(rank) => put_int(out, rank),
        None => put_nil(out),
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding: bytes → Value

const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq)]
enum Value<'a> {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    Float(f64),
    Str(&'a str),
    Bin(&'a [u8]),
    Array(Vec<Value<'a>>),
    Map(Vec<(Value<'a>, Value<'a>)>),
    /// Extension types are skipped (vLLM writes none).
    Ext,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(WireError::Truncated(self.pos))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(WireError::Truncated(self.pos))?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn len(&mut self, bytes: usize) -> Result<usize, WireError> {
        Ok(match bytes {
            1 => usize::from(self.u8()?),
            2 => usize::from(u16::from_be_bytes(self.be()?)),
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    fn str(&mut self, n: usize) -> Result<Value<'a>, WireError> {
        let at = self.pos;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(Value::Str)
            .map_err(|_| WireError::Utf8(at))
    }

    /// Checks that `n` elements of at least `min_bytes` each can still follow.
    fn room(&self, n: usize, min_bytes: usize) -> Result<(), WireError> {
        let left = self.buf.len() - self.pos;
        if n.saturating_mul(min_bytes) > left {
            return Err(WireError::Truncated(self.pos));
        }
        Ok(())
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value<'a>, WireError> {
        self.room(n, 1)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(v))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value<'a>, WireError> {
        self.room(n, 2)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.value(depth + 1)?;
            v.push((k, self.value(depth + 1)?));
        }
        Ok(Value::Map(v))
    }

    fn ext(&mut self, n: usize) -> Result<Value<'a>, WireError> {
        self.take(n.saturating_add(1))?; // type byte + data
        Ok(Value::Ext)
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>, WireError> {
        if depth > MAX_DEPTH {
            return Err(WireError::TooDeep(MAX_DEPTH));
        }
        let at = self.pos;
        let m = self.u8()?;
        Ok(match m {
            0x00..=0x7f => Value::Uint(u64::from(m)),
            0x80..=0x8f => self.map(usize::from(m & 0x0f), depth)?,
            0x90..=0x9f => self.array(usize::from(m & 0x0f), depth)?,
            0xa0..=0xbf => self.str(usize::from(m & 0x1f))?,
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => {
                let n = self.len(1 << (m - 0xc4))?;
                Value::Bin(self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = self.len(1 << (m - 0xc7))?;
                self.ext(n)?
            }
            0xca => Value::Float(f64::from(f32::from_be_bytes(self.be()?))),
            0xcb => Value::Float(f64::from_be_bytes(self.be()?)),
            0xcc => Value::Uint(u64::from(self.u8()?)),
            0xcd => Value::Uint(u64::from(u16::from_be_bytes(self.be()?))),
            0xce => Value::Uint(u64::from(u32::from_be_bytes(self.be()?))),
            0xcf => Value::Uint(u64::from_be_bytes(self.be()?)),
            0xd0 => Value::Int(i64::from(i8::from_be_bytes(self.be()?))),
            0xd1 => Value::Int(i64::from(i16::from_be_bytes(self.be()?))),
            0xd2 => Value::Int(i64::from(i32::from_be_bytes(self.be()?))),
            0xd3 => Value::Int(i64::from_be_bytes(self.be()?)),
            0xd4..=0xd8 => self.ext(1 << (m - 0xd4))?,
            0xd9..=0xdb => {
                let n = self.len(1 << (m - 0xd9))?;
                self.str(n)?
            }
            0xdc | 0xdd => {
                let n = self.len(if m == 0xdc { 2 } else { 4 })?;
                self.array(n, depth)?
            }
            0xde | 0xdf => {
                let n = self.len(if m == 0xde { 2 } else { 4 })?;
                self.map(n, depth)?
            }
            0xe0..=0xff => Value::Int(i64::from(m as i8)),
            0xc1 => return Err(WireError::BadMarker { marker: m, at }),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding: Value → events

fn shape(what: &'static str, expected: &'static str) -> WireError {
    WireError::Shape { what, expected }
}

fn as_u64(v: &Value<'_>, what: &'static str) -> Result<u64, WireError> {
    match *v {
        Value::Uint(u) => Ok(u),
        Value::Int(i) if i >= 0 => Ok(i as u64),
        _ => Err(shape(what, "a non-negative integer")),
    }
}

fn as_opt_i64(v: Option<&Value<'_>>, what: &'static str) -> Result<Option<i64>, WireError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Int(i)) => Ok(Some(*i)),
        Some(Value::Uint(u)) => i64::try_from(*u)
            .map(Some)
            .map_err(|_| shape(what, "an integer")),
        Some(_) => Err(shape(what, "an integer or nil")),
    }
}

fn as_opt_str(v: Option<&Value<'_>>, what: &'static str) -> Result<Option<String>, WireError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Str(s)) => Ok(Some((*s).to_string())),
        Some(_) => Err(shape(what, "a string or nil")),
    }
}

/// An engine key: an integer as is, a byte string as its last 8 bytes big-endian (left-padded
/// with zeros when shorter), like llm-d-kv-cache.
fn as_hash(v: &Value<'_>, what: &'static str) -> Result<u64, WireError> {
    match *v {
        Value::Uint(u) => Ok(u),
        // Python ints are unbounded; msgpack carries negatives as signed. Keep the bits.
        Value::Int(i) => Ok(i as u64),
        Value::Bin(b) if !b.is_empty() => {
            let tail = &b[b.len().saturating_sub(8)..];
            let mut a = [0u8; 8];
            a[8 - tail.len()..].copy_from_slice(tail);
            Ok(u64::from_be_bytes(a))
        }
        _ => Err(shape(what, "an integer or non-empty bytes")),
    }
}

fn as_hashes(v: &Value<'_>, what: &'static str) -> Result<Vec<u64>, WireError> {
    match v {
        Value::Array(items) => items.iter().map(|h| as_hash(h, what)).collect(),
        _ => Err(shape(what, "an array of hashes")),
    }
}

/// Event fields in declaration order, from the array or the map form.
struct Fields<'v, 'a> {
    positional: &'v [Value<'a>],
    named: Option<&'v [(Value<'a>, Value<'a>)]>,
}

impl<'v, 'a> Fields<'v, 'a> {
    /// Field `i` (1-based in the array form, after the tag) called `name`.
    fn get(&self, i: usize, name: &str) -> Option<&'v Value<'a>> {
        match self.named {
            Some(pairs) => pairs
                .iter()
                .find(|(k, _)| *k == Value::Str(name))
                .map(|(_, v)| v),
            None => self.positional.get(i),
        }
    }

    fn required(&self, i: usize, name: &'static str) -> Result<&'v Value<'a>, WireError> {
        self.get(i, name).ok_or(shape(name, "present"))
    }
}

fn event(v: &Value<'_>) -> Result<Event, WireError> {
    let (tag, fields) = match v {
        Value::Array(items) => match items.first() {
            Some(Value::Str(tag)) => (
                *tag,
                Fields {
                    positional: items,
                    named: None,
                },
            ),
            _ => return Err(shape("event", "an array starting with its tag")),
        },
        Value::Map(pairs) => match pairs.iter().find(|(k, _)| *k == Value::Str("type")) {
            Some((_, Value::Str(tag))) => (
                *tag,
                Fields {
                    positional: &[],
                    named: Some(pairs),
                },
            ),
            _ => return Err(shape("event", "a map with a string \"type\"")),
        },
        _ => return Err(shape("event", "an array or a map")),
    };
    match tag {
        "BlockStored" => {
            let block_hashes = as_hashes(fields.required(1, "block_hashes")?, "block_hashes")?;
            let parent_block_hash = match fields.required(2, "parent_block_hash")? {
                Value::Nil => None,
                h => Some(as_hash(h, "parent_block_hash")?),
            };
            let token_ids = match fields.required(3, "token_ids")? {
                Value::Array(ids) => ids
                    .iter()
                    .map(|t| {
                        as_u64(t, "token_ids")
                            .and_then(|t| u32::try_from(t).map_err(|_| shape("token_ids", "u32")))
                    })
                    .collect::<Result<Vec<u32>, _>>()?,
                _ => return Err(shape("token_ids", "an array")),
            };
            let block_size =
                u32::try_from(as_u64(fields.required(4, "block_size")?, "block_size")?)
                    .map_err(|_| shape("block_size", "a u32"))?;
            Ok(Event::Stored(BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id: as_opt_i64(fields.get(5, "lora_id"), "lora_id")?,
                medium: as_opt_str(fields.get(6, "medium"), "medium")?,
                lora_name: as_opt_str(fields.get(7, "lora_name"), "lora_name")?,
            }))
        }
        "BlockRemoved" => Ok(Event::Removed(BlockRemoved {
            block_hashes: as_hashes(fields.required(1, "block_hashes")?, "block_hashes")?,
            medium: as_opt_str(fields.get(2, "medium"), "medium")?,
        })),
        "AllBlocksCleared" => Ok(Event::AllCleared),
        other => Err(WireError::UnknownTag(other.chars().take(64).collect())),
    }
}

/// Decodes one msgpack `KVEventBatch` payload.
pub fn decode_batch(payload: &[u8], limits: DecodeLimits) -> Result<EventBatch, WireError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let root = r.value(0)?;
    if r.pos != payload.len() {
        return Err(WireError::Trailing(payload.len() - r.pos));
    }
    let (ts, events, rank) = match &root {
        Value::Array(items) => (items.first(), items.get(1), items.get(2)),
        Value::Map(pairs) => {
            let get = |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == Value::Str(name))
                    .map(|(_, v)| v)
            };
            (get("ts"), get("events"), get("data_parallel_rank"))
        }
        _ => return Err(shape("batch", "an array or a map")),
    };
    let ts = match ts {
        Some(Value::Float(f)) => *f,
        Some(Value::Uint(u)) => *u as f64,
        Some(Value::Int(i)) => *i as f64,
        _ => return Err(shape("ts", "a number")),
    };
    let events = match events {
        Some(Value::Array(evs)) => evs,
        _ => return Err(shape("events", "an array")),
    };
    if events.len() > limits.max_events {
        return Err(WireError::TooManyEvents {
            got: events.len(),
            limit: limits.max_events,
        });
    }
    Ok(EventBatch {
        ts,
        events: events.iter().map(event).collect::<Result<_, _>>()?,
        data_parallel_rank: as_opt_i64(rank, "data_parallel_rank")?,
    })
}
