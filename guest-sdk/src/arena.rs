//! The component's memory allocator: a bump arena that starts over whenever everything
//! in it has been freed.
//!
//! A call into an aggregate allocates a few dozen small buffers (the argument bytes,
//! serde's strings and vectors, the encoded events and state) and frees all of them
//! before the next call: the host frees what the call returned (`post_return`) right
//! after reading it. So once a call is over, nothing in the arena is alive, and the next
//! call can reuse it from the start: allocating is a pointer bump, freeing is a counter
//! decrement, and every call touches the same few cache lines. General-purpose malloc
//! (dlmalloc in wasi-libc) took a fifth of a command's time inside the component.
//!
//! It stays correct when something does outlive a call (a `static` initialised lazily,
//! say): the arena then cannot start over, keeps bumping, and once it has grown by
//! [`REBASE_BYTES`] without starting over it leaves what is below behind and starts
//! over above it from then on, which bounds the waste by what was alive at that moment.
//! What was left behind is still counted: once everything in it is freed too, the
//! arena starts over from the very bottom. A single call that allocates more than
//! [`REBASE_BYTES`] (a large state) rebases in passing, and without that count every
//! such call left its memory behind for good, until the instance ran out of memory.
//! Memory comes from `memory.grow` and is never returned, like any wasm allocator.
//!
//! WebAssembly components are single-threaded, so plain `Cell`s suffice.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

/// Growth without a fresh start after which the arena leaves older memory behind.
const REBASE_BYTES: usize = 1 << 20;

const PAGE: usize = 65536;

/// `memory.grow` on memory 0: the old size in pages, or `usize::MAX` when refused.
#[cfg(target_arch = "wasm32")]
fn memory_grow(pages: usize) -> usize {
    core::arch::wasm32::memory_grow(0, pages)
}

#[cfg(not(target_arch = "wasm32"))]
use tests::memory_grow;

/// See the module docs.
pub struct Arena {
    /// The start of the arena's contiguous memory, where it starts over once nothing
    /// in it is alive.
    floor: Cell<usize>,
    /// Where the arena starts over while something below is alive.
    base: Cell<usize>,
    /// The next free byte.
    top: Cell<usize>,
    /// The end of the memory obtained so far.
    end: Cell<usize>,
    /// Allocations at or above `base` not yet freed.
    live: Cell<usize>,
    /// Allocations at or above `floor` not yet freed.
    live_all: Cell<usize>,
}

// SAFETY: components run on one thread; nothing shares the arena across threads.
unsafe impl Sync for Arena {}

impl Arena {
    /// An empty arena; memory is obtained on first use.
    pub const fn new() -> Self {
        Self {
            floor: Cell::new(0),
            base: Cell::new(0),
            top: Cell::new(0),
            end: Cell::new(0),
            live: Cell::new(0),
            live_all: Cell::new(0),
        }
    }

    /// Makes room for `size` bytes at `align`, returning the address or 0.
    fn bump(&self, size: usize, align: usize) -> usize {
        if self.live_all.get() == 0 {
            self.base.set(self.floor.get());
            self.top.set(self.floor.get());
            self.live.set(0);
        } else if self.live.get() == 0 {
            self.top.set(self.base.get());
        }
        let mut start = self.top.get().next_multiple_of(align);
        if start.checked_add(size).is_none_or(|e| e > self.end.get()) {
            // Enough pages for the allocation wherever they land.
            let pages = size.saturating_add(align).div_ceil(PAGE).max(16);
            let grown = memory_grow(pages);
            if grown == usize::MAX {
                return 0;
            }
            let fresh = grown * PAGE;
            // The new pages continue the arena unless something else grew memory in
            // between or the arena has grown long enough without starting over; then
            // they start a new base, and what lives below stays where it is.
            if fresh != self.end.get() {
                // Not contiguous: what lies below is given up for good.
                self.floor.set(fresh);
                self.base.set(fresh);
                self.live.set(0);
                self.live_all.set(0);
                start = fresh.next_multiple_of(align);
            } else if self.top.get() - self.base.get() >= REBASE_BYTES {
                self.base.set(fresh);
                self.live.set(0);
                start = fresh.next_multiple_of(align);
            }
            self.end.set(fresh + pages * PAGE);
        }
        self.top.set(start + size);
        self.live.set(self.live.get() + 1);
        self.live_all.set(self.live_all.get() + 1);
        start
    }
}

