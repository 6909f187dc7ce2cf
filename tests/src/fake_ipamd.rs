//! A small ipamd for plugin tests and benchmarks: the real `CNIBackend`, health and GC
//! services over a real Unix socket, answering from a fixed list of addresses at once.
//! It records every request so tests can see what the plugin asked for. Its addresses
//! may be IPv6 (an ENABLE_IPv6 node's /128s): then it answers as ipamd does in IPv6 mode.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use vpc_cni_proto::health::health_check_response::ServingStatus;
use vpc_cni_proto::health::health_server::{Health, HealthServer};
use vpc_cni_proto::health::{HealthCheckRequest, HealthCheckResponse};
use vpc_cni_proto::rpc::cni_backend_server::{CniBackend, CniBackendServer};
use vpc_cni_proto::rpc::cni_garbage_collector_server::{
    CniGarbageCollector, CniGarbageCollectorServer,
};
use vpc_cni_proto::rpc::*;

/// Assignment key, as ipamd keys it: (network name, container ID, interface name).
pub type Key = (String, String, String);

#[derive(Debug, Clone)]
pub enum Call {
    Add(AddNetworkRequest),
    Del(DelNetworkRequest),
    Gc(GarbageCollectRequest),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Answer AddNetwork with Success=false, as ipamd does with an empty pool.
    NoAddress,
    /// Answer AddNetwork with this string as the address.
    BadAddress(String),
}

pub struct State {
    /// Free addresses with the device number of the ENI that holds them.
    pub free: VecDeque<(IpAddr, i32)>,
    pub assigned: HashMap<Key, (IpAddr, i32)>,
    pub calls: Vec<Call>,
    pub mode: Mode,
    pub health: ServingStatus,
    pub record: bool,
}

#[derive(Clone)]
struct Svc(Arc<Mutex<State>>);

fn meta(ip: IpAddr, dev: i32) -> IpAllocationMetadata {
    match ip {
        IpAddr::V4(ip) => IpAllocationMetadata {
            i_pv4_addr: ip.to_string(),
            i_pv6_addr: String::new(),
            device_number: dev,
            route_table_id: if dev > 0 { dev + 1 } else { 0 },
        },
        // As ipamd answers in IPv6 mode: the primary ENI, table 1.
        IpAddr::V6(ip) => IpAllocationMetadata {
            i_pv4_addr: String::new(),
            i_pv6_addr: ip.to_string(),
            device_number: 0,
            route_table_id: 1,
        },
    }
}

#[tonic::async_trait]
impl CniBackend for Svc {
    async fn add_network(
        &self,
        req: Request<AddNetworkRequest>,
    ) -> Result<Response<AddNetworkReply>, Status> {
        let req = req.into_inner();
        let mut s = self.0.lock().unwrap();
        if s.record {
            s.calls.push(Call::Add(req.clone()));
        }
        let key = (
            req.network_name.clone(),
            req.container_id.clone(),
            req.if_name.clone(),
        );
        let mut reply = AddNetworkReply {
            vp_cv4_cid_rs: vec!["10.0.0.0/16".into()],
            ..Default::default()
        };
        match s.mode.clone() {
            Mode::NoAddress => return Ok(Response::new(reply)),
            Mode::BadAddress(a) => {
                reply.success = true;
                reply.ip_allocation_metadata = vec![IpAllocationMetadata {
                    i_pv4_addr: a,
                    ..Default::default()
                }];
                s.assigned.insert(key, (Ipv4Addr::UNSPECIFIED.into(), 0));
                return Ok(Response::new(reply));
            }
            Mode::Normal => {}
        }
        let got = match s.assigned.get(&key) {
            Some(a) => Some(*a),
            None => s.free.pop_front(),
        };
        if let Some((ip, dev)) = got {
            s.assigned.insert(key, (ip, dev));
            reply.success = true;
            reply.ip_allocation_metadata = vec![meta(ip, dev)];
        }
        Ok(Response::new(reply))
    }

