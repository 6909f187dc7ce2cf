//! The pod datapath of compat.md section 4, in one place.
//!
//! Pod side (interface `if_name`): `IP/32`; `169.254.1.1/32 dev if scope link`;
//! `default via 169.254.1.1`; a PERMANENT neighbour 169.254.1.1 -> host veth MAC.
//! Host side: `IP/32 dev <host veth> scope link`; rule `to IP lookup main` pref 512;
//! for an address on a secondary ENI, rule `from IP lookup <table>` pref 1536.

use std::net::Ipv4Addr;
use std::os::fd::RawFd;

use vpc_cni_netlink::{
    Link, MAIN_TABLE, NeighbourState, Netlink, NlResult, RouteScope, Rule, format_mac,
};

/// The pod's gateway: a link-local address that exists nowhere; the permanent
/// neighbour entry sends everything to the host veth.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const TO_POD_RULE_PRIORITY: u32 = 512;
pub const FROM_POD_RULE_PRIORITY: u32 = 1536;

pub use vpc_cni_proto::host_veth_name;

/// What to build for one pod.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub host_veth: String,
    pub if_name: String,
    pub ip: Ipv4Addr,
    pub mtu: u32,
    /// The secondary ENI's route table; `None` for the primary ENI.
    pub table: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Built {
    pub host: Link,
    pub pod: Link,
}

/// Builds the datapath. On error, what was created so far is left for
/// [`undo_setup`], which the caller runs.
pub async fn setup(
    host: &Netlink,
    pod: &Netlink,
    pod_netns: RawFd,
    spec: &PodSpec,
) -> NlResult<Built> {
    // A veth of an earlier sandbox of the same pod (same name), or an interface left
    // by an earlier ADD of this very sandbox, would make creation fail.
    if let Some(stale) = host.link(&spec.host_veth).await? {
        host.delete_link(stale.index).await?;
    }
    if let Some(stale) = pod.link(&spec.if_name).await? {
        pod.delete_link(stale.index).await?;
    }
    host.add_veth_into(&spec.host_veth, &spec.if_name, spec.mtu, pod_netns)
        .await?;
    let host_link = must_exist(host, &spec.host_veth, "host").await?;
    let pod_link = must_exist(pod, &spec.if_name, "pod").await?;

    pod.set_up(pod_link.index).await?;
    pod.add_address(pod_link.index, spec.ip, 32).await?;
    pod.replace_route(
        MAIN_TABLE,
        GATEWAY,
        32,
        None,
        pod_link.index,
        RouteScope::Link,
    )
    .await?;
    pod.replace_route(
        MAIN_TABLE,
        Ipv4Addr::UNSPECIFIED,
        0,
        Some(GATEWAY),
        pod_link.index,
        RouteScope::Universe,
    )
    .await?;
    pod.set_permanent_neighbour(pod_link.index, GATEWAY, &host_link.mac)
        .await?;

    host.set_up(host_link.index).await?;
    host.replace_route(
        MAIN_TABLE,
        spec.ip,
        32,
        None,
        host_link.index,
        RouteScope::Link,
    )
    .await?;
    host.add_rule(TO_POD_RULE_PRIORITY, MAIN_TABLE, None, Some((spec.ip, 32)))
        .await?;
    if let Some(table) = spec.table {
        host.add_rule(FROM_POD_RULE_PRIORITY, table, Some((spec.ip, 32)), None)
            .await?;
    }
    Ok(Built {
        host: host_link,
        pod: pod_link,
    })
}

async fn must_exist(nl: &Netlink, name: &str, side: &str) -> NlResult<Link> {
    nl.link(name)
        .await?
        .ok_or_else(|| vpc_cni_netlink::NlError {
            op: format!("find {side} end {name} of the new veth"),
            errno: None,
            text: "it does not exist right after creation".into(),
        })
}

/// Removes what a failed [`setup`] may have created: the veth pair (ours by name,
/// since setup replaced any older one) and the host rules of `ip`.
pub async fn undo_setup(host: &Netlink, spec: &PodSpec) -> NlResult<()> {
    if let Some(l) = host.link(&spec.host_veth).await? {
        host.delete_link(l.index).await?;
    }
    remove_host_rules(host, spec.ip).await
}

/// Deletes the policy rules this plugin adds for `ip` (pref 512 and 1536).
pub async fn remove_host_rules(host: &Netlink, ip: Ipv4Addr) -> NlResult<()> {
    for r in host.rules().await? {
        if is_pod_rule(&r, ip) {
            host.delete_rule(&r).await?;
        }
    }
    Ok(())
}

