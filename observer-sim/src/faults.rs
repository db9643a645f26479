//! Fault injection: which faults a request suffers, either rolled from the configured rates or
//! forced for that one request by the `X-Sim-Fault` header (syntax in the module docs of
//! the crate root).
//!
//! This module only decides; `response.rs` applies the transport faults (slow head, reset) and
//! the handlers apply the rest (status, mid-stream error, timing overrides). Rolled faults hit
//! inference routes only, so the probe's `/api/tags` keeps working in a faulty demo.

use std::time::Duration;

/// The request header that forces faults for one request.
pub const FAULT_HEADER: &str = "x-sim-fault";

/// Configured fault rates. A rate is the fraction of inference requests hit, 0 to 1.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRates {
    /// Status answered instead of the response, and its rate.
    pub status: u16,
    pub status_rate: f64,
    /// Reset the connection after this many streamed chunks, at `reset_rate`.
    pub reset_after: u32,
    pub reset_rate: f64,
    /// Replace the chunk after `error_after` content chunks by an error line.
    pub error_after: u32,
    pub mid_stream_error_rate: f64,
    /// Delay (and dribble) the response head.
    pub slow_head: Duration,
    pub slow_head_rate: f64,
    /// Read the request and never answer.
    pub hang_rate: f64,
}

impl Default for FaultRates {
    fn default() -> Self {
        Self {
            status: 500,
            status_rate: 0.0,
            reset_after: 0,
            reset_rate: 0.0,
            error_after: 2,
            mid_stream_error_rate: 0.0,
            slow_head: Duration::ZERO,
            slow_head_rate: 0.0,
            hang_rate: 0.0,
        }
    }
}

/// What happens to one request. The default is a clean exchange with configured timing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan {
    pub hang: bool,
    pub status: Option<u16>,
    pub reset_after: Option<u32>,
    pub error_after: Option<u32>,
    pub slow_head: Option<Duration>,
    pub load: Option<Duration>,
    pub first_token: Option<Duration>,
    pub token_interval: Option<Duration>,
    pub tokens: Option<u32>,
    /// Thinking tokens before the answer, whatever the model and the request's `think`.
    pub think: Option<u32>,
    /// Tool calls instead of the answer, whatever the request's tools.
    pub tool_calls: Option<u32>,
}

/// A malformed `X-Sim-Fault` header (answered with a 400, so a typo in a test is loud).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultHeaderError {
    #[error("unknown fault {0:?} in X-Sim-Fault")]
    Unknown(String),
    #[error("fault {name:?} in X-Sim-Fault needs a value ({name}=N)")]
    MissingValue { name: String },
    #[error("bad value {value:?} for fault {name:?} in X-Sim-Fault")]
    BadValue { name: String, value: String },
}

