//! Deployment: two pods on one node. The gateway (nginx) runs in one network namespace, the
//! upstream (Ollama; here `observer sim`) in another, joined by a veth pair; the client on the
//! host reaches nginx at its namespace's address. As root on the real kernel, with `observer
//! run` on the host watching both ports (its hooks are global; its `/proc` seeding reads every
//! namespace).
//!
//! Each exchange counts once per role: the gateway's at nginx's accepted end, the upstream's at
//! the simulator's; every gateway exchange is paired with nginx's own upstream exchange (an
//! overhead observation each); `tcp_connections_active{role}` equals the connections open at
//! each server in its namespace. Once with the pods started after the daemon, once with the pods
//! and keep-alive connections through them in place before it (seeded from the namespaces).

mod support;

use std::net::SocketAddr;

use support::daemon::Sim;
use support::deploy::*;
use support::faults::*;
use support::netns::{self, Netns};
use support::nginx::{Nginx, NginxOptions};

/// The two pods: nginx in `gw` on `gw.ip:<gateway>`, the simulator in `up` on its address on
/// the link between them, port `upstream`.
struct Pods {
    nginx: Nginx,
    _sim: Sim,
    up: Netns,
    gw: Netns,
}

impl Pods {
    fn start(ports: Ports) -> Pods {
        let (gw, up) = (Netns::new("gw"), Netns::new("up"));
        let (_, up_ip) = Netns::link(&gw, &up);
        let sim = Sim::start_in(
            Some(&up.name),
            &format!("{up_ip}:{}", ports.upstream),
            FAST_SIM,
        );
        let listen = SocketAddr::new(gw.ip.into(), ports.gateway);
        let nginx = Nginx::start_in(sim.addr, NginxOptions::default(), Some(&gw.name), listen);
        eprintln!(
            "client -> nginx {} in {} -> sim {} in {}",
            nginx.addr(),
            gw.name,
            sim.addr,
            up.name
        );
        Pods {
            nginx,
            _sim: sim,
            up,
            gw,
        }
    }

    /// The connections really open at nginx (its accepted ones) and at the simulator.
    fn open(&self, ports: Ports) -> [u64; 2] {
        [
            self.gw.open_conns(ports.gateway),
            self.up.open_conns(ports.upstream),
        ]
    }

    /// Stops everything and checks that no namespace or interface is left.
    fn remove(self) {
        let mut names = self.gw.names();
        names.extend(self.up.names());
        drop(self);
        netns::assert_nothing_left(&names);
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn gateway_and_upstream_in_two_pods_started_after_the_daemon() {
    support::assert_root();
    let rt = runtime();
    let ports = Ports {
        gateway: netns::spare_port(),
        upstream: netns::spare_port(),
    };
    let daemon = start_daemon(ports, &[]);
    let pods = Pods::start(ports);
    exercise(
        &rt,
        daemon,
        pods.nginx.addr(),
        Vec::new(),
        &Requests::sim(),
        || pods.open(ports),
        &[],
        |_| {},
    );
    pods.remove();
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn gateway_and_upstream_in_two_pods_started_before_the_daemon() {
    support::assert_root();
    let rt = runtime();
    let ports = Ports {
        gateway: netns::spare_port(),
        upstream: netns::spare_port(),
    };
    let pods = Pods::start(ports);
    let requests = Requests::sim();
    let conns = rt.block_on(warm(pods.nginx.addr(), 2, &requests));
    let open = pods.open(ports);
    assert!(open[0] == 2 && open[1] >= 1, "{open:?}");

    let daemon = start_daemon(ports, &[]);
    exercise(
        &rt,
        daemon,
        pods.nginx.addr(),
        conns,
        &requests,
        || pods.open(ports),
        &["mid_stream"],
        |_| {},
    );
    pods.remove();
}
