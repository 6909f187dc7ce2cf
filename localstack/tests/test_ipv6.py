"""IPv6 as prefix delegation needs it, through boto3 (real query protocol) and IMDS."""

import ipaddress

import pytest
from botocore.exceptions import ClientError
from conftest import REGION, error_of


def describe(ec2, eni_id):
    return ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]


class Vpc6:
    def __init__(self, ec2):
        self.ec2 = ec2
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16", AmazonProvidedIpv6CidrBlock=True)["Vpc"]
        self.id = vpc["VpcId"]
        self.block = ipaddress.IPv6Network(vpc["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"])
        self.n = 0

    def subnet(self, v6=True):
        self.n += 1
        kw = {"Ipv6CidrBlock": str(list(self.block.subnets(new_prefix=64))[self.n])} if v6 else {}
        sub = self.ec2.create_subnet(
            VpcId=self.id, CidrBlock=f"10.0.{self.n}.0/24", AvailabilityZone=f"{REGION}a", **kw
        )["Subnet"]
        return sub["SubnetId"], ipaddress.IPv6Network(kw["Ipv6CidrBlock"]) if v6 else None

    def instance(self, subnet, itype="m5.large", **kw):
        r = self.ec2.run_instances(
            ImageId="ami-12c6146b", InstanceType=itype, MinCount=1, MaxCount=1, SubnetId=subnet, **kw
        )
        return r["Instances"][0]


@pytest.fixture
def vpc6(emulator):
    return Vpc6(emulator.client())


def test_vpc_blocks_are_amazon_provided_56s_in_order(emulator):
    ec2 = emulator.client()
    a = Vpc6(ec2).block
    b = Vpc6(ec2).block
    assert a.prefixlen == b.prefixlen == 56
    assert a != b and a.subnet_of(ipaddress.IPv6Network("2600:1f14::/32"))


def test_primary_eni_gets_an_address_of_its_subnet(vpc6):
    sub, net = vpc6.subnet()
    inst = vpc6.instance(sub, Ipv6AddressCount=1)
    eni = describe(vpc6.ec2, inst["NetworkInterfaces"][0]["NetworkInterfaceId"])
    addrs = [a["Ipv6Address"] for a in eni["Ipv6Addresses"]]
    assert len(addrs) == 1 and ipaddress.IPv6Address(addrs[0]) in net


def test_prefix_is_an_80_of_the_subnet_returned_alone_and_described(vpc6):
    ec2 = vpc6.ec2
    sub, net = vpc6.subnet()
    inst = vpc6.instance(sub, Ipv6AddressCount=1)
    eni_id = inst["NetworkInterfaces"][0]["NetworkInterfaceId"]
    r = ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=1)
    assert r.get("AssignedIpv6Addresses", []) == []
    (p,) = r["AssignedIpv6Prefixes"]
    p = ipaddress.IPv6Network(p)
    assert p.prefixlen == 80 and p.subnet_of(net)
    eni = describe(ec2, eni_id)
    assert [x["Ipv6Prefix"] for x in eni["Ipv6Prefixes"]] == [str(p)]
    (addr,) = [a["Ipv6Address"] for a in eni["Ipv6Addresses"]]
    assert ipaddress.IPv6Address(addr) not in p, "an address never comes from a delegated prefix"
    # A second prefix is another /80; an address assigned now is outside both.
    r2 = ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=1, Ipv6AddressCount=1)
    (p2,) = r2["AssignedIpv6Prefixes"]
    (a2,) = r2["AssignedIpv6Addresses"]
    assert ipaddress.IPv6Network(p2) != p and ipaddress.IPv6Address(a2) not in p
    assert ipaddress.IPv6Address(a2) not in ipaddress.IPv6Network(p2)


def test_prefixes_are_unique_across_enis_of_a_subnet(vpc6):
    ec2 = vpc6.ec2
    sub, _ = vpc6.subnet()
    seen = set()
    for _ in range(3):
        eni = ec2.create_network_interface(SubnetId=sub, Ipv6PrefixCount=2)["NetworkInterface"]
        ps = [x["Ipv6Prefix"] for x in eni["Ipv6Prefixes"]]
        assert len(ps) == 2 and not seen & set(ps)
        seen |= set(ps)


def test_ipv6_slots_are_the_instance_types_limit(vpc6):
    ec2 = vpc6.ec2
    sub, _ = vpc6.subnet()
    inst = vpc6.instance(sub, "t3.small", Ipv6AddressCount=1)  # 4 IPv6 per interface
    eni_id = inst["NetworkInterfaces"][0]["NetworkInterfaceId"]
    ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=3)
    with pytest.raises(ClientError) as e:
        ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=1)
    assert error_of(e) == ("PrivateIpAddressLimitExceeded", 400)
    eni = describe(ec2, eni_id)
    assert len(eni["Ipv6Prefixes"]) == 3 and len(eni["Ipv6Addresses"]) == 1


