//! `resolver.k8s`: the backends are the ready addresses of the gateway Service's
//! EndpointSlices, watched through the Kubernetes API, so a gateway pod that stops being ready
//! leaves at once rather than at the next DNS re-resolution. The agent's ServiceAccount needs
//! list and watch on `endpointslices` (`discovery.k8s.io`) in the Service's namespace.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use genai_collector_core::component::error_chain;
use genai_collector_core::CancellationToken;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;

use super::{K8sResolver, Shared};

/// The addresses of a slice's endpoints that are not known to be unready.
fn ready_addresses(slice: &EndpointSlice) -> Vec<String> {
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect()
}

/// Every address on every port, as the backends' URLs.
fn urls(shared: &Shared, slices: &BTreeMap<String, Vec<String>>, ports: &[u16]) -> Vec<String> {
    slices
        .values()
        .flatten()
        .flat_map(|a| {
            ports.iter().map(move |p| {
                let host = if a.contains(':') {
                    format!("[{a}]")
                } else {
                    a.clone()
                };
                shared.config.url(&format!("{host}:{p}"))
            })
        })
        .collect()
}

/// Watches the Service's EndpointSlices and makes their ready addresses the backends, until
/// `stop`. Until the first list, and while the API cannot be reached, the backends stay.
pub(super) async fn watch(resolver: K8sResolver, shared: Arc<Shared>, stop: CancellationToken) {
    let id = shared.ctx_id.clone();
    let client = loop {
        match genai_collector_core::kubernetes::client(resolver.kubeconfig.as_deref()).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(exporter = %id, error = %e, "loadbalancing: cannot watch EndpointSlices; retrying in 30s");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            }
        }
    };
    let (name, namespace) = resolver
        .service
        .split_once('.')
        .unwrap_or((resolver.service.as_str(), "default"));
    let api: kube::Api<EndpointSlice> = kube::Api::namespaced(client, namespace);
    let config = watcher::Config::default().labels(&format!("kubernetes.io/service-name={name}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut slices: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut relisting: BTreeMap<String, Vec<String>> = BTreeMap::new();
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            next = events.next() => match next {
                Some(e) => e,
                None => return,
            },
        };
        let slice_name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
        let changed = match event {
            Err(e) => {
                tracing::warn!(exporter = %id, service = %resolver.service, error = %error_chain(&e), "loadbalancing: EndpointSlice watch failed; keeping the backends, retrying");
                false
            }
            Ok(Event::Init) => {
                relisting.clear();
                false
            }
            Ok(Event::InitApply(s)) => {
                relisting.insert(slice_name(&s), ready_addresses(&s));
                false
            }
            Ok(Event::InitDone) => {
                slices = std::mem::take(&mut relisting);
                true
            }
            Ok(Event::Apply(s)) => {
                let addresses = ready_addresses(&s);
                slices.insert(slice_name(&s), addresses.clone()) != Some(addresses)
            }
            Ok(Event::Delete(s)) => slices.remove(&slice_name(&s)).is_some(),
        };
        if changed {
            shared.update_or_warn(urls(&shared, &slices, &resolver.ports));
        }
    }
}
