"""The `emulator` command: start (idempotent, refuses a busy port), env, seed, status,
stop; and all of it inside a network namespace, as the lab runs it."""

import os
import socket
import subprocess

import pytest
from conftest import ROOT, free_port

EMU = os.path.join(ROOT, "emulator")


def run(*args, port, netns=None, check=True):
    cmd = ([ "ip", "netns", "exec", netns] if netns else []) + [EMU, *args]
    p = subprocess.run(cmd, env={**os.environ, "EMULATOR_PORT": str(port)}, capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_lifecycle_on_loopback():
    port = free_port()
    try:
        out = run("start", port=port)
        assert "ready in" in out.stderr
        assert "already running" in run("start", port=port).stderr
        env = run("env", port=port).stdout
        assert f"export AWS_ENDPOINT_URL_EC2=http://127.0.0.1:{port}" in env
        assert f"export AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:{port}/" in env
        ids = run("seed", "--type", "t3.medium", "--count", "2", port=port).stdout.split()
        assert len(ids) == 2 and all(i.startswith("i-") for i in ids)
        assert "running" in run("status", port=port).stdout
    finally:
        run("stop", port=port)
    assert run("status", port=port, check=False).returncode == 3


def test_seed_spreads_instances_over_zones_each_with_its_node_subnet():
    import boto3

    port = free_port()
    try:
        run("start", port=port)
        ids = run("seed", "--count", "3", "--zones", "2", port=port).stdout.split()
        assert len(ids) == 3
        ec2 = boto3.client(
            "ec2",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-west-2",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        got = {}
        for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
            for i in r["Instances"]:
                got[i["InstanceId"]] = (i["Placement"]["AvailabilityZone"], i["PrivateIpAddress"])
        zones = [got[i][0] for i in ids]
        assert zones == ["us-west-2a", "us-west-2b", "us-west-2a"], got
        assert got[ids[1]][1].startswith("10.0.32."), got
        subnets = {s["AvailabilityZone"]: s for s in ec2.describe_subnets()["Subnets"] if s["CidrBlock"].endswith("/20")}
        assert subnets["us-west-2b"]["CidrBlock"] == "10.0.32.0/20"
        assert {"Key": "kubernetes.io/role/cni", "Value": "1"} in subnets["us-west-2b"]["Tags"]
        assert run("seed", "--zones", "0", port=port, check=False).returncode != 0
    finally:
        run("stop", port=port)


def test_seed_ipv6_makes_a_dual_stack_vpc():
    import ipaddress

    import boto3

    port = free_port()
    try:
        run("start", port=port)
        ids = run("seed", "--count", "2", "--zones", "2", "--ipv6", port=port).stdout.split()
        ec2 = boto3.client(
            "ec2",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-west-2",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        (vpc,) = [v for v in ec2.describe_vpcs()["Vpcs"] if v.get("Ipv6CidrBlockAssociationSet")]
        block = ipaddress.IPv6Network(vpc["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"])
        subnets6 = [
            ipaddress.IPv6Network(s["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"])
            for s in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["Subnets"]
        ]
        assert len(subnets6) == 3 and len(set(subnets6)) == 3
        assert all(n.prefixlen == 64 and n.subnet_of(block) for n in subnets6)
        for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
            for i in r["Instances"]:
                eni = ec2.describe_network_interfaces(
                    NetworkInterfaceIds=[i["NetworkInterfaces"][0]["NetworkInterfaceId"]]
                )["NetworkInterfaces"][0]
                (a,) = eni["Ipv6Addresses"]
                assert any(ipaddress.IPv6Address(a["Ipv6Address"]) in n for n in subnets6)
    finally:
        run("stop", port=port)


def test_busy_port_is_refused():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        p = run("start", port=port, check=False)
        assert p.returncode != 0
        assert f"port {port}" in p.stderr and "in use" in p.stderr
    finally:
        s.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_inside_a_network_namespace():
    ns = f"emu-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        port = 5000
        run("start", port=port, netns=ns)
        ids = run("seed", port=port, netns=ns).stdout.split()
        assert len(ids) == 1
        run("stop", port=port, netns=ns)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
