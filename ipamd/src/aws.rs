//! The SDK side of the cloud edge: `Ec2` with aws-sdk-ec2 and `Imds` with aws-config's
//! IMDS client. The standard AWS environment decides where they go (region, credential
//! chain, AWS_ENDPOINT_URL_EC2 or upstream's AWS_EC2_ENDPOINT, the IMDS endpoint), so
//! the same binary runs against real AWS and the emulator. SDK retries are off: the
//! budget layer (ipamd-core) paces and retries, and counts every call.

use std::net::Ipv4Addr;
use std::str::FromStr;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    Filter, InstanceType, NetworkInterface, NetworkInterfaceAttachmentChanges, ResourceType, Tag,
    TagSpecification,
};
use ipamd_core::cloud::{
    CNI_SUBNET_TAG, CloudError, CloudResult, Ec2, Eni6, EniInfo, Imds, InstanceMeta, NewEni,
    SubnetInfo,
};
use ipamd_core::net::{Ipv4Net, Ipv6Net, parse_cidr, parse_cidr6};
use ipamd_core::pool::Limits;

pub fn http_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

fn err<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    api: &str,
    e: aws_sdk_ec2::error::SdkError<E>,
) -> CloudError {
    match e.code() {
        Some(code) => CloudError::new(api, code, e.message().unwrap_or_default()),
        None => CloudError::new(
            api,
            "Transport",
            format!("{}", aws_sdk_ec2::error::DisplayErrorContext(&e)),
        ),
    }
}

pub struct SdkEc2 {
    client: aws_sdk_ec2::Client,
    /// Subnet CIDRs seen (DescribeNetworkInterfaces does not return them).
    subnet_cidrs: std::sync::Mutex<std::collections::HashMap<String, Ipv4Net>>,
}

impl SdkEc2 {
    pub async fn from_env(ec2_endpoint: Option<&str>) -> SdkEc2 {
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client())
            .retry_config(RetryConfig::disabled())
            .load()
            .await;
        let mut b = aws_sdk_ec2::config::Builder::from(&conf);
        if let Some(url) = ec2_endpoint {
            b = b.endpoint_url(url);
        }
        SdkEc2 {
            client: aws_sdk_ec2::Client::from_conf(b.build()),
            subnet_cidrs: Default::default(),
        }
    }

    /// A client from an SDK configuration made elsewhere (tests: the emulator's).
    pub fn from_config(conf: &aws_config::SdkConfig) -> SdkEc2 {
        SdkEc2 {
            client: aws_sdk_ec2::Client::new(conf),
            subnet_cidrs: Default::default(),
        }
    }

    pub fn with_primary_subnet(self, id: String, cidr: Ipv4Net) -> Self {
        self.subnet_cidrs.lock().unwrap().insert(id, cidr);
        self
    }

    fn info(&self, n: &NetworkInterface) -> EniInfo {
        let subnet_id = n.subnet_id().unwrap_or_default().to_string();
        let subnet_cidr = self
            .subnet_cidrs
            .lock()
            .unwrap()
            .get(&subnet_id)
            .copied()
            .unwrap_or(Ipv4Net {
                addr: Ipv4Addr::UNSPECIFIED,
                len: 0,
            });
        let primary: Ipv4Addr = n
            .private_ip_address()
            .and_then(|s| s.parse().ok())
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        EniInfo {
            id: n.network_interface_id().unwrap_or_default().to_string(),
            mac: n.mac_address().unwrap_or_default().to_string(),
            device_number: n
                .attachment()
                .and_then(|a| a.device_index())
                .unwrap_or(0)
                .max(0) as u32,
            subnet_id,
            subnet_cidr,
            vpc_id: n.vpc_id().unwrap_or_default().to_string(),
            vpc_cidrs: vec![],
            security_groups: n
                .groups()
                .iter()
                .filter_map(|g| g.group_id().map(str::to_string))
                .collect(),
            primary_ip: primary,
            secondary_ips: n
                .private_ip_addresses()
                .iter()
                .filter(|a| !a.primary().unwrap_or(false))
                .filter_map(|a| a.private_ip_address()?.parse().ok())
                .collect(),
            prefixes: n
                .ipv4_prefixes()
                .iter()
                .filter_map(|p| parse_cidr(p.ipv4_prefix()?))
                .collect(),
            attachment_id: n
                .attachment()
                .and_then(|a| a.attachment_id())
                .map(str::to_string),
            tags: n
                .tag_set()
                .iter()
                .filter_map(|t| {
                    Some((
                        t.key()?.to_string(),
                        t.value().unwrap_or_default().to_string(),
                    ))
                })
                .collect(),
            status: n
                .status()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            ipv6: Eni6 {
                addresses: n
                    .ipv6_addresses()
                    .iter()
                    .filter_map(|a| a.ipv6_address()?.parse().ok())
                    .collect(),
                prefixes: n
                    .ipv6_prefixes()
                    .iter()
                    .filter_map(|p| parse_cidr6(p.ipv6_prefix()?))
                    .collect(),
                subnet_cidr: None,
                vpc_cidrs: vec![],
            },
        }
    }

    async fn describe(&self, filters: Vec<Filter>) -> CloudResult<Vec<EniInfo>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let r = self
                .client
                .describe_network_interfaces()
                .set_filters(Some(filters.clone()))
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| err("DescribeNetworkInterfaces", e))?;
            out.extend(r.network_interfaces().iter().map(|n| self.info(n)));
            match r.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

