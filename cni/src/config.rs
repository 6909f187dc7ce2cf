//! The network configuration the runtime sends on stdin, validated. A bad value is
//! refused with a message that names the field and what would be right.

use crate::error::{CniError, ErrorCode, Result};
use crate::log::Level;
use crate::version::CniVersion;
use serde::Deserialize;
use serde_json::Value;

pub const DEFAULT_MTU: u32 = 9001;
pub const MIN_MTU: u32 = 576;
pub const MAX_MTU: u32 = 9001;
pub const DEFAULT_VETH_PREFIX: &str = "eni";
pub use vpc_cni_proto::address::DEFAULT_IPAMD_SOCKET as DEFAULT_IPAMD_ADDRESS;
pub use vpc_cni_proto::conf::DEFAULT_PLUGIN_LOG_FILE as DEFAULT_LOG_FILE;

pub use vpc_cni_proto::address::IpamdAddress;

/// One attachment the runtime still uses (GC's `cni.dev/valid-attachments`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Deserialize)]
struct RawConf {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(default)]
    mtu: Option<Value>,
    #[serde(rename = "vethPrefix", default)]
    veth_prefix: Option<String>,
    #[serde(rename = "pluginLogFile", default)]
    plugin_log_file: Option<String>,
    #[serde(rename = "pluginLogLevel", default)]
    plugin_log_level: Option<String>,
    #[serde(rename = "ipamdAddress", default)]
    ipamd_address: Option<String>,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: CniVersion,
    /// The version string exactly as sent, echoed back in results.
    pub cni_version_str: String,
    pub name: String,
    pub mtu: u32,
    pub veth_prefix: String,
    pub log_file: String,
    pub log_level: Level,
    pub ipamd: IpamdAddress,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

/// Only the cniVersion, for answering VERSION and for error JSON when the rest is bad.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_string)
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "network configuration on stdin is not valid JSON",
            )
            .with_details(e)
        })?;
        if !value.is_object() {
            return Err(CniError::new(
                ErrorCode::Decode,
                "network configuration on stdin must be a JSON object",
            ));
        }
        let raw: RawConf = serde_json::from_value(value).map_err(|e| {
            CniError::config("network configuration has a field of the wrong type").with_details(e)
        })?;

        let cni_version_str = raw
            .cni_version
            .ok_or_else(|| CniError::config("network configuration has no cniVersion"))?;
        let cni_version = CniVersion::parse(&cni_version_str)?;
        let name = raw.name.unwrap_or_default();
        if name.is_empty() {
            return Err(CniError::config("network configuration has no name"));
        }
        let mtu = parse_mtu(raw.mtu.as_ref())?;
        let veth_prefix = raw
            .veth_prefix
            .unwrap_or_else(|| DEFAULT_VETH_PREFIX.to_string());
        validate_veth_prefix(&veth_prefix)?;
        let log_level = match raw.plugin_log_level.as_deref() {
            None | Some("") => Level::Debug,
            Some(s) => Level::parse(s).ok_or_else(|| {
                CniError::config(format!(
                    "pluginLogLevel {s:?} is not one of Debug, Info, Warn, Error"
                ))
            })?,
        };
        let ipamd = IpamdAddress::parse(
            raw.ipamd_address
                .as_deref()
                .filter(|s| !s.is_empty())
                .unwrap_or(DEFAULT_IPAMD_ADDRESS),
        )
        .map_err(|e| CniError::config(format!("ipamdAddress {e}")))?;
        let log_file = raw
            .plugin_log_file
            .unwrap_or_else(|| DEFAULT_LOG_FILE.to_string());
        if !matches!(log_file.as_str(), "" | "none" | "stderr" | "stdout")
            && !log_file.starts_with('/')
        {
            return Err(CniError::config(format!(
                "pluginLogFile {log_file:?} is not an absolute path (or stderr, none): a runtime's working directory is not the plugin's to choose"
            )));
        }
        Ok(NetConf {
            cni_version,
            cni_version_str,
            name,
            mtu,
            veth_prefix,
            log_file,
            log_level,
            ipamd,
            prev_result: raw.prev_result.filter(|v| !v.is_null()),
            valid_attachments: raw.valid_attachments,
        })
    }
}

