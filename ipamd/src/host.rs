//! The host's pod routes, for rebuilding a lost checkpoint: every `IP/32 dev <veth>` in
//! the main table whose device carries the veth prefix is a pod's address.

use std::net::Ipv4Addr;

use aws_cni::netlink::{MAIN_TABLE, Netlink};
use ipamd_core::node::HostPods;

pub struct NetlinkHost {
    pub veth_prefix: String,
}

impl HostPods for NetlinkHost {
    fn pod_routes(&self) -> Vec<(Ipv4Addr, String)> {
        let prefix = self.veth_prefix.clone();
        // Own thread and runtime: called once at start-up, from inside another runtime.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let nl = Netlink::connect().ok()?;
                let links = nl.links().await.ok()?;
                let routes = nl.routes().await.ok()?;
                Some(
                    routes
                        .into_iter()
                        .filter(|r| r.table == MAIN_TABLE && r.dst_len == 32)
                        .filter_map(|r| {
                            let l = links.iter().find(|l| Some(l.index) == r.oif)?;
                            l.name.starts_with(&prefix).then(|| (r.dst, l.name.clone()))
                        })
                        .collect(),
                )
            })
        })
        .join()
        .ok()
        .flatten()
        .unwrap_or_default()
    }
}
