//! ipamd's core, free of the AWS SDK so it builds and tests quickly: the knobs, the
//! datastore, the checkpoint, the warm-pool policy, and the gRPC server. EC2 and IMDS
//! are traits (`cloud`), implemented with the SDK in the `ipamd` crate.
#![forbid(unsafe_code)]

pub mod budget;
pub mod checkpoint;
pub mod clock;
pub mod cloud;
pub mod config;
pub mod datastore;
pub mod hostnet;
mod instance_limits;
pub mod metrics;
pub mod net;
pub mod node;
pub mod node6;
pub mod pool;
pub mod prefix6;
pub mod server;
