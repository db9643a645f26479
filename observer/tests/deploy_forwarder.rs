//! Deployment: the upstream (Ollama; here `observer sim`) in a container — its own network
//! namespace — published on the host by a single-process userland forwarder, as docker-proxy
//! does: the forwarder accepts on the host's 127.0.0.1:P and connects to the container's
//! address at the same port P. nginx on the host proxies to 127.0.0.1:P. As root on the real
//! kernel, with `observer run` watching the gateway's port and P.
//!
//! The forwarder is a relay (it accepts on a watched port and itself connects to that port):
//! neither its accepted nor its outgoing connections count. Each exchange counts once per role:
//! the gateway's at nginx's accepted end, the upstream's at the simulator's, in its namespace;
//! `tcp_connections_active{upstream}` is the simulator's connections, not the forwarder's.
//! Once with everything (and keep-alive connections through the forwarder) in place before
//! the daemon starts, once with the container and the forwarder started after it.

mod support;

use std::net::{Ipv4Addr, SocketAddr};

use support::daemon::Sim;
use support::deploy::*;
use support::faults::*;
use support::netns::{self, Netns};

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn upstream_behind_a_forwarder_started_before_the_daemon() {
    support::assert_root();
    let rt = runtime();
    let port = netns::spare_port();
    let published = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let ns = Netns::new("fwd");
    let sim = Sim::start_in(Some(&ns.name), &format!("{}:{port}", ns.ip), FAST_SIM);
    let forwarder = netns::forwarder(published, sim.addr);
    let (nginx, ports) = gateway_to(published);
    eprintln!(
        "client -> nginx {} -> forwarder {published} -> sim {} in {}",
        nginx.addr(),
        sim.addr,
        ns.name
    );
    exercise_after_warm_up(
        &rt,
        &nginx,
        ports,
        &Requests::sim(),
        || [open_conns(ports.gateway), ns.open_conns(port)],
        |daemon| await_hops(daemon, port, sim.pid(), Some(forwarder.pid())),
    );

    let names = ns.names();
    drop((forwarder, nginx, sim, ns));
    netns::assert_nothing_left(&names);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn upstream_behind_a_forwarder_started_after_the_daemon() {
    support::assert_root();
    relay_started_after_the_daemon("fwd", netns::forwarder);
}
