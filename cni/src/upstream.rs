//! Upstream's own encoding in an ADD result, so either plugin can tear down the other's
//! pods from `prevResult` alone (a rollback to aws-node, or a roll forward from it, while
//! ipamd cannot answer).
//!
//! Upstream's ADD result lists, per attachment `v` (0 = CNI_IFNAME; `mNicIf<v>` after it):
//! the host veth (no sandbox), the pod's interface (sandbox = netns, `pciID` = the route
//! table of its address), and last a purely virtual interface named `dummy` +
//! sha1("<namespace>.<pod>")[:11] with `mac` = the VLAN ("0" for an ordinary pod, the
//! branch ENI's VLAN for a pod with its own security groups), `sandbox` = the device number
//! of attachment 0 and `socketPath` = the number of attachments (absent before upstream
//! 1.19: one attachment, table = device number + 1). A table of 1 or less means main.

use std::net::{IpAddr, Ipv4Addr};

use crate::result::{CniResult, Interface};

pub const DUMMY_PREFIX: &str = "dummy";
pub const EXTRA_IF_PREFIX: &str = "mNicIf";

pub fn dummy_name(namespace: &str, pod: &str) -> String {
    vpc_cni_proto::host_veth_name(DUMMY_PREFIX, namespace, pod)
}

/// The `dummy` interface of a pod with one attachment whose address is on `device`.
pub fn dummy_interface(namespace: &str, pod: &str, device: i32) -> Interface {
    Interface {
        name: dummy_name(namespace, pod),
        mac: "0".into(),
        sandbox: Some(device.to_string()),
        socket_path: Some("1".into()),
        ..Default::default()
    }
}

/// The host veth upstream names for attachment `index` of a pod.
pub fn host_veth(prefix: &str, namespace: &str, pod: &str, index: usize) -> String {
    if index == 0 {
        vpc_cni_proto::host_veth_name(prefix, namespace, pod)
    } else {
        vpc_cni_proto::host_veth_name(prefix, namespace, &format!("{pod}.{index}"))
    }
}

/// One attachment an upstream-format result describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub if_name: String,
    pub host_veth: String,
    pub ip: Ipv4Addr,
    /// `None`: the main table (the primary ENI).
    pub table: Option<u32>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// No `dummy` interface of this pod: not upstream's encoding.
    Absent,
    /// A pod on a branch ENI (security groups for pods), VLAN `n`.
    Branch(u32),
    Attachments(Vec<Attachment>),
}

