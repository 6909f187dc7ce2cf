//! ipamd's IPv6 cloud edge (the SDK clients of ipamd/src/aws.rs) against the real
//! emulator process, seeded dual-stack: what IPv6 mode reads from IMDS and asks EC2.

use ec2_emulator_sdk_check::{Emulator, sdk_config};
use ipamd::aws::{SdkEc2, SdkImds};
use ipamd_core::budget::{BudgetConfig, Budgeted};
use ipamd_core::cloud::{Ec2, Imds};

#[tokio::test]
async fn the_primary_enis_80_from_ec2_then_from_imds() {
    let emu = Emulator::start();
    let ids = emu.seed(&["--ipv6"]);
    let imds = SdkImds::at(&emu.endpoint).unwrap().with_ipv6(true);
    let ec2 = Budgeted::new(
        SdkEc2::from_config(&sdk_config(&emu.endpoint, "us-west-2").await),
        BudgetConfig::default(),
    );
    let enis = imds.enis().await.unwrap();
    let primary = &enis[0];
    let v6 = &primary.ipv6;
    let subnet = v6.subnet_cidr.expect("the subnet's /64 from IMDS");
    assert_eq!(subnet.len, 64);
    assert_eq!(v6.vpc_cidrs.len(), 1);
    assert_eq!(v6.vpc_cidrs[0].len, 56);
    assert!(v6.vpc_cidrs[0].contains(subnet.addr));
    assert_eq!(v6.addresses.len(), 1, "the node's own address");
    assert!(subnet.contains(v6.addresses[0]));
    assert!(v6.prefixes.is_empty(), "no prefix before ipamd asks");

    let got = ec2.assign_ipv6_prefixes(&primary.id, 1).await.unwrap();
    assert_eq!(got.len(), 1);
    let p = got[0];
    assert_eq!(p.len, 80);
    assert!(subnet.contains(p.addr) && !p.contains(v6.addresses[0]));
    // Both sides now show it: IMDS per MAC, EC2's describe of the instance's ENIs.
    let again = imds.enis().await.unwrap();
    assert_eq!(again[0].ipv6.prefixes, vec![p]);
    let described = ec2.instance_enis(&ids[0]).await.unwrap();
    let d = described.iter().find(|e| e.id == primary.id).unwrap();
    assert_eq!(d.ipv6.prefixes, vec![p]);
    assert_eq!(d.ipv6.addresses, v6.addresses);
    assert_eq!(ec2.stats().calls.get("AssignIpv6Addresses"), Some(&1));
}

#[tokio::test]
async fn an_ipv4_node_reads_no_ipv6_keys_and_a_v4_subnet_refuses_a_prefix() {
    let emu = Emulator::start();
    emu.seed(&[]);
    let enis = SdkImds::at(&emu.endpoint).unwrap().enis().await.unwrap();
    assert_eq!(enis[0].ipv6, Default::default());
    let ec2 = SdkEc2::from_config(&sdk_config(&emu.endpoint, "us-west-2").await);
    let e = ec2.assign_ipv6_prefixes(&enis[0].id, 1).await.unwrap_err();
    assert_eq!(e.api, "AssignIpv6Addresses");
    assert_eq!(e.code, "InvalidParameterValue", "{e}");
    assert!(e.message.contains("has no IPv6"), "{e}");
}