fn is_pod_rule(r: &Rule, ip: Ipv4Addr) -> bool {
    (r.priority == TO_POD_RULE_PRIORITY && r.to == Some((ip, 32)) && r.from.is_none())
        || (r.priority == FROM_POD_RULE_PRIORITY && r.from == Some((ip, 32)) && r.to.is_none())
}

/// Deletes the pod's interface inside its namespace, which destroys the host end
/// (and with it the host route) too. Returns the IPv4 address it carried.
pub async fn remove_pod_interface(pod: &Netlink, if_name: &str) -> NlResult<Option<Ipv4Addr>> {
    let Some(link) = pod.link(if_name).await? else {
        return Ok(None);
    };
    let ip = pod
        .ipv4_addresses(link.index)
        .await?
        .into_iter()
        .find(|(_, len)| *len == 32)
        .map(|(ip, _)| ip);
    pod.delete_link(link.index).await?;
    Ok(ip)
}

/// CHECK: every piece of the datapath is as ADD left it. Returns what differs.
pub async fn check(host: &Netlink, pod: &Netlink, spec: &PodSpec) -> NlResult<Vec<String>> {
    let mut wrong = Vec::new();
    let Some(pod_link) = pod.link(&spec.if_name).await? else {
        return Ok(vec![format!("pod interface {} is missing", spec.if_name)]);
    };
    let Some(host_link) = host.link(&spec.host_veth).await? else {
        return Ok(vec![format!("host veth {} is missing", spec.host_veth)]);
    };
    if !pod_link.up {
        wrong.push(format!("pod interface {} is down", spec.if_name));
    }
    if !host_link.up {
        wrong.push(format!("host veth {} is down", spec.host_veth));
    }
    if pod_link.mtu != spec.mtu {
        wrong.push(format!(
            "pod interface MTU is {}, expected {}",
            pod_link.mtu, spec.mtu
        ));
    }
    if !pod
        .ipv4_addresses(pod_link.index)
        .await?
        .contains(&(spec.ip, 32))
    {
        wrong.push(format!("pod interface lacks address {}/32", spec.ip));
    }
    let pod_routes = pod.routes().await?;
    let has = |dst: Ipv4Addr, len: u8, gw: Option<Ipv4Addr>| {
        pod_routes.iter().any(|r| {
            r.table == MAIN_TABLE
                && r.dst == dst
                && r.dst_len == len
                && r.gateway == gw
                && r.oif == Some(pod_link.index)
        })
    };
    if !has(GATEWAY, 32, None) {
        wrong.push(format!("pod lacks route {GATEWAY}/32 dev {}", spec.if_name));
    }
    if !has(Ipv4Addr::UNSPECIFIED, 0, Some(GATEWAY)) {
        wrong.push(format!("pod lacks default route via {GATEWAY}"));
    }
    let neigh_ok = pod
        .neighbours(pod_link.index)
        .await?
        .iter()
        .any(|(ip, mac, st)| {
            *ip == GATEWAY && *mac == host_link.mac && *st == NeighbourState::Permanent
        });
    if !neigh_ok {
        wrong.push(format!(
            "pod lacks PERMANENT neighbour {GATEWAY} lladdr {}",
            format_mac(&host_link.mac)
        ));
    }
    let host_route_ok = host.routes().await?.iter().any(|r| {
        r.table == MAIN_TABLE
            && r.dst == spec.ip
            && r.dst_len == 32
            && r.oif == Some(host_link.index)
    });
    if !host_route_ok {
        wrong.push(format!(
            "host lacks route {}/32 dev {}",
            spec.ip, spec.host_veth
        ));
    }
    let rules = host.rules().await?;
    if !rules.iter().any(|r| {
        r.priority == TO_POD_RULE_PRIORITY && r.to == Some((spec.ip, 32)) && r.table == MAIN_TABLE
    }) {
        wrong.push(format!(
            "host lacks rule to {} lookup main pref 512",
            spec.ip
        ));
    }
    if let Some(t) = spec.table
        && !rules.iter().any(|r| {
            r.priority == FROM_POD_RULE_PRIORITY && r.from == Some((spec.ip, 32)) && r.table == t
        })
    {
        wrong.push(format!(
            "host lacks rule from {} lookup {t} pref 1536",
            spec.ip
        ));
    }
    Ok(wrong)
}
