//! The pod datapath of compat.md section 4, in one place.
//!
//! Pod side (interface `if_name`): `IP/32`; `169.254.1.1/32 dev if scope link`;
//! `default via 169.254.1.1`; a PERMANENT neighbour 169.254.1.1 -> host veth MAC.
//! Host side: `IP/32 dev <host veth> scope link`; rule `to IP lookup main` pref 512;
//! for an address on a secondary ENI, rule `from IP lookup <table>` pref 1536.
//! The host veth carries a MAC no other host link has, and upstream's IPv6 settings
//! (`accept_ra=0`, `accept_redirects=1`, `forwarding=0`) whatever the node's defaults.
//! Routes are `proto boot`, as upstream's. txqueuelen stays the kernel's 1000 (upstream
//! leaves 0, which turns any queueing discipline later attached into a one-packet queue).
//!
//! An IPv6 pod (ENABLE_IPv6) gets the same shape with `IP/128` and the gateway `fe80::1`,
//! as upstream's driver. Upstream then waits up to 10 s for duplicate-address detection
//! to finish; here nothing is ever tentative: the pod's address is added `nodad` (ipamd
//! made it unique) and both veth ends have `accept_dad=0` before they are up, so the pod
//! can send, and the host resolve it, the moment ADD answers.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use vpc_cni_netlink::{
    Family, Link, MAIN_TABLE, NeighbourState, Netlink, NlResult, Route, RouteScope, Rule,
    format_mac,
};

/// The pod's gateway: a link-local address that exists nowhere; the permanent
/// neighbour entry sends everything to the host veth.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// An IPv6 pod's gateway, as upstream's.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
pub const TO_POD_RULE_PRIORITY: u32 = 512;
pub const FROM_POD_RULE_PRIORITY: u32 = 1536;

pub use vpc_cni_proto::host_veth_name;

/// A pod address family: its gateway and default route.
pub trait PodFamily: Family {
    const GATEWAY: Self;
    /// The default route's destination, as CNI results write it.
    const DEFAULT_DST: &'static str;
    /// `net/ipv6/conf/<link>/*` settings of the pod's interface, written before it is up.
    const POD_IF_SYSCTLS: &'static [(&'static str, &'static str)];
    /// Settings of the host veth beyond upstream's [`HOST_VETH_SYSCTLS`].
    const HOST_VETH_EXTRA_SYSCTLS: &'static [(&'static str, &'static str)];
}

impl PodFamily for Ipv4Addr {
    const GATEWAY: Self = GATEWAY;
    const DEFAULT_DST: &'static str = "0.0.0.0/0";
    const POD_IF_SYSCTLS: &'static [(&'static str, &'static str)] = &[];
    const HOST_VETH_EXTRA_SYSCTLS: &'static [(&'static str, &'static str)] = &[];
}

impl PodFamily for Ipv6Addr {
    const GATEWAY: Self = GATEWAY6;
    const DEFAULT_DST: &'static str = "::/0";
    // IPv6 on (a runtime may create namespaces with it off), and no DAD on the pod's
    // link-local address either.
    const POD_IF_SYSCTLS: &'static [(&'static str, &'static str)] =
        &[("disable_ipv6", "0"), ("accept_dad", "0")];
    // Its link-local address is the source of the host's neighbour solicitations to the
    // pod: valid at once.
    const HOST_VETH_EXTRA_SYSCTLS: &'static [(&'static str, &'static str)] = &[("accept_dad", "0")];
}

/// Runs a closure inside the pod's network namespace (the thread returns after).
pub type InPod<'a> = dyn Fn(&mut dyn FnMut() -> std::io::Result<()>) -> std::io::Result<()> + 'a;

