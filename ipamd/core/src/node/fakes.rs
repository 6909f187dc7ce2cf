//! Test doubles for the engine's unit tests: an IMDS with one ENI, an EC2 that is never
//! there (start-up must not need it), and a host whose pod routes the test sets.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::cloud::{CloudError, CloudResult, Ec2, EniInfo, Imds, InstanceMeta, NewEni, SubnetInfo};
use crate::hostnet::{EniNet, HostNetwork, NodeNet};
use crate::net::{Ipv4Net, parse_cidr};
use crate::pool::Limits;

pub struct FakeImds;

#[async_trait]
impl Imds for FakeImds {
    async fn instance(&self) -> CloudResult<InstanceMeta> {
        Ok(InstanceMeta {
            instance_id: "i-1".into(),
            instance_type: "m5.large".into(),
            availability_zone: "us-west-2a".into(),
            primary_mac: "02:00:00:00:00:01".into(),
            primary_ip: "10.0.0.4".parse().unwrap(),
        })
    }
    async fn enis(&self) -> CloudResult<Vec<EniInfo>> {
        Ok(vec![EniInfo {
            id: "eni-1".into(),
            mac: "02:00:00:00:00:01".into(),
            device_number: 0,
            subnet_id: "subnet-1".into(),
            subnet_cidr: parse_cidr("10.0.0.0/24").unwrap(),
            vpc_id: "vpc-1".into(),
            vpc_cidrs: vec![parse_cidr("10.0.0.0/16").unwrap()],
            security_groups: vec![],
            primary_ip: "10.0.0.4".parse().unwrap(),
            secondary_ips: ["10.0.0.5", "10.0.0.6", "10.0.0.7"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect(),
            prefixes: vec![],
            attachment_id: None,
            tags: vec![],
            status: "in-use".into(),
            ipv6: Default::default(),
        }])
    }
}

/// EC2 is never needed to start.
pub struct NoEc2;

fn none<T>() -> CloudResult<T> {
    Err(CloudError::new(
        "fake",
        "Unavailable",
        "no EC2 in this test",
    ))
}

#[async_trait]
impl Ec2 for NoEc2 {
    async fn instance_type_limits(&self, _: &str) -> CloudResult<Limits> {
        none()
    }
    async fn instance_enis(&self, _: &str) -> CloudResult<Vec<EniInfo>> {
        none()
    }
    async fn unattached_enis_tagged(&self, _: &str, _: &str) -> CloudResult<Vec<EniInfo>> {
        none()
    }
    async fn cni_subnets(&self, _: &str) -> CloudResult<Vec<SubnetInfo>> {
        none()
    }
    async fn describe_subnet(&self, _: &str) -> CloudResult<SubnetInfo> {
        none()
    }
    async fn create_eni(&self, _: &NewEni) -> CloudResult<EniInfo> {
        none()
    }
    async fn attach_eni(&self, _: &str, _: &str, _: u32) -> CloudResult<String> {
        none()
    }
    async fn set_delete_on_termination(&self, _: &str, _: &str) -> CloudResult<()> {
        none()
    }
    async fn set_security_groups(&self, _: &str, _: &[String]) -> CloudResult<()> {
        none()
    }
    async fn create_tags(&self, _: &str, _: &[(String, String)]) -> CloudResult<()> {
        none()
    }
    async fn detach_eni(&self, _: &str) -> CloudResult<()> {
        none()
    }
    async fn delete_eni(&self, _: &str) -> CloudResult<()> {
        none()
    }
    async fn assign_ips(&self, _: &str, _: u32) -> CloudResult<Vec<Ipv4Addr>> {
        none()
    }
    async fn assign_prefixes(&self, _: &str, _: u32) -> CloudResult<Vec<Ipv4Net>> {
        none()
    }
    async fn unassign_ips(&self, _: &str, _: &[Ipv4Addr]) -> CloudResult<()> {
        none()
    }
    async fn unassign_prefixes(&self, _: &str, _: &[Ipv4Net]) -> CloudResult<()> {
        none()
    }
}

/// A host whose pod routes the test sets (`None`: they cannot be read); its network
/// setup succeeds.
pub struct LiveHost(pub std::sync::Mutex<Option<Vec<(Ipv4Addr, String)>>>);

impl LiveHost {
    pub fn with(routes: Vec<(Ipv4Addr, String)>) -> Arc<LiveHost> {
        Arc::new(LiveHost(std::sync::Mutex::new(Some(routes))))
    }
}

#[async_trait]
impl HostNetwork for LiveHost {
    async fn setup_node(&self, _: &NodeNet) -> Result<(), String> {
        Ok(())
    }
    async fn setup_eni(&self, _: &EniNet, _: Duration) -> Result<(), String> {
        Ok(())
    }
    async fn teardown_eni(&self, _: &EniNet) -> Result<(), String> {
        Ok(())
    }
    async fn pod_routes(&self) -> Result<Vec<(Ipv4Addr, String)>, String> {
        self.0
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| "netlink: busy".into())
    }
}
