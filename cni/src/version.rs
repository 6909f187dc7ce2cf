//! CNI spec versions this plugin speaks, and what each one changes in our behaviour.

use crate::error::{CniError, ErrorCode, Result};
use std::fmt;

/// Every version we accept in a network configuration, oldest first.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The version we answer VERSION with when the request names none we know.
pub const LATEST: &str = "1.1.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CniVersion(u8, u8, u8);

impl CniVersion {
    pub const V0_4_0: CniVersion = CniVersion(0, 4, 0);
    pub const V1_0_0: CniVersion = CniVersion(1, 0, 0);
    pub const V1_1_0: CniVersion = CniVersion(1, 1, 0);

    pub fn parse(s: &str) -> Result<Self> {
        if !SUPPORTED.contains(&s) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "unsupported cniVersion {s:?}; this plugin supports {}",
                    SUPPORTED.join(", ")
                ),
            ));
        }
        let mut parts = s.split('.').map(|p| p.parse::<u8>().unwrap_or(0));
        Ok(CniVersion(
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        ))
    }

    /// Before 1.0.0 every `ips` entry carried `"version": "4"|"6"`.
    pub fn ip_has_version_field(self) -> bool {
        self < Self::V1_0_0
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= Self::V0_4_0
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn has_status_and_gc(self) -> bool {
        self >= Self::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// The VERSION verb's answer.
pub fn version_info(requested: Option<&str>) -> serde_json::Value {
    let v = requested
        .filter(|v| SUPPORTED.contains(v))
        .unwrap_or(LATEST);
    serde_json::json!({ "cniVersion": v, "supportedVersions": SUPPORTED })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_and_rejects_unknown() {
        assert_eq!(CniVersion::parse("0.3.1").unwrap().to_string(), "0.3.1");
        assert!(CniVersion::parse("0.3.1").unwrap().ip_has_version_field());
        assert!(!CniVersion::parse("1.0.0").unwrap().ip_has_version_field());
        assert!(!CniVersion::parse("0.3.1").unwrap().has_check());
        assert!(CniVersion::parse("1.1.0").unwrap().has_status_and_gc());
        let e = CniVersion::parse("9.9.9").unwrap_err();
        assert_eq!(e.code, ErrorCode::IncompatibleVersion);
        assert!(e.msg.contains("\"9.9.9\""), "{}", e.msg);
    }
}