/// What to build for one pod.
#[derive(Debug, Clone)]
pub struct PodSpec<A = Ipv4Addr> {
    pub host_veth: String,
    pub if_name: String,
    pub ip: A,
    pub mtu: u32,
    /// The secondary ENI's route table; `None` for the primary ENI.
    pub table: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Built {
    pub host: Link,
    pub pod: Link,
}

/// What holds the names a pod's datapath needs, before anything is built.
#[derive(Debug)]
pub struct Occupants {
    /// A host link by the host veth's name: ours (a veth) from an earlier sandbox of the
    /// same pod or an earlier ADD of this one.
    pub host_veth: Option<Link>,
    /// The pod's `if_name`, when it is the peer of that host veth (an earlier ADD of this
    /// sandbox).
    pub stale_pod_if: Option<Link>,
}

/// Finds what holds the host veth's name and the pod's interface name, refusing what is
/// not this plugin's: a host link of that name that is not a veth, or a pod interface
/// of that name that is not the peer of our host veth (never deleted, whatever it is).
pub async fn occupants<A>(
    host: &Netlink,
    pod: &Netlink,
    spec: &PodSpec<A>,
) -> Result<Occupants, String> {
    let nl = |e: vpc_cni_netlink::NlError| e.to_string();
    let host_veth = host.link(&spec.host_veth).await.map_err(nl)?;
    if let Some(h) = &host_veth
        && !h.is_veth
    {
        return Err(format!(
            "the node has an interface named {} that is not a veth: not this plugin's, left alone",
            spec.host_veth
        ));
    }
    let stale_pod_if = match pod.link(&spec.if_name).await.map_err(nl)? {
        None => None,
        Some(p) if is_peer(&p, host_veth.as_ref()) => Some(p),
        Some(_) => {
            return Err(format!(
                "the pod's namespace already has an interface {} that is not this plugin's veth (its peer is not {} on the node): left alone",
                spec.if_name, spec.host_veth
            ));
        }
    };
    Ok(Occupants {
        host_veth,
        stale_pod_if,
    })
}

/// `pod_if` (seen from the pod's namespace) is a veth whose peer is `host_veth`.
pub fn is_peer(pod_if: &Link, host_veth: Option<&Link>) -> bool {
    match host_veth {
        Some(h) => {
            pod_if.is_veth
                && h.is_veth
                && pod_if.peer_in_other_netns
                && pod_if.peer_index == Some(h.index)
        }
        None => false,
    }
}

/// Builds the datapath. On error, what was created so far is left for
/// [`undo_setup`], which the caller runs. `old` is what [`occupants`] found: ours, and
/// removed first (creation would fail on it). `taken_macs` are the MACs of the host's
/// links, which the host veth's must differ from. `in_pod` runs a closure inside the
/// pod's namespace (for its sysctls).
#[allow(clippy::too_many_arguments)]
pub async fn setup<A: PodFamily>(
    host: &Netlink,
    pod: &Netlink,
    pod_netns: RawFd,
    in_pod: &InPod<'_>,
    spec: &PodSpec<A>,
    old: &Occupants,
    taken_macs: &[[u8; 6]],
) -> NlResult<Built> {
    if let Some(stale) = &old.host_veth {
        host.delete_link(stale.index).await?;
    }
    if let Some(stale) = &old.stale_pod_if {
        pod.delete_link(stale.index).await?;
    }
    let mac = pick_host_mac(taken_macs, random_mac).ok_or_else(|| vpc_cni_netlink::NlError {
        op: format!("pick a MAC for {}", spec.host_veth),
        errno: None,
        text: "every random MAC drawn is taken by another host link".into(),
    })?;
    host.add_veth_into(&spec.host_veth, mac, &spec.if_name, spec.mtu, pod_netns)
        .await?;
    let host_link = must_exist(host, &spec.host_veth, "host").await?;
    let pod_link = must_exist(pod, &spec.if_name, "pod").await?;
    // Before the host end is up: a router advertisement a pod sends must never reach a
    // host veth that listens to it.
    let sysctl_err = |(path, e): (String, std::io::Error)| vpc_cni_netlink::NlError {
        op: format!("write {path}"),
        errno: e.raw_os_error(),
        text: e.to_string(),
    };
    set_ipv6_sysctls(&spec.host_veth, &HOST_VETH_SYSCTLS).map_err(sysctl_err)?;
    set_ipv6_sysctls(&spec.host_veth, A::HOST_VETH_EXTRA_SYSCTLS).map_err(sysctl_err)?;
    if !A::POD_IF_SYSCTLS.is_empty() {
        let mut failed = None;
        let mut write = || {
            let r = set_ipv6_sysctls("lo", &[("disable_ipv6", "0")])
                .and_then(|_| set_ipv6_sysctls(&spec.if_name, A::POD_IF_SYSCTLS));
            if let Err(e) = r {
                failed = Some(e);
            }
            Ok(())
        };
        in_pod(&mut write).map_err(|e| sysctl_err(("the pod's namespace".into(), e)))?;
        if let Some(e) = failed {
            return Err(sysctl_err(e));
        }
    }

    pod.set_up(pod_link.index).await?;
    pod.add_address(pod_link.index, spec.ip, A::HOST_LEN)
        .await?;
    // A second attachment (another interface of the same pod, as Multus adds) keeps the
    // gateway and default routes the first one set: never replaced from here.
    let routes = pod.routes_of::<A>().await?;
    let elsewhere = |dst: A, len: u8| {
        routes.iter().any(|r| {
            r.table == MAIN_TABLE
                && r.dst == dst
                && r.dst_len == len
                && r.oif != Some(pod_link.index)
        })
    };
    if !elsewhere(A::GATEWAY, A::HOST_LEN) {
        pod.replace_route(
            MAIN_TABLE,
            A::GATEWAY,
            A::HOST_LEN,
            None,
            pod_link.index,
            RouteScope::Link,
        )
        .await?;
    }
    if !elsewhere(A::unspecified(), 0) {
        pod.replace_route(
            MAIN_TABLE,
            A::unspecified(),
            0,
            Some(A::GATEWAY),
            pod_link.index,
            RouteScope::Universe,
        )
        .await?;
    }
    pod.set_permanent_neighbour(pod_link.index, A::GATEWAY, &host_link.mac)
        .await?;

    host.set_up(host_link.index).await?;
    host.replace_route(
        MAIN_TABLE,
        spec.ip,
        A::HOST_LEN,
        None,
        host_link.index,
        RouteScope::Link,
    )
    .await?;
    host.add_rule(
        TO_POD_RULE_PRIORITY,
        MAIN_TABLE,
        None,
        Some((spec.ip, A::HOST_LEN)),
    )
    .await?;
    if let Some(table) = spec.table {
        host.add_rule(
            FROM_POD_RULE_PRIORITY,
            table,
            Some((spec.ip, A::HOST_LEN)),
            None,
        )
        .await?;
    }
    Ok(Built {
        host: host_link,
        pod: pod_link,
    })
}

/// Upstream's IPv6 settings of the host veth, written rather than inherited from the
/// node's `default`: never take router advertisements from a pod, accept redirects, no
/// forwarding. A kernel without IPv6 has no such files: nothing to set.
pub const HOST_VETH_SYSCTLS: [(&str, &str); 3] = [
    ("accept_ra", "0"),
    ("accept_redirects", "1"),
    ("forwarding", "0"),
];

/// Writes `net/ipv6/conf/<link>/<key>` settings in the calling thread's namespace.
fn set_ipv6_sysctls(link: &str, settings: &[(&str, &str)]) -> Result<(), (String, std::io::Error)> {
    for &(key, value) in settings {
        let path = format!("/proc/sys/net/ipv6/conf/{link}/{key}");
        // Written only when it differs: a write of `forwarding` takes the RTNL lock
        // (restarting the syscall while another ADD holds it), a read does not.
        match std::fs::read_to_string(&path) {
            Ok(now) if now.trim() == value => continue,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err((path, e)),
        }
        std::fs::write(&path, value).map_err(|e| (path, e))?;
    }
    Ok(())
}

/// A locally administered unicast MAC that no link in `taken` carries, drawn from `draw`
/// (a few tries: with 46 random bits a second one is already a formality).
pub fn pick_host_mac(taken: &[[u8; 6]], mut draw: impl FnMut() -> [u8; 6]) -> Option<[u8; 6]> {
    (0..8).find_map(|_| {
        let mut m = draw();
        m[0] = (m[0] & 0xfe) | 0x02;
        (!taken.contains(&m)).then_some(m)
    })
}

fn random_mac() -> [u8; 6] {
    let mut m = [0u8; 6];
    // getrandom(2) for 6 bytes does not block once the pool is initialised (at boot).
    let n = unsafe { libc::getrandom(m.as_mut_ptr().cast(), m.len(), 0) };
    if n != m.len() as isize {
        // Never seen; the clock's nanoseconds and the pid still differ per call.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
            ^ ((std::process::id() as u128) << 64);
        m.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    m
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

/// Removes what a failed [`setup`] may have created: the veth pair (ours: setup made a
/// veth of that name after removing any older one of ours) and the host rules of `ip`.
pub async fn undo_setup<A: PodFamily>(host: &Netlink, spec: &PodSpec<A>) -> NlResult<()> {
    if let Some(l) = host.link(&spec.host_veth).await?
        && l.is_veth
    {
        host.delete_link(l.index).await?;
    }
    remove_rules(host, &[spec.ip], &[], None).await
}

fn is_pod_rule<A: Family>(r: &Rule<A>, ip: A) -> bool {
    let host = Some((ip, A::HOST_LEN));
    (r.priority == TO_POD_RULE_PRIORITY && r.to == host && r.from.is_none())
        || (r.priority == FROM_POD_RULE_PRIORITY && r.from == host && r.to.is_none())
}

/// What the node shows of one sandbox's datapath, found without trusting anyone's word:
/// its host veth (a veth by the name this plugin gives it), the /32 routes to that veth,
/// and the addresses of the pod's interface when it is that veth's peer.
#[derive(Debug)]
pub struct Found<A = Ipv4Addr> {
    pub host_veth: Option<Link>,
    /// Routes `IP/32 dev <host veth>` (`/128` for IPv6) in main: their addresses are this
    /// sandbox's.
    pub routes: Vec<Route<A>>,
    /// Addresses only the pod's interface shows (a repeated DEL, after the routes went):
    /// the address may be another pod's by now.
    pub pod_only: Vec<A>,
}

impl<A> Default for Found<A> {
    fn default() -> Self {
        Found {
            host_veth: None,
            routes: Vec::new(),
            pod_only: Vec::new(),
        }
    }
}

impl<A: Family> Found<A> {
    /// Nothing of this family routed to, or held by, the sandbox's interfaces.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.pod_only.is_empty()
    }

    pub fn ips(&self) -> impl Iterator<Item = A> + '_ {
        self.routes
            .iter()
            .map(|r| r.dst)
            .chain(self.pod_only.iter().copied())
    }
}

pub async fn find<A: Family>(
    host: &Netlink,
    pod: Option<&Netlink>,
    host_veth: &str,
    if_name: &str,
) -> NlResult<Found<A>> {
    let h = host.link(host_veth).await?.filter(|l| l.is_veth);
    find_on(host, pod, h, if_name).await
}

/// [`find`] with the host veth already looked up (`None`: there is none).
pub async fn find_on<A: Family>(
    host: &Netlink,
    pod: Option<&Netlink>,
    h: Option<Link>,
    if_name: &str,
) -> NlResult<Found<A>> {
    let mut found = Found::default();
    let Some(h) = h else {
        return Ok(found);
    };
    for r in host.routes_of::<A>().await? {
        if r.table == MAIN_TABLE
            && r.dst_len == A::HOST_LEN
            && r.oif == Some(h.index)
            && !found.routes.iter().any(|o| o.dst == r.dst)
        {
            found.routes.push(r);
        }
    }
    if let Some(pod) = pod
        && let Some(p) = pod.link(if_name).await?
        && is_peer(&p, Some(&h))
    {
        for (ip, len) in pod.addresses::<A>(p.index).await? {
            if len == A::HOST_LEN && !found.ips().any(|o| o == ip) {
                found.pod_only.push(ip);
            }
        }
    }
    found.host_veth = Some(h);
    Ok(found)
}

/// Takes down what [`find`] found: the host rules of its addresses (of an address only
/// the pod shows, unless another link routes it now), then the host veth. With
/// `keep_veth` (the pod's namespace still exists, and the runtime removes it next) the
/// veth's routes go and it is set down, which leaves nothing any pod can use, and the
/// pair goes with the namespace, as upstream leaves it: deleting a veth costs ~20 ms of
/// RCU grace periods that the kernel's namespace clean-up pays once for many. Without it
/// (no namespace to take the pair along) the veth is deleted.
pub async fn teardown<A: Family>(
    host: &Netlink,
    found: &Found<A>,
    keep_veth: bool,
) -> NlResult<()> {
    let ours = found.host_veth.as_ref().map(|h| h.index);
    let mine: Vec<A> = found.routes.iter().map(|r| r.dst).collect();
    remove_rules(host, &mine, &found.pod_only, ours).await?;
    if let Some(h) = &found.host_veth {
        if keep_veth {
            for r in &found.routes {
                host.delete_route(r).await?;
            }
            host.set_down(h.index).await?;
        } else {
            host.delete_link(h.index).await?;
        }
    }
    Ok(())
}

/// Takes down the rules and routes [`find_on`] found of one family, leaving the host veth
/// (for a second family's teardown, which handles the veth).
pub async fn clear_routes_and_rules<A: Family>(host: &Netlink, found: &Found<A>) -> NlResult<()> {
    let ours = found.host_veth.as_ref().map(|h| h.index);
    let mine: Vec<A> = found.routes.iter().map(|r| r.dst).collect();
    remove_rules(host, &mine, &found.pod_only, ours).await?;
    for r in &found.routes {
        host.delete_route(r).await?;
    }
    Ok(())
}

/// Deletes the policy rules this plugin adds (pref 512 and 1536) for the addresses in
/// `mine`, and for those in `maybe` unless a route in main sends that /32 to a link other
/// than `ours` (another pod has the address now). Rules are listed before routes: a pod
/// that takes the address adds its route before its rules, so a rule of that pod seen
/// here always comes with its route seen after it.
pub async fn remove_rules<A: Family>(
    host: &Netlink,
    mine: &[A],
    maybe: &[A],
    ours: Option<u32>,
) -> NlResult<()> {
    if mine.is_empty() && maybe.is_empty() {
        return Ok(());
    }
    let rules = host.rules_of::<A>().await?;
    let mut ips = mine.to_vec();
    if !maybe.is_empty() {
        let routes = host.routes_of::<A>().await?;
        ips.extend(maybe.iter().copied().filter(|ip| {
            !routes.iter().any(|r| {
                r.table == MAIN_TABLE && r.dst == *ip && r.dst_len == A::HOST_LEN && r.oif != ours
            })
        }));
    }
    for r in rules
        .iter()
        .filter(|r| ips.iter().any(|ip| is_pod_rule(r, *ip)))
    {
        host.delete_rule(r).await?;
    }
    Ok(())
}

/// CHECK: every piece of the datapath is as ADD left it. Returns what differs.
pub async fn check<A: PodFamily>(
    host: &Netlink,
    pod: &Netlink,
    spec: &PodSpec<A>,
) -> NlResult<Vec<String>> {
    let len = A::HOST_LEN;
    let gateway = A::GATEWAY;
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
        .addresses::<A>(pod_link.index)
        .await?
        .contains(&(spec.ip, len))
    {
        wrong.push(format!("pod interface lacks address {}/{len}", spec.ip));
    }
    let pod_routes = pod.routes_of::<A>().await?;
    let has = |dst: A, len: u8, gw: Option<A>| {
        pod_routes.iter().any(|r| {
            r.table == MAIN_TABLE
                && r.dst == dst
                && r.dst_len == len
                && r.gateway == gw
                && r.oif == Some(pod_link.index)
        })
    };
    if !has(gateway, len, None) {
        wrong.push(format!(
            "pod lacks route {gateway}/{len} dev {}",
            spec.if_name
        ));
    }
    if !has(A::unspecified(), 0, Some(gateway)) {
        wrong.push(format!("pod lacks default route via {gateway}"));
    }
    let neigh_ok = pod
        .neighbours_of::<A>(pod_link.index)
        .await?
        .iter()
        .any(|(ip, mac, st)| {
            *ip == gateway && *mac == host_link.mac && *st == NeighbourState::Permanent
        });
    if !neigh_ok {
        wrong.push(format!(
            "pod lacks PERMANENT neighbour {gateway} lladdr {}",
            format_mac(&host_link.mac)
        ));
    }
    let host_route_ok = host.routes_of::<A>().await?.iter().any(|r| {
        r.table == MAIN_TABLE
            && r.dst == spec.ip
            && r.dst_len == len
            && r.oif == Some(host_link.index)
    });
    if !host_route_ok {
        wrong.push(format!(
            "host lacks route {}/{len} dev {}",
            spec.ip, spec.host_veth
        ));
    }
    let rules = host.rules_of::<A>().await?;
    if !rules.iter().any(|r| {
        r.priority == TO_POD_RULE_PRIORITY && r.to == Some((spec.ip, len)) && r.table == MAIN_TABLE
    }) {
        wrong.push(format!(
            "host lacks rule to {} lookup main pref 512",
            spec.ip
        ));
    }
    if let Some(t) = spec.table
        && !rules.iter().any(|r| {
            r.priority == FROM_POD_RULE_PRIORITY && r.from == Some((spec.ip, len)) && r.table == t
        })
    {
        wrong.push(format!(
            "host lacks rule from {} lookup {t} pref 1536",
            spec.ip
        ));
    }
    Ok(wrong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_mac_is_local_unicast_and_never_taken() {
        let taken = [[0x02, 1, 2, 3, 4, 5], [0x06, 9, 9, 9, 9, 9]];
        // The first two draws collide (once the local bit is set, multicast bit cleared).
        let mut draws = vec![
            [0x07, 9, 9, 9, 9, 9],
            [0x03, 1, 2, 3, 4, 5],
            [0xff, 1, 1, 1, 1, 1],
        ];
        let m = pick_host_mac(&taken, || draws.remove(0)).unwrap();
        assert_eq!(m, [0xfe, 1, 1, 1, 1, 1]);
        assert!(draws.is_empty());
        // Every draw taken: refused, never a duplicate.
        assert_eq!(pick_host_mac(&taken, || [0x02, 1, 2, 3, 4, 5]), None);
        let r = random_mac();
        assert_ne!(r, random_mac());
    }
}
