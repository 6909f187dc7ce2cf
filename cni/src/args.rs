//! CNI_ARGS: `K=V;K=V` pairs. Kubernetes runtimes send the pod's identity here, in any order.

use crate::error::{CniError, Result};

/// The Kubernetes keys we use. Anything else is refused unless `IgnoreUnknown` is true,
/// as libcni's `LoadArgs` does.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct K8sArgs {
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_infra_container_id: String,
    pub pod_uid: String,
}

impl K8sArgs {
    pub fn parse(raw: &str) -> Result<Self> {
        let mut out = K8sArgs::default();
        let mut ignore_unknown = false;
        let mut unknown = Vec::new();
        for pair in raw.split(';').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(CniError::env(format!(
                    "CNI_ARGS: {pair:?} is not KEY=VALUE"
                )));
            };
            match key {
                "K8S_POD_NAMESPACE" => out.pod_namespace = value.to_string(),
                "K8S_POD_NAME" => out.pod_name = value.to_string(),
                "K8S_POD_INFRA_CONTAINER_ID" => out.pod_infra_container_id = value.to_string(),
                "K8S_POD_UID" => out.pod_uid = value.to_string(),
                "IgnoreUnknown" => {
                    ignore_unknown = match value.to_ascii_lowercase().as_str() {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => {
                            return Err(CniError::env(format!(
                                "CNI_ARGS: IgnoreUnknown={value:?} is not a boolean (1, 0, true, false)"
                            )));
                        }
                    }
                }
                _ => unknown.push(key.to_string()),
            }
        }
        if !ignore_unknown && !unknown.is_empty() {
            return Err(CniError::env(format!(
                "CNI_ARGS: unknown key(s) {}; set IgnoreUnknown=1 to allow them",
                unknown.join(", ")
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_order_with_ignore_unknown() {
        let a = K8sArgs::parse(
            "K8S_POD_UID=u1;IgnoreUnknown=1;K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=prod;\
             K8S_POD_INFRA_CONTAINER_ID=abc;Extra=1",
        )
        .unwrap();
        assert_eq!(a.pod_name, "web-0");
        assert_eq!(a.pod_namespace, "prod");
        assert_eq!(a.pod_infra_container_id, "abc");
        assert_eq!(a.pod_uid, "u1");
    }

    #[test]
    fn unknown_key_refused_without_ignore_unknown() {
        let e = K8sArgs::parse("K8S_POD_NAME=a;Foo=bar").unwrap_err();
        assert!(e.msg.contains("Foo"), "{}", e.msg);
        assert_eq!(e.code, crate::error::ErrorCode::InvalidEnvironment);
    }

    #[test]
    fn malformed_pair() {
        assert!(K8sArgs::parse("K8S_POD_NAME").is_err());
        assert_eq!(K8sArgs::parse("").unwrap(), K8sArgs::default());
    }
}
