"""Instance metadata (IMDSv2: PUT a token, then GET with it), derived from the EC2 state
for the instance whose primary private IP is the caller's address (a lab of several nodes),
else for one chosen instance. With a delay set, a new ENI, address or prefix shows up only
that many seconds after EC2 made it, as the real IMDS lags."""

import json
import secrets
import time

from . import ec2

TOKENS = {}
# "unavailable": every request answers 503, as IMDS can while an instance boots.
CONFIG = {
    "instance_id": None,
    "delay_seconds": 0.0,
    "region": "us-west-2",
    "account": "123456789012",
    "unavailable": False,
}


def _visible(key):
    at = ec2.APPEARED_AT.get(key)
    return at is None or time.monotonic() - at >= CONFIG["delay_seconds"]


def _backend():
    from moto.ec2.models import ec2_backends

    return ec2_backends[CONFIG["account"]][CONFIG["region"]]


def _instance(remote_addr=None):
    """The caller's own instance when it calls from an instance's primary private IP (as
    each real instance reaches its own IMDS), else the chosen one."""
    if remote_addr:
        for r in _backend().reservations.values():
            for i in r.instances:
                primary = i.nics.get(0)
                if primary is not None and primary.private_ip_address == remote_addr and i.state == "running":
                    return i
    iid = CONFIG["instance_id"]
    if not iid:
        return None
    try:
        return _backend().get_instance(iid)
    except Exception:
        return None


def _enis(instance):
    out = {}
    for idx, eni in sorted(instance.nics.items()):
        if eni.instance is instance and (idx == 0 or _visible((eni.id, "attachment"))):
            out[eni.mac_address] = eni
    return out


def _eni_tree(eni):
    subnet = eni.subnet
    vpc = _backend().get_vpc(subnet.vpc_id)
    cidrs = [a["cidr_block"] for a in vpc.get_cidr_block_association_set()] if hasattr(
        vpc, "get_cidr_block_association_set"
    ) else [vpc.cidr_block]
    addrs = [a for a in ec2.eni_addresses(eni) if a == eni.private_ip_address or _visible((eni.id, a))]
    tree = {
        "device-number": str(eni.device_index),
        "interface-id": eni.id,
        "mac": eni.mac_address,
        "owner-id": CONFIG["account"],
        "subnet-id": subnet.id,
        "subnet-ipv4-cidr-block": subnet.cidr_block,
        "vpc-id": subnet.vpc_id,
        "vpc-ipv4-cidr-block": vpc.cidr_block,
        "vpc-ipv4-cidr-blocks": "\n".join(cidrs),
        "local-ipv4s": "\n".join(addrs),
        "security-group-ids": "\n".join(g.id for g in eni.group_set),
    }
    prefixes = [p for p in ec2.eni_prefixes(eni) if _visible((eni.id, p))]
    if prefixes:
        tree["ipv4-prefix"] = "\n".join(prefixes)
    # IPv6 keys exist only where there is IPv6, as on EC2.
    subnet6 = ec2.subnet_ipv6_cidr(subnet)
    if subnet6:
        tree["subnet-ipv6-cidr-blocks"] = subnet6
    vpc6 = [a["ipv6CidrBlock"] for a in getattr(vpc, "ipv6_cidr_block_association_set", None) or []]
    if vpc6:
        tree["vpc-ipv6-cidr-blocks"] = "\n".join(vpc6)
    ipv6s = [a for a in ec2.eni_ipv6(eni) if _visible((eni.id, a))]
    if ipv6s:
        tree["ipv6s"] = "\n".join(ipv6s)
    prefixes6 = [p for p in ec2.eni_prefixes6(eni) if _visible((eni.id, p))]
    if prefixes6:
        tree["ipv6-prefix"] = "\n".join(prefixes6)
    return tree


