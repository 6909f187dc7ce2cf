//! Where ipamd listens for the plugin: a Unix socket (upstream's, the default) or, opt-in,
//! TCP as old releases used; and, with feature `client`, a channel to it.

/// ipamd's socket, where upstream's plugin (which hard-codes it) and ours look.
pub const DEFAULT_IPAMD_SOCKET: &str = "/var/run/aws-node/ipamd.sock";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpamdAddress {
    Unix(String),
    Tcp(String),
}

impl IpamdAddress {
    /// An absolute socket path (or `unix://path`), or `IP:PORT` (or `tcp://IP:PORT`).
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            return Ok(Self::Unix(path.to_string()));
        }
        if s.starts_with('/') {
            return Ok(Self::Unix(s.to_string()));
        }
        let hostport = s.strip_prefix("tcp://").unwrap_or(s);
        if hostport.parse::<std::net::SocketAddr>().is_ok() {
            return Ok(Self::Tcp(hostport.to_string()));
        }
        Err(format!(
            "{s:?} is neither an absolute socket path ({DEFAULT_IPAMD_SOCKET}) nor IP:PORT \
             (127.0.0.1:50051)"
        ))
    }
}

impl std::fmt::Display for IpamdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix://{p}"),
            Self::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// A gRPC channel to ipamd at `address` (one connection, made now).
#[cfg(feature = "client")]
pub async fn connect(
    address: &IpamdAddress,
    timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use hyper_util::rt::TokioIo;
    use tokio::net::UnixStream;
    use tonic::transport::{Endpoint, Uri};
    match address {
        IpamdAddress::Unix(path) => {
            let path = path.clone();
            // The URI is a placeholder: the connector below ignores it.
            Endpoint::from_static("http://ipamd.sock")
                .connect_timeout(timeout)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
        }
        IpamdAddress::Tcp(hostport) => {
            Endpoint::from_shared(format!("http://{hostport}"))?
                .connect_timeout(timeout)
                .connect()
                .await
        }
    }
}

/// An error and its causes on one line: tonic's transport errors say only "transport
/// error" in their own Display.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            IpamdAddress::parse("/var/run/aws-node/ipamd.sock").unwrap(),
            IpamdAddress::Unix("/var/run/aws-node/ipamd.sock".into())
        );
        assert_eq!(
            IpamdAddress::parse("tcp://127.0.0.1:50051").unwrap(),
            IpamdAddress::Tcp("127.0.0.1:50051".into())
        );
        assert!(
            IpamdAddress::parse("ipamd.sock")
                .unwrap_err()
                .contains("absolute")
        );
    }
}
