//! The host network, for real: secondary ENI links, route tables and rules through
//! netlink (`vpc_cni_netlink`, shared with the plugin), rp_filter through /proc/sys, and the SNAT /
//! CONNMARK rules through the `iptables` crate (either back end). Everything converges:
//! compare with the expected state, change only what differs.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ipamd_core::hostnet::{
    ChainPlan, ENI_RULE_PRIORITY, EXTERNAL_SERVICE_RULE_PRIORITY, EniNet, FWMARK_RULE_PRIORITY,
    HostNetwork, NodeNet, iptables_plan, is_ours, owned_chains,
};
use iptables::IPTables;
use tracing::{debug, info};
use vpc_cni_netlink::{Link, MAIN_TABLE, Netlink, Route, RouteScope};

/// Which iptables back end to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The system's `iptables` (whatever its alternative points at).
    System,
    Nft,
    Legacy,
}

impl Backend {
    /// `IPAMD_IPTABLES_MODE`: `auto` (default: legacy if only the legacy tables hold
    /// rules, as kube-proxy's iptables-wrapper decides), `nft` or `legacy`.
    pub fn from_env(v: Option<&str>) -> Result<Backend, String> {
        let b = match v.unwrap_or("auto") {
            "nft" => Backend::Nft,
            "legacy" => Backend::Legacy,
            "auto" => Backend::detect(),
            other => {
                return Err(format!(
                    "IPAMD_IPTABLES_MODE={other:?} is invalid: auto, nft or legacy"
                ));
            }
        };
        b.binary()
            .map_err(|e| format!("IPAMD_IPTABLES_MODE: {e}"))?;
        Ok(b)
    }

    fn detect() -> Backend {
        let rules = |b: Backend| {
            let Ok(cmd) = b.binary() else { return 0 };
            std::process::Command::new(format!("{cmd}-save"))
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter(|l| l.starts_with("-A "))
                        .count()
                })
                .unwrap_or(0)
        };
        if rules(Backend::Legacy) > 0 && rules(Backend::Nft) == 0 {
            Backend::Legacy
        } else {
            Backend::System
        }
    }

    fn command(self) -> &'static str {
        match self {
            Backend::System => "iptables",
            Backend::Nft => "iptables-nft",
            Backend::Legacy => "iptables-legacy",
        }
    }

    /// The back end's binary by absolute path: PATH first, then the sbin directories a
    /// daemon's PATH often lacks.
    pub fn binary(self) -> Result<&'static str, String> {
        static FOUND: std::sync::OnceLock<Vec<(Backend, &'static str)>> =
            std::sync::OnceLock::new();
        let name = self.command();
        let found = FOUND.get_or_init(|| {
            let path = std::env::var("PATH").unwrap_or_default();
            let dirs: Vec<String> = path
                .split(':')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(String::from))
                .collect();
            [Backend::System, Backend::Nft, Backend::Legacy]
                .into_iter()
                .filter_map(|b| {
                    let p = dirs
                        .iter()
                        .map(|d| std::path::Path::new(d).join(b.command()))
                        .find(|p| p.is_file())?;
                    Some((b, &*Box::leak(p.display().to_string().into_boxed_str())))
                })
                .collect()
        });
        found
            .iter()
            .find(|(b, _)| *b == self)
            .map(|(_, p)| *p)
            .ok_or_else(|| format!("{name} not found in PATH or /usr/sbin, /sbin"))
    }

    fn iptables(self, cmd: &'static str) -> IPTables {
        IPTables {
            cmd,
            has_check: true,
            has_wait: true,
            // `chain_exists` runs `iptables -L <chain>`: without -n every address in the
            // chain is looked up in DNS (5 s per lookup where DNS is unreachable).
            is_numeric: true,
        }
    }
}

pub struct LinuxHost {
    nl: Netlink,
    backend: Backend,
    veth_prefix: String,
}

