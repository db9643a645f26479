//! The probe's verdicts: per model and stage, streaks of passes and failures, and the one
//! place ([`ProbeState::record`]) where a stage and then a model flip between ready and not.
//!
//! Pure bookkeeping (pingora's `health_check.rs` shape): no I/O, no clocks, no metrics. A stage
//! is *unknown* until a streak first reaches a threshold; it turns *failing* after
//! `failures` consecutive failed checks and *passing* after `successes` consecutive good ones.
//! A model is ready when every enabled stage passes, not ready as soon as one fails.

use serde::Serialize;

use super::Stage;

/// Consecutive results needed to change a stage's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Failures in a row that turn a stage failing (default 3: docs/DESIGN.md#probe-verdicts).
    pub failures: u32,
    /// Successes in a row that turn it passing again (default 1: docs/DESIGN.md#probe-verdicts).
    pub successes: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            failures: 3,
            successes: 1,
        }
    }
}

/// A verdict, for a stage or a whole model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// No streak has reached its threshold yet (just started).
    Unknown,
    Ready,
    NotReady,
}

/// The last check of one stage for one model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    pub ok: bool,
    /// How long the check took, connect included.
    pub duration_s: f64,
    /// For `generate`: request sent to first streamed line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_chunk_s: Option<f64>,
    /// Why it failed, one line; empty when it passed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// Streaks and verdict of one stage of one model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageHealth {
    pub stage: Stage,
    pub verdict: Verdict,
    pub passes_in_a_row: u32,
    pub failures_in_a_row: u32,
    pub last: Option<CheckResult>,
}

impl StageHealth {
    fn new(stage: Stage) -> StageHealth {
        StageHealth {
            stage,
            verdict: Verdict::Unknown,
            passes_in_a_row: 0,
            failures_in_a_row: 0,
            last: None,
        }
    }

    fn record(&mut self, result: CheckResult, thresholds: Thresholds) {
        if result.ok {
            self.passes_in_a_row = self.passes_in_a_row.saturating_add(1);
            self.failures_in_a_row = 0;
            if self.passes_in_a_row >= thresholds.successes {
                self.verdict = Verdict::Ready;
            }
        } else {
            self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
            self.passes_in_a_row = 0;
            if self.failures_in_a_row >= thresholds.failures {
                self.verdict = Verdict::NotReady;
            }
        }
        self.last = Some(result);
    }
}

/// One model's stages and verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelHealth {
    /// The model name; empty when no `--model` was given and the probe is about the upstream.
    pub model: String,
    pub verdict: Verdict,
    pub stages: Vec<StageHealth>,
}

impl ModelHealth {
    fn verdict_of(stages: &[StageHealth]) -> Verdict {
        if stages.iter().any(|s| s.verdict == Verdict::NotReady) {
            Verdict::NotReady
        } else if stages.iter().all(|s| s.verdict == Verdict::Ready) {
            Verdict::Ready
        } else {
            Verdict::Unknown
        }
    }
}

/// The names results are recorded under: the models, or one unnamed entry for the upstream
/// itself when no `--model` was given.
pub fn probed_names(models: &[String]) -> Vec<String> {
    if models.is_empty() {
        vec![String::new()]
    } else {
        models.to_vec()
    }
}

/// A model whose verdict changed, with the failing check that turned it when it turned not ready.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub model: String,
    pub from: Verdict,
    pub to: Verdict,
    /// `stage: error` of the check that decided it, for logs and the exec hook.
    pub reason: String,
}

/// Every probed model's health.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeState {
    thresholds: Thresholds,
    models: Vec<ModelHealth>,
}

impl ProbeState {
    /// State for `models` (one unnamed entry when empty), each with the `stages` enabled.
    pub fn new(models: &[String], stages: &[Stage], thresholds: Thresholds) -> ProbeState {
        ProbeState {
            thresholds,
            models: probed_names(models)
                .into_iter()
                .map(|model| ModelHealth {
                    model,
                    verdict: Verdict::Unknown,
                    stages: stages.iter().map(|&s| StageHealth::new(s)).collect(),
                })
                .collect(),
        }
    }

