"""EC2's limits and rules where IPAM depends on them, through boto3 (real query protocol)."""

import ipaddress
import threading
import time

import pytest
from botocore.exceptions import ClientError
from conftest import error_of


def addrs(eni):
    return [a["PrivateIpAddress"] for a in eni["PrivateIpAddresses"]]


def describe(ec2, eni_id):
    return ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]


def test_per_eni_address_limit_of_the_instance_type(vpc):
    ec2 = vpc.ec2
    sub = vpc.subnet(f"{vpc_prefix(vpc)}.0.0/24")
    inst = vpc.instance(sub, "t3.small")  # 3 ENIs x 4 addresses
    primary = inst["NetworkInterfaces"][0]["NetworkInterfaceId"]
    r = ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, SecondaryPrivateIpAddressCount=3)
    assert len(r["AssignedPrivateIpAddresses"]) == 3
    with pytest.raises(ClientError) as e:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, SecondaryPrivateIpAddressCount=1)
    assert error_of(e) == ("PrivateIpAddressLimitExceeded", 400)
    assert len(addrs(describe(ec2, primary))) == 4


def test_assign_returns_only_the_new_addresses(vpc):
    ec2 = vpc.ec2
    sub = vpc.subnet(f"{vpc_prefix(vpc)}.0.0/24")
    eni = vpc.eni(sub, SecondaryPrivateIpAddressCount=2)
    r = ec2.assign_private_ip_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"], SecondaryPrivateIpAddressCount=2)
    new = [a["PrivateIpAddress"] for a in r["AssignedPrivateIpAddresses"]]
    assert len(new) == 2 and not set(new) & set(addrs(eni))


def test_eni_count_limit_and_busy_device_index(vpc):
    ec2 = vpc.ec2
    sub = vpc.subnet(f"{vpc_prefix(vpc)}.0.0/24")
    inst = vpc.instance(sub, "t3.small")
    iid = inst["InstanceId"]
    e1, e2, e3 = (vpc.eni(sub)["NetworkInterfaceId"] for _ in range(3))
    ec2.attach_network_interface(NetworkInterfaceId=e1, InstanceId=iid, DeviceIndex=1)
    with pytest.raises(ClientError) as e:
        ec2.attach_network_interface(NetworkInterfaceId=e2, InstanceId=iid, DeviceIndex=1)
    assert error_of(e) == ("InvalidParameterValue", 400)
    assert "device index '1'" in str(e.value)
    ec2.attach_network_interface(NetworkInterfaceId=e2, InstanceId=iid, DeviceIndex=2)
    with pytest.raises(ClientError) as e:
        ec2.attach_network_interface(NetworkInterfaceId=e3, InstanceId=iid, DeviceIndex=3)
    assert error_of(e) == ("AttachmentLimitExceeded", 400)


def test_attached_eni_cannot_be_deleted_nor_primary_detached(vpc):
    ec2 = vpc.ec2
    sub = vpc.subnet(f"{vpc_prefix(vpc)}.0.0/24")
    inst = vpc.instance(sub, "m5.large")
    eni = vpc.eni(sub)["NetworkInterfaceId"]
    att = ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=inst["InstanceId"], DeviceIndex=1)
    with pytest.raises(ClientError) as e:
        ec2.delete_network_interface(NetworkInterfaceId=eni)
    assert error_of(e) == ("InvalidNetworkInterface.InUse", 400)
    primary_att = inst["NetworkInterfaces"][0]["Attachment"]["AttachmentId"]
    with pytest.raises(ClientError) as e:
        ec2.detach_network_interface(AttachmentId=primary_att)
    assert error_of(e)[0] == "OperationNotPermitted"
    ec2.detach_network_interface(AttachmentId=att["AttachmentId"])
    assert describe(ec2, eni)["Status"] == "available"
    ec2.delete_network_interface(NetworkInterfaceId=eni)


