//! ipamd: reads the knobs (a bad one stops start-up, naming it), serves from IMDS and the
//! checkpoint at once, then keeps the warm pool over EC2. SIGTERM writes a final snapshot.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ipamd::{aws, host, kube, ops, ops6};
use ipamd_core::budget::{BudgetConfig, Budgeted};
use ipamd_core::config;
use ipamd_core::node::Node;
use tracing::{error, info, warn};

fn init_logging() -> Result<(), String> {
    let level = std::env::var("AWS_VPC_K8S_CNI_LOGLEVEL").unwrap_or_else(|_| "DEBUG".into());
    let level = match level.to_ascii_lowercase().as_str() {
        "debug" | "trace" => tracing::Level::DEBUG,
        "info" => tracing::Level::INFO,
        "warn" | "warning" => tracing::Level::WARN,
        "error" | "fatal" => tracing::Level::ERROR,
        _ => {
            return Err(format!(
                "AWS_VPC_K8S_CNI_LOGLEVEL={level:?} is invalid: DEBUG, INFO, WARN or ERROR"
            ));
        }
    };
    let json =
        std::env::var("AWS_VPC_K8S_CNI_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // The SDK's and HTTP stack's own debug output would drown ipamd's.
    let quiet = tracing::Level::WARN.min(level);
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(level)
        .with_target("aws", quiet)
        .with_target("hyper", quiet)
        .with_target("rustls", quiet)
        .with_target("h2", quiet)
        .with_target("tower", quiet)
        .with_target("kube", quiet)
        .with_target("kube_client", quiet)
        .with_target("kube_runtime", quiet);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt.json()).init()
    } else {
        registry.with(fmt).init()
    }
    Ok(())
}

const USAGE: &str = "usage: ipamd                 run the daemon (configured by the environment)
       ipamd status [ADDR]    print ENIs, pool and pods from the introspection server
                              (ADDR: host:port or unix:/path; default INTROSPECTION_BIND_ADDRESS)
       ipamd health [SOCKET]  exit 0 when ipamd's gRPC health check says SERVING
                              (default IPAMD_SOCKET or /var/run/aws-node/ipamd.sock)";

