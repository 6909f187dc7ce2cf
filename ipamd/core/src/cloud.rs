//! The cloud edge as two small traits: EC2 (the calls ipamd makes) and instance
//! metadata. The SDK implementations live in the `ipamd` crate; tests may fake them.

use std::net::{Ipv4Addr, Ipv6Addr};

use async_trait::async_trait;

use crate::net::{Ipv4Net, Ipv6Net};
use crate::pool::Limits;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{api}: {code}: {message}")]
pub struct CloudError {
    /// The EC2 (or IMDS) call that failed.
    pub api: String,
    /// EC2's error code, e.g. RequestLimitExceeded; "Transport" when nothing answered.
    pub code: String,
    pub message: String,
}

impl CloudError {
    pub fn new(api: &str, code: &str, message: impl Into<String>) -> Self {
        CloudError {
            api: api.into(),
            code: code.into(),
            message: message.into(),
        }
    }

    pub fn is_throttle(&self) -> bool {
        matches!(
            self.code.as_str(),
            "RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "RequestThrottled"
        )
    }

    /// Worth trying again soon: throttling, EC2-side failures, nothing answering.
    pub fn is_transient(&self) -> bool {
        self.is_throttle()
            || matches!(
                self.code.as_str(),
                "InternalError"
                    | "InternalFailure"
                    | "ServiceUnavailable"
                    | "Unavailable"
                    | "Transport"
            )
    }

    /// The subnet has no room: back off instead of retrying.
    pub fn is_subnet_full(&self) -> bool {
        matches!(
            self.code.as_str(),
            "InsufficientFreeAddressesInSubnet" | "InsufficientCidrBlocks"
        )
    }
}

pub type CloudResult<T> = Result<T, CloudError>;

/// The instance as IMDS describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceMeta {
    pub instance_id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub primary_mac: String,
    pub primary_ip: Ipv4Addr,
}

/// One ENI, from IMDS or from EC2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniInfo {
    pub id: String,
    pub mac: String,
    pub device_number: u32,
    pub subnet_id: String,
    pub subnet_cidr: Ipv4Net,
    pub vpc_id: String,
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub security_groups: Vec<String>,
    pub primary_ip: Ipv4Addr,
    /// Secondary addresses (the primary excluded).
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Net>,
    /// EC2 only: the attachment, for detaching.
    pub attachment_id: Option<String>,
    /// EC2 only: tags ipamd reads (instance id, created-at).
    pub tags: Vec<(String, String)>,
    pub status: String,
    /// The ENI's IPv6 side (empty in an IPv4-only subnet).
    pub ipv6: Eni6,
}

/// An ENI's IPv6 addresses and delegated prefixes, and its subnet's and VPC's blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Eni6 {
    pub addresses: Vec<Ipv6Addr>,
    /// /80 prefixes (prefix delegation).
    pub prefixes: Vec<Ipv6Net>,
    pub subnet_cidr: Option<Ipv6Net>,
    /// IMDS only.
    pub vpc_cidrs: Vec<Ipv6Net>,
}

#[async_trait]
pub trait Imds: Send + Sync {
    async fn instance(&self) -> CloudResult<InstanceMeta>;
    async fn enis(&self) -> CloudResult<Vec<EniInfo>>;
}

/// A subnet as DescribeSubnets shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetInfo {
    pub id: String,
    pub cidr: Ipv4Net,
    pub availability_zone: String,
    pub available_addresses: u32,
}

/// The tag that marks subnets ipamd may put ENIs in (subnet discovery).
pub const CNI_SUBNET_TAG: &str = "kubernetes.io/role/cni";

/// What CreateNetworkInterface needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEni {
    pub subnet_id: String,
    pub security_groups: Vec<String>,
    pub description: String,
    pub tags: Vec<(String, String)>,
    pub secondary_ips: u32,
    pub prefixes: u32,
}

/// The EC2 calls ipamd makes. Every name here is an EC2 action (the IAM policy is
/// derived from this list).
#[async_trait]
pub trait Ec2: Send + Sync {
    /// How long ago EC2 last throttled an ENI lifecycle call (Create/Attach/Detach/Delete
    /// NetworkInterface): the budget knows, a bare client says `None`. Not an EC2 call.
    fn eni_calls_throttled_ago(&self) -> Option<std::time::Duration> {
        None
    }
    /// DescribeInstanceTypes
    async fn instance_type_limits(&self, instance_type: &str) -> CloudResult<Limits>;
    /// DescribeNetworkInterfaces (attachment.instance-id)
    async fn instance_enis(&self, instance_id: &str) -> CloudResult<Vec<EniInfo>>;
    /// DescribeNetworkInterfaces (status available, our instance tag)
    async fn unattached_enis_tagged(
        &self,
        tag_key: &str,
        tag_value: &str,
    ) -> CloudResult<Vec<EniInfo>>;
    /// DescribeSubnets (vpc-id, tag-key kubernetes.io/role/cni)
    async fn cni_subnets(&self, vpc_id: &str) -> CloudResult<Vec<SubnetInfo>>;
    /// DescribeSubnets (subnet-id): custom networking's ENIConfig subnet.
    async fn describe_subnet(&self, subnet_id: &str) -> CloudResult<SubnetInfo>;
    /// CreateNetworkInterface
    async fn create_eni(&self, req: &NewEni) -> CloudResult<EniInfo>;
    /// AttachNetworkInterface; returns the attachment id.
    async fn attach_eni(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
    ) -> CloudResult<String>;
    /// ModifyNetworkInterfaceAttribute (Attachment.DeleteOnTermination = true)
    async fn set_delete_on_termination(&self, eni_id: &str, attachment_id: &str)
    -> CloudResult<()>;
    /// ModifyNetworkInterfaceAttribute (Groups): the ENI's security groups.
    async fn set_security_groups(&self, eni_id: &str, groups: &[String]) -> CloudResult<()>;
    /// CreateTags on one ENI (adds or overwrites these tags, keeps the others)
    async fn create_tags(&self, eni_id: &str, tags: &[(String, String)]) -> CloudResult<()>;
    /// DetachNetworkInterface
    async fn detach_eni(&self, attachment_id: &str) -> CloudResult<()>;
    /// DeleteNetworkInterface
    async fn delete_eni(&self, eni_id: &str) -> CloudResult<()>;
    /// AssignPrivateIpAddresses (SecondaryPrivateIpAddressCount); returns only the new ones.
    async fn assign_ips(&self, eni_id: &str, count: u32) -> CloudResult<Vec<Ipv4Addr>>;
    /// AssignPrivateIpAddresses (Ipv4PrefixCount)
    async fn assign_prefixes(&self, eni_id: &str, count: u32) -> CloudResult<Vec<Ipv4Net>>;
    /// UnassignPrivateIpAddresses (PrivateIpAddresses)
    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> CloudResult<()>;
    /// UnassignPrivateIpAddresses (Ipv4Prefixes)
    async fn unassign_prefixes(&self, eni_id: &str, prefixes: &[Ipv4Net]) -> CloudResult<()>;
    /// AssignIpv6Addresses (Ipv6PrefixCount): IPv6 mode's /80 on the primary ENI. The
    /// default refuses, for clients of an IPv4-only world (the simulator).
    async fn assign_ipv6_prefixes(&self, eni_id: &str, count: u32) -> CloudResult<Vec<Ipv6Net>> {
        let _ = (eni_id, count);
        Err(CloudError::new(
            "AssignIpv6Addresses",
            "Unsupported",
            "this EC2 client has no IPv6",
        ))
    }
}
