//! One task per configured certificate, the control loop: serve what is stored at once,
//! then plan ([`schedule::plan`]), wait, order, and record the outcome (the new
//! certificate stored and served, or the failure in the persisted backoff and in
//! status), again and again. The served certificate changes only when a new one has
//! been issued and passed the same checks as any other secret.
//!
//! With a Lease (`[acme] lease`), a task orders only while its replica holds it;
//! otherwise it follows the certificate's Kubernetes Secret ([`follower`]) and takes
//! over the schedule, backoff included, when the Lease comes to it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::shutdown::Shutdown;
use tokio::sync::Semaphore;

use super::account::Accounts;
use super::backoff::{self, Backoff, RetryPolicy};
use super::challenge::Solvers;
use super::config::CertificateConfig;
use super::follower::{self, Followed};
use super::issue::{self, Failure};
use super::lease::Leadership;
use super::persist::Persist;
use super::schedule::{self, Situation, Window, rfc3339};
use super::serving::{self, ServingCert};
use super::state_dir::Stored;
use crate::health::Health;
use crate::ingest::Intake;
use crate::metrics::{AcmeCertificateLabel, AcmeOrderLabel, Metrics};
use crate::unix_time;

/// The longest single sleep: the plan is re-checked against the wall clock after it,
/// so a suspended machine or a clock jump is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// What every certificate task shares.
pub struct TaskContext {
    pub intake: Intake,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub accounts: Arc<Accounts>,
    pub solvers: Arc<Solvers>,
    pub persist: Persist,
    pub retry: RetryPolicy,
    /// Orders in flight at once, across certificates.
    pub orders: Semaphore,
    pub shutdown: Shutdown,
    /// Whether this replica holds the ACME Lease; `None`: no Lease, always order.
    pub leader: Option<Leadership>,
}

/// Whether this replica orders, after following the Lease holder or not.
enum Turn {
    /// No Lease, or this replica holds it already.
    Order,
    /// The Lease just came here from another replica.
    TookOver,
    Stop,
}

/// Why a wait ended.
enum Wake {
    Due,
    Shutdown,
    /// The Lease went to another replica.
    Lost,
}

pub struct Task {
    ctx: Arc<TaskContext>,
    spec: CertificateConfig,
    /// What is ordered, as persisted backoff records name it.
    spec_key: String,
    component: String,
    /// The ARI window last seen and the fraction drawn for it: a re-check that finds
    /// the same window keeps the point instead of drawing again.
    ari_fraction: Option<(Window, f64)>,
}

impl Task {
    pub fn new(ctx: Arc<TaskContext>, spec: CertificateConfig) -> Self {
        let component = format!("acme:{}", spec.name);
        ctx.health.not_ready(&component, "loading the stored certificate");
        let spec_key =
            backoff::spec_key(ctx.accounts.directory(), &spec.domains, spec.challenge.as_str(), spec.key_type.as_str());
        Self { ctx, spec, spec_key, component, ari_fraction: None }
    }

    pub async fn run(mut self) {
        let name = self.spec.name.clone();
        let ctx = &self.ctx;
        let mut serving = serving::load_and_serve(&self.spec, &ctx.intake, &ctx.persist, &ctx.shutdown).await;
        // Ready once the stored certificate is served: the backoff only steers planning,
        // and its Kubernetes read may wait for an unreachable API server.
        self.ctx.health.ready(&self.component);
        // After the certificate is served: serving clears the name's error in status.
        let mut backoff = self.ctx.persist.load_backoff(&name, &self.spec_key).await;
        self.show_backoff(backoff.as_ref(), "backoff of an earlier run kept");
        loop {
            match self.follow(&mut serving).await {
                Turn::Stop => return,
                Turn::Order => {}
                Turn::TookOver => {
                    // The last holder's failures count here too.
                    backoff = self.ctx.persist.load_backoff(&name, &self.spec_key).await;
                    self.show_backoff(backoff.as_ref(), "backoff of the last lease holder kept");
                }
            }
            let ari = match (&backoff, &serving) {
                (None, Some(c)) if c.covers_config => self.ctx.accounts.renewal_window(&name, &c.leaf_der).await,
                _ => None,
            };
            let ari_fraction = self.ari_fraction(ari.map(|a| a.window));
            let plan = schedule::plan(&Situation {
                now: SystemTime::now(),
                certificate: serving.as_ref().map(ServingCert::facts),
                ari,
                renew_before: self.spec.renew_before,
                retry_base: self.ctx.retry.base,
                backoff: backoff.as_ref(),
                ari_fraction,
            });
            self.ctx
                .metrics
                .acme_next_renewal
                .get_or_create(&AcmeCertificateLabel { certificate: name.clone() })
                .set(unix_time::secs(plan.order_at) as f64);
            if plan.order_at > SystemTime::now() {
                tracing::info!(certificate = %name, at = %rfc3339(plan.order_at), reason = %plan.describe(), "next ACME order scheduled");
            }
            let wake_at = plan.wake_at();
            if wake_at > SystemTime::now() {
                if wake_at < plan.order_at {
                    tracing::debug!(certificate = %name, at = %rfc3339(wake_at), "next ARI check scheduled");
                }
                match self.sleep_until(wake_at).await {
                    Wake::Due => {}
                    Wake::Shutdown => return,
                    Wake::Lost => continue,
                }
            }
            if wake_at < plan.order_at {
                continue;
            }
            tracing::info!(certificate = %name, reason = %plan.describe(), "ordering a certificate");
            match issue::issue(&self.ctx, &self.spec).await {
                Ok(new) => {
                    if backoff.take().is_some() {
                        self.ctx.persist.clear_backoff(&name).await;
                    }
                    self.ari_fraction = None;
                    self.count("issued");
                    serving = Some(new);
                }
                Err(Failure::Cancelled) => return,
                Err(Failure::Order(err)) => {
                    let next = Backoff::after_failure(
                        backoff.as_ref(),
                        SystemTime::now(),
                        self.ctx.retry,
                        schedule::random_fraction(),
                        err.to_string(),
                        &self.spec_key,
                    );
                    self.count("failed");
                    let serving = serving.as_ref().map(|c| c.serial.as_str()).unwrap_or("nothing");
                    let retry_in = next.next_attempt.duration_since(SystemTime::now()).unwrap_or_default();
                    tracing::error!(
                        certificate = %name,
                        step = err.step.as_str(),
                        error = %err.message,
                        failures = next.failures,
                        retry_in = %backoff::whole_seconds(retry_in),
                        still_serving = serving,
                        "ACME order failed"
                    );
                    self.ctx.intake.report_error(&name, next.status_message(SystemTime::now()));
                    self.ctx.persist.save_backoff(&name, &next).await;
                    backoff = Some(next);
                }
            }
        }
    }

