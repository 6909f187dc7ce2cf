//! The `aws-cni` CNI plugin: asks ipamd for a VPC address and builds the pod's veth
//! datapath; tears it down on DEL. Single-threaded, no AWS SDK, no Kubernetes client.

pub mod args;
pub mod config;
pub mod datapath;
pub mod error;
pub mod ipamd;
#[macro_use]
pub mod log;
pub mod plugin;
pub mod result;
pub mod upstream;
pub mod version;
