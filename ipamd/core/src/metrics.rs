//! ipamd's own counters and the AddNetwork latency histogram, as plain atomics. The
//! exporter (the `ipamd` crate) reads them, the datastore and the EC2 budget at scrape time
//! and writes upstream's metric names; nothing here knows the exposition format.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the AddNetwork latency buckets: from a warm pool (~100s of
/// µs) to a pod that waited for EC2 (seconds).
pub const ADD_LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0, 10.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last slot is +Inf.
    buckets: [AtomicU64; ADD_LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// A histogram as read: cumulative counts per bound, then +Inf.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramView {
    pub cumulative: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = ADD_LATENCY_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(ADD_LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn view(&self) -> HistogramView {
        let mut acc = 0;
        let mut cumulative = Vec::with_capacity(ADD_LATENCY_BUCKETS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Ordering::Relaxed);
            let bound = ADD_LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            cumulative.push((bound, acc));
        }
        HistogramView {
            cumulative,
            count: acc,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// DelNetwork reasons counted by name: upstream's plugin's and ours.
pub const DEL_REASONS: [&str; 3] = ["PodDeleted", "SetupNSFailed", "aws-cni: ADD failed"];

#[derive(Debug, Default)]
pub struct Metrics {
    /// AddNetwork calls (awscni_add_ip_req_count).
    pub add_ip_req: AtomicU64,
    /// AddNetwork calls answered "no address" (awscni_no_available_ip_addresses).
    pub no_available_ip: AtomicU64,
    /// DelNetwork calls by reason (awscni_del_ip_req_count{reason}).
    del_ip_req: Mutex<BTreeMap<String, u64>>,
    /// Failures inside ipamd by function (awscni_ipamd_error_count{fn}).
    errors: Mutex<BTreeMap<String, u64>>,
    /// Reconciles by kind (awscni_reconcile_count{fn}).
    reconciles: Mutex<BTreeMap<String, u64>>,
    /// ENIs and addresses EC2 no longer had (removed by someone else), forgotten.
    pub force_removed_enis: AtomicU64,
    pub force_removed_ips: AtomicU64,
    /// Assignments released because their pod had no interface on the host.
    pub reclaimed_ips: AtomicU64,
    /// Leaked ENIs deleted by the sweep.
    pub leaked_enis_deleted: AtomicU64,
    /// AddNetwork latency, answered ones only.
    pub add_latency: Histogram,
}

fn bump(m: &Mutex<BTreeMap<String, u64>>, key: &str) {
    *m.lock().unwrap().entry(key.to_string()).or_default() += 1;
}

impl Metrics {
    /// Counts a DelNetwork by its reason. The reason comes from the client: a label with
    /// any value would grow the series without bound, so unknown reasons count as `other`.
    pub fn del_request(&self, reason: &str) {
        let reason = if DEL_REASONS.contains(&reason) {
            reason
        } else {
            "other"
        };
        bump(&self.del_ip_req, reason);
    }
    pub fn error(&self, func: &str) {
        bump(&self.errors, func);
    }
    pub fn reconciled(&self, func: &str) {
        bump(&self.reconciles, func);
    }
    pub fn del_requests(&self) -> BTreeMap<String, u64> {
        self.del_ip_req.lock().unwrap().clone()
    }
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().unwrap().clone()
    }
    pub fn reconciles(&self) -> BTreeMap<String, u64> {
        self.reconciles.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn del_reasons_are_a_bounded_label() {
        let m = Metrics::default();
        m.del_request("PodDeleted");
        for i in 0..1000 {
            m.del_request(&format!("reason-{i}"));
        }
        let r = m.del_requests();
        assert_eq!(r.len(), 2);
        assert_eq!(r["PodDeleted"], 1);
        assert_eq!(r["other"], 1000);
    }

    #[test]
    fn histogram_is_cumulative_with_inf_last() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(80));
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_secs(30));
        let v = h.view();
        assert_eq!(v.count, 3);
        assert_eq!(v.cumulative[0], (0.0001, 1));
        assert_eq!(v.cumulative[1], (0.00025, 1));
        assert_eq!(v.cumulative[2], (0.0005, 2));
        assert_eq!(v.cumulative.last().unwrap().1, 3);
        assert!(v.cumulative.last().unwrap().0.is_infinite());
        assert!((v.sum_seconds - 30.00038).abs() < 1e-9);
    }
}
