//! The upstream source: certwire as a forwarder to a central certwire (see
//! [`config`]). Every name a local proxy asks for and no other local source serves is
//! asked upstream on one Delta SDS stream; what comes back is checked here like any
//! update and served locally; a name nobody asks for any more is dropped after
//! `forget_after`. When the upstream is unreachable, what was received stays served and
//! the stream is retried with backoff; /readyz says why.

pub mod config;
mod connect;
mod decode;
mod wanted;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use config::Target;
pub use config::UpstreamConfig;
use wanted::{Want, Wanted};

use crate::health::Health;
use crate::ingest::Intake;
use crate::metrics::{LimitLabel, Metrics};
use crate::pki::SECRET_TYPE_URL;
use crate::shutdown::Shutdown;

/// The /readyz component.
const COMPONENT: &str = "upstream";
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// gRPC INVALID_ARGUMENT, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;

/// Checks the settings and starts following the upstream until `shutdown`.
pub fn start(
    config: UpstreamConfig,
    intake: Intake,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Shutdown,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let target = config.target().map_err(anyhow::Error::msg)?;
    health.not_ready(COMPONENT, format!("connecting to {}", config.address));
    let demand = intake.store().demand();
    let wanted = Wanted::new(config.max_names(), config.forget_after());
    let forwarder = Forwarder { config, target, intake, metrics, health, wanted, established: false, told: false };
    Ok(tokio::spawn(forwarder.run(demand, shutdown)))
}

struct Forwarder {
    config: UpstreamConfig,
    target: Target,
    intake: Intake,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    wanted: Wanted,
    /// The current session got its stream: the backoff starts over after it.
    established: bool,
    /// The name limit was logged (once).
    told: bool,
}

