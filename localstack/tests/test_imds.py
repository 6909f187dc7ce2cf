"""Instance metadata: the IMDSv2 token flow, answers derived from EC2 state that match
DescribeNetworkInterfaces, and the optional lag of the real IMDS."""

import time
import urllib.error

import pytest
from test_limits import describe, vpc_prefix


def point_imds(emulator, instance_id, delay=0.0):
    emulator.control("/_emulator/imds", "POST", {"instance_id": instance_id, "delay_seconds": delay})


@pytest.fixture
def node(vpc, emulator):
    sub = vpc.subnet(f"{vpc_prefix(vpc)}.8.0/24")
    inst = vpc.instance(sub, "m5.large")
    point_imds(emulator, inst["InstanceId"])
    yield vpc, sub, inst
    point_imds(emulator, inst["InstanceId"], 0.0)


def test_token_response_echoes_its_ttl(emulator):
    import urllib.request

    req = urllib.request.Request(
        emulator.endpoint + "/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "120"}
    )
    with urllib.request.urlopen(req) as r:
        assert r.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "120"
    bad = urllib.request.Request(emulator.endpoint + "/latest/api/token", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad)
    assert e.value.code == 400


def test_token_is_required(node, emulator):
    assert emulator.imds("/latest/meta-data/instance-id", token=False)[0] == 401
    status, body = emulator.imds("/latest/meta-data/instance-id")
    assert (status, body) == (200, node[2]["InstanceId"])


def test_top_level_answers(node, emulator):
    _, sub, inst = node
    eni = inst["NetworkInterfaces"][0]
    assert emulator.imds("/latest/meta-data/instance-type")[1] == "m5.large"
    assert emulator.imds("/latest/meta-data/placement/availability-zone")[1] == "us-west-2a"
    assert emulator.imds("/latest/meta-data/mac")[1] == eni["MacAddress"]
    assert emulator.imds("/latest/meta-data/local-ipv4")[1] == eni["PrivateIpAddress"]
    doc = emulator.imds("/latest/dynamic/instance-identity/document")[1]
    assert '"region": "us-west-2"' in doc


def test_interfaces_match_describe_network_interfaces(node, emulator):
    vpc, sub, inst = node
    ec2 = vpc.ec2
    iid = inst["InstanceId"]
    primary = inst["NetworkInterfaces"][0]["NetworkInterfaceId"]
    ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, SecondaryPrivateIpAddressCount=3)
    second = vpc.eni(sub, SecondaryPrivateIpAddressCount=2)["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=second, InstanceId=iid, DeviceIndex=1)
    ec2.assign_private_ip_addresses(NetworkInterfaceId=second, Ipv4PrefixCount=1)

    status, macs = emulator.imds("/latest/meta-data/network/interfaces/macs/")
    assert status == 200
    macs = [m.rstrip("/") for m in macs.split("\n")]
    assert len(macs) == 2
    for eni_id in (primary, second):
        d = describe(ec2, eni_id)
        base = f"/latest/meta-data/network/interfaces/macs/{d['MacAddress']}/"
        assert d["MacAddress"] in macs
        get = lambda k: emulator.imds(base + k)[1]  # noqa: E731
        assert get("interface-id") == eni_id
        assert get("device-number") == str(d["Attachment"]["DeviceIndex"])
        assert get("subnet-id") == sub
        assert get("subnet-ipv4-cidr-block") == f"{vpc_prefix(vpc)}.8.0/24"
        assert get("vpc-ipv4-cidr-blocks") == f"{vpc_prefix(vpc)}.0.0/16"
        ips = get("local-ipv4s").split("\n")
        assert ips[0] == d["PrivateIpAddress"], "primary first"
        assert sorted(ips) == sorted(a["PrivateIpAddress"] for a in d["PrivateIpAddresses"])
        prefixes = [p["Ipv4Prefix"] for p in d.get("Ipv4Prefixes", [])]
        status, body = emulator.imds(base + "ipv4-prefix")
        if prefixes:
            assert body.split("\n") == prefixes
        else:
            assert status == 404
    assert "device-number" in emulator.imds(f"/latest/meta-data/network/interfaces/macs/{macs[0]}/")[1]


def test_eventual_consistency_delay(node, emulator):
    vpc, sub, inst = node
    point_imds(emulator, inst["InstanceId"], delay=1.0)
    primary = inst["NetworkInterfaces"][0]
    r = vpc.ec2.assign_private_ip_addresses(
        NetworkInterfaceId=primary["NetworkInterfaceId"], SecondaryPrivateIpAddressCount=1
    )
    new = r["AssignedPrivateIpAddresses"][0]["PrivateIpAddress"]
    path = f"/latest/meta-data/network/interfaces/macs/{primary['MacAddress']}/local-ipv4s"
    assert new not in emulator.imds(path)[1].split("\n"), "not visible at once"
    eni = vpc.eni(sub)["NetworkInterfaceId"]
    vpc.ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=inst["InstanceId"], DeviceIndex=1)
    assert len(emulator.imds("/latest/meta-data/network/interfaces/macs/")[1].split("\n")) == 1
    time.sleep(1.2)
    assert new in emulator.imds(path)[1].split("\n")
    assert len(emulator.imds("/latest/meta-data/network/interfaces/macs/")[1].split("\n")) == 2


def test_instance_profile_credentials(node, emulator):
    import json

    status, role = emulator.imds("/latest/meta-data/iam/security-credentials/")
    assert status == 200 and role.strip() == "eks-node-role"
    status, body = emulator.imds(f"/latest/meta-data/iam/security-credentials/{role.strip()}")
    c = json.loads(body)
    assert c["Code"] == "Success" and c["AccessKeyId"] and c["Token"]


def test_custom_networking_secondary_block_and_own_security_groups(node, emulator):
    """A pod subnet in a secondary VPC block; an ENI there keeps only its own groups
    (moto would add the instance's), in EC2 and in IMDS; IMDS lists both blocks."""
    vpc, _, inst = node
    ec2 = vpc.ec2
    ec2.associate_vpc_cidr_block(VpcId=vpc.id, CidrBlock="100.64.0.0/16")
    pods = ec2.create_subnet(VpcId=vpc.id, CidrBlock="100.64.0.0/20", AvailabilityZone=vpc.az)["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName=f"pods-{vpc.id}", Description="pods", VpcId=vpc.id)["GroupId"]
    eni = vpc.eni(pods, Groups=[sg], SecondaryPrivateIpAddressCount=2)
    assert eni["PrivateIpAddress"].startswith("100.64.")
    ec2.attach_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"], InstanceId=inst["InstanceId"], DeviceIndex=1)
    (got,) = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni["NetworkInterfaceId"]])["NetworkInterfaces"]
    assert [g["GroupId"] for g in got["Groups"]] == [sg]
    primary = inst["NetworkInterfaces"][0]
    (p,) = ec2.describe_network_interfaces(NetworkInterfaceIds=[primary["NetworkInterfaceId"]])["NetworkInterfaces"]
    assert sg not in [g["GroupId"] for g in p["Groups"]] and p["Groups"]
    mac = got["MacAddress"]
    status, groups = emulator.imds(f"/latest/meta-data/network/interfaces/macs/{mac}/security-group-ids")
    assert (status, groups.split()) == (200, [sg])
    status, blocks = emulator.imds(f"/latest/meta-data/network/interfaces/macs/{mac}/vpc-ipv4-cidr-blocks")
    assert status == 200 and "100.64.0.0/16" in blocks.split(), blocks
