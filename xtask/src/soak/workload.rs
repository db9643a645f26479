//! The soak's steady chat workload: users on keep-alive connections to the gateway, each
//! sending a mix of Ollama and OpenAI requests, streamed and not, with short think times and
//! a small share of simulated server errors; and the tally of every exchange the soak's clients
//! made: the ledger of what the gateway must count, and how each exchange ended.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

pub use observer_sim::Dice;
use testkit::ledger::{Ledger, Record};

use crate::chat::{Api, ChatClient, ChatRequest, Exchange, Outcome};

/// How long a client waits for a connection or a read before giving up on an exchange.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Every exchange the soak's clients made through the gateway, by how it ended.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    /// The exchanges that reached the gateway, by the code it must count them under: a
    /// response's status (whole or cut after the head), `none` without a status (nothing, or
    /// part of a head), and the timed-out ones.
    pub gateway: Ledger,
    /// Whole responses, by status.
    pub complete: BTreeMap<u16, u64>,
    /// Responses whose head arrived and whose body was cut short, by status. The observer
    /// counts these under their status (and `done_reason="incomplete"`).
    pub cut: BTreeMap<u16, u64>,
    /// Responses cut within the head: some bytes, no status.
    pub cut_in_head: u64,
    /// Requests written, then the connection closed or reset before any response byte:
    /// on a fresh connection, and on a reused one (a server closing an idle connection as
    /// the request went out).
    pub no_response_fresh: u64,
    pub no_response_reused: u64,
    /// Requests whose write failed.
    pub unsent: u64,
    /// No connection (the gateway was down).
    pub refused: u64,
    pub timed_out: u64,
    pub malformed: u64,
    /// The first few malformed responses, for the report.
    pub malformed_examples: Vec<String>,
}

impl Tally {
    pub fn record(&mut self, exchange: &Exchange) {
        let status = exchange.status;
        let reached = match (&exchange.outcome, status) {
            (Outcome::Complete, Some(code)) => {
                *self.complete.entry(code).or_default() += 1;
                Some(Record {
                    status,
                    complete: true,
                })
            }
            (Outcome::Cut, Some(code)) => {
                *self.cut.entry(code).or_default() += 1;
                Some(Record {
                    status,
                    complete: false,
                })
            }
            (Outcome::Complete | Outcome::Cut, None) => {
                self.cut_in_head += 1;
                Some(Record::NONE)
            }
            (Outcome::NoResponse, _) if exchange.reused => {
                self.no_response_reused += 1;
                Some(Record::NONE)
            }
            (Outcome::NoResponse, _) => {
                self.no_response_fresh += 1;
                Some(Record::NONE)
            }
            (Outcome::Unsent, _) => {
                self.unsent += 1;
                None
            }
            (Outcome::Refused, _) => {
                self.refused += 1;
                None
            }
            (Outcome::TimedOut, _) => {
                self.timed_out += 1;
                Some(Record::NONE)
            }
            (Outcome::Malformed(why), _) => {
                self.malformed += 1;
                if self.malformed_examples.len() < 3 {
                    self.malformed_examples.push(why.clone());
                }
                None
            }
        };
        if let Some(record) = reached {
            self.gateway.record(&record);
        }
    }

    /// Responses with `code`, whole or cut: what the observer should count under it.
    pub fn responses(&self, code: u16) -> u64 {
        self.gateway.get(&code.to_string())
    }

    /// Every status seen.
    pub fn codes(&self) -> Vec<u16> {
        let mut codes: Vec<u16> = self
            .complete
            .keys()
            .chain(self.cut.keys())
            .copied()
            .collect();
        codes.sort_unstable();
        codes.dedup();
        codes
    }

    pub fn exchanges(&self) -> u64 {
        self.complete.values().sum::<u64>()
            + self.cut.values().sum::<u64>()
            + self.cut_in_head
            + self.no_response_fresh
            + self.no_response_reused
            + self.unsent
            + self.refused
            + self.timed_out
            + self.malformed
    }

    /// Requests that reached the gateway and got no whole response.
    pub fn incomplete(&self) -> u64 {
        self.cut.values().sum::<u64>()
            + self.cut_in_head
            + self.no_response_fresh
            + self.no_response_reused
            + self.timed_out
    }
}

