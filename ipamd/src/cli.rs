//! `ipamd status` and `ipamd health`: what a person (or a probe) on the node runs.
//! `status` reads the introspection server and prints the ENIs, the pool and the pods
//! as tables; `health` asks ipamd's gRPC health service over its socket.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::Value;
use vpc_cni_proto::address::IpamdAddress;

/// GET `path` from the introspection server at `addr` (`host:port` or `unix:/path`).
pub fn http_get(addr: &str, path: &str) -> Result<Value, String> {
    let req = format!("GET {path} HTTP/1.0\r\nHost: ipamd\r\nConnection: close\r\n\r\n");
    let timeout = Some(Duration::from_secs(5));
    let mut raw = Vec::new();
    let io = |e: std::io::Error| format!("introspection at {addr}: {e}");
    if let Some(p) = addr.strip_prefix("unix:") {
        let mut s = std::os::unix::net::UnixStream::connect(p).map_err(io)?;
        s.set_read_timeout(timeout).map_err(io)?;
        s.write_all(req.as_bytes()).map_err(io)?;
        s.read_to_end(&mut raw).map_err(io)?;
    } else {
        let a = if addr.starts_with(':') {
            format!("127.0.0.1{addr}")
        } else {
            addr.to_string()
        };
        let mut s = std::net::TcpStream::connect(&a).map_err(io)?;
        s.set_read_timeout(timeout).map_err(io)?;
        s.write_all(req.as_bytes()).map_err(io)?;
        s.read_to_end(&mut raw).map_err(io)?;
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{path}: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.") || head.split(' ').nth(1) != Some("200") {
        return Err(format!(
            "{path}: {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("{path}: {e}"))
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

/// The status report from the three documents.
pub fn render_status(enis: &Value, pool: &Value, pods: &Value) -> String {
    let mut out = String::new();
    let mut rows = Vec::new();
    if let Some(m) = enis["ENIs"].as_object() {
        let mut list: Vec<&Value> = m.values().collect();
        list.sort_by_key(|e| e["DeviceNumber"].as_u64());
        for e in list {
            let cidrs = e["AvailableIPv4Cidrs"].as_object();
            let total: usize = cidrs
                .map(|c| {
                    c.values()
                        .map(|c| if c["IsPrefix"] == true { 16 } else { 1 })
                        .sum()
                })
                .unwrap_or(0);
            let prefixes = cidrs
                .map(|c| c.values().filter(|c| c["IsPrefix"] == true).count())
                .unwrap_or(0);
            let assigned: usize = cidrs
                .map(|c| {
                    c.values()
                        .flat_map(|c| {
                            c["IPAddresses"]
                                .as_object()
                                .into_iter()
                                .flat_map(|m| m.values())
                        })
                        .filter(|a| a["IPAMKey"]["containerID"] != "")
                        .count()
                })
                .unwrap_or(0);
            rows.push(vec![
                s(&e["DeviceNumber"]),
                s(&e["ID"]),
                if e["IsPrimary"] == true { "yes" } else { "" }.into(),
                s(&e["SubnetID"]),
                s(&e["PrimaryIP"]),
                total.to_string(),
                prefixes.to_string(),
                assigned.to_string(),
            ]);
        }
    }
    out.push_str(&format!(
        "ENIs ({} addresses, {} assigned)\n",
        s(&enis["TotalIPs"]),
        s(&enis["AssignedIPs"])
    ));
    out.push_str(&table(
        &[
            "DEV",
            "ENI",
            "PRIMARY",
            "SUBNET",
            "ENI IP",
            "ADDRESSES",
            "PREFIXES",
            "ASSIGNED",
        ],
        &rows,
    ));
    out.push('\n');
    let st = &pool["state"];
    out.push_str(&format!(
        "Pool: mode {}, targets {}, next: {}\n",
        s(&pool["mode"]),
        pool["targets"],
        s(&pool["next"])
    ));
    out.push_str(&table(
        &[
            "ENIS",
            "TOTAL",
            "ASSIGNED",
            "COOLDOWN",
            "AVAILABLE",
            "SHORTFALL",
            "SURPLUS",
            "MAX PODS",
        ],
        &[vec![
            s(&st["enis"]),
            s(&st["total"]),
            s(&st["assigned"]),
            s(&st["cooldown"]),
            s(&st["available"]),
            s(&pool["shortfall"]),
            s(&pool["surplus"]),
            s(&pool["limits"]["maxPods"]),
        ]],
    ));
    let decisions: Vec<Vec<String>> = pool["decisions"]
        .as_array()
        .map(|d| {
            d.iter()
                .take(5)
                .map(|d| vec![s(&d["at"]), s(&d["decision"]), s(&d["outcome"])])
                .collect()
        })
        .unwrap_or_default();
    if !decisions.is_empty() {
        out.push_str("\nLast decisions\n");
        out.push_str(&table(&["AT", "DECISION", "OUTCOME"], &decisions));
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = pods
        .as_array()
        .map(|p| {
            p.iter()
                .map(|p| {
                    vec![
                        s(&p["namespace"]),
                        s(&p["name"]),
                        s(&p["ip"]),
                        s(&p["eni"]),
                        s(&p["deviceNumber"]),
                        s(&p["containerID"]).chars().take(12).collect(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&format!("Pods ({})\n", rows.len()));
    out.push_str(&table(
        &["NAMESPACE", "NAME", "IP", "ENI", "DEV", "CONTAINER"],
        &rows,
    ));
    out
}

pub fn status(addr: &str) -> Result<String, String> {
    let enis = http_get(addr, "/v1/enis")?;
    let pool = http_get(addr, "/v1/pool")?;
    let pods = http_get(addr, "/v1/pods")?;
    Ok(render_status(&enis, &pool, &pods))
}

/// ipamd's gRPC health check: Ok when it answers SERVING (the probes, the entrypoint's
/// wait, the tests' waits).
pub async fn serving(addr: &IpamdAddress) -> Result<(), String> {
    use vpc_cni_proto::health::health_check_response::ServingStatus;
    use vpc_cni_proto::health::{HealthCheckRequest, health_client::HealthClient};
    let timeout = Duration::from_secs(3);
    let channel = vpc_cni_proto::address::connect(addr, timeout)
        .await
        .map_err(|e| {
            format!(
                "ipamd is unreachable at {addr}: {}",
                vpc_cni_proto::address::describe(&e)
            )
        })?;
    let req = HealthCheckRequest {
        service: vpc_cni_proto::HEALTH_SERVICE.to_string(),
    };
    let status = tokio::time::timeout(timeout, HealthClient::new(channel).check(req))
        .await
        .map_err(|_| format!("ipamd at {addr} did not answer its health check within {timeout:?}"))?
        .map_err(|s| format!("ipamd at {addr}: health check failed: {}", s.message()))?
        .into_inner()
        .status();
    match status {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("ipamd at {addr} is {}", other.as_str_name())),
    }
}

/// `ipamd health [SOCKET]`: `serving` on a runtime of its own.
pub fn health(socket: &str) -> Result<(), String> {
    let addr = IpamdAddress::parse(socket)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(serving(&addr))
}
