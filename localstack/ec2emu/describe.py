"""Print an instance's ENIs as EC2 holds them: device, ENI id, primary, secondaries, prefixes (IPv4 /28s and IPv6 /80s)."""

import argparse

import boto3


def main(argv=None):
    ap = argparse.ArgumentParser(prog="emulator describe")
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--region", default="us-west-2")
    ap.add_argument("--instance", required=True)
    a = ap.parse_args(argv)
    ec2 = boto3.client(
        "ec2", endpoint_url=a.endpoint, region_name=a.region, aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    enis = ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id", "Values": [a.instance]}])[
        "NetworkInterfaces"
    ]
    enis.sort(key=lambda e: e["Attachment"]["DeviceIndex"])
    print(f"    {'DEV':<4}{'ENI':<24}{'PRIMARY':<14}{'SECONDARY IPs':<15}PREFIXES")
    for e in enis:
        sec = [x["PrivateIpAddress"] for x in e["PrivateIpAddresses"] if not x.get("Primary")]
        pfx = [p["Ipv4Prefix"] for p in e.get("Ipv4Prefixes", [])]
        pfx += [p["Ipv6Prefix"] for p in e.get("Ipv6Prefixes", [])]
        print(f"    {e['Attachment']['DeviceIndex']:<4}{e['NetworkInterfaceId']:<24}{e['PrivateIpAddress']:<14}{len(sec):<15}{' '.join(pfx) or '-'}")


if __name__ == "__main__":
    main()
