//! What ipamd reads from the Kubernetes API: whether its own node is cordoned, for
//! AWS_MANAGE_ENIS_NON_SCHEDULABLE (upstream GETs the node on every pool pass; one watch on
//! the single node does the same with no polling). Nothing else: the ClusterRole grants
//! `list` and `watch` on nodes and no more.
//!
//! The API is used only when one is configured (in a pod: `KUBERNETES_SERVICE_HOST`; or
//! `KUBECONFIG`) and the knob is false. When it cannot be reached, ipamd goes on serving and
//! after `Timing::schedule_wait` manages ENIs as on a schedulable node, as upstream does when
//! its GET fails; a cordon once seen holds until the API says otherwise.

use std::sync::Arc;

use futures::StreamExt;
use ipamd_core::config::Config;
use ipamd_core::node::{Node, Schedule};
use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tracing::{info, warn};

/// The taint the node controller puts on a cordoned node (what upstream matches).
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// Whether the node's schedulability is to be watched, and through which API.
pub enum Plan {
    /// Not read, and why.
    Off(&'static str),
    Watch {
        client: Client,
        node: String,
    },
}

/// Whether the API is needed and configured: `Ok(Some(why not))`, `Ok(None)` to watch, or
/// an error naming what is wrong. No I/O (the entrypoint checks this before starting ipamd).
pub fn check(
    cfg: &Config,
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<&'static str>, String> {
    if cfg.manage_enis_non_schedulable {
        return Ok(Some("AWS_MANAGE_ENIS_NON_SCHEDULABLE=true"));
    }
    let configured = |k: &str| get(k).is_some_and(|v| !v.is_empty());
    if !configured("KUBERNETES_SERVICE_HOST") && !configured("KUBECONFIG") {
        return Ok(Some(
            "no Kubernetes API configured (neither KUBERNETES_SERVICE_HOST nor KUBECONFIG)",
        ));
    }
    if cfg.node_name.is_empty() {
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

/// Follows the node until the task is dropped; reconnects with backoff.
pub async fn watch(node: Arc<Node>, client: Client, name: String) {
    // The caller has set Schedule::Pending before the pool started.
    info!("watching node {name} for cordons");
    let api: Api<KubeNode> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut listed = false;
    let mut failing = false;
    while let Some(ev) = events.next().await {
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
                        node.set_schedule(schedule_of(&n));
                    }
                    Event::InitDone if !listed => node.set_schedule(Schedule::NotFound),
                    Event::InitDone => {}
                    Event::Delete(_) => node.set_schedule(Schedule::NotFound),
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
        // In a pod without MY_NODE_NAME: start-up stops, naming it.
        let err = check(&cfg(none), env(&in_pod)).err().unwrap();
        assert!(err.starts_with("MY_NODE_NAME="), "{err}");
        // Named, in a pod or with a kubeconfig: watched.
        let named = cfg(&[("MY_NODE_NAME", "n1")]);
        assert_eq!(check(&named, env(&in_pod)), Ok(None));
        assert_eq!(check(&named, env(&[("KUBECONFIG", "/k")])), Ok(None));
    }
}
