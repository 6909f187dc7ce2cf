//! ipamd's edges to the world: EC2 and IMDS through the AWS SDK (`aws`), and the host
//! network through netlink and iptables (`host`); to its operators: introspection and
//! metrics (`ops`), `ipamd status`/`health` (`cli`), and the node entrypoint
//! (`entrypoint`, the `aws-vpc-cni` binary); to Kubernetes: whether the node is cordoned
//! (`kube`). The logic lives in `ipamd-core`.

pub mod aws;
pub mod cli;
pub mod entrypoint;
pub mod host;
pub mod kube;
pub mod ops;
pub mod ops6;
