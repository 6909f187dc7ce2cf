//! A scenario: the fleet, its pods over time, the account's EC2, the knobs. One TOML file
//! each (`sim/scenarios/`); every time in it is in seconds of virtual time.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::model::Ec2Params;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "one")]
    pub seed: u64,
    pub nodes: u32,
    #[serde(default = "m5_large")]
    pub instance_type: String,
    pub duration_s: f64,
    /// Multiplies every time of the scenario and every pacing of the engines (the
    /// emulator check runs a scenario at 0.1 in real time; the fleet runs at 1).
    #[serde(default = "one_f")]
    pub time_scale: f64,
    /// How long kubelet waits before it tries a pod's sandbox again after the CNI failed
    /// it: its pod workers' back-off, 10 s, jittered up to +50 %.
    #[serde(default = "ten")]
    pub kubelet_retry_s: f64,
    #[serde(default)]
    pub join: Join,
    #[serde(default, rename = "wave")]
    pub waves: Vec<Wave>,
    #[serde(default, rename = "rollout")]
    pub rollouts: Vec<Rollout>,
    /// ipamd's environment (upstream's knobs and ours).
    #[serde(default)]
    pub knobs: BTreeMap<String, String>,
    #[serde(default)]
    pub ec2: Ec2Params,
    #[serde(rename = "subnet")]
    pub subnets: Vec<SubnetSpec>,
    /// The VPC's CIDRs (the SNAT exclusions; not metered).
    #[serde(default = "vpc")]
    pub vpc_cidrs: Vec<String>,
}

fn one() -> u64 {
    1
}
fn one_f() -> f64 {
    1.0
}
fn ten() -> f64 {
    10.0
}
fn m5_large() -> String {
    "m5.large".into()
}
fn vpc() -> Vec<String> {
    vec!["10.0.0.0/8".into()]
}

/// Nodes launch uniformly over `over_s` from `at_s`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Join {
    pub at_s: f64,
    pub over_s: f64,
}

/// Pods of every node, counted from the node's launch: `pods` created spread over
/// `spread_s` from `at_s`, each deleted `hold_s` after it was created (0: kept to the
/// end), the whole wave `repeat` times, `gap_s` between the end of one and the next.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    #[serde(default)]
    pub at_s: f64,
    pub pods: u32,
    #[serde(default)]
    pub spread_s: f64,
    #[serde(default)]
    pub hold_s: f64,
    #[serde(default = "one_u")]
    pub repeat: u32,
    #[serde(default)]
    pub gap_s: f64,
}

fn one_u() -> u32 {
    1
}

/// Every pod alive on a node at `at_s` (from the scenario's start) is replaced, one at a
/// time spread over `spread_s`: the new pod first, the old one deleted once the new one
/// has its address (a Deployment's maxSurge 1, maxUnavailable 0).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub at_s: f64,
    #[serde(default)]
    pub spread_s: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetSpec {
    pub cidr: String,
    #[serde(default = "az")]
    pub az: String,
    /// kubernetes.io/role/cni (subnet discovery may put ENIs there).
    #[serde(default)]
    pub tagged: bool,
    /// Nodes' primary ENIs are placed here (round robin over such subnets).
    #[serde(default = "yes")]
    pub nodes: bool,
}

fn az() -> String {
    "us-west-2a".into()
}
fn yes() -> bool {
    true
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        if s.nodes == 0 {
            return Err("nodes: at least 1".into());
        }
        if s.subnets.iter().all(|n| !n.nodes) {
            return Err("subnet: at least one with nodes = true".into());
        }
        if s.time_scale.is_nan() || s.time_scale <= 0.0 {
            return Err("time_scale: above 0".into());
        }
        for n in &s.subnets {
            crate::parse_net(&n.cidr).ok_or_else(|| format!("subnet {}: not a CIDR", n.cidr))?;
        }
        Ok(s)
    }

    pub fn load(path: &std::path::Path) -> Result<Scenario, String> {
        let t = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Scenario::parse(&t).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The environment ipamd runs with: the knobs, and every pacing knob scaled.
    pub fn env(&self) -> BTreeMap<String, String> {
        let mut env = self.knobs.clone();
        if self.time_scale != 1.0 {
            let t = ipamd_core::node::Timing::default();
            let ms = |d: std::time::Duration| ((d.as_millis() as f64) * self.time_scale).round();
            for (k, d, floor) in [
                ("IPAMD_POOL_INTERVAL_MS", t.pool_interval, 100.0),
                ("IPAMD_SHRINK_INTERVAL_MS", t.shrink_interval, 100.0),
                ("IPAMD_ENI_MIN_AGE_MS", t.eni_min_age, 0.0),
                ("IPAMD_WARM_GRACE_MS", t.warm_grace, 0.0),
                ("IPAMD_RECONCILE_INTERVAL_MS", t.reconcile_interval, 1000.0),
                (
                    "IPAMD_EC2_RECONCILE_INTERVAL_MS",
                    t.ec2_reconcile_interval,
                    1000.0,
                ),
                (
                    "IPAMD_SUBNET_FULL_BACKOFF_MS",
                    t.subnet_full_backoff,
                    1000.0,
                ),
                (
                    "IPAMD_LEAKED_ENI_SWEEP_MS",
                    t.leaked_sweep_interval,
                    10_000.0,
                ),
                ("IPAMD_LEAKED_ENI_MIN_AGE_MS", t.leaked_min_age, 0.0),
                ("IPAMD_SHRINK_GRACE_MS", t.shrink_grace, 0.0),
            ] {
                env.entry(k.to_string())
                    .or_insert_with(|| format!("{}", ms(d).max(floor)));
            }
            env.entry("IP_COOLDOWN_PERIOD".into())
                .or_insert_with(|| format!("{}", (30.0 * self.time_scale).round().max(0.0)));
        }
        env
    }

    pub fn secs(&self, s: f64) -> std::time::Duration {
        std::time::Duration::from_secs_f64((s * self.time_scale).max(0.0))
    }
}
