//! vpc-cni-sim SCENARIO.toml [--nodes N] [--only ours|upstream] [--out DIR]
//!
//! Runs the scenario with our engine and with the model of upstream's ipamd, each on a
//! paused tokio clock, prints both reports side by side, and writes `report.json` and
//! `report.svg` to DIR (default: .build/sim/<scenario file name>).

use std::path::PathBuf;

use vpc_cni_sim::scenario::Scenario;
use vpc_cni_sim::{Impl, report, run_paused};

fn usage() -> ! {
    eprintln!("usage: vpc-cni-sim SCENARIO.toml [--nodes N] [--only ours|upstream] [--out DIR]");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut nodes = None;
    let mut only = None;
    let mut out = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nodes" => {
                nodes = Some(
                    args.next()
                        .and_then(|v| v.parse::<u32>().ok())
                        .filter(|n| *n > 0)
                        .unwrap_or_else(|| usage()),
                )
            }
            "--only" => {
                only = Some(match args.next().as_deref() {
                    Some("ours") => Impl::Ours,
                    Some("upstream") => Impl::Upstream,
                    _ => usage(),
                })
            }
            "--out" => out = Some(PathBuf::from(args.next().unwrap_or_else(|| usage()))),
            "-h" | "--help" => usage(),
            _ if path.is_none() => path = Some(PathBuf::from(a)),
            _ => usage(),
        }
    }
    let path = path.unwrap_or_else(|| usage());
    let mut sc = match Scenario::load(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vpc-cni-sim: {e}");
            std::process::exit(2)
        }
    };
    if let Some(n) = nodes {
        sc.nodes = n;
    }
    let out = out
        .unwrap_or_else(|| PathBuf::from(".build/sim").join(path.file_stem().unwrap_or_default()));
    println!(
        "{}: {} nodes of {}, {} s of virtual time",
        sc.name, sc.nodes, sc.instance_type, sc.duration_s
    );
    let which: Vec<Impl> = match only {
        Some(i) => vec![i],
        None => vec![Impl::Ours, Impl::Upstream],
    };
    let mut outcomes = Vec::new();
    for w in which {
        let o = run_paused(&sc, w);
        print!("{}", o.text());
        outcomes.push(o);
    }
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("vpc-cni-sim: {}: {e}", out.display());
        std::process::exit(1)
    }
    let json = serde_json::json!({
        "scenario": sc.name,
        "nodes": sc.nodes,
        "durationSeconds": sc.duration_s,
        "runs": outcomes.iter().map(|o| o.json()).collect::<Vec<_>>(),
    });
    let refs: Vec<&report::Outcome> = outcomes.iter().collect();
    let title = format!("{}: {} nodes", sc.name, sc.nodes);
    for (name, body) in [
        (
            "report.json",
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        ),
        ("report.svg", report::svg(&title, &refs)),
    ] {
        let p = out.join(name);
        if let Err(e) = std::fs::write(&p, body) {
            eprintln!("vpc-cni-sim: {}: {e}", p.display());
            std::process::exit(1)
        }
    }
    println!(
        "report: {}/report.json, {}/report.svg",
        out.display(),
        out.display()
    );
}
