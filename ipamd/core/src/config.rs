//! ipamd's knobs: every environment variable of compat.md section 2 with upstream's
//! default. A bad value stops start-up with a message naming the variable; nothing
//! falls back silently.

use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?} is invalid: {expected}")]
pub struct ConfigError {
    pub var: String,
    pub value: String,
    pub expected: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomizeSnat {
    /// `--random-fully`
    Prng,
    /// `--random`
    HashRandom,
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    // Pool.
    pub warm_eni_target: u32,
    pub warm_ip_target: Option<u32>,
    pub minimum_ip_target: Option<u32>,
    pub warm_prefix_target: u32,
    pub enable_prefix_delegation: bool,
    pub max_eni: Option<u32>,
    pub ip_cooldown: Duration,
    // Families and subnets.
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    pub custom_network_cfg: bool,
    pub eni_config_annotation_def: String,
    pub eni_config_label_def: String,
    pub enable_subnet_discovery: bool,
    // Housekeeping.
    pub disable_leaked_eni_cleanup: bool,
    pub disable_network_resource_provisioning: bool,
    pub manage_enis_non_schedulable: bool,
    /// ANNOTATE_POD_IP: the pod's `vpc.amazonaws.com/pod-ips` annotation follows its address.
    pub annotate_pod_ip: bool,
    pub cluster_name: String,
    pub additional_eni_tags: BTreeMap<String, String>,
    pub ec2_endpoint: Option<String>,
    pub backing_store: String,
    pub node_name: String,
    // Endpoints.
    pub disable_introspection: bool,
    pub introspection_bind_address: String,
    pub disable_metrics: bool,
    /// Ours: where /metrics listens (upstream: always :61678).
    pub metrics_bind_address: String,
    pub socket_path: String,
    // Host network.
    pub external_snat: bool,
    pub randomize_snat: RandomizeSnat,
    pub exclude_snat_cidrs: Vec<String>,
    pub external_service_cidrs: Vec<String>,
    pub node_port_support: bool,
    pub connmark: u32,
    pub eni_mtu: u32,
    pub veth_prefix: String,
    // Ours: how long AddNetwork waits for a refill before answering "no address".
    pub add_wait: Duration,
}

/// Reads the knobs from `get` (the process environment in production).
pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let r = Reader { get: &get };
    let warm_ip_target = r.opt_u32("WARM_IP_TARGET")?;
    let minimum_ip_target = r.opt_u32("MINIMUM_IP_TARGET")?;
    let max_eni = r.opt_u32("MAX_ENI")?;
    if max_eni == Some(0) {
        return Err(r.err("MAX_ENI", "an ENI count of at least 1 (the primary ENI)"));
    }
    let enable_ipv4 = r.bool("ENABLE_IPv4", true)?;
    let enable_ipv6 = r.bool("ENABLE_IPv6", false)?;
    let custom_network_cfg = r.bool("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", false)?;
    let enable_prefix_delegation = r.bool("ENABLE_PREFIX_DELEGATION", false)?;
    // Upstream's rules for the families: exactly one, and IPv6 only with prefix
    // delegation and without custom networking (or pod ENIs, refused below anyway).
    match (enable_ipv4, enable_ipv6) {
        (true, true) => {
            return Err(r.err(
                "ENABLE_IPv4",
                "false with ENABLE_IPv6=true: pods get one family, dual-stack pods are not supported (as upstream)",
            ));
        }
        (false, false) => {
            return Err(r.err(
                "ENABLE_IPv4",
                "true, or ENABLE_IPv6=true: one address family must be enabled",
            ));
        }
        _ => {}
    }
    if enable_ipv6 {
        if !enable_prefix_delegation {
            return Err(r.err(
                "ENABLE_PREFIX_DELEGATION",
                "true with ENABLE_IPv6=true: IPv6 pods take their addresses from a /80 prefix",
            ));
        }
        if custom_network_cfg {
            return Err(r.err(
                "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG",
                "false with ENABLE_IPv6=true: custom networking is IPv4 only (as upstream)",
            ));
        }
    }
    // Features of upstream this daemon does not have: refused, never silently ignored.
    if r.bool("ENABLE_POD_ENI", false)? {
        return Err(r.err(
            "ENABLE_POD_ENI",
            "false: security groups for pods (branch ENIs) are not supported by this daemon",
        ));
    }
    if let Some(m) = r.get("POD_SECURITY_GROUP_ENFORCING_MODE")
        && !m.is_empty()
        && !matches!(m.as_str(), "strict" | "standard")
    {
        return Err(r.err("POD_SECURITY_GROUP_ENFORCING_MODE", "strict or standard"));
    }
    if let Some(f) = r.get("AWS_VPC_K8S_CNI_LOG_FORMAT")
        && !f.is_empty()
        && !f.eq_ignore_ascii_case("json")
        && !f.eq_ignore_ascii_case("text")
    {
        return Err(r.err("AWS_VPC_K8S_CNI_LOG_FORMAT", "json or text"));
    }
    let randomize_snat = match r.string("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "prng").as_str() {
        "prng" => RandomizeSnat::Prng,
        "hashrandom" => RandomizeSnat::HashRandom,
        "none" => RandomizeSnat::None,
        _ => {
            return Err(r.err(
                "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
                "one of prng, hashrandom, none",
            ));
        }
    };
    let eni_mtu = r.u32("AWS_VPC_ENI_MTU", 9001)?;
    if !(576..=9001).contains(&eni_mtu) {
        return Err(r.err("AWS_VPC_ENI_MTU", "an MTU between 576 and 9001"));
    }
    let veth_prefix = r.string("AWS_VPC_K8S_CNI_VETHPREFIX", "eni");
    if veth_prefix.is_empty()
        || veth_prefix.len() > 4
        || matches!(veth_prefix.as_str(), "eth" | "lo" | "vlan")
        || !veth_prefix.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err(r.err(
            "AWS_VPC_K8S_CNI_VETHPREFIX",
            "1 to 4 letters or digits, not eth, lo or vlan",
        ));
    }
    let connmark_raw = r.string("AWS_VPC_K8S_CNI_CONNMARK", "0x80");
    let connmark = parse_u32_any_base(&connmark_raw)
        .filter(|m| *m != 0)
        .ok_or_else(|| {
            r.err(
                "AWS_VPC_K8S_CNI_CONNMARK",
                "a non-zero mark, decimal or 0x hex",
            )
        })?;
    let additional_eni_tags = match r.get("ADDITIONAL_ENI_TAGS") {
        None => BTreeMap::new(),
        Some(s) if s.trim().is_empty() => BTreeMap::new(),
        Some(s) => {
            let tags: BTreeMap<String, String> = serde_json::from_str(&s).map_err(|e| {
                r.err(
                    "ADDITIONAL_ENI_TAGS",
                    &format!("a JSON object of string tags ({e})"),
                )
            })?;
            // EC2's own limits on a tag: a key of 1 to 128 characters, a value of at most 256.
            if let Some((k, v)) = tags.iter().find(|(k, v)| {
                k.trim().is_empty() || k.chars().count() > 128 || v.chars().count() > 256
            }) {
                return Err(r.err(
                    "ADDITIONAL_ENI_TAGS",
                    &format!(
                        "tags whose keys have 1 to 128 characters and values at most 256 ({k:?}: {v:?} has not)"
                    ),
                ));
            }
            if let Some(k) = tags
                .keys()
                .find(|k| k.starts_with("k8s.amazonaws.com") || k.starts_with("aws:"))
            {
                return Err(r.err(
                    "ADDITIONAL_ENI_TAGS",
                    &format!("tags whose keys are not reserved ({k:?} is)"),
                ));
            }
            tags
        }
    };
    let backing_store = r.string(
        "AWS_VPC_K8S_CNI_BACKING_STORE",
        "/var/run/aws-node/ipam.json",
    );
    let socket_path = r.string("IPAMD_SOCKET", "/var/run/aws-node/ipamd.sock");
    if socket_path == backing_store {
        return Err(r.err(
            "IPAMD_SOCKET",
            "a path other than the checkpoint's (AWS_VPC_K8S_CNI_BACKING_STORE)",
        ));
    }
    let introspection_bind_address = r.listen("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:61679")?;
    let metrics_bind_address = r.listen("IPAMD_METRICS_BIND_ADDRESS", ":61678")?;
    for (var, addr) in [
        ("INTROSPECTION_BIND_ADDRESS", &introspection_bind_address),
        ("IPAMD_METRICS_BIND_ADDRESS", &metrics_bind_address),
    ] {
        if let Some(p) = addr.strip_prefix("unix:")
            && (p == socket_path || p == backing_store)
        {
            return Err(r.err(
                var,
                "a socket path other than ipamd's gRPC socket and its checkpoint",
            ));
        }
    }
    if introspection_bind_address == metrics_bind_address {
        return Err(r.err(
            "IPAMD_METRICS_BIND_ADDRESS",
            "an address other than INTROSPECTION_BIND_ADDRESS",
        ));
    }
    Ok(Config {
        warm_eni_target: r.u32("WARM_ENI_TARGET", 1)?,
        warm_ip_target,
        minimum_ip_target,
        warm_prefix_target: r.u32("WARM_PREFIX_TARGET", 0)?,
        enable_prefix_delegation,
        max_eni,
        ip_cooldown: Duration::from_secs(r.u32("IP_COOLDOWN_PERIOD", 30)? as u64),
        enable_ipv4,
        enable_ipv6,
        custom_network_cfg,
        eni_config_annotation_def: r
            .string("ENI_CONFIG_ANNOTATION_DEF", "k8s.amazonaws.com/eniConfig"),
        eni_config_label_def: r.string("ENI_CONFIG_LABEL_DEF", "k8s.amazonaws.com/eniConfig"),
        enable_subnet_discovery: r.bool("ENABLE_SUBNET_DISCOVERY", true)?,
        disable_leaked_eni_cleanup: r.bool("DISABLE_LEAKED_ENI_CLEANUP", false)?,
        disable_network_resource_provisioning: r
            .bool("DISABLE_NETWORK_RESOURCE_PROVISIONING", false)?,
        manage_enis_non_schedulable: r.bool("AWS_MANAGE_ENIS_NON_SCHEDULABLE", false)?,
        annotate_pod_ip: r.bool("ANNOTATE_POD_IP", false)?,
        cluster_name: r.string("CLUSTER_NAME", ""),
        additional_eni_tags,
        ec2_endpoint: r.get("AWS_EC2_ENDPOINT").filter(|s| !s.is_empty()),
        backing_store,
        node_name: r.string("MY_NODE_NAME", ""),
        disable_introspection: r.bool("DISABLE_INTROSPECTION", false)?,
        introspection_bind_address,
        disable_metrics: r.bool("DISABLE_METRICS", false)?,
        metrics_bind_address,
        socket_path,
        external_snat: r.bool("AWS_VPC_K8S_CNI_EXTERNALSNAT", false)?,
        randomize_snat,
        exclude_snat_cidrs: r.cidrs("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS")?,
        external_service_cidrs: r.cidrs("AWS_EXTERNAL_SERVICE_CIDRS")?,
        node_port_support: r.bool("AWS_VPC_CNI_NODE_PORT_SUPPORT", true)?,
        connmark,
        eni_mtu,
        veth_prefix,
        add_wait: Duration::from_millis(r.u32("ADD_NETWORK_WAIT_MS", 10_000)? as u64),
    })
}

