"""Seed the emulator: a VPC, a large subnet tagged for CNI subnet discovery, a deliberately
small one, a security group and N running instances; points IMDS at the first instance.
For custom networking, optionally a secondary VPC CIDR block with pod subnets (named
pods-<n>) and a security group named pods. Prints the instance ids, one per line
(everything else goes to stderr)."""

import argparse
import ipaddress
import json
import sys
import urllib.request

import boto3


def main(argv=None):
    ap = argparse.ArgumentParser(prog="emulator seed", description=__doc__)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--region", default="us-west-2")
    ap.add_argument("--type", dest="itype", default="m5.large", help="instance type")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--vpc-cidr", default="10.0.0.0/16")
    ap.add_argument("--subnet-cidr", default="10.0.0.0/20")
    ap.add_argument("--small-subnet-cidr", default="10.0.16.0/27")
    ap.add_argument("--pod-vpc-cidr", help="a secondary CIDR block of the VPC (custom networking), e.g. 100.64.0.0/16")
    ap.add_argument(
        "--pod-subnet",
        action="append",
        default=[],
        metavar="CIDR[@AZ]",
        help="a subnet for pods in the secondary block (repeatable; AZ defaults to the nodes')",
    )
    ap.add_argument(
        "--zones",
        type=int,
        default=1,
        help="availability zones <region>a, b, ...: instance i goes to zone i mod N; zone k > 0 gets a node "
        "subnet nodes-<k> of its own, 10.0.(16 + 16k).0/20, tagged for subnet discovery as the first",
    )
    ap.add_argument(
        "--ipv6",
        action="store_true",
        help="dual-stack: the VPC gets an Amazon-provided /56, every subnet a /64 of it (the k-th subnet made, "
        "block + k), each instance's primary ENI one IPv6 address",
    )
    ap.add_argument("--imds-delay", type=float, default=0.0, help="IMDS lags EC2 by this many seconds")
    a = ap.parse_args(argv)
    if a.count < 1:
        ap.error("--count must be at least 1")
    if not 1 <= a.zones <= 6:
        ap.error("--zones must be 1..6")

    ec2 = boto3.client(
        "ec2",
        endpoint_url=a.endpoint,
        region_name=a.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    az = f"{a.region}a"
    made = ec2.create_vpc(CidrBlock=a.vpc_cidr, AmazonProvidedIpv6CidrBlock=a.ipv6)["Vpc"]
    vpc = made["VpcId"]
    block6 = made["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"] if a.ipv6 else None
    if block6:
        print(f"VPC IPv6 block {block6}", file=sys.stderr)
    subnets6 = [0]

    def create_subnet(**kw):
        if block6:
            net = ipaddress.IPv6Network(block6)
            kw["Ipv6CidrBlock"] = str(ipaddress.IPv6Network((int(net.network_address) + (subnets6[0] << 64), 64)))
            subnets6[0] += 1
        return ec2.create_subnet(**kw)
    tag = lambda kind, name, extra=(): [  # noqa: E731
        {"ResourceType": kind, "Tags": [{"Key": "Name", "Value": name}, *extra]}
    ]
    subnet = create_subnet(
        VpcId=vpc,
        CidrBlock=a.subnet_cidr,
        AvailabilityZone=az,
        TagSpecifications=tag("subnet", "nodes", [{"Key": "kubernetes.io/role/cni", "Value": "1"}]),
    )["Subnet"]["SubnetId"]
    zones = [(az, subnet)]
    for k in range(1, a.zones):
        zk = f"{a.region}{'abcdef'[k]}"
        cidr = f"10.0.{16 + 16 * k}.0/20"
        sk = create_subnet(
            VpcId=vpc,
            CidrBlock=cidr,
            AvailabilityZone=zk,
            TagSpecifications=tag("subnet", f"nodes-{k}", [{"Key": "kubernetes.io/role/cni", "Value": "1"}]),
        )["Subnet"]["SubnetId"]
        print(f"node subnet nodes-{k} {sk} ({cidr}, {zk})", file=sys.stderr)
        zones.append((zk, sk))
    small = create_subnet(
        VpcId=vpc, CidrBlock=a.small_subnet_cidr, AvailabilityZone=az, TagSpecifications=tag("subnet", "small")
    )["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName="nodes", Description="nodes", VpcId=vpc)["GroupId"]
    if a.pod_subnet and not a.pod_vpc_cidr:
        ap.error("--pod-subnet needs --pod-vpc-cidr")
    if a.pod_vpc_cidr:
        ec2.associate_vpc_cidr_block(VpcId=vpc, CidrBlock=a.pod_vpc_cidr)
        pods_sg = ec2.create_security_group(GroupName="pods", Description="pods", VpcId=vpc)["GroupId"]
        print(f"secondary VPC block {a.pod_vpc_cidr}, security group pods {pods_sg}", file=sys.stderr)
        for n, spec in enumerate(a.pod_subnet):
            cidr, _, pod_az = spec.partition("@")
            sid = create_subnet(
                VpcId=vpc, CidrBlock=cidr, AvailabilityZone=pod_az or az, TagSpecifications=tag("subnet", f"pods-{n}")
            )["Subnet"]["SubnetId"]
            print(f"pod subnet pods-{n} {sid} ({cidr}, {pod_az or az})", file=sys.stderr)
    images = ec2.describe_images(Owners=["amazon"])["Images"]
    image = images[0]["ImageId"] if images else "ami-12c6146b"
    def launch(n, zone, in_subnet):
        res = ec2.run_instances(
            ImageId=image,
            InstanceType=a.itype,
            MinCount=n,
            MaxCount=n,
            SubnetId=in_subnet,
            SecurityGroupIds=[sg],
            Placement={"AvailabilityZone": zone},
            **({"Ipv6AddressCount": 1} if a.ipv6 else {}),
        )
        return [i["InstanceId"] for i in res["Instances"]]

    if a.zones == 1:
        ids = launch(a.count, az, subnet)
    else:
        ids = [launch(1, *zones[i % a.zones])[0] for i in range(a.count)]
    body = json.dumps({"instance_id": ids[0], "delay_seconds": a.imds_delay, "region": a.region}).encode()
    req = urllib.request.Request(
        a.endpoint.rstrip("/") + "/_emulator/imds", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    urllib.request.urlopen(req, timeout=10).read()
    print(
        f"seeded vpc {vpc}, subnet {subnet} ({a.subnet_cidr}), small subnet {small} ({a.small_subnet_cidr}), "
        f"security group {sg}, {a.count} x {a.itype}; IMDS serves {ids[0]}",
        file=sys.stderr,
    )
    for i in ids:
        print(i)


if __name__ == "__main__":
    main()
