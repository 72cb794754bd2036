//! Which pod holds which GPU, from the kubelet's pod-resources API (`v1.PodResourcesLister/List`
//! on a unix socket), as device monitoring agents are meant to learn it. NVML names processes
//! by host PID, which a DaemonSet pod with `hostPID: false` cannot look up; the kubelet knows
//! which container each device plugin allocated a GPU or MIG instance to.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

/// The messages of `k8s.io/kubelet/pkg/apis/podresources/v1`, the fields this receiver reads.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodResourcesRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodResourcesResponse {
    #[prost(message, repeated, tag = "1")]
    pub pod_resources: Vec<PodResources>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodResources {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(message, repeated, tag = "3")]
    pub containers: Vec<ContainerResources>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerResources {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    pub devices: Vec<ContainerDevices>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerDevices {
    #[prost(string, tag = "1")]
    pub resource_name: String,
    #[prost(string, repeated, tag = "2")]
    pub device_ids: Vec<String>,
}

const LIST_PATH: &str = "/v1.PodResourcesLister/List";

/// Where the kubelet serves the API on every node.
pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

/// A container a device is allocated to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Holder {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// Device UUID (`GPU-...` or `MIG-...`) → the containers holding it, sorted.
pub type Allocations = HashMap<String, Vec<Holder>>;

/// The NVIDIA devices in a `List` answer. Time-slicing shares one GPU among containers under
/// replica ids `<uuid>::<n>`; they count as the GPU itself.
pub fn allocations(list: ListPodResourcesResponse) -> Allocations {
    let mut out = Allocations::new();
    for pod in list.pod_resources {
        for c in pod.containers {
            for d in c.devices {
                if !d.resource_name.starts_with("nvidia.com/") {
                    continue;
                }
                for id in d.device_ids {
                    let uuid = id.split_once("::").map_or(id.as_str(), |(u, _)| u);
                    out.entry(uuid.to_owned()).or_default().push(Holder {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        container: c.name.clone(),
                    });
                }
            }
        }
    }
    for holders in out.values_mut() {
        holders.sort();
        holders.dedup();
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum PodResourcesError {
    #[error(
        "cannot reach the kubelet's pod-resources socket {socket}: {message} (mount the host's \
         /var/lib/kubelet/pod-resources into the pod; connecting needs root)"
    )]
    Connect { socket: PathBuf, message: String },
    #[error("the kubelet's pod-resources List failed: gRPC {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
}

/// A client of the kubelet's socket; reconnects on its own after the kubelet restarts.
pub struct PodResourcesClient {
    socket: PathBuf,
    grpc: tonic::client::Grpc<Channel>,
}

impl PodResourcesClient {
    /// Connects lazily, on the first [`PodResourcesClient::list`]; needs a Tokio runtime.
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        let path = socket.to_owned();
        let channel = Endpoint::from_static("http://kubelet.pod-resources")
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }));
        Self {
            socket: socket.to_owned(),
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    pub async fn list(&mut self) -> Result<Allocations, PodResourcesError> {
        self.grpc
            .ready()
            .await
            .map_err(|e| PodResourcesError::Connect {
                socket: self.socket.clone(),
                message: genai_collector_core::component::error_chain(&e),
            })?;
        let reply = self
            .grpc
            .unary(
                tonic::Request::new(ListPodResourcesRequest {}),
                PathAndQuery::from_static(LIST_PATH),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .map_err(|s| match s.code() {
                // A connection refused or a missing socket surfaces as `Unavailable`.
                tonic::Code::Unavailable => PodResourcesError::Connect {
                    socket: self.socket.clone(),
                    message: genai_collector_core::component::error_chain(&s),
                },
                code => PodResourcesError::Status {
                    code,
                    message: s.message().to_owned(),
                },
            })?;
        Ok(allocations(reply.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, resource: &str, ids: &[&str]) -> ContainerResources {
        ContainerResources {
            name: name.into(),
            devices: vec![ContainerDevices {
                resource_name: resource.into(),
                device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            }],
        }
    }

    #[test]
    fn nvidia_devices_by_uuid_with_time_sliced_replicas_folded() {
        let list = ListPodResourcesResponse {
            pod_resources: vec![
                PodResources {
                    name: "vllm-0".into(),
                    namespace: "inference".into(),
                    containers: vec![
                        container("vllm", "nvidia.com/gpu", &["GPU-a", "GPU-b"]),
                        container("sidecar", "example.com/nic", &["GPU-c"]),
                    ],
                },
                PodResources {
                    name: "small-0".into(),
                    namespace: "dev".into(),
                    containers: vec![
                        container("a", "nvidia.com/gpu", &["GPU-c::0", "GPU-c::1"]),
                        container("mig", "nvidia.com/mig-1g.10gb", &["MIG-d"]),
                    ],
                },
                PodResources {
                    name: "small-1".into(),
                    namespace: "dev".into(),
                    containers: vec![container("a", "nvidia.com/gpu", &["GPU-c::2"])],
                },
            ],
        };
        let a = allocations(list);
        let holder = |ns: &str, pod: &str, c: &str| Holder {
            namespace: ns.into(),
            pod: pod.into(),
            container: c.into(),
        };
        assert_eq!(a["GPU-a"], vec![holder("inference", "vllm-0", "vllm")]);
        assert_eq!(a["GPU-b"], a["GPU-a"]);
        assert_eq!(
            a["GPU-c"],
            vec![holder("dev", "small-0", "a"), holder("dev", "small-1", "a")],
            "two replicas in one container count once; the NIC is not a GPU"
        );
        assert_eq!(a["MIG-d"], vec![holder("dev", "small-0", "mig")]);
        assert_eq!(a.len(), 4);
    }
}
