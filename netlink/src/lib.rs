//! A thin wrapper over rtnetlink so the plugin's datapath and ipamd's host networking
//! speak in links, addresses, routes, rules and neighbours, and never touch raw netlink
//! messages (save `macdump`'s one dump, read raw for speed); `netns` enters a network
//! namespace just long enough to open a socket there.

mod macdump;
pub mod netns;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

pub use netlink_packet_route::neighbour::NeighbourState;
pub use netlink_packet_route::route::{RouteProtocol, RouteScope};

pub const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;

/// A netlink failure with the operation that failed, for the CNI error's details.
#[derive(Debug, Clone)]
pub struct NlError {
    pub op: String,
    pub errno: Option<i32>,
    pub text: String,
}

impl std::fmt::Display for NlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.op, self.text)
    }
}

impl std::error::Error for NlError {}

impl NlError {
    fn from_rt(op: impl Into<String>, e: rtnetlink::Error) -> Self {
        let (errno, text) = match &e {
            rtnetlink::Error::NetlinkError(m) => {
                let io = m.to_io();
                (io.raw_os_error(), io.to_string())
            }
            other => (None, other.to_string()),
        };
        NlError {
            op: op.into(),
            errno,
            text,
        }
    }

    fn is(&self, errnos: &[i32]) -> bool {
        self.errno.is_some_and(|e| errnos.contains(&e))
    }
}

pub type NlResult<T> = Result<T, NlError>;

#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub up: bool,
    pub mtu: u32,
    /// A veth (either end of a pair).
    pub is_veth: bool,
    /// A veth's peer: its interface index, in the namespace `peer_in_other_netns` says
    /// (another one when true, this one when false).
    pub peer_index: Option<u32>,
    pub peer_in_other_netns: bool,
}

impl Link {
    fn from_msg(m: &LinkMessage) -> Self {
        use netlink_packet_route::link::{InfoKind, LinkInfo};
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            mac: [0; 6],
            up: m.header.flags.contains(LinkFlags::Up),
            mtu: 0,
            is_veth: false,
            peer_index: None,
            peer_in_other_netns: false,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::Address(b) if b.len() == 6 => l.mac.copy_from_slice(b),
                LinkAttribute::Mtu(m) => l.mtu = *m,
                LinkAttribute::Link(i) => l.peer_index = Some(*i),
                LinkAttribute::LinkNetNsId(_) => l.peer_in_other_netns = true,
                LinkAttribute::LinkInfo(infos) => {
                    l.is_veth = infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                }
                _ => {}
            }
        }
        if !l.is_veth {
            l.peer_index = None;
        }
        l
    }

    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An address family the datapath speaks: IPv4 (the default everywhere) or IPv6.
pub trait Family: Copy + Eq + std::fmt::Display + std::fmt::Debug + Send + Sync + 'static {
    const AF: AddressFamily;
    /// A host route's prefix length: 32 or 128.
    const HOST_LEN: u8;
    fn unspecified() -> Self;
    fn to_ip(self) -> IpAddr;
    fn from_ip(ip: &IpAddr) -> Option<Self>;
    fn from_route(a: &RouteAddress) -> Option<Self>;
    fn from_neighbour(a: &NeighbourAddress) -> Option<Self>;
    fn ip_version() -> IpVersion;
}

impl Family for Ipv4Addr {
    const AF: AddressFamily = AddressFamily::Inet;
    const HOST_LEN: u8 = 32;
    fn unspecified() -> Self {
        Ipv4Addr::UNSPECIFIED
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V4(self)
    }
    fn from_ip(ip: &IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(v) => Some(*v),
            _ => None,
        }
    }
    fn from_route(a: &RouteAddress) -> Option<Self> {
        match a {
            RouteAddress::Inet(v) => Some(*v),
            _ => None,
        }
    }
    fn from_neighbour(a: &NeighbourAddress) -> Option<Self> {
        match a {
            NeighbourAddress::Inet(v) => Some(*v),
            _ => None,
        }
    }
    fn ip_version() -> IpVersion {
        IpVersion::V4
    }
}

impl Family for Ipv6Addr {
    const AF: AddressFamily = AddressFamily::Inet6;
    const HOST_LEN: u8 = 128;
    fn unspecified() -> Self {
        Ipv6Addr::UNSPECIFIED
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V6(self)
    }
    fn from_ip(ip: &IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(v) => Some(*v),
            _ => None,
        }
    }
    fn from_route(a: &RouteAddress) -> Option<Self> {
        match a {
            RouteAddress::Inet6(v) => Some(*v),
            _ => None,
        }
    }
    fn from_neighbour(a: &NeighbourAddress) -> Option<Self> {
        match a {
            NeighbourAddress::Inet6(v) => Some(*v),
            _ => None,
        }
    }
    fn ip_version() -> IpVersion {
        IpVersion::V6
    }
}

