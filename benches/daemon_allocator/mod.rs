//! The daemon's allocator (see `src/main.rs`), for the benchmarks that run
//! the daemon's code in their own process: their figures (speed, peak RSS)
//! are the daemon's only if they allocate as it does. The benchmarks that
//! start the daemon as a child process need nothing of this.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
