//! The plugin's side of the gRPC contract: one connection to ipamd per invocation.

use std::time::Duration;

use tonic::transport::Channel;
use vpc_cni_proto::health::health_client::HealthClient;
use vpc_cni_proto::health::{HealthCheckRequest, health_check_response::ServingStatus};
use vpc_cni_proto::rpc::cni_backend_client::CniBackendClient;
use vpc_cni_proto::rpc::cni_garbage_collector_client::CniGarbageCollectorClient;
use vpc_cni_proto::rpc::{
    AddNetworkReply, AddNetworkRequest, DelNetworkReply, DelNetworkRequest, GarbageCollectReply,
    GarbageCollectRequest,
};

use crate::config::IpamdAddress;
use crate::error::{CniError, ErrorCode, Result};

/// Sent as ClientVersion; ipamd accepts any version whose fields it understands.
pub const CLIENT_VERSION: &str = concat!("aws-cni-rs/", env!("CARGO_PKG_VERSION"));

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// ipamd may wait up to its own bound (10 s by default) for a refill before answering.
pub const ADD_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEL_TIMEOUT: Duration = Duration::from_secs(10);
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
pub const GC_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Ipamd {
    channel: Channel,
    address: IpamdAddress,
}

/// How a call to ipamd went wrong.
#[derive(Debug)]
pub enum CallError {
    /// Could not reach it at all (no socket, refused, timed out).
    Unreachable(CniError),
    /// It answered with an error.
    Failed(CniError),
}

impl From<CallError> for CniError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Unreachable(e) | CallError::Failed(e) => e,
        }
    }
}

impl Ipamd {
    pub async fn connect(address: &IpamdAddress) -> Result<Self, CallError> {
        let unreachable = |e: &dyn std::error::Error| {
            CallError::Unreachable(
                CniError::new(
                    ErrorCode::TryAgainLater,
                    format!("ipamd is unreachable at {address}; is aws-node running on this node?"),
                )
                .with_details(vpc_cni_proto::address::describe(e)),
            )
        };
        let channel = vpc_cni_proto::address::connect(address, CONNECT_TIMEOUT)
            .await
            .map_err(|e| unreachable(&e))?;
        Ok(Ipamd {
            channel,
            address: address.clone(),
        })
    }

    fn status_error(&self, what: &str, s: tonic::Status) -> CallError {
        let err = |code| {
            CniError::new(code, format!("ipamd {what} failed: {}", s.message()))
                .with_details(format!("gRPC status {:?} from {}", s.code(), self.address))
        };
        match s.code() {
            // Unknown is what a connection that breaks mid-call becomes ("transport
            // error": ipamd died or restarted under us); ipamd never answers it itself.
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                CallError::Unreachable(err(ErrorCode::TryAgainLater))
            }
            _ => CallError::Failed(err(ErrorCode::Ipamd)),
        }
    }

    fn timed_out(&self, what: &str, after: Duration) -> CallError {
        CallError::Unreachable(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "ipamd {what} did not answer within {} s ({})",
                after.as_secs(),
                self.address
            ),
        ))
    }

    pub async fn add(&self, req: AddNetworkRequest) -> Result<AddNetworkReply, CallError> {
        let mut c = CniBackendClient::new(self.channel.clone());
        match tokio::time::timeout(ADD_TIMEOUT, c.add_network(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.status_error("AddNetwork", s)),
            Err(_) => Err(self.timed_out("AddNetwork", ADD_TIMEOUT)),
        }
    }

    pub async fn del(&self, req: DelNetworkRequest) -> Result<DelNetworkReply, CallError> {
        let mut c = CniBackendClient::new(self.channel.clone());
        match tokio::time::timeout(DEL_TIMEOUT, c.del_network(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.status_error("DelNetwork", s)),
            Err(_) => Err(self.timed_out("DelNetwork", DEL_TIMEOUT)),
        }
    }

    /// `Ok(None)` when the daemon does not implement GC (upstream aws-node).
    pub async fn garbage_collect(
        &self,
        req: GarbageCollectRequest,
    ) -> Result<Option<GarbageCollectReply>, CallError> {
        let mut c = CniGarbageCollectorClient::new(self.channel.clone());
        match tokio::time::timeout(GC_TIMEOUT, c.garbage_collect(req)).await {
            Ok(Ok(r)) => Ok(Some(r.into_inner())),
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Ok(Err(s)) => Err(self.status_error("GarbageCollect", s)),
            Err(_) => Err(self.timed_out("GarbageCollect", GC_TIMEOUT)),
        }
    }

    /// The health service's answer for ipamd: SERVING means it can hand out addresses.
    pub async fn health(&self) -> Result<ServingStatus, CallError> {
        let mut c = HealthClient::new(self.channel.clone());
        let req = HealthCheckRequest {
            service: vpc_cni_proto::HEALTH_SERVICE.to_string(),
        };
        match tokio::time::timeout(STATUS_TIMEOUT, c.check(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner().status()),
            Ok(Err(s)) => Err(self.status_error("health check", s)),
            Err(_) => Err(self.timed_out("health check", STATUS_TIMEOUT)),
        }
    }
}
