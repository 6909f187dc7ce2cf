//! A checkpoint on disk as a crash, a person or another daemon may leave it: a snapshot
//! (the input up to the first NUL, none without one) and a journal (the rest). Restore
//! either refuses it or yields a state where no address is held twice, within bounds,
//! that a datastore takes as it is; read as an IPv6 node's, the same, into the /80 store.
#![no_main]

use std::collections::HashSet;

use ipamd_core::checkpoint::{MAX_ALLOCATIONS, parse, parse_family};
use ipamd_core::datastore::Datastore;
use ipamd_core::prefix6::Prefix6Store;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (snap, journal) = match data.iter().position(|b| *b == 0) {
        Some(i) => (Some(&data[..i]), &data[i + 1..]),
        None => (None, data),
    };
    ipv6(snap, journal);
    let Ok(l) = parse(snap, journal) else { return };
    assert!(l.assignments.len() <= MAX_ALLOCATIONS);
    let mut ips = HashSet::new();
    for a in &l.assignments {
        assert!(ips.insert(a.ip), "{} held twice", a.ip);
    }
    for (ip, _) in &l.cooldowns {
        assert!(!ips.contains(ip), "{ip} both held and cooling down");
    }
    let mut d = Datastore::new(std::time::Duration::from_secs(30));
    for a in l.assignments.iter().cloned() {
        d.restore(a).expect("a parsed checkpoint restores whole");
    }
    for (ip, t) in &l.cooldowns {
        d.restore_cooldown(*ip, *t);
    }
    assert_eq!(d.assignments().len(), l.assignments.len());
});

fn ipv6(snap: Option<&[u8]>, journal: &[u8]) {
    let Ok(l) = parse_family::<std::net::Ipv6Addr>(snap, journal) else {
        return;
    };
    assert!(l.assignments.len() <= MAX_ALLOCATIONS);
    let mut s = Prefix6Store::new(std::time::Duration::from_secs(30));
    for a in l.assignments.iter().cloned() {
        s.restore(a).expect("a parsed checkpoint restores whole");
    }
    for (ip, t) in &l.cooldowns {
        s.restore_cooldown(*ip, *t);
    }
    assert_eq!(s.assigned(), l.assignments.len());
    // Whatever the file said, a new pod never gets an address a restored one holds.
    let prefix = ipamd_core::net::parse_cidr6("2600:1f14::/80").unwrap();
    s.set_prefixes("eni-1", vec![prefix]);
    let held: HashSet<_> = l.assignments.iter().map(|a| a.ip).collect();
    let key = ipamd_core::datastore::SandboxKey {
        network: "fuzz".into(),
        container_id: "new".into(),
        if_name: "eth0".into(),
    };
    if let Some(a) = s.assign(key, Default::default(), u64::MAX) {
        assert!(!held.contains(&a.ip), "{} handed out while held", a.ip);
    }
}
