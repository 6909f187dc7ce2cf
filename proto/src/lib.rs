//! The gRPC contract between the `aws-cni` plugin and ipamd (protobuf package `rpc`),
//! plus the standard gRPC health service, where ipamd listens (`address`) and the conflist
//! keys both sides agree on (`conf`). Clients always; servers with feature `server`; a
//! channel to ipamd's socket with feature `client`.
#![forbid(unsafe_code)]
#![allow(clippy::all, clippy::pedantic)]

pub mod address;
pub mod conf;

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

/// The host veth of a pod: `prefix` + the first 11 hex characters of
/// sha1("<namespace>.<pod name>"), as upstream names it. The plugin creates it by this
/// name and ipamd finds a pod's assignment by it after rebuilding from host routes, so
/// both sides take it from here.
pub fn host_veth_name(prefix: &str, namespace: &str, pod_name: &str) -> String {
    let digest = sha1_smol::Sha1::from(format!("{namespace}.{pod_name}"))
        .digest()
        .to_string();
    format!("{prefix}{}", &digest[..11])
}

/// The host veth of one attachment of a pod: upstream's name ([`host_veth_name`]) for
/// `eth0`; for any other interface of the same pod (a second network, as Multus attaches
/// one) sha1("<namespace>.<pod name>/<ifname>"), so two attachments never share a veth.
/// ('/' is in neither a pod name nor an interface name: no pod's `eth0` name can match.)
pub fn pod_veth_name(prefix: &str, namespace: &str, pod_name: &str, if_name: &str) -> String {
    if if_name == "eth0" {
        return host_veth_name(prefix, namespace, pod_name);
    }
    let digest = sha1_smol::Sha1::from(format!("{namespace}.{pod_name}/{if_name}"))
        .digest()
        .to_string();
    format!("{prefix}{}", &digest[..11])
}

#[cfg(test)]
mod tests {
    #[test]
    fn veth_name_matches_upstream() {
        // printf 'default.nginx' | sha1sum  ->  c440f455693...
        assert_eq!(
            super::host_veth_name("eni", "default", "nginx"),
            "enic440f455693"
        );
        assert_eq!(
            super::host_veth_name("pod", "default", "nginx"),
            "podc440f455693"
        );
    }

    #[test]
    fn a_second_attachment_has_a_veth_of_its_own() {
        let eth0 = super::pod_veth_name("eni", "default", "nginx", "eth0");
        assert_eq!(eth0, "enic440f455693");
        let net1 = super::pod_veth_name("eni", "default", "nginx", "net1");
        assert_ne!(net1, eth0);
        assert_eq!(net1.len(), 14);
        // A pod named "nginx/net1" cannot exist; "nginx.net1" hashes differently.
        assert_ne!(net1, super::host_veth_name("eni", "default", "nginx.net1"));
    }
}
