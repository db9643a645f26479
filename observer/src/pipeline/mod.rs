//! The daemon's flow after the capture: connection events and byte segments into the
//! [`Engine`], finished exchanges into [`Metrics`], gateway and upstream exchanges into the
//! [`Correlator`]. Fed by `observer run` (eBPF events) and by the fallback proxy alike.
//!
//! It owns the rule that counts every exchange once (docs/DESIGN.md#capture-counted-once), wherever
//! it is seen from:
//! - where the listener of a port is on this host (in any network namespace) its server side
//!   is counted; the client side only where the server is remote. The client side still
//!   feeds correlation;
//! - a **relay** — a process that accepts on a watched port and itself connects to the same
//!   port (docker-proxy, socat, a userland forwarder), or whose forked children do — is a hop,
//!   not a second server: its ends are counted neither for requests nor for connections where
//!   a real server of the port is seen on this host (it answers the exchange), and its server
//!   side is counted where no real server is (it forwards off the host); relay hops never
//!   feed correlation.
//!
//! It does no I/O.

use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use std::sync::Arc;

use crate::base::{ConnRecord, Direction, Role, Side};
pub mod own_ports;

use self::own_ports::OwnPorts;
use crate::engine::{
    Call, ConnMeta, Engine, EngineConfig, ErrorCounts, ErrorReason, Exchange, MessageKind, Unread,
    WsCounts,
    correlate::{Correlator, Resolved},
};
use crate::metrics::{Metrics, handles::Handles};

/// Totals of what went through, for `/status` and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub exchanges: u64,
    pub connections: usize,
}

pub struct Pipeline {
    engine: Engine,
    correlator: Correlator,
    /// Reused by every flush.
    resolved: Resolved,
    metrics: Arc<Metrics>,
    /// Ports whose listener is on this host (their server side is counted).
    local_ports: HashSet<u16>,
    /// Roles with a local listener: their in-flight gauge follows the server side.
    local_roles: [bool; 2],
    /// Ports of the daemon's own client connections: their server end is not observed.
    own_ports: Option<OwnPorts>,
    /// Server ends of the daemon's own connections, skipped until they close.
    ignored: HashSet<u64>,
    /// Every connection open now, with what it is to the count-once rule.
    conns: HashMap<u64, ConnState>,
    /// Connections closed since the last flush: their exchanges still flush as what they were.
    closing: HashMap<u64, ConnState>,
    /// Open client ends by (process, port, role): a process with both ends on one port, in
    /// one role, is a relay.
    client_ends: HashMap<EndKey, u32>,
    /// Open server ends by (process doing their I/O, port, role).
    server_ends: HashMap<EndKey, u32>,
    /// (process, port) whose accepted connections are relayed (by itself or its children):
    /// its next accepted connections are relay hops from the start.
    relays: HashMap<(u32, u16), Role>,
    /// Processes (a few per port) that served bytes on a port as real servers (not relays).
    served: HashMap<u16, HashSet<u32>>,
    /// Relay (process, port, role) whose ends were looked for already.
    relay_keys: HashSet<EndKey>,
    /// Server ends by (port, the client's port): who accepted which connection.
    accepted: HashMap<(u16, u16), (u32, u64)>,
    /// Client ends of a process with server ends on the same port, by (port, own port), until
    /// it is known whether they go to that process itself or elsewhere.
    candidates: HashMap<(u16, u16), u64>,
    /// The metric series this pipeline touched, by label set, and what it observed since it
    /// last published.
    handles: Handles,
    /// Flushes publish at most this often (the capture clock); 0: every flush.
    publish_every_ns: u64,
    last_publish_ns: u64,
    /// In-flight requests by role as last added to the gauge (which other pipelines share).
    reported_in_flight: [i64; 2],
    /// Engine errors already added to the metrics.
    reported_errors: ErrorCounts,
    /// WebSocket counts already exported, by role (on the side counted for it).
    reported_ws: [WsCounts; 2],
    totals: Totals,
}

impl Pipeline {
    pub fn new(metrics: Arc<Metrics>, config: EngineConfig) -> Pipeline {
        Pipeline {
            engine: Engine::new(config),
            correlator: Correlator::new(),
            resolved: Resolved::default(),
            metrics,
            local_ports: HashSet::new(),
            local_roles: [false; 2],
            own_ports: None,
            ignored: HashSet::new(),
            conns: HashMap::new(),
            closing: HashMap::new(),
            client_ends: HashMap::new(),
            server_ends: HashMap::new(),
            relays: HashMap::new(),
            served: HashMap::new(),
            relay_keys: HashSet::new(),
            accepted: HashMap::new(),
            candidates: HashMap::new(),
            handles: Handles::default(),
            publish_every_ns: 0,
            last_publish_ns: 0,
            reported_in_flight: [0; 2],
            reported_errors: ErrorCounts::default(),
            reported_ws: Default::default(),
            totals: Totals::default(),
        }
    }

    /// A listener on `port` is on this host: its server side is the one counted.
    pub fn mark_local(&mut self, port: u16, role: Role) {
        self.local_roles[role.index()] = true;
        if self.local_ports.insert(port) {
            // Client ends on it were counted as ends of a remote server: no longer.
            let clients: Vec<u64> = self
                .conns
                .iter()
                .filter(|(_, s)| s.port == port && s.side == Side::Client)
                .map(|(&id, _)| id)
                .collect();
            for id in clients {
                self.settle(id);
            }
        }
    }

    /// Server-side connections from these ports (the daemon's own probes) are ignored.
    pub fn ignore_peers(&mut self, own_ports: OwnPorts) {
        self.own_ports = Some(own_ports);
    }

    /// Whether exchanges and connections of this end are the ones counted now.
    pub fn counts(&self, meta: &ConnMeta) -> bool {
        match self
            .conns
            .get(&meta.conn_id)
            .or_else(|| self.closing.get(&meta.conn_id))
        {
            Some(state) => self.state_counts(state),
            None => counted(&self.local_ports, meta),
        }
    }

