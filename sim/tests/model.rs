//! The simulator's EC2 model and its runs: what the fleet figures rest on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipamd_core::cloud::{Ec2, NewEni};
use vpc_cni_sim::model::{Account, BucketParam, Ec2Params, NodeCloud};
use vpc_cni_sim::scenario::Scenario;
use vpc_cni_sim::{Impl, parse_net, run_paused};

fn account(describe: BucketParam, subnet: &str) -> (Arc<Mutex<Account>>, NodeCloud) {
    let mut p = Ec2Params::default();
    p.buckets.insert("describe".into(), describe);
    let mut a = Account::new(p, 7, vec![parse_net("10.0.0.0/16").unwrap()]);
    let s = a.add_subnet(parse_net(subnet).unwrap(), "us-east-1a", true);
    let node = a.launch("m5.large", s).unwrap();
    let shared = Arc::new(Mutex::new(a));
    let cloud = NodeCloud {
        account: shared.clone(),
        node,
    };
    (shared, cloud)
}

fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

#[test]
fn an_empty_bucket_throttles_and_refills_at_its_rate() {
    paused().block_on(async {
        let b = BucketParam {
            burst: 3.0,
            per_sec: 1.0,
        };
        let (shared, cloud) = account(b, "10.0.0.0/24");
        let id = shared.lock().unwrap().instances[0].id.clone();
        for i in 0..3 {
            cloud
                .instance_enis(&id)
                .await
                .unwrap_or_else(|e| panic!("call {i}: {e}"));
        }
        let e = cloud.instance_enis(&id).await.unwrap_err();
        assert_eq!(e.code, "RequestLimitExceeded");
        assert!(e.is_throttle());
        // Other families have buckets of their own.
        let primary = shared.lock().unwrap().instances[0].primary_eni.clone();
        cloud
            .assign_ips(&primary, 1)
            .await
            .expect("assign-unassign is not describe's bucket");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        cloud
            .instance_enis(&id)
            .await
            .expect("a token after a second at 1/s");
        let log = &shared.lock().unwrap().log;
        let statuses: Vec<_> = log.iter().map(|c| c.status).collect();
        assert_eq!(
            statuses,
            ["200", "200", "200", "RequestLimitExceeded", "200", "200"]
        );
        assert!(
            log.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
            "ordered by time"
        );
    });
}

#[test]
fn a_subnet_runs_out_with_ec2s_error_and_gives_back_what_is_freed() {
    paused().block_on(async {
        let b = BucketParam {
            burst: 1000.0,
            per_sec: 1000.0,
        };
        // A /27: 32 - 4 reserved - the top /28 (the broadcast's) = 12, one the node's.
        let (shared, cloud) = account(b, "10.0.0.0/27");
        let (eni, free) = {
            let a = shared.lock().unwrap();
            (a.instances[0].primary_eni.clone(), a.subnets[0].available())
        };
        assert_eq!(free, 11);
        let mut got = Vec::new();
        for _ in 0..9 {
            got.extend(cloud.assign_ips(&eni, 1).await.expect("free addresses"));
        }
        // m5.large: 10 per ENI, the primary's own among them.
        let e = cloud.assign_ips(&eni, 1).await.unwrap_err();
        assert_eq!(e.code, "PrivateIpAddressLimitExceeded", "{e}");
        let subnet = shared.lock().unwrap().subnets[0].id.clone();
        let second = cloud
            .create_eni(&NewEni {
                subnet_id: subnet.clone(),
                security_groups: vec!["sg-0node".into()],
                description: "test".into(),
                tags: vec![],
                secondary_ips: 0,
                prefixes: 0,
            })
            .await
            .expect("the 11th address");
        cloud.assign_ips(&second.id, 1).await.expect("the last one");
        let e = cloud.assign_ips(&second.id, 1).await.unwrap_err();
        assert_eq!(e.code, "InsufficientFreeAddressesInSubnet", "{e}");
        let e = cloud.assign_prefixes(&second.id, 1).await.unwrap_err();
        assert!(e.code.starts_with("Insufficient"), "{e}");
        cloud.unassign_ips(&eni, &got[..2]).await.unwrap();
        assert_eq!(shared.lock().unwrap().subnets[0].available(), 2);
        let back = cloud.assign_ips(&second.id, 2).await.expect("freed ones");
        let mut want = got[..2].to_vec();
        want.sort();
        let mut back = back;
        back.sort();
        assert_eq!(back, want);
    });
}

fn scenario(extra: &str) -> Scenario {
    Scenario::parse(&format!(
        r#"
name = "test"
nodes = 3
instance_type = "m5.large"
duration_s = 300
[[wave]]
at_s = 5
pods = 12
spread_s = 10
hold_s = 60
{extra}
[[subnet]]
cidr = "10.0.0.0/20"
"#
    ))
    .unwrap()
}