/// Reads upstream's encoding out of `prev`. Err names what is malformed; nothing in it is
/// trusted beyond the numbers' ranges (a count larger than the interfaces listed, a table
/// that is not a number, an address that is not one).
pub fn decode(
    prev: &CniResult,
    prefix: &str,
    namespace: &str,
    pod: &str,
    if_name: &str,
) -> Result<Decoded, String> {
    let name = dummy_name(namespace, pod);
    let Some(dummy) = prev.interfaces.iter().find(|i| i.name == name) else {
        return Ok(Decoded::Absent);
    };
    let vlan: u32 = dummy
        .mac
        .parse()
        .map_err(|_| format!("{name}: VLAN {:?} is not a number", dummy.mac))?;
    if vlan != 0 {
        return Ok(Decoded::Branch(vlan));
    }
    let device: u32 = dummy
        .sandbox
        .as_deref()
        .unwrap_or_default()
        .parse()
        .map_err(|_| format!("{name}: device number {:?} is not one", dummy.sandbox))?;
    let count: usize = match dummy.socket_path.as_deref() {
        None | Some("") => 1,
        Some(n) => n
            .parse()
            .ok()
            .filter(|n| (1..=prev.interfaces.len()).contains(n))
            .ok_or_else(|| format!("{name}: interface count {n:?} is not one of the result's"))?,
    };
    let mut out = Vec::with_capacity(count);
    for v in 0..count {
        let want = if v == 0 {
            if_name.to_string()
        } else {
            format!("{EXTRA_IF_PREFIX}{v}")
        };
        let (index, iface) = prev
            .interfaces
            .iter()
            .enumerate()
            .find(|(_, i)| i.name == want && i.sandbox.is_some())
            .ok_or_else(|| format!("no pod interface {want} in the result"))?;
        let ips: Vec<_> = prev
            .ips
            .iter()
            .filter(|ip| ip.interface == Some(index))
            .collect();
        let ip = match ips.as_slice() {
            [one] => match one.ip() {
                Some(IpAddr::V4(v4)) => v4,
                _ => return Err(format!("{want}: {:?} is not an IPv4 address", one.address)),
            },
            _ => return Err(format!("{want}: {} addresses, not one", ips.len())),
        };
        let table = if dummy.socket_path.is_some() {
            iface
                .pci_id
                .as_deref()
                .unwrap_or_default()
                .parse::<u32>()
                .map_err(|_| format!("{want}: route table {:?} is not a number", iface.pci_id))?
        } else {
            device + 1
        };
        out.push(Attachment {
            if_name: want,
            host_veth: host_veth(prefix, namespace, pod, v),
            ip,
            table: (table > 1).then_some(table),
        });
    }
    Ok(Decoded::Attachments(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An ADD result as upstream's cmdAdd prints it (cni.go: podInterfaces, podIPs, the
    /// dummy appended last) for pod default/web-0 with 10.0.2.20 on device 2, table 3,
    /// and a second attachment 10.1.0.7 in table 5.
    fn upstream_two() -> CniResult {
        CniResult::from_prev(&json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": host_veth("eni", "default", "web-0", 0)},
                {"name": "eth0", "sandbox": "/var/run/netns/cni-1", "pciID": "3"},
                {"name": host_veth("eni", "default", "web-0", 1)},
                {"name": "mNicIf1", "sandbox": "/var/run/netns/cni-1", "pciID": "5"},
                {"name": dummy_name("default", "web-0"), "mac": "0", "sandbox": "2", "socketPath": "2"}
            ],
            "ips": [
                {"interface": 1, "address": "10.0.2.20/32", "gateway": "10.0.2.1"},
                {"interface": 3, "address": "10.1.0.7/32", "gateway": "10.0.2.1"}
            ],
            "dns": {}
        }))
        .unwrap()
    }

    #[test]
    fn dummy_name_is_upstreams() {
        // printf 'default.nginx' | sha1sum -> c440f455693...
        assert_eq!(dummy_name("default", "nginx"), "dummyc440f455693");
    }

    #[test]
    fn decodes_every_attachment() {
        let d = decode(&upstream_two(), "eni", "default", "web-0", "eth0").unwrap();
        let Decoded::Attachments(a) = d else {
            panic!("{d:?}")
        };
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].ip, "10.0.2.20".parse::<Ipv4Addr>().unwrap());
        assert_eq!(a[0].table, Some(3));
        assert_eq!(
            a[0].host_veth,
            vpc_cni_proto::host_veth_name("eni", "default", "web-0")
        );
        assert_eq!(a[1].if_name, "mNicIf1");
        assert_eq!(a[1].table, Some(5));
        assert_ne!(a[1].host_veth, a[0].host_veth);
    }

    #[test]
    fn before_socket_path_the_table_is_device_plus_one() {
        let mut r = upstream_two();
        r.interfaces[4].socket_path = None;
        r.interfaces[4].sandbox = Some("0".into());
        let Decoded::Attachments(a) = decode(&r, "eni", "default", "web-0", "eth0").unwrap() else {
            panic!()
        };
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].table, None, "device 0 + 1 = table 1 = main");
    }

    #[test]
    fn branch_absent_and_malformed() {
        let mut r = upstream_two();
        assert_eq!(
            decode(&r, "eni", "default", "other", "eth0").unwrap(),
            Decoded::Absent
        );
        r.interfaces[4].mac = "7".into();
        assert_eq!(
            decode(&r, "eni", "default", "web-0", "eth0").unwrap(),
            Decoded::Branch(7)
        );
        for (field, bad) in [
            ("mac", "x"),
            ("sandbox", "-1"),
            ("socketPath", "99999999999"),
        ] {
            let mut r = upstream_two();
            let d = &mut r.interfaces[4];
            match field {
                "mac" => d.mac = bad.into(),
                "sandbox" => d.sandbox = Some(bad.into()),
                _ => d.socket_path = Some(bad.into()),
            }
            assert!(
                decode(&r, "eni", "default", "web-0", "eth0").is_err(),
                "{field}={bad}"
            );
        }
        let mut r = upstream_two();
        r.interfaces[1].pci_id = Some("main".into());
        assert!(decode(&r, "eni", "default", "web-0", "eth0").is_err());
    }
}
