//! Memory freed after a burst, given back to the operating system.
//!
//! Why: glibc's allocator keeps the pages of what it once handed out, in each thread's arena,
//! for reuse. A burst (publishes held up to `max_held_bytes` while a cluster is slow, large
//! messages, a client pipelining thousands of declares) can leave warren at a gigabyte of
//! resident memory with a few megabytes in use, for as long as it runs: measured after an hour
//! of probing with many clients, 1.1 GB resident and 11.6 MB in use, 1.08 GB of it in the two
//! connection threads' arenas. Monitoring sees a leak, and the memory is lost to the RabbitMQ
//! nodes often running on the same host. `malloc_trim` hands the free pages of every arena back
//! (1.1 GB to 31 MB there); this module calls it when the allocator has kept at least
//! [`TRIM_AFTER`] more free memory since it last did.
//!
//! Why not another allocator (jemalloc, mimalloc): one would give memory back by itself, but
//! it would change the allocator under every message, which the benchmarks would have to
//! measure again, and add a C build. This check costs one `mallinfo2` every
//! [`CHECK_EVERY`] and nothing on the message path.
//!
//! On other C libraries (musl) these are no-ops: the trimmer never trims.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// How often the allocator is asked how much it keeps free.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Free memory kept by the allocator, grown by this much since the last trim, is given back.
pub const TRIM_AFTER: usize = 32 << 20;

/// Bytes the allocator holds free for reuse (`mallinfo2().fordblks`): freed and not given back,
/// or given back by an earlier trim and not used since. `None` where the C library cannot say.
pub fn free_bytes() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; glibc takes
        // each arena's lock while it sums.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Gives the free pages of every arena back to the kernel. Whether any memory was released.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes a padding size and only returns free memory; it locks each
        // arena while it walks it.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The process's resident memory (`VmRSS`), for the log line.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// When to trim: free memory that grew by [`TRIM_AFTER`] since the last trim. Free memory
/// given back stays "free" to the allocator, so the mark is the free total right after a
/// trim, and it follows the total down as the memory is used again.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    mark: usize,
}

impl TrimPolicy {
    /// Whether to trim with `free` bytes held free now.
    pub fn should_trim(&mut self, free: usize) -> bool {
        self.mark = self.mark.min(free);
        free - self.mark >= TRIM_AFTER
    }

    /// A trim ran; `free` is the free total after it.
    pub fn trimmed(&mut self, free: usize) {
        self.mark = free;
    }
}

/// Checks every [`CHECK_EVERY`] on the current runtime until `stop` is cancelled.
pub fn spawn_trimmer(stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut policy = TrimPolicy::default();
        let mut every = tokio::time::interval(CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let Some(free) = free_bytes() else { return };
            if !policy.should_trim(free) {
                continue;
            }
            // Walking the arenas takes milliseconds when they are large: off the runtime.
            let Ok((before, after, free_after)) = tokio::task::spawn_blocking(|| {
                let before = resident_bytes();
                trim();
                (before, resident_bytes(), free_bytes())
            })
            .await
            else {
                return;
            };
            policy.trimmed(free_after.unwrap_or(free));
            match (before, after) {
                (Some(b), Some(a)) if b.saturating_sub(a) >= TRIM_AFTER as u64 => info!(
                    resident_before_mib = b >> 20,
                    resident_after_mib = a >> 20,
                    free_mib = free >> 20,
                    "gave memory freed since the last check back to the OS"
                ),
                _ => debug!(free_mib = free >> 20, "trimmed the allocator's free memory"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_trims_once_per_growth_of_free_memory() {
        let mut p = TrimPolicy::default();
        assert!(!p.should_trim(TRIM_AFTER - 1));
        assert!(p.should_trim(TRIM_AFTER));
        // After a trim the pages are gone but the bytes still count as free: no second trim.
        p.trimmed(TRIM_AFTER);
        assert!(!p.should_trim(TRIM_AFTER));
        assert!(!p.should_trim(TRIM_AFTER + TRIM_AFTER / 2));
        // The memory is used again, then freed again: that is new growth.
        assert!(!p.should_trim(1 << 20));
        assert!(p.should_trim((1 << 20) + TRIM_AFTER));
    }

    /// Freed memory held by the allocator goes back to the kernel. Chunks of 96 KiB stay below
    /// glibc's mmap threshold (128 KiB), so they come from an arena and stay there when freed.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn trim_gives_back_what_a_burst_left_behind() {
        const CHUNK: usize = 96 << 10;
        const CHUNKS: usize = 1600; // 150 MiB
        let mut kept = Vec::with_capacity(CHUNKS);
        let mut burst = Vec::with_capacity(CHUNKS);
        for _ in 0..CHUNKS {
            burst.push(vec![1u8; CHUNK]);
            // A small allocation after each chunk keeps the freed chunks from merging into the
            // arena's top, which free() would give back by itself.
            kept.push(vec![2u8; 64]);
        }
        let peak = resident_bytes().expect("VmRSS");
        drop(burst);
        let free = free_bytes().expect("mallinfo2");
        assert!(free >= CHUNK * CHUNKS / 2, "free after the burst: {free}");
        let held = resident_bytes().expect("VmRSS");
        assert!(trim(), "malloc_trim released nothing");
        let after = resident_bytes().expect("VmRSS");
        assert!(
            held.saturating_sub(after) >= (CHUNK * CHUNKS / 2) as u64,
            "resident: {peak} at the peak, {held} after free, {after} after the trim"
        );
        drop(kept);
    }
}
