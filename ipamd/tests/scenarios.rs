//! The EC2 calls of issue 19's one-node scenarios (`sim/scenarios/one-node-*.toml`),
//! spent by the real ipamd process against the emulator process, at a tenth of real time
//! (every pacing of ipamd and every time of the scenario scaled alike):
//!
//! - each scenario spends at most the calls we claim (fewer than upstream v1.23.2 spent
//!   on the same row, about half on the churn rows), and serves every pod at once;
//! - the fleet simulator, running the same engine against its EC2 model on a paused
//!   clock, makes the same calls in the same order (the model checked against the
//!   emulator).

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use common::*;
use ec2_emulator_sdk_check::Emulator;
use vpc_cni_sim::scenario::Scenario;
use vpc_cni_sim::{Impl, PodApi};

const INTROSPECTION: &str = "127.0.0.1:61679";

struct Grpc(Client);

#[async_trait]
impl PodApi for Grpc {
    async fn add(&self, key: &str) -> bool {
        self.0.add(key).await.is_ok_and(|r| r.success)
    }
    async fn del(&self, key: &str) {
        let _ = self.0.del(key).await;
    }
}

fn scenario(name: &str) -> Scenario {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sim/scenarios")
        .join(format!("{name}.toml"));
    let mut sc = Scenario::load(&path).unwrap();
    sc.time_scale = 0.1;
    // The emulator: a detach completes at once, calls take milliseconds.
    sc.ec2.detach_s = 0.0;
    for l in sc.ec2.latency.values_mut() {
        l.median_ms = 8.0;
        l.p99_ms = 30.0;
    }
    sc
}

/// (action, status) of every call the real ipamd made, in order.
fn ipamd_calls() -> Vec<(String, String)> {
    let b = ipamd::cli::http_get(INTROSPECTION, "/v1/ec2-budget").unwrap();
    b["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c[1].as_str().unwrap().to_string(),
                c[2].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Runs `name` against the emulator and in the simulator: at most `at_most` calls, the
/// same in both (`same_order`: where the engine's calls do not depend on how many pool
/// passes a call's latency spans).
fn check(name: &str, at_most: usize, same_order: bool) {
    let sc = scenario(name);
    let tag = format!("scn-{}", &name[9..].replace('-', ""));
    let sim = vpc_cni_sim::run_paused(&sc, Impl::Ours);
    let sim_calls: Vec<(String, String)> = sim
        .log
        .iter()
        .map(|c| (c.api.to_string(), c.status.to_string()))
        .collect();
    let out = std::sync::Mutex::new(None);
    in_node_ns(&tag, || async {
        let emu = Emulator::start();
        emu.seed(&["--type", &sc.instance_type]);
        let env: Vec<(String, String)> = sc.env().into_iter().collect();
        let knobs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let d = Ipamd::start(&emu, &knobs);
        let c = d.client().await;
        let account = Arc::new(std::sync::Mutex::new(vpc_cni_sim::model::Account::new(
            Default::default(),
            1,
            vec![],
        )));
        let pods = vpc_cni_sim::drive(Arc::new(sc.clone()), Arc::new(Grpc(c)), account).await;
        let real = ipamd_calls();
        if real != sim_calls {
            eprintln!("ipamd log:\n{}", d.log());
        }
        *out.lock().unwrap() = Some((pods, real));
    });
    let (pods, real) = out.into_inner().unwrap().expect("the run ended");
    let names = |v: &[(String, String)]| {
        v.iter()
            .map(|(a, s)| {
                if s == "200" {
                    a.clone()
                } else {
                    format!("{a}:{s}")
                }
            })
            .collect::<Vec<_>>()
    };
    println!(
        "{name}: ipamd against the emulator: {} EC2 calls {:?}",
        real.len(),
        names(&real)
    );
    // An ENI is attached by a task of its own (DescribeSubnets, CreateNetworkInterface,
    // AttachNetworkInterface, ModifyNetworkInterfaceAttribute) beside the pool loop: how
    // the two interleave depends on latencies, the order within each does not.
    let attach_task = |a: &String| {
        [
            "DescribeSubnets",
            "CreateNetworkInterface",
            "AttachNetworkInterface",
            "ModifyNetworkInterfaceAttribute",
        ]
        .iter()
        .any(|x| a.starts_with(x))
    };
    let split =
        |v: Vec<String>| -> (Vec<String>, Vec<String>) { v.into_iter().partition(attach_task) };
    if same_order {
        assert_eq!(
            split(names(&real)),
            split(names(&sim_calls)),
            "{name}: the simulator's model does not lead the engine to the emulator's calls \
         (attach task, pool loop)\nemulator: {:?}\nsimulator: {:?}",
            names(&real),
            names(&sim_calls)
        );
    }
    assert!(
        real.len() <= at_most,
        "{name}: {} EC2 calls, at most {at_most} claimed: {:?}",
        real.len(),
        names(&real)
    );
    let wanted: u32 = sc.waves.iter().map(|w| w.pods * w.repeat).sum();
    assert_eq!(
        pods.served_ms.len() as u32,
        wanted,
        "{name}: every pod served"
    );
    assert_eq!(pods.failed_adds, 0, "{name}: no AddNetwork failed");
}

// Upstream v1.23.2 on the same rows (findings.md): 6, 11, 19, 29, 1 describe per 2 min.

#[test]
fn a_fresh_node_spends_one_call() {
    check("one-node-fresh", 1, true);
}

#[test]
fn a_fresh_node_with_ip_targets_spends_five_calls() {
    check("one-node-fresh-warm", 5, true);
}

#[test]
fn twenty_five_pods_up_and_down_three_times_spend_about_half_of_upstreams_calls() {
    // 8 for the pods, and at 5 min the periodic EC2 check (a fresh node has nothing
    // leaked to sweep: its first sweep is an hour after start) with the primary ENI's
    // tags (CreateTags once in the node's life; upstream's 19 include the same call).
    check("one-node-churn", 10, true);
}

#[test]
fn the_same_churn_with_ip_targets_spends_at_most_half_of_upstreams_calls() {
    // How many assigns fill the ENIs while one is attached depends on the latencies.
    check("one-node-churn-warm", 12, false);
}

#[test]
fn an_idle_node_describes_less_than_once_per_two_minutes() {
    // 10 minutes: upstream describes 5 times. Ours: the fill, 2 describes, and the
    // primary ENI's tags after the first.
    check("one-node-idle", 3, true);
}