    /// Whether an end is a relay hop (never correlated).
    fn is_relay(&self, conn_id: u64) -> bool {
        self.conns
            .get(&conn_id)
            .or_else(|| self.closing.get(&conn_id))
            .is_some_and(|s| s.relay)
    }

    fn state_counts(&self, state: &ConnState) -> bool {
        if state.relay {
            state.side == Side::Server && !self.is_served(state.port)
        } else {
            state.side == Side::Server || !self.local_ports.contains(&state.port)
        }
    }

    /// A connection the capture saw open (or found open when seeded), unless it is the server's
    /// end of one of the daemon's own connections. Its ports pair a client end with the server
    /// end that accepted it (a process calling its own port is not a relay).
    pub fn on_conn_open(&mut self, c: &ConnRecord) {
        if c.side == Side::Server
            && let (Some(own), Some(remote)) = (&self.own_ports, c.remote)
            && own.contains(remote.port())
        {
            self.ignored.insert(c.conn_id);
            return;
        }
        // The client's own port: its local one, the server end's peer.
        let pair_port = match c.side {
            Side::Client => c.local.map(|a| a.port()),
            Side::Server => c.remote.map(|a| a.port()),
        }
        .filter(|&port| port != 0);
        self.open_paired(c.into(), c.ts_ns, c.seeded, pair_port);
    }

    /// A connection opened (`existing`: found already open, e.g. seeded from `/proc`).
    pub fn on_open(&mut self, meta: ConnMeta, ts: u64, existing: bool) {
        self.open_paired(meta, ts, existing, None);
    }

    fn open_paired(&mut self, meta: ConnMeta, ts: u64, existing: bool, pair_port: Option<u16>) {
        if meta.side == Side::Server {
            self.mark_local(meta.port, meta.role);
        }
        if let Some(old) = self.conns.get(&meta.conn_id).copied() {
            // The id was seen again (reconciled after an eviction): the old one ends here.
            if old.active {
                self.handles.add_connections_active(old.role, -1);
            }
            self.forget(meta.conn_id, old);
        }
        self.engine.open(meta, ts, existing);
        self.track(meta, existing, pair_port);
    }

    /// Starts the count-once bookkeeping of a connection.
    fn track(&mut self, meta: ConnMeta, existing: bool, pair_port: Option<u16>) {
        let key = (meta.tgid, meta.port, meta.role);
        let state = ConnState {
            role: meta.role,
            side: meta.side,
            port: meta.port,
            tgid: meta.tgid,
            opener: meta.tgid,
            pair_port: pair_port.unwrap_or(0),
            onward: None,
            relay: false,
            active: false,
            opened: existing,
            seen: false,
        };
        self.conns.insert(meta.conn_id, state);
        match meta.side {
            Side::Server => {
                *self.server_ends.entry(key).or_default() += 1;
                if let Some(peer) = pair_port {
                    self.accepted
                        .insert((meta.port, peer), (meta.tgid, meta.conn_id));
                    if let Some(client) = self.candidates.remove(&(meta.port, peer)) {
                        // The server end of a client end whose way was not known yet.
                        let onward = self.conns.get(&client).is_some_and(|c| c.tgid != meta.tgid);
                        self.decide_onward(client, onward);
                    }
                }
                if self.relays.get(&(meta.tgid, meta.port)) == Some(&meta.role)
                    || self.client_ends.contains_key(&key)
                {
                    self.found_relay(key, meta.conn_id);
                }
            }
            Side::Client => match pair_port {
                // Where the server end is already known, or the port cannot tell: decided now.
                Some(local) => match self.accepted.get(&(meta.port, local)) {
                    Some(&(server, _)) => self.decide_onward(meta.conn_id, server != meta.tgid),
                    None if self.server_ends.contains_key(&key) => {
                        // Its server may still accept it: until then (or its first response
                        // bytes), it is not known to go elsewhere.
                        self.candidates.insert((meta.port, local), meta.conn_id);
                    }
                    None => self.decide_onward(meta.conn_id, true),
                },
                None => self.decide_onward(meta.conn_id, true),
            },
        }
        self.settle(meta.conn_id);
    }

    /// A client end is known to go to another process (`onward`: possibly a relay's) or to its
    /// own process (a call to its own port, never a relay).
    fn decide_onward(&mut self, conn_id: u64, onward: bool) {
        let Some(state) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if state.onward.is_some() {
            return;
        }
        state.onward = Some(onward);
        if !onward {
            return;
        }
        let key = (state.tgid, state.port, state.role);
        *self.client_ends.entry(key).or_default() += 1;
        if self.server_ends.contains_key(&key) || self.relay_keys.contains(&key) {
            self.found_relay(key, conn_id);
        }
    }

    /// `key`'s process has both ends on a port (`conn_id` the end that showed it): every end of
    /// it there is a relay hop, and the process that accepted its connections (itself, or the
    /// parent it was forked by) relays them. Its ends are looked for once; later ones are
    /// marked as they come.
    fn found_relay(&mut self, key: EndKey, conn_id: u64) {
        let (tgid, port, role) = key;
        let ids: Vec<u64> = if self.relay_keys.insert(key) {
            self.conns
                .iter()
                .filter(|(_, s)| {
                    s.tgid == tgid && s.port == port && s.role == role && s.may_relay()
                })
                .map(|(&id, _)| id)
                .collect()
        } else {
            vec![conn_id]
        };
        if let Some(servers) = self.served.get_mut(&port) {
            // What it served was relayed: not a real server of the port.
            servers.remove(&tgid);
        }
        for id in ids {
            let Some(state) = self.conns.get_mut(&id) else {
                continue;
            };
            if state.relay || !state.may_relay() {
                continue;
            }
            state.relay = true;
            if state.side == Side::Server {
                self.relays.insert((state.opener, port), state.role);
            }
            self.engine.set_relay(id, true);
            self.settle(id);
        }
        self.settle_relays(port);
    }

