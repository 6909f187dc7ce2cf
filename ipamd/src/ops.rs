//! What an operator reads: the introspection HTTP server (upstream's `/v1/...` JSON, plus
//! `/v1/pods`, `/v1/pool` and `/v1/ec2-budget`) and Prometheus metrics under upstream's
//! names. Both are computed from the node's state at request time; nothing is cached.
//!
//! Metrics are written in the Prometheus text format (0.0.4), which is what upstream's Go
//! client serves. The `prometheus-client` crate only writes OpenMetrics, where a counter's
//! samples must end in `_total`: `awscni_add_ip_req_count` would become
//! `awscni_add_ip_req_count_total` and break the dashboards we promise to keep working.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use ipamd_core::budget::{BucketView, CallStats};
use ipamd_core::config::Config;
use ipamd_core::datastore::Assignment;
use ipamd_core::node::{EniConfigState, Node, StoreView, rfc3339};
use ipamd_core::pool::{Decision, Mode, PoolState};
use serde_json::{Value, json};

/// The EC2 budget as read at request time.
pub trait BudgetSource: Send + Sync {
    fn stats(&self) -> CallStats;
    fn buckets(&self) -> Vec<BucketView>;
}

impl<E: ipamd_core::cloud::Ec2> BudgetSource for ipamd_core::budget::Budgeted<E> {
    fn stats(&self) -> CallStats {
        ipamd_core::budget::Budgeted::stats(self)
    }
    fn buckets(&self) -> Vec<BucketView> {
        ipamd_core::budget::Budgeted::buckets(self)
    }
}

/// The knobs that configure host networking (upstream's networkutils settings).
pub const NETWORKUTILS_KNOBS: [&str; 8] = [
    "AWS_VPC_K8S_CNI_EXTERNALSNAT",
    "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
    "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
    "AWS_EXTERNAL_SERVICE_CIDRS",
    "AWS_VPC_CNI_NODE_PORT_SUPPORT",
    "AWS_VPC_K8S_CNI_CONNMARK",
    "AWS_VPC_ENI_MTU",
    "AWS_VPC_K8S_CNI_VETHPREFIX",
];

#[derive(Clone)]
pub struct Ops {
    pub node: Arc<Node>,
    pub budget: Arc<dyn BudgetSource>,
    /// Every knob ipamd read at start-up and its raw value ("" when unset).
    pub env: BTreeMap<String, String>,
}

pub fn introspection_router(ops: Ops) -> Router {
    Router::new()
        .route("/v1/enis", get(enis))
        .route("/v1/eni-configs", get(eni_configs))
        .route("/v1/ipamd-env-settings", get(ipamd_env))
        .route("/v1/networkutils-env-settings", get(networkutils_env))
        .route("/v1/pods", get(pods))
        .route("/v1/pool", get(pool))
        .route("/v1/ec2-budget", get(ec2_budget))
        .with_state(ops)
}

pub fn metrics_router(ops: Ops) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(ops)
}

/// Serves `router` on `addr`: `host:port`, `:port` (every interface) or `unix:/path`.
pub async fn serve(
    addr: &str,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Some(path) = addr.strip_prefix("unix:") {
        let path = std::path::Path::new(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        ipamd_core::server::remove_stale_socket(path)?;
        let l = tokio::net::UnixListener::bind(path)?;
        return axum::serve(l, router)
            .with_graceful_shutdown(shutdown)
            .await;
    }
    let addr = if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_string()
    };
    let l = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(l, router)
        .with_graceful_shutdown(shutdown)
        .await
}

pub(crate) fn ns_time(ns: u64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_nanos(ns))
}

const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Go's JSON of a net.IPMask: base64 of its bytes.
fn mask_b64(len: u8) -> String {
    let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let b = m.to_be_bytes();
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
    let mut s = String::new();
    for i in (0..4).rev() {
        s.push(T[((n >> (6 * i)) & 63) as usize] as char);
    }
    let last = b[3];
    s.push(T[(last >> 2) as usize] as char);
    s.push(T[((last & 3) << 4) as usize] as char);
    s.push_str("==");
    s
}

