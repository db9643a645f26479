//! Faults of the gateway, as root on the real kernel: nginx in front of `observer sim`,
//! `observer run` watching both ports (started after nginx, so nginx's listener and workers
//! come from `/proc`).
//!
//! - `nginx -s reload`: the master forks new workers and the old ones finish their requests
//!   and exit. The stream running across the reload completes on its old worker; the
//!   exchanges after it are served by the new workers, which the daemon only sees if it
//!   follows the fork and their accepts on the inherited listener.
//! - nginx stopped (fast shutdown, a stream cut) and started again on the same port: a new
//!   master binds the port, and its workers are new processes again.
//!
//! Both check the daemon's counts against the client's records, its gauges against the
//! kernel's connection table, and its memory against its idle size.

mod support;

use std::collections::BTreeSet;

use support::faults::*;
use support::nginx::{Nginx, WORKERS, comm};

fn workers(nginx: &Nginx) -> BTreeSet<u32> {
    nginx
        .worker_pids()
        .into_iter()
        .filter(|&pid| comm(pid) == "nginx")
        .collect()
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn nginx_reload_new_workers_are_followed() {
    support::assert_root();
    let rt = runtime();
    let Stack {
        sim: _sim,
        nginx,
        gateway,
        ports,
    } = Stack::start();
    let daemon = start_daemon(ports, &[]);
    let idle = Memory::of(&daemon);
    let mut want = Expected::default();

    rt.block_on(chatted(gateway, 2, 2, &mut want));
    let old = workers(&nginx);
    assert_eq!(old.len(), WORKERS);
    // A stream of 1.2 s, running when the reload comes: its old worker finishes it.
    let stream = streams_started(&rt, gateway, 1, &chat("token-ms=30, tokens=40")).remove(0);
    nginx.reload();
    let new = wait_for("new nginx workers", SETTLE, || {
        let now = workers(&nginx);
        let new: BTreeSet<u32> = now.difference(&old).copied().collect();
        match new.len() == WORKERS {
            true => Ok(new),
            false => Err(format!("old {old:?}, now {now:?}")),
        }
    });
    let (record, _) = rt.block_on(stream).unwrap();
    assert!(
        record.is_ok(),
        "the stream across the reload: {record:?}\n{}",
        nginx.error_log()
    );
    want.both(&record);
    wait_for("the old workers to exit", SETTLE, || {
        let now = workers(&nginx);
        match now == new {
            true => Ok(()),
            false => Err(format!("workers {now:?}, new ones {new:?}")),
        }
    });

    // Only the new workers accept now: every exchange counted is theirs.
    rt.block_on(chatted(gateway, 6, 2, &mut want));
    assert_recovered(&daemon, ports, &want, idle);
    daemon.stop();
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn nginx_restarted_on_the_same_port() {
    support::assert_root();
    let rt = runtime();
    let Stack {
        sim: _sim,
        mut nginx,
        gateway,
        ports,
    } = Stack::start();
    let daemon = start_daemon(ports, &[]);
    let idle = Memory::of(&daemon);
    let mut want = Expected::default();

    // Keep-alive clients that nginx's stop will close, and a stream it will cut.
    let mut idle_clients = rt.block_on(chatted(gateway, 2, 1, &mut want));
    let stream = streams_started(&rt, gateway, 1, &chat(LONG_STREAM)).remove(0);
    let old_master = nginx.master_pid();
    nginx.restart();
    assert_ne!(nginx.master_pid(), old_master);

    // The stream was cut after its head: the client has a 200 without its end, and so do
    // both sides' counts (the worker's exit closes its upstream connection; the simulator's
    // next write fails and it closes its side).
    let (record, _) = rt.block_on(stream).unwrap();
    assert_eq!(
        record,
        Record {
            status: Some(200),
            complete: false
        }
    );
    want.both(&record);
    // The idle keep-alive connections were closed by the stop, without a response.
    rt.block_on(async {
        for conn in idle_clients.iter_mut() {
            let rest = conn.read_until_closed(READ_WAIT).await;
            assert!(conn.ended && rest.is_empty(), "{rest:?}");
        }
    });
    drop(idle_clients);

    rt.block_on(chatted(gateway, 4, 2, &mut want));
    assert_recovered(&daemon, ports, &want, idle);
    daemon.stop();
}
