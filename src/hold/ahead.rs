//! Faulting a hold's memory in ahead of the pipe that fills it.
//!
//! On this project's VM (a balloon with free page reporting) the first touch
//! of memory that has been free for a while is a trip to the host. It costs
//! far more than the copy into it: 1-2 s per GiB against about 0.15 s. A hold
//! filled while the container is frozen pays that inside the pause. Faulting
//! it all in before the freeze takes it out of the pause but adds it, serially,
//! to the checkpoint's total. So threads fault the hold in from the moment it
//! is made, before the freeze, and go on beside the copy while the container
//! is frozen. The copy mostly finds its pages in place, the trips to the host
//! are spread over the cores, and the total does not grow.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// How much one step of a faulting thread covers; it checks for a stop between.
const STEP: usize = 8 << 20;

/// Threads faulting in a writable mapping, step by step, ahead of its filling.
pub struct FaultAhead {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    base: usize,
    len: usize,
    /// The next step's offset, taken by whichever thread is free.
    next: AtomicUsize,
    /// How far the fill has come: steps below it need nothing.
    filled: AtomicUsize,
    stop: AtomicBool,
}

impl FaultAhead {
    /// Starts faulting in `len` bytes at `base` with up to `threads` threads,
    /// no more than there are cores: the host serves each vCPU's faults on
    /// its own thread.
    ///
    /// # Safety
    /// `base..base + len` is a writable mapping that stays mapped until this
    /// value is stopped or dropped.
    pub unsafe fn start(base: *mut u8, len: usize, threads: usize) -> FaultAhead {
        let shared = Arc::new(Shared {
            base: base as usize,
            len,
            next: AtomicUsize::new(0),
            filled: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let n = std::thread::available_parallelism().map_or(1, |n| n.get().min(threads));
        let threads = (0..n)
            .filter_map(|_| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name("ckpt-fault-ahead".into())
                    .spawn(move || s.run())
                    .ok()
            })
            .collect();
        FaultAhead { shared, threads }
    }

    /// The fill has come to `upto`: what lies below is skipped.
    pub fn filled(&self, upto: usize) {
        self.shared.filled.store(upto, Ordering::Relaxed);
    }

    /// Stops the threads and waits for them; the mapping may go after this.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for FaultAhead {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn run(&self) {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        while !self.stop.load(Ordering::Relaxed) {
            let off = self.next.fetch_add(STEP, Ordering::Relaxed);
            if off >= self.len {
                return;
            }
            let n = STEP.min(self.len - off);
            if off + n <= self.filled.load(Ordering::Relaxed) {
                continue;
            }
            // SAFETY: within the mapping `start`'s caller keeps mapped until the
            // threads are joined. Faulting in a page never changes its bytes: a
            // page the fill wrote first is only mapped. A failure (no memory)
            // leaves the rest to the fill, which faults in what it writes.
            let r = unsafe {
                libc::madvise(
                    (self.base + off) as *mut libc::c_void,
                    n,
                    MADV_POPULATE_WRITE,
                )
            };
            if r != 0 {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident(base: *mut u8, len: usize) -> usize {
        let mut v = vec![0u8; len.div_ceil(4096)];
        // SAFETY: a mapping of ours, `v` sized for its pages.
        assert_eq!(unsafe { libc::mincore(base.cast(), len, v.as_mut_ptr()) }, 0);
        v.iter().filter(|b| **b & 1 == 1).count() * 4096
    }

    #[test]
    fn faults_in_what_is_not_filled_and_changes_no_byte() {
        let len = 5 * STEP + 4096;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as *mut u8;
        assert!(!base.is_null() && base as isize != -1);
        // The first two steps are "filled" already: written, then skipped.
        // SAFETY: within the mapping.
        unsafe { std::ptr::write_bytes(base, 7, 2 * STEP) };
        // SAFETY: the mapping outlives the threads, joined by `stop`.
        let mut a = unsafe { FaultAhead::start(base, len, 2) };
        a.filled(2 * STEP);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while resident(base, len) < len && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        a.stop();
        assert_eq!(resident(base, len), len, "all of it faulted in");
        // SAFETY: within the mapping, no thread left to touch it.
        let bytes = unsafe { std::slice::from_raw_parts(base, len) };
        assert!(bytes[..2 * STEP].iter().all(|b| *b == 7));
        assert!(bytes[2 * STEP..].iter().all(|b| *b == 0));
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(base.cast(), len) };
    }
}