    /// Relay hops on `port` count only while no real server of it has served bytes.
    fn settle_relays(&mut self, port: u16) {
        let hops: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, s)| s.relay && s.port == port)
            .map(|(&id, _)| id)
            .collect();
        for id in hops {
            self.settle(id);
        }
    }

    fn is_served(&self, port: u16) -> bool {
        self.served.get(&port).is_some_and(|s| !s.is_empty())
    }

    /// Brings a connection's place in `tcp_connections_active` in line with whether it counts
    /// now. An end that starts counting is counted opened (unless it was found open at start),
    /// one that stops (found to be a relay hop, or a client end once its server is seen here)
    /// closed, so that opened − closed stays what is active.
    fn settle(&mut self, conn_id: u64) {
        let Some(&state) = self.conns.get(&conn_id) else {
            return;
        };
        let counts = self.state_counts(&state);
        if counts == state.active {
            return;
        }
        if counts && !state.opened {
            self.metrics.connection_opened(state.role);
        }
        if !counts {
            self.metrics.connection_closed(state.role);
        }
        self.handles
            .add_connections_active(state.role, if counts { 1 } else { -1 });
        if let Some(state) = self.conns.get_mut(&conn_id) {
            state.active = counts;
            // Counted again later: opened again.
            state.opened = counts;
        }
    }

    pub fn on_data(
        &mut self,
        meta: ConnMeta,
        direction: Direction,
        ts: u64,
        len: u64,
        head: &[u8],
        tail: &[u8],
    ) {
        if !self.ignored.is_empty() && self.ignored.contains(&meta.conn_id) {
            return;
        }
        let counts = match self.conns.get(&meta.conn_id) {
            Some(state) if state.tgid == meta.tgid && state.seen => self.state_counts(state),
            Some(_) => self.moved(meta, direction),
            None => {
                // Its open was missed (before the daemon, or lost): taken up as it is.
                if meta.side == Side::Server {
                    self.mark_local(meta.port, meta.role);
                }
                self.track(meta, true, None);
                self.moved(meta, direction)
            }
        };
        if counts {
            self.metrics
                .record_bytes(meta.role, direction, len, &mut self.handles);
        }
        self.engine.data(meta, direction, ts, len, head, tail);
    }

    /// Bytes of a connection not seen moving yet, not yet known to go on, or moved by another
    /// process than before (a forked child serving what its parent accepted): a process with
    /// both ends on the port makes them relay hops; a real server's bytes make its port served.
    fn moved(&mut self, meta: ConnMeta, direction: Direction) -> bool {
        let Some(state) = self.conns.get(&meta.conn_id).copied() else {
            return false;
        };
        let key = (meta.tgid, state.port, state.role);
        if state.tgid != meta.tgid {
            let counted_end = state.side == Side::Server || state.onward == Some(true);
            let ends = match state.side {
                Side::Server => &mut self.server_ends,
                Side::Client => &mut self.client_ends,
            };
            if counted_end {
                decrement(ends, (state.tgid, state.port, state.role));
                *ends.entry(key).or_default() += 1;
            }
        }
        let waiting = state.side == Side::Client && state.onward.is_none();
        if let Some(s) = self.conns.get_mut(&meta.conn_id) {
            s.tgid = meta.tgid;
            // A client end whose server end was not seen accepting it keeps coming here
            // until its first response bytes.
            s.seen = !waiting || direction == Direction::Ingress;
        }
        if waiting && direction == Direction::Ingress {
            // A response, and no server end of this host accepted it: it goes off the host.
            self.candidates.remove(&(state.port, state.pair_port));
            self.decide_onward(meta.conn_id, true);
        }
        let state = self.conns.get(&meta.conn_id).copied().unwrap_or(state);
        if !state.relay && state.may_relay() {
            let relay = match state.side {
                Side::Server => self.client_ends.contains_key(&key),
                Side::Client => self.server_ends.contains_key(&key),
            };
            if relay {
                self.found_relay(key, meta.conn_id);
            } else if state.side == Side::Server {
                let servers = self.served.entry(meta.port).or_default();
                let first = servers.is_empty();
                if servers.len() < MAX_SERVED {
                    servers.insert(meta.tgid);
                }
                if first {
                    // A real server on this port: relay hops to it no longer count.
                    self.settle_relays(meta.port);
                }
            }
        }
        self.settle(meta.conn_id);
        self.conns
            .get(&meta.conn_id)
            .is_some_and(|s| self.state_counts(s))
    }

    pub fn on_close(&mut self, conn_id: u64, role: Role) {
        if self.ignored.remove(&conn_id) {
            return;
        }
        self.engine.close(conn_id);
        if let Some(state) = self.conns.get(&conn_id).copied() {
            if state.active {
                self.metrics.connection_closed(role);
                self.handles.add_connections_active(role, -1);
            }
            self.forget(conn_id, state);
        }
    }

    /// Drops a connection's bookkeeping; its state is kept until the next flush, for the
    /// exchanges its close ended.
    fn forget(&mut self, conn_id: u64, state: ConnState) {
        self.conns.remove(&conn_id);
        let key = (state.tgid, state.port, state.role);
        match state.side {
            Side::Server => decrement(&mut self.server_ends, key),
            Side::Client if state.onward == Some(true) => decrement(&mut self.client_ends, key),
            Side::Client => {}
        }
        if state.pair_port != 0 {
            let pair = (state.port, state.pair_port);
            match state.side {
                Side::Server => {
                    if self
                        .accepted
                        .get(&pair)
                        .is_some_and(|&(_, id)| id == conn_id)
                    {
                        self.accepted.remove(&pair);
                    }
                }
                Side::Client => {
                    if self.candidates.get(&pair) == Some(&conn_id) {
                        self.candidates.remove(&pair);
                    }
                }
            }
        }
        if !self.server_ends.contains_key(&key) && !self.client_ends.contains_key(&key) {
            self.relay_keys.remove(&key);
        }
        self.closing.insert(conn_id, state);
    }

    /// The side whose in-flight requests and errors count for `role`: the server's where its
    /// listener is on this host.
    fn counted_side(&self, role: Role) -> Side {
        if self.local_roles[role.index()] {
            Side::Server
        } else {
            Side::Client
        }
    }

    /// Whether relay hops of `role` count (no real server seen behind one of its relays).
    fn relays_count(&self, role: Role) -> bool {
        self.relays
            .iter()
            .any(|(&(_, port), &r)| r == role && !self.is_served(port))
    }

    /// Every connection held here, with its role: open in the engine, tracked (also when the
    /// engine evicted it at its limit), or one of the daemon's own ignored server ends.
    pub fn held(&self) -> impl Iterator<Item = (u64, Role)> + '_ {
        self.engine
            .conn_roles()
            .chain(self.conns.iter().map(|(&id, state)| (id, state.role)))
            // The role of the daemon's own connections is not used.
            .chain(self.ignored.iter().map(|&id| (id, Role::Gateway)))
    }

    /// Whether connection `id` is held here (open in the engine, or ignored as the daemon's own).
    pub fn holds(&self, id: u64) -> bool {
        self.engine.holds(id) || self.ignored.contains(&id)
    }

    /// Whether the engine holds as many connections as it may: another open would evict one.
    pub fn is_full(&self) -> bool {
        self.engine.is_full()
    }

    /// Connection `id` lost bytes: its open exchanges end and framing starts over
    /// ([`Engine::resync`]). Whether it was held.
    pub fn resync(&mut self, id: u64) -> bool {
        self.engine.resync(id)
    }

    /// After a batch of events: finished exchanges into metrics (and to `each`), correlation
    /// up to `now_ns` (the capture clock) and engine errors; then published (with the
    /// in-flight gauges) unless that was done less than [`Pipeline::publish_every`] ago.
    pub fn flush(&mut self, now_ns: u64, mut each: impl FnMut(&Exchange)) {
        let finished: Vec<Exchange> = self.engine.drain_finished().collect();
        for ex in finished {
            self.totals.exchanges += 1;
            if self.counts(&ex.conn) {
                self.metrics.record_exchange(&ex, &mut self.handles);
            }
            each(&ex);
            if !self.is_relay(ex.conn.conn_id) {
                self.correlator.add(ex);
            }
        }
        let calls: Vec<Call> = self.engine.drain_calls().collect();
        for call in calls {
            if self.counts(&call.conn) {
                self.metrics.record_call(&call);
            }
            if !self.is_relay(call.conn.conn_id) {
                self.correlator.add_call(&call);
            }
        }
        self.report_websocket();
        self.closing.clear();
        let resolved = &mut self.resolved;
        self.correlator.resolve_into(now_ns, resolved);
        for o in resolved.overheads.drain(..) {
            self.metrics.record_gateway_overhead(
                &o.path,
                o.overhead_s,
                Some(o.first_byte_overhead_s),
                &mut self.handles,
            );
        }
        for turn in resolved.turns.drain(..) {
            self.metrics
                .record_turn_overhead(&turn.method, turn.overhead_s);
        }
        for method in resolved.unpaired_turns.drain(..) {
            self.metrics.count_unpaired_turn(&method);
        }
        if resolved.unmatched_gateway > 0 {
            self.metrics
                .count_unmatched(Role::Gateway, resolved.unmatched_gateway);
        }
        if resolved.unmatched_upstream > 0 {
            self.metrics
                .count_unmatched(Role::Upstream, resolved.unmatched_upstream);
        }
        if self.engine.errors() != &self.reported_errors {
            let errors = self.engine.errors().clone();
            // Like exchanges, each error once: on the side counted for its role.
            for role in [Role::Gateway, Role::Upstream] {
                let side = self.counted_side(role);
                for reason in ErrorReason::ALL {
                    let new = errors
                        .on_side(role, side, reason)
                        .saturating_sub(self.reported_errors.on_side(role, side, reason));
                    if new > 0 {
                        self.metrics.add_parse_errors(role, reason.as_str(), new);
                    }
                }
            }
            self.reported_errors = errors;
        }
        self.totals.connections = self.engine.connections();
        if now_ns.saturating_sub(self.last_publish_ns) >= self.publish_every_ns {
            self.publish();
            self.last_publish_ns = now_ns;
        }
    }

    /// New WebSocket message and unread counts into metrics, once: from the side counted for
    /// each role, as errors are.
    fn report_websocket(&mut self) {
        for role in [Role::Gateway, Role::Upstream] {
            let side = self.counted_side(role);
            let now = self.engine.ws_counts(role, side);
            let before = &self.reported_ws[role.index()];
            if now == before {
                continue;
            }
            for direction in [Direction::Ingress, Direction::Egress] {
                for kind in MessageKind::ALL {
                    let new = now
                        .message(direction, kind)
                        .saturating_sub(before.message(direction, kind));
                    if new > 0 {
                        self.metrics
                            .add_websocket_messages(role, direction, kind, new);
                    }
                }
            }
            for reason in Unread::ALL {
                let new = now.unread(reason).saturating_sub(before.unread(reason));
                if new > 0 {
                    self.metrics.add_websocket_unread(role, reason, new);
                }
            }
            self.reported_ws[role.index()] = now.clone();
        }
    }

    /// Flushes publish their observations at most every `interval` instead of every time;
    /// whoever sets it calls [`Pipeline::publish`] before scrapes (see
    /// [`Metrics::before_gather`]).
    pub fn publish_every(&mut self, interval: std::time::Duration) {
        self.publish_every_ns = interval.as_nanos().min(u64::MAX as u128) as u64;
    }

    /// What this pipeline observed, and the requests in flight now, into the shared series.
    pub fn publish(&mut self) {
        for role in [Role::Gateway, Role::Upstream] {
            let side = self.counted_side(role);
            let mut now = self.engine.in_flight(role, side);
            if self.relays_count(role) {
                now += self.engine.in_flight_relay(role);
            }
            let now = now as i64;
            let before = std::mem::replace(&mut self.reported_in_flight[role.index()], now);
            // Even a zero change: the series exists (at 0) from the first publish on.
            self.handles.add_in_flight(role, now - before);
        }
        self.metrics.publish(&mut self.handles);
    }

    /// No more events will come (the proxy's connection pair closed): exchanges still waiting
    /// for correlation are settled now instead of after their wait.
    pub fn finish(&mut self) {
        self.flush(u64::MAX, |_| {});
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Who answers on the watched ports as seen now: the processes whose accepted connections
    /// count (real servers) and the relays in front of them, each once per port.
    pub fn hops(&self) -> Hops {
        let mut hops = Hops::default();
        for state in self.conns.values().filter(|s| s.side == Side::Server) {
            let hop = Hop {
                port: state.port,
                role: state.role,
                pid: if state.relay {
                    state.opener
                } else {
                    state.tgid
                },
            };
            let list = if state.relay {
                &mut hops.relays
            } else {
                &mut hops.servers
            };
            if !list.contains(&hop) {
                list.push(hop);
            }
        }
        for (&(pid, port), &role) in &self.relays {
            let hop = Hop { port, role, pid };
            if !hops.relays.contains(&hop) {
                hops.relays.push(hop);
            }
        }
        hops.servers.sort_by_key(|h| (h.port, h.pid));
        hops.relays.sort_by_key(|h| (h.port, h.pid));
        hops
    }
}