/// glibc gives each thread that contends for malloc an arena of its own (up to 8 per
/// core); with the runtime's workers and the blocking threads of iptables and journal
/// writes, that doubled ipamd's RSS (31 MB against 17 MB measured through the lab's
/// bench-e2e). Two arenas are plenty for a daemon this size.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called first thing in main, before any other thread exists; mallopt only
    // changes allocator tuning.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("status") => {
            let addr = args.get(1).cloned().unwrap_or_else(|| {
                std::env::var("INTROSPECTION_BIND_ADDRESS")
                    .unwrap_or_else(|_| "127.0.0.1:61679".into())
            });
            return match ipamd::cli::status(&addr) {
                Ok(t) => {
                    print!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ipamd status: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Some("health") => {
            let socket = args.get(1).cloned().unwrap_or_else(|| {
                std::env::var("IPAMD_SOCKET")
                    .unwrap_or_else(|_| "/var/run/aws-node/ipamd.sock".into())
            });
            return match ipamd::cli::health(&socket) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ipamd health: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Some("--version" | "version") => {
            println!("ipamd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(_) => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    }
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(daemon()),
        Err(e) => {
            eprintln!("ipamd: tokio runtime: {e}");
            ExitCode::from(1)
        }
    }
}

/// Reads the instance from IMDS, retried with backoff for `wait` (IPAMD_IMDS_WAIT_MS):
/// IMDS may be slow or refuse while an instance boots. False: it never answered.
async fn learn_with_retry<F, Fut>(wait: Duration, learn: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), ipamd_core::cloud::CloudError>>,
{
    let deadline = std::time::Instant::now() + wait;
    let mut delay = Duration::from_millis(200);
    loop {
        match learn().await {
            Ok(()) => return true,
            Err(e) if std::time::Instant::now() < deadline => {
                let pause = delay.min(deadline - std::time::Instant::now());
                warn!("instance metadata (IMDS) not available, retrying in {pause:?}: {e}");
                tokio::time::sleep(pause).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                error!(
                    "instance metadata (IMDS) did not answer within {wait:?} (IPAMD_IMDS_WAIT_MS): {e}"
                );
                return false;
            }
        }
    }
}

async fn daemon() -> ExitCode {
    if let Err(e) = init_logging() {
        eprintln!("ipamd: {e}");
        return ExitCode::from(2);
    }
    // Every knob the configuration reads, with its raw value, for /v1/ipamd-env-settings.
    let read = std::sync::Mutex::new(std::collections::BTreeMap::new());
    let cfg = config::from_env(|k| {
        let v = std::env::var(k).ok();
        read.lock()
            .unwrap()
            .insert(k.to_string(), v.clone().unwrap_or_default());
        v
    });
    let env = read.into_inner().unwrap_or_default();
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            error!("invalid configuration: {e}");
            eprintln!("ipamd: {e}");
            return ExitCode::from(2);
        }
    };
    let timing = match ipamd_core::node::timing_from_env(|k| std::env::var(k).ok()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ipamd: {e}");
            return ExitCode::from(2);
        }
    };
    let kube_plan = match kube::plan(&cfg, |k| std::env::var(k).ok()).await {
        Ok(p) => p,
        Err(e) => {
            error!("{e}");
            eprintln!("ipamd: {e}");
            return ExitCode::from(2);
        }
    };
    // Listening on a path removes what is there: only ever a socket of an earlier run.
    for (var, path) in [
        ("IPAMD_SOCKET", Some(cfg.socket_path.as_str())),
        (
            "INTROSPECTION_BIND_ADDRESS",
            cfg.introspection_bind_address.strip_prefix("unix:"),
        ),
        (
            "IPAMD_METRICS_BIND_ADDRESS",
            cfg.metrics_bind_address.strip_prefix("unix:"),
        ),
    ] {
        use std::os::unix::fs::FileTypeExt;
        if let Some(p) = path
            && let Ok(m) = std::fs::symlink_metadata(p)
            && !m.file_type().is_socket()
        {
            let e = format!(
                "{var}={p:?} is invalid: something that is not a socket is there (refusing to remove it)"
            );
            error!("{e}");
            eprintln!("ipamd: {e}");
            return ExitCode::from(2);
        }
    }
    if cfg.enable_ipv6 {
        if !matches!(kube_plan, kube::Plan::Off(_)) {
            warn!(
                "IPv6 mode: the Kubernetes API is not used yet (no cordon watch, no pod IP annotation)"
            );
        }
        return daemon6(cfg, env, timing).await;
    }
    let t0 = std::time::Instant::now();
    let imds = Arc::new(aws::SdkImds::from_env());
    let backend =
        match host::Backend::from_env(std::env::var("IPAMD_IPTABLES_MODE").ok().as_deref()) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("ipamd: {e}");
                return ExitCode::from(2);
            }
        };
    let host = match host::LinuxHost::new(backend, &cfg.veth_prefix) {
        Ok(h) => Arc::new(h),
        Err(e) => {
            eprintln!("ipamd: netlink: {e}");
            return ExitCode::from(1);
        }
    };
    // The EC2 client is made once IMDS has described the instance (its region and
    // primary subnet come from there).
    let ec2 = Arc::new(Budgeted::new(
        aws::LateEc2::default(),
        BudgetConfig::default(),
    ));
    let socket = std::path::PathBuf::from(&cfg.socket_path);
    let ec2_endpoint = cfg.ec2_endpoint.clone();
    let node = match Node::restore(cfg, ec2.clone(), imds, host, timing).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("ipamd: {e}");
            return ExitCode::from(1);
        }
    };
    info!(
        assignments = node.assignments().len(),
        "restored in {:?}; serving DelNetwork and health now, AddNetwork once the instance metadata is read",
        t0.elapsed()
    );
    let schedule = match kube_plan {
        kube::Plan::Off(why) => {
            info!("the node's schedulability is not read: {why}");
            None
        }
        kube::Plan::Watch {
            client,
            node: name,
            cordon,
        } => {
            // Before the pool starts: ENIs wait for the first answer.
            if cordon {
                node.set_schedule(ipamd_core::node::Schedule::Pending);
            }
            if node.cfg.annotate_pod_ip {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                node.set_pod_ip_sink(tx);
                tokio::spawn(kube::annotate_pods(client.clone(), rx));
            }
            if node.cfg.custom_network_cfg {
                tokio::spawn(kube::report_custom_networking(
                    node.clone(),
                    client.clone(),
                    name.clone(),
                ));
            }
            Some(tokio::spawn(kube::watch(
                node.clone(),
                client,
                name,
                cordon,
            )))
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // IMDS may be slow or refuse while an instance boots: retried with backoff for
    // IPAMD_IMDS_WAIT_MS while the socket serves (health NOT_SERVING); then the pool.
    let gave_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pool = {
        let (node, ec2, stop_tx, gave_up) =
            (node.clone(), ec2.clone(), stop_tx.clone(), gave_up.clone());
        tokio::spawn(async move {
            if !learn_with_retry(node.timing.imds_wait, || node.learn_instance()).await {
                gave_up.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = stop_tx.send(true);
                return;
            }
            let Some(inst) = node.identity() else { return };
            info!(
                instance = %inst.meta.instance_id,
                r#type = %inst.meta.instance_type,
                "serving AddNetwork {:?} after start",
                t0.elapsed()
            );
            let sdk = aws::SdkEc2::from_env(ec2_endpoint.as_deref())
                .await
                .with_primary_subnet(inst.primary_subnet.clone(), inst.primary_subnet_cidr);
            ec2.inner().install(sdk);
            node.run_pool().await;
        })
    };
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let ops = ops::Ops {
        node: node.clone(),
        budget: ec2.clone(),
        env,
    };
    let mut side = Vec::new();
    for (what, off, addr, router) in [
        (
            "introspection",
            node.cfg.disable_introspection,
            &node.cfg.introspection_bind_address,
            ops::introspection_router(ops.clone()),
        ),
        (
            "metrics",
            node.cfg.disable_metrics,
            &node.cfg.metrics_bind_address,
            ops::metrics_router(ops.clone()),
        ),
    ] {
        if off {
            continue;
        }
        let (addr, stop) = (addr.clone(), stopped());
        side.push(tokio::spawn(async move {
            info!("{what} on {addr}");
            if let Err(e) = ops::serve(&addr, router, stop).await {
                error!("{what} server on {addr}: {e}");
            }
        }));
    }
    let stopping = stopped();
    let shutdown = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = stopping => {}
        }
        let _ = stop_tx.send(true);
    };
    let served = ipamd_core::server::serve_unix(node.clone(), &socket, shutdown).await;
    for s in side {
        let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
    }
    pool.abort();
    if let Some(s) = schedule {
        s.abort();
    }
    let stats = ec2.stats();
    info!(calls = ?stats.calls, errors = ?stats.errors, throttled = stats.throttled, "EC2 calls this run");
    if let Err(e) = node.compact().await {
        error!("final snapshot: {e}");
    }
    if gave_up.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!("ipamd: the instance metadata service did not answer; see the log");
        return ExitCode::from(1);
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipamd: serving IPAMD_SOCKET {}: {e}", socket.display());
            ExitCode::from(1)
        }
    }
}

