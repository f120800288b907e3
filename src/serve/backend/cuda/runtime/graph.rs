//! CUDA-graph capture and replay of decode steps (`--cuda-graphs`): the padded host arrays,
//! the graphs held per [`GraphKey`], and the replay path. Which bucket and layout a step uses
//! is decided in `graphs.rs`.

use std::collections::HashMap;
use std::time::Instant;

use cudarc::driver::{sys as drv_sys, CudaGraph, CudaSlice};

use super::{drv, AttnMode, Gpu};
use crate::serve::backend::cuda::graphs::{self, GraphKey, GraphLimits, PaddedStep};
use crate::serve::backend::cuda::CudaError;

/// A captured graph, movable to the engine thread with the rest of the backend.
pub(super) struct Graph(pub(super) CudaGraph);

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialised
// (CUDA's graph thread-safety rule); it is owned by the backend, which the engine drives from
// one thread at a time (`&mut self` on every call that launches it).
#[allow(unsafe_code)]
unsafe impl Send for Graph {}

/// CUDA graphs of decode steps, one per [`GraphKey`].
pub(super) struct GraphState {
    pub(super) sizes: Vec<usize>,
    pub(super) lim: GraphLimits,
    pub(super) graphs: HashMap<GraphKey, Graph>,
    /// Block tables at a fixed row stride (`stride` = the longest context's block count).
    pub(super) tables: CudaSlice<i32>,
    pub(super) stride: usize,
    pub(super) host: PaddedStep,
    pub(super) _blas_workspace: CudaSlice<u8>,
}

impl Gpu {
    /// The graph a packed step replays, if graphs are on and it is a decode step: one row per
    /// sequence, each sequence's logits wanted, in row order.
    pub(super) fn graph_key(&self) -> Option<GraphKey> {
        let g = self.graph.as_ref()?;
        let p = &self.packed;
        let rows = graphs::decode_rows(p)?;
        if p.max_blocks > g.stride {
            return None;
        }
        graphs::graph_key(rows, p.max_keys, &g.sizes, &g.lim)
    }

    /// Pads the packed decode step to `key.rows` and uploads it (padding rows: token 0 at
    /// position 0, no cache slot, 0 keys; block tables at the graph stride).
    pub(super) fn upload_padded(&mut self, key: GraphKey) -> Result<(), CudaError> {
        let Some(g) = self.graph.as_mut() else {
            return Err(CudaError::Launch("graphs are off".into()));
        };
        let p = &self.packed;
        let (n, b, w) = (p.token_ids.len(), key.rows, g.stride);
        let h = &mut g.host;
        h.fill(p, b, w)?;
        let s = &self.stream;
        let d = &mut self.buf;
        s.memcpy_htod(&h.token_ids, &mut d.token_ids.slice_mut(..b))
            .map_err(drv)?;
        s.memcpy_htod(&h.positions, &mut d.positions.slice_mut(..b))
            .map_err(drv)?;
        s.memcpy_htod(&h.slots, &mut d.slots.slice_mut(..b))
            .map_err(drv)?;
        s.memcpy_htod(&h.row_seq, &mut d.row_seq.slice_mut(..b))
            .map_err(drv)?;
        s.memcpy_htod(&h.row_keys, &mut d.row_keys.slice_mut(..b))
            .map_err(drv)?;
        s.memcpy_htod(&h.logits_rows, &mut d.logits_rows.slice_mut(..b))
            .map_err(drv)?;
        if n > 0 {
            s.memcpy_htod(&h.tables, &mut g.tables.slice_mut(..n * w))
                .map_err(drv)?;
        }
        Ok(())
    }

    /// Runs a decode step from its graph, capturing the graph first if it is new (and running
    /// the same fixed-layout forward eagerly once [`graphs::MAX_GRAPHS`] are held).
    pub(super) fn replay(&mut self, key: GraphKey) -> Result<(), CudaError> {
        self.upload_padded(key)?;
        let known = self
            .graph
            .as_ref()
            .is_some_and(|g| g.graphs.contains_key(&key));
        if !known {
            let full = self
                .graph
                .as_ref()
                .is_none_or(|g| g.graphs.len() >= graphs::MAX_GRAPHS);
            if full {
                return self.forward(key.rows, key.rows, AttnMode::Fixed(key));
            }
            let started = Instant::now();
            self.stream
                .begin_capture(drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(drv)?;
            let recorded = self.forward(key.rows, key.rows, AttnMode::Fixed(key));
            // End the capture whatever happened, so the stream is usable again.
            let ended = self
                .stream
                .end_capture(drv_sys::CUgraphInstantiate_flags(0))
                .map_err(drv);
            recorded?;
            let graph = ended?.ok_or_else(|| CudaError::Launch("empty graph capture".into()))?;
            tracing::debug!(
                rows = key.rows,
                partition_size = key.partition_size,
                partitions = key.num_partitions,
                elapsed_us = started.elapsed().as_micros() as u64,
                "captured decode graph"
            );
            if let Some(g) = self.graph.as_mut() {
                g.graphs.insert(key, Graph(graph));
            }
        }
        let graph = self
            .graph
            .as_ref()
            .and_then(|g| g.graphs.get(&key))
            .ok_or_else(|| CudaError::Launch("graph missing after capture".into()))?;
        graph.0.launch().map_err(drv)
    }
}