/// A process on a watched port, for `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Hop {
    pub port: u16,
    pub role: Role,
    pub pid: u32,
}

/// [`Pipeline::hops`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hops {
    /// Processes whose accepted connections are counted, with a connection open now.
    pub servers: Vec<Hop>,
    /// Relays (the process that accepts), with a connection open now or seen relaying.
    pub relays: Vec<Hop>,
}

/// What the pipeline keeps of an open connection for the count-once rule.
#[derive(Debug, Clone, Copy)]
struct ConnState {
    role: Role,
    side: Side,
    port: u16,
    /// The process doing its I/O (the last one seen).
    tgid: u32,
    /// The process that opened it (accepted or connected).
    opener: u32,
    /// The client's own port (a client end's local port, a server end's peer): pairs the two
    /// ends of a connection on this host. 0: unknown.
    pair_port: u16,
    /// A client end: whether it goes to another process than its own (`None`: not known yet).
    onward: Option<bool>,
    /// An end of a relay process.
    relay: bool,
    /// Counted in `tcp_connections_active` now.
    active: bool,
    /// Counted in `tcp_connections_opened_total` (or found open: never counted there).
    opened: bool,
    /// Bytes seen since it was tracked.
    seen: bool,
}

impl ConnState {
    /// Whether it can be a relay hop: a server end, or a client end known to go elsewhere.
    fn may_relay(&self) -> bool {
        self.side == Side::Server || self.onward == Some(true)
    }
}