/// Upstream's conflist writes the MTU as a string ("9001"); numbers are accepted too.
fn parse_mtu(v: Option<&Value>) -> Result<u32> {
    let n = match v {
        None | Some(Value::Null) => return Ok(DEFAULT_MTU),
        Some(Value::String(s)) if s.is_empty() => return Ok(DEFAULT_MTU),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        Some(Value::Number(n)) => n.as_i64(),
        Some(_) => None,
    };
    match n {
        Some(n) if (MIN_MTU as i64..=MAX_MTU as i64).contains(&n) => Ok(n as u32),
        Some(n) => Err(CniError::config(format!(
            "mtu {n} is out of range; it must be between {MIN_MTU} and {MAX_MTU}"
        ))),
        None => Err(CniError::config(format!(
            "mtu {} is not an integer between {MIN_MTU} and {MAX_MTU}",
            v.map(|v| v.to_string()).unwrap_or_default()
        ))),
    }
}

/// The host veth is `<prefix><11 hex>`, and Linux names hold 15 characters, so the
/// prefix has at most 4. Prefixes that would collide with the node's own links are refused.
pub fn validate_veth_prefix(p: &str) -> Result<()> {
    if p.is_empty() || p.len() > 4 {
        return Err(CniError::config(format!(
            "vethPrefix {p:?} must be 1 to 4 characters long (the host veth name is the \
             prefix plus 11 hex characters, at most 15 in all)"
        )));
    }
    if matches!(p, "eth" | "lo" | "vlan") {
        return Err(CniError::config(format!(
            "vethPrefix {p:?} is reserved: it would collide with the node's own interfaces"
        )));
    }
    if !p
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(CniError::config(format!(
            "vethPrefix {p:?} may hold only letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Result<NetConf> {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.0.0","name":"aws-cni","type":"aws-cni"{extra}}}"#)
                .as_bytes(),
        )
    }

    #[test]
    fn defaults() {
        let c = conf("").unwrap();
        assert_eq!(c.mtu, 9001);
        assert_eq!(c.veth_prefix, "eni");
        assert_eq!(c.ipamd, IpamdAddress::Unix(DEFAULT_IPAMD_ADDRESS.into()));
        assert_eq!(c.log_level, Level::Debug);
    }

    #[test]
    fn mtu_as_string_or_number() {
        assert_eq!(conf(r#","mtu":"1500""#).unwrap().mtu, 1500);
        assert_eq!(conf(r#","mtu":1500"#).unwrap().mtu, 1500);
        let e = conf(r#","mtu":70000"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.msg.contains("mtu 70000"), "{}", e.msg);
        assert!(conf(r#","mtu":"big""#).unwrap_err().msg.contains("mtu"));
        assert!(conf(r#","mtu":575"#).is_err());
    }

    #[test]
    fn veth_prefix_rules() {
        assert!(
            conf(r#","vethPrefix":"abcde""#)
                .unwrap_err()
                .msg
                .contains("1 to 4")
        );
        assert!(
            conf(r#","vethPrefix":"eth""#)
                .unwrap_err()
                .msg
                .contains("reserved")
        );
        assert!(conf(r#","vethPrefix":"a/b""#).is_err());
        assert_eq!(conf(r#","vethPrefix":"pod""#).unwrap().veth_prefix, "pod");
    }

    #[test]
    fn malformed_and_missing() {
        let e = NetConf::parse(b"{not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::Decode);
        let e = NetConf::parse(br#"{"name":"x"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.msg.contains("cniVersion"));
        let e = NetConf::parse(br#"{"cniVersion":"7.0.0","name":"x"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::IncompatibleVersion);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0"}"#).unwrap_err();
        assert!(e.msg.contains("name"));
    }

    #[test]
    fn ipamd_address_forms() {
        assert_eq!(
            IpamdAddress::parse("127.0.0.1:50051").unwrap(),
            IpamdAddress::Tcp("127.0.0.1:50051".into())
        );
        assert_eq!(
            IpamdAddress::parse("unix:///tmp/s").unwrap(),
            IpamdAddress::Unix("/tmp/s".into())
        );
        assert!(IpamdAddress::parse("nowhere").is_err());
    }
}
