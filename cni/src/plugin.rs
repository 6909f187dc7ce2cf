//! The CNI verbs: what ADD, DEL, CHECK, STATUS, GC and VERSION do, in order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde_json::Value;
use vpc_cni_proto::health::health_check_response::ServingStatus;
use vpc_cni_proto::rpc::{
    AddNetworkRequest, Attachment, DelNetworkRequest, GarbageCollectRequest, IpAllocationMetadata,
};

use crate::args::K8sArgs;
use crate::config::{NetConf, peek_version};
use crate::datapath::{self, Built, Occupants, PodFamily, PodSpec};
use crate::error::{CniError, ErrorCode, Result};
use crate::ipamd::{CLIENT_VERSION, CallError, Ipamd};
use crate::result::{CniResult, Interface, IpConfig, Route};
use crate::upstream;
use vpc_cni_netlink::netns::NetNs;
use vpc_cni_netlink::{Netlink, format_mac};

/// The CNI_* environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub if_name: String,
    pub args: String,
}

impl CniEnv {
    pub fn from_process() -> Self {
        let var = |k| std::env::var(k).unwrap_or_default();
        CniEnv {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            if_name: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }

    pub fn require_container_id(&self) -> Result<()> {
        if self.container_id.is_empty() {
            return Err(CniError::env(format!(
                "CNI_CONTAINERID is required for {}",
                self.command
            )));
        }
        Ok(())
    }

    pub fn require_if_name(&self) -> Result<()> {
        let n = &self.if_name;
        if n.is_empty() {
            return Err(CniError::env(format!(
                "CNI_IFNAME is required for {}",
                self.command
            )));
        }
        // The kernel's dev_valid_name().
        if n.len() > 15
            || n == "."
            || n == ".."
            || n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(CniError::env(format!(
                "CNI_IFNAME {n:?} is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
            )));
        }
        Ok(())
    }
}

/// Runs one verb. `Ok(Some(json))` is printed on stdout; `Err` becomes the CNI error JSON.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>> {
    match env.command.as_str() {
        "VERSION" => Ok(Some(crate::version::version_info(
            peek_version(stdin).as_deref(),
        ))),
        "ADD" | "DEL" | "CHECK" | "STATUS" | "GC" => {
            let conf = NetConf::parse(stdin)?;
            crate::log::init(&conf.log_file, conf.log_level);
            debug!(
                "{} container={} netns={:?} ifname={} args={:?}",
                env.command, env.container_id, env.netns, env.if_name, env.args
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
                    "STATUS" => status(&conf).await.map(|()| None),
                    _ => gc(&conf).await.map(|()| None),
                }
            });
            match &out {
                Ok(_) => info!("{} container={} done", env.command, env.container_id),
                Err(e) => error!("{} container={} failed: {e}", env.command, env.container_id),
            }
            out
        }
        "" => Err(CniError::env(
            "CNI_COMMAND is not set: aws-cni is a CNI plugin, run by a container runtime",
        )),
        other => Err(CniError::env(format!(
            "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"
        ))),
    }
}

/// The pod's network namespace and netlink sockets on both sides.
pub(crate) struct Sides {
    pub(crate) host: Netlink,
    pub(crate) pod: Netlink,
    pub(crate) pod_ns: NetNs,
}

/// Where CNI_NETNS stands.
enum PodNs {
    Open(Sides),
    /// No such path (or none given): the runtime removed the namespace already.
    Gone,
    /// Not a pod's network namespace (a file, a directory, another kind of namespace, the
    /// node's own): never entered, never changed.
    Unusable(CniError),
}

fn host_netlink() -> Result<Netlink> {
    Netlink::connect().map_err(|e| {
        CniError::new(ErrorCode::Io, "cannot open netlink on the host").with_details(e)
    })
}

