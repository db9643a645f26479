//! Dev-only helpers shared by the integration tests (`observer/tests`), the benches
//! (`observer/benches`) and `xtask` (the benchmarks, the soak, the kernel matrix's guest):
//! each tool written once. Never a dependency of the daemon.
//!
//! - [`http`]: the HTTP/1 client: one response reader, a blocking client that times each
//!   exchange, an async one for byte-level tests.
//! - [`ledger`]: what the clients sent and how each exchange ended, per role and code, and
//!   the checks of `/metrics` against it.
//! - [`metrics`]: the Prometheus text reader (the library's own `Scrape`), and scraping an
//!   admin server.
//! - [`net`]: free ports, and the connections open on a port.
//! - [`nginx`]: Debian's nginx from a directory of its own, as a gateway or a fixed upstream
//!   (standard library, libc and anyhow only, with [`process`]).
//! - [`observer`]: `observer run`, `observer sim` and `observer proxy` as child processes,
//!   waited for until ready, stopped cleanly.
//! - [`process`]: stopping a child (SIGTERM, then SIGKILL), network namespaces, `/proc`.
//! - [`socket_io`]: one send or receive through a chosen system call (the capture tests and
//!   the kernel matrix's guest drive each one the kernel programs hook).

pub mod http;
pub mod ledger;
pub mod metrics;
pub mod net;
pub mod nginx;
pub mod observer;
pub mod process;
pub mod socket_io;
