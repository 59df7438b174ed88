//! Leader election through a coordination.k8s.io `Lease`, so that of several replicas only
//! one reconciles.
//!
//! The holder renews the Lease every third of its duration; a standby takes it over once it
//! has gone a full duration without renewal. Every write carries the resourceVersion it
//! read, so of two replicas racing for an expired Lease exactly one wins and the other gets
//! a conflict. A holder that cannot renew before its Lease would expire stops leading:
//! another replica may already have taken over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::chrono::{DateTime, TimeDelta, Utc};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::Error;

/// What a replica should do with the Lease it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No Lease exists: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Nobody holds it, or its holder let it expire: take it over.
    TakeOver,
    /// Another replica holds it.
    Follow { holder: String },
}

/// Decides what to do with `lease` at `now`. Pure.
pub fn decide(lease: Option<&Lease>, me: &str, now: DateTime<Utc>) -> Step {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_none() {
            Step::Create
        } else {
            Step::TakeOver
        };
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Step::TakeOver;
    }
    if holder == me {
        return Step::Renew;
    }
    let duration = TimeDelta::seconds(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let expired = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .is_none_or(|t| t.0 + duration < now);
    if expired {
        Step::TakeOver
    } else {
        Step::Follow { holder }
    }
}

/// The Lease to write for `step`, keeping the read object's metadata (its
/// resourceVersion makes the write conditional). Pure.
pub fn held(
    existing: Option<&Lease>,
    name: &str,
    me: &str,
    seconds: i32,
    step: &Step,
    now: DateTime<Utc>,
) -> Lease {
    let old = existing.and_then(|l| l.spec.clone()).unwrap_or_default();
    let renewing = *step == Step::Renew;
    let transitions = old.lease_transitions.unwrap_or(0);
    Lease {
        metadata: existing.map(|l| l.metadata.clone()).unwrap_or(ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        }),
        spec: Some(LeaseSpec {
            holder_identity: Some(me.to_string()),
            lease_duration_seconds: Some(seconds),
            acquire_time: if renewing {
                old.acquire_time.clone()
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(match step {
                Step::TakeOver => transitions + 1,
                _ => transitions,
            }),
        }),
    }
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    me: String,
    seconds: i32,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, me: &str, seconds: u32) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            me: me.to_string(),
            seconds: i32::try_from(seconds).unwrap_or(i32::MAX),
        }
    }

    fn period(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.seconds).unwrap_or(15).max(3) / 3)
    }

    /// One election round: whether this replica holds the Lease afterwards.
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let lease = self.api.get_opt(&self.name).await?;
        let now = Utc::now();
        let step = decide(lease.as_ref(), &self.me, now);
        let Step::Follow { .. } = step else {
            let desired = held(
                lease.as_ref(),
                &self.name,
                &self.me,
                self.seconds,
                &step,
                now,
            );
            let result = match step {
                Step::Create => self.api.create(&PostParams::default(), &desired).await,
                _ => {
                    self.api
                        .replace(&self.name, &PostParams::default(), &desired)
                        .await
                }
            };
            return match result {
                Ok(_) => Ok(true),
                // Another replica wrote first.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        Ok(false)
    }

    /// Waits until this replica leads (`true`) or a stop is requested (`false`).
    pub async fn acquire(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let mut announced = false;
        loop {
            match self.try_lead().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.me, "leading");
                    return true;
                }
                Ok(false) if !announced => {
                    info!(lease = %self.name, "another replica leads; standing by");
                    announced = true;
                }
                Ok(false) => {}
                Err(error) => warn!(lease = %self.name, %error, "leader election failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.period()) => {}
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
    }

    /// Renews the Lease until a stop is requested (`Ok`) or leadership is lost.
    pub async fn keep(&self, stop: &mut watch::Receiver<bool>) -> Result<(), Error> {
        let mut last_renewal = tokio::time::Instant::now();
        let validity = Duration::from_secs(u64::try_from(self.seconds).unwrap_or(15));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.period()) => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            match self.try_lead().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    let holder = self
                        .api
                        .get_opt(&self.name)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|l| l.spec?.holder_identity)
                        .unwrap_or_else(|| "another replica".into());
                    return Err(Error::LostLease {
                        lease: self.name.clone(),
                        holder,
                    });
                }
                Err(error) => {
                    warn!(lease = %self.name, %error, "renewing the lease failed");
                    if last_renewal.elapsed() >= validity {
                        return Err(Error::LostLease {
                            lease: self.name.clone(),
                            holder: "unknown (renewals failed)".into(),
                        });
                    }
                }
            }
        }
    }

    /// Gives the Lease up on shutdown so a standby need not wait for it to expire.
    pub async fn release(&self) {
        let Ok(Some(lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let mine = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.me.as_str());
        if !mine {
            return;
        }
        let mut released = lease;
        if let Some(spec) = released.spec.as_mut() {
            spec.holder_identity = None;
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &released)
            .await
        {
            Ok(_) => info!(lease = %self.name, "lease released"),
            Err(error) => warn!(lease = %self.name, %error, "could not release the lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: DateTime<Utc>, seconds: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(seconds),
                renew_time: Some(MicroTime(renewed)),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn election_steps() {
        let now = Utc::now();
        assert_eq!(decide(None, "a", now), Step::Create);
        let fresh = lease("b", now - TimeDelta::seconds(5), 15);
        assert_eq!(
            decide(Some(&fresh), "a", now),
            Step::Follow { holder: "b".into() }
        );
        assert_eq!(decide(Some(&fresh), "b", now), Step::Renew);
        let stale = lease("b", now - TimeDelta::seconds(16), 15);
        assert_eq!(decide(Some(&stale), "a", now), Step::TakeOver);
        let released = lease("", now, 15);
        assert_eq!(decide(Some(&released), "a", now), Step::TakeOver);
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_keeps_the_acquire_time() {
        let now = Utc::now();
        let stale = lease("b", now - TimeDelta::seconds(60), 15);
        let taken = held(Some(&stale), "l", "a", 15, &Step::TakeOver, now);
        let spec = taken.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(now)));

        let mine = held(Some(&lease("a", now, 15)), "l", "a", 15, &Step::Create, now);
        let later = now + TimeDelta::seconds(5);
        let renewed = held(Some(&mine), "l", "a", 15, &Step::Renew, later)
            .spec
            .unwrap();
        assert_eq!(renewed.acquire_time, Some(MicroTime(now)));
        assert_eq!(renewed.renew_time, Some(MicroTime(later)));
    }
}
