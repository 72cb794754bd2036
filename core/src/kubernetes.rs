//! The Kubernetes API client: from a kubeconfig file, else in-cluster or `KUBECONFIG`.

use std::path::Path;

/// A client for `kubeconfig`, or the one the environment gives (in-cluster, `KUBECONFIG`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, String> {
    let cfg = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes configuration (in-cluster or kubeconfig): {e}"))?,
    };
    kube::Client::try_from(cfg).map_err(|e| format!("Kubernetes client: {e}"))
}
