//! The bounded cache of aggregate states, one async mutex per aggregate.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
pub(super) struct SlotState {
    state: tokio::sync::Mutex<Option<Loaded>>,
    /// Set when the slot was to be evicted while in use: what its user puts back was
    /// loaded before the eviction (e.g. before the partition was lost and regained, and
    /// another host wrote on), so the next [`lock`](Self::lock) drops it.
    stale: AtomicBool,
    /// Bytes of the state held, as last counted in the cache's total.
    bytes: AtomicUsize,
    /// The cache's total of state bytes.
    total: Arc<AtomicUsize>,
}

impl SlotState {
    /// Takes the slot, empty if it went stale since it was last taken.
    pub(super) async fn lock(&self) -> SlotGuard<'_> {
        let mut guard = self.state.lock().await;
        if self.stale.swap(false, Ordering::AcqRel) {
            *guard = None;
        }
        SlotGuard { slot: self, guard }
    }
}

impl Drop for SlotState {
    fn drop(&mut self) {
        self.total
            .fetch_sub(*self.bytes.get_mut(), Ordering::AcqRel);
    }
}

/// A taken slot. What is in it when it is given back counts towards the cache's
/// byte budget.
pub(super) struct SlotGuard<'a> {
    slot: &'a SlotState,
    guard: tokio::sync::MutexGuard<'a, Option<Loaded>>,
}

impl std::ops::Deref for SlotGuard<'_> {
    type Target = Option<Loaded>;

    fn deref(&self) -> &Option<Loaded> {
        &self.guard
    }
}

impl std::ops::DerefMut for SlotGuard<'_> {
    fn deref_mut(&mut self) -> &mut Option<Loaded> {
        &mut self.guard
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let now = self.guard.as_ref().map_or(0, |l| l.state.len());
        let before = self.slot.bytes.swap(now, Ordering::AcqRel);
        if now >= before {
            self.slot.total.fetch_add(now - before, Ordering::AcqRel);
        } else {
            self.slot.total.fetch_sub(before - now, Ordering::AcqRel);
        }
    }
}

/// The states of recently used aggregates, bounded by a count and by their bytes: a
/// state may be as large as a plugin's output cap (megabytes), so a count alone would
/// let a type with large states take the host's memory.
pub(super) struct AggregateCache {
    capacity: usize,
    max_bytes: usize,
    bytes: Arc<AtomicUsize>,
    entries: Mutex<LruCache<AggregateKey, Slot>>,
}

impl AggregateCache {
    pub(super) fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            max_bytes,
            bytes: Arc::new(AtomicUsize::new(0)),
            entries: Mutex::new(LruCache::unbounded()),
        }
    }

    /// Bytes of the states held.
    pub(super) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    fn over(&self, entries: &LruCache<AggregateKey, Slot>) -> bool {
        entries.len() > self.capacity || self.bytes() > self.max_bytes
    }

    /// The slot of an aggregate, created if absent.
    ///
    /// Eviction skips slots in use: dropping one would let a second command create a
    /// fresh slot for the same aggregate and run beside the first. The cache may
    /// therefore exceed its capacity by the number of commands in flight.
    pub(super) fn slot(&self, key: &AggregateKey) -> Slot {
        let mut entries = self.entries.lock().expect("cache poisoned");
        let slot = match entries.get(key) {
            Some(slot) => slot.clone(),
            None => {
                let slot: Slot = Arc::new(SlotState {
                    state: tokio::sync::Mutex::new(None),
                    stale: AtomicBool::new(false),
                    bytes: AtomicUsize::new(0),
                    total: self.bytes.clone(),
                });
                entries.put(key.clone(), slot.clone());
                slot
            }
        };
        // States grow without new aggregates coming in: the bytes are checked on
        // every use, not only when a slot is added.
        let mut skipped = 0;
        while self.over(&entries) && skipped < 8 {
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
        let cache = AggregateCache::new(2, usize::MAX);
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

    async fn put(cache: &AggregateCache, id: &str, bytes: usize) -> Slot {
        let slot = cache.slot(&key(id));
        *slot.lock().await = Some(Loaded {
            version: 1,
            state: vec![b' '; bytes],
            plugin_version: 1,
        });
        slot
    }

    /// States count by their bytes too: past the budget the least recently used go,
    /// however few there are; a state that shrinks, or goes, gives its bytes back.
    #[tokio::test]
    async fn the_states_held_stay_within_their_byte_budget() {
        let cache = AggregateCache::new(100, 1_000);
        drop(put(&cache, "a", 400).await);
        drop(put(&cache, "b", 400).await);
        assert_eq!((cache.len(), cache.bytes()), (2, 800));
        // A third takes the cache past its budget: the next use evicts "a".
        drop(put(&cache, "c", 400).await);
        cache.slot(&key("b"));
        assert_eq!((cache.len(), cache.bytes()), (2, 800));
        assert!(cache.slot(&key("a")).lock().await.is_none(), "a was kept");
        // Shrinking gives bytes back; so does a state dropped after a failure.
        let b = cache.slot(&key("b"));
        b.lock().await.as_mut().unwrap().state.truncate(100);
        assert_eq!(cache.bytes(), 500);
        b.lock().await.take();
        assert_eq!(cache.bytes(), 400);
        // One slot in use is never evicted, whatever its size.
        let big = put(&cache, "big", 5_000).await;
        cache.slot(&key("d"));
        assert!(Arc::ptr_eq(&big, &cache.slot(&key("big"))));
        drop(big);
        cache.slot(&key("e"));
        assert!(cache.bytes() <= 1_000, "{} bytes held", cache.bytes());
    }

    /// A slot in use when it is evicted (its partition lost) keeps its user's command
    /// alone on the aggregate, but what that command puts back — a state from before
    /// the eviction — is dropped when the slot is next taken, so it is loaded afresh.
    #[tokio::test]
    async fn a_slot_evicted_in_use_is_loaded_afresh_next_time() {
        let cache = AggregateCache::new(8, usize::MAX);
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