/// Opens the pod's namespace, checking it is one: not a FIFO (opened non-blocking), not
/// another kind of file or namespace, and not the namespace the plugin runs in (the
/// node's: there, CNI_IFNAME would be one of the node's own interfaces).
fn pod_ns(path: &str) -> Result<PodNs> {
    if path.is_empty() {
        return Ok(PodNs::Gone);
    }
    let home = NetNs::current().map_err(|e| {
        CniError::new(ErrorCode::Io, "cannot open the host network namespace").with_details(e)
    })?;
    let pod_ns = match NetNs::open(Path::new(path)) {
        Ok(ns) => ns,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PodNs::Gone),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            return Ok(PodNs::Unusable(
                CniError::env(format!("CNI_NETNS {path} is not a network namespace"))
                    .with_details(e),
            ));
        }
        Err(e) => {
            return Err(CniError::new(
                ErrorCode::UnknownContainer,
                format!("cannot open CNI_NETNS {path}"),
            )
            .with_details(e));
        }
    };
    if pod_ns.same_as(&home).unwrap_or(false) {
        return Ok(PodNs::Unusable(CniError::env(format!(
            "CNI_NETNS {path} is this node's own network namespace, not a pod's"
        ))));
    }
    let pod = pod_ns
        .run_in(&home, Netlink::connect)
        .map_err(|e| {
            CniError::env(format!("CNI_NETNS {path} is not a network namespace")).with_details(e)
        })?
        .map_err(|e| {
            CniError::new(ErrorCode::Io, format!("cannot open netlink in {path}")).with_details(e)
        })?;
    Ok(PodNs::Open(Sides {
        host: host_netlink()?,
        pod,
        pod_ns,
    }))
}

/// The pod's namespace for ADD and CHECK, which must enter it.
pub(crate) fn open_pod_ns(path: &str) -> Result<Sides> {
    match pod_ns(path)? {
        PodNs::Open(s) => Ok(s),
        PodNs::Gone => Err(CniError::new(
            ErrorCode::UnknownContainer,
            format!("CNI_NETNS {path} does not exist"),
        )),
        PodNs::Unusable(e) => Err(e),
    }
}

/// The host veth of this attachment: upstream's name for `eth0`, one of its own for any
/// other interface of the pod (so a second attachment never takes the first's).
fn host_veth(conf: &NetConf, env: &CniEnv, k8s: &K8sArgs) -> String {
    if k8s.pod_name.is_empty() {
        // Not Kubernetes (podman, ctr): name the veth after the container instead.
        vpc_cni_proto::pod_veth_name(&conf.veth_prefix, "", &env.container_id, &env.if_name)
    } else {
        vpc_cni_proto::pod_veth_name(
            &conf.veth_prefix,
            &k8s.pod_namespace,
            &k8s.pod_name,
            &env.if_name,
        )
    }
}

/// The route table of a secondary ENI's address; `None` on the primary ENI.
fn table_of(meta: &IpAllocationMetadata) -> Option<u32> {
    if meta.device_number <= 0 {
        None
    } else if meta.route_table_id > 0 {
        Some(meta.route_table_id as u32)
    } else {
        Some(meta.device_number as u32 + 1)
    }
}

fn del_request(env: &CniEnv, conf: &NetConf, k8s: &K8sArgs, reason: &str) -> DelNetworkRequest {
    DelNetworkRequest {
        k8s_pod_name: k8s.pod_name.clone(),
        k8s_pod_namespace: k8s.pod_namespace.clone(),
        k8s_pod_infra_container_id: k8s.pod_infra_container_id.clone(),
        k8s_pod_uid: k8s.pod_uid.clone(),
        reason: reason.to_string(),
        if_name: env.if_name.clone(),
        network_name: conf.name.clone(),
        container_id: env.container_id.clone(),
        client_version: CLIENT_VERSION.to_string(),
    }
}

