//! Wall-clock time as ipamd records it: nanoseconds since the Unix epoch (the
//! checkpoint's timestamps) and RFC 3339 (ENI tags, introspection), without a date crate.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The time of day as the engine sees it: the wall clock read once, advanced by tokio's
/// monotonic clock since. In the daemon that is the wall clock (without its steps); on a
/// paused tokio clock (the fleet simulator) it is virtual time, so cooldowns, ENI ages and
/// created-at tags run on it like every timer does.
pub fn wall_now() -> SystemTime {
    static ANCHOR: OnceLock<(SystemTime, tokio::time::Instant)> = OnceLock::new();
    let (wall, mono) = ANCHOR.get_or_init(|| (SystemTime::now(), tokio::time::Instant::now()));
    *wall + tokio::time::Instant::now().saturating_duration_since(*mono)
}

pub fn now_ns() -> u64 {
    wall_now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    (secs >= 0).then(|| UNIX_EPOCH + Duration::from_secs(secs as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        let s = rfc3339(t);
        assert_eq!(s, "2026-11-18T11:06:40Z");
        assert_eq!(super::parse_rfc3339(&s), Some(t));
        assert_eq!(
            super::parse_rfc3339("2024-02-29T00:00:00.123Z").map(|_| ()),
            Some(())
        );
        assert!(super::parse_rfc3339("yesterday").is_none());
    }
}