/// How the workload is shaped.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    /// Share of requests that ask the simulator for a 500 (`X-Sim-Fault: status=500`).
    pub error_rate: f64,
}

/// A user's next request: half `/api/chat`, a quarter each `/api/generate` and
/// `/v1/chat/completions`; three in four streamed; a short simulated reply (first token after
/// 10–50 ms, 5–30 tokens 2–8 ms apart), or a 500 at `error_rate`.
pub fn next_request(dice: &mut Dice, mix: Mix, n: u64) -> ChatRequest {
    let api = match dice.between(0, 3) {
        0 | 1 => Api::Chat,
        2 => Api::Generate,
        _ => Api::OpenAiChat,
    };
    let stream = dice.between(0, 3) != 0;
    let sim = if dice.chance(mix.error_rate) {
        "status=500".to_owned()
    } else {
        format!(
            "first-token-ms={}, token-ms={}, tokens={}",
            dice.between(10, 50),
            dice.between(2, 8),
            dice.between(5, 30)
        )
    };
    let mut request = ChatRequest::new(api, stream).with_sim(sim);
    request.prompt = format!("Message {n}: tell me about the sea.");
    request
}

/// One user until `stop`: a request, its response, a think time of 20–200 ms; after a refused
/// connection, a pause of 100 ms (the gateway is restarting).
pub fn user(id: u64, gateway: SocketAddr, mix: Mix, tally: &Mutex<Tally>, stop: &AtomicBool) {
    let mut dice = Dice::new(0x5EED ^ id);
    let mut client = ChatClient::new(gateway, CLIENT_TIMEOUT);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let exchange = client.send(&next_request(&mut dice, mix, n));
        n += 1;
        tally.lock().expect("no panics hold it").record(&exchange);
        let pause = if exchange.outcome == Outcome::Refused {
            100
        } else {
            dice.between(20, 200)
        };
        std::thread::sleep(Duration::from_millis(pause));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use testkit::http::Response;

    fn exchange(outcome: Outcome, status: Option<u16>, reused: bool) -> Exchange {
        Exchange {
            outcome,
            status,
            reused,
            sent: Instant::now(),
            written: None,
            response: Response::new(false),
        }
    }

    #[test]
    fn the_tally_counts_cut_responses_under_their_status() {
        let mut t = Tally::default();
        for e in [
            exchange(Outcome::Complete, Some(200), false),
            exchange(Outcome::Complete, Some(200), true),
            exchange(Outcome::Complete, Some(502), true),
            exchange(Outcome::Cut, Some(200), true),
            exchange(Outcome::Cut, None, true),
            exchange(Outcome::NoResponse, None, true),
            exchange(Outcome::NoResponse, None, false),
            exchange(Outcome::Refused, None, false),
            exchange(Outcome::Unsent, None, true),
            exchange(Outcome::TimedOut, None, true),
            exchange(Outcome::Malformed("x".into()), None, true),
        ] {
            t.record(&e);
        }
        assert_eq!(
            (t.responses(200), t.responses(502), t.responses(500)),
            (3, 1, 0)
        );
        assert_eq!(t.codes(), [200, 502]);
        assert_eq!((t.no_response_reused, t.no_response_fresh), (1, 1));
        assert_eq!(t.exchanges(), 11);
        // One cut with a status, one cut in the head, two without response, one timed out.
        assert_eq!(t.incomplete(), 5);
        assert_eq!(t.malformed_examples, ["x"]);
    }

    #[test]
    fn the_mix_has_every_kind_and_about_the_error_rate() {
        let mut dice = Dice::new(1);
        let mix = Mix { error_rate: 0.02 };
        let requests: Vec<ChatRequest> = (0..10_000)
            .map(|n| next_request(&mut dice, mix, n))
            .collect();
        let count = |f: &dyn Fn(&ChatRequest) -> bool| requests.iter().filter(|r| f(r)).count();
        let errors = count(&|r| r.sim.as_deref() == Some("status=500"));
        assert!((150..250).contains(&errors), "{errors} errors");
        assert!((4500..5500).contains(&count(&|r| r.api == Api::Chat)));
        assert!((2000..3000).contains(&count(&|r| r.api == Api::OpenAiChat)));
        assert!((7000..8000).contains(&count(&|r| r.stream)));
    }
}