/// Real servers remembered per port ([`Pipeline::served`]): enough to tell a relay that read
/// before it connected from a real server, bounded for fork-per-connection servers.
const MAX_SERVED: usize = 64;

/// (process, port, role) of a connection's end.
type EndKey = (u32, u16, Role);

fn decrement(counts: &mut HashMap<EndKey, u32>, key: EndKey) {
    if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

/// The count-once rule for a connection the pipeline does not track: the server side always;
/// the client side where the port's listener is not on this host.
fn counted(local_ports: &HashSet<u16>, meta: &ConnMeta) -> bool {
    meta.side == Side::Server || !local_ports.contains(&meta.port)
}

/// Pipelines, connections and exchanges for the tests here and of the capture's hand-over.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::metrics::{ExpositionFormat, MetricsConfig};

    /// A pipeline with default settings, and its metrics.
    pub(crate) fn pipeline() -> (Arc<Metrics>, Pipeline) {
        let metrics = Arc::new(Metrics::new(MetricsConfig::default()).unwrap());
        (
            metrics.clone(),
            Pipeline::new(metrics, EngineConfig::default()),
        )
    }

    /// A connection of the server process (7) or of a client process (8).
    pub(crate) fn meta(conn_id: u64, role: Role, side: Side, port: u16) -> ConnMeta {
        ConnMeta {
            conn_id,
            role,
            side,
            port,
            tgid: if side == Side::Server { 7 } else { 8 },
        }
    }

    /// One GET on `conn`, as its side sees it.
    pub(crate) fn exchange(p: &mut Pipeline, conn: ConnMeta, ts: u64) {
        let (req, resp) = match conn.side {
            Side::Server => (Direction::Ingress, Direction::Egress),
            Side::Client => (Direction::Egress, Direction::Ingress),
        };
        let request = b"GET /api/tags HTTP/1.1\r\n\r\n";
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        p.on_data(conn, req, ts, request.len() as u64, request, &[]);
        p.on_data(conn, resp, ts + 10, response.len() as u64, response, &[]);
    }

    pub(crate) fn requests(metrics: &Metrics, role: &str) -> u64 {
        let (_, text) = metrics.encode(ExpositionFormat::Text);
        String::from_utf8(text)
            .unwrap()
            .lines()
            .filter(|l| {
                l.starts_with("observer_http_requests_total{")
                    && l.contains(&format!("role=\"{role}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    #[test]
    fn each_exchange_is_counted_once_and_the_client_side_only_for_remote_servers() {
        let (metrics, mut p) = pipeline();
        // Both ends of a loopback connection to a local upstream: the server side counts.
        let server = meta(1, Role::Upstream, Side::Server, 11434);
        let client = meta(2, Role::Upstream, Side::Client, 11434);
        p.on_open(server, 1, false);
        p.on_open(client, 1, false);
        exchange(&mut p, server, 100);
        exchange(&mut p, client, 100);
        // An upstream on another host: only its client side is seen, and it counts.
        let remote = meta(3, Role::Upstream, Side::Client, 8080);
        p.on_open(remote, 1, false);
        exchange(&mut p, remote, 200);
        p.flush(300, |_| {});
        assert_eq!(requests(&metrics, "upstream"), 2);
        assert_eq!(p.totals().exchanges, 3);
        p.on_close(1, Role::Upstream);
        p.on_close(2, Role::Upstream);
        p.on_close(3, Role::Upstream);
        p.flush(400, |_| {});
        let (_, text) = metrics.encode(ExpositionFormat::Text);
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("observer_tcp_connections_opened_total{role=\"upstream\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("observer_tcp_connections_active{role=\"upstream\"} 0"),
            "{text}"
        );
    }

    /// The value of one series in the text exposition (0 when absent).
    fn series(metrics: &Metrics, series: &str) -> u64 {
        let (_, text) = metrics.encode(ExpositionFormat::Text);
        String::from_utf8(text)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn a_websocket_call_seen_from_both_ends_is_counted_once() {
        let (metrics, mut p) = pipeline();
        let server = meta(1, Role::Gateway, Side::Server, 18789);
        let client = meta(2, Role::Gateway, Side::Client, 18789);
        let upgrade =
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let switched = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        let req = br#"{"type":"req","id":"1","method":"agent","params":{}}"#;
        let res = br#"{"type":"res","id":"1","ok":false,"error":{"code":"UNAVAILABLE"}}"#;
        // The client's request masked with a zero key (the bytes are the same either way).
        let mut req_frame = vec![0x81, 0x80 | req.len() as u8, 0, 0, 0, 0];
        req_frame.extend_from_slice(req);
        let mut res_frame = vec![0x81, res.len() as u8];
        res_frame.extend_from_slice(res);
        for (conn, from_client, from_server) in [
            (server, Direction::Ingress, Direction::Egress),
            (client, Direction::Egress, Direction::Ingress),
        ] {
            p.on_open(conn, 1, false);
            let mut data = |dir, ts, bytes: &[u8]| {
                p.on_data(conn, dir, ts, bytes.len() as u64, bytes, &[]);
            };
            data(from_client, 10, upgrade);
            data(from_server, 20, switched);
            data(from_client, 30, &req_frame);
            data(from_server, 90, &res_frame);
        }
        p.flush(100, |_| {});
        let labels = r#"{method="agent",outcome="UNAVAILABLE",role="gateway"}"#;
        assert_eq!(
            series(&metrics, &format!("observer_rpc_calls_total{labels}")),
            1
        );
        assert_eq!(
            series(
                &metrics,
                &format!("observer_rpc_call_duration_seconds_count{labels}")
            ),
            1
        );
        assert_eq!(
            series(
                &metrics,
                r#"observer_websocket_messages_total{direction="ingress",kind="text",role="gateway"}"#
            ),
            1
        );
        assert_eq!(
            series(
                &metrics,
                r#"observer_websocket_messages_total{direction="egress",kind="text",role="gateway"}"#
            ),
            1
        );
        // The turn made no upstream request: unpaired once its wait is over.
        p.flush(91 + crate::engine::correlate::GATEWAY_WAIT_NS, |_| {});
        assert_eq!(
            series(
                &metrics,
                r#"observer_rpc_unpaired_calls_total{method="agent"}"#
            ),
            1
        );
    }

    pub(crate) fn sample(metrics: &Metrics, series: &str) -> i64 {
        let (_, text) = metrics.encode(ExpositionFormat::Text);
        let prefix = format!("{series} ");
        String::from_utf8(text)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(|v| v.parse().unwrap()))
            .unwrap_or_else(|| panic!("no {series}"))
    }

    #[test]
    fn an_error_seen_from_both_ends_of_a_local_connection_is_counted_once() {
        let (metrics, mut p) = pipeline();
        let server = meta(1, Role::Upstream, Side::Server, 11434);
        let client = meta(2, Role::Upstream, Side::Client, 11434);
        p.on_open(server, 1, false);
        p.on_open(client, 1, false);
        let garbage = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n";
        p.on_data(
            server,
            Direction::Ingress,
            5,
            garbage.len() as u64,
            garbage,
            &[],
        );
        p.on_data(
            client,
            Direction::Egress,
            5,
            garbage.len() as u64,
            garbage,
            &[],
        );
        p.flush(10, |_| {});
        assert_eq!(
            p.engine.errors().get(Role::Upstream, ErrorReason::BadHead),
            2
        );
        let bad_head = "observer_http_parse_errors_total{reason=\"bad_head\",role=\"upstream\"}";
        assert_eq!(sample(&metrics, bad_head), 1);
    }

    fn with_tgid(meta: ConnMeta, tgid: u32) -> ConnMeta {
        ConnMeta { tgid, ..meta }
    }

    fn gauge(metrics: &Metrics, name: &str, role: &str) -> i64 {
        sample(metrics, &format!("observer_{name}{{role=\"{role}\"}}"))
    }

    #[test]
    fn a_relay_in_front_of_a_server_on_the_host_is_a_hop_and_the_server_counts() {
        let (metrics, mut p) = pipeline();
        // The gateway (10) → a forwarder (20) on the upstream port → the server (30) behind it
        // (in a container): one exchange, seen at four ends.
        let gateway_out = with_tgid(meta(1, Role::Upstream, Side::Client, 11434), 10);
        let relay_in = with_tgid(meta(2, Role::Upstream, Side::Server, 11434), 20);
        let relay_out = with_tgid(meta(3, Role::Upstream, Side::Client, 11434), 20);
        let server = with_tgid(meta(4, Role::Upstream, Side::Server, 11434), 30);
        for (i, conn) in [gateway_out, relay_in, relay_out, server]
            .into_iter()
            .enumerate()
        {
            p.on_open(conn, i as u64, false);
        }
        for round in 0..3 {
            let ts = 100 + round * 100;
            exchange(&mut p, gateway_out, ts);
            exchange(&mut p, relay_in, ts + 1);
            exchange(&mut p, relay_out, ts + 2);
            exchange(&mut p, server, ts + 3);
        }
        p.flush(1_000, |_| {});
        assert_eq!(requests(&metrics, "upstream"), 3);
        assert_eq!(gauge(&metrics, "tcp_connections_active", "upstream"), 1);
        // Before anything listened on the port, and before the forwarder's onward connection,
        // the gateway's and the forwarder's ends looked like ends that count: opened, and
        // closed when that was learnt.
        let opened = gauge(&metrics, "tcp_connections_opened_total", "upstream");
        assert_eq!(opened, 3);
        assert_eq!(
            gauge(&metrics, "tcp_connections_closed_total", "upstream"),
            2
        );
        // The relay's next connection is a hop from its accept on; the server's counts.
        let relay_in2 = with_tgid(meta(5, Role::Upstream, Side::Server, 11434), 20);
        let server2 = with_tgid(meta(6, Role::Upstream, Side::Server, 11434), 30);
        p.on_open(relay_in2, 2_000, false);
        p.on_open(server2, 2_001, false);
        exchange(&mut p, relay_in2, 2_002);
        exchange(&mut p, server2, 2_003);
        p.flush(3_000, |_| {});
        assert_eq!(requests(&metrics, "upstream"), 4);
        assert_eq!(
            gauge(&metrics, "tcp_connections_opened_total", "upstream"),
            opened + 1
        );
        p.on_close(6, Role::Upstream);
        for id in 1..=5 {
            p.on_close(id, Role::Upstream);
        }
        p.flush(4_000, |_| {});
        assert_eq!(gauge(&metrics, "tcp_connections_active", "upstream"), 0);
        assert_eq!(gauge(&metrics, "http_requests_in_flight", "upstream"), 0);
    }

    #[test]
    fn a_relay_to_a_server_off_the_host_counts_where_it_accepts() {
        let (metrics, mut p) = pipeline();
        let gateway_out = with_tgid(meta(1, Role::Upstream, Side::Client, 11434), 10);
        let relay_in = with_tgid(meta(2, Role::Upstream, Side::Server, 11434), 20);
        let relay_out = with_tgid(meta(3, Role::Upstream, Side::Client, 11434), 20);
        for (i, conn) in [gateway_out, relay_in, relay_out].into_iter().enumerate() {
            p.on_open(conn, i as u64, false);
        }
        exchange(&mut p, gateway_out, 100);
        exchange(&mut p, relay_in, 101);
        exchange(&mut p, relay_out, 102);
        p.flush(1_000, |_| {});
        assert_eq!(requests(&metrics, "upstream"), 1);
        assert_eq!(gauge(&metrics, "tcp_connections_active", "upstream"), 1);
    }

    #[test]
    fn a_forked_relay_is_found_through_its_children_and_its_next_accepts_are_hops() {
        let (metrics, mut p) = pipeline();
        let server = with_tgid(meta(9, Role::Upstream, Side::Server, 11434), 30);
        p.on_open(server, 1, false);
        exchange(&mut p, server, 2);
        p.flush(10, |_| {});
        assert_eq!(requests(&metrics, "upstream"), 1);
        // socat: the parent (40) accepts, a child (41..) connects on and copies the bytes.
        for (n, child) in [(0u64, 41u32), (1, 42)] {
            let id = 100 + n * 10;
            let accepted = with_tgid(meta(id, Role::Upstream, Side::Server, 11434), 40);
            let onward = with_tgid(meta(id + 1, Role::Upstream, Side::Client, 11434), child);
            let behind = with_tgid(meta(id + 2, Role::Upstream, Side::Server, 11434), 30);
            p.on_open(accepted, 100 + n, false);
            p.on_open(onward, 101 + n, false);
            p.on_open(behind, 102 + n, false);
            let ts = 1_000 * (n + 1);
            exchange(&mut p, with_tgid(accepted, child), ts);
            exchange(&mut p, onward, ts + 1);
            exchange(&mut p, behind, ts + 2);
            p.flush(ts + 10, |_| {});
            p.on_close(id, Role::Upstream);
            p.on_close(id + 1, Role::Upstream);
            p.flush(ts + 20, |_| {});
        }
        assert_eq!(requests(&metrics, "upstream"), 3);
        assert_eq!(gauge(&metrics, "tcp_connections_active", "upstream"), 3);
        // The first relayed accept was counted as opened before it was known; the second not.
        assert_eq!(
            gauge(&metrics, "tcp_connections_opened_total", "upstream"),
            4
        );
    }

    #[test]
    fn a_connection_served_by_a_forked_child_counts_once_and_correlates_with_the_child() {
        let (metrics, mut p) = pipeline();
        // A gateway that forks per connection: the parent (50) accepts, the child (51) serves
        // and calls the upstream.
        let accepted = with_tgid(meta(1, Role::Gateway, Side::Server, 18789), 50);
        let upstream = with_tgid(meta(2, Role::Upstream, Side::Client, 11434), 51);
        p.on_open(accepted, 1, false);
        p.on_open(upstream, 2, false);
        let child = with_tgid(accepted, 51);
        let request = b"GET /api/tags HTTP/1.1\r\n\r\n";
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        p.on_data(
            child,
            Direction::Ingress,
            10,
            request.len() as u64,
            request,
            &[],
        );
        exchange(&mut p, upstream, 20);
        p.on_data(
            child,
            Direction::Egress,
            40,
            response.len() as u64,
            response,
            &[],
        );
        let mut tgids = Vec::new();
        p.flush(100, |ex| tgids.push((ex.conn.role, ex.conn.tgid)));
        assert!(tgids.contains(&(Role::Gateway, 51)), "{tgids:?}");
        assert_eq!(requests(&metrics, "gateway"), 1);
        assert_eq!(
            requests(&metrics, "upstream"),
            1,
            "the upstream is remote here"
        );
        assert_eq!(gauge(&metrics, "tcp_connections_active", "gateway"), 1);
        let (_, text) = metrics.encode(ExpositionFormat::Text);
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("observer_gateway_overhead_seconds_count")
                    && l.ends_with(" 1")),
            "{text}"
        );
    }

    /// The open record of `meta` whose client end uses `client_port`.
    fn record(meta: ConnMeta, client_port: u16) -> ConnRecord {
        let ip = std::net::Ipv4Addr::LOCALHOST;
        let (local, remote) = match meta.side {
            Side::Client => ((ip, client_port), (ip, meta.port)),
            Side::Server => ((ip, meta.port), (ip, client_port)),
        };
        ConnRecord {
            ts_ns: 1,
            conn_id: meta.conn_id,
            tgid: meta.tgid,
            pid: meta.tgid,
            comm: String::new(),
            role: meta.role,
            side: meta.side,
            fd: 3,
            port: meta.port,
            local: Some(local.into()),
            remote: Some(remote.into()),
            seeded: false,
        }
    }

    #[test]
    fn a_server_calling_its_own_port_is_not_a_relay() {
        let (metrics, mut p) = pipeline();
        // A client (8) → the gateway (7), which calls its own port (an auth subrequest).
        let outside = meta(1, Role::Gateway, Side::Server, 18789);
        let call = with_tgid(meta(2, Role::Gateway, Side::Client, 18789), 7);
        let answer = meta(3, Role::Gateway, Side::Server, 18789);
        p.on_conn_open(&record(outside, 40_001));
        p.on_conn_open(&record(call, 40_002));
        p.on_conn_open(&record(answer, 40_002));
        exchange(&mut p, outside, 10);
        exchange(&mut p, call, 20);
        exchange(&mut p, answer, 21);
        p.flush(100, |_| {});
        assert_eq!(
            requests(&metrics, "gateway"),
            2,
            "both exchanges its server answered"
        );
        assert_eq!(gauge(&metrics, "tcp_connections_active", "gateway"), 2);
        assert!(p.hops().relays.is_empty(), "{:?}", p.hops());
        // Its next accepted connection still counts.
        let next = meta(4, Role::Gateway, Side::Server, 18789);
        p.on_conn_open(&record(next, 40_003));
        exchange(&mut p, next, 200);
        p.flush(300, |_| {});
        assert_eq!(requests(&metrics, "gateway"), 3);
    }

    #[test]
    fn a_forwarder_is_told_by_the_process_that_accepts_its_onward_connection() {
        let (metrics, mut p) = pipeline();
        let relay_in = with_tgid(meta(1, Role::Upstream, Side::Server, 11434), 20);
        let relay_out = with_tgid(meta(2, Role::Upstream, Side::Client, 11434), 20);
        let server = with_tgid(meta(3, Role::Upstream, Side::Server, 11434), 30);
        p.on_conn_open(&record(relay_in, 50_001));
        p.on_conn_open(&record(relay_out, 50_002));
        assert!(
            p.hops().relays.is_empty(),
            "not known before its server accepts"
        );
        p.on_conn_open(&record(server, 50_002));
        assert_eq!(p.hops().relays.len(), 1, "{:?}", p.hops());
        exchange(&mut p, relay_in, 10);
        exchange(&mut p, relay_out, 11);
        exchange(&mut p, server, 12);
        p.flush(100, |_| {});
        assert_eq!(requests(&metrics, "upstream"), 1);
        assert_eq!(gauge(&metrics, "tcp_connections_active", "upstream"), 1);
        assert_eq!(gauge(&metrics, "http_requests_in_flight", "upstream"), 0);
    }

    #[test]
    fn a_forwarder_whose_onward_connection_nobody_here_accepts_goes_off_the_host() {
        let (metrics, mut p) = pipeline();
        let relay_in = with_tgid(meta(1, Role::Upstream, Side::Server, 11434), 20);
        let relay_out = with_tgid(meta(2, Role::Upstream, Side::Client, 11434), 20);
        p.on_conn_open(&record(relay_in, 50_001));
        p.on_conn_open(&record(relay_out, 50_002));
        // The request goes on, the response comes back: no server end here took it.
        let request = b"POST /api/chat HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        p.on_data(
            relay_in,
            Direction::Ingress,
            10,
            request.len() as u64,
            request,
            &[],
        );
        p.on_data(
            relay_out,
            Direction::Egress,
            11,
            request.len() as u64,
            request,
            &[],
        );
        p.flush(12, |_| {});
        assert_eq!(gauge(&metrics, "http_requests_in_flight", "upstream"), 1);
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        p.on_data(
            relay_out,
            Direction::Ingress,
            20,
            response.len() as u64,
            response,
            &[],
        );
        p.on_data(
            relay_in,
            Direction::Egress,
            21,
            response.len() as u64,
            response,
            &[],
        );
        p.flush(100, |_| {});
        assert_eq!(p.hops().relays.len(), 1, "{:?}", p.hops());
        assert_eq!(
            requests(&metrics, "upstream"),
            1,
            "counted where it was accepted"
        );
        assert_eq!(gauge(&metrics, "tcp_connections_active", "upstream"), 1);
        assert_eq!(gauge(&metrics, "http_requests_in_flight", "upstream"), 0);
    }
}
