//! Summaries of repeated measurements: the median and the spread (min–max) of a comparison's
//! rounds, and percentiles of recorded latencies.

/// Median, min and max of a set of rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no values.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// `median (min–max)` with `decimals` decimals, each value scaled by `scale` first.
    pub fn show(&self, decimals: usize, scale: f64) -> String {
        format!(
            "{:.decimals$} ({:.decimals$}–{:.decimals$})",
            self.median * scale,
            self.min * scale,
            self.max * scale
        )
    }

    /// Like [`Spread::show`], whole numbers with thousands separated.
    pub fn show_grouped(&self) -> String {
        let g = |v: f64| super::report::grouped(v.round().max(0.0) as u64);
        format!("{} ({}–{})", g(self.median), g(self.min), g(self.max))
    }
}

/// The `p`-th percentile (0–100) of sorted values, nearest rank; `None` for no values.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts_and_the_extremes() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!(
            s,
            Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        let s = Spread::of([4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 10.0));
        assert_eq!(Spread::of([]), None);
        assert_eq!(s.show(1, 1.0), "3.0 (1.0–10.0)");
        assert_eq!(
            Spread::of([48703.4, 46349.0, 1234567.0])
                .unwrap()
                .show_grouped(),
            "48,703 (46,349–1,234,567)"
        );
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.9), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
