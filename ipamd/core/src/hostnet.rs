//! The node side of the datapath that ipamd owns (compat.md section 4): secondary ENI
//! links, their route tables and rules, the node-wide rules, and the SNAT / CONNMARK
//! iptables rules. This module holds the expected state as plain data, computed from the
//! knobs; `HostNetwork` is what applies it (netlink + iptables in the `ipamd` crate).

use std::net::Ipv4Addr;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{Config, RandomizeSnat};
use crate::net::{Ipv4Net, parse_cidr};

/// `fwmark <connmark>/<connmark> lookup main`: marked traffic leaves by the primary ENI.
pub const FWMARK_RULE_PRIORITY: u32 = 1024;
/// `to <AWS_EXTERNAL_SERVICE_CIDRS> lookup main`.
pub const EXTERNAL_SERVICE_RULE_PRIORITY: u32 = 1535;
/// `from <secondary ENI primary IP> lookup <device + 1>`.
pub const ENI_RULE_PRIORITY: u32 = 32765;

pub const SNAT_CHAIN: &str = "AWS-SNAT-CHAIN-0";
pub const CONNMARK_CHAIN: &str = "AWS-CONNMARK-CHAIN-0";

/// Everything node-wide that the host setup depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNet {
    pub primary_mac: String,
    pub primary_ip: Ipv4Addr,
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub exclude_snat_cidrs: Vec<Ipv4Net>,
    pub external_service_cidrs: Vec<Ipv4Net>,
    pub external_snat: bool,
    pub randomize_snat: RandomizeSnat,
    pub connmark: u32,
    pub node_port_support: bool,
    pub veth_prefix: String,
}

impl NodeNet {
    pub fn new(cfg: &Config, primary_mac: &str, primary_ip: Ipv4Addr, vpc: &[Ipv4Net]) -> Self {
        let cidrs = |v: &[String]| v.iter().filter_map(|c| parse_cidr(c)).collect();
        NodeNet {
            primary_mac: primary_mac.to_string(),
            primary_ip,
            vpc_cidrs: vpc.to_vec(),
            exclude_snat_cidrs: cidrs(&cfg.exclude_snat_cidrs),
            external_service_cidrs: cidrs(&cfg.external_service_cidrs),
            external_snat: cfg.external_snat,
            randomize_snat: cfg.randomize_snat,
            connmark: cfg.connmark,
            node_port_support: cfg.node_port_support,
            veth_prefix: cfg.veth_prefix.clone(),
        }
    }

    /// The fwmark rule steers SNATed and NodePort traffic through the primary ENI.
    pub fn wants_fwmark_rule(&self) -> bool {
        self.node_port_support || !self.external_snat
    }
}

/// One secondary ENI as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniNet {
    pub id: String,
    pub mac: String,
    pub device_number: u32,
    pub primary_ip: Ipv4Addr,
    pub subnet_cidr: Ipv4Net,
    pub mtu: u32,
}

impl EniNet {
    /// Its route table: device number + 1.
    pub fn table(&self) -> u32 {
        self.device_number + 1
    }

    /// The subnet's router: the first address after the network address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet_cidr.addr) + 1)
    }
}

/// The rules one chain must hold, in order, as `iptables -S` prints them (without the
/// leading `-A <chain>`). `owned` chains are ours entirely; in the others (the built-in
/// chains) only our rules are managed and everyone else's are left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainPlan {
    pub table: &'static str,
    pub chain: &'static str,
    pub owned: bool,
    pub rules: Vec<String>,
}

/// Is this rule (as printed by `iptables -S`) one of ours? Ours carry an "AWS" comment
/// or jump to an AWS-* chain; kube-proxy's KUBE-* rules never match.
pub fn is_ours(rule: &str) -> bool {
    rule.contains("--comment \"AWS") || rule.contains("--comment AWS") || rule.contains("-j AWS-")
}

/// The AWS-* chains this setup keeps; any other AWS-* chain is stale.
pub fn owned_chains(plan: &[ChainPlan]) -> Vec<(&'static str, &'static str)> {
    plan.iter()
        .filter(|c| c.owned)
        .map(|c| (c.table, c.chain))
        .collect()
}

