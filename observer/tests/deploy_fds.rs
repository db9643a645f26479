//! Descriptor reuse on watched sockets, as root on the real kernel: `observer sim` on the host
//! on upstream port P, and a helper process (`tests/support/py/fd_games.py`) that holds client
//! connections to it and, on a second watched upstream port Q, its own listener and both ends
//! of connections to it (the accepted ends count). Each test makes counted exchanges, then
//! replaces, copies or closes the watched descriptors by one kind of call — dup2/dup3,
//! close_range, close-on-exec at exec, dup, fcntl(F_DUPFD_CLOEXEC) — and puts unwatched
//! sockets (connections to an echo server in the test) under the freed numbers, carrying
//! HTTP-looking bytes both ways.
//!
//! The daemon must count exactly the real exchanges, read no parse error (the unwatched bytes
//! are never taken for a watched connection's), and `tcp_connections_active{upstream}` must drop
//! to the connections really open on P and Q while the helper still runs (no exit to sweep).

mod support;

use std::net::SocketAddr;
use std::process::Command;

use support::daemon::{Daemon, Sim};
use support::deploy::*;
use support::faults::*;
use support::netns::{self, Proc};

/// The simulator on P, the daemon watching P and Q (and an unused gateway port), the echo
/// server.
struct Setup {
    sim: Sim,
    daemon: Daemon,
    ports: Ports,
    /// The helper's own watched port.
    q: u16,
    echo: SocketAddr,
}

impl Setup {
    fn start() -> Setup {
        let sim = Sim::start(FAST_SIM);
        let ports = Ports {
            gateway: netns::spare_port(),
            upstream: sim.addr.port(),
        };
        let q = netns::spare_port();
        let daemon = start_daemon(ports, &["--watch", &format!("{q}=upstream")]);
        Setup {
            sim,
            daemon,
            ports,
            q,
            echo: echo_server(),
        }
    }

    /// fd_games.py in `mode`, started.
    fn helper(&self, mode: &str) -> Proc {
        let mut cmd = Command::new(netns::python());
        cmd.arg(format!("{}/fd_games.py", netns::PY_DIR))
            .arg(mode)
            .arg(self.sim.addr.to_string())
            .arg(format!("127.0.0.1:{}", self.q))
            .arg(self.echo.to_string());
        Proc::spawn(cmd, &format!("fd_games.py {mode}"))
    }

    /// Connections really open: none on the gateway's port; the upstream's on P and Q.
    fn open(&self) -> [u64; 2] {
        [
            open_conns(self.ports.gateway),
            open_conns(self.ports.upstream) + open_conns(self.q),
        ]
    }

    /// `exchanges` upstream exchanges answered 200, and nothing else.
    fn assert_counted(&self, exchanges: u64) {
        let mut want = Expected::default();
        want.upstream.add("200", exchanges);
        assert_counted(&self.daemon, &want, || self.open(), &[]);
    }

    /// Once the helper is gone, nothing is open and the gauges say so.
    fn finish(self, helper: Proc) {
        drop(helper);
        let gauges = await_gauges_settled_with(&self.daemon, || self.open());
        assert_eq!(gauges.active, [0.0, 0.0], "{gauges:?}");
        self.daemon.stop();
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn dup2_and_dup3_onto_watched_descriptors() {
    support::assert_root();
    let setup = Setup::start();
    let mut helper = setup.helper("dup2");
    helper.expect_line("ready", netns::START_WAIT);
    // One exchange with the simulator, one served by the helper; both watched sockets closed
    // by the dup2/dup3 that replaced them.
    setup.assert_counted(2);
    assert_eq!(setup.open(), [0, 0]);
    setup.finish(helper);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn close_range_over_watched_descriptors() {
    support::assert_root();
    let setup = Setup::start();
    let mut helper = setup.helper("close_range");
    helper.expect_line("ready", netns::START_WAIT);
    // Three exchanges with the simulator and a fourth on the connection close_range spared;
    // two served by the helper on the accepted ends it closed.
    setup.assert_counted(6);
    assert_eq!(setup.open(), [0, 1]);
    setup.finish(helper);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn watched_descriptors_closed_on_exec() {
    support::assert_root();
    let setup = Setup::start();
    let mut helper = setup.helper("exec");
    helper.expect_line("ready", netns::START_WAIT);
    // One exchange each way before the exec; after it, only unwatched sockets under the old
    // numbers, in the same process.
    setup.assert_counted(2);
    assert_eq!(setup.open(), [0, 0]);
    setup.finish(helper);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn dup_of_watched_descriptors() {
    support::assert_root();
    copies_of_watched_descriptors("dup");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn fcntl_dupfd_of_watched_descriptors() {
    support::assert_root();
    copies_of_watched_descriptors("dupfd");
}

/// Copies made by `mode` (fd_games.py `dup`: the dup syscall; `dupfd`: fcntl F_DUPFD_CLOEXEC)
/// carry the exchanges of the connection they copy, once; closing the original leaves the
/// connection open.
fn copies_of_watched_descriptors(mode: &str) {
    let setup = Setup::start();
    let mut helper = setup.helper(mode);
    helper.expect_line("checkpoint dup", netns::START_WAIT);
    // An exchange sent on a copy of W, read on W: once. One served on a copy of S: once; S is
    // then closed, and its copy keeps the connection open.
    setup.assert_counted(2);
    assert_eq!(setup.open(), [0, 2]);
    helper.send("go");
    helper.expect_line("ready", netns::START_WAIT);
    // One more on the copy, which is then closed; the simulator's connection stays.
    setup.assert_counted(3);
    assert_eq!(setup.open(), [0, 1]);
    setup.finish(helper);
}
