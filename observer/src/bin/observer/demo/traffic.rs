//! The demo's traffic: simulated chat users talking to the gateway the way people and SDKs
//! do. Each user keeps one keep-alive connection, holds conversations of one to four turns
//! (the history grows with each turn), thinks between turns, streams most replies, and uses
//! Ollama's chat and generate APIs and the OpenAI-compatible one. A few requests go wrong on
//! purpose: a model that does not exist (404), a server error (500, 503), a stream that ends
//! with an error line.
//!
//! Owns the users' tasks and the client's own count of what it sent, which the summary
//! compares with what the observer counted.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{net::TcpStream, sync::watch, task::JoinSet};

use observer_sim::{Dice, FAULT_HEADER};

/// What the users sent and how it went, counted by the client.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Requests written to the gateway.
    pub sent: AtomicU64,
    /// Of those, answered 2xx with the whole body read.
    pub succeeded: AtomicU64,
}

/// The running users.
pub struct Traffic {
    pub stats: Arc<ClientStats>,
    stop: watch::Sender<bool>,
    users: JoinSet<()>,
}

/// A model the simulator does not serve: its requests answer 404, as Ollama's do.
const MISSING_MODEL: &str = "mistral:7b";

const OPENERS: &[&str] = &[
    "Summarise the plot of Hamlet in three sentences.",
    "Write a haiku about GPUs running hot.",
    "What is the difference between TCP and UDP?",
    "Give me a recipe for a quick vegetable curry.",
    "Explain Prometheus histograms to a new engineer.",
    "Translate 'the model is loading' into French and German.",
    "Suggest five names for a home-lab server.",
    "How do I find which process listens on a port on Linux?",
];
const FOLLOW_UPS: &[&str] = &[
    "Can you make it shorter?",
    "Now explain it like I am five.",
    "Give me one more example.",
    "What would you change to make it faster?",
    "Thanks! And in bullet points?",
];

impl Traffic {
    /// Starts `users` users against `gateway`, choosing among `models`.
    pub fn start(gateway: SocketAddr, models: &[String], users: usize, seed: u64) -> Traffic {
        let stats = Arc::new(ClientStats::default());
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for id in 0..users {
            let user = User {
                gateway,
                models: models.to_vec(),
                stats: stats.clone(),
                stop: stopped.clone(),
                dice: Dice::new(seed.wrapping_add(id as u64 * 7919)),
                conn: None,
            };
            tasks.spawn(user.run());
        }
        Traffic {
            stats,
            stop,
            users: tasks,
        }
    }

    /// Lets every user finish the request under way (up to `grace`), then stops them.
    pub async fn stop(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        let all_done = async { while self.users.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            self.users.abort_all();
        }
    }
}

struct User {
    gateway: SocketAddr,
    models: Vec<String>,
    stats: Arc<ClientStats>,
    stop: watch::Receiver<bool>,
    dice: Dice,
    conn: Option<SendRequest<Full<Bytes>>>,
}

/// One request as a user makes it.
struct Turn {
    path: &'static str,
    body: serde_json::Value,
    fault: Option<&'static str>,
}

impl User {
    async fn run(mut self) {
        // Users arrive over the first seconds rather than all at once.
        let arrival = Duration::from_millis(self.dice.below(2000));
        if !self.pause(arrival).await {
            return;
        }
        while !*self.stop.borrow() {
            let model = self.models[self.dice.below(self.models.len() as u64) as usize].clone();
            let turns = 1 + self.dice.below(4);
            let mut history: Vec<serde_json::Value> = Vec::new();
            for turn in 0..turns {
                let text = if turn == 0 {
                    OPENERS[self.dice.below(OPENERS.len() as u64) as usize]
                } else {
                    FOLLOW_UPS[self.dice.below(FOLLOW_UPS.len() as u64) as usize]
                };
                history.push(json!({"role": "user", "content": text}));
                let request = self.turn(&model, &history);
                let reply = self.send(request).await;
                history.push(json!({"role": "assistant", "content": reply.unwrap_or_default()}));
                let think = Duration::from_millis(500 + self.dice.below(2500));
                if !self.pause(think).await {
                    return;
                }
            }
            let away = Duration::from_millis(1000 + self.dice.below(3000));
            if !self.pause(away).await {
                return;
            }
        }
    }

    /// Sleeps; false when the demo is stopping.
    async fn pause(&mut self, time: Duration) -> bool {
        let slept = tokio::select! {
            () = tokio::time::sleep(time) => true,
            _ = self.stop.wait_for(|stop| *stop) => false,
        };
        slept && !*self.stop.borrow()
    }

    fn turn(&mut self, model: &str, history: &[serde_json::Value]) -> Turn {
        let stream = self.dice.chance(0.75);
        let tokens = 8 + self.dice.below(40);
        let roll = self.dice.below(1000);
        let (model, fault) = match roll {
            0..10 => (MISSING_MODEL, None),
            10..25 => (model, Some("status=500")),
            25..30 => (model, Some("status=503")),
            30..40 if stream => (model, Some("error-after=2")),
            _ => (model, None),
        };
        let (path, body) = match self.dice.below(100) {
            0..55 => (
                "/api/chat",
                json!({"model": model, "messages": history, "stream": stream,
                       "options": {"num_predict": tokens}}),
            ),
            55..70 => (
                "/api/generate",
                json!({"model": model, "prompt": history.last().map(|m| m["content"].clone()),
                       "stream": stream, "options": {"num_predict": tokens}}),
            ),
            _ => {
                let mut body = json!({"model": model, "messages": history, "stream": stream,
                                      "max_tokens": tokens});
                if stream {
                    body["stream_options"] = json!({"include_usage": true});
                }
                ("/v1/chat/completions", body)
            }
        };
        Turn { path, body, fault }
    }

    /// Sends one request and reads the whole reply; returns the raw reply text (kept as the
    /// assistant's turn) or `None` when it failed.
    async fn send(&mut self, turn: Turn) -> Option<String> {
        let body = Bytes::from(serde_json::to_vec(&turn.body).ok()?);
        let host = self.gateway.to_string();
        // A connection closed by the gateway between requests is replaced once.
        for _ in 0..2 {
            let sender = self.connection().await?;
            let mut request = Request::post(turn.path)
                .header("host", &host)
                .header("content-type", "application/json");
            if let Some(fault) = turn.fault {
                request = request.header(FAULT_HEADER, fault);
            }
            let request = request.body(Full::new(body.clone())).ok()?;
            let exchange = async {
                let response = sender.send_request(request).await?;
                let ok = response.status().is_success();
                let bytes = response.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>((ok, bytes))
            };
            match tokio::time::timeout(Duration::from_secs(60), exchange).await {
                Ok(Err(err)) if err.is_canceled() => {
                    // Never written: the connection was closing. Try a fresh one.
                    self.conn = None;
                    continue;
                }
                Ok(Ok((ok, bytes))) => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    if ok {
                        self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
                    }
                    return Some(String::from_utf8_lossy(&bytes).chars().take(200).collect());
                }
                Ok(Err(_)) | Err(_) => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    self.conn = None;
                    return None;
                }
            }
        }
        None
    }

    /// The user's keep-alive connection, opened when there is none or the last one closed.
    async fn connection(&mut self) -> Option<&mut SendRequest<Full<Bytes>>> {
        if let Some(conn) = &mut self.conn
            && conn.ready().await.is_err()
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            let stream = TcpStream::connect(self.gateway).await.ok()?;
            let _ = stream.set_nodelay(true);
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .ok()?;
            tokio::spawn(connection);
            self.conn = Some(sender);
        }
        self.conn.as_mut()
    }
}