impl Forwarder {
    async fn run(mut self, mut demand: broadcast::Receiver<String>, shutdown: Shutdown) {
        let mut backoff = BACKOFF_FIRST;
        loop {
            self.established = false;
            let error = match self.session(&mut demand, &shutdown).await {
                Ok(()) => return,
                Err(err) => err,
            };
            if self.established {
                backoff = BACKOFF_FIRST;
            }
            let reason = format!("{}: {error:#}", self.config.address);
            tracing::warn!(upstream = %self.config.address, error = %format!("{error:#}"), retry_in = ?backoff, "upstream certwire unreachable; what it sent stays served");
            self.health.not_ready(COMPONENT, reason);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream, from connecting to its end. `Ok` only on shutdown.
    async fn session(&mut self, demand: &mut broadcast::Receiver<String>, shutdown: &Shutdown) -> anyhow::Result<()> {
        let channel = connect::channel(&self.config, &self.target).await?;
        let mut client =
            SecretDiscoveryServiceClient::new(channel).max_decoding_message_size(self.config.max_response_bytes());
        let (tx, rx) = mpsc::channel(16);
        // Names asked while no stream was open.
        for name in self.intake.store().wanted_unserved() {
            self.want(&name);
        }
        let first = DeltaDiscoveryRequest {
            node: Some(self.node()),
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: self.wanted.names().cloned().collect(),
            ..Default::default()
        };
        tx.send(first).await.context("sending the first request")?;
        let mut responses =
            client.delta_secrets(ReceiverStream::new(rx)).await.context("opening the Delta SDS stream")?.into_inner();
        self.established = true;
        self.health.ready(COMPONENT);
        tracing::info!(upstream = %self.config.address, names = self.wanted.len(), "following the upstream certwire");
        let sweep_every = (self.config.forget_after() / 4).max(Duration::from_secs(1));
        let mut sweep = tokio::time::interval_at(tokio::time::Instant::now() + sweep_every, sweep_every);
        loop {
            let request = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                name = demand.recv() => match name {
                    Ok(name) => self.want(&name).then(|| subscribe(vec![name])),
                    Err(RecvError::Lagged(_)) => {
                        let new: Vec<String> =
                            self.intake.store().wanted_unserved().into_iter().filter(|n| self.want(n)).collect();
                        (!new.is_empty()).then(|| subscribe(new))
                    }
                    Err(RecvError::Closed) => return Ok(()),
                },
                _ = sweep.tick() => self.sweep(),
                response = responses.message() => match response.context("upstream stream")? {
                    Some(response) => Some(self.apply(response)),
                    None => anyhow::bail!("the upstream ended the stream"),
                },
            };
            if let Some(request) = request {
                tx.send(request).await.context("the upstream stream is gone")?;
            }
        }
    }

    /// Follows `name` upstream; true when it is new.
    fn want(&mut self, name: &str) -> bool {
        match self.wanted.want(name) {
            Want::Added => true,
            Want::Known => false,
            Want::Refused => {
                self.metrics.limits_hit.get_or_create(&LimitLabel { limit: "upstream_max_names" }).inc();
                if !std::mem::replace(&mut self.told, true) {
                    tracing::warn!(
                        max_names = self.config.max_names(),
                        secret = name,
                        "the forwarder follows its maximum number of names upstream; further names are not asked (counted in certwire_limits_hit_total{{limit=\"upstream_max_names\"}}; logged once)"
                    );
                }
                false
            }
        }
    }

    /// Stops following the names nobody asked for since `forget_after`.
    fn sweep(&mut self) -> Option<DeltaDiscoveryRequest> {
        let store = self.intake.store().clone();
        let forgotten = self.wanted.sweep(tokio::time::Instant::now(), |n| store.subscribers(n));
        if forgotten.is_empty() {
            return None;
        }
        for name in &forgotten {
            self.intake.remove(name);
            store.purge(name);
        }
        tracing::info!(
            forgotten = forgotten.len(),
            names = self.wanted.len(),
            "stopped following names nobody asks for"
        );
        Some(DeltaDiscoveryRequest { resource_names_unsubscribe: forgotten, ..Default::default() })
    }

    /// Checks and stores what a response carries, and says ACK, or NACK with why.
    fn apply(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let mut errors = Vec::new();
        let wanted: std::collections::HashSet<&String> = self.wanted.names().collect();
        for mut resource in response.resources {
            let name = std::mem::take(&mut resource.name);
            let Some(mut any) = resource.resource.take() else {
                errors.push(format!("{name}: no resource"));
                continue;
            };
            if !wanted.contains(&name) {
                zeroize::Zeroize::zeroize(&mut any.value);
                errors.push(format!("{name}: not asked for"));
                continue;
            }
            if any.type_url != SECRET_TYPE_URL {
                zeroize::Zeroize::zeroize(&mut any.value);
                errors.push(format!("{name}: type {:?} is not a Secret", any.type_url));
                continue;
            }
            let result = match decode::material(&name, &mut any.value) {
                Ok(material) => self
                    .intake
                    .update(name.as_str(), &material, std::time::Instant::now())
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(err) => {
                    self.intake.reject(name.as_str(), "bad_upstream_secret", &err);
                    Err(err.to_string())
                }
            };
            if let Err(err) = result {
                errors.push(format!("{name}: {err}"));
            }
        }
        for name in &response.removed_resources {
            self.intake.remove(name);
        }
        DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: response.nonce,
            error_detail: (!errors.is_empty()).then(|| RpcStatus {
                code: INVALID_ARGUMENT,
                message: errors.join("; "),
                details: Vec::new(),
            }),
            ..Default::default()
        }
    }

    fn node(&self) -> Node {
        let host =
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
        Node {
            id: self.config.node_id.clone().unwrap_or(host),
            cluster: self.config.node_cluster.clone().unwrap_or_else(|| "certwire-forwarder".into()),
            user_agent_name: "certwire".into(),
            ..Default::default()
        }
    }
}

fn subscribe(names: Vec<String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest { resource_names_subscribe: names, ..Default::default() }
}