fn address_entry(ip: Ipv4Addr, a: Option<&Assignment>, released_ns: Option<u64>) -> Value {
    json!({
        "Address": ip.to_string(),
        "IPAMKey": {
            "networkName": a.map(|a| a.key.network.as_str()).unwrap_or(""),
            "containerID": a.map(|a| a.key.container_id.as_str()).unwrap_or(""),
            "ifName": a.map(|a| a.key.if_name.as_str()).unwrap_or(""),
        },
        "IPAMMetadata": {
            "k8sPodNamespace": a.map(|a| a.pod.namespace.as_str()).unwrap_or(""),
            "k8sPodName": a.map(|a| a.pod.name.as_str()).unwrap_or(""),
        },
        "AssignedTime": a.map(|a| ns_time(a.assigned_at_ns)).unwrap_or_else(|| ZERO_TIME.into()),
        "UnassignedTime": released_ns.map(ns_time).unwrap_or_else(|| ZERO_TIME.into()),
    })
}

/// Upstream's ENIInfos: per ENI its CIDRs (a /32 per secondary IP, or the /28s) with the
/// addresses in use (assigned, or cooling down), and the node's totals.
pub fn enis_json(v: &StoreView) -> Value {
    let by_ip: BTreeMap<Ipv4Addr, &Assignment> = v.assignments.iter().map(|a| (a.ip, a)).collect();
    let cooling: BTreeMap<Ipv4Addr, u64> = v.cooldowns.iter().copied().collect();
    let used = |ip: Ipv4Addr| by_ip.contains_key(&ip) || cooling.contains_key(&ip);
    let mut enis = serde_json::Map::new();
    for e in &v.enis {
        let mut cidrs = serde_json::Map::new();
        let mut add_cidr = |ip: Ipv4Addr, len: u8, addrs: Vec<Ipv4Addr>, is_prefix: bool| {
            let mut m = serde_json::Map::new();
            for a in addrs.into_iter().filter(|a| used(*a)) {
                m.insert(
                    a.to_string(),
                    address_entry(a, by_ip.get(&a).copied(), cooling.get(&a).copied()),
                );
            }
            cidrs.insert(
                format!("{ip}/{len}"),
                json!({
                    "Cidr": {"IP": ip.to_string(), "Mask": mask_b64(len)},
                    "IPAddresses": m,
                    "IsPrefix": is_prefix,
                    "AddressFamily": "4",
                }),
            );
        };
        for ip in &e.ips {
            add_cidr(*ip, 32, vec![*ip], false);
        }
        for p in &e.prefixes {
            let base = u32::from(p.addr);
            let addrs = (0..16).map(|i| Ipv4Addr::from(base + i)).collect();
            add_cidr(p.addr, p.len, addrs, true);
        }
        enis.insert(
            e.id.clone(),
            json!({
                "ID": e.id,
                "IsPrimary": e.is_primary,
                "IsTrunk": false,
                "IsEFA": false,
                "DeviceNumber": e.device_number,
                "SubnetID": e.subnet_id,
                "MAC": e.mac,
                "PrimaryIP": e.primary_ip.to_string(),
                "AvailableIPv4Cidrs": cidrs,
                "IPv6Cidrs": {},
            }),
        );
    }
    json!({"TotalIPs": v.total, "AssignedIPs": v.assigned, "ENIs": enis})
}

async fn enis(State(o): State<Ops>) -> Json<Value> {
    Json(enis_json(&o.node.view()))
}

/// Upstream's shape: every ENIConfig by name (`ENI`) and the node's (`MyENI`); ours adds
/// whether custom networking is on and why the node's config cannot be used, if it cannot.
async fn eni_configs(State(o): State<Ops>) -> Json<Value> {
    Json(eni_configs_json(&o.node))
}