fn route_msg<A: Family>(
    table: u32,
    dst: A,
    dst_len: u8,
    gateway: Option<A>,
    oif: Option<u32>,
    scope: RouteScope,
    protocol: Option<RouteProtocol>,
) -> RouteMessage {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.to_ip(), dst_len)
        .unwrap_or_else(|e| unreachable!("one family throughout: {e}"))
        .table_id(table)
        .scope(scope);
    if let Some(p) = protocol {
        b = b.protocol(p);
    }
    if let Some(oif) = oif {
        b = b.output_interface(oif);
    }
    if let Some(gw) = gateway {
        b = b
            .gateway(gw.to_ip())
            .unwrap_or_else(|e| unreachable!("one family throughout: {e}"));
    }
    b.build()
}

/// A policy rule as the datapath sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule<A = Ipv4Addr> {
    pub priority: u32,
    pub table: u32,
    pub from: Option<(A, u8)>,
    pub to: Option<(A, u8)>,
    /// (mark, mask) of an `fwmark` rule.
    pub fwmark: Option<(u32, u32)>,
    msg: RuleMessage,
}

/// A route as the datapath sees it (IPv4 unless said).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<A = Ipv4Addr> {
    pub table: u32,
    pub dst: A,
    pub dst_len: u8,
    pub gateway: Option<A>,
    pub oif: Option<u32>,
    pub scope: RouteScope,
    /// Who installed it (`proto`): [`RouteProtocol::Boot`] for every route added here.
    pub protocol: RouteProtocol,
}

