//! What ipamd reads from the Kubernetes API, through one watch on its own node and, with
//! custom networking, one on ENIConfigs:
//! - whether the node is cordoned, for AWS_MANAGE_ENIS_NON_SCHEDULABLE=false (upstream GETs
//!   the node on every pool pass; the watch does the same with no polling);
//! - kubelet's pod capacity (`status.capacity.pods`): the pool holds no more addresses;
//! - with AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true, the node's ENIConfig: named by the label
//!   `vpc.amazonaws.com/externalEniConfig`, else the annotation ENI_CONFIG_ANNOTATION_DEF,
//!   else the label ENI_CONFIG_LABEL_DEF, else `default` (upstream's order; an empty value
//!   counts as none here), and its `spec.subnet` / `spec.securityGroups`.
//!
//! The ClusterRole grants `list` and `watch` on nodes and on eniconfigs, no more. A knob
//! that writes has its own file: ANNOTATE_POD_IP `deploy/rbac-annotate-pod-ip.yaml` (patch
//! on pods), custom networking `deploy/rbac-custom-networking.yaml` (the node's event and
//! CNINode).
//!
//! The API is used only when one is configured (in a pod: `KUBERNETES_SERVICE_HOST`; or
//! `KUBECONFIG`); custom networking refuses to start without one. When it cannot be
//! reached, ipamd goes on serving: after `Timing::schedule_wait` it manages ENIs as on a
//! schedulable node, as upstream does when its GET fails; a cordon once seen holds, and so
//! does an ENIConfig once read, until the API says otherwise.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use ipamd_core::config::Config;
use ipamd_core::node::{EniConfig, EniConfigState, Node, Schedule};
use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

/// The taint the node controller puts on a cordoned node (what upstream matches).
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";
/// The label that, when set, names the node's ENIConfig before anything else (upstream).
pub const EXTERNAL_ENI_CONFIG_LABEL: &str = "vpc.amazonaws.com/externalEniConfig";
/// The ENIConfig of a node that names none.
pub const DEFAULT_ENI_CONFIG: &str = "default";

