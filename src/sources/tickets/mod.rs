//! `[[tickets]]`: TLS session ticket keys that certwire makes (80 random bytes from ring's
//! `SystemRandom`), rotates on a schedule, and serves as Envoy's `session_ticket_keys`
//! secret, the same keys from every replica, so a session resumed on any proxy of a fleet
//! finds its key (istio#20347, envoyproxy/gateway#8462: each Envoy making its own keys
//! breaks resumption across replicas).
//!
//! **Shared state.** Each name's keys live in one place all replicas share, and the
//! rotation is decided from the times stored there ([`schedule`]), never from a
//! replica's own memory: the replica that sees a step due first writes it, the others
//! read it, and a restart reads the same times and rotates nothing.
//! - A directory on a volume every replica mounts ([`dir`]): `flock(2)` on a lock file
//!   orders the writers, the kubelet's atomic `..data` swap keeps readers from seeing
//!   half a write; replicas follow it with a file watch and a periodic re-read
//!   (`reread_every`), the only thing that works on network file systems.
//! - A Kubernetes Secret ([`kube_state`]), written with optimistic concurrency on its
//!   resourceVersion rather than by the ACME Lease holder: every replica computes the
//!   same step from the same times, so it does not matter who writes, only that one
//!   write wins; no election delay, and losing any one replica never stalls rotation.
//!   Replicas poll it every `reread_every`.
//!
//! **Propagation window.** Replicas and proxies never get a new key at the same instant.
//! A new key is first served decrypt-only (last in the list) for `propagation` before it
//! becomes the first (encrypting) one, so by the time any proxy issues tickets with it,
//! every proxy can decrypt them; the keys it replaces stay decrypt-only for `keep` more
//! rotations.
//!
//! **Authorization.** The ticket names are ordinary secret names: `policy` mode needs an
//! `[[authz.rules]]` rule; in `kubernetes` mode a bare or `kubernetes://` name would be
//! decided by Istio's rule as if it were a Kubernetes Secret of that namespace, so the
//! config refuses such names there, and `kubernetes-gateway://` names (the Gateway API
//! rule would decide them): a name with another scheme (`tickets://NAME`) is denied
//! unless a rule allows it.
//!
//! **Precedence.** The tickets intake is registered before every other source, so a
//! `[[tickets]]` name wins over a Secret or a files directory of the same name: what the
//! operator configured here is never replaced by whoever can write a Secret.

pub mod dir;
pub mod kube_state;
pub mod schedule;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Notify;

use crate::ingest::Intake;
use crate::metrics::{LimitLabel, Metrics, SecretLabel};
use crate::pki::{KeyBytes, Material};
use crate::shutdown::Shutdown;
use dir::{DirState, StateError, Updated};
use kube_state::KubeState;
use schedule::{KEY_LEN, Plan, Schedule, State, Step};

pub const DEFAULT_ROTATE_EVERY: Duration = Duration::from_secs(12 * 3600);
pub const DEFAULT_KEEP: usize = 2;
/// Longest default propagation window; a quarter of `rotate_every` when that is shorter.
pub const DEFAULT_PROPAGATION: Duration = Duration::from_secs(300);
/// Shortest `rotate_every`: seconds are for tests, production wants hours.
pub const MIN_ROTATE_EVERY: Duration = Duration::from_secs(1);
pub const MAX_KEEP: usize = 16;
/// Most `[[tickets]]` names.
pub const MAX_NAMES: usize = 64;
/// Bounds of the default re-read interval (a quarter of the propagation window).
const MIN_REREAD: Duration = Duration::from_millis(250);
const MAX_REREAD: Duration = Duration::from_secs(30);

/// One `[[tickets]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TicketsConfig {
    /// The secret name Envoy asks for.
    pub name: String,
    /// How long a key encrypts [default: 12h; at least 1s].
    #[serde(default, with = "humantime_serde")]
    pub rotate_every: Option<Duration>,
    /// Previous keys still accepted for decryption [default: 2; 1 to 16].
    pub keep: Option<usize>,
    /// How long a new key is served decrypt-only before it encrypts [default: 5m, or a
    /// quarter of `rotate_every` when shorter]; less than `rotate_every`.
    #[serde(default, with = "humantime_serde")]
    pub propagation: Option<Duration>,
    /// Where the replicas share the keys: a directory on a volume every replica mounts,
    /// or a Kubernetes Secret `kubernetes://NAMESPACE/NAME`.
    pub state: String,
    /// How often the state is read again (besides the file watch of a directory)
    /// [default: a quarter of `propagation`, between 250ms and 30s; 30s without a window].
    #[serde(default, with = "humantime_serde")]
    pub reread_every: Option<Duration>,
}