#[test]
fn a_run_is_the_same_run_again_and_serves_every_pod() {
    for which in [Impl::Ours, Impl::Upstream] {
        let sc = scenario("");
        let a = run_paused(&sc, which);
        let b = run_paused(&sc, which);
        let key = |o: &vpc_cni_sim::report::Outcome| {
            o.log
                .iter()
                .map(|c| (c.at_ms, c.node, c.api, c.status))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&a), key(&b), "{}: same seed, same calls", which.name());
        assert_eq!(a.pods.served_ms.len(), 36, "{}", which.name());
        assert_eq!(a.pods.unserved, 0);
        assert!(!a.log.is_empty());
        assert!(
            a.wall < Duration::from_secs(30),
            "paused clock: {:?}",
            a.wall
        );
        let calls: BTreeMap<_, _> = a.calls();
        assert!(calls.contains_key("CreateNetworkInterface"), "{calls:?}");
        let json = a.json();
        assert_eq!(json["pods"]["served"], 36, "{json}");
    }
}

#[test]
fn every_pod_is_served_or_counted_unserved_when_the_subnet_runs_out() {
    // 3 nodes x 20 pods in a /26 (44 addresses, 3 of them the nodes'): some never get one;
    // those still inside an AddNetwork at the end count too.
    let sc = Scenario::parse(
        r#"
name = "full"
nodes = 3
duration_s = 200
[[wave]]
at_s = 5
pods = 20
spread_s = 5
[[subnet]]
cidr = "10.0.0.0/26"
"#,
    )
    .unwrap();
    for which in [Impl::Ours, Impl::Upstream] {
        let o = run_paused(&sc, which);
        let served = o.pods.served_ms.len() as u64;
        assert_eq!(served + o.pods.unserved, 60, "{}", which.name());
        assert!(
            served <= 41 && o.pods.unserved >= 19,
            "{}: {served}",
            which.name()
        );
        assert!(o.waited_long() >= o.pods.unserved);
    }
}

#[test]
fn a_node_that_cannot_launch_in_a_full_subnet_is_counted_not_a_panic() {
    // A /27 holds 12 addresses (.4 to .15): 8 of 20 instances cannot launch in it.
    let sc = Scenario::parse(
        "name = \"tiny\"\nnodes = 20\nduration_s = 60\n[[wave]]\nat_s = 1\npods = 1\n\
         [[subnet]]\ncidr = \"10.0.0.0/27\"\n",
    )
    .unwrap();
    for which in [Impl::Ours, Impl::Upstream] {
        let o = run_paused(&sc, which);
        assert!(
            o.pods.nodes_not_launched == 8,
            "{}: {}",
            which.name(),
            o.pods.nodes_not_launched
        );
        assert!(o.text().contains("could not launch"));
        assert_eq!(
            o.json()["pods"]["nodesNotLaunched"],
            o.pods.nodes_not_launched
        );
    }
}

#[test]
fn scenarios_refuse_what_they_cannot_run() {
    for (bad, says) in [
        ("nodes = 0", "nodes: at least 1"),
        ("nodes = 1\ntime_scale = 0.0", "time_scale: above 0"),
        ("nodes = 1\ntime_scale = nan", "time_scale: above 0"),
        ("nodes = 1\ncolour = 3", "colour"),
    ] {
        let text =
            format!("name = \"x\"\nduration_s = 10\n{bad}\n[[subnet]]\ncidr = \"10.0.0.0/24\"\n");
        let e = Scenario::parse(&text).unwrap_err();
        assert!(e.contains(says), "{bad}: {e}");
    }
    for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios")).unwrap() {
        let p = f.unwrap().path();
        Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
}

#[test]
fn a_call_that_is_only_due_is_tried_once_through_throttling() {
    use ipamd_core::budget::{BudgetConfig, Budgeted, at_most};
    paused().block_on(async {
        let b = BucketParam {
            burst: 1.0,
            per_sec: 0.001,
        };
        let (shared, cloud) = account(b, "10.0.0.0/24");
        let id = shared.lock().unwrap().instances[0].id.clone();
        let ec2 = Budgeted::new(cloud, BudgetConfig::default());
        ec2.instance_enis(&id).await.expect("the burst's token");
        let calls = |shared: &Arc<Mutex<Account>>| shared.lock().unwrap().log.len();
        let e = at_most(1, ec2.instance_enis(&id)).await.unwrap_err();
        assert!(e.is_throttle(), "{e}");
        assert_eq!(calls(&shared), 2, "one attempt");
        ec2.instance_enis(&id).await.unwrap_err();
        assert_eq!(
            calls(&shared),
            2 + BudgetConfig::default().max_attempts as usize,
            "the budget's attempts"
        );
    });
}
