//! Client setup for checking the emulator with the AWS Rust SDK, the way ipamd will
//! build its clients: the standard environment (AWS_ENDPOINT_URL_EC2, region,
//! credentials) and an HTTPS-capable client on rustls/ring.

pub mod hotplug;

use aws_config::{BehaviorVersion, SdkConfig};

/// An HTTPS-capable client on rustls/ring (no aws-lc C build, no legacy hyper).
pub fn http_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// aws-config's IMDS client (IMDSv2 token flow) for `endpoint`.
pub fn imds_client(endpoint: &str) -> aws_config::imds::Client {
    let pc = aws_config::provider_config::ProviderConfig::without_region()
        .with_http_client(http_client());
    aws_config::imds::Client::builder()
        .configure(&pc)
        .endpoint(endpoint)
        .expect("IMDS endpoint URL")
        .build()
}

pub async fn sdk_config(endpoint: &str, region: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client())
        .region(aws_config::Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "emulator",
        ))
        .load()
        .await
}

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;

/// One emulator process on a free port, stopped on drop (also when a test fails).
pub struct Emulator {
    pub port: u16,
    pub endpoint: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../emulator")
}

impl Emulator {
    pub fn start() -> Emulator {
        Self::start_on("127.0.0.1")
    }

    /// Listening on `host` (`0.0.0.0`: reachable from other namespaces routed here);
    /// the endpoint stays on loopback for the caller.
    pub fn start_on(host: &str) -> Emulator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let out = Command::new(script())
            .arg("start")
            .env("EMULATOR_PORT", port.to_string())
            .env("EMULATOR_HOST", host)
            .output()
            .expect("run localstack/emulator");
        assert!(
            out.status.success(),
            "emulator start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Emulator {
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// `emulator seed` with these arguments; returns the instance ids.
    pub fn seed(&self, args: &[&str]) -> Vec<String> {
        let out = Command::new(script())
            .arg("seed")
            .args(args)
            .env("EMULATOR_PORT", self.port.to_string())
            .output()
            .expect("run emulator seed");
        assert!(
            out.status.success(),
            "seed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// A JSON request to the control endpoint; returns the body.
    pub fn control(&self, method: &str, path: &str, body: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect emulator");
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).expect("send");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        resp.split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .env("EMULATOR_PORT", self.port.to_string())
            .output();
    }
}

/// DescribeNetworkInterfaces of the ENIs attached to `instance`.
pub async fn attached_enis(
    ec2: &aws_sdk_ec2::Client,
    instance: &str,
) -> Result<
    aws_sdk_ec2::operation::describe_network_interfaces::DescribeNetworkInterfacesOutput,
    aws_sdk_ec2::error::SdkError<
        aws_sdk_ec2::operation::describe_network_interfaces::DescribeNetworkInterfacesError,
    >,
> {
    ec2.describe_network_interfaces()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("attachment.instance-id")
                .values(instance)
                .build(),
        )
        .send()
        .await
}
