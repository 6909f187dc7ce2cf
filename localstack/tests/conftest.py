"""A real emulator process per test session, on a free port, and boto3 clients for it."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import boto3
import pytest
from botocore.config import Config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REGION = "us-west-2"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Emulator:
    def __init__(self, endpoint):
        self.endpoint = endpoint

    def control(self, path, method="GET", body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.endpoint + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def client(self, retries=0):
        return boto3.client(
            "ec2",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(retries={"total_max_attempts": retries + 1, "mode": "standard"}),
        )

    def imds(self, path, token=True):
        headers = {}
        if token:
            req = urllib.request.Request(
                self.endpoint + "/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
            )
            headers["X-aws-ec2-metadata-token"] = urllib.request.urlopen(req).read().decode()
        req = urllib.request.Request(self.endpoint + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


@pytest.fixture(scope="session")
def emulator():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ec2emu", "--port", str(port), "--region", REGION],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    rc = subprocess.call([sys.executable, "-m", "ec2emu.wait", endpoint, "30"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert rc == 0, "emulator did not start"
    yield Emulator(endpoint)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(autouse=True)
def clean_faults(emulator):
    emulator.control("/_emulator/faults", "DELETE")
    quirks_off = {"detach_seconds": 0, "assign_echoes_primary": False, "describe_primary_unflagged": False}
    emulator.control("/_emulator/settings", "POST", quirks_off)
    yield
    emulator.control("/_emulator/faults", "DELETE")
    emulator.control("/_emulator/settings", "POST", quirks_off)
    emulator.control("/_emulator/imds", "POST", {"unavailable": False})


class Vpc:
    """A fresh VPC per test, so tests don't share subnets."""

    def __init__(self, ec2, cidr="10.0.0.0/16"):
        self.ec2 = ec2
        self.id = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
        self.az = f"{REGION}a"

    def subnet(self, cidr):
        return self.ec2.create_subnet(VpcId=self.id, CidrBlock=cidr, AvailabilityZone=self.az)["Subnet"]["SubnetId"]

    def instance(self, subnet, itype):
        r = self.ec2.run_instances(
            ImageId="ami-12c6146b",
            InstanceType=itype,
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet,
            Placement={"AvailabilityZone": self.az},
        )
        return r["Instances"][0]

    def eni(self, subnet, **kw):
        return self.ec2.create_network_interface(SubnetId=subnet, **kw)["NetworkInterface"]


_seq = [0]


@pytest.fixture
def vpc(emulator):
    _seq[0] += 1
    return Vpc(emulator.client(), cidr=f"10.{_seq[0] % 250}.0.0/16")


def error_of(excinfo):
    e = excinfo.value.response
    return e["Error"]["Code"], e["ResponseMetadata"]["HTTPStatusCode"]
