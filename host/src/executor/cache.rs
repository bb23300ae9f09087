//! The bounded cache of aggregate states, one async mutex per aggregate.

use std::sync::atomic::{AtomicBool, Ordering};
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
pub(super) type Slot = Arc<SlotState>;

/// What a [`Slot`] holds.
#[derive(Default)]
pub(super) struct SlotState {
    state: tokio::sync::Mutex<Option<Loaded>>,
    /// Set when the slot was to be evicted while in use: what its user puts back was
    /// loaded before the eviction (e.g. before the partition was lost and regained, and
    /// another host wrote on), so the next [`lock`](Self::lock) drops it.
    stale: AtomicBool,
}

impl SlotState {
    /// Takes the slot, empty if it went stale since it was last taken.
    pub(super) async fn lock(&self) -> tokio::sync::MutexGuard<'_, Option<Loaded>> {
        let mut guard = self.state.lock().await;
        if self.stale.swap(false, Ordering::AcqRel) {
            *guard = None;
        }
        guard
    }
}

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
        let slot: Slot = Arc::new(SlotState::default());
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

    /// Keeps only the aggregates for which `keep` is true. One in use stays (dropped,
    /// a second command could run beside the one using it) but goes stale: whatever
    /// its user puts back is dropped when it is next taken.
    pub(super) fn retain(&self, keep: impl Fn(&AggregateKey) -> bool) {
        let mut entries = self.entries.lock().expect("cache poisoned");
        let mut doomed = Vec::new();
        for (key, slot) in entries.iter() {
            if keep(key) {
                continue;
            }
            if Arc::strong_count(slot) == 1 {
                doomed.push(key.clone());
            } else {
                slot.stale.store(true, Ordering::Release);
            }
        }
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

    /// A slot in use when it is evicted (its partition lost) keeps its user's command
    /// alone on the aggregate, but what that command puts back — a state from before
    /// the eviction — is dropped when the slot is next taken, so it is loaded afresh.
    #[tokio::test]
    async fn a_slot_evicted_in_use_is_loaded_afresh_next_time() {
        let cache = AggregateCache::new(8);
        let slot = cache.slot(&key("a"));
        let mut guard = slot.lock().await;
        cache.retain(|_| false);
        *guard = Some(Loaded {
            version: 5,
            state: b"{}".to_vec(),
            plugin_version: 1,
        });
        drop(guard);
        let again = cache.slot(&key("a"));
        assert!(Arc::ptr_eq(&slot, &again), "a slot in use was dropped");
        drop(slot);
        assert!(again.lock().await.is_none(), "a stale state was kept");
        // Put back after that, a state stays.
        *again.lock().await = Some(Loaded {
            version: 6,
            state: b"{}".to_vec(),
            plugin_version: 1,
        });
        assert_eq!(again.lock().await.as_ref().map(|l| l.version), Some(6));
    }
}
