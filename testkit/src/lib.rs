//! Dev-only helpers shared by the integration tests (`observer/tests`) and `xtask` (the
//! kernel matrix's guest drives the same system calls as the capture tests). Never a
//! dependency of the daemon.

pub mod socket_io;