async fn add(env: &CniEnv, conf: &NetConf) -> Result<Value> {
    env.require_container_id()?;
    env.require_if_name()?;
    let k8s = K8sArgs::parse(&env.args)?;
    if env.netns.is_empty() {
        return Err(CniError::env("CNI_NETNS is required for ADD"));
    }
    // Prior results in a chain are kept; our part is appended.
    let prev = match &conf.prev_result {
        Some(v) => Some(CniResult::from_prev(v)?),
        None => None,
    };
    // Check the namespace, and that the names the datapath needs are free or ours,
    // before taking an address for it.
    let sides = open_pod_ns(&env.netns)?;
    let veth = host_veth(conf, env, &k8s);
    let probe = PodSpec {
        host_veth: veth.clone(),
        if_name: env.if_name.clone(),
        ip: Ipv4Addr::UNSPECIFIED,
        mtu: conf.mtu,
        table: None,
    };
    let old = datapath::occupants(&sides.host, &sides.pod, &probe)
        .await
        .map_err(|why| CniError::datapath(format!("cannot set up {}: {why}", env.if_name)))?;

    let ipamd = Ipamd::connect(&conf.ipamd).await?;
    // The host's MACs (the host veth's must be new) are read while ipamd answers; this
    // thread is in the host's namespace (the pod's is only entered to open its socket).
    let (reply, links) = tokio::join!(
        ipamd.add(AddNetworkRequest {
            k8s_pod_name: k8s.pod_name.clone(),
            k8s_pod_namespace: k8s.pod_namespace.clone(),
            k8s_pod_infra_container_id: k8s.pod_infra_container_id.clone(),
            netns: env.netns.clone(),
            if_name: env.if_name.clone(),
            network_name: conf.name.clone(),
            container_id: env.container_id.clone(),
            client_version: CLIENT_VERSION.to_string(),
            requires_multi_nic_attachment: false,
        }),
        vpc_cni_netlink::link_macs()
    );
    let reply = reply?;
    if !reply.success {
        return Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "ipamd has no free address for pod {}/{} now",
                k8s.pod_namespace, k8s.pod_name
            ),
        ));
    }
    let release = |why: String| {
        let req = del_request(env, conf, &k8s, "aws-cni: ADD failed");
        let ipamd = &ipamd;
        async move {
            if let Err(e) = ipamd.del(req).await {
                error!(
                    "could not hand the address back to ipamd after {why}: {}",
                    CniError::from(e)
                );
            } else {
                info!("handed the address back to ipamd after {why}");
            }
        }
    };
    let meta = reply
        .ip_allocation_metadata
        .first()
        .cloned()
        .unwrap_or_default();
    // One family per node: IPv4, or IPv6 on an ENABLE_IPv6 node (no IPv4 then).
    let ip: IpAddr = match (meta.i_pv4_addr.as_str(), meta.i_pv6_addr.as_str()) {
        ("", v6) if !v6.is_empty() => match v6.parse::<Ipv6Addr>() {
            Ok(ip) => IpAddr::V6(ip),
            Err(_) => {
                release("a bad answer".into()).await;
                return Err(CniError::new(
                    ErrorCode::Ipamd,
                    format!("ipamd answered AddNetwork with an unusable IPv6 address ({v6:?})"),
                ));
            }
        },
        (v4, _) => match v4.parse::<Ipv4Addr>() {
            Ok(ip) => IpAddr::V4(ip),
            Err(_) => {
                release("a bad answer".into()).await;
                return Err(CniError::new(
                    ErrorCode::Ipamd,
                    format!(
                        "ipamd answered AddNetwork without a usable IPv4 address ({:?})",
                        meta.i_pv4_addr
                    ),
                ));
            }
        },
    };
    let taken_macs: Vec<[u8; 6]> = match links {
        Ok(m) => m,
        Err(e) => {
            release("listing the host's links failed".into()).await;
            return Err(CniError::datapath("cannot list the host's links").with_details(e));
        }
    };
    let table = table_of(&meta);
    debug!(
        "ipamd gave {ip} (device {}, table {table:?})",
        meta.device_number
    );
    let (host_len, gateway, default_dst) = match ip {
        IpAddr::V4(_) => (32, IpAddr::V4(Ipv4Addr::GATEWAY), Ipv4Addr::DEFAULT_DST),
        IpAddr::V6(_) => (128, IpAddr::V6(Ipv6Addr::GATEWAY), Ipv6Addr::DEFAULT_DST),
    };
    let built = match ip {
        IpAddr::V4(ip) => {
            let spec = PodSpec {
                ip,
                table,
                ..probe.clone()
            };
            build(&sides, &spec, &old, &taken_macs).await
        }
        IpAddr::V6(ip) => {
            // An IPv6 pod is always on the primary ENI's prefix: the main table.
            let spec = PodSpec {
                host_veth: probe.host_veth.clone(),
                if_name: probe.if_name.clone(),
                ip,
                mtu: probe.mtu,
                table: None,
            };
            build(&sides, &spec, &old, &taken_macs).await
        }
    };
    let built = match built {
        Ok(b) => b,
        Err(e) => {
            release(format!("datapath setup failed ({e})")).await;
            return Err(CniError::datapath(format!(
                "could not build the datapath for {ip} on {}",
                probe.host_veth
            ))
            .with_details(e));
        }
    };
    info!(
        "pod {}/{} has {ip} on {} (host veth {})",
        k8s.pod_namespace, k8s.pod_name, probe.if_name, probe.host_veth
    );

    let mut ours = CniResult {
        interfaces: vec![
            Interface {
                name: built.host.name.clone(),
                mac: format_mac(&built.host.mac),
                ..Default::default()
            },
            Interface {
                name: built.pod.name.clone(),
                mac: format_mac(&built.pod.mac),
                sandbox: Some(env.netns.clone()),
                // Upstream's DEL reads the address's route table here (1 = main).
                pci_id: Some(table.filter(|_| ip.is_ipv4()).unwrap_or(1).to_string()),
                ..Default::default()
            },
        ],
        ips: vec![IpConfig {
            address: format!("{ip}/{host_len}"),
            gateway: Some(gateway),
            interface: Some(1),
        }],
        routes: vec![Route {
            dst: default_dst.into(),
            gw: Some(gateway),
        }],
        dns: Value::Null,
    };
    if !k8s.pod_name.is_empty() {
        // Upstream's `dummy`, for its DEL from this prevResult (upstream.rs). Only for a
        // Kubernetes pod, the only place upstream's plugin can follow ours: its `mac` of
        // "0" is no MAC, which podman refuses.
        ours.interfaces.push(upstream::dummy_interface(
            &k8s.pod_namespace,
            &k8s.pod_name,
            meta.device_number,
        ));
    }
    let result = match prev {
        Some(p) => p.chain(ours),
        None => ours,
    };
    Ok(result.to_json(conf.cni_version, &conf.cni_version_str))
}

