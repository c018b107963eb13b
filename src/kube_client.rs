//! The one way certwire reaches a Kubernetes API server, for every part that does (the
//! Secrets source, ACME's shared state, SubjectAccessReviews, certgen): the kubeconfig
//! given, else the in-cluster service account, else `KUBECONFIG` / `~/.kube/config`.

use std::path::PathBuf;

use anyhow::Context as _;
use kube::{Client, Config};

/// A client, and the namespace its credentials put it in (the pod's, or the
/// kubeconfig context's), which several defaults follow.
pub struct Connected {
    pub client: Client,
    pub default_namespace: String,
}

/// Builds the client without reaching the server: an unreachable API server shows later,
/// where it is used, not as a failure to start.
pub async fn connect(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Connected> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context("no Kubernetes credentials (in-cluster or KUBECONFIG)")?,
    };
    let default_namespace = config.default_namespace.clone();
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    Ok(Connected { client, default_namespace })
}