    /// A persisted backoff, in status and the log.
    fn show_backoff(&self, backoff: Option<&Backoff>, what: &str) {
        let Some(b) = backoff else { return };
        let name = &self.spec.name;
        tracing::warn!(certificate = %name, failures = b.failures, next_attempt = %rfc3339(b.next_attempt), last_error = %b.last_error, "{what}");
        self.ctx.intake.report_error(name, b.status_message(SystemTime::now()));
    }

    fn count(&self, result: &'static str) {
        let label = AcmeOrderLabel { certificate: self.spec.name.clone(), result };
        self.ctx.metrics.acme_orders.get_or_create(&label).inc();
    }

    /// The fraction of the ARI window to renew at: the same while the window is.
    fn ari_fraction(&mut self, window: Option<Window>) -> f64 {
        let Some(window) = window else { return 0.0 };
        match self.ari_fraction {
            Some((seen, fraction)) if seen == window => fraction,
            _ => {
                let fraction = schedule::random_fraction();
                self.ari_fraction = Some((window, fraction));
                fraction
            }
        }
    }

    /// Sleeps until `at` by the wall clock, or until shutdown or the Lease is lost.
    async fn sleep_until(&self, at: SystemTime) -> Wake {
        let mut leader = self.ctx.leader.clone();
        loop {
            let Ok(left) = at.duration_since(SystemTime::now()) else { return Wake::Due };
            if left.is_zero() {
                return Wake::Due;
            }
            let lost = async {
                match leader.as_mut() {
                    Some(rx) => {
                        let _ = rx.wait_for(|holding| !holding).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return Wake::Shutdown,
                _ = lost => return Wake::Lost,
                _ = tokio::time::sleep(left.min(MAX_SLEEP)) => {}
            }
        }
    }

    /// Returns at once without a Lease or while holding it; else serves each version
    /// of the certificate's Secret until the Lease comes here, then reads the Secret
    /// once more: the schedule starts from what the last holder stored.
    async fn follow(&self, serving: &mut Option<ServingCert>) -> Turn {
        let Some(mut leader) = self.ctx.leader.clone() else { return Turn::Order };
        let Some(kube) = self.ctx.persist.kube.clone() else { return Turn::Order };
        if *leader.borrow_and_update() {
            return Turn::Order;
        }
        let name = self.spec.name.clone();
        tracing::info!(certificate = %name, secret = %kube.describe(&name), "not the ACME lease holder: serving what the holder stores, ordering nothing");
        let adopt = |stored: Stored| {
            if serving::adopt(
                &self.spec,
                &self.ctx.intake,
                &stored,
                serving,
                "the lease holder's stored certificate served",
            ) {
                // The holder's issuance succeeded: a backoff this replica kept from its
                // own turn as holder is stale, and must not trigger an order on takeover.
                if let Err(e) = self.ctx.persist.state.remove_backoff(&name) {
                    tracing::warn!(certificate = %name, error = format!("{e:#}"), "could not drop a stale backoff");
                }
            }
        };
        match follower::follow(&name, &mut leader, kube.watch_cert(&name), &self.ctx.shutdown, adopt).await {
            Followed::Stopped => return Turn::Stop,
            Followed::Leading => {}
        }
        match kube.load_cert(&name).await {
            Ok(Some(stored)) => {
                let what = "stored certificate served on taking over the lease";
                serving::adopt(&self.spec, &self.ctx.intake, &stored, serving, what);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(certificate = %name, error = format!("{e:#}"), "could not re-read the stored certificate on taking over")
            }
        }
        Turn::TookOver
    }
}
