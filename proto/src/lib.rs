//! The gRPC contract between the `aws-cni` plugin and ipamd (protobuf package `rpc`),
//! plus the standard gRPC health service. Clients always; servers with feature `server`.
#![forbid(unsafe_code)]
#![allow(clippy::all, clippy::pedantic)]

/// Package `rpc`: `CNIBackend` (upstream) and `CNIGarbageCollector` (ours).
pub mod rpc {
    tonic::include_proto!("rpc");
}

/// Package `grpc.health.v1`.
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}

/// The health service name ipamd reports under (upstream's name).
pub const HEALTH_SERVICE: &str = "grpc.health.v1.aws-node";
