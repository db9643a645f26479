//! Side-by-side comparisons: contenders measured in alternating rounds (A, B, A, B, ...), each
//! round run again when other processes used the machine meanwhile (builds and tests of others
//! on a shared machine would otherwise land in one contender's rounds).

use std::fmt::Display;

/// A round during which other processes used more than this many cores is run again, up to
/// `retries` times ([`RETRIES`] unless a benchmark's `--retries` says otherwise).
pub const DISTURBED_CORES: f64 = 0.15;
pub const RETRIES: usize = 3;

/// The options of a comparison under `wrk`, flattened into a benchmark's own.
#[derive(clap::Args, Clone, Debug)]
pub struct RoundArgs {
    /// Measured rounds per contender (they alternate). Five: on this shared 2-core machine one
    /// round in five can run 10-20 % slow for either side.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per measured wrk round.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// wrk's connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Times a round is run again when other processes used the machine meanwhile.
    #[arg(long, default_value_t = RETRIES)]
    pub retries: usize,
}

/// A measured round that knows how much CPU others used meanwhile, in cores.
pub trait Disturbed {
    fn others_cores(&self) -> f64;
}

/// `rounds` rounds of every contender in turn, `measure(contender)` each; a disturbed round
/// is measured again, at most `retries` times (the last try is kept). Prints each round as it ends. Returns the kept
/// rounds in order, and how many were run again.
pub fn alternate<R: Disturbed + Display>(
    rounds: usize,
    contenders: usize,
    retries: usize,
    mut measure: impl FnMut(usize) -> anyhow::Result<R>,
) -> anyhow::Result<(Vec<R>, usize)> {
    let mut kept = Vec::new();
    let mut again = 0;
    for round in 1..=rounds {
        for contender in 0..contenders {
            for attempt in 0..=retries {
                let measured = measure(contender)?;
                println!("round {round} {measured}");
                if measured.others_cores() <= DISTURBED_CORES || attempt == retries {
                    kept.push(measured);
                    break;
                }
                println!(
                    "  other processes used the machine meanwhile ({:.2} cores); again",
                    measured.others_cores()
                );
                again += 1;
            }
        }
    }
    Ok((kept, again))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct R(usize, f64);
    impl Disturbed for R {
        fn others_cores(&self) -> f64 {
            self.1
        }
    }
    impl std::fmt::Display for R {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}", self.0)
        }
    }

    #[test]
    fn alternates_and_retries_disturbed_rounds_a_bounded_number_of_times() {
        // Contender 1's first try of round 1 is disturbed once; contender 0 in round 2 always.
        let mut calls = 0;
        let (kept, again) = alternate(2, 2, RETRIES, |c| {
            calls += 1;
            let busy = match (calls, c) {
                (2, 1) => 0.5,
                (c, 0) if c >= 4 => 0.9,
                _ => 0.0,
            };
            Ok(R(c, busy))
        })
        .unwrap();
        let order: Vec<usize> = kept.iter().map(|r| r.0).collect();
        assert_eq!(order, [0, 1, 0, 1]);
        assert_eq!(again, 1 + RETRIES);
        assert_eq!(kept[2].1, 0.9, "the last try is kept");
        assert_eq!(calls, 4 + 1 + RETRIES);

        let (kept, again) = alternate(1, 2, 0, |c| Ok(R(c, 0.9))).unwrap();
        assert_eq!((kept.len(), again), (2, 0), "no retries");
    }
}