fn nl_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl LinuxHost {
    /// Opens a netlink socket in the current network namespace (call inside tokio).
    pub fn new(backend: Backend, veth_prefix: &str) -> std::io::Result<LinuxHost> {
        Ok(LinuxHost {
            nl: Netlink::connect()?,
            backend,
            veth_prefix: veth_prefix.to_string(),
        })
    }

    async fn link_by_mac(&self, mac: &str, wait: Duration) -> Result<Link, String> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(l) = self.nl.link_by_mac(mac).await.map_err(nl_err)? {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(format!("no link with MAC {mac} on the host"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn converge_rules(&self, n: &NodeNet) -> Result<(), String> {
        let rules = self.nl.rules().await.map_err(nl_err)?;
        // fwmark <mark>/<mark> lookup main, pref 1024: exactly one, or none.
        let want_mark = n.wants_fwmark_rule().then_some((n.connmark, n.connmark));
        let mut have_mark = false;
        for r in rules.iter().filter(|r| r.priority == FWMARK_RULE_PRIORITY) {
            if r.fwmark.is_some() && r.fwmark == want_mark && r.table == MAIN_TABLE && !have_mark {
                have_mark = true;
            } else {
                self.nl.delete_rule(r).await.map_err(nl_err)?;
            }
        }
        if let (Some((mark, mask)), false) = (want_mark, have_mark) {
            self.nl
                .add_fwmark_rule(FWMARK_RULE_PRIORITY, MAIN_TABLE, mark, mask)
                .await
                .map_err(nl_err)?;
        }
        // to <cidr> lookup main, pref 1535, for each AWS_EXTERNAL_SERVICE_CIDRS entry.
        let want: Vec<(Ipv4Addr, u8)> = n
            .external_service_cidrs
            .iter()
            .map(|c| (c.addr, c.len))
            .collect();
        let mut seen = Vec::new();
        for r in rules
            .iter()
            .filter(|r| r.priority == EXTERNAL_SERVICE_RULE_PRIORITY)
        {
            match r.to {
                Some(to) if want.contains(&to) && r.table == MAIN_TABLE && !seen.contains(&to) => {
                    seen.push(to)
                }
                _ => self.nl.delete_rule(r).await.map_err(nl_err)?,
            }
        }
        for to in want.iter().filter(|t| !seen.contains(t)) {
            self.nl
                .add_rule(EXTERNAL_SERVICE_RULE_PRIORITY, MAIN_TABLE, None, Some(*to))
                .await
                .map_err(nl_err)?;
        }
        Ok(())
    }
}

/// Sets a sysctl of the current network namespace.
fn sysctl(path: &str, value: &str) -> Result<(), String> {
    let full = format!("/proc/sys/{path}");
    let now = std::fs::read_to_string(&full).unwrap_or_default();
    if now.trim() == value {
        return Ok(());
    }
    std::fs::write(&full, value).map_err(|e| format!("cannot set {full} to {value}: {e}"))
}

fn ipt<T>(what: &str, r: Result<T, Box<dyn std::error::Error>>) -> Result<T, String> {
    r.map_err(|e| format!("iptables {what}: {e}"))
}

/// Brings iptables to `plan`; returns what it changed (empty when already converged).
pub fn converge_iptables(ipt_: &IPTables, plan: &[ChainPlan]) -> Result<Vec<String>, String> {
    let mut changed = Vec::new();
    let keep = owned_chains(plan);
    for table in ["nat", "mangle"] {
        // 1. Our own chains: exactly the planned rules.
        for c in plan.iter().filter(|c| c.owned && c.table == table) {
            if !ipt("chain check", ipt_.chain_exists(table, c.chain))? {
                ipt("new chain", ipt_.new_chain(table, c.chain))?;
                changed.push(format!("created {table} {}", c.chain));
            }
            let have = list_rules(ipt_, table, c.chain)?;
            if have != c.rules {
                ipt("flush", ipt_.flush_chain(table, c.chain))?;
                for r in &c.rules {
                    ipt("append", ipt_.append(table, c.chain, r))?;
                }
                changed.push(format!("rewrote {table} {}", c.chain));
            }
        }
        // 2. Built-in chains: our rules, in order, after everyone else's are untouched.
        for c in plan.iter().filter(|c| !c.owned && c.table == table) {
            let ours: Vec<String> = list_rules(ipt_, table, c.chain)?
                .into_iter()
                .filter(|r| is_ours(r))
                .collect();
            if ours != c.rules {
                for r in &ours {
                    ipt("delete", ipt_.delete(table, c.chain, r))?;
                }
                for r in &c.rules {
                    ipt("append", ipt_.append(table, c.chain, r))?;
                }
                changed.push(format!("rewrote our rules in {table} {}", c.chain));
            }
        }
        // 3. Stale AWS-* chains (an older layout, or a knob turned off): nothing jumps to
        //    them any more after step 2 (every jump to AWS-* is ours), so remove them.
        let chains = ipt("list chains", ipt_.list_chains(table))?;
        for stale in chains
            .iter()
            .filter(|c| c.starts_with("AWS-") && !keep.contains(&(table, c.as_str())))
        {
            ipt("flush", ipt_.flush_chain(table, stale))?;
        }
        for stale in chains
            .iter()
            .filter(|c| c.starts_with("AWS-") && !keep.contains(&(table, c.as_str())))
        {
            ipt("delete chain", ipt_.delete_chain(table, stale))?;
            changed.push(format!("removed stale {table} {stale}"));
        }
    }
    Ok(changed)
}

/// The rule of an IPv6 node that keeps pods' IPv4 egress addresses (egress-cni's
/// 169.254.172.0/22) unreachable: new connections to them are refused in FORWARD.
pub const EGRESS_BLOCK_RULE: &str = "-d 169.254.172.0/22 -m conntrack --ctstate NEW -m comment --comment \"AWS, block node-local pod access via IPv4\" -j REJECT --reject-with icmp-port-unreachable";
/// Upstream's comment on the same rule (it inserts one more copy at every start).
const UPSTREAM_EGRESS_BLOCK_COMMENT: &str = "Block Node Local Pod access via IPv4";

/// An IPv6 node's host state (ENABLE_IPv6): IPv6 forwarding on, and
/// [`EGRESS_BLOCK_RULE`] exactly once, first in filter FORWARD (before any ACCEPT of
/// kube-proxy's or a runtime's). Upstream's copies of the rule are replaced by it.
/// Returns what it changed.
pub fn converge_ipv6_node(backend: Backend) -> Result<Vec<String>, String> {
    let mut changed = Vec::new();
    for (path, value) in [
        ("net/ipv6/conf/all/forwarding", "1"),
        ("net/ipv4/ip_forward", "1"),
    ] {
        let full = format!("/proc/sys/{path}");
        if std::fs::read_to_string(&full).unwrap_or_default().trim() != value {
            sysctl(path, value)?;
            changed.push(format!("{full} = {value}"));
        }
    }
    let ipt_ = backend.iptables(backend.binary()?);
    let have = list_rules(&ipt_, "filter", "FORWARD")?;
    let blocks: Vec<&String> = have
        .iter()
        .filter(|r| {
            r.contains(UPSTREAM_EGRESS_BLOCK_COMMENT) || r.contains("AWS, block node-local")
        })
        .collect();
    let first_ok = have.first().is_some_and(|r| r == EGRESS_BLOCK_RULE);
    if !(first_ok && blocks.len() == 1) {
        for r in &blocks {
            ipt("delete", ipt_.delete("filter", "FORWARD", r))?;
        }
        ipt(
            "insert",
            ipt_.insert("filter", "FORWARD", EGRESS_BLOCK_RULE, 1),
        )?;
        changed.push(format!(
            "filter FORWARD: the egress block rule first ({} copies before)",
            blocks.len()
        ));
    }
    Ok(changed)
}

/// A chain's rules as `iptables -S` prints them, without `-A <chain> `.
fn list_rules(ipt_: &IPTables, table: &str, chain: &str) -> Result<Vec<String>, String> {
    // (`IPTables::list` ignores the exit status: a failed listing would look empty.)
    let out = ipt("list", ipt_.execute(table, &format!("-S {chain}")))?;
    if !out.status.success() {
        return Err(format!(
            "iptables -t {table} -S {chain}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let prefix = format!("-A {chain} ");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .collect())
}

#[async_trait]
impl HostNetwork for LinuxHost {
    async fn setup_node(&self, n: &NodeNet) -> Result<(), String> {
        let primary = self
            .nl
            .link_by_mac(&n.primary_mac)
            .await
            .map_err(nl_err)?
            .ok_or_else(|| format!("no link with the primary ENI's MAC {}", n.primary_mac))?;
        sysctl(&format!("net/ipv4/conf/{}/rp_filter", primary.name), "2")?;
        // Pods are routed through the node: forwarding must be on (node images turn it
        // on for kubelet; a node without it would strand every pod).
        sysctl("net/ipv4/ip_forward", "1")?;
        self.converge_rules(n).await?;
        let plan = iptables_plan(n, &primary.name);
        let ipt_ = self.backend.iptables(self.backend.binary()?);
        let changed = tokio::task::spawn_blocking(move || converge_iptables(&ipt_, &plan))
            .await
            .map_err(|e| format!("iptables task: {e}"))??;
        if changed.is_empty() {
            debug!("iptables already as expected");
        } else {
            info!(?changed, "iptables converged");
        }
        Ok(())
    }

    async fn setup_eni(&self, e: &EniNet, wait: Duration) -> Result<(), String> {
        let link = self.link_by_mac(&e.mac, wait).await?;
        let i = link.index;
        if link.mtu != e.mtu || !link.up {
            self.nl.set_mtu_up(i, e.mtu).await.map_err(nl_err)?;
        }
        let len = e.subnet_cidr.len;
        for (ip, l) in self.nl.ipv4_addresses(i).await.map_err(nl_err)? {
            if (ip, l) != (e.primary_ip, len) {
                self.nl.delete_address(i, ip, l).await.map_err(nl_err)?;
            }
        }
        self.nl
            .add_address_noprefixroute(i, e.primary_ip, len)
            .await
            .map_err(nl_err)?;
        let gw = e.gateway();
        let table = e.table();
        let routes = self.nl.routes().await.map_err(nl_err)?;
        for r in &routes {
            let stale_main =
                r.table == MAIN_TABLE && r.oif == Some(i) && r.dst_len == len && r.dst_len < 32;
            let stale_table = r.table == table
                && !((r.dst, r.dst_len, r.oif) == (gw, 32, Some(i)) && r.gateway.is_none()
                    || (r.dst_len, r.gateway, r.oif) == (0, Some(gw), Some(i)));
            if stale_main || stale_table {
                self.nl.delete_route(r).await.map_err(nl_err)?;
            }
        }
        self.nl
            .replace_route(table, gw, 32, None, i, RouteScope::Link)
            .await
            .map_err(nl_err)?;
        self.nl
            .replace_route(
                table,
                Ipv4Addr::UNSPECIFIED,
                0,
                Some(gw),
                i,
                RouteScope::Universe,
            )
            .await
            .map_err(nl_err)?;
        let from = Some((e.primary_ip, 32));
        let mut have = false;
        for r in self.nl.rules().await.map_err(nl_err)? {
            if r.priority != ENI_RULE_PRIORITY {
                continue;
            }
            if r.from == from && r.table == table && !have {
                have = true;
            } else if r.from == from || r.table == table {
                // The same address or table left by an earlier ENI at this device.
                self.nl.delete_rule(&r).await.map_err(nl_err)?;
            }
        }
        if !have {
            self.nl
                .add_rule(ENI_RULE_PRIORITY, table, from, None)
                .await
                .map_err(nl_err)?;
        }
        Ok(())
    }

    async fn teardown_eni(&self, e: &EniNet) -> Result<(), String> {
        let table = e.table();
        for r in self.nl.rules().await.map_err(nl_err)? {
            if r.priority == ENI_RULE_PRIORITY
                && (r.table == table || r.from == Some((e.primary_ip, 32)))
            {
                self.nl.delete_rule(&r).await.map_err(nl_err)?;
            }
        }
        let routes: Vec<Route> = self.nl.routes().await.map_err(nl_err)?;
        for r in routes.iter().filter(|r| r.table == table) {
            self.nl.delete_route(r).await.map_err(nl_err)?;
        }
        if let Some(l) = self.nl.link_by_mac(&e.mac).await.map_err(nl_err)? {
            self.nl
                .delete_address(l.index, e.primary_ip, e.subnet_cidr.len)
                .await
                .map_err(nl_err)?;
        }
        Ok(())
    }

    async fn pod_routes(&self) -> Result<Vec<(Ipv4Addr, String)>, String> {
        let links = self.nl.links().await.map_err(nl_err)?;
        let routes = self.nl.routes().await.map_err(nl_err)?;
        Ok(routes
            .into_iter()
            .filter(|r| r.table == MAIN_TABLE && r.dst_len == 32)
            .filter_map(|r| {
                let l = links.iter().find(|l| Some(l.index) == r.oif)?;
                l.name
                    .starts_with(&self.veth_prefix)
                    .then(|| (r.dst, l.name.clone()))
            })
            .collect())
    }
}
