//! ipamd's edges to the world: EC2 and IMDS through the AWS SDK (`aws`), and the host
//! network through netlink and iptables (`host`). The logic lives in `ipamd-core`.

pub mod aws;
pub mod cli;
pub mod host;
pub mod ops;