def test_a_subnet_without_ipv6_refuses_it(vpc6):
    ec2 = vpc6.ec2
    sub, _ = vpc6.subnet(v6=False)
    inst = vpc6.instance(sub)
    with pytest.raises(ClientError) as e:
        ec2.assign_ipv6_addresses(NetworkInterfaceId=inst["NetworkInterfaces"][0]["NetworkInterfaceId"], Ipv6PrefixCount=1)
    assert error_of(e)[0] == "InvalidParameterValue"
    assert "has no IPv6" in e.value.response["Error"]["Message"]


def test_explicit_prefix_must_be_aligned_and_free(vpc6):
    ec2 = vpc6.ec2
    sub, net = vpc6.subnet()
    eni = ec2.create_network_interface(SubnetId=sub, Ipv6PrefixCount=1)["NetworkInterface"]
    taken = eni["Ipv6Prefixes"][0]["Ipv6Prefix"]
    other = ec2.create_network_interface(SubnetId=sub)["NetworkInterface"]["NetworkInterfaceId"]
    for bad in [taken, str(net.network_address) + "1/80", "2001:db8::/80"]:
        with pytest.raises(ClientError) as e:
            ec2.assign_ipv6_addresses(NetworkInterfaceId=other, Ipv6Prefixes=[bad])
        assert error_of(e)[0] == "InvalidParameterValue", bad
    free = str(list(net.subnets(new_prefix=80))[100])
    r = ec2.assign_ipv6_addresses(NetworkInterfaceId=other, Ipv6Prefixes=[free])
    assert r["AssignedIpv6Prefixes"] == [free]


def test_unassign_releases_exactly_what_it_names(vpc6):
    ec2 = vpc6.ec2
    sub, _ = vpc6.subnet()
    eni = ec2.create_network_interface(SubnetId=sub, Ipv6PrefixCount=2, Ipv6AddressCount=1)["NetworkInterface"]
    eni_id = eni["NetworkInterfaceId"]
    p1, p2 = [x["Ipv6Prefix"] for x in eni["Ipv6Prefixes"]]
    with pytest.raises(ClientError) as e:
        ec2.unassign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Prefixes=["2600:1f14::/80"])
    assert error_of(e)[0] == "InvalidParameterValue"
    r = ec2.unassign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Prefixes=[p1])
    assert r["UnassignedIpv6Prefixes"] == [p1]
    after = describe(ec2, eni_id)
    assert [x["Ipv6Prefix"] for x in after["Ipv6Prefixes"]] == [p2]
    assert len(after["Ipv6Addresses"]) == 1


def test_imds_serves_ipv6s_and_prefixes_per_mac(emulator, vpc6):
    ec2 = vpc6.ec2
    sub, net = vpc6.subnet()
    inst = vpc6.instance(sub, Ipv6AddressCount=1)
    eni_id = inst["NetworkInterfaces"][0]["NetworkInterfaceId"]
    (p,) = ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=1)["AssignedIpv6Prefixes"]
    emulator.control("/_emulator/imds", "POST", {"instance_id": inst["InstanceId"], "delay_seconds": 0})
    _, mac = emulator.imds("/latest/meta-data/mac")
    base = f"/latest/meta-data/network/interfaces/macs/{mac}"
    eni = describe(ec2, eni_id)
    assert emulator.imds(base + "/ipv6s") == (200, eni["Ipv6Addresses"][0]["Ipv6Address"])
    assert emulator.imds(base + "/ipv6-prefix") == (200, p)
    assert emulator.imds(base + "/subnet-ipv6-cidr-blocks") == (200, str(net))
    assert emulator.imds(base + "/vpc-ipv6-cidr-blocks") == (200, str(vpc6.block))
    assert emulator.imds("/latest/meta-data/ipv6") == (200, eni["Ipv6Addresses"][0]["Ipv6Address"])


def test_imds_has_no_ipv6_keys_without_ipv6(emulator, vpc6):
    sub, _ = vpc6.subnet(v6=False)
    inst = vpc6.instance(sub)
    emulator.control("/_emulator/imds", "POST", {"instance_id": inst["InstanceId"], "delay_seconds": 0})
    _, mac = emulator.imds("/latest/meta-data/mac")
    base = f"/latest/meta-data/network/interfaces/macs/{mac}"
    for key in ["ipv6s", "ipv6-prefix", "subnet-ipv6-cidr-blocks"]:
        assert emulator.imds(f"{base}/{key}")[0] == 404, key
    assert emulator.imds("/latest/meta-data/ipv6")[0] == 404