    /// Records one check; returns the model's transition when its verdict changed. A result for
    /// a model or stage that is not probed is ignored.
    pub fn record(&mut self, model: &str, stage: Stage, result: CheckResult) -> Option<Transition> {
        let thresholds = self.thresholds;
        let health = self.models.iter_mut().find(|m| m.model == model)?;
        let reason = if result.ok {
            String::new()
        } else {
            format!("{stage}: {}", result.error)
        };
        health
            .stages
            .iter_mut()
            .find(|s| s.stage == stage)?
            .record(result, thresholds);
        let verdict = ModelHealth::verdict_of(&health.stages);
        if verdict == health.verdict {
            return None;
        }
        let from = std::mem::replace(&mut health.verdict, verdict);
        Some(Transition {
            model: health.model.clone(),
            from,
            to: verdict,
            reason,
        })
    }

    pub fn models(&self) -> &[ModelHealth] {
        &self.models
    }

    /// Whether every probed model is ready.
    pub fn all_ready(&self) -> bool {
        self.models.iter().all(|m| m.verdict == Verdict::Ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass() -> CheckResult {
        CheckResult {
            ok: true,
            duration_s: 0.01,
            first_chunk_s: None,
            error: String::new(),
        }
    }

    fn fail(why: &str) -> CheckResult {
        CheckResult {
            ok: false,
            duration_s: 0.01,
            first_chunk_s: None,
            error: why.into(),
        }
    }

    fn state(thresholds: Thresholds) -> ProbeState {
        ProbeState::new(
            &["m".to_string()],
            &[Stage::Tcp, Stage::Api, Stage::Generate],
            thresholds,
        )
    }

    #[test]
    fn ready_once_every_stage_has_passed() {
        let mut s = state(Thresholds::default());
        assert_eq!(s.record("m", Stage::Tcp, pass()), None);
        assert_eq!(s.record("m", Stage::Api, pass()), None);
        let t = s.record("m", Stage::Generate, pass()).unwrap();
        assert_eq!((t.from, t.to), (Verdict::Unknown, Verdict::Ready));
        assert!(s.all_ready());
    }

    #[test]
    fn not_ready_only_after_the_failure_threshold_and_back_after_successes() {
        let thresholds = Thresholds {
            failures: 3,
            successes: 2,
        };
        let mut s = state(thresholds);
        for stage in [Stage::Tcp, Stage::Api, Stage::Generate] {
            s.record("m", stage, pass());
            s.record("m", stage, pass());
        }
        assert!(s.all_ready());
        assert_eq!(s.record("m", Stage::Generate, fail("slow")), None);
        assert_eq!(s.record("m", Stage::Generate, fail("slow")), None);
        // A pass in between restarts the failure streak.
        assert_eq!(s.record("m", Stage::Generate, pass()), None);
        assert_eq!(s.record("m", Stage::Generate, fail("slow")), None);
        assert_eq!(s.record("m", Stage::Generate, fail("slow")), None);
        let t = s
            .record("m", Stage::Generate, fail("no first chunk"))
            .unwrap();
        assert_eq!((t.from, t.to), (Verdict::Ready, Verdict::NotReady));
        assert_eq!(t.reason, "generate: no first chunk");
        assert_eq!(s.record("m", Stage::Generate, pass()), None, "needs 2");
        let t = s.record("m", Stage::Generate, pass()).unwrap();
        assert_eq!((t.from, t.to), (Verdict::NotReady, Verdict::Ready));
    }

    #[test]
    fn a_host_that_starts_broken_turns_not_ready() {
        let mut s = state(Thresholds::default());
        s.record("m", Stage::Tcp, fail("refused"));
        s.record("m", Stage::Tcp, fail("refused"));
        let t = s.record("m", Stage::Tcp, fail("refused")).unwrap();
        assert_eq!((t.from, t.to), (Verdict::Unknown, Verdict::NotReady));
        assert!(!s.all_ready());
    }

    #[test]
    fn one_failing_stage_outweighs_passing_ones() {
        let mut s = state(Thresholds {
            failures: 1,
            successes: 1,
        });
        s.record("m", Stage::Api, fail("model not listed"));
        s.record("m", Stage::Tcp, pass());
        s.record("m", Stage::Generate, pass());
        assert_eq!(s.models()[0].verdict, Verdict::NotReady);
    }

    #[test]
    fn without_models_one_unnamed_entry_and_unknown_results_are_ignored() {
        let mut s = ProbeState::new(&[], &[Stage::Tcp, Stage::Api], Thresholds::default());
        assert_eq!(s.models().len(), 1);
        assert_eq!(s.models()[0].model, "");
        assert_eq!(s.record("other", Stage::Tcp, pass()), None);
        assert_eq!(s.record("", Stage::Generate, pass()), None);
        s.record("", Stage::Tcp, pass());
        assert!(s.record("", Stage::Api, pass()).is_some());
    }
}