/// A subnet as DescribeSubnets answers it (`None` without an id or a CIDR).
fn subnet_info(s: &aws_sdk_ec2::types::Subnet) -> Option<SubnetInfo> {
    Some(SubnetInfo {
        id: s.subnet_id()?.to_string(),
        cidr: parse_cidr(s.cidr_block()?)?,
        availability_zone: s.availability_zone().unwrap_or_default().to_string(),
        available_addresses: s.available_ip_address_count().unwrap_or(0).max(0) as u32,
    })
}

#[async_trait]
impl Ec2 for SdkEc2 {
    async fn instance_type_limits(&self, t: &str) -> CloudResult<Limits> {
        let r = self
            .client
            .describe_instance_types()
            .instance_types(InstanceType::from_str(t).unwrap_or_else(|_| InstanceType::from(t)))
            .send()
            .await
            .map_err(|e| err("DescribeInstanceTypes", e))?;
        let info = r
            .instance_types()
            .first()
            .and_then(|i| i.network_info())
            .ok_or_else(|| {
                CloudError::new(
                    "DescribeInstanceTypes",
                    "NotFound",
                    format!("no network info for {t}"),
                )
            })?;
        Ok(Limits {
            max_enis: info.maximum_network_interfaces().unwrap_or(1).max(1) as u32,
            ipv4_per_eni: info.ipv4_addresses_per_interface().unwrap_or(1).max(1) as u32,
        })
    }

    async fn instance_enis(&self, instance_id: &str) -> CloudResult<Vec<EniInfo>> {
        self.describe(vec![filter("attachment.instance-id", instance_id)])
            .await
    }

    async fn unattached_enis_tagged(&self, key: &str, value: &str) -> CloudResult<Vec<EniInfo>> {
        self.describe(vec![
            filter("status", "available"),
            filter(&format!("tag:{key}"), value),
        ])
        .await
    }

    async fn cni_subnets(&self, vpc_id: &str) -> CloudResult<Vec<SubnetInfo>> {
        let r = self
            .client
            .describe_subnets()
            .filters(filter("vpc-id", vpc_id))
            .filters(filter("tag-key", CNI_SUBNET_TAG))
            .send()
            .await
            .map_err(|e| err("DescribeSubnets", e))?;
        let subnets: Vec<SubnetInfo> = r.subnets().iter().filter_map(subnet_info).collect();
        let mut known = self.subnet_cidrs.lock().unwrap();
        for s in &subnets {
            known.insert(s.id.clone(), s.cidr);
        }
        Ok(subnets)
    }