/// The expected iptables state for this node, `primary_if` being the primary ENI's link.
pub fn iptables_plan(n: &NodeNet, primary_if: &str) -> Vec<ChainPlan> {
    let mark = format!("{:#x}", n.connmark);
    let veths = format!("{}+", n.veth_prefix);
    let mut plan = Vec::new();
    let mut postrouting = Vec::new();
    let mut nat_prerouting = Vec::new();
    if !n.external_snat {
        let mut snat: Vec<String> = n
            .vpc_cidrs
            .iter()
            .map(|c| format!("-d {c} -m comment --comment \"AWS SNAT CHAIN\" -j RETURN"))
            .collect();
        snat.extend(n.exclude_snat_cidrs.iter().map(|c| {
            format!("-d {c} -m comment --comment \"AWS SNAT CHAIN EXCLUSION\" -j RETURN")
        }));
        let random = match n.randomize_snat {
            RandomizeSnat::Prng => " --random-fully",
            RandomizeSnat::HashRandom => " --random",
            RandomizeSnat::None => "",
        };
        snat.push(format!(
            "! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source {}{random}",
            n.primary_ip
        ));
        plan.push(ChainPlan {
            table: "nat",
            chain: SNAT_CHAIN,
            owned: true,
            rules: snat,
        });
        postrouting.push(format!(
            "-m comment --comment \"AWS SNAT CHAIN\" -j {SNAT_CHAIN}"
        ));

        let mut connmark: Vec<String> = n
            .vpc_cidrs
            .iter()
            .map(|c| {
                format!("-d {c} -m comment --comment \"AWS CONNMARK CHAIN, VPC CIDR\" -j RETURN")
            })
            .collect();
        connmark.extend(n.exclude_snat_cidrs.iter().map(|c| {
            format!("-d {c} -m comment --comment \"AWS CONNMARK CHAIN, EXCLUDED CIDR\" -j RETURN")
        }));
        connmark.push(format!(
            "-m comment --comment \"AWS, CONNMARK\" -j CONNMARK --set-xmark {mark}/{mark}"
        ));
        plan.push(ChainPlan {
            table: "nat",
            chain: CONNMARK_CHAIN,
            owned: true,
            rules: connmark,
        });
        nat_prerouting.push(format!(
            "-i {veths} -m comment --comment \"AWS, outbound connections\" -j {CONNMARK_CHAIN}"
        ));
        nat_prerouting.push(format!(
            "-m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --nfmask {mark} --ctmask {mark}"
        ));
    }
    plan.push(ChainPlan {
        table: "nat",
        chain: "PREROUTING",
        owned: false,
        rules: nat_prerouting,
    });
    plan.push(ChainPlan {
        table: "nat",
        chain: "POSTROUTING",
        owned: false,
        rules: postrouting,
    });
    let mut mangle = Vec::new();
    if n.node_port_support {
        mangle.push(format!(
            "-i {primary_if} -m comment --comment \"AWS, primary ENI\" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark {mark}/{mark}"
        ));
        mangle.push(format!(
            "-i {veths} -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --nfmask {mark} --ctmask {mark}"
        ));
    }
    plan.push(ChainPlan {
        table: "mangle",
        chain: "PREROUTING",
        owned: false,
        rules: mangle,
    });
    plan
}

