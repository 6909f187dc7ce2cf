//! IPv6 mode (ENABLE_IPv6): a real ipamd process against the emulator seeded dual-stack.
//! The primary ENI's /80 is obtained once, pods get /128s from it, a restart keeps every
//! pod's address and makes no EC2 call, and the prefix is never given back.

mod common;

use std::collections::HashSet;
use std::net::Ipv6Addr;
use std::time::Duration;

use common::*;
use ec2_emulator_sdk_check::{Emulator, sdk_config};
use ipamd_core::net::{Ipv6Net, parse_cidr6};

const V6: [(&str, &str); 3] = [
    ("ENABLE_IPv6", "true"),
    ("ENABLE_IPv4", "false"),
    ("ENABLE_PREFIX_DELEGATION", "true"),
];

fn calls(emu: &Emulator, action: &str) -> u64 {
    let body = emu.control("GET", "/_emulator/calls", "");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v[action].as_u64().unwrap_or(0)
}

/// The primary ENI's IPv6 prefixes as EC2 holds them.
async fn ec2_prefixes(emu: &Emulator, instance: &str) -> Vec<Ipv6Net> {
    let conf = sdk_config(&emu.endpoint, "us-west-2").await;
    let c = aws_sdk_ec2::Client::new(&conf);
    let r = ec2_emulator_sdk_check::attached_enis(&c, instance)
        .await
        .unwrap();
    r.network_interfaces()
        .iter()
        .filter(|n| n.attachment().and_then(|a| a.device_index()) == Some(0))
        .flat_map(|n| n.ipv6_prefixes().iter())
        .filter_map(|p| parse_cidr6(p.ipv6_prefix()?))
        .collect()
}

fn ipv6_of(r: &vpc_cni_proto::rpc::AddNetworkReply) -> Ipv6Addr {
    assert!(r.success, "{r:?}");
    let m = &r.ip_allocation_metadata[0];
    assert_eq!(m.i_pv4_addr, "", "{r:?}");
    assert_eq!((m.device_number, m.route_table_id), (0, 1), "{r:?}");
    m.i_pv6_addr.parse().unwrap()
}

#[test]
fn pods_get_128s_from_the_one_80_and_keep_them_across_a_restart() {
    in_node_ns(
        "ipamd6",
        pods_get_128s_from_the_one_80_and_keep_them_across_a_restart_,
    )
}

async fn pods_get_128s_from_the_one_80_and_keep_them_across_a_restart_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--ipv6"]).remove(0);
    let mut d = Ipamd::start(&emu, &V6);
    let c = d.client().await;
    let mut held = Vec::new();
    for i in 0..20 {
        let r = c.add(&format!("c{i}")).await.unwrap();
        assert!(
            r.vp_cv6_cid_rs.len() == 1 && r.vp_cv4_cid_rs.is_empty() && !r.use_external_snat,
            "{r:?}"
        );
        held.push(ipv6_of(&r));
    }
    let prefixes = ec2_prefixes(&emu, &id).await;
    assert_eq!(prefixes.len(), 1, "{prefixes:?}");
    let p = prefixes[0];
    assert_eq!(p.len, 80);
    assert!(
        held.iter().all(|a| p.contains(*a)),
        "{held:?} not all in {p}"
    );
    assert_eq!(held.iter().collect::<HashSet<_>>().len(), 20, "{held:?}");
    assert_eq!(calls(&emu, "AssignIpv6Addresses"), 1);
    // A retried ADD gets the same address; a DEL frees one (not handed out again soon).
    assert_eq!(ipv6_of(&c.add("c3").await.unwrap()), held[3]);
    let del = c.del("c0").await.unwrap();
    assert_eq!(
        del.ip_allocation_metadata[0].i_pv6_addr,
        held[0].to_string()
    );

    // kill -9, and back: every pod keeps its address, no EC2 call is made for it.
    d.kill9();
    d.spawn();
    let c = d.client().await;
    for (i, want) in held.iter().enumerate().skip(1) {
        assert_eq!(
            ipv6_of(&c.add(&format!("c{i}")).await.unwrap()),
            *want,
            "c{i}"
        );
    }
    let fresh = ipv6_of(&c.add("new").await.unwrap());
    assert!(p.contains(fresh) && !held.contains(&fresh), "{fresh}");
    assert_eq!(calls(&emu, "AssignIpv6Addresses"), 1);
    // Every pod deleted: the prefix stays (it is never given back).
    for i in 1..20 {
        c.del(&format!("c{i}")).await.unwrap();
    }
    c.del("new").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ec2_prefixes(&emu, &id).await, vec![p]);
    assert_eq!(calls(&emu, "UnassignIpv6Addresses"), 0);
    let status = reqwest_like_get(&d, "/v1/pool");
    assert!(status.contains("\"family\":\"ipv6\""), "{status}");
}

#[test]
fn a_restart_while_imds_lags_the_prefix_takes_it_from_ec2_not_a_second_one() {
    in_node_ns(
        "ipamd6",
        a_restart_while_imds_lags_the_prefix_takes_it_from_ec2_not_a_second_one_,
    )
}

async fn a_restart_while_imds_lags_the_prefix_takes_it_from_ec2_not_a_second_one_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--ipv6"]).remove(0);
    // IMDS shows a new prefix only after 10 minutes: longer than this test.
    emu.control("POST", "/_emulator/imds", r#"{"delay_seconds": 600}"#);
    let mut d = Ipamd::start(&emu, &V6);
    let c = d.client().await;
    let a = ipv6_of(&c.add("a").await.unwrap());
    d.kill9();
    d.spawn();
    let c = d.client().await;
    assert_eq!(ipv6_of(&c.add("a").await.unwrap()), a);
    let b = ipv6_of(&c.add("b").await.unwrap());
    assert_ne!(a, b);
    assert_eq!(ec2_prefixes(&emu, &id).await.len(), 1);
    assert_eq!(calls(&emu, "AssignIpv6Addresses"), 1, "{}", d.log());
}

#[test]
fn a_subnet_without_ipv6_answers_no_address_and_says_why() {
    in_node_ns(
        "ipamd6",
        a_subnet_without_ipv6_answers_no_address_and_says_why_,
    )
}

async fn a_subnet_without_ipv6_answers_no_address_and_says_why_() {
    let emu = Emulator::start();
    emu.seed(&[]);
    let d = Ipamd::start(
        &emu,
        &[&V6[..], &[("ADD_NETWORK_WAIT_MS", "1500")]].concat(),
    );
    let c = d.client().await;
    let r = c.add("a").await.unwrap();
    assert!(!r.success, "{r:?}");
    let pool = reqwest_like_get(&d, "/v1/pool");
    assert!(pool.contains("has no IPv6"), "{pool}");
}

/// GET on the introspection server (plain HTTP/1.0 over TCP).
fn reqwest_like_get(d: &Ipamd, path: &str) -> String {
    use std::io::{Read, Write};
    let addr = d.introspection_addr();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
