//! Introspection and metrics of an IPv6 node (ENABLE_IPv6): the same endpoints and metric
//! names as the IPv4 node's where they mean something with one /80 prefix and no pool.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use ipamd_core::budget::CallStats;
use ipamd_core::node6::{Node6, View6};
use serde_json::{Value, json};

use crate::ops::{BudgetSource, NETWORKUTILS_KNOBS, Out, budget_json, networkutils_json, ns_time};

#[derive(Clone)]
pub struct Ops6 {
    pub node: Arc<Node6>,
    pub budget: Arc<dyn BudgetSource>,
    /// Every knob ipamd read at start-up and its raw value ("" when unset).
    pub env: BTreeMap<String, String>,
}

pub fn introspection_router(ops: Ops6) -> Router {
    Router::new()
        .route("/v1/enis", get(enis))
        .route("/v1/ipamd-env-settings", get(ipamd_env))
        .route("/v1/networkutils-env-settings", get(networkutils_env))
        .route("/v1/pods", get(pods))
        .route("/v1/pool", get(pool))
        .route("/v1/ec2-budget", get(ec2_budget))
        .with_state(ops)
}

pub fn metrics_router(ops: Ops6) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(ops)
}

/// Upstream's ENIInfos shape: the primary ENI with its IPv6 prefixes and the addresses
/// assigned from them.
pub fn enis_json(node: &Node6) -> Value {
    let v = node.view();
    let id = node.identity();
    let prefixes: Vec<Value> = v
        .prefixes
        .iter()
        .map(|p| {
            let ips: serde_json::Map<String, Value> = v
                .assignments
                .iter()
                .filter(|a| p.contains(a.ip))
                .map(|a| {
                    (
                        a.ip.to_string(),
                        json!({
                            "Address": a.ip.to_string(),
                            "IPAMKey": {
                                "networkName": a.key.network,
                                "containerID": a.key.container_id,
                                "ifName": a.key.if_name,
                            },
                            "IPAMMetadata": {
                                "k8sPodNamespace": a.pod.namespace,
                                "k8sPodName": a.pod.name,
                            },
                            "AssignedTime": ns_time(a.assigned_at_ns),
                        }),
                    )
                })
                .collect();
            json!({"Cidr": p.to_string(), "IPAddresses": ips, "IsPrefix": true, "AddressFamily": "6"})
        })
        .collect();
    let mut enis = serde_json::Map::new();
    if !v.eni.is_empty() {
        enis.insert(
            v.eni.clone(),
            json!({
                "ID": v.eni,
                "IsPrimary": true,
                "DeviceNumber": 0,
                "IPv6Cidrs": prefixes,
                "IPv4Cidrs": {},
            }),
        );
    }
    json!({
        "TotalIPs": v.capacity,
        "AssignedIPs": v.assignments.len(),
        "ENIs": enis,
        "PrimaryIPv6": id.and_then(|i| i.primary_ipv6).map(|a| a.to_string()),
    })
}

pub fn pods_json(v: &View6) -> Value {
    Value::Array(
        v.assignments
            .iter()
            .map(|a| {
                json!({
                    "namespace": a.pod.namespace,
                    "name": a.pod.name,
                    "containerID": a.key.container_id,
                    "ifName": a.key.if_name,
                    "networkName": a.key.network,
                    "ipv6": a.ip.to_string(),
                    "eni": a.eni,
                    "deviceNumber": 0,
                    "assignedAt": ns_time(a.assigned_at_ns),
                })
            })
            .collect(),
    )
}

pub fn pool_json(node: &Node6) -> Value {
    let v = node.view();
    let id = node.identity();
    json!({
        "family": "ipv6",
        "instance": id.map(|i| i.meta.instance_id.clone()),
        "eni": v.eni,
        "prefixes": v.prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "waitingForPrefix": v.prefix_fault,
        "subnetIPv6Cidr": id.and_then(|i| i.subnet_cidr).map(|c| c.to_string()),
        "vpcIPv6Cidrs": node.vpc_cidrs().iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "capacity": v.capacity,
        "assigned": v.assignments.len(),
        "cooling": v.cooling,
        "health": node.health().err(),
    })
}

async fn enis(State(o): State<Ops6>) -> Json<Value> {
    Json(enis_json(&o.node))
}

async fn pods(State(o): State<Ops6>) -> Json<Value> {
    Json(pods_json(&o.node.view()))
}

async fn pool(State(o): State<Ops6>) -> Json<Value> {
    Json(pool_json(&o.node))
}

async fn ipamd_env(State(o): State<Ops6>) -> Json<BTreeMap<String, String>> {
    Json(
        o.env
            .iter()
            .filter(|(k, _)| !NETWORKUTILS_KNOBS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

async fn networkutils_env(State(o): State<Ops6>) -> Json<Value> {
    Json(networkutils_json(&o.node.cfg))
}

async fn ec2_budget(State(o): State<Ops6>) -> Json<Value> {
    Json(budget_json(&o.budget.stats(), &o.budget.buckets()))
}

async fn metrics(State(o): State<Ops6>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render_metrics(&o.node, &o.budget.stats()),
    )
}

/// Prometheus text, upstream's names: one ENI, its /80s, the addresses they hold.
pub fn render_metrics(node: &Node6, ec2: &CallStats) -> String {
    let v = node.view();
    let m = &node.metrics;
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let mut o = Out(String::with_capacity(4 << 10));
    o.head(
        "awscni_build_info",
        "gauge",
        "A metric with a constant '1' value labeled by version",
    );
    let _ = writeln!(
        o.0,
        "awscni_build_info{{version=\"{}\",implementation=\"rust\",family=\"ipv6\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    o.one(
        "awscni_eni_allocated",
        "gauge",
        "The number of ENIs allocated",
        (!v.eni.is_empty()) as u8,
    );
    o.one(
        "awscni_total_ip_addresses",
        "gauge",
        "The total number of IP addresses",
        v.capacity,
    );
    o.one(
        "awscni_assigned_ip_addresses",
        "gauge",
        "The number of IP addresses assigned to pods",
        v.assignments.len(),
    );
    o.one(
        "awscni_total_ipv6_prefixes",
        "gauge",
        "The total number of IPv6 prefixes",
        v.prefixes.len(),
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
    o.one(
        "awscni_ipv6_prefix_missing",
        "gauge",
        "1 while the primary ENI has no IPv6 prefix (EC2 has not given one): AddNetwork cannot be served",
        v.prefixes.is_empty() as u8,
    );
    o.0
}