/// Whether the node is to be watched, and through which API.
pub enum Plan {
    /// Not read, and why.
    Off(&'static str),
    Watch {
        client: Client,
        node: String,
        /// Follow cordons (AWS_MANAGE_ENIS_NON_SCHEDULABLE=false).
        cordon: bool,
    },
}

/// Whether the API is needed and configured: `Ok(Some(why not))`, `Ok(None)` to watch, or
/// an error naming what is wrong. No I/O (the entrypoint checks this before starting ipamd).
pub fn check(
    cfg: &Config,
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<&'static str>, String> {
    let configured = |k: &str| get(k).is_some_and(|v| !v.is_empty());
    let api = configured("KUBERNETES_SERVICE_HOST") || configured("KUBECONFIG");
    if cfg.annotate_pod_ip && !api {
        return Err("ANNOTATE_POD_IP=\"true\" is invalid without the Kubernetes API: the annotation is written through it (in a pod KUBERNETES_SERVICE_HOST is set; elsewhere set KUBECONFIG)".into());
    }
    if cfg.custom_network_cfg && !api {
        return Err("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=\"true\" is invalid without the Kubernetes API: the node's ENIConfig is read from it (in a pod KUBERNETES_SERVICE_HOST is set; elsewhere set KUBECONFIG)".into());
    }
    if !api {
        return Ok(Some(
            "no Kubernetes API configured (neither KUBERNETES_SERVICE_HOST nor KUBECONFIG)",
        ));
    }
    if cfg.node_name.is_empty() {
        if cfg.annotate_pod_ip {
            return Err("MY_NODE_NAME=\"\" is invalid: the name of this node (the DaemonSet sets it from spec.nodeName), needed with ANNOTATE_POD_IP=true".into());
        }
        if cfg.custom_network_cfg {
            return Err("MY_NODE_NAME=\"\" is invalid: the name of this node (the DaemonSet sets it from spec.nodeName), needed to read its ENIConfig (AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true)".into());
        }
        if cfg.manage_enis_non_schedulable {
            return Ok(Some("AWS_MANAGE_ENIS_NON_SCHEDULABLE=true"));
        }
        return Err("MY_NODE_NAME=\"\" is invalid: the name of this node (the DaemonSet sets it from spec.nodeName), needed to read whether it is cordoned; or set AWS_MANAGE_ENIS_NON_SCHEDULABLE=true".into());
    }
    Ok(None)
}

/// Decides, before anything starts, whether the Kubernetes API is needed and can be used.
/// An error names what is wrong (start-up stops on it).
pub async fn plan(cfg: &Config, get: impl Fn(&str) -> Option<String>) -> Result<Plan, String> {
    if let Some(why) = check(cfg, get)? {
        return Ok(Plan::Off(why));
    }
    let config = kube::Config::infer()
        .await
        .map_err(|e| format!("Kubernetes API configuration: {e}"))?;
    let client = Client::try_from(config).map_err(|e| format!("Kubernetes API client: {e}"))?;
    Ok(Plan::Watch {
        client,
        node: cfg.node_name.clone(),
        cordon: !cfg.manage_enis_non_schedulable,
    })
}

/// Cordoned as upstream reads it (the taint), or as `kubectl cordon` writes it
/// (`spec.unschedulable`, before the node controller adds the taint).
pub fn is_cordoned(n: &KubeNode) -> bool {
    let Some(spec) = &n.spec else {
        return false;
    };
    spec.unschedulable == Some(true)
        || spec
            .taints
            .iter()
            .flatten()
            .any(|t| t.key == UNSCHEDULABLE_TAINT && t.effect == "NoSchedule")
}

fn schedule_of(n: &KubeNode) -> Schedule {
    if is_cordoned(n) {
        Schedule::Unschedulable
    } else {
        Schedule::Schedulable
    }
}

/// kubelet's `status.capacity.pods`.
pub fn capacity_pods(n: &KubeNode) -> Option<u32> {
    let q = n.status.as_ref()?.capacity.as_ref()?.get("pods")?;
    q.0.trim().parse().ok().filter(|n| *n > 0)
}

/// The name of the node's ENIConfig, in upstream's order (empty values skipped).
pub fn eni_config_name(n: &KubeNode, annotation: &str, label: &str) -> String {
    let labels = n.metadata.labels.as_ref();
    let annotations = n.metadata.annotations.as_ref();
    let nonempty = |v: Option<&String>| v.filter(|v| !v.trim().is_empty()).cloned();
    nonempty(labels.and_then(|l| l.get(EXTERNAL_ENI_CONFIG_LABEL)))
        .or_else(|| nonempty(annotations.and_then(|a| a.get(annotation))))
        .or_else(|| nonempty(labels.and_then(|l| l.get(label))))
        .unwrap_or_else(|| DEFAULT_ENI_CONFIG.to_string())
}

/// An ENIConfig object as the API holds it; an error says what is wrong with its spec.
pub fn parse_eni_config(o: &DynamicObject) -> Result<EniConfig, String> {
    let name = o.metadata.name.clone().unwrap_or_default();
    let spec = &o.data["spec"];
    let subnet = spec["subnet"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string();
    if subnet.is_empty() {
        return Err("its spec.subnet is empty".into());
    }
    if !subnet.starts_with("subnet-") {
        return Err(format!(
            "its spec.subnet {subnet:?} is not a subnet id (subnet-...)"
        ));
    }
    let security_groups = match &spec["securityGroups"] {
        serde_json::Value::Null => vec![],
        serde_json::Value::Array(a) => {
            let mut v = Vec::new();
            for g in a {
                match g.as_str().map(str::trim) {
                    Some(g) if g.starts_with("sg-") => v.push(g.to_string()),
                    _ => {
                        return Err(format!(
                            "its spec.securityGroups holds {g}, not a security group id (sg-...)"
                        ));
                    }
                }
            }
            v
        }
        other => return Err(format!("its spec.securityGroups is {other}, not a list")),
    };
    Ok(EniConfig {
        name,
        subnet,
        security_groups,
    })
}

/// The ENIConfig resource (`crd.k8s.amazonaws.com/v1alpha1`, cluster-scoped).
pub fn eni_config_resource() -> ApiResource {
    ApiResource {
        group: "crd.k8s.amazonaws.com".into(),
        version: "v1alpha1".into(),
        api_version: "crd.k8s.amazonaws.com/v1alpha1".into(),
        kind: "ENIConfig".into(),
        plural: "eniconfigs".into(),
    }
}

/// The annotation ANNOTATE_POD_IP writes (upstream's name).
pub const POD_IPS_ANNOTATION: &str = "vpc.amazonaws.com/pod-ips";

/// ANNOTATE_POD_IP: writes each pod's address on it as it is assigned and removes it when
/// released, one merge patch each, in the order they happened, off the pods' path (a slow or
/// refusing API delays only the annotation). A pod the API does not know is skipped.
/// Needs `patch` on pods: `deploy/rbac-annotate-pod-ip.yaml`.
pub async fn annotate_pods(
    client: Client,
    mut notes: tokio::sync::mpsc::UnboundedReceiver<ipamd_core::node::PodIpNote>,
) {
    info!("ANNOTATE_POD_IP: writing {POD_IPS_ANNOTATION} on pods");
    let mut failing = false;
    while let Some(n) = notes.recv().await {
        let api: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(client.clone(), &n.pod.namespace);
        let value = n.ip.map(|ip| ip.to_string());
        let patch = serde_json::json!({"metadata": {"annotations": {POD_IPS_ANNOTATION: value}}});
        let mut wait = std::time::Duration::from_millis(200);
        for attempt in 1..=3 {
            match api
                .patch(
                    &n.pod.name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    if failing {
                        info!("annotating pods works again");
                        failing = false;
                    }
                    break;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => break,
                Err(e) if attempt == 3 => {
                    if !failing {
                        warn!(
                            "annotating pod {}/{} with {POD_IPS_ANNOTATION}={value:?}: {e}",
                            n.pod.namespace, n.pod.name
                        );
                        failing = true;
                    }
                }
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    }
}

/// The CNINode resource (`vpcresources.k8s.aws/v1alpha1`, cluster-scoped, one per node,
/// named as the node): the features the node uses, read by the VPC resource controller.
pub fn cni_node_resource() -> ApiResource {
    ApiResource {
        group: "vpcresources.k8s.aws".into(),
        version: "v1alpha1".into(),
        api_version: "vpcresources.k8s.aws/v1alpha1".into(),
        kind: "CNINode".into(),
        plural: "cninodes".into(),
    }
}

/// The CNINode feature custom networking writes, valued with the ENIConfig's name
/// (upstream's `CustomNetworking`).
pub const FEATURE_CUSTOM_NETWORKING: &str = "CustomNetworking";
/// The component node events are reported as.
pub const EVENT_COMPONENT: &str = "aws-node";

/// `spec.features` with `name` set to `value` and no other entry of that name; `None` when
/// the list already holds exactly that.
pub fn features_with(
    current: &serde_json::Value,
    name: &str,
    value: &str,
) -> Option<Vec<serde_json::Value>> {
    let list = current.as_array().cloned().unwrap_or_default();
    let has = |f: &serde_json::Value| f["name"] == name;
    if list.iter().filter(|f| has(f)).count() == 1
        && list.iter().any(|f| has(f) && f["value"] == value)
    {
        return None;
    }
    let mut out: Vec<_> = list.into_iter().filter(|f| !has(f)).collect();
    out.push(serde_json::json!({"name": name, "value": value}));
    Some(out)
}

/// Why a write to the API failed, with what to do: the grant to apply on a 403, and
/// `on_404` (what may be missing) on a 404.
fn api_failure(what: &str, e: &kube::Error, grant: &str, on_404: Option<&str>) -> String {
    match (e, on_404) {
        (kube::Error::Api(s), _) if s.code == 403 => {
            format!("{what}: forbidden ({}); apply {grant}", s.message)
        }
        (kube::Error::Api(s), Some(hint)) if s.code == 404 => {
            format!("{what}: not found ({}); {hint}", s.message)
        }
        _ => format!("{what}: {e}"),
    }
}

/// Custom networking's writes to the API, off every pod's path: the node's CNINode keeps
/// the feature `CustomNetworking` valued with the ENIConfig the node names (created, owned
/// by the Node, when the VPC resource controller has not made it; kept as the name
/// changes, where upstream writes it once at start-up and stops ipamd when the CNINode is
/// not there), and a Warning event on the node says what is wrong with its ENIConfig, once
/// per distinct problem. A failed write is retried with backoff and never stops ipamd.
/// Needs `deploy/rbac-custom-networking.yaml` (events create; cninodes get, create, patch).
pub async fn report_custom_networking(node: Arc<Node>, client: Client, name: String) {
    const GRANT: &str = "deploy/rbac-custom-networking.yaml";
    let mut feature_written: Option<String> = None;
    let mut event_posted: Option<String> = None;
    let mut said: Option<String> = None;
    let mut backoff = std::time::Duration::from_secs(1);
    loop {
        let state = node.eni_config();
        let named = match &state {
            EniConfigState::Found(c) => Some(c.name.clone()),
            EniConfigState::Missing { name, .. } => Some(name.clone()),
            EniConfigState::Pending => None,
        };
        let problem = match &state {
            EniConfigState::Pending => None,
            _ => node.eni_config_problem(),
        };
        let mut failed = None;
        // As upstream: the feature is written for a name the node gives, not for the
        // fallback `default`.
        if let Some(n) = named.filter(|n| n != DEFAULT_ENI_CONFIG)
            && feature_written.as_deref() != Some(n.as_str())
        {
            match keep_cni_node_feature(&client, &name, FEATURE_CUSTOM_NETWORKING, &n).await {
                Ok(()) => {
                    info!("CNINode {name}: feature {FEATURE_CUSTOM_NETWORKING}={n}");
                    feature_written = Some(n);
                }
                Err(e) => {
                    failed = Some(api_failure(
                        &format!("CNINode {name}"),
                        &e,
                        GRANT,
                        Some("is the CRD deploy/cninode-crd.yaml applied?"),
                    ))
                }
            }
        }
        if let Some(p) = &problem {
            if event_posted.as_ref() != Some(p) {
                match post_node_event(&client, &name, eni_config_reason(&state), p).await {
                    Ok(()) => event_posted = problem.clone(),
                    Err(e) => {
                        failed = Some(api_failure(
                            &format!("event on node {name}"),
                            &e,
                            GRANT,
                            None,
                        ))
                    }
                }
            }
        } else {
            // A problem that comes back after it was solved is reported again.
            event_posted = None;
        }
        match failed {
            Some(why) => {
                if said.as_ref() != Some(&why) {
                    warn!("{why} (retrying)");
                    said = Some(why);
                }
                tokio::select! {
                    _ = node.eni_config_changes() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(60));
            }
            None => {
                if said.take().is_some() {
                    info!("writing the CNINode and node events works again");
                }
                backoff = std::time::Duration::from_secs(1);
                node.eni_config_changes().await;
            }
        }
    }
}

/// The event's reason: the ENIConfig is not there, or it is there and cannot be used.
fn eni_config_reason(state: &EniConfigState) -> &'static str {
    match state {
        EniConfigState::Missing { why, .. } if why.starts_with("no ENIConfig") => {
            "MissingENIConfig"
        }
        _ => "InvalidENIConfig",
    }
}

/// Sets the feature on the node's CNINode, creating the CNINode (owned by the Node, so it
/// goes with it) when there is none. Optimistic: a write that races another is redone.
async fn keep_cni_node_feature(
    client: &Client,
    node: &str,
    feature: &str,
    value: &str,
) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &cni_node_resource());
    for _ in 0..5 {
        match api.get_opt(node).await? {
            Some(cur) => {
                let Some(features) = features_with(&cur.data["spec"]["features"], feature, value)
                else {
                    return Ok(());
                };
                let patch = serde_json::json!({
                    "metadata": {"resourceVersion": cur.metadata.resource_version},
                    "spec": {"features": features},
                });
                match api
                    .patch(
                        node,
                        &kube::api::PatchParams::default(),
                        &kube::api::Patch::Merge(&patch),
                    )
                    .await
                {
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    r => return r.map(|_| ()),
                }
            }
            None => {
                let nodes: Api<KubeNode> = Api::all(client.clone());
                let lp = kube::api::ListParams::default().fields(&format!("metadata.name={node}"));
                let Some(n) = nodes.list(&lp).await?.items.into_iter().next() else {
                    return Err(kube::Error::Api(Box::new(
                        kube::core::Status::failure(
                            &format!("node {node} is not in the API"),
                            "NotFound",
                        )
                        .with_code(404),
                    )));
                };
                let mut labels = serde_json::Map::new();
                if let Some(os) = n.labels().get("kubernetes.io/os") {
                    labels.insert("kubernetes.io/os".into(), os.clone().into());
                }
                let obj = serde_json::json!({
                    "apiVersion": cni_node_resource().api_version,
                    "kind": "CNINode",
                    "metadata": {
                        "name": node,
                        "labels": labels,
                        "ownerReferences": [{
                            "apiVersion": "v1",
                            "kind": "Node",
                            "name": node,
                            "uid": n.metadata.uid,
                        }],
                    },
                    "spec": {"features": [{"name": feature, "value": value}]},
                });
                let obj: DynamicObject =
                    serde_json::from_value(obj).map_err(kube::Error::SerdeError)?;
                match api.create(&kube::api::PostParams::default(), &obj).await {
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    r => return r.map(|_| ()),
                }
            }
        }
    }
    Err(kube::Error::Api(Box::new(
        kube::core::Status::failure("kept conflicting with other writers", "Conflict")
            .with_code(409),
    )))
}

/// A Warning event on the node, where `kubectl describe node` shows it (namespace
/// `default`, the node referenced by name as kubelet does).
async fn post_node_event(
    client: &Client,
    node: &str,
    reason: &str,
    message: &str,
) -> Result<(), kube::Error> {
    let now = ipamd_core::clock::rfc3339(std::time::SystemTime::now());
    let ev = serde_json::json!({
        "metadata": {"generateName": format!("{node}."), "namespace": "default"},
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node},
        "reason": reason,
        "message": message,
        "type": "Warning",
        "source": {"component": EVENT_COMPONENT, "host": node},
        "reportingComponent": EVENT_COMPONENT,
        "reportingInstance": node,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    });
    let ev: k8s_openapi::api::core::v1::Event =
        serde_json::from_value(ev).map_err(kube::Error::SerdeError)?;
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    api.create(&kube::api::PostParams::default(), &ev).await?;
    info!("event on node {node}: {reason}: {message}");
    Ok(())
}

