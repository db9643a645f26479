//! Fuzzes the HTTP exchange engine with scripts of opens, partially captured sends and
//! receives, closes and drains on a few connections (format: `observer_fuzz`), on an engine
//! that keeps fewer connections than the script names. Checks, after every operation, the
//! engine's bounds, and for every exchange it emits, the ordering of its timestamps.

#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::base::{Role, Side};
use observer::engine::{Call, Engine, EngineConfig, Exchange, MAX_PATH, MAX_PIPELINE, Outcome};
use observer_fuzz::{Op, replay};

const MAX_CONNS: usize = 4;

fuzz_target!(|input: &[u8]| {
    let mut engine = Engine::new(EngineConfig {
        max_conns: MAX_CONNS,
    });
    replay(&mut engine, input, |engine, op| {
        if let Op::Drain { close_all } = *op {
            if close_all {
                assert_eq!(engine.connections(), 0);
                assert_eq!(in_flight(engine), 0, "in-flight count leaked");
            }
            engine
                .drain_finished()
                .for_each(|exchange| check(&exchange));
            engine.drain_calls().for_each(|call| check_call(&call));
        }
        assert!(engine.connections() <= MAX_CONNS);
        assert!(in_flight(engine) <= engine.connections() * MAX_PIPELINE);
    });
    engine.close_all();
    assert_eq!(in_flight(&engine), 0, "in-flight count leaked");
    engine
        .drain_finished()
        .for_each(|exchange| check(&exchange));
    engine.drain_calls().for_each(|call| check_call(&call));
});

/// A call over WebSocket: its times in order.
fn check_call(call: &Call) {
    assert!(call.request_first <= call.request_last, "{call:?}");
    assert!(call.request_last <= call.end, "{call:?}");
    if let Some(first) = call.first_delta {
        assert!(first >= call.request_first, "{call:?}");
    }
}

/// Requests in flight over every role and side.
fn in_flight(engine: &Engine) -> usize {
    [Role::Gateway, Role::Upstream]
        .into_iter()
        .flat_map(|role| [Side::Server, Side::Client].map(|side| engine.in_flight(role, side)))
        .sum()
}

fn check(exchange: &Exchange) {
    let ts = &exchange.ts;
    assert!(ts.request_first <= ts.request_last, "{exchange:#?}");
    for (what, at) in [
        ("response_first", ts.response_first),
        ("first_chunk", ts.first_chunk),
        ("response_last", ts.response_last),
    ] {
        if let Some(at) = at {
            assert!(
                at >= ts.request_first,
                "{what} before request_first: {exchange:#?}"
            );
        }
    }
    // A response is seen whole or not at all: its first and last byte, in order, and any
    // content chunk between them.
    assert_eq!(
        ts.response_first.is_some(),
        ts.response_last.is_some(),
        "{exchange:#?}"
    );
    if let (Some(first), Some(last)) = (ts.response_first, ts.response_last) {
        assert!(first <= last, "{exchange:#?}");
        if let Some(chunk) = ts.first_chunk {
            assert!(first <= chunk && chunk <= last, "{exchange:#?}");
        }
    } else {
        assert_eq!(ts.first_chunk, None, "{exchange:#?}");
    }
    if exchange.outcome == Outcome::Complete {
        assert!(exchange.status.is_some(), "{exchange:#?}");
    }
    assert!(exchange.path.len() <= MAX_PATH, "{exchange:#?}");
}