/// A checked `[[tickets]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub name: Arc<str>,
    pub schedule: Schedule,
    pub state: StateAt,
    pub reread_every: Duration,
}

/// Where a name's state is shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateAt {
    Dir(PathBuf),
    Secret { namespace: String, name: String },
}

impl std::fmt::Display for StateAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateAt::Dir(path) => write!(f, "{}", path.display()),
            StateAt::Secret { namespace, name } => write!(f, "kubernetes://{namespace}/{name}"),
        }
    }
}

/// Checks every `[[tickets]]` table; `authz` is the authorization mode they are served
/// under.
pub fn resolve(configs: &[TicketsConfig], authz: crate::authz::Mode) -> Result<Vec<Ticket>, String> {
    if configs.len() > MAX_NAMES {
        return Err(format!("[[tickets]]: {} names, at most {MAX_NAMES}", configs.len()));
    }
    let mut out: Vec<Ticket> = Vec::with_capacity(configs.len());
    for c in configs {
        let at = format!("[[tickets]] name = {:?}", c.name);
        if c.name.is_empty() {
            return Err("[[tickets]]: name is empty".into());
        }
        // `kubernetes-gateway://` names are decided by the Gateway API rule (a review of
        // the proxy's service account) before any `[[authz.rules]]` default applies.
        let kubernetes_name =
            crate::authz::resolve(&c.name, "default").is_some() || c.name.starts_with(crate::authz::gateway::SCHEME);
        if authz == crate::authz::Mode::Kubernetes && kubernetes_name {
            return Err(format!(
                "{at}: with [authz] mode = \"kubernetes\" this name would be authorized as a Kubernetes Secret \
                 (Istio's or the Gateway API rule); give it another scheme, e.g. \"tickets://{}\", and allow it with \
                 an [[authz.rules]] rule",
                c.name.rsplit('/').next().unwrap_or(&c.name)
            ));
        }
        let rotate_every = c.rotate_every.unwrap_or(DEFAULT_ROTATE_EVERY);
        if rotate_every < MIN_ROTATE_EVERY {
            return Err(format!("{at}: rotate_every = {rotate_every:?}, at least {MIN_ROTATE_EVERY:?}"));
        }
        let keep = c.keep.unwrap_or(DEFAULT_KEEP);
        if !(1..=MAX_KEEP).contains(&keep) {
            return Err(format!("{at}: keep = {keep}, expected 1 to {MAX_KEEP}"));
        }
        let propagation = c.propagation.unwrap_or_else(|| DEFAULT_PROPAGATION.min(rotate_every / 4));
        if propagation >= rotate_every {
            return Err(format!(
                "{at}: propagation = {propagation:?} must be shorter than rotate_every = {rotate_every:?}"
            ));
        }
        // Followers must see a staged key well within the window; with no window there
        // is nothing to be in time for.
        let default_reread =
            if propagation.is_zero() { MAX_REREAD } else { (propagation / 4).clamp(MIN_REREAD, MAX_REREAD) };
        let reread_every = c.reread_every.unwrap_or(default_reread);
        if reread_every < Duration::from_millis(100) {
            return Err(format!("{at}: reread_every = {reread_every:?}, at least 100ms"));
        }
        let state = if let Some(rest) = c.state.strip_prefix("kubernetes://") {
            match rest.split_once('/') {
                Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
                    StateAt::Secret { namespace: namespace.to_owned(), name: name.to_owned() }
                }
                _ => return Err(format!("{at}: state = {:?}: expected kubernetes://NAMESPACE/NAME", c.state)),
            }
        } else if c.state.contains("://") || c.state.is_empty() {
            return Err(format!(
                "{at}: state = {:?}: expected a directory path or kubernetes://NAMESPACE/NAME",
                c.state
            ));
        } else {
            StateAt::Dir(PathBuf::from(&c.state))
        };
        if let Some(other) = out.iter().find(|t| *t.name == *c.name) {
            return Err(format!("{at}: configured twice (state {})", other.state));
        }
        if let Some(other) = out.iter().find(|t| t.state == state) {
            return Err(format!("{at}: state {state} is already the state of {:?}", other.name));
        }
        out.push(Ticket {
            name: c.name.as_str().into(),
            schedule: Schedule { rotate_every, keep, propagation },
            state,
            reread_every,
        });
    }
    Ok(out)
}