def _tree(instance):
    enis = _enis(instance)
    primary = instance.nics.get(0)
    ipv6 = ec2.eni_ipv6(primary) if primary else []
    tree = {
        "instance-id": instance.id,
        "instance-type": instance.instance_type,
        "ami-id": instance.image_id,
        "local-ipv4": primary.private_ip_address if primary else "",
        "mac": primary.mac_address if primary else "",
        "hostname": f"ip-{(primary.private_ip_address or '').replace('.', '-')}.{CONFIG['region']}.compute.internal",
        "placement": {"availability-zone": instance._placement.zone, "region": CONFIG["region"]},
        "network": {"interfaces": {"macs": {mac: _eni_tree(e) for mac, e in enis.items()}}},
        # The instance profile's role, as the SDKs' credential chain reads it (the lab's
        # aws-node gets its credentials the way a node without IRSA does).
        "iam": {
            "info": json.dumps({"Code": "Success", "InstanceProfileArn": f"arn:aws:iam::{CONFIG['account']}:instance-profile/{ROLE}"}),
            "security-credentials": {ROLE: _credentials()},
        },
    }
    if ipv6:
        tree["ipv6"] = ipv6[0]
    return tree


ROLE = "eks-node-role"


def _credentials():
    return json.dumps(
        {
            "Code": "Success",
            "LastUpdated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "Type": "AWS-HMAC",
            "AccessKeyId": "ASIAEMULATOR",
            "SecretAccessKey": "testing",
            "Token": "emulator-session-token",
            "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 6 * 3600)),
        }
    )


def _lookup(tree, parts):
    node = tree
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def handle(method, path, headers, remote_addr=None):
    """Returns (status, content_type, body) or (status, content_type, body, extra headers)."""
    if CONFIG.get("unavailable"):
        return 503, "text/plain", "instance metadata service unavailable (emulated)"
    if path == "/latest/api/token":
        if method != "PUT":
            return 405, "text/plain", "method not allowed"
        ttl = headers.get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds")
        try:
            ttl = int(ttl)
        except (TypeError, ValueError):
            return 400, "text/plain", "missing or invalid X-aws-ec2-metadata-token-ttl-seconds"
        if not 1 <= ttl <= 21600:
            return 400, "text/plain", "token TTL must be 1..21600"
        tok = secrets.token_urlsafe(32)
        TOKENS[tok] = time.monotonic() + ttl
        # The real IMDS echoes the TTL; the AWS SDKs refuse a token without it.
        return 200, "text/plain", tok, [("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", str(ttl))]
    tok = headers.get("X-Aws-Ec2-Metadata-Token")
    if not tok or TOKENS.get(tok, 0) < time.monotonic():
        return 401, "text/plain", "IMDSv2 token missing or expired"
    with ec2.LOCK:
        instance = _instance(remote_addr)
        if instance is None:
            return 404, "text/plain", "no instance chosen for IMDS (emulator seed, or POST /_emulator/imds)"
        if path.startswith("/latest/dynamic/instance-identity/document"):
            primary = instance.nics.get(0)
            doc = {
                "accountId": CONFIG["account"],
                "architecture": "x86_64",
                "availabilityZone": instance._placement.zone,
                "imageId": instance.image_id,
                "instanceId": instance.id,
                "instanceType": instance.instance_type,
                "privateIp": primary.private_ip_address if primary else None,
                "region": CONFIG["region"],
                "version": "2017-09-30",
            }
            return 200, "application/json", json.dumps(doc)
        if not path.startswith("/latest/meta-data"):
            return 404, "text/plain", "not found"
        rest = path[len("/latest/meta-data") :].strip("/")
        node = _lookup(_tree(instance), [p for p in rest.split("/") if p])
        if node is None:
            return 404, "text/plain", "not found"
        if isinstance(node, dict):
            return 200, "text/plain", "\n".join(k + "/" if isinstance(v, dict) else k for k, v in node.items())
        return 200, "text/plain", node
