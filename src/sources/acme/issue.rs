//! One issuance: an order slot, the account, the order with its challenges (published
//! answers withdrawn whatever happens), then the new certificate checked, served and
//! stored.

use std::time::Instant;

use super::config::CertificateConfig;
use super::order::{self, Issued, OrderError, Step, fail};
use super::renew::TaskContext;
use super::schedule::rfc3339;
use super::serving::{self, ServingCert};
use super::state_dir::Stored;

/// Why an issuance did not produce a certificate.
pub enum Failure {
    /// Shutdown came first.
    Cancelled,
    Order(OrderError),
}

impl From<OrderError> for Failure {
    fn from(e: OrderError) -> Self {
        Failure::Order(e)
    }
}

/// Orders a certificate for `spec` and, once issued, serves and stores it.
pub async fn issue(ctx: &TaskContext, spec: &CertificateConfig) -> Result<ServingCert, Failure> {
    let _permit = tokio::select! {
        _ = ctx.shutdown.cancelled() => return Err(Failure::Cancelled),
        permit = ctx.orders.acquire() => permit.map_err(|_| Failure::Cancelled)?,
    };
    let account = tokio::select! {
        _ = ctx.shutdown.cancelled() => return Err(Failure::Cancelled),
        account = ctx.accounts.get() => account.map_err(|e| fail(Step::Account, format!("{e:#}")))?,
    };
    let mut published = Vec::new();
    let result = tokio::select! {
        _ = ctx.shutdown.cancelled() => None,
        result = order::run(&account, spec, &ctx.solvers, &mut published) => Some(result),
    };
    ctx.solvers.withdraw(&spec.name, published).await;
    let issued = result.ok_or(Failure::Cancelled)??;
    Ok(accept(ctx, spec, issued).await?)
}

/// Checks the new certificate, serves it, stores it.
async fn accept(ctx: &TaskContext, spec: &CertificateConfig, issued: Issued) -> Result<ServingCert, OrderError> {
    let detected = Instant::now();
    let name = &spec.name;
    let current = serving::check(spec, issued.chain_pem.as_bytes(), &issued.key_pem)?;
    if !current.covers_config {
        return Err(fail(Step::Check, format!("the issued certificate does not name every domain of {name}")));
    }
    let stored = Stored {
        ca_pem: serving::issuer_chain(issued.chain_pem.as_bytes()),
        chain_pem: issued.chain_pem.into_bytes(),
        key_pem: issued.key_pem,
    };
    // Cleared before the Kubernetes store, whose failure is shown there.
    ctx.intake.clear_error(name);
    // Served first: a slow API server does not delay the new certificate.
    serving::serve(&ctx.intake, name, &stored, detected)?;
    tracing::info!(
        certificate = %name,
        serial = %current.serial,
        not_after = %rfc3339(current.validity.not_after),
        "ACME certificate issued and served"
    );
    if let Err(e) = ctx.persist.save_cert(name, &stored, &spec.domains).await {
        // Served here all the same; other replicas keep the previous one until the
        // next issuance.
        tracing::error!(
            certificate = %name,
            step = Step::Store.as_str(),
            error = format!("{e:#}"),
            "could not store the issued certificate in its Kubernetes Secret"
        );
        ctx.intake.report_error(
            name,
            format!("certificate issued and served, but not stored in Kubernetes: {}: {e:#}", Step::Store.as_str()),
        );
    }
    Ok(current)
}