/// Builds one pod's datapath of family `A`; what a failure left behind is removed.
async fn build<A: PodFamily>(
    sides: &Sides,
    spec: &PodSpec<A>,
    old: &Occupants,
    taken_macs: &[[u8; 6]],
) -> std::result::Result<Built, vpc_cni_netlink::NlError> {
    // Only an IPv6 pod's sysctls need the pod's namespace entered: the host's is opened
    // then, not on every ADD.
    let in_pod =
        |f: &mut dyn FnMut() -> std::io::Result<()>| sides.pod_ns.run_in(&NetNs::current()?, f)?;
    let r = datapath::setup(
        &sides.host,
        &sides.pod,
        sides.pod_ns.raw_fd(),
        &in_pod,
        spec,
        old,
        taken_macs,
    )
    .await;
    if r.is_err()
        && let Err(undo) = datapath::undo_setup(&sides.host, spec).await
    {
        error!("cleanup after failed setup also failed: {undo}");
    }
    r
}

/// DEL succeeds whenever nothing of the pod is left: when repeated, when the netns is
/// gone, empty or not a namespace at all, and when ipamd is unreachable. It never needs
/// to enter the pod's namespace, and it takes the datapath down before the address is
/// released: an address ipamd may hand to the next pod never has this pod's routes or
/// rules left behind, and the host veth is down (or gone) before then.
async fn del(env: &CniEnv, conf: &NetConf) -> Result<()> {
    env.require_container_id()?;
    env.require_if_name()?;
    let k8s = K8sArgs::parse(&env.args)?;
    let prev = conf
        .prev_result
        .as_ref()
        .and_then(|v| CniResult::from_prev(v).ok());
    // What to take down: this attachment, and the further ones of a pod upstream's plugin
    // set up, as its result says.
    let mut targets = vec![Target {
        host_veth: host_veth(conf, env, &k8s),
        if_name: env.if_name.clone(),
        prev_ip: prev.as_ref().and_then(|r| r.sandbox_ip(&env.if_name)),
    }];
    if let Some(prev) = &prev {
        match upstream::decode(
            prev,
            &conf.veth_prefix,
            &k8s.pod_namespace,
            &k8s.pod_name,
            &env.if_name,
        ) {
            Ok(upstream::Decoded::Attachments(a)) => {
                targets.extend(a.into_iter().skip(1).map(|a| Target {
                    host_veth: a.host_veth,
                    if_name: a.if_name,
                    prev_ip: Some(IpAddr::V4(a.ip)),
                }))
            }
            Ok(upstream::Decoded::Branch(vlan)) => warn!(
                "DEL: prevResult is of a pod on a branch ENI (VLAN {vlan}); its VLAN link and rules are upstream's security-groups-for-pods datapath, which this plugin does not build: only the veth is taken down"
            ),
            Ok(upstream::Decoded::Absent) => {}
            Err(why) => warn!("DEL: prevResult's upstream encoding is malformed ({why}): not used"),
        }
    }

    // 1. What the node shows is this sandbox's: its host veths, the /32s routed to them,
    //    the pod interfaces' addresses when they are the veths' peers.
    let (host, pod) = match pod_ns(&env.netns)? {
        PodNs::Open(s) => (s.host, Some(s.pod)),
        PodNs::Gone => (host_netlink()?, None),
        PodNs::Unusable(e) => {
            warn!("DEL: {}; tearing down from the node's side only", e.msg);
            (host_netlink()?, None)
        }
    };
    //    IPv6 is looked for only where the veth exists and shows no IPv4 (an IPv6 pod, or
    //    a prevResult that says IPv6): an IPv4 DEL reads no more than it did.
    let read_err = |e| CniError::datapath("cannot read the pod's datapath").with_details(e);
    let mut found = Vec::with_capacity(targets.len());
    let mut found6 = Vec::with_capacity(targets.len());
    for t in &targets {
        let h = host
            .link(&t.host_veth)
            .await
            .map_err(read_err)?
            .filter(|l| l.is_veth);
        // prevResult (containerd passes its cached one) names the family: one dump then.
        let v6 = matches!(t.prev_ip, Some(IpAddr::V6(_)));
        let f = if v6 {
            datapath::Found {
                host_veth: h.clone(),
                ..Default::default()
            }
        } else {
            datapath::find_on::<Ipv4Addr>(&host, pod.as_ref(), h.clone(), &t.if_name)
                .await
                .map_err(read_err)?
        };
        let f6 = if h.is_some() && (v6 || f.is_empty()) {
            datapath::find_on::<Ipv6Addr>(&host, pod.as_ref(), h, &t.if_name)
                .await
                .map_err(read_err)?
        } else {
            datapath::Found::default()
        };
        found.push(f);
        found6.push(f6);
    }

    // 2. Take it down first; a failure here leaves the address held, and DEL is retried.
    //    The veth pair goes with the pod's namespace when there is one (the runtime
    //    removes it next); without one, nothing else would remove it.
    for ((t, f), f6) in targets.iter().zip(&found).zip(&found6) {
        let failed = |e| {
            CniError::datapath(format!("could not remove the datapath of {}", t.host_veth))
                .with_details(e)
        };
        if !f6.is_empty() {
            // The veth itself goes (or goes down) with the IPv4 teardown that follows.
            datapath::clear_routes_and_rules(&host, f6)
                .await
                .map_err(failed)?;
        }
        datapath::teardown(&host, f, pod.is_some())
            .await
            .map_err(failed)?;
    }

    // 3. Release the address. ipamd tells us which it was.
    let released: std::result::Result<Option<IpAddr>, CallError> = async {
        let ipamd = Ipamd::connect(&conf.ipamd).await?;
        let reply = ipamd
            .del(del_request(env, conf, &k8s, "PodDeleted"))
            .await?;
        if !reply.success {
            return Err(CallError::Failed(CniError::new(
                ErrorCode::Ipamd,
                format!(
                    "ipamd refused to release the address of container {}",
                    env.container_id
                ),
            )));
        }
        Ok(reply.ip_allocation_metadata.first().and_then(|m| {
            m.i_pv4_addr
                .parse()
                .ok()
                .or_else(|| m.i_pv6_addr.parse::<Ipv6Addr>().ok().map(IpAddr::V6))
        }))
    }
    .await;

    // 4. The rules of an address the node did not show as ours (the veth was gone):
    //    ipamd's word, or prevResult when ipamd cannot be asked. Never when ipamd says
    //    the container holds nothing (a repeated DEL: the address may be another pod's
    //    now), nor when another pod's veth routes it.
    for (i, ((t, f), f6)) in targets.iter().zip(&found).zip(&found6).enumerate() {
        // A further attachment is upstream's alone (ipamd answers for the first): its
        // prevResult address, guarded as any address the node did not show as ours.
        let other = match &released {
            _ if i > 0 => t.prev_ip,
            Ok(ip) => *ip,
            Err(CallError::Unreachable(e)) => {
                warn!("ipamd unreachable on DEL, tearing down from local state: {e}");
                t.prev_ip
            }
            Err(CallError::Failed(_)) => t.prev_ip,
        };
        let ours = f.host_veth.as_ref().map(|h| h.index);
        let failed = |ip: IpAddr, e| {
            CniError::datapath(format!("could not remove the host rules of {ip}")).with_details(e)
        };
        match other {
            Some(IpAddr::V4(ip)) if !f.ips().any(|o| o == ip) => {
                datapath::remove_rules(&host, &[], &[ip], ours)
                    .await
                    .map_err(|e| failed(IpAddr::V4(ip), e))?;
            }
            Some(IpAddr::V6(ip)) if !f6.ips().any(|o| o == ip) => {
                datapath::remove_rules(&host, &[], &[ip], ours)
                    .await
                    .map_err(|e| failed(IpAddr::V6(ip), e))?;
            }
            _ => {}
        }
    }
    match released {
        Err(CallError::Failed(e)) => Err(e),
        _ => Ok(()),
    }
}