def test_detach_can_take_time_like_ec2(vpc, emulator):
    ec2 = vpc.ec2
    sub = vpc.subnet(f"{vpc_prefix(vpc)}.0.0/24")
    inst = vpc.instance(sub, "m5.large")
    eni = vpc.eni(sub)["NetworkInterfaceId"]
    att = ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=inst["InstanceId"], DeviceIndex=1)
    emulator.control("/_emulator/settings", "POST", {"detach_seconds": 0.5})
    ec2.detach_network_interface(AttachmentId=att["AttachmentId"])
    assert describe(ec2, eni)["Status"] == "detaching"
    with pytest.raises(ClientError) as e:
        ec2.delete_network_interface(NetworkInterfaceId=eni)
    assert error_of(e)[0] == "InvalidNetworkInterface.InUse"
    time.sleep(0.8)
    assert describe(ec2, eni)["Status"] == "available"
    ec2.delete_network_interface(NetworkInterfaceId=eni)


def test_delete_on_termination_is_honoured(vpc):
    ec2 = vpc.ec2
    sub = vpc.subnet(f"{vpc_prefix(vpc)}.0.0/24")
    inst = vpc.instance(sub, "m5.large")
    iid = inst["InstanceId"]
    primary = inst["NetworkInterfaces"][0]["NetworkInterfaceId"]
    keep, drop = vpc.eni(sub)["NetworkInterfaceId"], vpc.eni(sub)["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=keep, InstanceId=iid, DeviceIndex=1)
    a = ec2.attach_network_interface(NetworkInterfaceId=drop, InstanceId=iid, DeviceIndex=2)
    ec2.modify_network_interface_attribute(
        NetworkInterfaceId=drop, Attachment={"AttachmentId": a["AttachmentId"], "DeleteOnTermination": True}
    )
    assert describe(ec2, drop)["Attachment"]["DeleteOnTermination"] is True
    assert describe(ec2, keep)["Attachment"]["DeleteOnTermination"] is False
    ec2.terminate_instances(InstanceIds=[iid])
    left = {e["NetworkInterfaceId"]: e for e in ec2.describe_network_interfaces(
        Filters=[{"Name": "subnet-id", "Values": [sub]}])["NetworkInterfaces"]}
    assert drop not in left and primary not in left
    assert left[keep]["Status"] == "available"


def test_addresses_skip_the_reserved_ones_and_exhaustion_is_an_error(vpc):
    ec2 = vpc.ec2
    p = vpc_prefix(vpc)
    sub = vpc.subnet(f"{p}.1.0/28")  # 16 addresses, 11 usable
    eni = vpc.eni(sub, SecondaryPrivateIpAddressCount=10)
    got = sorted(ipaddress.IPv4Address(a) for a in addrs(eni))
    assert len(set(got)) == 11
    assert got[0] == ipaddress.IPv4Address(f"{p}.1.4") and got[-1] == ipaddress.IPv4Address(f"{p}.1.14")
    assert ec2.describe_subnets(SubnetIds=[sub])["Subnets"][0]["AvailableIpAddressCount"] == 0
    t = time.monotonic()
    with pytest.raises(ClientError) as e:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"], SecondaryPrivateIpAddressCount=1)
    assert error_of(e) == ("InsufficientFreeAddressesInSubnet", 400)
    assert time.monotonic() - t < 2, "answers at once instead of spinning"
    with pytest.raises(ClientError) as e:
        vpc.eni(sub)
    assert error_of(e)[0] == "InsufficientFreeAddressesInSubnet"
    assert ec2.describe_subnets(SubnetIds=[sub])["Subnets"][0]["AvailableIpAddressCount"] == 0


def test_unique_addresses_under_8_concurrent_clients(vpc, emulator):
    p = vpc_prefix(vpc)
    sub = vpc.subnet(f"{p}.2.0/24")  # 251 usable
    errors = []
    enis = []

    def worker():
        try:
            ec2 = emulator.client()
            eni = ec2.create_network_interface(SubnetId=sub)["NetworkInterface"]["NetworkInterfaceId"]
            enis.append(eni)
            for _ in range(10):
                ec2.assign_private_ip_addresses(NetworkInterfaceId=eni, SecondaryPrivateIpAddressCount=3)
        except Exception as ex:  # collected, asserted below
            errors.append(ex)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 8 x (1 + 30) = 248 of 251: all fit.
    assert not errors, errors
    all_addrs = []
    for e in enis:
        all_addrs += addrs(describe(vpc.ec2, e))
    assert len(all_addrs) == 248
    assert len(set(all_addrs)) == 248, "no address given twice"
    for a in all_addrs:
        last = int(a.split(".")[3])
        assert 4 <= last <= 254, a
    assert vpc.ec2.describe_subnets(SubnetIds=[sub])["Subnets"][0]["AvailableIpAddressCount"] == 3


def test_prefixes_are_aligned_free_and_described(vpc):
    ec2 = vpc.ec2
    p = vpc_prefix(vpc)
    sub = vpc.subnet(f"{p}.3.0/24")
    inst = vpc.instance(sub, "m5.large")
    primary = inst["NetworkInterfaces"][0]["NetworkInterfaceId"]
    r = ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, Ipv4PrefixCount=2)
    got = [x["Ipv4Prefix"] for x in r["AssignedIpv4Prefixes"]]
    assert len(got) == 2
    for pf in got:
        net = ipaddress.IPv4Network(pf)
        assert net.prefixlen == 28 and int(net.network_address) % 16 == 0
    d = describe(ec2, primary)
    assert sorted(x["Ipv4Prefix"] for x in d["Ipv4Prefixes"]) == sorted(got)
    # Addresses never come from inside a prefix.
    r = ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, SecondaryPrivateIpAddressCount=5)
    for a in r["AssignedPrivateIpAddresses"]:
        assert not any(ipaddress.IPv4Address(a["PrivateIpAddress"]) in ipaddress.IPv4Network(pf) for pf in got)
    # A prefix takes one of the ENI's address slots (m5.large: 10).
    with pytest.raises(ClientError) as e:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, Ipv4PrefixCount=3)
    assert error_of(e)[0] == "PrivateIpAddressLimitExceeded"
    ec2.unassign_private_ip_addresses(NetworkInterfaceId=primary, Ipv4Prefixes=[got[0]])
    assert [x["Ipv4Prefix"] for x in describe(ec2, primary)["Ipv4Prefixes"]] == [got[1]]


