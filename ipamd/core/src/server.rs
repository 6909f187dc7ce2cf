//! The gRPC face of ipamd on its Unix socket (mode 0660): upstream's `CNIBackend`, our
//! `CNIGarbageCollector`, and the standard health service under upstream's name. Any
//! ClientVersion is accepted: the wire fields are what matter.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};
use vpc_cni_proto::health::health_check_response::ServingStatus;
use vpc_cni_proto::health::health_server::{Health, HealthServer};
use vpc_cni_proto::health::{HealthCheckRequest, HealthCheckResponse};
use vpc_cni_proto::rpc::cni_backend_server::{CniBackend, CniBackendServer};
use vpc_cni_proto::rpc::cni_garbage_collector_server::{
    CniGarbageCollector, CniGarbageCollectorServer,
};
use vpc_cni_proto::rpc::*;

use crate::datastore::{Assignment, PodRef, SandboxKey};
use crate::node::{AddOutcome, Node};
use crate::node6::{AddOutcome6, Node6};
use crate::prefix6::Assignment6;

/// The node behind the socket: an IPv4 node, or an IPv6 one (ENABLE_IPv6).
#[derive(Clone)]
pub enum Engine {
    V4(Arc<Node>),
    V6(Arc<Node6>),
}

impl From<Arc<Node>> for Engine {
    fn from(n: Arc<Node>) -> Self {
        Engine::V4(n)
    }
}

impl From<Arc<Node6>> for Engine {
    fn from(n: Arc<Node6>) -> Self {
        Engine::V6(n)
    }
}

impl Engine {
    fn metrics(&self) -> &crate::metrics::Metrics {
        match self {
            Engine::V4(n) => &n.metrics,
            Engine::V6(n) => &n.metrics,
        }
    }

    fn health(&self) -> Result<(), String> {
        match self {
            Engine::V4(n) => n.health(),
            Engine::V6(n) => n.health(),
        }
    }
}

#[derive(Clone)]
pub struct Service {
    pub engine: Engine,
}

fn metadata(a: &Assignment) -> IpAllocationMetadata {
    IpAllocationMetadata {
        i_pv4_addr: a.ip.to_string(),
        i_pv6_addr: String::new(),
        device_number: a.device_number as i32,
        route_table_id: a.device_number as i32 + 1,
    }
}

/// As upstream answers in IPv6 mode: the primary ENI's device 0, its table 1.
fn metadata6(a: &Assignment6) -> IpAllocationMetadata {
    IpAllocationMetadata {
        i_pv4_addr: String::new(),
        i_pv6_addr: a.ip.to_string(),
        device_number: 0,
        route_table_id: 1,
    }
}

/// The sandbox key of a request, refusing empty parts.
pub fn sandbox_key(network: &str, container: &str, if_name: &str) -> Result<SandboxKey, Status> {
    for (name, v) in [
        ("NetworkName", network),
        ("ContainerID", container),
        ("IfName", if_name),
    ] {
        if v.is_empty() {
            return Err(Status::invalid_argument(format!("{name} is empty")));
        }
    }
    Ok(SandboxKey {
        network: network.to_string(),
        container_id: container.to_string(),
        if_name: if_name.to_string(),
    })
}

#[tonic::async_trait]
impl CniBackend for Service {
    async fn add_network(
        &self,
        req: Request<AddNetworkRequest>,
    ) -> Result<Response<AddNetworkReply>, Status> {
        let r = req.into_inner();
        let k = sandbox_key(&r.network_name, &r.container_id, &r.if_name)?;
        let pod = PodRef {
            namespace: r.k8s_pod_namespace.clone(),
            name: r.k8s_pod_name.clone(),
        };
        let node = match &self.engine {
            Engine::V4(n) => n,
            Engine::V6(n) => return add_network6(n, &r, k, pod).await,
        };
        let t0 = std::time::Instant::now();
        node.metrics.add_ip_req.fetch_add(1, Ordering::Relaxed);
        let outcome = node.add(k, pod).await;
        // Read after the add: one that waited for IMDS at start-up has the VPC's CIDRs
        // only now (read before, its pod's reply had none).
        let mut reply = AddNetworkReply {
            use_external_snat: node.cfg.external_snat,
            vp_cv4_cid_rs: node.vpc_cidrs().iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        match outcome {
            Ok(AddOutcome::Assigned(a)) => {
                info!(pod = %format!("{}/{}", r.k8s_pod_namespace, r.k8s_pod_name), ip = %a.ip, device = a.device_number, "AddNetwork");
                reply.success = true;
                reply.ip_allocation_metadata = vec![metadata(&a)];
                node.metrics.add_latency.observe(t0.elapsed());
            }
            Ok(AddOutcome::NoAddress) => {
                node.metrics.no_available_ip.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "AddNetwork {}/{}: no address within {:?}",
                    r.k8s_pod_namespace, r.k8s_pod_name, node.cfg.add_wait
                );
            }
            Err(e) => {
                node.metrics.error("addNetworkCheckpointFailed");
                return Err(Status::unavailable(format!("checkpoint write failed: {e}")));
            }
        }
        Ok(Response::new(reply))
    }