/// One attachment DEL takes down.
struct Target {
    host_veth: String,
    if_name: String,
    /// Its address in prevResult, if any.
    prev_ip: Option<IpAddr>,
}

async fn check(env: &CniEnv, conf: &NetConf) -> Result<()> {
    if !conf.cni_version.has_check() {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, the configuration says {}",
                conf.cni_version
            ),
        ));
    }
    env.require_container_id()?;
    env.require_if_name()?;
    let k8s = K8sArgs::parse(&env.args)?;
    if env.netns.is_empty() {
        return Err(CniError::env("CNI_NETNS is required for CHECK"));
    }
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::config("CHECK needs prevResult in the configuration"))?;
    let prev = CniResult::from_prev(prev)?;
    let ip = prev.sandbox_ip(&env.if_name).ok_or_else(|| {
        CniError::config(format!(
            "prevResult has no address for interface {}",
            env.if_name
        ))
    })?;
    let sides = open_pod_ns(&env.netns)?;
    let wrong = match ip {
        IpAddr::V4(ip) => check_family(&sides, conf, env, &k8s, ip).await?,
        IpAddr::V6(ip) => check_family(&sides, conf, env, &k8s, ip).await?,
    };
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::CheckFailed,
            format!("the datapath of {ip} differs from what ADD built"),
        )
        .with_details(wrong.join("; ")))
    }
}

