//! The bounded cache of aggregate states, one async mutex per aggregate.

use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::store::AggregateKey;

/// A cached aggregate state.
pub(super) struct Loaded {
    /// Version the state reflects.
    pub(super) version: i64,
    /// State bytes from the plugin.
    pub(super) state: Vec<u8>,
    /// Plugin version that produced `state`.
    pub(super) plugin_version: i32,
}

/// An aggregate's slot: held by a command for its whole run. `None`: not loaded (or
/// dropped after a failure), load before use.
pub(super) type Slot = Arc<tokio::sync::Mutex<Option<Loaded>>>;

pub(super) struct AggregateCache {
    capacity: usize,
    entries: Mutex<LruCache<AggregateKey, Slot>>,
}

impl AggregateCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: Mutex::new(LruCache::unbounded()),
        }
    }

    /// The slot of an aggregate, created if absent.
    ///
    /// Eviction skips slots in use: dropping one would let a second command create a
    /// fresh slot for the same aggregate and run beside the first. The cache may
    /// therefore exceed its capacity by the number of commands in flight.
    pub(super) fn slot(&self, key: &AggregateKey) -> Slot {
        let mut entries = self.entries.lock().expect("cache poisoned");
        if let Some(slot) = entries.get(key) {
            return slot.clone();
        }
        let slot: Slot = Arc::new(tokio::sync::Mutex::new(None));
        entries.put(key.clone(), slot.clone());
        let mut skipped = 0;
        while entries.len() > self.capacity && skipped < 8 {
            let Some((old_key, old_slot)) = entries.pop_lru() else {
                break;
            };
            if Arc::strong_count(&old_slot) > 1 {
                // In use: keep it (now most recently used) and try the next one.
                entries.put(old_key, old_slot);
                skipped += 1;
            }
        }
        slot
    }

    pub(super) fn len(&self) -> usize {
        self.entries.lock().expect("cache poisoned").len()
    }

    /// Keeps only the aggregates for which `keep` is true (and those in use).
    pub(super) fn retain(&self, keep: impl Fn(&AggregateKey) -> bool) {
        let mut entries = self.entries.lock().expect("cache poisoned");
        let doomed: Vec<AggregateKey> = entries
            .iter()
            .filter(|(key, slot)| !keep(key) && Arc::strong_count(slot) == 1)
            .map(|(key, _)| key.clone())
            .collect();
        for key in doomed {
            entries.pop(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> AggregateKey {
        AggregateKey {
            aggregate_type: "t".into(),
            aggregate_id: id.into(),
        }
    }

    #[test]
    fn bounded_and_never_evicts_a_slot_in_use() {
        let cache = AggregateCache::new(2);
        let busy = cache.slot(&key("a"));
        cache.slot(&key("b"));
        cache.slot(&key("c"));
        assert_eq!(cache.len(), 2);
        // "a" was least recently used but is held, so "b" went instead.
        assert!(Arc::ptr_eq(&busy, &cache.slot(&key("a"))));
        drop(busy);
        cache.slot(&key("d"));
        cache.slot(&key("e"));
        assert_eq!(cache.len(), 2);
    }
}