/// The MAC of every link in the calling thread's network namespace. A dump of its own,
/// without statistics, of which only each link's `IFLA_ADDRESS` is read: parsing every
/// attribute of every link (as [`Netlink::links`] does) costs ~1 ms of CPU on a node of
/// 160 pods, which 16 ADDs at once on 2 cores wait for in turn.
pub async fn link_macs() -> NlResult<Vec<[u8; 6]>> {
    macdump::link_macs().await.map_err(|e| NlError {
        op: "list links".into(),
        errno: e.raw_os_error(),
        text: e.to_string(),
    })
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's current network namespace.
    /// Must be called inside a tokio runtime.
    pub fn connect() -> std::io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn link(&self, name: &str) -> NlResult<Option<Link>> {
        let r = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await;
        match r {
            Ok(Some(m)) => Ok(Some(Link::from_msg(&m))),
            Ok(None) => Ok(None),
            Err(e) => {
                let e = NlError::from_rt(format!("get link {name}"), e);
                if e.is(&[ENODEV]) { Ok(None) } else { Err(e) }
            }
        }
    }

    pub async fn links(&self) -> NlResult<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::from_rt("list links", e))?;
        Ok(msgs.iter().map(Link::from_msg).collect())
    }

    /// Deletes a link; a link already gone is not an error.
    pub async fn delete_link(&self, index: u32) -> NlResult<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NlError::from_rt(format!("delete link #{index}"), e);
                if e.is(&[ENODEV, ENOENT]) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    pub async fn set_up(&self, index: u32) -> NlResult<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| NlError::from_rt(format!("set link #{index} up"), e))
    }

    pub async fn set_down(&self, index: u32) -> NlResult<()> {
        match self
            .handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NlError::from_rt(format!("set link #{index} down"), e);
                if e.is(&[ENODEV]) { Ok(()) } else { Err(e) }
            }
        }
    }

    /// Creates a veth pair whose peer is born inside the namespace `peer_netns`,
    /// so the pod's end never exists in the host namespace; `mac` is the host end's.
    pub async fn add_veth_into(
        &self,
        name: &str,
        mac: [u8; 6],
        peer: &str,
        mtu: u32,
        peer_netns: RawFd,
    ) -> NlResult<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .mtu(mtu)
            .setns_by_fd(peer_netns)
            .build();
        let msg = LinkVeth::new(name, peer)
            .mtu(mtu)
            .address(mac.to_vec())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| NlError::from_rt(format!("create veth {name} (peer {peer})"), e))
    }

    /// Adds `ip/len` to the link. An IPv6 address is added `nodad`: addresses come from
    /// ipamd, unique by construction, and usable at once (no tentative second).
    pub async fn add_address<A: Family>(&self, index: u32, ip: A, prefix_len: u8) -> NlResult<()> {
        let mut req = self.handle.address().add(index, ip.to_ip(), prefix_len);
        if A::AF == AddressFamily::Inet6 {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NlError::from_rt(format!("add address {ip}/{prefix_len}"), e);
                if e.is(&[EEXIST]) { Ok(()) } else { Err(e) }
            }
        }
    }

    pub async fn ipv4_addresses(&self, index: u32) -> NlResult<Vec<(Ipv4Addr, u8)>> {
        self.addresses(index).await
    }

    /// The link's addresses of family `A`.
    pub async fn addresses<A: Family>(&self, index: u32) -> NlResult<Vec<(A, u8)>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::from_rt("list addresses", e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.family == A::AF && m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => {
                        A::from_ip(ip).map(|v| (v, m.header.prefix_len))
                    }
                    _ => None,
                })
            })
            .collect())
    }

    /// Adds or replaces a route: `dst/len [via gw] dev oif` in `table`, `proto boot` as
    /// upstream's (and iproute2's) routes are.
    pub async fn replace_route<A: Family>(
        &self,
        table: u32,
        dst: A,
        dst_len: u8,
        gateway: Option<A>,
        oif: u32,
        scope: RouteScope,
    ) -> NlResult<()> {
        let msg = route_msg(
            table,
            dst,
            dst_len,
            gateway,
            Some(oif),
            scope,
            Some(RouteProtocol::Boot),
        );
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| NlError::from_rt(format!("add route {dst}/{dst_len} table {table}"), e))
    }

    pub async fn routes(&self) -> NlResult<Vec<Route>> {
        self.routes_of().await
    }

    /// Every route of family `A`, in every table.
    pub async fn routes_of<A: Family>(&self) -> NlResult<Vec<Route<A>>> {
        let mut req = RouteMessageBuilder::<Ipv4Addr>::new().table_id(0).build();
        req.header.address_family = A::AF;
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::from_rt("list routes", e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.address_family == A::AF)
            .map(|m| {
                let mut r = Route {
                    table: m.header.table as u32,
                    dst: A::unspecified(),
                    dst_len: m.header.destination_prefix_length,
                    gateway: None,
                    oif: None,
                    scope: m.header.scope,
                    protocol: m.header.protocol,
                };
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Table(t) => r.table = *t,
                        RouteAttribute::Destination(d) => {
                            if let Some(d) = A::from_route(d) {
                                r.dst = d
                            }
                        }
                        RouteAttribute::Gateway(g) => r.gateway = A::from_route(g),
                        RouteAttribute::Oif(i) => r.oif = Some(*i),
                        _ => {}
                    }
                }
                r
            })
            .collect())
    }

    /// Adds `[from src/len] [to dst/len] lookup table pref priority`; an identical
    /// rule already present is not an error (ADD may be repeated for one sandbox).
    pub async fn add_rule<A: Family>(
        &self,
        priority: u32,
        table: u32,
        from: Option<(A, u8)>,
        to: Option<(A, u8)>,
    ) -> NlResult<()> {
        let mut req = self
            .handle
            .rule()
            .add()
            .priority(priority)
            .table_id(table)
            .action(RuleAction::ToTable);
        let m = req.message_mut();
        m.header.family = A::AF;
        if let Some((ip, len)) = from {
            m.header.src_len = len;
            m.attributes.push(RuleAttribute::Source(ip.to_ip()));
        }
        if let Some((ip, len)) = to {
            m.header.dst_len = len;
            m.attributes.push(RuleAttribute::Destination(ip.to_ip()));
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NlError::from_rt(format!("add rule pref {priority} table {table}"), e);
                if e.is(&[EEXIST]) { Ok(()) } else { Err(e) }
            }
        }
    }

    pub async fn rules(&self) -> NlResult<Vec<Rule>> {
        self.rules_of().await
    }

    /// Every policy rule of family `A`.
    pub async fn rules_of<A: Family>(&self) -> NlResult<Vec<Rule<A>>> {
        let msgs: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(A::ip_version())
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::from_rt("list rules", e))?;
        Ok(msgs
            .into_iter()
            .map(|m| {
                let mut r = Rule {
                    priority: 0,
                    table: m.header.table as u32,
                    from: None,
                    to: None,
                    fwmark: None,
                    msg: RuleMessage::default(),
                };
                let mut mask = u32::MAX;
                for a in &m.attributes {
                    match a {
                        RuleAttribute::Priority(p) => r.priority = *p,
                        RuleAttribute::Table(t) => r.table = *t,
                        RuleAttribute::Source(s) => {
                            r.from = A::from_ip(s).map(|s| (s, m.header.src_len))
                        }
                        RuleAttribute::Destination(d) => {
                            r.to = A::from_ip(d).map(|d| (d, m.header.dst_len))
                        }
                        RuleAttribute::FwMark(v) => r.fwmark = Some((*v, mask)),
                        RuleAttribute::FwMask(v) => mask = *v,
                        _ => {}
                    }
                }
                if let Some((v, _)) = r.fwmark {
                    r.fwmark = Some((v, mask));
                }
                r.msg = m;
                r
            })
            .collect())
    }

    /// Deletes a rule; one already gone is not an error.
    pub async fn delete_rule<A: Family>(&self, rule: &Rule<A>) -> NlResult<()> {
        match self.handle.rule().del(rule.msg.clone()).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NlError::from_rt(format!("delete rule pref {}", rule.priority), e);
                if e.is(&[ENOENT, ESRCH]) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The link carrying this MAC (as `02:ab:..`, any case), if any.
    pub async fn link_by_mac(&self, mac: &str) -> NlResult<Option<Link>> {
        let want = mac.to_ascii_lowercase();
        Ok(self
            .links()
            .await?
            .into_iter()
            .find(|l| l.mac_string() == want))
    }

    /// Sets the MTU and brings the link up.
    pub async fn set_mtu_up(&self, index: u32, mtu: u32) -> NlResult<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(|e| NlError::from_rt(format!("set link #{index} mtu {mtu} up"), e))
    }

    /// Adds `ip/len` without the kernel's prefix route in the main table.
    pub async fn add_address_noprefixroute(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> NlResult<()> {
        let mut req = self.handle.address().add(index, IpAddr::V4(ip), prefix_len);
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Noprefixroute));
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NlError::from_rt(format!("add address {ip}/{prefix_len}"), e);
                if e.is(&[EEXIST]) { Ok(()) } else { Err(e) }
            }
        }
    }

    /// Removes `ip/len` from the link; one already gone is not an error.
    pub async fn delete_address(&self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> NlResult<()> {
        let msg = rtnetlink::AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(ip, prefix_len)
            .build();
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NlError::from_rt(format!("delete address {ip}/{prefix_len}"), e);
                if e.is(&[EADDRNOTAVAIL, ENOENT, ENODEV]) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Deletes a route (as listed by [`Netlink::routes`]); one already gone is not an error.
    pub async fn delete_route<A: Family>(&self, r: &Route<A>) -> NlResult<()> {
        let msg = route_msg(r.table, r.dst, r.dst_len, r.gateway, r.oif, r.scope, None);
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NlError::from_rt(
                    format!("delete route {}/{} table {}", r.dst, r.dst_len, r.table),
                    e,
                );
                if e.is(&[ESRCH, ENOENT]) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Adds `fwmark mark/mask lookup table pref priority`; present already is fine.
    pub async fn add_fwmark_rule(
        &self,
        priority: u32,
        table: u32,
        mark: u32,
        mask: u32,
    ) -> NlResult<()> {
        let mut req = self
            .handle
            .rule()
            .add()
            .v4()
            .priority(priority)
            .table_id(table)
            .fw_mark(mark)
            .action(RuleAction::ToTable);
        req.message_mut()
            .attributes
            .push(RuleAttribute::FwMask(mask));
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NlError::from_rt(format!("add fwmark rule pref {priority}"), e);
                if e.is(&[EEXIST]) { Ok(()) } else { Err(e) }
            }
        }
    }

    pub async fn set_permanent_neighbour<A: Family>(
        &self,
        index: u32,
        ip: A,
        mac: &[u8; 6],
    ) -> NlResult<()> {
        self.handle
            .neighbours()
            .add(index, ip.to_ip())
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| NlError::from_rt(format!("add permanent neighbour {ip}"), e))
    }

    /// (ip, mac, state) of the IPv4 neighbours on link `index`.
    pub async fn neighbours(
        &self,
        index: u32,
    ) -> NlResult<Vec<(Ipv4Addr, [u8; 6], NeighbourState)>> {
        self.neighbours_of(index).await
    }

    /// (ip, mac, state) of the neighbours of family `A` on link `index`.
    pub async fn neighbours_of<A: Family>(
        &self,
        index: u32,
    ) -> NlResult<Vec<(A, [u8; 6], NeighbourState)>> {
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(A::AF)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::from_rt("list neighbours", e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == index)
            .filter_map(|m| {
                let mut ip = None;
                let mut mac = None;
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(a) => ip = A::from_neighbour(a),
                        NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                            let mut m6 = [0u8; 6];
                            m6.copy_from_slice(b);
                            mac = Some(m6);
                        }
                        _ => {}
                    }
                }
                Some((ip?, mac?, m.header.state))
            })
            .collect())
    }
}