def test_fragmented_subnet_has_no_free_prefix(vpc):
    ec2 = vpc.ec2
    p = vpc_prefix(vpc)
    sub = vpc.subnet(f"{p}.4.0/26")  # /28 blocks .16 and .32 are the only ones without reserved addresses
    eni = vpc.eni(sub, PrivateIpAddresses=[
        {"Primary": True, "PrivateIpAddress": f"{p}.4.20"},
        {"Primary": False, "PrivateIpAddress": f"{p}.4.40"},
    ])["NetworkInterfaceId"]
    with pytest.raises(ClientError) as e:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni, Ipv4PrefixCount=1)
    assert error_of(e) == ("InsufficientCidrBlocks", 400)
    # Single addresses are still there: the fallback IPAM relies on.
    r = ec2.assign_private_ip_addresses(NetworkInterfaceId=eni, SecondaryPrivateIpAddressCount=2)
    assert len(r["AssignedPrivateIpAddresses"]) == 2


def test_explicit_address_in_use_is_refused(vpc):
    ec2 = vpc.ec2
    p = vpc_prefix(vpc)
    sub = vpc.subnet(f"{p}.5.0/24")
    vpc.eni(sub, PrivateIpAddress=f"{p}.5.10")
    with pytest.raises(ClientError) as e:
        vpc.eni(sub, PrivateIpAddress=f"{p}.5.10")
    assert error_of(e)[0] == "InvalidIPAddress.InUse"
    with pytest.raises(ClientError) as e:
        vpc.eni(sub, PrivateIpAddress=f"{p}.5.2")
    assert error_of(e)[0] == "InvalidParameterValue", "a reserved address"


def vpc_prefix(vpc):
    cidr = vpc.ec2.describe_vpcs(VpcIds=[vpc.id])["Vpcs"][0]["CidrBlock"]
    return ".".join(cidr.split(".")[:2])
