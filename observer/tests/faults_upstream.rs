//! Fault: the upstream (Ollama; here `observer sim`) dies mid-stream and comes back. As root on
//! the real kernel: nginx in front of the simulator, `observer run` watching both ports. The
//! simulator is killed with SIGKILL while streams run through nginx (no `close(2)`: the kernel
//! closes its sockets, and the daemon learns of it by sweeping exited processes), a request
//! meets the dead upstream, then the simulator starts again on the same port and traffic
//! resumes on the clients' old keep-alive connections and on new ones. The daemon must count
//! every exchange once per role with the code the client saw, settle its gauges to what is
//! really open, and keep running within its memory.

mod support;

use support::daemon::Sim;
use support::faults::*;

/// Streams running when the upstream is killed.
const STREAMS: usize = 4;

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn upstream_killed_mid_stream_then_restarted_on_its_port() {
    support::assert_root();
    let rt = runtime();
    let Stack {
        sim,
        nginx,
        gateway,
        ports,
    } = Stack::start();
    let upstream = sim.addr;
    let daemon = start_daemon(ports, &[]);
    let idle = Memory::of(&daemon);
    let mut want = Expected::default();

    // Before: two keep-alive clients, two chats each.
    let mut clients = rt.block_on(chatted(gateway, 2, 2, &mut want));

    // Streams in progress: each client has the response head (so both the simulator and
    // nginx have sent it) when the simulator is killed.
    let streams = streams_started(&rt, gateway, STREAMS, &chat(LONG_STREAM));
    sim.kill();
    for stream in streams {
        let (record, _) = rt.block_on(stream).unwrap();
        // nginx cuts the client's response where the upstream's ended: the status came, the
        // body did not. Both sides count the exchange under its status, 200, cut short.
        assert_eq!(
            record,
            Record {
                status: Some(200),
                complete: false
            },
            "{}",
            nginx.error_log()
        );
        want.both(&record);
    }

    // With the upstream down, nginx answers 502 itself: a gateway exchange with no upstream one
    // (nothing accepts the connection nginx tries).
    let record = rt.block_on(clients[0].exchange(&chat("")));
    assert_eq!(record.status, Some(502), "{record:?}");
    want.gateway.record(&record);

    // The upstream again, on its port: old keep-alive clients and new ones are served, and
    // counted on both sides.
    let _sim = Sim::start_on(&upstream.to_string(), FAST_SIM);
    rt.block_on(async {
        for _ in 0..2 {
            chat_on(&mut clients, &mut want).await;
        }
        chatted(gateway, 2, 1, &mut want).await;
    });

    assert_recovered(&daemon, ports, &want, idle);
    // And once the clients' keep-alive connections close.
    drop(clients);
    await_gauges_settled(&daemon, ports);
    daemon.stop();
}