    async fn describe_subnet(&self, id: &str) -> CloudResult<SubnetInfo> {
        let r = self
            .client
            .describe_subnets()
            .subnet_ids(id)
            .send()
            .await
            .map_err(|e| err("DescribeSubnets", e))?;
        let s = r
            .subnets()
            .iter()
            .find(|s| s.subnet_id() == Some(id))
            .and_then(subnet_info)
            .ok_or_else(|| {
                CloudError::new(
                    "DescribeSubnets",
                    "InvalidSubnetID.NotFound",
                    format!("no subnet {id} in the answer"),
                )
            })?;
        self.subnet_cidrs
            .lock()
            .unwrap()
            .insert(s.id.clone(), s.cidr);
        Ok(s)
    }

    async fn create_eni(&self, req: &NewEni) -> CloudResult<EniInfo> {
        let tags: Vec<Tag> = req
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let mut b = self
            .client
            .create_network_interface()
            .subnet_id(&req.subnet_id)
            .set_groups(Some(req.security_groups.clone()).filter(|g| !g.is_empty()))
            .description(&req.description)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::NetworkInterface)
                    .set_tags(Some(tags))
                    .build(),
            );
        if req.secondary_ips > 0 {
            b = b.secondary_private_ip_address_count(req.secondary_ips as i32);
        }
        if req.prefixes > 0 {
            b = b.ipv4_prefix_count(req.prefixes as i32);
        }
        let r = b
            .send()
            .await
            .map_err(|e| err("CreateNetworkInterface", e))?;
        let n = r.network_interface().ok_or_else(|| {
            CloudError::new(
                "CreateNetworkInterface",
                "Empty",
                "no interface in the answer",
            )
        })?;
        Ok(self.info(n))
    }

    async fn attach_eni(&self, eni: &str, instance: &str, device: u32) -> CloudResult<String> {
        let r = self
            .client
            .attach_network_interface()
            .network_interface_id(eni)
            .instance_id(instance)
            .device_index(device as i32)
            .send()
            .await
            .map_err(|e| err("AttachNetworkInterface", e))?;
        Ok(r.attachment_id().unwrap_or_default().to_string())
    }

    async fn set_delete_on_termination(&self, eni: &str, attachment: &str) -> CloudResult<()> {
        self.client
            .modify_network_interface_attribute()
            .network_interface_id(eni)
            .attachment(
                NetworkInterfaceAttachmentChanges::builder()
                    .attachment_id(attachment)
                    .delete_on_termination(true)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| err("ModifyNetworkInterfaceAttribute", e))?;
        Ok(())
    }

    async fn set_security_groups(&self, eni: &str, groups: &[String]) -> CloudResult<()> {
        self.client
            .modify_network_interface_attribute()
            .network_interface_id(eni)
            .set_groups(Some(groups.to_vec()))
            .send()
            .await
            .map_err(|e| err("ModifyNetworkInterfaceAttribute", e))?;
        Ok(())
    }

    async fn create_tags(&self, eni: &str, tags: &[(String, String)]) -> CloudResult<()> {
        self.client
            .create_tags()
            .resources(eni)
            .set_tags(Some(
                tags.iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .send()
            .await
            .map_err(|e| err("CreateTags", e))?;
        Ok(())
    }

    async fn detach_eni(&self, attachment: &str) -> CloudResult<()> {
        self.client
            .detach_network_interface()
            .attachment_id(attachment)
            .send()
            .await
            .map_err(|e| err("DetachNetworkInterface", e))?;
        Ok(())
    }

    async fn delete_eni(&self, eni: &str) -> CloudResult<()> {
        self.client
            .delete_network_interface()
            .network_interface_id(eni)
            .send()
            .await
            .map_err(|e| err("DeleteNetworkInterface", e))?;
        Ok(())
    }

    async fn assign_ips(&self, eni: &str, count: u32) -> CloudResult<Vec<Ipv4Addr>> {
        let r = self
            .client
            .assign_private_ip_addresses()
            .network_interface_id(eni)
            .secondary_private_ip_address_count(count as i32)
            .send()
            .await
            .map_err(|e| err("AssignPrivateIpAddresses", e))?;
        Ok(r.assigned_private_ip_addresses()
            .iter()
            .filter_map(|a| a.private_ip_address()?.parse().ok())
            .collect())
    }

    async fn assign_prefixes(&self, eni: &str, count: u32) -> CloudResult<Vec<Ipv4Net>> {
        let r = self
            .client
            .assign_private_ip_addresses()
            .network_interface_id(eni)
            .ipv4_prefix_count(count as i32)
            .send()
            .await
            .map_err(|e| err("AssignPrivateIpAddresses", e))?;
        Ok(r.assigned_ipv4_prefixes()
            .iter()
            .filter_map(|p| parse_cidr(p.ipv4_prefix()?))
            .collect())
    }

    async fn unassign_ips(&self, eni: &str, ips: &[Ipv4Addr]) -> CloudResult<()> {
        self.client
            .unassign_private_ip_addresses()
            .network_interface_id(eni)
            .set_private_ip_addresses(Some(ips.iter().map(|i| i.to_string()).collect()))
            .send()
            .await
            .map_err(|e| err("UnassignPrivateIpAddresses", e))?;
        Ok(())
    }

    async fn unassign_prefixes(&self, eni: &str, prefixes: &[Ipv4Net]) -> CloudResult<()> {
        self.client
            .unassign_private_ip_addresses()
            .network_interface_id(eni)
            .set_ipv4_prefixes(Some(prefixes.iter().map(|p| p.to_string()).collect()))
            .send()
            .await
            .map_err(|e| err("UnassignPrivateIpAddresses", e))?;
        Ok(())
    }

    async fn assign_ipv6_prefixes(&self, eni: &str, count: u32) -> CloudResult<Vec<Ipv6Net>> {
        let r = self
            .client
            .assign_ipv6_addresses()
            .network_interface_id(eni)
            .ipv6_prefix_count(count as i32)
            .send()
            .await
            .map_err(|e| err("AssignIpv6Addresses", e))?;
        Ok(r.assigned_ipv6_prefixes()
            .iter()
            .filter_map(|p| parse_cidr6(p))
            .collect())
    }
}

pub struct SdkImds {
    client: aws_config::imds::Client,
    /// Read each ENI's IPv6 keys too (IPv6 mode; an IPv4 node does not ask for them).
    ipv6: bool,
}

impl SdkImds {
    /// Honours AWS_EC2_METADATA_SERVICE_ENDPOINT (and the rest of the standard settings).
    pub fn from_env() -> SdkImds {
        let pc =
            aws_config::provider_config::ProviderConfig::default().with_http_client(http_client());
        SdkImds {
            client: aws_config::imds::Client::builder().configure(&pc).build(),
            ipv6: false,
        }
    }

    /// IMDS at this endpoint (tests: the emulator's).
    pub fn at(endpoint: &str) -> Result<SdkImds, String> {
        let pc =
            aws_config::provider_config::ProviderConfig::default().with_http_client(http_client());
        Ok(SdkImds {
            client: aws_config::imds::Client::builder()
                .configure(&pc)
                .endpoint(endpoint)
                .map_err(|e| format!("IMDS endpoint {endpoint:?}: {e}"))?
                .build(),
            ipv6: false,
        })
    }

    pub fn with_ipv6(mut self, on: bool) -> SdkImds {
        self.ipv6 = on;
        self
    }

    async fn get_v6(&self, path: String) -> CloudResult<Option<String>> {
        if self.ipv6 {
            self.get_opt(path).await
        } else {
            Ok(None)
        }
    }

    async fn get(&self, path: String) -> CloudResult<String> {
        self.client
            .get(&path)
            .await
            .map(String::from)
            .map_err(|e| CloudError::new("IMDS", "ImdsError", format!("{path}: {e}")))
    }

    async fn get_opt(&self, path: String) -> CloudResult<Option<String>> {
        use aws_config::imds::client::error::ImdsError;
        match self.client.get(&path).await {
            Ok(v) => Ok(Some(String::from(v))),
            Err(ImdsError::ErrorResponse(r)) if r.response().status().as_u16() == 404 => Ok(None),
            Err(e) => Err(CloudError::new("IMDS", "ImdsError", format!("{path}: {e}"))),
        }
    }
}

impl SdkImds {
    async fn eni(&self, base: &str, mac: &str) -> CloudResult<EniInfo> {
        let p = |k: &str| format!("{base}/{mac}/{k}");
        let bad = |what: &str| CloudError::new("IMDS", "BadValue", format!("{mac}: bad {what}"));
        let (v6, v6_prefixes, subnet6, vpc6) = futures::try_join!(
            self.get_v6(p("ipv6s")),
            self.get_v6(p("ipv6-prefix")),
            self.get_v6(p("subnet-ipv6-cidr-blocks")),
            self.get_v6(p("vpc-ipv6-cidr-blocks")),
        )?;
        let (ips, id, dev, subnet, cidr, vpc, sgs, prefixes, vpc_id) = futures::try_join!(
            self.get(p("local-ipv4s")),
            self.get(p("interface-id")),
            self.get(p("device-number")),
            self.get(p("subnet-id")),
            self.get(p("subnet-ipv4-cidr-block")),
            self.get(p("vpc-ipv4-cidr-blocks")),
            self.get_opt(p("security-group-ids")),
            self.get_opt(p("ipv4-prefix")),
            self.get(p("vpc-id")),
        )?;
        let ips: Vec<Ipv4Addr> = lines(&ips).filter_map(|l| l.parse().ok()).collect();
        let primary = *ips.first().ok_or_else(|| bad("local-ipv4s"))?;
        Ok(EniInfo {
            id: id.trim().to_string(),
            mac: mac.to_string(),
            device_number: dev.trim().parse().map_err(|_| bad("device-number"))?,
            subnet_id: subnet.trim().to_string(),
            subnet_cidr: parse_cidr(&cidr).ok_or_else(|| bad("subnet-ipv4-cidr-block"))?,
            vpc_id: vpc_id.trim().to_string(),
            vpc_cidrs: lines(&vpc).filter_map(parse_cidr).collect(),
            security_groups: lines(&sgs.unwrap_or_default())
                .map(str::to_string)
                .collect(),
            primary_ip: primary,
            secondary_ips: ips[1..].to_vec(),
            prefixes: lines(&prefixes.unwrap_or_default())
                .filter_map(parse_cidr)
                .collect(),
            attachment_id: None,
            tags: vec![],
            status: "in-use".into(),
            ipv6: Eni6 {
                addresses: lines(&v6.unwrap_or_default())
                    .filter_map(|l| l.parse().ok())
                    .collect(),
                prefixes: lines(&v6_prefixes.unwrap_or_default())
                    .filter_map(parse_cidr6)
                    .collect(),
                subnet_cidr: lines(&subnet6.unwrap_or_default()).find_map(parse_cidr6),
                vpc_cidrs: lines(&vpc6.unwrap_or_default())
                    .filter_map(parse_cidr6)
                    .collect(),
            },
        })
    }
}

/// The EC2 client, made once the instance is known: its region (without AWS_REGION) and
/// its primary subnet come from IMDS, which may not answer at start-up. Nothing calls EC2
/// before (the pool loop starts after the instance is known); a call then fails, saying so.
#[derive(Default)]
pub struct LateEc2 {
    sdk: std::sync::OnceLock<SdkEc2>,
}

impl LateEc2 {
    pub fn install(&self, client: SdkEc2) {
        let _ = self.sdk.set(client);
    }

    fn get(&self) -> CloudResult<&SdkEc2> {
        self.sdk.get().ok_or_else(|| {
            CloudError::new(
                "ipamd",
                "InstanceNotKnown",
                "no EC2 client before the instance metadata has been read",
            )
        })
    }
}

#[async_trait]
impl Ec2 for LateEc2 {
    async fn instance_type_limits(&self, t: &str) -> CloudResult<Limits> {
        self.get()?.instance_type_limits(t).await
    }
    async fn instance_enis(&self, id: &str) -> CloudResult<Vec<EniInfo>> {
        self.get()?.instance_enis(id).await
    }
    async fn unattached_enis_tagged(&self, k: &str, v: &str) -> CloudResult<Vec<EniInfo>> {
        self.get()?.unattached_enis_tagged(k, v).await
    }
    async fn cni_subnets(&self, vpc: &str) -> CloudResult<Vec<SubnetInfo>> {
        self.get()?.cni_subnets(vpc).await
    }
    async fn describe_subnet(&self, id: &str) -> CloudResult<SubnetInfo> {
        self.get()?.describe_subnet(id).await
    }
    async fn create_eni(&self, req: &NewEni) -> CloudResult<EniInfo> {
        self.get()?.create_eni(req).await
    }
    async fn attach_eni(&self, eni: &str, instance: &str, device: u32) -> CloudResult<String> {
        self.get()?.attach_eni(eni, instance, device).await
    }
    async fn set_delete_on_termination(&self, eni: &str, attachment: &str) -> CloudResult<()> {
        self.get()?.set_delete_on_termination(eni, attachment).await
    }
    async fn set_security_groups(&self, eni: &str, groups: &[String]) -> CloudResult<()> {
        self.get()?.set_security_groups(eni, groups).await
    }
    async fn create_tags(&self, eni: &str, tags: &[(String, String)]) -> CloudResult<()> {
        self.get()?.create_tags(eni, tags).await
    }
    async fn detach_eni(&self, attachment: &str) -> CloudResult<()> {
        self.get()?.detach_eni(attachment).await
    }
    async fn delete_eni(&self, eni: &str) -> CloudResult<()> {
        self.get()?.delete_eni(eni).await
    }
    async fn assign_ips(&self, eni: &str, count: u32) -> CloudResult<Vec<Ipv4Addr>> {
        self.get()?.assign_ips(eni, count).await
    }
    async fn assign_prefixes(&self, eni: &str, count: u32) -> CloudResult<Vec<Ipv4Net>> {
        self.get()?.assign_prefixes(eni, count).await
    }
    async fn unassign_ips(&self, eni: &str, ips: &[Ipv4Addr]) -> CloudResult<()> {
        self.get()?.unassign_ips(eni, ips).await
    }
    async fn unassign_prefixes(&self, eni: &str, prefixes: &[Ipv4Net]) -> CloudResult<()> {
        self.get()?.unassign_prefixes(eni, prefixes).await
    }
    async fn assign_ipv6_prefixes(&self, eni: &str, count: u32) -> CloudResult<Vec<Ipv6Net>> {
        self.get()?.assign_ipv6_prefixes(eni, count).await
    }
}

fn lines(s: &str) -> impl Iterator<Item = &str> {
    s.lines().map(str::trim).filter(|l| !l.is_empty())
}

#[async_trait]
impl Imds for SdkImds {
    async fn instance(&self) -> CloudResult<InstanceMeta> {
        let m = "/latest/meta-data";
        // Independent reads: ask for them all at once.
        let (id, itype, az, mac, ip) = futures::try_join!(
            self.get(format!("{m}/instance-id")),
            self.get(format!("{m}/instance-type")),
            self.get(format!("{m}/placement/availability-zone")),
            self.get(format!("{m}/mac")),
            self.get(format!("{m}/local-ipv4")),
        )?;
        Ok(InstanceMeta {
            instance_id: id,
            instance_type: itype,
            availability_zone: az,
            primary_mac: mac,
            primary_ip: ip.trim().parse().map_err(|_| {
                CloudError::new("IMDS", "BadValue", "local-ipv4 is not an IPv4 address")
            })?,
        })
    }

    async fn enis(&self) -> CloudResult<Vec<EniInfo>> {
        let base = "/latest/meta-data/network/interfaces/macs";
        let macs = self.get(format!("{base}/")).await?;
        let macs: Vec<&str> = lines(&macs).map(|m| m.trim_end_matches('/')).collect();
        let mut out =
            futures::future::try_join_all(macs.iter().map(|mac| self.eni(base, mac))).await?;
        out.sort_by_key(|e| e.device_number);
        Ok(out)
    }
}
