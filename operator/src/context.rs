//! What every reconciliation is given: the client, how to build pods, metrics, an event
//! recorder, and the retry state of objects whose last reconciliation failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use kube::Client;

use crate::metrics::Metrics;
use crate::names::MANAGER;
use crate::settings::NodePodSettings;

/// First and longest wait before retrying a failed reconciliation.
const FIRST_RETRY: Duration = Duration::from_secs(2);
const LONGEST_RETRY: Duration = Duration::from_secs(300);

pub struct Context {
    pub client: Client,
    pub settings: NodePodSettings,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    failures: Mutex<HashMap<String, u32>>,
    /// Problem messages already published per object, so each is published once.
    announced: Mutex<HashMap<String, String>>,
}

impl Context {
    /// `instance` names this replica in the events it publishes.
    pub fn new(
        client: Client,
        settings: NodePodSettings,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Context {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            failures: Mutex::new(HashMap::new()),
            announced: Mutex::new(HashMap::new()),
        }
    }

    /// How long to wait before retrying `key` after one more failure: doubling from two
    /// seconds up to five minutes.
    pub fn next_retry(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let factor = 1u32 << (*n - 1).min(10);
        (FIRST_RETRY * factor).min(LONGEST_RETRY)
    }

    /// Forgets the failures of `key` after a reconciliation succeeded.
    pub fn succeeded(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(key);
    }

    /// Whether `message` is new for `key`; remembers it.
    pub fn first_announcement(&self, key: &str, message: &str) -> bool {
        let mut seen = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get(key).is_some_and(|m| m == message) {
            return false;
        }
        seen.insert(key.to_string(), message.to_string());
        true
    }

    /// Forgets what was published for `key` once its problem is gone.
    pub fn forget_announcement(&self, key: &str) {
        let mut seen = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        seen.remove(key);
    }
}