impl Default for Arena {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: `bump` hands out non-overlapping ranges of memory obtained from
// `memory.grow`, aligned as asked; a range is handed out again only after every
// allocation at or above the base (from the floor: at or above the floor) was freed.
unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.bump(layout.size().max(1), layout.align()) as *mut u8
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        let at = ptr as usize;
        // Below the floor: memory given up when something else grew memory.
        if at >= self.floor.get() && at < self.end.get() {
            self.live_all.set(self.live_all.get().saturating_sub(1));
            if at >= self.base.get() {
                self.live.set(self.live.get().saturating_sub(1));
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let at = ptr as usize;
        // The newest allocation grows (or shrinks) in place when it fits.
        if at + layout.size() == self.top.get()
            && at >= self.base.get()
            && at + new_size <= self.end.get()
        {
            self.top.set(at + new_size);
            return ptr;
        }
        // SAFETY: the caller's layout is valid; `new_size` is non-zero per the contract.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as for `alloc`.
        let fresh = unsafe { self.alloc(new_layout) };
        if !fresh.is_null() {
            // SAFETY: both ranges are valid for the smaller size and do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    //! Natively, "linear memory" is a leaked, page-aligned buffer that `memory_grow`
    //! hands out page by page, so the arena's arithmetic runs on real addresses.

    use super::*;
    use std::sync::Mutex;

    const MEMORY_PAGES: usize = 1024; // 64 MiB

    /// (first page address, pages handed out); one memory for the whole test binary.
    static MEMORY: Mutex<Option<(usize, usize)>> = Mutex::new(None);

    pub(super) fn memory_grow(pages: usize) -> usize {
        let mut memory = MEMORY.lock().unwrap();
        let (base, used) = *memory.get_or_insert_with(|| {
            let buffer = vec![0u8; (MEMORY_PAGES + 1) * PAGE].leak();
            ((buffer.as_ptr() as usize).next_multiple_of(PAGE), 0)
        });
        if used + pages > MEMORY_PAGES {
            return usize::MAX;
        }
        *memory = Some((base, used + pages));
        // "Page numbers" are absolute addresses divided by the page size.
        base / PAGE + used
    }

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 8).unwrap()
    }

    /// One "call": allocates some buffers, scribbles over them, frees them all.
    fn call(arena: &Arena, sizes: &[usize]) -> Vec<usize> {
        let mut addresses = Vec::new();
        let mut held = Vec::new();
        for &size in sizes {
            // SAFETY: valid layouts; every pointer is freed below with its layout.
            let ptr = unsafe { arena.alloc(layout(size)) };
            assert!(!ptr.is_null());
            unsafe { std::ptr::write_bytes(ptr, 0xAB, size) };
            addresses.push(ptr as usize);
            held.push((ptr, size));
        }
        for (ptr, size) in held {
            unsafe { arena.dealloc(ptr, layout(size)) };
        }
        addresses
    }

    #[test]
    fn a_call_reuses_the_memory_of_the_previous_one() {
        let arena = Arena::new();
        let sizes = [40, 100, 7, 3000];
        let first = call(&arena, &sizes);
        let second = call(&arena, &sizes);
        assert_eq!(
            first, second,
            "everything was freed, so the arena starts over"
        );
        let mut spans: Vec<(usize, usize)> = first.iter().copied().zip(sizes).collect();
        spans.sort();
        for pair in spans.windows(2) {
            assert!(
                pair[0].0 + pair[0].1 <= pair[1].0,
                "allocations overlap: {spans:?}"
            );
        }
    }

    #[test]
    fn what_outlives_a_call_is_never_handed_out_again() {
        let arena = Arena::new();
        let kept = unsafe { arena.alloc(layout(64)) };
        unsafe { std::ptr::write_bytes(kept, 0x5A, 64) };
        // Many calls, together far more than REBASE_BYTES, none of which may touch it.
        for round in 0..2_000 {
            let addresses = call(&arena, &[1000, 24, 200 + round % 50]);
            for address in addresses {
                assert!(
                    address + 1000 <= kept as usize || address >= kept as usize + 64,
                    "round {round}: {address:#x} overlaps the kept allocation at {kept:p}"
                );
            }
        }
        let bytes = unsafe { std::slice::from_raw_parts(kept, 64) };
        assert!(
            bytes.iter().all(|&b| b == 0x5A),
            "the kept allocation was overwritten"
        );
        unsafe { arena.dealloc(kept, layout(64)) };
    }

    #[test]
    fn calls_larger_than_the_rebase_size_reuse_their_memory() {
        let arena = Arena::new();
        // A call with a large state: buffers doubling as they grow, 4 MiB in all, so
        // each call rebases on the way. 64 such calls leaving their memory behind
        // would need four times the 64 MiB there is.
        // `call` fails on a null pointer: memory ran out. (Exact addresses are not
        // compared: the other tests share the memory and grow it in between.)
        let sizes: Vec<usize> = (0..7).map(|i| (64 << 10) << i).collect();
        for _ in 0..64 {
            call(&arena, &sizes);
        }
    }

    #[test]
    fn realloc_keeps_the_contents_in_place_or_moved() {
        let arena = Arena::new();
        unsafe {
            let a = arena.alloc(layout(16));
            std::ptr::copy_nonoverlapping(b"0123456789abcdef".as_ptr(), a, 16);
            // The newest allocation grows where it is.
            let grown = arena.realloc(a, layout(16), 4096);
            assert_eq!(grown, a);
            let b = arena.alloc(layout(8));
            // Not the newest any more: moved, contents copied.
            let moved = arena.realloc(grown, layout(4096), 100_000);
            assert_ne!(moved, grown);
            assert_eq!(std::slice::from_raw_parts(moved, 16), b"0123456789abcdef");
            arena.dealloc(b, layout(8));
            arena.dealloc(moved, layout(100_000));
        }
    }

    #[test]
    fn memory_grown_by_someone_else_in_between_is_not_overrun() {
        let arena = Arena::new();
        unsafe {
            // The first allocation gets a region of 16 pages and uses half of it.
            let first = arena.alloc(layout(8 * PAGE));
            // Something else (wasi-libc's malloc, say) grows memory meanwhile, so the
            // arena's next pages cannot continue its region.
            assert_ne!(memory_grow(1), usize::MAX);
            let big = arena.alloc(layout(20 * PAGE));
            assert!(!big.is_null());
            assert!(
                arena.top.get() <= arena.end.get(),
                "the arena handed out memory past the pages it owns"
            );
            arena.dealloc(big, layout(20 * PAGE));
            arena.dealloc(first, layout(8 * PAGE));
        }
    }

    #[test]
    fn running_out_of_memory_is_a_null_pointer() {
        let arena = Arena::new();
        let huge = unsafe { arena.alloc(layout((MEMORY_PAGES + 1) * PAGE)) };
        assert!(huge.is_null());
        // And the arena still works for what fits.
        assert_eq!(call(&arena, &[10]).len(), 1);
    }
}
