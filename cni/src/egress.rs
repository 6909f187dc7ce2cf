//! `egress-cni`: IPv4 egress for the pods of an IPv6 node (upstream's egress-cni in its
//! `v4` form), chained after `aws-cni` in the conflist when ENABLE_IPv6 is on.
//!
//! Each pod gets a second interface (`v4if0` unless `ifName` says otherwise) with an
//! address from `169.254.172.0/22` (the conflist's `ipam.ranges`), a default IPv4 route
//! through the host, and its IPv4 traffic leaves the node SNATed to the node's primary
//! IPv4 (`nodeIP`), in a chain of its own (`CNI-E4-…`, as upstream names it). Nothing
//! reaches a pod through this interface: ipamd rejects new connections to the range in
//! FORWARD. The pod's IPs in the result stay `aws-cni`'s: this plugin adds interfaces
//! only (the kubelet reports the pod's IPv6 address).
//!
//! Addresses are kept as upstream's `host-local` IPAM keeps them (a file per address in
//! `ipam.dataDir/<network>`, holding the container ID and interface name), so a node
//! moving from upstream's plugin keeps its pods' egress addresses, and a crash between
//! two steps never hands one address to two pods. Every step is idempotent; DEL removes
//! whatever of the pod is left, repeated or not, with or without the pod's namespace.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;
use vpc_cni_netlink::netns::NetNs;
use vpc_cni_netlink::{MAIN_TABLE, Netlink, RouteScope, format_mac};

use crate::config::{DEFAULT_LOG_FILE, MAX_MTU, MIN_MTU, ValidAttachment, peek_version};
use crate::error::{CniError, ErrorCode, Result};
use crate::log::Level;
use crate::plugin::CniEnv;
use crate::result::{CniResult, Interface};
use crate::version::CniVersion;
use crate::{debug, error, info};

pub const DEFAULT_SUBNET: &str = "169.254.172.0/22";
pub const DEFAULT_IF_NAME: &str = "v4if0";
pub const DEFAULT_DATA_DIR: &str = "/run/cni/v6pd/egress-v4-ipam";
/// Multicast is never SNATed (as upstream).
const MULTICAST: &str = "224.0.0.0/4";
/// The host veth's name: this prefix and 11 hex digits of sha1(container ID/ifname).
const HOST_VETH_PREFIX: &str = "egv";

#[derive(Debug, Deserialize, Default)]
struct RawIpam {
    #[serde(default)]
    ranges: Vec<Vec<RawRange>>,
    #[serde(rename = "dataDir", default)]
    data_dir: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawRange {
    subnet: String,
}

#[derive(Debug, Deserialize)]
struct RawConf {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(default)]
    enabled: Option<Value>,
    #[serde(rename = "nodeIP", default)]
    node_ip: Option<String>,
    #[serde(rename = "randomizeSNAT", default)]
    randomize_snat: Option<String>,
    #[serde(default)]
    mtu: Option<Value>,
    #[serde(rename = "ifName", default)]
    if_name: Option<String>,
    #[serde(default)]
    ipam: Option<RawIpam>,
    #[serde(rename = "pluginLogFile", default)]
    plugin_log_file: Option<String>,
    #[serde(rename = "pluginLogLevel", default)]
    plugin_log_level: Option<String>,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Vec<ValidAttachment>>,
}

/// An IPv4 range: the network, its gateway (the first address) and the usable ones after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub network: Ipv4Addr,
    pub len: u8,
}

impl Range {
    pub fn parse(s: &str) -> Option<Range> {
        let (a, l) = s.split_once('/')?;
        let network: Ipv4Addr = a.parse().ok()?;
        let len: u8 = l.parse().ok()?;
        // At least a gateway and two pods' addresses besides the network and broadcast.
        if !(1..=29).contains(&len) || u32::from(network) & !Range::mask(len) != 0 {
            return None;
        }
        Some(Range { network, len })
    }

