//! Per-request values a plugin derives once and reuses for the rest of the decision: another
//! profile scoring the same request, the primary's cache prediction, the hooks after the
//! decision (the precise scorer's tokenized block keys are the case that needs it).
//!
//! A [`RequestScratch`] is created by the scheduler for one request and handed back in its
//! [`ScheduleResult`](crate::epp::scheduling::ScheduleResult), so nothing in it outlives the
//! request and no plugin keeps per-request state of its own.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

/// Identifies the plugin instance a value belongs to: the address of state the instance owns
/// for as long as the scheduler holding it lives (two instances never share one).
pub type ScratchOwner = usize;

pub struct RequestScratch {
    // A handful of entries at most (one per plugin instance that stores one): a Vec beats a map.
    entries: Mutex<Vec<(ScratchOwner, Arc<dyn Any + Send + Sync>)>>,
}

impl RequestScratch {
    pub const fn new() -> Self {
        RequestScratch {
            entries: Mutex::new(Vec::new()),
        }
    }

    /// The value `owner` stored for this request, if it stored one of type `T`.
    pub fn get<T: Any + Send + Sync>(&self, owner: ScratchOwner) -> Option<Arc<T>> {
        let entries = self.entries.lock();
        let (_, value) = entries.iter().find(|(o, _)| *o == owner)?;
        Arc::clone(value).downcast::<T>().ok()
    }

    /// Stores (or replaces) `owner`'s value for this request.
    pub fn put<T: Any + Send + Sync>(&self, owner: ScratchOwner, value: Arc<T>) {
        let mut entries = self.entries.lock();
        match entries.iter_mut().find(|(o, _)| *o == owner) {
            Some(slot) => slot.1 = value,
            None => entries.push((owner, value)),
        }
    }
}

impl Default for RequestScratch {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RequestScratch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestScratch")
            .field("entries", &self.entries.lock().len())
            .finish()
    }
}

impl Clone for RequestScratch {
    fn clone(&self) -> Self {
        RequestScratch {
            entries: Mutex::new(self.entries.lock().clone()),
        }
    }
}

/// For plugin tests whose plugins store nothing: one empty scratch to point cycles at.
#[cfg(test)]
pub(crate) static NOTHING_STORED: RequestScratch = RequestScratch::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_kept_per_owner_and_type() {
        let s = RequestScratch::default();
        assert!(s.get::<u32>(1).is_none());
        s.put(1, Arc::new(7u32));
        s.put(2, Arc::new(String::from("two")));
        assert_eq!(s.get::<u32>(1).as_deref(), Some(&7));
        assert_eq!(
            s.get::<String>(2).as_deref().map(String::as_str),
            Some("two")
        );
        // Another type under the same owner is not returned as this one.
        assert!(s.get::<String>(1).is_none());
        s.put(1, Arc::new(8u32));
        assert_eq!(s.get::<u32>(1).as_deref(), Some(&8));
        // A clone carries the values.
        assert_eq!(s.clone().get::<u32>(1).as_deref(), Some(&8));
    }
}