/// What the ENIConfig watch has seen: every object by name (or why it is unusable).
#[derive(Default)]
struct EniConfigs {
    listed: bool,
    /// Why listing failed, while no list has succeeded.
    error: Option<String>,
    all: BTreeMap<String, Result<EniConfig, String>>,
    init: BTreeMap<String, Result<EniConfig, String>>,
}

impl EniConfigs {
    fn state_for(&self, name: &str) -> EniConfigState {
        if !self.listed {
            return match &self.error {
                Some(e) => EniConfigState::Missing {
                    name: name.into(),
                    why: format!("ENIConfigs cannot be listed: {e}"),
                },
                None => EniConfigState::Pending,
            };
        }
        match self.all.get(name) {
            Some(Ok(c)) => EniConfigState::Found(c.clone()),
            Some(Err(why)) => EniConfigState::Missing {
                name: name.into(),
                why: why.clone(),
            },
            None => EniConfigState::Missing {
                name: name.into(),
                why: "no ENIConfig of that name".into(),
            },
        }
    }

    fn known(&self) -> Vec<EniConfig> {
        self.all
            .values()
            .filter_map(|c| c.as_ref().ok().cloned())
            .collect()
    }
}

/// Follows the node (and with custom networking the ENIConfigs) until the task is
/// dropped; reconnects with backoff.
pub async fn watch(node: Arc<Node>, client: Client, name: String, cordon: bool) {
    // The caller has set Schedule::Pending before the pool started, if cordons are followed.
    info!(
        "watching node {name}{}{}",
        if cordon { " for cordons" } else { "" },
        if node.cfg.custom_network_cfg {
            " and ENIConfigs (custom networking)"
        } else {
            ""
        }
    );
    let custom = node.cfg.custom_network_cfg;
    let nodes: Api<KubeNode> = Api::all(client.clone());
    let wcfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut node_events = watcher::watcher(nodes, wcfg).default_backoff().boxed();
    let mut config_events = if custom {
        let api: Api<DynamicObject> = Api::all_with(client, &eni_config_resource());
        watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed()
    } else {
        futures::stream::pending().boxed()
    };
    let mut listed = false;
    let mut failing = false;
    let mut my_config: Option<String> = None;
    let mut configs = EniConfigs::default();
    loop {
        tokio::select! {
            ev = node_events.next() => {
                let Some(ev) = ev else { break };
                match ev {
                    Ok(ev) => {
                        if failing {
                            info!("Kubernetes API reachable again");
                            failing = false;
                        }
                        match ev {
                            Event::Init => listed = false,
                            Event::InitApply(n) | Event::Apply(n) => {
                                listed = true;
                                // The cap before the answer that lets the pool go on.
                                node.set_kubelet_max_pods(capacity_pods(&n));
                                if cordon {
                                    node.set_schedule(schedule_of(&n));
                                }
                                if custom {
                                    let want = eni_config_name(
                                        &n,
                                        &node.cfg.eni_config_annotation_def,
                                        &node.cfg.eni_config_label_def,
                                    );
                                    if my_config.as_deref() != Some(want.as_str()) {
                                        info!("node {name} names ENIConfig {want:?}");
                                        my_config = Some(want);
                                    }
                                }
                            }
                            Event::InitDone if !listed => {
                                if cordon {
                                    node.set_schedule(Schedule::NotFound);
                                }
                            }
                            Event::InitDone => {}
                            Event::Delete(_) => {
                                if cordon {
                                    node.set_schedule(Schedule::NotFound);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        // The last answer stands (a cordon does not lift because the API is
                        // away); a node never heard of is managed as schedulable after the wait.
                        if !failing {
                            warn!("watching node {name}: {e}");
                            failing = true;
                        }
                    }
                }
            }
            ev = config_events.next() => {
                let Some(ev) = ev else { break };
                match ev {
                    Ok(Event::Init) => configs.init.clear(),
                    Ok(Event::InitApply(o)) => {
                        let n = o.metadata.name.clone().unwrap_or_default();
                        configs.init.insert(n, parse_eni_config(&o));
                    }
                    Ok(Event::InitDone) => {
                        configs.all = std::mem::take(&mut configs.init);
                        configs.listed = true;
                        configs.error = None;
                    }
                    Ok(Event::Apply(o)) => {
                        let n = o.metadata.name.clone().unwrap_or_default();
                        configs.all.insert(n, parse_eni_config(&o));
                    }
                    Ok(Event::Delete(o)) => {
                        let n = o.metadata.name.clone().unwrap_or_default();
                        configs.all.remove(&n);
                    }
                    Err(e) => {
                        if configs.error.is_none() {
                            warn!("watching ENIConfigs: {e}");
                        }
                        configs.error = Some(e.to_string());
                    }
                }
                node.set_eni_configs_known(configs.known());
            }
        }
        if let Some(want) = &my_config {
            node.set_eni_config(configs.state_for(want));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};

    fn node(unschedulable: Option<bool>, taints: &[(&str, &str)]) -> KubeNode {
        KubeNode {
            spec: Some(NodeSpec {
                unschedulable,
                taints: Some(
                    taints
                        .iter()
                        .map(|(k, e)| Taint {
                            key: k.to_string(),
                            effect: e.to_string(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn cordon_is_the_spec_field_or_the_no_schedule_taint() {
        assert!(!is_cordoned(&KubeNode::default()));
        assert!(!is_cordoned(&node(None, &[])));
        assert!(!is_cordoned(&node(Some(false), &[])));
        assert!(is_cordoned(&node(Some(true), &[])));
        assert!(is_cordoned(&node(
            None,
            &[(UNSCHEDULABLE_TAINT, "NoSchedule")]
        )));
        // Another effect, or another NoSchedule taint, is not a cordon.
        assert!(!is_cordoned(&node(
            None,
            &[(UNSCHEDULABLE_TAINT, "NoExecute")]
        )));
        assert!(!is_cordoned(&node(None, &[("dedicated", "NoSchedule")])));
    }

    fn labelled(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> KubeNode {
        let map = |kv: &[(&str, &str)]| {
            Some(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let mut n = KubeNode::default();
        n.metadata.labels = map(labels);
        n.metadata.annotations = map(annotations);
        n
    }

    #[test]
    fn the_eni_config_is_named_in_upstreams_order() {
        let (a, l) = ("k8s.amazonaws.com/eniConfig", "topology.kubernetes.io/zone");
        let name = |n: &KubeNode| eni_config_name(n, a, l);
        assert_eq!(name(&labelled(&[], &[])), "default");
        assert_eq!(name(&labelled(&[(l, "us-west-2a")], &[])), "us-west-2a");
        assert_eq!(
            name(&labelled(&[(l, "us-west-2a")], &[(a, "pods-a")])),
            "pods-a",
            "the annotation before the label"
        );
        assert_eq!(
            name(&labelled(
                &[(l, "us-west-2a"), (EXTERNAL_ENI_CONFIG_LABEL, "ext")],
                &[(a, "pods-a")]
            )),
            "ext"
        );
        assert_eq!(
            name(&labelled(&[(l, "us-west-2a")], &[(a, " ")])),
            "us-west-2a",
            "an empty annotation names nothing"
        );
    }

    #[test]
    fn an_eni_config_spec_is_checked() {
        let obj = |spec: serde_json::Value| {
            let mut o = DynamicObject::new("c", &eni_config_resource());
            o.data = serde_json::json!({ "spec": spec });
            parse_eni_config(&o)
        };
        let ok =
            obj(serde_json::json!({"subnet": "subnet-1", "securityGroups": ["sg-1"]})).unwrap();
        assert_eq!(
            (ok.subnet.as_str(), ok.security_groups),
            ("subnet-1", vec!["sg-1".to_string()])
        );
        assert!(
            obj(serde_json::json!({"subnet": "subnet-1"}))
                .unwrap()
                .security_groups
                .is_empty()
        );
        assert!(
            obj(serde_json::json!({}))
                .unwrap_err()
                .contains("spec.subnet is empty")
        );
        assert!(obj(serde_json::json!({"subnet": "10.0.0.0/24"})).is_err());
        assert!(obj(serde_json::json!({"subnet": "subnet-1", "securityGroups": "sg-1"})).is_err());
        assert!(obj(serde_json::json!({"subnet": "subnet-1", "securityGroups": [7]})).is_err());
    }

    #[test]
    fn the_custom_networking_feature_replaces_only_its_own_entry() {
        use serde_json::json;
        let f = |v: serde_json::Value| features_with(&v, FEATURE_CUSTOM_NETWORKING, "az-a");
        assert_eq!(
            f(serde_json::Value::Null),
            Some(vec![json!({"name": "CustomNetworking", "value": "az-a"})])
        );
        assert_eq!(
            f(json!([{"name": "CustomNetworking", "value": "az-a"}])),
            None
        );
        // Another ENIConfig before, and the controller's feature: the first replaced, the
        // other kept.
        assert_eq!(
            f(json!([
                {"name": "SecurityGroupsForPods"},
                {"name": "CustomNetworking", "value": "old"},
            ])),
            Some(vec![
                json!({"name": "SecurityGroupsForPods"}),
                json!({"name": "CustomNetworking", "value": "az-a"}),
            ])
        );
        // Written twice by someone: one entry left.
        assert_eq!(
            f(json!([
                {"name": "CustomNetworking", "value": "az-a"},
                {"name": "CustomNetworking", "value": "old"},
            ])),
            Some(vec![json!({"name": "CustomNetworking", "value": "az-a"})])
        );
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn cfg(vars: &[(&str, &str)]) -> Config {
        ipamd_core::config::from_env(env(vars)).unwrap()
    }

    #[test]
    fn the_api_is_used_only_when_configured_and_needed() {
        let none: &[(&str, &str)] = &[];
        assert!(matches!(check(&cfg(none), env(none)), Ok(Some(_))));
        let manage = cfg(&[("AWS_MANAGE_ENIS_NON_SCHEDULABLE", "true")]);
        let in_pod = [("KUBERNETES_SERVICE_HOST", "10.0.0.1")];
        assert_eq!(
            check(&manage, env(&in_pod)),
            Ok(Some("AWS_MANAGE_ENIS_NON_SCHEDULABLE=true"))
        );
        // Named, with the knob: watched for kubelet's capacity only.
        let manage_named = cfg(&[
            ("AWS_MANAGE_ENIS_NON_SCHEDULABLE", "true"),
            ("MY_NODE_NAME", "n1"),
        ]);
        assert_eq!(check(&manage_named, env(&in_pod)), Ok(None));
        // ANNOTATE_POD_IP too.
        let annotate = cfg(&[("ANNOTATE_POD_IP", "true")]);
        let err = check(&annotate, env(none)).err().unwrap();
        assert!(err.starts_with("ANNOTATE_POD_IP="), "{err}");
        let err = check(&annotate, env(&in_pod)).err().unwrap();
        assert!(err.starts_with("MY_NODE_NAME="), "{err}");
        // Custom networking needs the API and the node's name.
        let custom = cfg(&[("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true")]);
        let err = check(&custom, env(none)).err().unwrap();
        assert!(
            err.starts_with("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG="),
            "{err}"
        );
        let err = check(&custom, env(&in_pod)).err().unwrap();
        assert!(err.starts_with("MY_NODE_NAME="), "{err}");
        // In a pod without MY_NODE_NAME: start-up stops, naming it.
        let err = check(&cfg(none), env(&in_pod)).err().unwrap();
        assert!(err.starts_with("MY_NODE_NAME="), "{err}");
        // Named, in a pod or with a kubeconfig: watched.
        let named = cfg(&[("MY_NODE_NAME", "n1")]);
        assert_eq!(check(&named, env(&in_pod)), Ok(None));
        assert_eq!(check(&named, env(&[("KUBECONFIG", "/k")])), Ok(None));
    }
}