/// A listening address: `host:port`, `:port`, or `unix:/absolute/path`.
pub fn valid_listen_address(v: &str) -> bool {
    if let Some(p) = v.strip_prefix("unix:") {
        return p.starts_with('/') && p.len() > 1;
    }
    if let Some(port) = v.strip_prefix(':') {
        return port.parse::<u16>().is_ok();
    }
    v.parse::<std::net::SocketAddr>().is_ok()
}

impl Config {
    /// WARM_IP_TARGET or MINIMUM_IP_TARGET > 0 switches to IP-target mode.
    pub fn ip_target_mode(&self) -> bool {
        self.warm_ip_target.unwrap_or(0) > 0 || self.minimum_ip_target.unwrap_or(0) > 0
    }
}

fn parse_u32_any_base(s: &str) -> Option<u32> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

struct Reader<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
}

impl Reader<'_> {
    fn get(&self, var: &str) -> Option<String> {
        (self.get)(var)
    }

    fn err(&self, var: &str, expected: &str) -> ConfigError {
        ConfigError {
            var: var.to_string(),
            value: self.get(var).unwrap_or_default(),
            expected: expected.to_string(),
        }
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.get(var)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| default.to_string())
    }

    fn listen(&self, var: &str, default: &str) -> Result<String, ConfigError> {
        let v = self.string(var, default);
        if valid_listen_address(&v) {
            Ok(v)
        } else {
            Err(self.err(var, "host:port, :port or unix:/absolute/path"))
        }
    }

    /// Go's strconv.ParseBool, as upstream reads its knobs.
    fn bool(&self, var: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var).as_deref().map(str::trim) {
            None | Some("") => Ok(default),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
            Some(_) => Err(self.err(var, "true or false")),
        }
    }

    fn opt_u32(&self, var: &str) -> Result<Option<u32>, ConfigError> {
        match self.get(var).as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(s) => s
                .parse::<u32>()
                .map(Some)
                .map_err(|_| self.err(var, "a whole number, 0 or more")),
        }
    }

    fn u32(&self, var: &str, default: u32) -> Result<u32, ConfigError> {
        Ok(self.opt_u32(var)?.unwrap_or(default))
    }

    fn cidrs(&self, var: &str) -> Result<Vec<String>, ConfigError> {
        let Some(s) = self.get(var) else {
            return Ok(vec![]);
        };
        let mut out = Vec::new();
        for c in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if crate::net::parse_cidr(c).is_none() {
                return Err(self.err(
                    var,
                    &format!("comma-separated IPv4 CIDRs ({c:?} is not one)"),
                ));
            }
            out.push(c.to_string());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        for ok in ["127.0.0.1:61679", ":61678", "[::1]:80", "unix:/run/x.sock"] {
            assert!(valid_listen_address(ok), "{ok}");
        }
        for bad in [
            "localhost",
            "61679",
            ":http",
            "unix:rel",
            "unix:",
            "1.2.3.4",
        ] {
            assert!(!valid_listen_address(bad), "{bad}");
        }
        let e = from_env(|k| (k == "INTROSPECTION_BIND_ADDRESS").then(|| "nowhere".to_string()))
            .unwrap_err();
        assert!(e.to_string().contains("INTROSPECTION_BIND_ADDRESS"), "{e}");
    }

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_env(|k| map.get(k).cloned())
    }

    #[test]
    fn upstream_defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.warm_eni_target, 1);
        assert_eq!(c.warm_ip_target, None);
        assert_eq!(c.warm_prefix_target, 0);
        assert!(!c.enable_prefix_delegation);
        assert_eq!(c.ip_cooldown, Duration::from_secs(30));
        assert_eq!(c.backing_store, "/var/run/aws-node/ipam.json");
        assert_eq!(c.introspection_bind_address, "127.0.0.1:61679");
        assert_eq!(c.randomize_snat, RandomizeSnat::Prng);
        assert_eq!(c.connmark, 0x80);
        assert_eq!(c.eni_mtu, 9001);
        assert_eq!(c.veth_prefix, "eni");
        assert!(c.node_port_support && c.enable_subnet_discovery);
        assert_eq!(c.add_wait, Duration::from_secs(10));
        assert!(!c.ip_target_mode());
    }

    #[test]
    fn ip_target_mode_switch() {
        assert!(cfg(&[("WARM_IP_TARGET", "2")]).unwrap().ip_target_mode());
        assert!(cfg(&[("MINIMUM_IP_TARGET", "5")]).unwrap().ip_target_mode());
        assert!(!cfg(&[("WARM_IP_TARGET", "0")]).unwrap().ip_target_mode());
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, val) in [
            ("WARM_IP_TARGET", "-1"),
            ("WARM_ENI_TARGET", "lots"),
            ("ENABLE_PREFIX_DELEGATION", "yes please"),
            ("AWS_VPC_ENI_MTU", "9002"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "eth"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "toolong"),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "sometimes"),
            ("AWS_VPC_K8S_CNI_CONNMARK", "0x0"),
            ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.0.0.0/8,banana"),
            ("ADDITIONAL_ENI_TAGS", "{not json"),
            ("ADDITIONAL_ENI_TAGS", r#"{"k8s.amazonaws.com/x":"y"}"#),
            ("MAX_ENI", "0"),
        ] {
            let e = cfg(&[(var, val)]).unwrap_err();
            assert_eq!(e.var, var, "{e}");
            assert!(e.to_string().contains(var), "{e}");
        }
    }

    #[test]
    fn address_family_rules_are_upstreams_each_naming_its_knob() {
        let v6 = [("ENABLE_IPv6", "true"), ("ENABLE_IPv4", "false")];
        let pd = ("ENABLE_PREFIX_DELEGATION", "true");
        for (env, var, says) in [
            (vec![("ENABLE_IPv6", "true")], "ENABLE_IPv4", "dual-stack"),
            (
                vec![("ENABLE_IPv4", "false")],
                "ENABLE_IPv4",
                "one address family",
            ),
            (v6.to_vec(), "ENABLE_PREFIX_DELEGATION", "/80"),
            (
                [
                    &v6[..],
                    &[pd, ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true")],
                ]
                .concat(),
                "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG",
                "IPv4 only",
            ),
        ] {
            let e = cfg(&env).unwrap_err();
            assert_eq!(e.var, var, "{env:?}: {e}");
            assert!(e.to_string().contains(says), "{env:?}: {e}");
        }
        let c = cfg(&[&v6[..], &[pd]].concat()).unwrap();
        assert!(c.enable_ipv6 && !c.enable_ipv4 && c.enable_prefix_delegation);
    }

    #[test]
    fn unsupported_features_and_ill_formed_knobs_are_refused() {
        for (var, val) in [
            ("ENABLE_POD_ENI", "true"),
            ("POD_SECURITY_GROUP_ENFORCING_MODE", "lax"),
            ("AWS_VPC_K8S_CNI_LOG_FORMAT", "xml"),
            ("ADDITIONAL_ENI_TAGS", r#"{"":"x"}"#),
            ("ADDITIONAL_ENI_TAGS", r#"{"  ":"x"}"#),
        ] {
            let e = cfg(&[(var, val)]).unwrap_err();
            assert_eq!(e.var, var, "{e}");
        }
        let long = format!(r#"{{"{}":"x"}}"#, "k".repeat(129));
        assert_eq!(
            cfg(&[("ADDITIONAL_ENI_TAGS", &long)]).unwrap_err().var,
            "ADDITIONAL_ENI_TAGS"
        );
        // The socket must not be the checkpoint (binding it would unlink the file).
        let e = cfg(&[("IPAMD_SOCKET", "/var/run/aws-node/ipam.json")]).unwrap_err();
        assert_eq!(e.var, "IPAMD_SOCKET", "{e}");
        let e = cfg(&[(
            "INTROSPECTION_BIND_ADDRESS",
            "unix:/var/run/aws-node/ipamd.sock",
        )])
        .unwrap_err();
        assert_eq!(e.var, "INTROSPECTION_BIND_ADDRESS", "{e}");
        // What the manifest sets is accepted.
        cfg(&[
            ("ENABLE_POD_ENI", "false"),
            ("POD_SECURITY_GROUP_ENFORCING_MODE", "standard"),
            ("AWS_VPC_K8S_CNI_LOG_FORMAT", "json"),
        ])
        .unwrap();
    }

    #[test]
    fn parses_lists_and_tags() {
        let c = cfg(&[
            (
                "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                "10.0.0.0/8, 192.168.0.0/16",
            ),
            ("ADDITIONAL_ENI_TAGS", r#"{"team":"net"}"#),
            ("AWS_VPC_K8S_CNI_CONNMARK", "128"),
            ("ENABLE_PREFIX_DELEGATION", "True"),
        ])
        .unwrap();
        assert_eq!(c.exclude_snat_cidrs, vec!["10.0.0.0/8", "192.168.0.0/16"]);
        assert_eq!(
            c.additional_eni_tags.get("team").map(String::as_str),
            Some("net")
        );
        assert_eq!(c.connmark, 128);
        assert!(c.enable_prefix_delegation);
    }
}
