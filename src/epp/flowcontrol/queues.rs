//! The queued requests: one band per priority, one flow per fairness id inside a band, FCFS
//! inside a flow. Pure data (no clocks, no channels), so ordering and capacity are tested
//! directly. Memory is exactly the queued requests: empty flows and bands are dropped at once,
//! and capacity limits bound how many requests there can be.
//!
//! ```text
//!  items: seq → Entry (arrival order = expiry order, since every request gets the same TTL)
//!  bands (highest priority first) ─▶ Band { order: seqs (global-strict), flows: id → seqs,
//!                                           cursor: last id served (round-robin) }
//! ```

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use super::config::{BandConfig, Fairness, FlowControlConfig};

/// One queued request.
#[derive(Debug)]
pub struct Entry<T> {
    pub priority: i32,
    pub flow: Arc<str>,
    pub bytes: u64,
    pub value: T,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// A global limit (`flowControl.maxRequests` / `maxBytes`).
    Global,
    /// The request's band limit.
    Band,
}

#[derive(Debug)]
struct Band {
    config: BandConfig,
    /// Every queued seq in the band, oldest first.
    order: BTreeSet<u64>,
    /// Per fairness id, its seqs oldest first (seqs only grow, so a deque stays sorted).
    flows: BTreeMap<Arc<str>, VecDeque<u64>>,
    /// Round-robin: the fairness id served last.
    cursor: Option<Arc<str>>,
    bytes: u64,
}

impl Band {
    fn new(config: BandConfig) -> Self {
        Band {
            config,
            order: BTreeSet::new(),
            flows: BTreeMap::new(),
            cursor: None,
            bytes: 0,
        }
    }

    fn len(&self) -> u64 {
        self.order.len() as u64
    }

    /// The seq this band would dispatch next.
    fn next(&self) -> Option<u64> {
        match self.config.fairness {
            Fairness::GlobalStrict => self.order.first().copied(),
            Fairness::RoundRobin => {
                let after = match &self.cursor {
                    Some(c) => self
                        .flows
                        .range::<str, _>((Bound::Excluded(&**c), Bound::Unbounded))
                        .next(),
                    None => None,
                };
                after
                    .or_else(|| self.flows.iter().next())
                    .and_then(|(_, seqs)| seqs.front().copied())
            }
        }
    }
}

/// All queued requests.
#[derive(Debug)]
pub struct Queues<T> {
    config: Arc<FlowControlConfig>,
    items: BTreeMap<u64, Entry<T>>,
    bands: BTreeMap<Reverse<i32>, Band>,
    bytes: u64,
    next_seq: u64,
}

