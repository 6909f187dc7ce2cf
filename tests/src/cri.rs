//! A small CRI client driving containerd the way kubelet drives a pod's sandbox:
//! RunPodSandbox, PodSandboxStatus, StopPodSandbox, RemovePodSandbox.

use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("runtime.v1");
}

use pb::runtime_service_client::RuntimeServiceClient;

#[derive(Clone)]
pub struct Cri {
    client: RuntimeServiceClient<Channel>,
}

/// A pod as kubelet names it.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// A hostNetwork pod: no CNI call at all.
    pub host_network: bool,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str) -> PodSpec {
        PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{namespace}-{name}"),
            host_network: false,
        }
    }
}

impl Cri {
    pub async fn connect(socket: &Path) -> Result<Cri, String> {
        let path = socket.to_path_buf();
        let channel = Endpoint::from_static("http://containerd.sock")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await
            .map_err(|e| format!("containerd at {}: {e}", socket.display()))?;
        Ok(Cri {
            client: RuntimeServiceClient::new(channel),
        })
    }

    pub async fn version(&self) -> Result<pb::VersionResponse, tonic::Status> {
        let mut c = self.client.clone();
        Ok(c.version(pb::VersionRequest {
            version: "v1".into(),
        })
        .await?
        .into_inner())
    }

    /// RunPodSandbox as kubelet sends it for a pod on the pod network. Returns the id.
    pub async fn run(&self, pod: &PodSpec) -> Result<String, tonic::Status> {
        let mut c = self.client.clone();
        let config = pb::PodSandboxConfig {
            metadata: Some(pb::PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            // kubelet leaves the hostname to the node for hostNetwork pods.
            hostname: if pod.host_network {
                String::new()
            } else {
                pod.name.clone()
            },
            log_directory: String::new(),
            dns_config: None,
            labels: [
                ("io.kubernetes.pod.name".to_string(), pod.name.clone()),
                (
                    "io.kubernetes.pod.namespace".to_string(),
                    pod.namespace.clone(),
                ),
            ]
            .into(),
            annotations: Default::default(),
            linux: Some(pb::LinuxPodSandboxConfig {
                cgroup_parent: String::new(),
                security_context: Some(pb::LinuxSandboxSecurityContext {
                    namespace_options: Some(pb::NamespaceOption {
                        network: if pod.host_network {
                            pb::NamespaceMode::Node
                        } else {
                            pb::NamespaceMode::Pod
                        } as i32,
                        pid: pb::NamespaceMode::Pod as i32,
                        ipc: pb::NamespaceMode::Pod as i32,
                    }),
                    privileged: false,
                }),
            }),
        };
        Ok(c.run_pod_sandbox(pb::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id)
    }

    /// The sandbox's IP as the runtime reports it (from the CNI result).
    pub async fn ip(&self, id: &str) -> Result<String, tonic::Status> {
        let mut c = self.client.clone();
        let s = c
            .pod_sandbox_status(pb::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .await?
            .into_inner();
        Ok(s.status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default())
    }

    pub async fn stop(&self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        c.stop_pod_sandbox(pb::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        })
        .await?;
        Ok(())
    }

    pub async fn remove(&self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        c.remove_pod_sandbox(pb::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        })
        .await?;
        Ok(())
    }
}
