//! Packs the engine's [`StepBatch`] into the flat `i32` arrays the CUDA kernels read: padded
//! block tables, per-row attention metadata, slot mapping and logits rows. Validation happens
//! here, on the host, because a bad index on the device is silent memory corruption.
//!
//! Attention works on *rows*: every new token is one query row that attends to the keys
//! `0 ..= context_len + j` of its sequence (causal, and aware of chunked prefill because the
//! earlier chunks and prefix-cache hits are already in the paged cache).

use super::super::{BackendError, StepBatch};

/// Device-ready view of one step, reused across steps (cleared, never shrunk).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PackedBatch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<i32>,
    /// Cache slot of every new token (`block * block_size + offset`).
    pub slot_mapping: Vec<i32>,
    /// Per query row: index of its sequence (row of `block_tables`).
    pub row_seq: Vec<i32>,
    /// Per query row: number of keys it attends to.
    pub row_keys: Vec<i32>,
    /// `[num_seqs, max_blocks]` row-major, padded with block 0 (never read: `row_keys` bounds
    /// every access).
    pub block_tables: Vec<i32>,
    pub max_blocks: usize,
    /// Largest `row_keys`.
    pub max_keys: usize,
    pub logits_rows: Vec<i32>,
}

/// Limits the batch is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackLimits {
    pub block_size: usize,
    pub num_blocks: usize,
    pub vocab_size: usize,
    /// Rows of the rotary table (`max_model_len`).
    pub max_position: usize,
    /// Tokens the activation workspace was sized for.
    pub max_tokens: usize,
}

fn invalid(msg: String) -> BackendError {
    BackendError::InvalidBatch(msg)
}

fn to_i32(v: usize, what: &str) -> Result<i32, BackendError> {
    i32::try_from(v).map_err(|_| invalid(format!("{what} {v} does not fit in i32")))
}

impl PackedBatch {
    pub fn clear(&mut self) {
        self.token_ids.clear();
        self.positions.clear();
        self.slot_mapping.clear();
        self.row_seq.clear();
        self.row_keys.clear();
        self.block_tables.clear();
        self.max_blocks = 0;
        self.max_keys = 0;
        self.logits_rows.clear();
    }

    /// Validates `batch` against `lim` and packs it. On error `self` is left cleared.
    pub fn pack(&mut self, batch: &StepBatch, lim: &PackLimits) -> Result<(), BackendError> {
        self.clear();
        let res = self.pack_inner(batch, lim);
        if res.is_err() {
            self.clear();
        }
        res
    }

    fn pack_inner(&mut self, batch: &StepBatch, lim: &PackLimits) -> Result<(), BackendError> {
        let n = batch.token_ids.len();
        if n == 0 {
            return Err(invalid("empty batch".into()));
        }
        if n > lim.max_tokens {
            return Err(invalid(format!(
                "{n} tokens exceed the {} the workspace was sized for",
                lim.max_tokens
            )));
        }
        if batch.positions.len() != n || batch.slot_mapping.len() != n {
            return Err(invalid(format!(
                "{n} tokens but {} positions and {} slots",
                batch.positions.len(),
                batch.slot_mapping.len()
            )));
        }
        if batch.block_tables.len() != batch.seqs.len() {
            return Err(invalid(format!(
                "{} sequences but {} block tables",
                batch.seqs.len(),
                batch.block_tables.len()
            )));
        }
        let num_slots = lim.num_blocks.saturating_mul(lim.block_size);
        for (&t, (&p, &s)) in batch
            .token_ids
            .iter()
            .zip(batch.positions.iter().zip(&batch.slot_mapping))
        {
            if t as usize >= lim.vocab_size {
                return Err(invalid(format!("token id {t} ≥ vocab {}", lim.vocab_size)));
            }
            if p as usize >= lim.max_position {
                return Err(invalid(format!("position {p} ≥ {}", lim.max_position)));
            }
            if s as usize >= num_slots {
                return Err(invalid(format!("slot {s} ≥ {num_slots} cache slots")));
            }
            self.token_ids.push(t);
            self.positions.push(to_i32(p as usize, "position")?);
            self.slot_mapping.push(to_i32(s as usize, "slot")?);
        }
        self.max_blocks = batch.block_tables.iter().map(Vec::len).max().unwrap_or(0);
        self.row_seq.resize(n, -1);
        self.row_keys.resize(n, 0);
        for (i, (seq, table)) in batch.seqs.iter().zip(&batch.block_tables).enumerate() {
            let end = seq
                .query_start
                .checked_add(seq.query_len)
                .filter(|&e| e <= n && seq.query_len > 0)
                .ok_or_else(|| invalid(format!("sequence {i} covers no or out-of-range tokens")))?;
            let total = seq.context_len + seq.query_len;
            if table.len() * lim.block_size < total {
                return Err(invalid(format!(
                    "sequence {i}: {} blocks cannot hold {total} tokens",
                    table.len()
                )));
            }
            for j in 0..seq.query_len {
                let r = seq.query_start + j;
                if self.row_seq[r] >= 0 {
                    return Err(invalid(format!("token {r} belongs to two sequences")));
                }
                self.row_seq[r] = to_i32(i, "sequence index")?;
                let keys = seq.context_len + j + 1;
                // The attention workspace is sized for `max_position` keys per row.
                if keys > lim.max_position {
                    return Err(invalid(format!(
                        "sequence {i} reaches {keys} tokens, beyond {}",
                        lim.max_position
                    )));
                }
                self.row_keys[r] = to_i32(keys, "context length")?;
                self.max_keys = self.max_keys.max(keys);
            }
            debug_assert!(end <= n);
            for &b in table {
                if b as usize >= lim.num_blocks {
                    return Err(invalid(format!(
                        "sequence {i}: block {b} ≥ {} blocks",
                        lim.num_blocks
                    )));
                }
                self.block_tables.push(to_i32(b as usize, "block")?);
            }
            self.block_tables
                .extend(std::iter::repeat_n(0, self.max_blocks - table.len()));
        }
        if let Some(r) = self.row_seq.iter().position(|&s| s < 0) {
            return Err(invalid(format!("token {r} belongs to no sequence")));
        }
        let mut prev = None;
        for &r in &batch.logits_rows {
            if r >= n || prev.is_some_and(|p| p >= r) {
                return Err(invalid(format!(
                    "logits row {r} out of range or not ascending"
                )));
            }
            prev = Some(r);
            self.logits_rows.push(to_i32(r, "logits row")?);
        }
        Ok(())
    }