    fn mask(len: u8) -> u32 {
        u32::MAX << (32 - len as u32)
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The first and last address handed to pods.
    pub fn pods(&self) -> (u32, u32) {
        let n = u32::from(self.network);
        (n + 2, (n | !Range::mask(self.len)) - 1)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Range::mask(self.len) == u32::from(self.network)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snat {
    None,
    HashRandom,
    Prng,
}

#[derive(Debug, Clone)]
pub struct EgressConf {
    pub cni_version: CniVersion,
    pub cni_version_str: String,
    pub name: String,
    pub enabled: bool,
    pub node_ip: Option<Ipv4Addr>,
    pub snat: Snat,
    pub mtu: u32,
    pub if_name: String,
    pub range: Range,
    pub data_dir: PathBuf,
    pub log_file: String,
    pub log_level: Level,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

impl EgressConf {
    pub fn parse(stdin: &[u8]) -> Result<EgressConf> {
        let raw: RawConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "network configuration on stdin is not the egress-cni configuration",
            )
            .with_details(e)
        })?;
        let cni_version_str = raw
            .cni_version
            .clone()
            .ok_or_else(|| CniError::config("cniVersion is required"))?;
        let cni_version = CniVersion::parse(&cni_version_str)?;
        let name = raw
            .name
            .clone()
            .filter(|n| !n.is_empty() && !n.contains('/') && n != "." && n != "..")
            .ok_or_else(|| CniError::config("name is required (a network name, no '/')"))?;
        let enabled = match &raw.enabled {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
            Some(v) => {
                return Err(CniError::config(format!(
                    "enabled is {v}: expected true or false"
                )));
            }
        };
        let node_ip = match raw.node_ip.as_deref() {
            None | Some("") => None,
            Some(s) => Some(s.parse::<Ipv4Addr>().map_err(|_| {
                CniError::config(format!(
                    "nodeIP {s:?} is not an IPv4 address (the node's primary IPv4, which pods' IPv4 traffic leaves from)"
                ))
            })?),
        };
        if enabled && node_ip.is_none() {
            return Err(CniError::config(
                "nodeIP is required: the node's primary IPv4 address, which pods' IPv4 traffic is SNATed to",
            ));
        }
        let snat = match raw.randomize_snat.as_deref() {
            None | Some("") | Some("prng") => Snat::Prng,
            Some("hashrandom") => Snat::HashRandom,
            Some("none") => Snat::None,
            Some(o) => {
                return Err(CniError::config(format!(
                    "randomizeSNAT {o:?}: expected none, hashrandom or prng"
                )));
            }
        };
        let mtu = match &raw.mtu {
            None => crate::config::DEFAULT_MTU,
            Some(Value::Number(n)) => n.as_u64().unwrap_or(0) as u32,
            Some(Value::String(s)) => s.trim().parse().unwrap_or(0),
            Some(_) => 0,
        };
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(CniError::config(format!(
                "mtu {:?}: expected {MIN_MTU}..{MAX_MTU}",
                raw.mtu
            )));
        }
        let if_name = raw
            .if_name
            .clone()
            .unwrap_or_else(|| DEFAULT_IF_NAME.to_string());
        if if_name.is_empty() || if_name.len() > 15 || if_name.contains('/') {
            return Err(CniError::config(format!(
                "ifName {if_name:?} is not an interface name"
            )));
        }
        let ipam = raw.ipam.unwrap_or_default();
        let subnet = ipam
            .ranges
            .first()
            .and_then(|r| r.first())
            .map(|r| r.subnet.clone())
            .unwrap_or_else(|| DEFAULT_SUBNET.to_string());
        let range = Range::parse(&subnet).ok_or_else(|| {
            CniError::config(format!(
                "ipam.ranges subnet {subnet:?} is not an IPv4 network of /29 or larger"
            ))
        })?;
        let data_dir = PathBuf::from(
            ipam.data_dir
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| DEFAULT_DATA_DIR.to_string()),
        );
        let log_level = match raw.plugin_log_level.as_deref() {
            None | Some("") => Level::Debug,
            Some(s) => Level::parse(s).ok_or_else(|| {
                CniError::config(format!(
                    "pluginLogLevel {s:?}: expected Debug, Info, Warn or Error"
                ))
            })?,
        };
        Ok(EgressConf {
            cni_version,
            cni_version_str,
            name,
            enabled,
            node_ip,
            snat,
            mtu,
            if_name,
            range,
            data_dir,
            log_file: raw
                .plugin_log_file
                .unwrap_or_else(|| DEFAULT_LOG_FILE.to_string()),
            log_level,
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments,
        })
    }
}

