//! The README's main command: the EC2 + IMDS emulator, the real ipamd against it, and the
//! real aws-cni plugin giving 12 pods (network namespaces) their VPC addresses on a node
//! namespace. Shows the pods, the ENIs EC2 holds, reachability, the EC2 calls spent, then
//! deletes every pod and shows nothing is left. Everything it starts is stopped at the end.
//! (Two nodes with containerd and a VPC fabric come with the lab, issue 6.)

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_cni::config::IpamdAddress;
use aws_cni::ipamd::Ipamd;
use ec2_emulator_sdk_check::hotplug::Hotplug;
use vpc_cni_tests::netns::TestNs;
use vpc_cni_tests::plugin::{Invocation, netconf, plugin_bin, run};
use vpc_cni_tests::require_root;

fn step(s: &str) {
    println!("\x1b[1m==> {s}\x1b[0m");
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct EmulatorGuard {
    port: String,
}

impl EmulatorGuard {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new(root().join("localstack/emulator"))
            .args(args)
            .env("EMULATOR_PORT", &self.port)
            .output()
            .expect("run localstack/emulator")
    }

    fn control(&self, method: &str, path: &str) -> String {
        let mut s =
            std::net::TcpStream::connect(format!("127.0.0.1:{}", self.port)).expect("emulator");
        write!(s, "{method} {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
    }
}

impl Drop for EmulatorGuard {
    fn drop(&mut self) {
        let _ = self.cmd(&["stop"]);
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn wait_healthy(socket: &std::path::Path) -> Result<Duration, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = IpamdAddress::Unix(socket.display().to_string());
    let t0 = Instant::now();
    rt.block_on(async {
        loop {
            if let Ok(ipamd) = Ipamd::connect(&addr).await
                && ipamd.health().await.is_ok()
            {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "ipamd did not serve on {} within 30 s",
                    socket.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

fn main() {
    require_root();
    let release = std::env::args().any(|a| a == "--release");
    let bin = plugin_bin(release);
    let ipamd_bin = bin.with_file_name("ipamd");
    assert!(
        ipamd_bin.exists(),
        "{} not found: build it with cargo build -p ipamd",
        ipamd_bin.display()
    );
    let port = std::env::var("EMULATOR_PORT").unwrap_or_else(|_| "5000".into());
    let work = std::env::var("DEMO_WORKDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::temp_dir().join(format!("vpc-cni-demo-{}", std::process::id()))
        });
    std::fs::create_dir_all(&work).unwrap();

    // Everything from here on lives in the node's namespace: the emulator (the node's
    // view of EC2 and IMDS), ipamd (which sets up routes, rules and iptables there) and
    // the plugin. The machine's own namespace is never touched.
    let node = TestNs::new("demo-node");
    {
        use std::os::fd::AsFd;
        let f = std::fs::File::open(node.path()).unwrap();
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("enter the node namespace");
    }
    step(&format!(
        "node namespace {}: EC2 + IMDS emulator on 127.0.0.1:{port}",
        node.name
    ));
    let emu = EmulatorGuard { port: port.clone() };
    let out = emu.cmd(&["start"]);
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        std::process::exit(1);
    }
    let out = emu.cmd(&["seed", "--type", "m5.large"]);
    let instance = String::from_utf8_lossy(&out.stdout).trim().to_string();
    println!("    seeded a VPC and one m5.large ({instance}: 3 ENIs x 10 addresses, max 29 pods)");
    let endpoint = format!("http://127.0.0.1:{port}");
    // The instance's NICs: each attached ENI appears as eth<device> with its MAC.
    let _hotplug = Hotplug::start(&endpoint);
    println!(
        "    eth0 = the primary ENI; attached ENIs appear as eth1, eth2... as EC2 attaches them"
    );
    // From here on, every EC2 call the emulator counts is ipamd's.
    emu.control("DELETE", "/_emulator/calls");

    step("ipamd, default knobs (WARM_ENI_TARGET=1): one ENI's worth of addresses kept spare");
    let socket = work.join("ipamd.sock");
    let log = std::fs::File::create(work.join("ipamd.log")).unwrap();
    let child = Command::new(&ipamd_bin)
        .env_clear()
        .env("AWS_ENDPOINT_URL_EC2", &endpoint)
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", format!("{endpoint}/"))
        .env("AWS_REGION", "us-west-2")
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_VPC_K8S_CNI_BACKING_STORE", work.join("ipam.json"))
        .env("IPAMD_SOCKET", &socket)
        .env("AWS_VPC_K8S_CNI_LOGLEVEL", "INFO")
        .env("IPAMD_POOL_INTERVAL_MS", "500")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start ipamd");
    let _daemon = Daemon(child);
    match wait_healthy(&socket) {
        Ok(t) => println!(
            "    serving on {} after {} ms",
            socket.display(),
            t.as_millis()
        ),
        Err(e) => {
            eprintln!(
                "{e}\n{}",
                std::fs::read_to_string(work.join("ipamd.log")).unwrap_or_default()
            );
            std::process::exit(1);
        }
    }

    step("12 pods through aws-cni");
    let plugin_log = work.join("plugin.log").display().to_string();
    let conf = netconf("1.0.0", &socket.display().to_string(), &plugin_log, &[]);
    let mut pods = Vec::new();
    for i in 0..12 {
        let name = format!("web-{i}");
        let ns = TestNs::new("demo-pod");
        let inv = Invocation::new(
            "ADD",
            &format!("sandbox-{name}"),
            &ns.path(),
            "default",
            &name,
        );
        let t = Instant::now();
        let out = run(&bin, Some(&node.path()), &inv, &conf);
        if !out.success {
            eprintln!("ADD {name} failed: {}", out.stdout);
            std::process::exit(1);
        }
        let ip = out.json["ips"][0]["address"]
            .as_str()
            .unwrap_or("?")
            .trim_end_matches("/32")
            .to_string();
        let veth = out.json["interfaces"][0]["name"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        println!(
            "    ADD default/{name:<8} {ip:<12} {:>5} ms",
            t.elapsed().as_millis()
        );
        pods.push((name, ip, veth, ns, inv));
    }
    let rules = node.exec(&["ip", "rule", "show"]);
    println!();
    println!(
        "    {:<10} {:<14} {:<16} ENI",
        "POD", "ADDRESS", "HOST VETH"
    );
    for (name, ip, veth, _, _) in &pods {
        let table = rules
            .lines()
            .find(|l| l.starts_with("1536:") && l.contains(&format!("from {ip} ")))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|t| t.parse::<u32>().ok());
        let eni = match table {
            Some(t) => format!("secondary, device {} (rule pref 1536 -> table {t})", t - 1),
            None => "primary, device 0".into(),
        };
        println!("    {name:<10} {ip:<14} {veth:<16} {eni}");
    }
    let calls: serde_json::Value =
        serde_json::from_str(&emu.control("GET", "/_emulator/calls")).unwrap_or_default();
    let calls: Vec<String> = calls
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    println!();
    println!(
        "    EC2 calls ipamd made for all this: {}",
        calls.join(", ")
    );
    println!("    what EC2 holds for {instance}:");
    print!(
        "{}",
        String::from_utf8_lossy(&emu.cmd(&["describe", "--instance", &instance]).stdout)
    );

    step("host networking ipamd converged in the node namespace");
    for (what, args) in [
        (
            "SNAT to the primary IP",
            &["iptables", "-t", "nat", "-S", "AWS-SNAT-CHAIN-0"][..],
        ),
        (
            "secondary ENI's table 2",
            &["ip", "route", "show", "table", "2"][..],
        ),
    ] {
        println!("    {what}:");
        let out = node.try_output(args);
        for l in out.lines().filter(|l| !l.starts_with("-N")) {
            println!("      {l}");
        }
    }
    let rules = node.exec(&["ip", "rule", "show"]);
    for l in rules
        .lines()
        .filter(|l| l.starts_with("1024:") || l.starts_with("32765:"))
    {
        println!("      rule {l}");
    }

    step("reachability (ping, no NAT)");
    let ping = |ns: &TestNs, dst: &str| ns.try_exec(&["ping", "-c", "1", "-W", "2", dst]);
    let mut ok = true;
    for (from, to, what) in [
        (0usize, 11usize, "pod (primary ENI) -> pod (secondary ENI)"),
        (11, 1, "pod (secondary ENI) -> pod (primary ENI)"),
    ] {
        let r = ping(&pods[from].3, &pods[to].1);
        ok &= r;
        println!(
            "    {what:<44} {:<12} {}",
            pods[to].1,
            if r { "ok" } else { "FAILED" }
        );
    }
    let r = ping(&node, &pods[5].1);
    ok &= r;
    println!(
        "    {:<44} {:<12} {}",
        "node -> pod",
        pods[5].1,
        if r { "ok" } else { "FAILED" }
    );

    step("DEL every pod");
    for (name, _, _, _, inv) in &pods {
        let del = run(&bin, Some(&node.path()), &inv.with_command("DEL"), &conf);
        ok &= del.success;
        if !del.success {
            println!("    DEL {name} FAILED: {}", del.stdout);
        }
    }
    let links = node.exec(&["ip", "-o", "link", "show"]);
    let rules = node.exec(&["ip", "rule", "show"]);
    let clean = !links.contains(" eni") && !rules.contains("512:") && !rules.contains("1536:");
    println!(
        "    node after DEL: {}",
        if clean {
            "no pod veth, route or rule left"
        } else {
            "LEFTOVERS"
        }
    );
    let store = std::fs::read_to_string(work.join("ipam.json.journal")).unwrap_or_default();
    println!(
        "    ipamd checkpoint journal: {} changes recorded",
        store.lines().count()
    );
    drop(pods);
    drop(_daemon);
    drop(emu);
    let _ = std::fs::remove_dir_all(&work);
    if !(ok && clean) {
        std::process::exit(1);
    }
    step("done: ipamd and the emulator stopped, namespaces removed");
}