    async fn del_network(
        &self,
        req: Request<DelNetworkRequest>,
    ) -> Result<Response<DelNetworkReply>, Status> {
        let r = req.into_inner();
        let k = sandbox_key(&r.network_name, &r.container_id, &r.if_name)?;
        let pod = PodRef {
            namespace: r.k8s_pod_namespace.clone(),
            name: r.k8s_pod_name.clone(),
        };
        self.engine.metrics().del_request(if r.reason.is_empty() {
            "PodDeleted"
        } else {
            &r.reason
        });
        let failed = |e: std::io::Error| {
            self.engine.metrics().error("delNetworkCheckpointFailed");
            Status::unavailable(format!("checkpoint write failed: {e}"))
        };
        let node = match &self.engine {
            Engine::V4(n) => n,
            Engine::V6(n) => {
                let released = n.del(k).await.map_err(failed)?;
                if let Some(a) = &released {
                    info!(pod = %format!("{}/{}", r.k8s_pod_namespace, r.k8s_pod_name), ip = %a.ip, reason = %r.reason, "DelNetwork");
                }
                return Ok(Response::new(DelNetworkReply {
                    success: true,
                    ip_allocation_metadata: released.iter().map(metadata6).collect(),
                    ..Default::default()
                }));
            }
        };
        let released = node.del(k, &pod).await.map_err(failed)?;
        if let Some(a) = &released {
            info!(pod = %format!("{}/{}", r.k8s_pod_namespace, r.k8s_pod_name), ip = %a.ip, reason = %r.reason, "DelNetwork");
        }
        Ok(Response::new(DelNetworkReply {
            success: true,
            ip_allocation_metadata: released.iter().map(metadata).collect(),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl CniGarbageCollector for Service {
    async fn garbage_collect(
        &self,
        req: Request<GarbageCollectRequest>,
    ) -> Result<Response<GarbageCollectReply>, Status> {
        let r = req.into_inner();
        if r.network_name.is_empty() {
            return Err(Status::invalid_argument("NetworkName is empty"));
        }
        let valid: BTreeSet<(String, String)> = r
            .valid_attachments
            .iter()
            .map(|a| (a.container_id.clone(), a.if_name.clone()))
            .collect();
        let failed =
            |e: std::io::Error| Status::unavailable(format!("checkpoint write failed: {e}"));
        let released: Vec<ReleasedAttachment> = match &self.engine {
            Engine::V4(n) => n
                .garbage_collect(&r.network_name, &valid)
                .await
                .map_err(failed)?
                .iter()
                .map(|a| ReleasedAttachment {
                    container_id: a.key.container_id.clone(),
                    if_name: a.key.if_name.clone(),
                    ip_allocation_metadata: Some(metadata(a)),
                })
                .collect(),
            Engine::V6(n) => n
                .garbage_collect(&r.network_name, &valid)
                .await
                .map_err(failed)?
                .iter()
                .map(|a| ReleasedAttachment {
                    container_id: a.key.container_id.clone(),
                    if_name: a.key.if_name.clone(),
                    ip_allocation_metadata: Some(metadata6(a)),
                })
                .collect(),
        };
        info!(released = released.len(), "GC of {}", r.network_name);
        Ok(Response::new(GarbageCollectReply {
            success: true,
            released,
        }))
    }
}

/// AddNetwork on an IPv6 node: the /128, the VPC's IPv6 blocks, no SNAT (as upstream).
async fn add_network6(
    node: &Node6,
    r: &AddNetworkRequest,
    k: SandboxKey,
    pod: PodRef,
) -> Result<Response<AddNetworkReply>, Status> {
    let t0 = std::time::Instant::now();
    node.metrics.add_ip_req.fetch_add(1, Ordering::Relaxed);
    let outcome = node.add(k, pod).await;
    // Read after the add, which may have waited for IMDS at start-up.
    let mut reply = AddNetworkReply {
        vp_cv6_cid_rs: node.vpc_cidrs().iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    };
    match outcome {
        Ok(AddOutcome6::Assigned(a)) => {
            info!(pod = %format!("{}/{}", r.k8s_pod_namespace, r.k8s_pod_name), ip = %a.ip, "AddNetwork");
            reply.success = true;
            reply.ip_allocation_metadata = vec![metadata6(&a)];
            node.metrics.add_latency.observe(t0.elapsed());
        }
        Ok(AddOutcome6::NoAddress) => {
            node.metrics.no_available_ip.fetch_add(1, Ordering::Relaxed);
            warn!(
                "AddNetwork {}/{}: no IPv6 address within {:?} (no prefix yet: {})",
                r.k8s_pod_namespace,
                r.k8s_pod_name,
                node.cfg.add_wait,
                node.view()
                    .prefix_fault
                    .unwrap_or_else(|| "the prefix is full".into())
            );
        }
        Err(e) => {
            node.metrics.error("addNetworkCheckpointFailed");
            return Err(Status::unavailable(format!("checkpoint write failed: {e}")));
        }
    }
    Ok(Response::new(reply))
}

type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for Service {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let svc = req.into_inner().service;
        if !svc.is_empty() && svc != vpc_cni_proto::HEALTH_SERVICE {
            return Err(Status::not_found(format!("unknown service {svc:?}")));
        }
        // SERVING whenever the API can be served: a full node is healthy (liveness and
        // readiness probes ask this; a full pool must not restart aws-node).
        let status = match self.engine.health() {
            Ok(()) => ServingStatus::Serving,
            Err(why) => {
                debug!("health: NOT_SERVING: {why}");
                ServingStatus::NotServing
            }
        };
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, _: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        Err(Status::unimplemented("use Check"))
    }
}

/// Removes a socket left by an earlier run, so the path can be bound again; refuses to
/// remove anything else (a regular file, a directory, a FIFO): that is someone's data.
pub fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket: not removing it to listen there",
                path.display()
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Binds the socket (replacing a stale one), sets mode 0660, and serves until `shutdown`.
pub async fn serve_unix(
    engine: impl Into<Engine>,
    path: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    info!("serving CNIBackend on {}", path.display());
    let svc = Service {
        engine: engine.into(),
    };
    tonic::transport::Server::builder()
        .add_service(CniBackendServer::new(svc.clone()))
        .add_service(CniGarbageCollectorServer::new(svc.clone()))
        .add_service(HealthServer::new(svc))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(std::io::Error::other)
}