/// Wall-clock milliseconds. The state's times are compared across replicas, so
/// production reads the system clock each time; tests anchor it to tokio's (paused)
/// clock.
#[derive(Clone, Copy, Debug)]
pub enum Clock {
    System,
    Anchored { unix_ms: u64, at: tokio::time::Instant },
}

impl Clock {
    pub fn anchored(unix_ms: u64) -> Self {
        Clock::Anchored { unix_ms, at: tokio::time::Instant::now() }
    }

    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System => u64::try_from(crate::unix_time::millis(std::time::SystemTime::now())).unwrap_or(0),
            Clock::Anchored { unix_ms, at } => {
                unix_ms.saturating_add(u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
            }
        }
    }
}

fn new_key() -> KeyBytes {
    let mut bytes = vec![0u8; KEY_LEN];
    // SystemRandom reads the kernel's CSPRNG; if that fails there is no safe key to make.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random number generator failed");
    KeyBytes::new(bytes)
}

/// Starts one follower per name. The first read (or creation) of each state is done
/// before this returns, so the keys are in the store before any listener serves. A state
/// that cannot be read then (corrupt, foreign, locked, unreachable) does not fail the
/// start: it is reported like any later failure (logged once, the name's `last_error`,
/// `ticket_state_errors_total`) and retried every `reread_every`, so a state broken on
/// the shared volume does not keep every restarting replica, and every other secret it
/// serves, down.
pub async fn start(
    tickets: Vec<Ticket>,
    intake: Intake,
    metrics: Arc<Metrics>,
    kubeconfig: Option<PathBuf>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut client = None;
    for ticket in tickets {
        let backend = match &ticket.state {
            StateAt::Dir(path) => Backend::Dir(DirState::new(path.clone(), &ticket.name)),
            StateAt::Secret { namespace, name } => {
                if client.is_none() {
                    let connected = crate::kube_client::connect(kubeconfig.as_ref())
                        .await
                        .map_err(|e| e.context("[[tickets]] state in a Kubernetes Secret"))?;
                    client = Some(connected.client);
                }
                let client = client.clone().expect("connected above");
                Backend::Secret(Box::new(KubeState::new(client, namespace, name, &ticket.name)))
            }
        };
        let reread = ms(ticket.reread_every);
        let mut follower = Follower::new(ticket, backend, intake.clone(), metrics.clone(), Clock::System);
        // An error is logged and recorded by `step`; the follower retries it.
        let next_ms = match follower.step().await {
            Ok(next_ms) => next_ms,
            Err(_) => Clock::System.now_ms().saturating_add(reread),
        };
        tokio::spawn(follower.run(next_ms, shutdown.clone()));
    }
    Ok(())
}

/// Where a follower reads and writes its state.
#[derive(Clone)]
pub enum Backend {
    Dir(DirState),
    // Boxed: one per name, and the Api handle is large.
    Secret(Box<KubeState>),
}

impl Backend {
    /// The state now, and the step written if one was due (only then is the state
    /// locked or written: most reads find nothing due).
    async fn step(&self, schedule: Schedule, now: u64) -> Result<(State, Option<Step>), StateError> {
        let plan = move |current: Option<&State>| schedule.plan(current, now, new_key);
        let nothing_due = move |current: &Option<State>| {
            matches!(schedule.plan(current.as_ref(), now, KeyBytes::default), Plan::Wait { .. })
        };
        let updated: Updated = match self {
            Backend::Dir(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || {
                    let current = dir.read()?;
                    if let Some(state) = current.as_ref().filter(|_| nothing_due(&current)) {
                        return Ok(Updated { state: state.clone(), step: None });
                    }
                    dir.update(plan)
                })
                .await
                .expect("the ticket state task does not panic")?
            }
            Backend::Secret(secret) => {
                let current = secret.read().await?;
                if let Some(state) = current.as_ref().filter(|_| nothing_due(&current)) {
                    return Ok((state.clone(), None));
                }
                secret.update(plan).await?
            }
        };
        Ok((updated.state, updated.step))
    }

    /// The directory to watch; a Secret is polled.
    fn watched(&self) -> Option<&std::path::Path> {
        match self {
            Backend::Dir(dir) => Some(dir.root()),
            Backend::Secret(_) => None,
        }
    }
}

/// One name: reads the shared state, writes the step that is due, serves what the state
/// holds. Driven by [`Follower::step`]; [`Follower::run`] calls it on time, on a file
/// event and every `reread_every`.
pub struct Follower {
    ticket: Ticket,
    backend: Backend,
    intake: Intake,
    metrics: Arc<Metrics>,
    clock: Clock,
    /// SHA-256 of the keys last handed to the intake (never logged).
    served: Option<ring::digest::Digest>,
    /// The state error last reported, so a broken state is logged once, not per re-read.
    failing: Option<String>,
}