/// What ipamd does to the host. Every method converges: running it again, or after
/// someone changed the host, leaves exactly the expected state.
#[async_trait]
pub trait HostNetwork: Send + Sync {
    /// Node-wide rules, rp_filter and iptables.
    async fn setup_node(&self, n: &NodeNet) -> Result<(), String>;
    /// One secondary ENI: waits up to `wait` for its link to appear.
    async fn setup_eni(&self, eni: &EniNet, wait: Duration) -> Result<(), String>;
    /// Undoes `setup_eni` (before the ENI is detached).
    async fn teardown_eni(&self, eni: &EniNet) -> Result<(), String>;
    /// Pods' host routes (address, host veth), to rebuild a lost checkpoint.
    async fn pod_routes(&self) -> Result<Vec<(Ipv4Addr, String)>, String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cfg: &[(&str, &str)]) -> NodeNet {
        let c = crate::config::from_env(|k| {
            cfg.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
        .unwrap();
        NodeNet::new(
            &c,
            "02:00:00:00:00:01",
            "10.0.0.4".parse().unwrap(),
            &[parse_cidr("10.0.0.0/16").unwrap()],
        )
    }

    fn rules<'a>(p: &'a [ChainPlan], table: &str, chain: &str) -> &'a [String] {
        &p.iter()
            .find(|c| c.table == table && c.chain == chain)
            .unwrap()
            .rules
    }

    #[test]
    fn defaults_match_upstream() {
        let p = iptables_plan(&node(&[]), "eth0");
        assert_eq!(
            rules(&p, "nat", "AWS-SNAT-CHAIN-0"),
            [
                "-d 10.0.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN",
                "! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 10.0.0.4 --random-fully",
            ]
        );
        assert_eq!(
            rules(&p, "nat", "POSTROUTING"),
            ["-m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0"]
        );
        assert_eq!(
            rules(&p, "nat", "PREROUTING"),
            [
                "-i eni+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0",
                "-m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80",
            ]
        );
        assert_eq!(
            rules(&p, "nat", "AWS-CONNMARK-CHAIN-0"),
            [
                "-d 10.0.0.0/16 -m comment --comment \"AWS CONNMARK CHAIN, VPC CIDR\" -j RETURN",
                "-m comment --comment \"AWS, CONNMARK\" -j CONNMARK --set-xmark 0x80/0x80",
            ]
        );
        assert_eq!(
            rules(&p, "mangle", "PREROUTING"),
            [
                "-i eth0 -m comment --comment \"AWS, primary ENI\" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark 0x80/0x80",
                "-i eni+ -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80",
            ]
        );
        assert!(node(&[]).wants_fwmark_rule());
    }

    #[test]
    fn knobs_change_the_rules() {
        let n = node(&[
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "hashrandom"),
            (
                "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                "172.16.0.0/12,192.168.1.0/24",
            ),
            ("AWS_VPC_K8S_CNI_CONNMARK", "0x40"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "veth"),
            ("AWS_VPC_CNI_NODE_PORT_SUPPORT", "false"),
        ]);
        let p = iptables_plan(&n, "ens5");
        let snat = rules(&p, "nat", "AWS-SNAT-CHAIN-0");
        assert_eq!(snat.len(), 4);
        assert_eq!(
            snat[1],
            "-d 172.16.0.0/12 -m comment --comment \"AWS SNAT CHAIN EXCLUSION\" -j RETURN"
        );
        assert!(snat[3].ends_with("--to-source 10.0.0.4 --random"));
        assert!(rules(&p, "nat", "PREROUTING")[0].starts_with("-i veth+ "));
        assert!(rules(&p, "nat", "PREROUTING")[1].ends_with("--nfmask 0x40 --ctmask 0x40"));
        assert!(rules(&p, "mangle", "PREROUTING").is_empty());
        assert!(n.wants_fwmark_rule(), "SNAT still needs the fwmark rule");

        let none = node(&[("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "none")]);
        let p = iptables_plan(&none, "eth0");
        assert!(rules(&p, "nat", "AWS-SNAT-CHAIN-0")[1].ends_with("--to-source 10.0.0.4"));

        let ext = node(&[
            ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "true"),
            ("AWS_VPC_CNI_NODE_PORT_SUPPORT", "false"),
        ]);
        let p = iptables_plan(&ext, "eth0");
        assert!(
            owned_chains(&p).is_empty(),
            "no AWS-* chain with external SNAT"
        );
        assert!(p.iter().all(|c| c.rules.is_empty()));
        assert!(!ext.wants_fwmark_rule());
    }

    #[test]
    fn ours_and_theirs() {
        assert!(is_ours(
            "-m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0"
        ));
        assert!(is_ours("-j AWS-SNAT-CHAIN-1"));
        assert!(!is_ours(
            "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
        ));
    }

    #[test]
    fn eni_table_and_gateway() {
        let e = EniNet {
            id: "eni-1".into(),
            mac: "02:00:00:00:00:02".into(),
            device_number: 2,
            primary_ip: "10.0.1.9".parse().unwrap(),
            subnet_cidr: parse_cidr("10.0.1.0/24").unwrap(),
            mtu: 9001,
        };
        assert_eq!(e.table(), 3);
        assert_eq!(e.gateway().to_string(), "10.0.1.1");
    }
}