pub fn eni_configs_json(node: &Node) -> Value {
    let all: serde_json::Map<String, Value> = node
        .eni_configs_known()
        .into_iter()
        .map(|c| {
            (
                c.name,
                json!({"securityGroups": c.security_groups, "subnet": c.subnet}),
            )
        })
        .collect();
    let mine = match node.eni_config() {
        EniConfigState::Found(c) => c.name,
        EniConfigState::Missing { name, .. } => name,
        EniConfigState::Pending => String::new(),
    };
    json!({
        "ENI": all,
        "MyENI": if node.cfg.custom_network_cfg { mine } else { String::new() },
        "CustomNetworking": node.cfg.custom_network_cfg,
        "problem": node.eni_config_problem(),
    })
}

async fn ipamd_env(State(o): State<Ops>) -> Json<BTreeMap<String, String>> {
    Json(
        o.env
            .iter()
            .filter(|(k, _)| !NETWORKUTILS_KNOBS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

/// The host-networking knobs as ipamd applies them (typed, like upstream's).
pub fn networkutils_json(c: &Config) -> Value {
    json!({
        "AWS_VPC_K8S_CNI_EXTERNALSNAT": c.external_snat,
        "AWS_VPC_K8S_CNI_RANDOMIZESNAT": format!("{:?}", c.randomize_snat).to_ascii_lowercase(),
        "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": c.exclude_snat_cidrs,
        "AWS_EXTERNAL_SERVICE_CIDRS": c.external_service_cidrs,
        "AWS_VPC_CNI_NODE_PORT_SUPPORT": c.node_port_support,
        "AWS_VPC_K8S_CNI_CONNMARK": c.connmark,
        "AWS_VPC_ENI_MTU": c.eni_mtu,
        "AWS_VPC_K8S_CNI_VETHPREFIX": c.veth_prefix,
    })
}

async fn networkutils_env(State(o): State<Ops>) -> Json<Value> {
    Json(networkutils_json(&o.node.cfg))
}

pub fn pods_json(v: &StoreView) -> Value {
    Value::Array(
        v.assignments
            .iter()
            .map(|a| {
                json!({
                    "namespace": a.pod.namespace,
                    "name": a.pod.name,
                    "networkName": a.key.network,
                    "containerID": a.key.container_id,
                    "ifName": a.key.if_name,
                    "ip": a.ip.to_string(),
                    "eni": a.eni,
                    "deviceNumber": a.device_number,
                    "assignedAt": ns_time(a.assigned_at_ns),
                })
            })
            .collect(),
    )
}

async fn pods(State(o): State<Ops>) -> Json<Value> {
    Json(pods_json(&o.node.view()))
}

fn state_json(s: &PoolState) -> Value {
    json!({
        "enis": s.enis,
        "total": s.total,
        "assigned": s.assigned,
        "cooldown": s.cooldown,
        "available": s.available(),
        "freeSlots": s.free_slots,
        "prefixes": s.prefixes,
    })
}

fn decision_str(d: &Decision) -> String {
    match d {
        Decision::Steady => "steady".into(),
        Decision::Assign { count } => format!("assign {count}"),
        Decision::AttachEni => "attach an ENI".into(),
        Decision::Release { count } => format!("release {count}"),
        Decision::FreeEni => "free an ENI".into(),
        Decision::AtCapacity => "at capacity".into(),
    }
}

pub fn pool_json(node: &Node) -> Value {
    let c = &node.cfg;
    let limits = node.limits();
    let (mode, targets) = match limits.map(|l| node.policy(l).mode) {
        Some(Mode::Eni { warm_eni }) => ("eni", json!({"WARM_ENI_TARGET": warm_eni})),
        Some(Mode::IpTarget { warm_ip, min_ip }) => (
            "ip-target",
            json!({"WARM_IP_TARGET": warm_ip, "MINIMUM_IP_TARGET": min_ip}),
        ),
        Some(Mode::Prefix {
            warm_prefix,
            warm_ip,
            min_ip,
        }) => (
            "prefix",
            json!({"WARM_PREFIX_TARGET": warm_prefix, "WARM_IP_TARGET": warm_ip, "MINIMUM_IP_TARGET": min_ip}),
        ),
        None => ("unknown until DescribeInstanceTypes answers", json!({})),
    };
    let mut out = json!({
        "mode": mode,
        "targets": targets,
        "maxEni": c.max_eni,
        "limits": limits.map(|l| json!({
            "maxEnis": l.max_enis,
            "ipv4PerEni": l.ipv4_per_eni,
            "maxPods": node.policy(l).max_pods(),
        })),
        "decisions": node.decisions().iter().rev().map(|d| json!({
            "at": rfc3339(d.at),
            "decision": decision_str(&d.decision),
            "outcome": d.outcome,
            "state": state_json(&d.state),
        })).collect::<Vec<_>>(),
    });
    let (schedule, since) = node.schedule();
    out["node"] = json!({
        "name": c.node_name,
        "schedule": schedule.name(),
        "scheduleForSeconds": since.elapsed().as_secs(),
        "manageEnisNonSchedulable": c.manage_enis_non_schedulable,
        "eniHold": node.eni_hold(),
    });
    if c.custom_network_cfg {
        out["customNetworking"] = eni_configs_json(node);
    }
    let free = node.view().free;
    out["free"] = json!(free);
    out["exhausted"] = json!(node.pool_exhausted());
    out["waitingForLink"] = json!(
        node.waiting_for_link()
            .iter()
            .map(|(eni, dev, since)| json!({
                "eni": eni,
                "device": dev,
                "waitingSeconds": since.elapsed().as_secs(),
            }))
            .collect::<Vec<_>>()
    );
    out["assignBackoff"] = json!(
        node.eni_backoffs()
            .iter()
            .map(|(eni, b)| json!({
                "eni": eni,
                "retryInSeconds": b.until.saturating_duration_since(tokio::time::Instant::now()).as_secs(),
            }))
            .collect::<Vec<_>>()
    );
    if let Some(l) = limits {
        let p = node.policy(l);
        let s = node.pool_state(l);
        out["state"] = state_json(&s);
        out["shortfall"] = json!(p.shortfall(&s));
        out["surplus"] = json!(p.surplus(&s));
        out["next"] = json!(decision_str(&p.decide(&s)));
        out["effectiveMaxEnis"] = json!(p.max_enis);
    }
    out
}

async fn pool(State(o): State<Ops>) -> Json<Value> {
    Json(pool_json(&o.node))
}

pub fn budget_json(stats: &CallStats, buckets: &[BucketView]) -> Value {
    json!({
        "calls": stats.calls,
        "errors": stats.errors,
        "totalCalls": stats.total_calls(),
        "throttled": stats.throttled,
        "waitedMs": stats.waited_ms,
        "buckets": buckets.iter().map(|b| json!({
            "family": b.family.name(),
            "tokens": (b.tokens * 100.0).round() / 100.0,
            "capacity": b.capacity,
            "perSecond": b.per_sec,
        })).collect::<Vec<_>>(),
        // The last calls in the order sent: [ms since start, action, "200" or error code].
        "log": stats.log.iter().map(|c| json!([c.at_ms, c.api, c.status])).collect::<Vec<_>>(),
    })
}

async fn ec2_budget(State(o): State<Ops>) -> Json<Value> {
    Json(budget_json(&o.budget.stats(), &o.budget.buckets()))
}

async fn metrics(State(o): State<Ops>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render_metrics(&o.node, &o.budget.stats()),
    )
}

/// Label values escaped as the text format wants.
pub(crate) fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(crate) struct Out(pub(crate) String);

impl Out {
    pub(crate) fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    pub(crate) fn one(&mut self, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
        self.head(name, kind, help);
        let _ = writeln!(self.0, "{name} {v}");
    }
    pub(crate) fn labelled(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        values: &BTreeMap<String, u64>,
    ) {
        self.head(name, kind, help);
        for (k, v) in values {
            let _ = writeln!(self.0, "{name}{{{label}=\"{}\"}} {v}", esc(k));
        }
    }
}

/// Prometheus text for the node's state now, the budget's counts and ipamd's counters.
pub fn render_metrics(node: &Node, ec2: &CallStats) -> String {
    let v = node.view();
    let m = &node.metrics;
    let mut o = Out(String::with_capacity(8 << 10));
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    o.head(
        "awscni_build_info",
        "gauge",
        "A metric with a constant '1' value labeled by version",
    );
    let _ = writeln!(
        o.0,
        "awscni_build_info{{version=\"{}\",implementation=\"rust\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    o.one(
        "awscni_eni_allocated",
        "gauge",
        "The number of ENIs allocated",
        v.enis.len(),
    );
    if let Some(l) = node.limits() {
        let p = node.policy(l);
        let per_eni = match p.mode {
            Mode::Prefix { .. } => l.slots_per_eni() * 16,
            _ => l.slots_per_eni(),
        };
        o.one(
            "awscni_eni_max",
            "gauge",
            "The maximum number of ENIs that can be attached to the instance, accounting for unmanaged ENIs",
            p.max_enis,
        );
        o.one(
            "awscni_ip_max",
            "gauge",
            "The maximum number of IP addresses that can be allocated to the instance",
            p.max_enis * per_eni,
        );
    }
    o.one(
        "awscni_total_ip_addresses",
        "gauge",
        "The total number of IP addresses",
        v.total,
    );
    o.one(
        "awscni_assigned_ip_addresses",
        "gauge",
        "The number of IP addresses assigned to pods",
        v.assigned,
    );
    o.one(
        "awscni_total_ipv4_prefixes",
        "gauge",
        "The total number of IPv4 prefixes",
        v.enis.iter().map(|e| e.prefixes.len()).sum::<usize>(),
    );
    o.one(
        "awscni_add_ip_req_count",
        "counter",
        "The number of add IP address requests",
        m.add_ip_req.load(relaxed),
    );
    o.labelled(
        "awscni_del_ip_req_count",
        "counter",
        "The number of delete IP address requests",
        "reason",
        &m.del_requests(),
    );
    o.labelled(
        "awscni_ec2api_req_count",
        "counter",
        "The number of requests made to EC2 APIs by CNI",
        "fn",
        &ec2.calls,
    );
    o.labelled(
        "awscni_ec2api_error_count",
        "counter",
        "The number of failed EC2 APIs requests",
        "fn",
        &ec2.errors,
    );
    o.head(
        "awscni_aws_api_latency_ms",
        "summary",
        "AWS API call latency in ms",
    );
    for ((api, failed, status), (count, sum_us)) in &ec2.latency {
        let l = format!(
            "api=\"{}\",error=\"{failed}\",status=\"{}\"",
            esc(api),
            esc(status)
        );
        let _ = writeln!(
            o.0,
            "awscni_aws_api_latency_ms_sum{{{l}}} {}",
            *sum_us as f64 / 1000.0
        );
        let _ = writeln!(o.0, "awscni_aws_api_latency_ms_count{{{l}}} {count}");
    }
    o.one(
        "awscni_ec2api_throttled_count",
        "counter",
        "EC2 calls answered RequestLimitExceeded (retried after backing off)",
        ec2.throttled,
    );
    o.one(
        "awscni_no_available_ip_addresses",
        "counter",
        "The number of pod IP assignments that failed due to no available IP addresses",
        m.no_available_ip.load(relaxed),
    );
    o.labelled(
        "awscni_ipamd_error_count",
        "counter",
        "The number of errors encountered in ipamd",
        "fn",
        &m.errors(),
    );
    o.labelled(
        "awscni_reconcile_count",
        "counter",
        "The number of times ipamd reconciles on ENIs and IP/Prefix addresses",
        "fn",
        &m.reconciles(),
    );
    o.one(
        "awscni_force_removed_enis",
        "counter",
        "ENIs EC2 no longer showed attached (detached by someone else), forgotten by ipamd",
        m.force_removed_enis.load(relaxed),
    );
    o.one(
        "awscni_force_removed_ips",
        "counter",
        "Free addresses EC2 no longer showed on their ENI (unassigned by someone else), forgotten by ipamd",
        m.force_removed_ips.load(relaxed),
    );
    o.one(
        "awscni_reclaimed_ip_addresses",
        "counter",
        "Assignments released because their pod had no interface on the host (a DEL that never reached ipamd)",
        m.reclaimed_ips.load(relaxed),
    );
    o.one(
        "awscni_leaked_enis_deleted",
        "counter",
        "ENIs this node created and found unattached, deleted by the sweep",
        m.leaked_enis_deleted.load(relaxed),
    );
    o.one(
        "awscni_eni_management_held",
        "gauge",
        "1 while ENIs are neither attached nor freed because the node is cordoned (AWS_MANAGE_ENIS_NON_SCHEDULABLE=false)",
        node.eni_hold().is_some() as u8,
    );
    o.one(
        "awscni_eni_config_missing",
        "gauge",
        "1 while custom networking has no usable ENIConfig for this node (none named or found, or its subnet unusable): no ENI is attached",
        node.eni_config_problem().is_some() as u8,
    );
    o.one(
        "awscni_pool_exhausted",
        "gauge",
        "1 while no address is free and the pool cannot grow (max pods, MAX_ENI, the instance's limits): a full node, still healthy",
        node.pool_exhausted() as u8,
    );
    let waiting: BTreeMap<String, u64> = node
        .waiting_for_link()
        .into_iter()
        .map(|(eni, _, since)| (eni, since.elapsed().as_secs()))
        .collect();
    o.labelled(
        "awscni_eni_waiting_for_link_seconds",
        "gauge",
        "ENIs attached whose link has not appeared on the host: seconds waited so far",
        "eni",
        &waiting,
    );
    let backoffs: BTreeMap<String, u64> = node
        .eni_backoffs()
        .into_iter()
        .map(|(eni, b)| {
            (
                eni,
                b.until
                    .saturating_duration_since(tokio::time::Instant::now())
                    .as_secs(),
            )
        })
        .collect();
    o.labelled(
        "awscni_eni_assign_backoff_seconds",
        "gauge",
        "ENIs EC2 refuses more addresses for although ipamd counts room: seconds before it is asked again",
        "eni",
        &backoffs,
    );
    let free: BTreeMap<String, u64> = v
        .subnets
        .iter()
        .map(|(s, (t, a))| (s.clone(), t.saturating_sub(*a) as u64))
        .collect();
    o.labelled(
        "awscni_subnet_free_ip_addresses",
        "gauge",
        "Addresses this node holds in the subnet and has not assigned to a pod",
        "subnet",
        &free,
    );
    let held: BTreeMap<String, u64> = v
        .subnets
        .iter()
        .map(|(s, (t, _))| (s.clone(), *t as u64))
        .collect();
    o.labelled(
        "awscni_subnet_ip_addresses",
        "gauge",
        "Addresses this node holds in the subnet for pods",
        "subnet",
        &held,
    );
    let h = m.add_latency.view();
    o.head(
        "awscni_add_network_latency_seconds",
        "histogram",
        "AddNetwork latency inside ipamd, answered calls (includes any wait for the pool to refill)",
    );
    for (bound, n) in &h.cumulative {
        let le = if bound.is_infinite() {
            "+Inf".to_string()
        } else {
            bound.to_string()
        };
        let _ = writeln!(
            o.0,
            "awscni_add_network_latency_seconds_bucket{{le=\"{le}\"}} {n}"
        );
    }
    let _ = writeln!(
        o.0,
        "awscni_add_network_latency_seconds_sum {}\nawscni_add_network_latency_seconds_count {}",
        h.sum_seconds, h.count
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_encode_like_go() {
        assert_eq!(mask_b64(32), "/////w==");
        assert_eq!(mask_b64(28), "////8A==");
        assert_eq!(mask_b64(0), "AAAAAA==");
    }
}
