//! Deployment: the upstream (Ollama; here `observer sim`) in a container — its own network
//! namespace — published as Docker does without its userland proxy: nat OUTPUT DNAT (nftables)
//! sends locally originated TCP to the host's address H:P to the container's address at the
//! same port P. nginx on the host proxies to H:P (the host's end of the container's veth). As
//! root on the real kernel, with `observer run` watching the gateway's port and P.
//!
//! nginx's connections name H:P and arrive at the simulator in the namespace: each exchange
//! counts once per role, the upstream's at the simulator's accepted end (nginx's client end does
//! not count: the port has a listener on this host, in the namespace);
//! `tcp_connections_active{upstream}` is the simulator's connections. Once with everything (and
//! keep-alive connections) in place before the daemon starts, once with the container and the
//! DNAT rule added after it.

mod support;

use std::net::{SocketAddr, SocketAddrV4};

use support::daemon::Sim;
use support::deploy::*;
use support::faults::*;
use support::netns::{self, Dnat, Netns};

/// The container, its simulator on `ns.ip:port`, and the DNAT from `ns.host_ip:port`.
fn container(port: u16) -> (Netns, Sim, Dnat, SocketAddr) {
    let ns = Netns::new("dnat");
    let sim = Sim::start_in(Some(&ns.name), &format!("{}:{port}", ns.ip), FAST_SIM);
    let published = SocketAddrV4::new(ns.host_ip, port);
    let dnat = Dnat::new(published, SocketAddrV4::new(ns.ip, port));
    eprintln!(
        "DNAT {published} -> sim {} in {} (nft table {})",
        sim.addr, ns.name, dnat.table
    );
    (ns, sim, dnat, published.into())
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn upstream_behind_dnat_set_up_before_the_daemon() {
    support::assert_root();
    let rt = runtime();
    let port = netns::spare_port();
    let (ns, sim, dnat, published) = container(port);
    let (nginx, ports) = gateway_to(published);
    exercise_after_warm_up(
        &rt,
        &nginx,
        ports,
        &Requests::sim(),
        || [open_conns(ports.gateway), ns.open_conns(port)],
        |daemon| await_hops(daemon, port, sim.pid(), None),
    );

    let mut names = ns.names();
    names.push(dnat.table.clone());
    drop((nginx, dnat, sim, ns));
    netns::assert_nothing_left(&names);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn upstream_behind_dnat_set_up_after_the_daemon() {
    support::assert_root();
    let rt = runtime();
    let port = netns::spare_port();
    // nginx needs the published address first: the container's veth is made before the
    // daemon, the simulator and the DNAT rule after it.
    let ns = Netns::new("dnat");
    let published = SocketAddrV4::new(ns.host_ip, port);
    let (nginx, ports) = gateway_to(published.into());
    let daemon = start_daemon(ports, &[]);

    let sim = Sim::start_in(Some(&ns.name), &format!("{}:{port}", ns.ip), FAST_SIM);
    let dnat = Dnat::new(published, SocketAddrV4::new(ns.ip, port));
    eprintln!("DNAT {published} -> sim {} in {}", sim.addr, ns.name);
    exercise_to_namespace(&rt, daemon, &nginx, ports, &ns, &sim, None);

    let mut names = ns.names();
    names.push(dnat.table.clone());
    drop((nginx, dnat, sim, ns));
    netns::assert_nothing_left(&names);
}