    async fn del_network(
        &self,
        req: Request<DelNetworkRequest>,
    ) -> Result<Response<DelNetworkReply>, Status> {
        let req = req.into_inner();
        let mut s = self.0.lock().unwrap();
        if s.record {
            s.calls.push(Call::Del(req.clone()));
        }
        let key = (
            req.network_name.clone(),
            req.container_id.clone(),
            req.if_name.clone(),
        );
        let mut reply = DelNetworkReply {
            success: true,
            ..Default::default()
        };
        if let Some((ip, dev)) = s.assigned.remove(&key)
            && !ip.is_unspecified()
        {
            s.free.push_back((ip, dev));
            reply.ip_allocation_metadata = vec![meta(ip, dev)];
        }
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl CniGarbageCollector for Svc {
    async fn garbage_collect(
        &self,
        req: Request<GarbageCollectRequest>,
    ) -> Result<Response<GarbageCollectReply>, Status> {
        let req = req.into_inner();
        let mut s = self.0.lock().unwrap();
        s.calls.push(Call::Gc(req.clone()));
        let valid: Vec<(String, String)> = req
            .valid_attachments
            .iter()
            .map(|a| (a.container_id.clone(), a.if_name.clone()))
            .collect();
        let stale: Vec<Key> = s
            .assigned
            .keys()
            .filter(|(net, cid, ifn)| {
                *net == req.network_name && !valid.contains(&(cid.clone(), ifn.clone()))
            })
            .cloned()
            .collect();
        let mut reply = GarbageCollectReply {
            success: true,
            ..Default::default()
        };
        for k in stale {
            if let Some((ip, dev)) = s.assigned.remove(&k) {
                s.free.push_back((ip, dev));
                reply.released.push(ReleasedAttachment {
                    container_id: k.1.clone(),
                    if_name: k.2.clone(),
                    ip_allocation_metadata: Some(meta(ip, dev)),
                });
            }
        }
        Ok(Response::new(reply))
    }
}

type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for Svc {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let s = self.0.lock().unwrap();
        if req.get_ref().service != vpc_cni_proto::HEALTH_SERVICE
            && !req.get_ref().service.is_empty()
        {
            return Err(Status::not_found("unknown service"));
        }
        Ok(Response::new(HealthCheckResponse {
            status: s.health as i32,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, _: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        Err(Status::unimplemented("watch is not needed by the plugin"))
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct FakeIpamd {
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub state: Arc<Mutex<State>>,
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeIpamd {
    /// Serves `pool` (address, ENI device number) on a fresh socket.
    pub fn start<A: Into<IpAddr>>(pool: Vec<(A, i32)>) -> FakeIpamd {
        let dir = std::env::temp_dir().join(format!(
            "aws-cni-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("socket dir");
        let socket = dir.join("ipamd.sock");
        let state = Arc::new(Mutex::new(State {
            free: pool.into_iter().map(|(a, d)| (a.into(), d)).collect(),
            assigned: HashMap::new(),
            calls: Vec::new(),
            mode: Mode::Normal,
            health: ServingStatus::Serving,
            record: true,
        }));
        let mut me = FakeIpamd {
            socket,
            dir,
            state,
            rt: None,
            stop: None,
        };
        me.serve();
        me
    }

    fn serve(&mut self) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let _ = std::fs::remove_file(&self.socket);
        let listener = {
            let _g = rt.enter();
            UnixListener::bind(&self.socket).expect("bind ipamd socket")
        };
        let (tx, rx) = oneshot::channel::<()>();
        let svc = Svc(self.state.clone());
        rt.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(CniBackendServer::new(svc.clone()))
                .add_service(CniGarbageCollectorServer::new(svc.clone()))
                .add_service(HealthServer::new(svc))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = rx.await;
                })
                .await;
        });
        self.rt = Some(rt);
        self.stop = Some(tx);
    }

    /// Stops answering and removes the socket: "ipamd is down".
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts answering again on the same socket with the same state.
    pub fn restart(&mut self) {
        self.stop();
        self.serve();
    }

    pub fn socket_str(&self) -> String {
        self.socket.display().to_string()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn set_mode(&self, m: Mode) {
        self.state.lock().unwrap().mode = m;
    }

    pub fn set_health(&self, h: ServingStatus) {
        self.state.lock().unwrap().health = h;
    }

    pub fn assigned_count(&self) -> usize {
        self.state.lock().unwrap().assigned.len()
    }
}

impl Drop for FakeIpamd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