/// The IPv6 node (ENABLE_IPv6): serves from the checkpoint at once, learns the instance
/// from IMDS (retried as the IPv4 node does), then makes sure the primary ENI has its /80.
async fn daemon6(
    cfg: config::Config,
    env: std::collections::BTreeMap<String, String>,
    timing: ipamd_core::node::Timing,
) -> ExitCode {
    use ipamd_core::node6::Node6;
    let t0 = std::time::Instant::now();
    let imds = Arc::new(aws::SdkImds::from_env().with_ipv6(true));
    let ec2 = Arc::new(Budgeted::new(
        aws::LateEc2::default(),
        BudgetConfig::default(),
    ));
    let backend =
        match host::Backend::from_env(std::env::var("IPAMD_IPTABLES_MODE").ok().as_deref()) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("ipamd: {e}");
                return ExitCode::from(2);
            }
        };
    let socket = std::path::PathBuf::from(&cfg.socket_path);
    let ec2_endpoint = cfg.ec2_endpoint.clone();
    // The host side (IPv6 forwarding, the egress block rule), converged now and at every
    // reconcile interval, beside serving.
    let every = timing.reconcile_interval;
    let host_loop = tokio::spawn(async move {
        loop {
            match tokio::task::spawn_blocking(move || host::converge_ipv6_node(backend)).await {
                Ok(Ok(changed)) if !changed.is_empty() => info!(?changed, "IPv6 host network"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => error!("IPv6 host network: {e}"),
                Err(e) => error!("IPv6 host network: {e}"),
            }
            tokio::time::sleep(every).await;
        }
    });
    let node = match Node6::restore(cfg, ec2.clone(), imds, timing).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("ipamd: {e}");
            return ExitCode::from(1);
        }
    };
    info!(
        assignments = node.assignments().len(),
        "IPv6 mode: restored in {:?}; serving DelNetwork and health now, AddNetwork once the primary ENI's prefix is known",
        t0.elapsed()
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let gave_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pool = {
        let (node, ec2, stop_tx, gave_up) =
            (node.clone(), ec2.clone(), stop_tx.clone(), gave_up.clone());
        tokio::spawn(async move {
            if !learn_with_retry(node.timing.imds_wait, || node.learn_instance()).await {
                gave_up.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = stop_tx.send(true);
                return;
            }
            ec2.inner()
                .install(aws::SdkEc2::from_env(ec2_endpoint.as_deref()).await);
            node.ensure_prefix().await;
            info!("serving IPv6 AddNetwork {:?} after start", t0.elapsed());
        })
    };
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let ops = ops6::Ops6 {
        node: node.clone(),
        budget: ec2.clone(),
        env,
    };
    let mut side = Vec::new();
    for (what, off, addr, router) in [
        (
            "introspection",
            node.cfg.disable_introspection,
            &node.cfg.introspection_bind_address,
            ops6::introspection_router(ops.clone()),
        ),
        (
            "metrics",
            node.cfg.disable_metrics,
            &node.cfg.metrics_bind_address,
            ops6::metrics_router(ops.clone()),
        ),
    ] {
        if off {
            continue;
        }
        let (addr, stop) = (addr.clone(), stopped());
        side.push(tokio::spawn(async move {
            info!("{what} on {addr}");
            if let Err(e) = ops::serve(&addr, router, stop).await {
                error!("{what} server on {addr}: {e}");
            }
        }));
    }
    let stopping = stopped();
    let shutdown = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = stopping => {}
        }
        let _ = stop_tx.send(true);
    };
    let served = ipamd_core::server::serve_unix(node.clone(), &socket, shutdown).await;
    for s in side {
        let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
    }
    pool.abort();
    host_loop.abort();
    let stats = ec2.stats();
    info!(calls = ?stats.calls, errors = ?stats.errors, throttled = stats.throttled, "EC2 calls this run");
    if let Err(e) = node.compact().await {
        error!("final snapshot: {e}");
    }
    if gave_up.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!("ipamd: the instance metadata service did not answer; see the log");
        return ExitCode::from(1);
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipamd: serving IPAMD_SOCKET {}: {e}", socket.display());
            ExitCode::from(1)
        }
    }
}
