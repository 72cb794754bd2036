//! The other gateway replicas' scalers. Agents route each pool to one replica, so a replica
//! holds only some pools, and a model's servers may sit on several. KEDA's call lands on any
//! replica (behind the gateway's Service); with `peers`, that replica asks every replica for
//! its live servers of the selection and answers for all of them. A server reported to two
//! replicas (its pool just moved) counts once, by its freshest report.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use genai_collector_core::config::duration;
use genai_collector_core::ValidationError;
use serde::Deserialize;
use tonic::transport::{Channel, Endpoint};

use super::proto::{PeerRequest, View};

/// The gRPC service and method a replica answers its peers on, with its own servers only.
pub const PEER_SERVICE: &str = "genai_collector.KedaScalerPeers";
pub const PEER_PATH: &str = "/genai_collector.KedaScalerPeers/View";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeersConfig {
    /// Every replica's `keda_scaler` endpoint (`host:port`), this one's included.
    #[serde(default, rename = "static")]
    pub static_list: Vec<String>,
    /// A name with one address per replica: the gateway's headless Service.
    pub dns: Option<PeersDns>,
    /// A replica that does not answer within this is left out of the answer.
    #[serde(default = "two_seconds", with = "duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeersDns {
    pub hostname: String,
    #[serde(default = "scaler_port")]
    pub port: u16,
}

fn two_seconds() -> Duration {
    Duration::from_secs(2)
}

fn scaler_port() -> u16 {
    6000
}

impl PeersConfig {
    pub fn validate(&self) -> Result<(), ValidationError> {
        match (&self.static_list[..], &self.dns) {
            ([], Some(d)) if !d.hostname.is_empty() => {}
            ([_, ..], None) => {}
            _ => {
                return Err(ValidationError::field(
                    "peers",
                    "one of `static: [host:port, ...]` and `dns: {hostname: ...}`",
                ))
            }
        }
        if self.timeout.is_zero() {
            return Err(ValidationError::field(
                "peers.timeout",
                "must be more than 0s",
            ));
        }
        Ok(())
    }
}

pub struct Peers {
    config: PeersConfig,
    token: Option<String>,
    /// One connection per replica address, kept while the address stays among the peers.
    channels: Mutex<HashMap<String, Channel>>,
}

