//! The operator's own metrics: reconciliations, their failures by category and their
//! duration, per controller. Label values come from fixed sets.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

/// Controller label values.
pub const FEDERATION_ROUND: &str = "federationround";
pub const DFL_NODE: &str = "dflnode";

/// Failure reason recorded when a spec does not validate (not an error of the operator).
pub const INVALID_SPEC: &str = "invalid_spec";

/// Reconciliation metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("edgesync_operator".into()), None)?;
        let reconciles = IntCounterVec::new(
            Opts::new("reconciles_total", "Reconciliations started."),
            &["controller"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "reconcile_failures_total",
                "Reconciliations that failed or found an invalid spec, by category.",
            ),
            &["controller", "reason"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "reconcile_duration_seconds",
                "Time one reconciliation took, in seconds.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["controller"],
        )?;
        // Series that exist from the start let rate() and alerts work before the first
        // reconciliation.
        for controller in [FEDERATION_ROUND, DFL_NODE] {
            reconciles.with_label_values(&[controller]);
            duration.with_label_values(&[controller]);
        }
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            failures,
            duration,
        })
    }

    /// Records one reconciliation of `controller` that took `seconds`, and its failure
    /// category if it failed.
    pub fn observe(&self, controller: &'static str, seconds: f64, failure: Option<&'static str>) {
        self.reconciles.with_label_values(&[controller]).inc();
        self.duration
            .with_label_values(&[controller])
            .observe(seconds);
        if let Some(reason) = failure {
            self.failures.with_label_values(&[controller, reason]).inc();
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_named_and_labelled() {
        let m = Metrics::new().unwrap();
        m.observe(FEDERATION_ROUND, 0.02, None);
        m.observe(FEDERATION_ROUND, 0.5, Some("conflict"));
        let text = m.render().unwrap();
        assert!(
            text.contains("edgesync_operator_reconciles_total{controller=\"federationround\"} 2"),
            "{text}"
        );
        assert!(text.contains(
            "edgesync_operator_reconcile_failures_total{controller=\"federationround\",\
             reason=\"conflict\"} 1"
        ));
        assert!(text.contains("edgesync_operator_reconcile_duration_seconds_bucket"));
    }
}
