//! Ports and connections on this host: a free port for a server to come, and the connections
//! open on a port as the kernel's own table (`/proc/net/tcp{,6}`) lists them.

use std::{
    net::TcpListener,
    sync::{Mutex, PoisonError},
};

/// A port nothing listens on now (bound to 127.0.0.1:0, then released).
///
/// Never the same number twice in one process: tests run in parallel threads, and one that
/// starts a daemon on its port must not find another test's daemon there (the kernel may hand
/// out a port again once it is released).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .unwrap_or_else(|err| panic!("binding 127.0.0.1:0 for a free port: {err}"))
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Connections open on `port` on this host's side of it (the local port is `port`): a process
/// holds them (established, or closed by the peer and not yet by the process). Listening
/// sockets and sockets the process closed (`FIN_WAIT`, `TIME_WAIT`, `LAST_ACK`, ...) are not
/// counted.
pub fn open_conns(port: u16) -> u64 {
    open_conns_at("/proc/net", port)
}

/// [`open_conns`] in the tables under `proc_net`: `/proc/<pid>/net` is the table of `pid`'s
/// network namespace.
pub fn open_conns_at(proc_net: &str, port: u16) -> u64 {
    ["tcp", "tcp6"]
        .iter()
        .map(|table| {
            let text = std::fs::read_to_string(format!("{proc_net}/{table}")).unwrap_or_default();
            count_open(&text, port)
        })
        .sum()
}

/// The rows of one `/proc/net/tcp` table whose local port is `port`, in state `ESTABLISHED`
/// (01) or `CLOSE_WAIT` (08).
fn count_open(table: &str, port: u16) -> u64 {
    const ESTABLISHED: &str = "01";
    const CLOSE_WAIT: &str = "08";
    let open = table.lines().skip(1).filter(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = fields
            .get(1)
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        local_port == Some(port) && matches!(fields.get(3), Some(&(ESTABLISHED | CLOSE_WAIT)))
    });
    open.count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_given_twice() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
    }

    #[test]
    fn counts_open_server_sockets_of_a_port() {
        // 0x1F90 = 8080. Listening, established (both ends), close-wait, time-wait, fin-wait2.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n\
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2\n\
   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3\n\
   3: 0100007F:1F90 0100007F:D432 08 00000000:00000000 00:00000000 00000000     0        0 4\n\
   4: 0100007F:1F90 0100007F:D433 06 00000000:00000000 00:00000000 00000000     0        0 0\n\
   5: 0100007F:1F90 0100007F:D434 05 00000000:00000000 00:00000000 00000000     0        0 0\n\
   6: 0100007F:1F91 0100007F:D435 01 00000000:00000000 00:00000000 00000000     0        0 5\n";
        assert_eq!(count_open(table, 8080), 2);
        assert_eq!(count_open(table, 8081), 1);
        assert_eq!(count_open(table, 80), 0);
    }
}
