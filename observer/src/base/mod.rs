//! The vocabulary every layer shares, below all of them: roles of watched ports
//! ([`Role`], [`WatchedPort`]), the ends and directions of a connection and what is known of
//! it ([`Side`], [`Direction`], [`ConnRecord`]), and the clocks ([`clock`]). Nothing here
//! knows where bytes come from or where they go.

pub mod clock;
mod conn;
mod role;

pub use conn::{ConnRecord, Direction, Side};
pub use role::{Role, WatchedPort, watch_list};
