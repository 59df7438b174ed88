//! Faults a node injects into itself, so tests and benchmarks can watch the federation cope
//! with slow links and crashes at the worst moment.
//!
//! Network namespaces, `iptables` and `tc` give packet loss, partitions and bandwidth
//! limits from outside the process, but the kernels this runs on lack the `netem` delay
//! discipline, and killing a process exactly while it writes a checkpoint needs that write
//! to take long enough to aim at. Both come from here. A plan is written as
//! comma-separated `key=value` pairs, for example `send-delay-ms=800,checkpoint-stall-ms=5000`;
//! an empty plan injects nothing, which is what every production node runs.

use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FaultPlanError {
    #[error("fault {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("fault {key}: {value:?} is not a whole number of milliseconds")]
    NotMilliseconds { key: String, value: String },
    #[error("unknown fault {0:?} (known: send-delay-ms, checkpoint-stall-ms)")]
    Unknown(String),
}

/// What to inject; every field off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultPlan {
    /// Holds every outgoing update this long before it reaches the transport, as a slow
    /// or congested link would. The round deadline still applies from the moment the node
    /// decided to send.
    pub send_delay: Option<Duration>,
    /// Pauses every checkpoint write this long with half the file written, so a test can
    /// kill the process in the middle of it.
    pub checkpoint_stall: Option<Duration>,
}

impl FaultPlan {
    pub fn is_empty(&self) -> bool {
        *self == FaultPlan::default()
    }
}

impl FromStr for FaultPlan {
    type Err = FaultPlanError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut plan = FaultPlan::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| FaultPlanError::NotKeyValue(item.to_string()))?;
            let (key, value) = (key.trim(), value.trim());
            let millis: u64 = value.parse().map_err(|_| FaultPlanError::NotMilliseconds {
                key: key.to_string(),
                value: value.to_string(),
            })?;
            let duration = Some(Duration::from_millis(millis));
            match key {
                "send-delay-ms" => plan.send_delay = duration,
                "checkpoint-stall-ms" => plan.checkpoint_stall = duration,
                _ => return Err(FaultPlanError::Unknown(key.to_string())),
            }
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_fault_and_ignores_blanks() {
        let plan: FaultPlan = " send-delay-ms=800, ,checkpoint-stall-ms = 5000"
            .parse()
            .unwrap();
        assert_eq!(plan.send_delay, Some(Duration::from_millis(800)));
        assert_eq!(plan.checkpoint_stall, Some(Duration::from_secs(5)));
        assert!("".parse::<FaultPlan>().unwrap().is_empty());
    }

    #[test]
    fn bad_plans_name_what_is_wrong() {
        let err = |s: &str| s.parse::<FaultPlan>().unwrap_err().to_string();
        assert!(err("send-delay-ms").contains("not key=value"));
        assert!(err("send-delay-ms=1s").contains("send-delay-ms: \"1s\""));
        assert!(err("drop=5").contains("unknown fault \"drop\""));
    }
}