impl Peers {
    pub fn new(config: PeersConfig, token: Option<String>) -> Self {
        Self {
            config,
            token,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The replicas now: the static list, or what the name resolves to.
    async fn addresses(&self) -> Vec<String> {
        let Some(d) = &self.config.dns else {
            return self.config.static_list.clone();
        };
        match tokio::net::lookup_host((d.hostname.as_str(), d.port)).await {
            Ok(addrs) => addrs.map(|a| a.to_string()).collect(),
            Err(e) => {
                tracing::warn!(hostname = %d.hostname, error = %e, "keda_scaler: cannot resolve the peers");
                Vec::new()
            }
        }
    }

    fn channel(&self, address: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().map_err(|_| "poisoned".to_owned())?;
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(self.config.timeout)
            .connect_lazy();
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    async fn ask(&self, address: &str, request: PeerRequest) -> Result<View, String> {
        let mut grpc = tonic::client::Grpc::new(self.channel(address)?);
        grpc.ready().await.map_err(|e| e.to_string())?;
        let mut request = tonic::Request::new(request);
        if let Some(t) = &self.token {
            let value = format!("Bearer {t}").parse().map_err(|_| "bad token")?;
            request.metadata_mut().insert("authorization", value);
        }
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(PEER_PATH);
        grpc.unary(request, path, tonic_prost::ProstCodec::default())
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    }

    /// Every replica's view of the selection; a replica that does not answer is left out.
    pub async fn views(&self, by: &(&'static str, String)) -> Vec<View> {
        let addresses = self.addresses().await;
        // Replicas come and go with their pods' addresses: the connections of gone ones too.
        if let Ok(mut channels) = self.channels.lock() {
            channels.retain(|a, _| addresses.contains(a));
        }
        let asks = addresses.iter().map(|a| {
            let request = PeerRequest {
                kind: by.0.to_owned(),
                name: by.1.clone(),
            };
            tokio::time::timeout(self.config.timeout, self.ask(a, request))
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut views = Vec::with_capacity(answers.len());
        for (address, answer) in addresses.iter().zip(answers) {
            match answer {
                Ok(Ok(v)) => views.push(v),
                Ok(Err(e)) => {
                    tracing::debug!(peer = %address, error = %e, "keda_scaler: a peer did not answer")
                }
                Err(_) => tracing::debug!(peer = %address, "keda_scaler: a peer timed out"),
            }
        }
        views
    }
}

/// One view of several: each server once, by its freshest report; the selection's latest
/// report and latest activity.
pub fn merge(views: impl IntoIterator<Item = View>) -> View {
    let mut servers: HashMap<String, super::proto::ViewServer> = HashMap::new();
    let mut out = View::default();
    let min = |a: Option<i64>, b: Option<i64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    for v in views {
        out.reported_age_ms = min(out.reported_age_ms, v.reported_age_ms);
        out.busy_age_ms = min(out.busy_age_ms, v.busy_age_ms);
        for s in v.servers {
            match servers.get(&s.id) {
                Some(kept) if kept.age_ms <= s.age_ms => {}
                _ => {
                    servers.insert(s.id.clone(), s);
                }
            }
        }
    }
    out.servers = servers.into_values().collect();
    out
}

#[cfg(test)]
mod tests {
    use super::super::proto::ViewServer;
    use super::*;

    fn server(id: &str, age_ms: i64, waiting: f64) -> ViewServer {
        ViewServer {
            id: id.into(),
            age_ms,
            waiting,
            ..Default::default()
        }
    }

    #[test]
    fn a_server_on_two_replicas_counts_once_by_its_freshest_report() {
        let a = View {
            servers: vec![server("s1", 9_000, 5.0), server("s2", 100, 1.0)],
            reported_age_ms: Some(100),
            busy_age_ms: Some(100),
        };
        let b = View {
            servers: vec![server("s1", 200, 7.0)],
            reported_age_ms: Some(200),
            busy_age_ms: None,
        };
        let m = merge([a, b, View::default()]);
        let mut got: Vec<(String, f64)> = m
            .servers
            .iter()
            .map(|s| (s.id.clone(), s.waiting))
            .collect();
        got.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(got, vec![("s1".into(), 7.0), ("s2".into(), 1.0)]);
        assert_eq!((m.reported_age_ms, m.busy_age_ms), (Some(100), Some(100)));
        assert_eq!(merge([]).reported_age_ms, None);
    }

    #[tokio::test]
    async fn a_replica_no_longer_among_the_peers_has_its_connection_dropped() {
        let config: PeersConfig =
            serde_saphyr::from_str("static: [\"127.0.0.1:9\"]\ntimeout: 200ms").unwrap();
        let peers = Peers::new(config, None);
        // A replica that was there before (its pod since replaced).
        peers.channel("127.0.0.1:8").unwrap();
        peers.views(&("pool", "chat".into())).await;
        let mut kept: Vec<String> = peers.channels.lock().unwrap().keys().cloned().collect();
        kept.sort();
        assert_eq!(kept, vec!["127.0.0.1:9".to_owned()]);
    }

    #[test]
    fn peers_are_a_list_or_a_name() {
        let c: PeersConfig = serde_saphyr::from_str("static: [\"a:6000\"]").unwrap();
        c.validate().unwrap();
        let c: PeersConfig = serde_saphyr::from_str("dns: { hostname: gw-headless }").unwrap();
        c.validate().unwrap();
        assert_eq!(c.dns.unwrap().port, 6000);
        let c: PeersConfig = serde_saphyr::from_str("static: []").unwrap();
        assert!(c.validate().is_err());
    }
}
