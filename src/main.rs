//! The `strata` binary: tunes the allocator, then hands over to the command line
//! ([`cli`]).

use std::process::ExitCode;

mod cli;

/// Keeps request-sized buffers (up to the 32 MiB maximum payload) in the allocator's
/// heaps. By default glibc serves allocations above a dynamic threshold with fresh `mmap`s
/// and unmaps them on free, so every large read or write buffer cost page faults and
/// page zeroing: a fifth of the CPU time of 1 MiB reads.
fn tune_allocator() {
    // glibc's: other C libraries have no such knobs.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; it is called before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    cli::main()
}