/// CHECK of one family's datapath: what differs.
async fn check_family<A: PodFamily>(
    sides: &Sides,
    conf: &NetConf,
    env: &CniEnv,
    k8s: &K8sArgs,
    ip: A,
) -> Result<Vec<String>> {
    // Which table the from-rule should name is ipamd's knowledge; CHECK verifies it if
    // present and otherwise accepts the primary-ENI form.
    let rules = sides
        .host
        .rules_of::<A>()
        .await
        .map_err(|e| CniError::datapath("cannot read host rules").with_details(e))?;
    let table = rules
        .iter()
        .find(|r| {
            r.priority == datapath::FROM_POD_RULE_PRIORITY && r.from == Some((ip, A::HOST_LEN))
        })
        .map(|r| r.table);
    let spec = PodSpec {
        host_veth: host_veth(conf, env, k8s),
        if_name: env.if_name.clone(),
        ip,
        mtu: conf.mtu,
        table,
    };
    datapath::check(&sides.host, &sides.pod, &spec)
        .await
        .map_err(|e| CniError::datapath("cannot read the datapath").with_details(e))
}

/// STATUS and GC are verbs of CNI 1.1.0: a configuration of an earlier version has none.
fn require_1_1(conf: &NetConf, verb: &str) -> Result<()> {
    if conf.cni_version.has_status_and_gc() {
        return Ok(());
    }
    Err(CniError::new(
        ErrorCode::IncompatibleVersion,
        format!(
            "{verb} needs cniVersion 1.1.0 or later, the configuration says {}",
            conf.cni_version
        ),
    ))
}

