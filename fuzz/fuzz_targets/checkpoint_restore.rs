//! A checkpoint on disk as a crash, a person or another daemon may leave it: a snapshot
//! (the input up to the first NUL, none without one) and a journal (the rest). Restore
//! either refuses it or yields a state where no address is held twice, within bounds,
//! that a datastore takes as it is.
#![no_main]

use std::collections::HashSet;

use ipamd_core::checkpoint::{MAX_ALLOCATIONS, parse};
use ipamd_core::datastore::Datastore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (snap, journal) = match data.iter().position(|b| *b == 0) {
        Some(i) => (Some(&data[..i]), &data[i + 1..]),
        None => (None, data),
    };
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