    pub fn num_seqs(&self) -> usize {
        self.block_tables
            .len()
            .checked_div(self.max_blocks)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::backend::SeqSlice;

    const LIM: PackLimits = PackLimits {
        block_size: 4,
        num_blocks: 10,
        vocab_size: 100,
        max_position: 64,
        max_tokens: 16,
    };

    /// Sequence A: 5 cached tokens + 3-token prefill chunk in blocks [7, 2]; sequence B: decode
    /// of its 3rd token in block [4].
    fn batch() -> StepBatch {
        StepBatch {
            token_ids: vec![11, 12, 13, 14],
            positions: vec![5, 6, 7, 2],
            seqs: vec![
                SeqSlice {
                    query_start: 0,
                    query_len: 3,
                    context_len: 5,
                },
                SeqSlice {
                    query_start: 3,
                    query_len: 1,
                    context_len: 2,
                },
            ],
            block_tables: vec![vec![7, 2], vec![4]],
            slot_mapping: vec![9, 10, 11, 18],
            logits_rows: vec![2, 3],
        }
    }

    #[test]
    fn packs_ragged_chunked_batch() {
        let mut p = PackedBatch::default();
        p.pack(&batch(), &LIM).unwrap();
        assert_eq!(p.positions, vec![5, 6, 7, 2]);
        assert_eq!(p.slot_mapping, vec![9, 10, 11, 18]);
        assert_eq!(p.row_seq, vec![0, 0, 0, 1]);
        assert_eq!(p.row_keys, vec![6, 7, 8, 3]);
        assert_eq!(p.max_keys, 8);
        assert_eq!(p.max_blocks, 2);
        assert_eq!(p.block_tables, vec![7, 2, 4, 0]);
        assert_eq!(p.num_seqs(), 2);
        assert_eq!(p.logits_rows, vec![2, 3]);
    }

    #[test]
    fn reuse_clears_previous_step() {
        let mut p = PackedBatch::default();
        p.pack(&batch(), &LIM).unwrap();
        let mut b = batch();
        b.seqs.truncate(1);
        b.block_tables.truncate(1);
        b.token_ids.truncate(3);
        b.positions.truncate(3);
        b.slot_mapping.truncate(3);
        b.logits_rows = vec![2];
        p.pack(&b, &LIM).unwrap();
        assert_eq!(p.block_tables, vec![7, 2]);
        assert_eq!(p.row_keys, vec![6, 7, 8]);
    }

    #[test]
    fn rejects_bad_batches() {
        type Edit = Box<dyn Fn(&mut StepBatch)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("slot", Box::new(|b| b.slot_mapping[0] = 40)),
            ("block", Box::new(|b| b.block_tables[1][0] = 10)),
            ("vocab", Box::new(|b| b.token_ids[0] = 100)),
            ("position", Box::new(|b| b.positions[0] = 64)),
            (
                "short table",
                Box::new(|b| b.block_tables[0].pop().map(drop).unwrap_or(())),
            ),
            ("orphan token", Box::new(|b| b.seqs[1].query_len = 0)),
            ("overlap", Box::new(|b| b.seqs[1].query_start = 2)),
            ("logits order", Box::new(|b| b.logits_rows = vec![3, 2])),
            ("logits range", Box::new(|b| b.logits_rows = vec![4])),
            (
                "lengths",
                Box::new(|b| b.positions.pop().map(drop).unwrap_or(())),
            ),
            (
                "too many",
                Box::new(|b| {
                    b.token_ids = vec![1; 17];
                }),
            ),
        ];
        for (what, edit) in cases {
            let mut b = batch();
            edit(&mut b);
            let mut p = PackedBatch::default();
            let err = p.pack(&b, &LIM);
            assert!(
                matches!(err, Err(BackendError::InvalidBatch(_))),
                "{what}: {err:?}"
            );
            assert_eq!(p, PackedBatch::default(), "{what}: left state behind");
        }
    }
}