async fn status(conf: &NetConf) -> Result<()> {
    require_1_1(conf, "STATUS")?;
    let not_available = |e: CniError| CniError {
        code: ErrorCode::NotAvailable,
        ..e
    };
    let ipamd = Ipamd::connect(&conf.ipamd)
        .await
        .map_err(|e| not_available(e.into()))?;
    match ipamd.health().await.map_err(|e| not_available(e.into()))? {
        ServingStatus::Serving => Ok(()),
        s => Err(CniError::new(
            ErrorCode::NotAvailable,
            format!(
                "ipamd at {} cannot hand out addresses now (health: {})",
                conf.ipamd,
                s.as_str_name()
            ),
        )),
    }
}

async fn gc(conf: &NetConf) -> Result<()> {
    require_1_1(conf, "GC")?;
    // Without the list every attachment of the network would look stale (cnitool sends
    // none): that is not a request to release them all.
    let Some(valid) = conf.valid_attachments.clone() else {
        return Err(CniError::config(
            "GC needs cni.dev/valid-attachments (the attachments still in use; [] for none): without it nothing is released",
        ));
    };
    let ipamd = Ipamd::connect(&conf.ipamd).await?;
    let reply = ipamd
        .garbage_collect(GarbageCollectRequest {
            network_name: conf.name.clone(),
            valid_attachments: valid
                .iter()
                .map(|a| Attachment {
                    container_id: a.container_id.clone(),
                    if_name: a.ifname.clone(),
                })
                .collect(),
            client_version: CLIENT_VERSION.to_string(),
        })
        .await?;
    let Some(reply) = reply else {
        info!("ipamd does not implement GC; nothing collected");
        return Ok(());
    };
    let (mut released, mut released6) = (Vec::new(), Vec::new());
    for r in &reply.released {
        let Some(m) = r.ip_allocation_metadata.as_ref() else {
            continue;
        };
        let ip: IpAddr = if let Ok(v4) = m.i_pv4_addr.parse::<Ipv4Addr>() {
            released.push(v4);
            v4.into()
        } else if let Ok(v6) = m.i_pv6_addr.parse::<Ipv6Addr>() {
            released6.push(v6);
            v6.into()
        } else {
            continue;
        };
        info!(
            "GC released {ip} of container {} ({})",
            r.container_id, r.if_name
        );
    }
    // One listing of the rules (of each family) for all of them.
    let host = host_netlink()?;
    let failed = |e| {
        CniError::datapath(format!(
            "could not remove the host rules of {released:?} {released6:?}"
        ))
        .with_details(e)
    };
    datapath::remove_rules(&host, &released, &[], None)
        .await
        .map_err(failed)?;
    datapath::remove_rules(&host, &released6, &[], None)
        .await
        .map_err(failed)?;
    if !reply.success {
        return Err(CniError::new(
            ErrorCode::Ipamd,
            "ipamd could not finish garbage collection",
        ));
    }
    Ok(())
}
