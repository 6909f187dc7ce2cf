"""Fault injection over the control endpoint: error codes with EC2's HTTP statuses,
counts, probabilities and latency, as an SDK client sees them."""

import time

import pytest
from botocore.exceptions import ClientError
from conftest import error_of
from test_limits import vpc_prefix


def test_injected_throttling_then_recovery(emulator):
    ec2 = emulator.client(retries=0)
    emulator.control("/_emulator/faults", "POST", {"action": "DescribeInstanceTypes", "code": "RequestLimitExceeded", "count": 2})
    for _ in range(2):
        with pytest.raises(ClientError) as e:
            ec2.describe_instance_types(InstanceTypes=["m5.large"])
        assert error_of(e) == ("RequestLimitExceeded", 503)
    r = ec2.describe_instance_types(InstanceTypes=["m5.large"])
    assert r["InstanceTypes"][0]["NetworkInfo"]["Ipv4AddressesPerInterface"] == 10


def test_sdk_retries_through_injected_faults(emulator):
    emulator.control("/_emulator/calls", "DELETE")
    emulator.control("/_emulator/faults", "POST", {"action": "DescribeRegions", "code": "InternalError", "count": 2})
    emulator.client(retries=3).describe_regions()
    assert emulator.control("/_emulator/calls")["DescribeRegions"] == 3, "2 failed + 1 retried"


def test_probability_zero_never_fires_and_custom_status(emulator):
    ec2 = emulator.client()
    emulator.control("/_emulator/faults", "POST", {"action": "DescribeRegions", "code": "Unavailable", "probability": 0})
    for _ in range(5):
        ec2.describe_regions()
    emulator.control("/_emulator/faults", "POST", {"action": "*", "code": "Teapot", "status": 418, "count": 1})
    with pytest.raises(ClientError) as e:
        ec2.describe_vpcs()
    assert error_of(e) == ("Teapot", 418)


def test_added_latency(emulator):
    ec2 = emulator.client()
    emulator.control("/_emulator/faults", "POST", {"action": "DescribeVpcs", "latency_ms": 300})
    t = time.monotonic()
    ec2.describe_vpcs()
    assert time.monotonic() - t >= 0.3


def test_bad_control_requests_are_refused(emulator):
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as e:
        emulator.control("/_emulator/faults", "POST", {"code": "X"})
    assert e.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as e:
        emulator.control("/_emulator/faults", "POST", {"action": "X", "probability": 2})
    assert e.value.code == 400


def test_quirks_echo_the_primary_and_unflag_it(vpc, emulator):
    """Answers a buggy endpoint gave (stock moto's assign echo), on request."""
    ec2 = vpc.ec2
    sub = vpc.subnet(f"{vpc_prefix(vpc)}.9.0/24")
    eni = vpc.eni(sub)
    primary = eni["PrivateIpAddress"]
    emulator.control("/_emulator/settings", "POST", {"assign_echoes_primary": True, "describe_primary_unflagged": True})
    r = ec2.assign_private_ip_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"], SecondaryPrivateIpAddressCount=2)
    got = [a["PrivateIpAddress"] for a in r["AssignedPrivateIpAddresses"]]
    assert got[0] == primary and len(got) == 4 and got[1] == got[2], got
    d = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni["NetworkInterfaceId"]])["NetworkInterfaces"][0]
    assert not any(a.get("Primary") for a in d["PrivateIpAddresses"]), d["PrivateIpAddresses"]
    emulator.control("/_emulator/settings", "POST", {"assign_echoes_primary": False, "describe_primary_unflagged": False})
    d = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni["NetworkInterfaceId"]])["NetworkInterfaces"][0]
    assert [a["PrivateIpAddress"] for a in d["PrivateIpAddresses"] if a.get("Primary")] == [primary]


def test_imds_can_be_made_unavailable(emulator):
    emulator.control("/_emulator/imds", "POST", {"unavailable": True})
    assert emulator.imds("/latest/meta-data/instance-id", token=False)[0] == 503
    emulator.control("/_emulator/imds", "POST", {"unavailable": False})
    assert emulator.imds("/latest/meta-data/instance-id", token=False)[0] != 503