impl Follower {
    pub fn new(ticket: Ticket, backend: Backend, intake: Intake, metrics: Arc<Metrics>, clock: Clock) -> Self {
        Self { ticket, backend, intake, metrics, clock, served: None, failing: None }
    }

    /// Reads the state, writes the step due now if any, serves the keys; returns when the
    /// next step is due (Unix ms).
    pub async fn step(&mut self) -> Result<u64, StateError> {
        let now = self.clock.now_ms();
        let schedule = self.ticket.schedule;
        let result = self.backend.step(schedule, now).await;
        let (state, step) = match result {
            Ok(done) => done,
            Err(err) => {
                self.failed(&err);
                return Err(err);
            }
        };
        if self.failing.take().is_some() {
            tracing::info!(secret = %self.ticket.name, state = %self.ticket.state, "ticket state readable again");
            self.intake.clear_error(&self.ticket.name);
        }
        if let Some(step) = step {
            tracing::info!(
                secret = %self.ticket.name,
                state = %self.ticket.state,
                step = step.as_str(),
                keys = state.count(),
                "session ticket keys written"
            );
            if step == Step::Promoted {
                self.metrics.ticket_key_rotations.get_or_create(&self.label()).inc();
            }
        }
        self.serve(&state);
        Ok(match schedule.plan(Some(&state), now, KeyBytes::default) {
            Plan::Wait { next_ms } => next_ms,
            Plan::Write(..) => now,
        })
    }

    fn label(&self) -> SecretLabel {
        SecretLabel { secret: self.ticket.name.clone() }
    }

    fn serve(&mut self, state: &State) {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for key in state.keys() {
            digest.update(key.bytes.as_slice());
        }
        let digest = digest.finish();
        if self.served.is_some_and(|d| d.as_ref() == digest.as_ref()) {
            return;
        }
        let material = Material::SessionTicketKeys(state.keys().map(|k| k.bytes.clone()).collect());
        // A rejection is logged, counted and shown in status by the intake.
        if self.intake.update(self.ticket.name.clone(), &material, std::time::Instant::now()).is_ok() {
            self.served = Some(digest);
        }
    }

    fn failed(&mut self, err: &StateError) {
        let message = err.to_string();
        if self.failing.as_deref() == Some(message.as_str()) {
            return;
        }
        self.metrics.ticket_state_errors.get_or_create(&self.label()).inc();
        if matches!(err, StateError::TooLarge { .. }) {
            self.metrics.limits_hit.get_or_create(&LimitLabel { limit: "ticket_state_bytes" }).inc();
        }
        tracing::error!(
            secret = %self.ticket.name,
            state = %self.ticket.state,
            reason = err.reason(),
            error = %err,
            "session ticket state unusable; the last good keys stay served"
        );
        self.intake.report_error(&self.ticket.name, message.clone());
        self.failing = Some(message);
    }

    /// Steps when the next step is due, when the state directory changes, and every
    /// `reread_every`, until shutdown.
    pub async fn run(mut self, mut next_ms: u64, shutdown: Shutdown) {
        let changed = Arc::new(Notify::new());
        let _watch = self.backend.watched().and_then(|root| watch(root, changed.clone()));
        loop {
            let now = self.clock.now_ms();
            let wait = Duration::from_millis(next_ms.saturating_sub(now)).min(self.ticket.reread_every);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = changed.notified() => {}
            }
            match self.step().await {
                Ok(next) => next_ms = next,
                // Logged once by `failed`; retried at the next re-read.
                Err(_) => next_ms = self.clock.now_ms().saturating_add(ms(self.ticket.reread_every)),
            }
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A watch of the state directory that wakes `changed` when a new payload is swapped in;
/// `None` (re-reads only) where the file system gives no events.
fn watch(root: &std::path::Path, changed: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        // Our own lock file is opened by every read: its events would wake us forever.
        let relevant = event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == "..data" || n == dir::KEYS_FILE || n == dir::META_FILE));
        if relevant {
            changed.notify_one();
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(err) => {
            tracing::warn!(state = %root.display(), error = %err, "cannot watch the ticket state; following it by re-reads only");
            return None;
        }
    };
    if let Err(err) = watcher.watch(root, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(state = %root.display(), error = %err, "cannot watch the ticket state; following it by re-reads only");
        return None;
    }
    Some(watcher)
}

#[cfg(test)]
mod tests;
