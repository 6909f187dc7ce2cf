//! What the hypervisor does for an instance of the emulator: its attached ENIs appear as
//! links in the caller's network namespace.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::sdk_config;

/// Runs a command; panics with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the hypervisor does for an instance: every ENI attached to it (as the emulator
/// says) appears as a link `eth<device>` with the ENI's MAC, and disappears on detach.
/// The primary ENI's link comes up with its address, as the node's OS would do; the
/// others are left down and bare for ipamd to set up. Runs in the caller's namespace.
pub struct Hotplug {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Devices whose link is not made (a hypervisor that never shows an attached ENI).
    withheld: Arc<std::sync::Mutex<std::collections::BTreeSet<i32>>>,
}

impl Hotplug {
    /// Starts following the instance IMDS serves; returns after the first pass.
    pub fn start(endpoint: &str) -> Hotplug {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let endpoint = endpoint.to_string();
        let s = stop.clone();
        let withheld: Arc<std::sync::Mutex<std::collections::BTreeSet<i32>>> = Default::default();
        let w = withheld.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let imds = crate::imds_client(&endpoint);
                let conf = sdk_config(&endpoint, "us-west-2").await;
                let ec2 = aws_sdk_ec2::Client::new(&conf);
                let mut first = Some(tx);
                while !s.load(Ordering::Relaxed) {
                    if let Ok(id) = imds.get("/latest/meta-data/instance-id").await {
                        let id: String = id.into();
                        let skip = w.lock().unwrap().clone();
                        hotplug_pass(&ec2, &imds, &id, &skip).await;
                        if let Some(tx) = first.take() {
                            let _ = tx.send(());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        });
        let _ = rx.recv_timeout(Duration::from_secs(20));
        Hotplug {
            stop,
            thread: Some(thread),
            withheld,
        }
    }

    /// From now on, an ENI attached at `device` gets no link (until `release`).
    pub fn withhold(&self, device: i32) {
        self.withheld.lock().unwrap().insert(device);
    }

    pub fn release(&self, device: i32) {
        self.withheld.lock().unwrap().remove(&device);
    }
}

impl Drop for Hotplug {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn hotplug_pass(
    ec2: &aws_sdk_ec2::Client,
    imds: &aws_config::imds::Client,
    instance: &str,
    withheld: &std::collections::BTreeSet<i32>,
) {
    let Ok(r) = crate::attached_enis(ec2, instance).await else {
        return;
    };
    // (device, mac, primary address) of every ENI attached now.
    let want: Vec<(i32, String, String)> = r
        .network_interfaces()
        .iter()
        .filter(|n| n.attachment().and_then(|a| a.status()).map(|s| s.as_str()) != Some("detached"))
        .filter(|n| {
            n.attachment()
                .and_then(|a| a.device_index())
                .is_none_or(|d| !withheld.contains(&d))
        })
        .filter_map(|n| {
            Some((
                n.attachment()?.device_index()?,
                n.mac_address()?.to_string(),
                n.private_ip_address()?.to_string(),
            ))
        })
        .collect();
    let links: serde_json::Value =
        serde_json::from_str(&sh(&["ip", "-j", "link", "show"])).unwrap_or_default();
    let have: Vec<(String, String)> = links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            let name = l["ifname"].as_str()?;
            let mac = l["address"].as_str()?;
            name.starts_with("eth")
                .then(|| (name.to_string(), mac.to_string()))
        })
        .collect();
    for (name, mac) in &have {
        let wanted = want
            .iter()
            .any(|(d, m, _)| m == mac && *name == format!("eth{d}"));
        if !wanted {
            let _ = Command::new("ip").args(["link", "del", name]).output();
        }
    }
    for (dev, mac, ip) in &want {
        let name = format!("eth{dev}");
        if have.iter().any(|(n, m)| *n == name && m == mac) {
            continue;
        }
        // A veth whose peer stays here unused: the kernel here has no dummy driver.
        let peer = format!("hp{dev}");
        let _ = Command::new("ip").args(["link", "del", &name]).output();
        sh(&[
            "ip", "link", "add", &name, "address", mac, "type", "veth", "peer", "name", &peer,
        ]);
        sh(&["ip", "link", "set", &peer, "up"]);
        if *dev == 0 {
            let cidr: String = imds
                .get(&format!(
                    "/latest/meta-data/network/interfaces/macs/{mac}/subnet-ipv4-cidr-block"
                ))
                .await
                .map(Into::into)
                .unwrap_or_else(|_| "0.0.0.0/24".into());
            let len = cidr.split('/').nth(1).unwrap_or("24");
            sh(&["ip", "addr", "add", &format!("{ip}/{len}"), "dev", &name]);
            sh(&["ip", "link", "set", &name, "up"]);
        }
    }
}
