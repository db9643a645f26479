//! Deployment: forked servers on the upstream port, as root on the real kernel with `observer
//! run` watching the gateway's port (nginx on the host) and the upstream's port P.
//!
//! - A fork-per-connection server (Python `socketserver.ForkingMixIn` + `http.server`,
//!   `tests/support/py/fork_server.py`) on 127.0.0.1:P: the parent accepts each connection,
//!   forks, and closes its own copy at once; the child serves the connection with keep-alive
//!   (HTTP/1.1, Content-Length) until nginx closes it. The child's exchanges are captured and
//!   counted once; the parent's close does not end the connection. Once started after the
//!   daemon, once before it with keep-alive connections held by children.
//! - `socat TCP-LISTEN:P,fork` on the host in front of `observer sim` in a network namespace:
//!   a relay that forks a child per connection, which connects to the namespace's address at
//!   the same port P. The relay's connections do not count; each exchange counts once at the
//!   simulator, and `tcp_connections_active{upstream}` is the simulator's connections.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;

use support::deploy::*;
use support::faults::*;
use support::netns::{self, Proc};

/// fork_server.py on 127.0.0.1:`port`, listening.
fn fork_server(port: u16) -> Proc {
    let mut cmd = Command::new(netns::python());
    cmd.arg(format!("{}/fork_server.py", netns::PY_DIR))
        .args(["127.0.0.1", &port.to_string()]);
    let mut server = Proc::spawn(cmd, "fork_server.py");
    server.expect_line("listening", netns::START_WAIT);
    server
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn fork_per_connection_upstream() {
    support::assert_root();
    let rt = runtime();
    let port = netns::spare_port();
    let upstream = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let (nginx, ports) = gateway_to(upstream);
    let daemon = start_daemon(ports, &[]);
    let server = fork_server(port);
    eprintln!(
        "client -> nginx {} -> fork_server.py {upstream}",
        nginx.addr()
    );

    exercise(
        &rt,
        daemon,
        nginx.addr(),
        Vec::new(),
        &Requests::for_model("m"),
        || [open_conns(ports.gateway), open_conns(port)],
        &[],
        // The children hold nginx's kept-alive upstream connections (the parent closed its
        // copies).
        |_| assert!(open_conns(port) >= 1),
    );
    drop((nginx, server));
}

/// The same with the server's children already holding nginx's keep-alive connections when the
/// daemon starts: `/proc` shows each connection under its child only.
#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn fork_per_connection_upstream_started_before_the_daemon() {
    support::assert_root();
    let rt = runtime();
    let port = netns::spare_port();
    let upstream = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let server = fork_server(port);
    let (nginx, ports) = gateway_to(upstream);
    exercise_after_warm_up(
        &rt,
        &nginx,
        ports,
        &Requests::for_model("m"),
        || [open_conns(ports.gateway), open_conns(port)],
        |_| {},
    );
    drop((nginx, server));
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn forking_socat_relay_in_front_of_an_upstream_in_a_namespace() {
    support::assert_root();
    // socat's children relay what the parent accepted: the parent is the relay.
    relay_started_after_the_daemon("socat", netns::socat);
}
