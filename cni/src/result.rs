//! The CNI result: what ADD prints and what later verbs receive back as `prevResult`.
//! One internal shape, written out in the form the requested cniVersion expects.

use crate::error::{CniError, Result};
use crate::version::CniVersion;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::IpAddr;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// CNI 1.1's field; upstream's plugin keeps the route table of the pod's interface in it.
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
    /// CNI 1.1's field; upstream's `dummy` interface keeps its interface count in it.
    #[serde(
        default,
        rename = "socketPath",
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    /// Whatever else an earlier plugin in the chain wrote: passed on untouched.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR form, e.g. "10.0.1.23/32".
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

impl IpConfig {
    pub fn ip(&self) -> Option<IpAddr> {
        self.address.split('/').next()?.parse().ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Value,
}

impl CniResult {
    /// Reads a prevResult of any supported version (0.3.x/0.4.0 `ips[].version` is ignored).
    pub fn from_prev(v: &Value) -> Result<Self> {
        serde_json::from_value(v.clone())
            .map_err(|e| CniError::config("prevResult is not a CNI result").with_details(e))
    }

    /// Appends `other` (our part) after what earlier plugins in the chain produced,
    /// shifting its interface indexes.
    pub fn chain(mut self, other: CniResult) -> CniResult {
        let offset = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        self.routes.extend(other.routes);
        if self.dns.is_null() {
            self.dns = other.dns;
        }
        self
    }

    /// The IPv4 address this plugin gave the interface named `if_name` in the sandbox.
    pub fn sandbox_ipv4(&self, if_name: &str) -> Option<std::net::Ipv4Addr> {
        self.sandbox_ips(if_name).find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
    }

    /// The address (either family, IPv4 first) this plugin gave the interface `if_name`.
    pub fn sandbox_ip(&self, if_name: &str) -> Option<IpAddr> {
        self.sandbox_ipv4(if_name)
            .map(IpAddr::V4)
            .or_else(|| self.sandbox_ips(if_name).next())
    }

    fn sandbox_ips<'a>(&'a self, if_name: &'a str) -> impl Iterator<Item = IpAddr> + 'a {
        self.ips.iter().filter_map(move |ip| {
            let iface = self.interfaces.get(ip.interface?)?;
            if iface.sandbox.is_none() || iface.name != if_name {
                return None;
            }
            ip.ip()
        })
    }

    /// The JSON the runtime expects for `version`.
    pub fn to_json(&self, version: CniVersion, version_str: &str) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut v {
            map.insert("cniVersion".into(), Value::String(version_str.into()));
            if map.get("dns").is_some_and(Value::is_null) {
                map.insert("dns".into(), Value::Object(Default::default()));
            }
            // Before 1.0 an interface has no pciID or socketPath (upstream's results of
            // those versions carry neither).
            if version.ip_has_version_field()
                && let Some(Value::Array(ifs)) = map.get_mut("interfaces")
            {
                for i in ifs.iter_mut().filter_map(Value::as_object_mut) {
                    i.remove("pciID");
                    i.remove("socketPath");
                }
            }
            if version.ip_has_version_field()
                && let Some(Value::Array(ips)) = map.get_mut("ips")
            {
                for ip in ips.iter_mut() {
                    let fam = match ip.get("address").and_then(Value::as_str) {
                        Some(a) if a.contains(':') => "6",
                        _ => "4",
                    };
                    if let Value::Object(o) = ip {
                        o.insert("version".into(), Value::String(fam.into()));
                    }
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "eni0123456789a".into(),
                    mac: "aa:bb:cc:dd:ee:01".into(),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: "aa:bb:cc:dd:ee:02".into(),
                    sandbox: Some("/var/run/netns/x".into()),
                    pci_id: Some("1".into()),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.0.0.5/32".into(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![],
            dns: Value::Null,
        }
    }

    #[test]
    fn version_field_only_before_1_0() {
        let r = ours();
        let old = r.to_json(CniVersion::parse("0.3.1").unwrap(), "0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["cniVersion"], "0.3.1");
        assert!(
            old["interfaces"][1].get("pciID").is_none(),
            "no pciID before 1.0"
        );
        let new = r.to_json(CniVersion::parse("1.0.0").unwrap(), "1.0.0");
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["interfaces"][1]["pciID"], "1");
        assert_eq!(new["interfaces"][1]["mac"], "aa:bb:cc:dd:ee:02");
        assert!(new["dns"].is_object());
    }

    #[test]
    fn chain_shifts_interface_indexes() {
        let prev = CniResult {
            interfaces: vec![Interface {
                name: "lo".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let c = prev.chain(ours());
        assert_eq!(c.interfaces.len(), 3);
        assert_eq!(c.ips[0].interface, Some(2));
        assert_eq!(c.sandbox_ipv4("eth0"), Some("10.0.0.5".parse().unwrap()));
    }

    #[test]
    fn reads_old_prev_result() {
        let v: Value = serde_json::from_str(
            r#"{"cniVersion":"0.3.1","interfaces":[{"name":"h"},{"name":"eth0","sandbox":"/n"}],
                "ips":[{"version":"4","address":"10.1.1.1/32","interface":1}]}"#,
        )
        .unwrap();
        let r = CniResult::from_prev(&v).unwrap();
        assert_eq!(r.sandbox_ipv4("eth0"), Some("10.1.1.1".parse().unwrap()));
        assert_eq!(r.sandbox_ipv4("eth1"), None);
    }

    #[test]
    fn an_earlier_plugins_fields_are_passed_on() {
        let prev = CniResult::from_prev(&serde_json::json!({
            "interfaces": [{"name": "net9", "mtu": 1400, "pciID": "0000:00:1f.6", "x-vendor": {"a": 1}}]
        }))
        .unwrap();
        let out = prev
            .chain(ours())
            .to_json(CniVersion::parse("1.1.0").unwrap(), "1.1.0");
        assert_eq!(out["interfaces"][0]["mtu"], 1400);
        assert_eq!(out["interfaces"][0]["pciID"], "0000:00:1f.6");
        assert_eq!(out["interfaces"][0]["x-vendor"]["a"], 1);
    }
}
