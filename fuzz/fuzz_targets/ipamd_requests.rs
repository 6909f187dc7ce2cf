//! ipamd's side of a request: the gRPC messages decoded from any bytes, their sandbox
//! key checked as the server does, and the datastore driven by a sequence of operations
//! decoded from the same bytes (ENIs and addresses coming from EC2, pods assigned and
//! released, restores). After every step: no address is held by two pods, none is an
//! ENI's own, and the counts add up.
#![no_main]

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipamd_core::datastore::{Assignment, Datastore, Eni, PodRef, SandboxKey};
use ipamd_core::net::Ipv4Net;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use vpc_cni_proto::rpc::{AddNetworkRequest, DelNetworkRequest, GarbageCollectRequest};

fn ip(b: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, b % 48)
}

fn key(b: u8) -> SandboxKey {
    SandboxKey {
        network: "aws-cni".into(),
        container_id: format!("c{}", b % 16),
        if_name: "eth0".into(),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = AddNetworkRequest::decode(data) {
        let _ = ipamd_core::server::sandbox_key(&r.network_name, &r.container_id, &r.if_name);
    }
    if let Ok(r) = DelNetworkRequest::decode(data) {
        let _ = ipamd_core::server::sandbox_key(&r.network_name, &r.container_id, &r.if_name);
    }
    let _ = GarbageCollectRequest::decode(data);

    let mut d = Datastore::new(Duration::from_nanos(5));
    let mut now = 0u64;
    // (64 operations at most: longer inputs find nothing new, and slow every run.)
    for op in data.chunks(4).take(64) {
        let [o, a, b, c] = [
            op[0],
            *op.get(1).unwrap_or(&0),
            *op.get(2).unwrap_or(&0),
            *op.get(3).unwrap_or(&0),
        ];
        now += 1;
        let eni = format!("eni-{}", a % 4);
        match o % 8 {
            0 => {
                let _ = d.add_eni(Eni {
                    id: eni,
                    mac: String::new(),
                    device_number: (a % 4) as u32,
                    is_primary: a % 4 == 0,
                    subnet_id: "subnet-1".into(),
                    subnet_cidr: Ipv4Net {
                        addr: Ipv4Addr::new(10, 0, 0, 0),
                        len: 24,
                    },
                    primary_ip: ip(b),
                    attachment_id: None,
                    first_seen: Instant::now().into(),
                    ips: (0..c % 6).map(|i| ip(b.wrapping_add(i))).collect(),
                    prefixes: Default::default(),
                });
            }
            1 => {
                let _ = d.add_ips(&eni, &[ip(b), ip(c)]);
            }
            2 => {
                let _ = d.assign(&key(b), &PodRef::default(), now);
            }
            3 => {
                let _ = d.release(&key(b), now);
            }
            4 => {
                let _ = d.remove_ips(&eni, &[ip(b)]);
            }
            5 => {
                let _ = d.remove_eni(&eni);
            }
            6 => {
                let _ = d.restore(Assignment {
                    key: key(b),
                    ip: ip(c),
                    eni: String::new(),
                    device_number: 0,
                    assigned_at_ns: now,
                    pod: PodRef::default(),
                });
            }
            _ => {
                let p = Ipv4Net {
                    addr: Ipv4Addr::new(10, 0, 0, (b % 3) * 16),
                    len: 28,
                };
                let _ = d.add_prefix(&eni, p);
            }
        }
        let (total, assigned, cooldown, free) = d.counts(now);
        assert_eq!(assigned + cooldown + free, total, "counts add up");
        // An ENI's own address is never free to give to a pod.
        for e in d.enis() {
            assert!(
                !d.is_free(e.primary_ip),
                "{} is {}'s own and free",
                e.primary_ip,
                e.id
            );
        }
        let mut held = HashSet::new();
        for a in d.assignments() {
            assert!(held.insert(a.ip), "{} held by two pods", a.ip);
        }
    }
});