// --- the address store, as host-local keeps it -------------------------------------

/// The addresses of one network: `dir/<ip>` files holding "<container ID>\r\n<ifname>",
/// under an flock on `dir/lock`, with `dir/last_reserved_ip.0` where the search resumes.
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    pub fn open(data_dir: &Path, network: &str) -> std::io::Result<Store> {
        let dir = data_dir.join(network);
        fs::create_dir_all(&dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        // SAFETY: flock on a descriptor we own; blocks until the other plugin is done.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Store { dir, _lock: lock })
    }

    fn owner(id: &str, if_name: &str) -> String {
        format!("{id}\r\n{if_name}")
    }

    /// Every address held, with its owner text.
    fn held(&self) -> std::io::Result<Vec<(Ipv4Addr, String)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let Some(ip) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if !e.file_type()?.is_file() {
                continue;
            }
            let owner = fs::read_to_string(e.path()).unwrap_or_default();
            out.push((ip, owner.trim().to_string()));
        }
        Ok(out)
    }

    /// The address of (`id`, `if_name`): the one it holds (a repeated ADD), else the next
    /// free one after the last handed out.
    pub fn allocate(&self, range: Range, id: &str, if_name: &str) -> std::io::Result<Ipv4Addr> {
        let me = Store::owner(id, if_name);
        let held = self.held()?;
        if let Some((ip, _)) = held.iter().find(|(ip, o)| *o == me && range.contains(*ip)) {
            return Ok(*ip);
        }
        let (first, last) = range.pods();
        let taken: std::collections::HashSet<u32> =
            held.iter().map(|(ip, _)| u32::from(*ip)).collect();
        let after = fs::read_to_string(self.dir.join("last_reserved_ip.0"))
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .filter(|n| (first..=last).contains(n))
            .unwrap_or(last);
        let span = last - first + 1;
        for k in 1..=span {
            let n = first + (after - first + k) % span;
            if taken.contains(&n) {
                continue;
            }
            let ip = Ipv4Addr::from(n);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(self.dir.join(ip.to_string()))
            {
                Ok(mut f) => {
                    f.write_all(me.as_bytes())?;
                    f.sync_all()?;
                    fs::write(self.dir.join("last_reserved_ip.0"), ip.to_string())?;
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(format!(
            "every address of {}/{} is taken",
            range.network, range.len
        )))
    }

    /// Releases what (`id`, `if_name`) holds; `if_name` `None`: whatever `id` holds.
    pub fn release(&self, id: &str, if_name: Option<&str>) -> std::io::Result<Vec<Ipv4Addr>> {
        let mut out = Vec::new();
        for (ip, owner) in self.held()? {
            let (oid, oif) = owner.split_once("\r\n").unwrap_or((owner.as_str(), ""));
            if oid == id && if_name.is_none_or(|i| i == oif) {
                match fs::remove_file(self.dir.join(ip.to_string())) {
                    Ok(()) => out.push(ip),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    /// (address, container ID, ifname) of every allocation.
    pub fn all(&self) -> std::io::Result<Vec<(Ipv4Addr, String, String)>> {
        Ok(self
            .held()?
            .into_iter()
            .map(|(ip, o)| {
                let (id, ifn) = o.split_once("\r\n").unwrap_or((o.as_str(), ""));
                (ip, id.to_string(), ifn.to_string())
            })
            .collect())
    }
}

// --- SNAT ------------------------------------------------------------------------

/// The pod's chain, as upstream names it: "CNI-E4-" and 17 hex digits of a hash of the
/// network name and container ID.
pub fn chain_name(network: &str, id: &str) -> String {
    let d = sha1_hex(&format!("{network}{id}"));
    format!("CNI-E4-{}", &d[..17])
}

fn sha1_hex(s: &str) -> String {
    sha1_smol::Sha1::from(s).digest().to_string()
}

fn comment(network: &str, id: &str) -> String {
    format!("name: \"{network}\" id: \"{id}\"")
}

fn iptables(args: &[&str]) -> std::result::Result<(), String> {
    let out = Command::new("iptables")
        .args(["-w", "5", "-t", "nat"])
        .args(args)
        .output()
        .map_err(|e| format!("iptables: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables -t nat {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The pod's chain and POSTROUTING's jump to it, made exactly once (ADD may repeat).
fn snat_add(conf: &EgressConf, id: &str, ip: Ipv4Addr) -> std::result::Result<(), String> {
    let chain = chain_name(&conf.name, id);
    let c = comment(&conf.name, id);
    let node = conf.node_ip.expect("checked at parse").to_string();
    let _ = iptables(&["-N", &chain]);
    iptables(&["-F", &chain])?;
    iptables(&[
        "-A",
        &chain,
        "-d",
        MULTICAST,
        "-m",
        "comment",
        "--comment",
        &c,
        "-j",
        "ACCEPT",
    ])?;
    let mut snat = vec![
        "-A",
        &chain,
        "-m",
        "comment",
        "--comment",
        &c,
        "-j",
        "SNAT",
        "--to-source",
        &node,
    ];
    match conf.snat {
        Snat::Prng => snat.push("--random-fully"),
        Snat::HashRandom => snat.push("--random"),
        Snat::None => {}
    }
    iptables(&snat)?;
    let src = format!("{ip}/32");
    let jump = [
        "POSTROUTING",
        "-s",
        &src,
        "-m",
        "comment",
        "--comment",
        &c,
        "-j",
        &chain,
    ];
    let mut check = vec!["-C"];
    check.extend_from_slice(&jump);
    if iptables(&check).is_err() {
        let mut add = vec!["-A"];
        add.extend_from_slice(&jump);
        iptables(&add)?;
    }
    Ok(())
}

/// Removes the pod's jump (for each address it had) and its chain; what is gone already
/// is fine.
fn snat_del(network: &str, id: &str, ips: &[Ipv4Addr]) -> std::result::Result<(), String> {
    let chain = chain_name(network, id);
    let c = comment(network, id);
    for ip in ips {
        let src = format!("{ip}/32");
        while iptables(&[
            "-D",
            "POSTROUTING",
            "-s",
            &src,
            "-m",
            "comment",
            "--comment",
            &c,
            "-j",
            &chain,
        ])
        .is_ok()
        {}
    }
    if iptables(&["-F", &chain]).is_ok() {
        iptables(&["-X", &chain])?;
    }
    Ok(())
}

// --- the datapath ------------------------------------------------------------------

pub fn host_veth(id: &str, if_name: &str) -> String {
    vpc_cni_proto::pod_veth_name(HOST_VETH_PREFIX, "", id, &format!("egress-{if_name}"))
}

fn nl_err(what: &str) -> impl Fn(vpc_cni_netlink::NlError) -> CniError + '_ {
    move |e| CniError::datapath(what.to_string()).with_details(e)
}

async fn build(
    host: &Netlink,
    pod: &Netlink,
    pod_ns: &NetNs,
    conf: &EgressConf,
    veth: &str,
    ip: Ipv4Addr,
) -> Result<(vpc_cni_netlink::Link, vpc_cni_netlink::Link)> {
    // A pair of ours from an earlier ADD of this sandbox goes first.
    if let Some(old) = host
        .link(veth)
        .await
        .map_err(nl_err("look up the host veth"))?
    {
        if !old.is_veth {
            return Err(CniError::datapath(format!(
                "the node has an interface named {veth} that is not a veth: not this plugin's, left alone"
            )));
        }
        host.delete_link(old.index)
            .await
            .map_err(nl_err("remove the earlier egress veth"))?;
    }
    if let Some(p) = pod
        .link(&conf.if_name)
        .await
        .map_err(nl_err("look up the pod interface"))?
    {
        return Err(CniError::datapath(format!(
            "the pod already has an interface {} (#{}) that is not this plugin's: left alone",
            conf.if_name, p.index
        )));
    }
    let mac = random_local_mac();
    host.add_veth_into(veth, mac, &conf.if_name, conf.mtu, pod_ns.raw_fd())
        .await
        .map_err(nl_err("create the egress veth"))?;
    let h = host
        .link(veth)
        .await
        .map_err(nl_err("look up the host veth"))?
        .ok_or_else(|| CniError::datapath(format!("{veth} vanished right after creation")))?;
    let p = pod
        .link(&conf.if_name)
        .await
        .map_err(nl_err("look up the pod interface"))?
        .ok_or_else(|| {
            CniError::datapath(format!("{} vanished right after creation", conf.if_name))
        })?;
    let gw = conf.range.gateway();
    pod.set_up(p.index)
        .await
        .map_err(nl_err("set the pod interface up"))?;
    pod.add_address(p.index, ip, 32)
        .await
        .map_err(nl_err("add the egress address"))?;
    pod.replace_route(MAIN_TABLE, gw, 32, None, p.index, RouteScope::Link)
        .await
        .map_err(nl_err("add the gateway route"))?;
    pod.replace_route(
        MAIN_TABLE,
        Ipv4Addr::UNSPECIFIED,
        0,
        Some(gw),
        p.index,
        RouteScope::Universe,
    )
    .await
    .map_err(nl_err("add the default IPv4 route"))?;
    // Neither side ever needs ARP: each knows the other's MAC.
    pod.set_permanent_neighbour(p.index, gw, &h.mac)
        .await
        .map_err(nl_err("add the gateway neighbour"))?;
    host.set_up(h.index)
        .await
        .map_err(nl_err("set the host veth up"))?;
    host.set_permanent_neighbour(h.index, ip, &p.mac)
        .await
        .map_err(nl_err("add the pod's neighbour on the host"))?;
    host.replace_route(MAIN_TABLE, ip, 32, None, h.index, RouteScope::Link)
        .await
        .map_err(nl_err("add the host route to the egress address"))?;
    Ok((h, p))
}

fn random_local_mac() -> [u8; 6] {
    let mut m = [0u8; 6];
    // SAFETY: getrandom(2) writes at most 6 bytes into our buffer.
    let n = unsafe { libc::getrandom(m.as_mut_ptr().cast(), m.len(), 0) };
    if n != 6 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
            ^ ((std::process::id() as u128) << 64);
        m.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    m[0] = (m[0] & 0xfe) | 0x02;
    m
}

fn ensure_ip_forward() -> Result<()> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    match fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => Ok(()),
        _ => fs::write(path, "1").map_err(|e| {
            CniError::new(ErrorCode::Io, "cannot turn IPv4 forwarding on").with_details(e)
        }),
    }
}

// --- the verbs -----------------------------------------------------------------------

pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>> {
    match env.command.as_str() {
        "VERSION" => Ok(Some(crate::version::version_info(
            peek_version(stdin).as_deref(),
        ))),
        "ADD" | "DEL" | "CHECK" | "STATUS" | "GC" => {
            let conf = EgressConf::parse(stdin)?;
            crate::log::init(&conf.log_file, conf.log_level);
            debug!(
                "egress-cni {} container={} netns={:?} ifname={}",
                env.command, env.container_id, env.netns, env.if_name
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| {
                    CniError::new(ErrorCode::Io, "cannot start the async runtime").with_details(e)
                })?;
            let out = rt.block_on(async {
                match env.command.as_str() {
                    "ADD" => add(env, &conf).await.map(Some),
                    "DEL" => del(env, &conf).await.map(|()| None),
                    "CHECK" => check(env, &conf).await.map(|()| None),
                    "STATUS" => Ok(None),
                    _ => gc(&conf).map(|()| None),
                }
            });
            match &out {
                Ok(_) => info!(
                    "egress-cni {} container={} done",
                    env.command, env.container_id
                ),
                Err(e) => error!(
                    "egress-cni {} container={} failed: {e}",
                    env.command, env.container_id
                ),
            }
            out
        }
        "" => Err(CniError::env(
            "CNI_COMMAND is not set: egress-cni is a CNI plugin, run by a container runtime",
        )),
        other => Err(CniError::env(format!(
            "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"
        ))),
    }
}

fn prev(conf: &EgressConf) -> Result<CniResult> {
    let p = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::config("egress-cni is a chained plugin: it needs prevResult (aws-cni's result)")
    })?;
    CniResult::from_prev(p)
}

fn store(conf: &EgressConf) -> Result<Store> {
    Store::open(&conf.data_dir, &conf.name).map_err(|e| {
        CniError::new(
            ErrorCode::Io,
            format!(
                "cannot open the address store in {}",
                conf.data_dir.display()
            ),
        )
        .with_details(e)
    })
}

async fn add(env: &CniEnv, conf: &EgressConf) -> Result<Value> {
    env.require_container_id()?;
    let mut result = prev(conf)?;
    if !conf.enabled {
        return Ok(result.to_json(conf.cni_version, &conf.cni_version_str));
    }
    if env.netns.is_empty() {
        return Err(CniError::env("CNI_NETNS is required for ADD"));
    }
    let sides = crate::plugin::open_pod_ns(&env.netns)?;
    ensure_ip_forward()?;
    let ip = store(conf)?
        .allocate(conf.range, &env.container_id, &conf.if_name)
        .map_err(|e| CniError::new(ErrorCode::Io, "no IPv4 egress address").with_details(e))?;
    let veth = host_veth(&env.container_id, &conf.if_name);
    let undo = |why: String| {
        let id = env.container_id.clone();
        async move {
            if let Ok(s) = store(conf) {
                let _ = s.release(&id, Some(&conf.if_name));
            }
            let _ = snat_del(&conf.name, &id, &[ip]);
            error!("egress-cni: undid ADD of {id} after {why}");
        }
    };
    let (h, p) = match build(&sides.host, &sides.pod, &sides.pod_ns, conf, &veth, ip).await {
        Ok(b) => b,
        Err(e) => {
            if let Ok(Some(l)) = sides.host.link(&veth).await
                && l.is_veth
            {
                let _ = sides.host.delete_link(l.index).await;
            }
            undo(e.msg.clone()).await;
            return Err(e);
        }
    };
    if let Err(e) = snat_add(conf, &env.container_id, ip) {
        let _ = sides.host.delete_link(h.index).await;
        undo(e.clone()).await;
        return Err(CniError::datapath("cannot set up the pod's IPv4 SNAT").with_details(e));
    }
    info!(
        "egress-cni: container {} has IPv4 egress {ip} on {} (host veth {veth}), SNAT to {}",
        env.container_id,
        conf.if_name,
        conf.node_ip.map(|i| i.to_string()).unwrap_or_default()
    );
    // Interfaces only: the pod's IPs stay the IPv6 ones aws-cni gave.
    result.interfaces.push(Interface {
        name: h.name.clone(),
        mac: format_mac(&h.mac),
        ..Default::default()
    });
    result.interfaces.push(Interface {
        name: p.name.clone(),
        mac: format_mac(&p.mac),
        sandbox: Some(env.netns.clone()),
        ..Default::default()
    });
    Ok(result.to_json(conf.cni_version, &conf.cni_version_str))
}

async fn del(env: &CniEnv, conf: &EgressConf) -> Result<()> {
    env.require_container_id()?;
    let host = Netlink::connect().map_err(|e| {
        CniError::new(ErrorCode::Io, "cannot open netlink on the host").with_details(e)
    })?;
    let veth = host_veth(&env.container_id, &conf.if_name);
    // The pair first (its routes and neighbours go with it), then SNAT, then the address.
    if let Some(l) = host
        .link(&veth)
        .await
        .map_err(nl_err("look up the egress veth"))?
        && l.is_veth
    {
        host.delete_link(l.index)
            .await
            .map_err(nl_err("remove the egress veth"))?;
    }
    let s = store(conf)?;
    let mine: Vec<Ipv4Addr> = s
        .all()
        .map_err(|e| CniError::new(ErrorCode::Io, "cannot read the address store").with_details(e))?
        .into_iter()
        .filter(|(_, id, ifn)| *id == env.container_id && *ifn == conf.if_name)
        .map(|(ip, _, _)| ip)
        .collect();
    snat_del(&conf.name, &env.container_id, &mine)
        .map_err(|e| CniError::datapath("cannot remove the pod's IPv4 SNAT").with_details(e))?;
    s.release(&env.container_id, Some(&conf.if_name))
        .map_err(|e| {
            CniError::new(ErrorCode::Io, "cannot release the egress address").with_details(e)
        })?;
    Ok(())
}

async fn check(env: &CniEnv, conf: &EgressConf) -> Result<()> {
    env.require_container_id()?;
    if !conf.enabled {
        return Ok(());
    }
    let sides = crate::plugin::open_pod_ns(&env.netns)?;
    let mut wrong = Vec::new();
    match sides
        .pod
        .link(&conf.if_name)
        .await
        .map_err(nl_err("look up the pod interface"))?
    {
        None => wrong.push(format!("pod interface {} is missing", conf.if_name)),
        Some(p) => {
            let addrs: Vec<(Ipv4Addr, u8)> = sides
                .pod
                .ipv4_addresses(p.index)
                .await
                .map_err(nl_err("list the pod's addresses"))?;
            if !addrs
                .iter()
                .any(|(a, l)| *l == 32 && conf.range.contains(*a))
            {
                wrong.push(format!(
                    "{} has no address of {}/{}",
                    conf.if_name, conf.range.network, conf.range.len
                ));
            }
            let gw = conf.range.gateway();
            let routes = sides
                .pod
                .routes()
                .await
                .map_err(nl_err("list the pod's routes"))?;
            if !routes
                .iter()
                .any(|r| r.dst_len == 0 && r.gateway == Some(gw) && r.oif == Some(p.index))
            {
                wrong.push(format!("pod lacks default IPv4 route via {gw}"));
            }
        }
    }
    if sides
        .host
        .link(&host_veth(&env.container_id, &conf.if_name))
        .await
        .map_err(nl_err("look up the egress veth"))?
        .is_none_or(|l| !l.up)
    {
        wrong.push("the host end of the egress veth is missing or down".into());
    }
    if iptables(&["-S", &chain_name(&conf.name, &env.container_id)]).is_err() {
        wrong.push("the pod's SNAT chain is missing".into());
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::CheckFailed,
            "the IPv4 egress datapath differs from what ADD built",
        )
        .with_details(wrong.join("; ")))
    }
}

/// GC: releases the addresses (and SNAT) of every attachment the runtime no longer has.
fn gc(conf: &EgressConf) -> Result<()> {
    let Some(valid) = &conf.valid_attachments else {
        return Err(CniError::config(
            "GC needs cni.dev/valid-attachments (the attachments still in use; [] for none): without it nothing is released",
        ));
    };
    let s = store(conf)?;
    let all = s.all().map_err(|e| {
        CniError::new(ErrorCode::Io, "cannot read the address store").with_details(e)
    })?;
    for (ip, id, _) in all {
        if valid.iter().any(|v| v.container_id == id) {
            continue;
        }
        if let Err(e) = snat_del(&conf.name, &id, &[ip]) {
            error!("egress-cni GC: SNAT of {id}: {e}");
            continue;
        }
        let _ = s.release(&id, None);
        info!("egress-cni GC released {ip} of container {id}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_gateway_and_pods() {
        let r = Range::parse("169.254.172.0/22").unwrap();
        assert_eq!(r.gateway(), Ipv4Addr::new(169, 254, 172, 1));
        let (a, b) = r.pods();
        assert_eq!(Ipv4Addr::from(a), Ipv4Addr::new(169, 254, 172, 2));
        assert_eq!(Ipv4Addr::from(b), Ipv4Addr::new(169, 254, 175, 254));
        assert!(Range::parse("169.254.172.1/22").is_none(), "not a network");
        assert!(Range::parse("169.254.172.0/30").is_none(), "too small");
        assert!(Range::parse("fd00::/64").is_none());
    }

    #[test]
    fn store_is_host_local_compatible_idempotent_and_wraps() {
        let dir = tempfile_dir();
        let r = Range::parse("10.9.0.0/29").unwrap(); // pods .2 ..= .6
        let s = Store::open(&dir, "net").unwrap();
        let a = s.allocate(r, "c1", "v4if0").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(s.allocate(r, "c1", "v4if0").unwrap(), a, "a repeated ADD");
        assert_eq!(
            fs::read_to_string(dir.join("net").join("10.9.0.2")).unwrap(),
            "c1\r\nv4if0"
        );
        let ips: Vec<_> = (2..=5)
            .map(|i| s.allocate(r, &format!("c{i}"), "v4if0").unwrap())
            .collect();
        assert_eq!(ips.last(), Some(&Ipv4Addr::new(10, 9, 0, 6)));
        assert!(s.allocate(r, "c9", "v4if0").is_err(), "full");
        assert_eq!(s.release("c1", None).unwrap(), vec![a]);
        // The next search starts after the last handed out: wraps to .2.
        assert_eq!(s.allocate(r, "c9", "v4if0").unwrap(), a);
        let _ = fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "egress-store-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn config_needs_node_ip_when_enabled_and_names_bad_fields() {
        let base = |extra: &str| {
            format!(r#"{{"cniVersion":"1.0.0","name":"aws-cni","type":"egress-cni"{extra}}}"#)
        };
        assert!(
            EgressConf::parse(base("").as_bytes())
                .unwrap_err()
                .msg
                .contains("nodeIP")
        );
        let c = EgressConf::parse(base(r#","nodeIP":"10.0.0.10","enabled":"true""#).as_bytes())
            .unwrap();
        assert_eq!(c.if_name, "v4if0");
        assert_eq!(c.range, Range::parse(DEFAULT_SUBNET).unwrap());
        assert_eq!(c.snat, Snat::Prng);
        let off = EgressConf::parse(base(r#","enabled":"false""#).as_bytes()).unwrap();
        assert!(!off.enabled);
        for (extra, names) in [
            (r#","nodeIP":"fd00::1""#, "nodeIP"),
            (
                r#","nodeIP":"10.0.0.1","randomizeSNAT":"always""#,
                "randomizeSNAT",
            ),
            (
                r#","nodeIP":"10.0.0.1","ipam":{"ranges":[[{"subnet":"169.254.172.5/22"}]]}"#,
                "subnet",
            ),
        ] {
            let e = EgressConf::parse(base(extra).as_bytes()).unwrap_err();
            assert!(e.msg.contains(names), "{extra}: {e:?}");
        }
    }

    #[test]
    fn chain_names_fit_iptables() {
        let c = chain_name("aws-cni", "0123456789abcdef0123456789abcdef");
        assert!(c.starts_with("CNI-E4-") && c.len() <= 28, "{c}");
        assert_ne!(c, chain_name("aws-cni", "another"));
    }
}