impl<T> Queues<T> {
    pub fn new(config: Arc<FlowControlConfig>) -> Self {
        Queues {
            config,
            items: BTreeMap::new(),
            bands: BTreeMap::new(),
            bytes: 0,
            next_seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Requests queued in `priority`'s band.
    pub fn band_len(&self, priority: i32) -> usize {
        self.bands
            .get(&Reverse(priority))
            .map_or(0, |b| b.order.len())
    }

    /// Whether one more request of `bytes` fits, globally and in its band (the reference's
    /// `hasCapacity`: `current + new > limit` refuses).
    pub fn check(&self, priority: i32, bytes: u64) -> Result<(), Full> {
        let over = |used: u64, add: u64, limit: u64| used.saturating_add(add) > limit;
        if let Some(max) = self.config.max_bytes {
            if over(self.bytes, bytes, max) {
                return Err(Full::Global);
            }
        }
        if let Some(max) = self.config.max_requests {
            if over(self.items.len() as u64, 1, max) {
                return Err(Full::Global);
            }
        }
        let (len, used, limits) = match self.bands.get(&Reverse(priority)) {
            Some(b) => (b.len(), b.bytes, b.config),
            None => (0, 0, self.config.band(priority)),
        };
        if over(used, bytes, limits.max_bytes) || over(len, 1, limits.max_requests) {
            return Err(Full::Band);
        }
        Ok(())
    }

    /// Queues a request behind everything already queued; returns its seq.
    pub fn push(
        &mut self,
        priority: i32,
        flow: Arc<str>,
        bytes: u64,
        value: T,
    ) -> Result<u64, (Full, T)> {
        if let Err(full) = self.check(priority, bytes) {
            return Err((full, value));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let config = &self.config;
        let band = self
            .bands
            .entry(Reverse(priority))
            .or_insert_with(|| Band::new(config.band(priority)));
        band.order.insert(seq);
        band.flows.entry(flow.clone()).or_default().push_back(seq);
        band.bytes = band.bytes.saturating_add(bytes);
        self.bytes = self.bytes.saturating_add(bytes);
        self.items.insert(
            seq,
            Entry {
                priority,
                flow,
                bytes,
                value,
            },
        );
        Ok(seq)
    }

    /// Takes a request out (dispatched, expired or cancelled); `None` if it is not queued.
    pub fn remove(&mut self, seq: u64) -> Option<Entry<T>> {
        let entry = self.items.remove(&seq)?;
        self.bytes = self.bytes.saturating_sub(entry.bytes);
        let key = Reverse(entry.priority);
        if let Some(band) = self.bands.get_mut(&key) {
            band.order.remove(&seq);
            band.bytes = band.bytes.saturating_sub(entry.bytes);
            if let Some(seqs) = band.flows.get_mut(&entry.flow) {
                if let Ok(i) = seqs.binary_search(&seq) {
                    seqs.remove(i);
                }
                if seqs.is_empty() {
                    band.flows.remove(&entry.flow);
                }
            }
            if band.order.is_empty() {
                self.bands.remove(&key);
            }
        }
        Some(entry)
    }

    /// The priority of the band [`Self::pop_next`] would take from.
    pub fn next_priority(&self) -> Option<i32> {
        self.bands.keys().next().map(|r| r.0)
    }

    /// The request to dispatch next: from the highest-priority band that has one, chosen by
    /// that band's fairness policy; it is removed.
    pub fn pop_next(&mut self) -> Option<(u64, Entry<T>)> {
        let band = self.bands.values_mut().next()?;
        let seq = band.next()?;
        if band.config.fairness == Fairness::RoundRobin {
            if let Some(e) = self.items.get(&seq) {
                band.cursor = Some(e.flow.clone());
            }
        }
        self.remove(seq).map(|e| (seq, e))
    }

    /// The oldest queued request (the next to expire).
    pub fn oldest(&self) -> Option<(u64, &Entry<T>)> {
        self.items.first_key_value().map(|(s, e)| (*s, e))
    }

    /// Empties every queue, oldest first.
    pub fn drain(&mut self) -> Vec<(u64, Entry<T>)> {
        self.bands.clear();
        self.bytes = 0;
        std::mem::take(&mut self.items).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queues(config: FlowControlConfig) -> Queues<&'static str> {
        Queues::new(Arc::new(config))
    }

    fn drain_order(q: &mut Queues<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| q.pop_next().map(|(_, e)| e.value)).collect()
    }

    #[test]
    fn higher_priority_bands_go_first_fcfs_within() {
        let mut q = queues(FlowControlConfig::default());
        for (p, v) in [
            (0, "a0"),
            (-1, "s0"),
            (2, "c0"),
            (0, "a1"),
            (2, "c1"),
            (-1, "s1"),
        ] {
            q.push(p, Arc::from("f"), 1, v).unwrap();
        }
        assert_eq!(drain_order(&mut q), ["c0", "c1", "a0", "a1", "s0", "s1"]);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn global_strict_is_fcfs_across_flows_round_robin_alternates() {
        let pushes = [
            ("a", "a0"),
            ("a", "a1"),
            ("a", "a2"),
            ("b", "b0"),
            ("b", "b1"),
        ];
        let mut strict = queues(FlowControlConfig::default());
        for (f, v) in pushes {
            strict.push(0, Arc::from(f), 1, v).unwrap();
        }
        assert_eq!(drain_order(&mut strict), ["a0", "a1", "a2", "b0", "b1"]);

        let mut config = FlowControlConfig::default();
        config.default_band.fairness = Fairness::RoundRobin;
        let mut rr = queues(config);
        for (f, v) in pushes {
            rr.push(0, Arc::from(f), 1, v).unwrap();
        }
        assert_eq!(drain_order(&mut rr), ["a0", "b0", "a1", "b1", "a2"]);
    }

    #[test]
    fn round_robin_cursor_survives_new_arrivals() {
        let mut config = FlowControlConfig::default();
        config.default_band.fairness = Fairness::RoundRobin;
        let mut q = queues(config);
        q.push(0, Arc::from("b"), 1, "b0").unwrap();
        q.push(0, Arc::from("b"), 1, "b1").unwrap();
        assert_eq!(q.pop_next().map(|(_, e)| e.value), Some("b0"));
        // "a" and "c" arrive: ids after the cursor ("b") come first, then wrap to "a".
        q.push(0, Arc::from("a"), 1, "a0").unwrap();
        q.push(0, Arc::from("c"), 1, "c0").unwrap();
        assert_eq!(drain_order(&mut q), ["c0", "a0", "b1"]);
    }

    #[test]
    fn limits_count_requests_and_bytes_globally_and_per_band() {
        let mut config = FlowControlConfig {
            max_requests: Some(3),
            max_bytes: Some(100),
            ..FlowControlConfig::default()
        };
        config.bands.insert(
            -1,
            BandConfig {
                max_requests: 1,
                max_bytes: 50,
                fairness: Fairness::GlobalStrict,
            },
        );
        let mut q = queues(config);
        let f = || Arc::<str>::from("f");
        assert!(q.push(-1, f(), 10, "s0").is_ok());
        assert_eq!(
            q.push(-1, f(), 10, "s1").err().map(|e| e.0),
            Some(Full::Band)
        );
        // 51 bytes alone exceed the band's 50.
        assert_eq!(q.check(-1, 51), Err(Full::Band));
        assert!(q.push(0, f(), 60, "a0").is_ok());
        // 10 + 60 + 31 > 100.
        assert_eq!(
            q.push(0, f(), 31, "a1").err().map(|e| e.0),
            Some(Full::Global)
        );
        assert!(q.push(0, f(), 30, "a1").is_ok());
        // Three queued: the fourth fails on the global request limit whatever its size.
        assert_eq!(
            q.push(0, f(), 0, "a2").err().map(|e| e.0),
            Some(Full::Global)
        );
        assert_eq!((q.len(), q.bytes()), (3, 100));
        // Removing frees both counts.
        let (seq, _) = q.oldest().map(|(s, e)| (s, e.value)).unwrap();
        assert_eq!(q.remove(seq).map(|e| e.value), Some("s0"));
        assert_eq!((q.len(), q.bytes(), q.band_len(-1)), (2, 90, 0));
        assert!(q.push(-1, f(), 10, "s1").is_ok());
    }

    #[test]
    fn removal_in_the_middle_keeps_order_and_drops_empty_flows() {
        let mut q = queues(FlowControlConfig::default());
        let a = q.push(0, Arc::from("x"), 5, "a").unwrap();
        let b = q.push(0, Arc::from("y"), 5, "b").unwrap();
        let c = q.push(0, Arc::from("x"), 5, "c").unwrap();
        assert_eq!(q.remove(b).map(|e| e.value), Some("b"));
        assert!(q.remove(b).is_none());
        assert_eq!(q.oldest().map(|(s, _)| s), Some(a));
        assert_eq!(q.remove(a).map(|e| e.value), Some("a"));
        assert_eq!(q.oldest().map(|(s, _)| s), Some(c));
        assert_eq!(drain_order(&mut q), ["c"]);
        assert!(q.bands.is_empty());
    }
}
