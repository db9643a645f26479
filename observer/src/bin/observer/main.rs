//! The `observer` binary: the command line over the daemon's library (`observer run`, `proxy`,
//! `trace`, `check`, `probe`, `metrics-reference`), the simulator of the `observer-sim` crate
//! (`observer sim`) and the demo that runs them all together (`observer demo`).
//!
//! - `cli`: the subcommands, logging set-up, one place that turns errors into exit codes.
//! - `config_file`: `--config FILE`, TOML settings under the flags and `OBSERVER_*` variables.
//! - `demo`: `observer demo`, simulator, gateway, observer and chat users with a live summary.

mod cli;
mod config_file;
mod demo;

use std::process::ExitCode;

fn main() -> ExitCode {
    limit_malloc_arenas();
    cli::main()
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
