//! What the end-to-end tests and benchmarks share: network namespaces that clean
//! themselves up, a small in-process ipamd (gRPC over a Unix socket, the real wire
//! contract) and a runner that execs the real `aws-cni` binary as a runtime would.

pub mod cluster;
pub mod containerd;
pub mod cri;
pub mod fake_ipamd;
pub mod lab;
pub mod netns;
pub mod plugin;

/// Tests need root for namespaces; say so plainly instead of failing obscurely.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "these tests build network namespaces and must run as root"
    );
}
