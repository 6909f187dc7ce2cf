//! The emulator as ipamd's own clients see it: aws-sdk-ec2 parses its errors (codes and
//! HTTP statuses), retries through injected throttling, and aws-config's IMDS client
//! reads the instance's metadata with the IMDSv2 token flow.

use aws_config::retry::RetryConfig;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use ec2_emulator_sdk_check::{Emulator, sdk_config};

fn ec2(conf: &aws_config::SdkConfig, retry: RetryConfig) -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::from(conf)
            .retry_config(retry)
            .build(),
    )
}

#[tokio::test]
async fn injected_throttling_is_seen_and_retried_by_aws_sdk_ec2() {
    let emu = Emulator::start();
    let conf = sdk_config(&emu.endpoint, "us-west-2").await;
    emu.control(
        "POST",
        "/_emulator/faults",
        r#"{"action":"DescribeInstanceTypes","code":"RequestLimitExceeded","count":1}"#,
    );
    let no_retry = ec2(&conf, RetryConfig::disabled());
    let err = no_retry
        .describe_instance_types()
        .instance_types(aws_sdk_ec2::types::InstanceType::M5Large)
        .send()
        .await
        .expect_err("injected fault");
    assert_eq!(err.code(), Some("RequestLimitExceeded"));
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(503));

    emu.control("DELETE", "/_emulator/calls", "");
    emu.control(
        "POST",
        "/_emulator/faults",
        r#"{"action":"DescribeInstanceTypes","code":"RequestLimitExceeded","count":2}"#,
    );
    let retrying = ec2(&conf, RetryConfig::standard().with_max_attempts(3));
    let ok = retrying
        .describe_instance_types()
        .instance_types(aws_sdk_ec2::types::InstanceType::M5Large)
        .send()
        .await
        .expect("succeeds on the third attempt");
    let info = ok.instance_types()[0].network_info().unwrap();
    assert_eq!(
        (
            info.maximum_network_interfaces(),
            info.ipv4_addresses_per_interface()
        ),
        (Some(3), Some(10))
    );
    let calls = emu.control("GET", "/_emulator/calls", "");
    assert!(calls.contains("\"DescribeInstanceTypes\": 3"), "{calls}");
}

#[tokio::test]
async fn limit_errors_carry_ec2_codes() {
    let emu = Emulator::start();
    let ids = emu.seed(&["--type", "m5.large"]);
    let conf = sdk_config(&emu.endpoint, "us-west-2").await;
    let c = ec2(&conf, RetryConfig::disabled());
    let inst = c
        .describe_instances()
        .instance_ids(&ids[0])
        .send()
        .await
        .unwrap();
    let primary = inst.reservations()[0].instances()[0].network_interfaces()[0]
        .network_interface_id()
        .unwrap()
        .to_string();
    let r = c
        .assign_private_ip_addresses()
        .network_interface_id(&primary)
        .secondary_private_ip_address_count(9)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.assigned_private_ip_addresses().len(),
        9,
        "only the new addresses"
    );
    let err = c
        .assign_private_ip_addresses()
        .network_interface_id(&primary)
        .secondary_private_ip_address_count(1)
        .send()
        .await
        .expect_err("m5.large holds 10 addresses per ENI");
    assert_eq!(err.code(), Some("PrivateIpAddressLimitExceeded"));
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(400));
}

#[tokio::test]
async fn imds_through_aws_config() {
    let emu = Emulator::start();
    let ids = emu.seed(&["--type", "t3.medium"]);
    let imds = ec2_emulator_sdk_check::imds_client(&emu.endpoint);
    let id: String = imds
        .get("/latest/meta-data/instance-id")
        .await
        .unwrap()
        .into();
    assert_eq!(id, ids[0]);
    let itype: String = imds
        .get("/latest/meta-data/instance-type")
        .await
        .unwrap()
        .into();
    assert_eq!(itype, "t3.medium");
    let mac: String = imds.get("/latest/meta-data/mac").await.unwrap().into();
    let eni: String = imds
        .get(&format!(
            "/latest/meta-data/network/interfaces/macs/{mac}/interface-id"
        ))
        .await
        .unwrap()
        .into();
    let conf = sdk_config(&emu.endpoint, "us-west-2").await;
    let d = ec2(&conf, RetryConfig::disabled())
        .describe_network_interfaces()
        .network_interface_ids(&eni)
        .send()
        .await
        .unwrap();
    let ni = &d.network_interfaces()[0];
    assert_eq!(ni.mac_address(), Some(mac.as_str()));
    let ips: String = imds
        .get(&format!(
            "/latest/meta-data/network/interfaces/macs/{mac}/local-ipv4s"
        ))
        .await
        .unwrap()
        .into();
    assert_eq!(ips.lines().next(), ni.private_ip_address());
}
