//! The `observer` binary: parse the command line, set up logging, hand over to the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    limit_malloc_arenas();
    observer::cli::main()
}

/// glibc gives threads that contend for the allocator arenas of their own, up to eight per
/// core, and keeps what was freed in each mapped. The daemon's threads (the runtime's workers,
/// its blocking pool, the collectors) then grow its resident memory in steps of a few MiB for
/// minutes after a burst of connections: `cargo xtask soak` saw 39 → 51.5 MiB with the default
/// and a flat 40.4 MiB with one arena. One arena per core keeps the allocator's concurrency and
/// bounds that. `MALLOC_ARENA_MAX` in the environment still decides where it is set.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a tunable of the allocator; no allocation is in flight in
        // another thread yet (this runs first in main).
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}