impl FaultPlan {
    /// Parses `X-Sim-Fault`: comma-separated items, e.g. `reset-after=3`, `status=503`,
    /// `error-after=2`, `hang`, `first-token-ms=4000`, `none`.
    pub fn from_header(value: &str) -> Result<Self, FaultHeaderError> {
        let mut plan = Self::default();
        for item in value
            .split([',', ';'])
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let (name, arg) = match item.split_once('=') {
                Some((n, v)) => (n.trim().to_ascii_lowercase(), Some(v.trim())),
                None => (item.to_ascii_lowercase(), None),
            };
            let number = |min: u64, max: u64| -> Result<u64, FaultHeaderError> {
                let text =
                    arg.ok_or_else(|| FaultHeaderError::MissingValue { name: name.clone() })?;
                text.parse::<u64>()
                    .ok()
                    .filter(|n| (min..=max).contains(n))
                    .ok_or_else(|| FaultHeaderError::BadValue {
                        name: name.clone(),
                        value: text.to_owned(),
                    })
            };
            let millis = |n: u64| Some(Duration::from_millis(n));
            const HOUR_MS: u64 = 3_600_000;
            match name.as_str() {
                "none" => {}
                "hang" => plan.hang = true,
                "status" => plan.status = Some(number(400, 599)? as u16),
                "reset-after" => plan.reset_after = Some(number(0, u64::from(u32::MAX))? as u32),
                "error-after" => plan.error_after = Some(number(0, u64::from(u32::MAX))? as u32),
                "slow-head-ms" => plan.slow_head = millis(number(0, HOUR_MS)?),
                "load-ms" => plan.load = millis(number(0, HOUR_MS)?),
                "first-token-ms" => plan.first_token = millis(number(0, HOUR_MS)?),
                "token-ms" => plan.token_interval = millis(number(0, HOUR_MS)?),
                "tokens" => plan.tokens = Some(number(0, 100_000)? as u32),
                "think" => plan.think = Some(number(0, 100_000)? as u32),
                "tool-calls" => plan.tool_calls = Some(number(0, 1_000)? as u32),
                _ => return Err(FaultHeaderError::Unknown(item.to_owned())),
            }
        }
        Ok(plan)
    }

    /// Rolls the configured rates for one inference request. A hang or a status fault excludes
    /// the others (there is no stream to break).
    pub fn roll(rates: &FaultRates, dice: &mut Dice) -> Self {
        let mut plan = Self::default();
        if dice.chance(rates.slow_head_rate) && !rates.slow_head.is_zero() {
            plan.slow_head = Some(rates.slow_head);
        }
        if dice.chance(rates.hang_rate) {
            plan.hang = true;
        } else if dice.chance(rates.status_rate) {
            plan.status = Some(rates.status);
        } else {
            if dice.chance(rates.reset_rate) {
                plan.reset_after = Some(rates.reset_after);
            }
            if dice.chance(rates.mid_stream_error_rate) {
                plan.error_after = Some(rates.error_after);
            }
        }
        plan
    }
}

/// A small deterministic random source (SplitMix64): fault rolls and OpenAI completion ids here,
/// the soak's users in xtask.
#[derive(Debug, Clone)]
pub struct Dice(u64);

impl Dice {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p` (0 never, 1 always).
    pub fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        if p >= 1.0 {
            return true;
        }
        // 53 random bits make a uniform f64 in [0, 1).
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_items_combine() {
        let plan =
            FaultPlan::from_header("reset-after=3, first-token-ms=4000; slow-head-ms=20").unwrap();
        assert_eq!(
            plan,
            FaultPlan {
                reset_after: Some(3),
                first_token: Some(Duration::from_secs(4)),
                slow_head: Some(Duration::from_millis(20)),
                ..FaultPlan::default()
            }
        );
        assert_eq!(
            FaultPlan::from_header("none").unwrap(),
            FaultPlan::default()
        );
        assert!(FaultPlan::from_header("HANG").unwrap().hang);
        let shaped = FaultPlan::from_header("think=5, tool-calls=2").unwrap();
        assert_eq!((shaped.think, shaped.tool_calls), (Some(5), Some(2)));
        assert_eq!(
            FaultPlan::from_header("status=503").unwrap().status,
            Some(503)
        );
    }

    #[test]
    fn header_mistakes_are_errors() {
        assert_eq!(
            FaultPlan::from_header("reset=3"),
            Err(FaultHeaderError::Unknown("reset=3".into()))
        );
        assert_eq!(
            FaultPlan::from_header("status"),
            Err(FaultHeaderError::MissingValue {
                name: "status".into()
            })
        );
        assert_eq!(
            FaultPlan::from_header("status=200"),
            Err(FaultHeaderError::BadValue {
                name: "status".into(),
                value: "200".into()
            })
        );
    }

    #[test]
    fn rates_of_zero_and_one_are_never_and_always() {
        let mut dice = Dice::new(7);
        let always = FaultRates {
            reset_after: 4,
            reset_rate: 1.0,
            mid_stream_error_rate: 1.0,
            ..FaultRates::default()
        };
        for _ in 0..100 {
            assert_eq!(
                FaultPlan::roll(&FaultRates::default(), &mut dice),
                FaultPlan::default()
            );
            let plan = FaultPlan::roll(&always, &mut dice);
            assert_eq!((plan.reset_after, plan.error_after), (Some(4), Some(2)));
        }
    }

    #[test]
    fn a_rate_hits_about_that_fraction() {
        let mut dice = Dice::new(42);
        let hits = (0..10_000).filter(|_| dice.chance(0.1)).count();
        assert!(
            (800..1200).contains(&hits),
            "{hits} hits of 10000 at rate 0.1"
        );
    }
}
