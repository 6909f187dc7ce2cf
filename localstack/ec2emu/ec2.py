"""Make moto's EC2 behave like EC2 where an IPAM daemon depends on it.

Patched in-process (moto's models are plain Python objects):
- addresses are unique in their subnet and never one of the 5 reserved ones; a subnet
  without enough free addresses answers InsufficientFreeAddressesInSubnet (moto spins);
- per-ENI address limits (PrivateIpAddressLimitExceeded) and ENI-count limits
  (AttachmentLimitExceeded) of the instance type, from moto's DescribeInstanceTypes data;
- AssignPrivateIpAddresses returns only the new addresses; /28 prefixes (Ipv4PrefixCount,
  Ipv4Prefixes) with InsufficientCidrBlocks on a fragmented subnet;
- a busy device index, deleting an attached ENI and detaching device 0 are refused;
- DeleteOnTermination is honoured (ModifyNetworkInterfaceAttribute and TerminateInstances);
- optionally, detaching takes time (status "detaching") as it does on EC2;
- each ENI has its own security groups (moto shows an attached ENI with its instance's
  groups added, which EC2 never does: custom networking puts pod ENIs in other groups);
- IPv6 as EC2 has it for prefix delegation: a VPC's Amazon-provided /56 is deterministic
  (2600:1f14:0:<n>00::/56 for the n-th), addresses are unique in the subnet's /64 and
  never reserved, /80 prefixes (Ipv6PrefixCount, Ipv6Prefixes) wholly free, both counted
  against the instance type's IPv6 addresses per interface; AssignIpv6Addresses returns
  only what it assigned (moto returns every address of the ENI); a subnet without an IPv6
  block refuses them.
"""

import threading
import time

from moto.core.responses import ActionResult, EmptyResult
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models.elastic_network_interfaces import NetworkInterface, NetworkInterfaceBackend
from moto.ec2.models.instance_types import INSTANCE_TYPES
from moto.ec2.models.instances import Instance
from moto.ec2.models import vpcs
from moto.ec2.models.subnets import Subnet
from moto.ec2.responses.elastic_network_interfaces import ElasticNetworkInterfaces
from moto.ec2.utils import add_tag_specification

from . import addressing

# One EC2 request at a time: EC2's own consistency, and moto is not thread-safe.
LOCK = threading.RLock()

# Seconds a detach takes before the ENI is "available" (0 = at once). Set by control.
# Quirks, off by default, reproduce answers a real or buggy EC2 endpoint gave that a
# daemon must survive: AssignPrivateIpAddresses echoing the ENI's primary address (and one
# address twice) among the new ones, as stock moto does; DescribeNetworkInterfaces
# listing the primary address without its Primary flag.
SETTINGS = {"detach_seconds": 0.0, "assign_echoes_primary": False, "describe_primary_unflagged": False}

# When each address / prefix / attachment appeared, for IMDS's eventual consistency.
APPEARED_AT = {}

# An ENI that was never attached may hold at most this many addresses (EC2's largest type).
UNATTACHED_ADDRESS_LIMIT = 50


class EmuError(EC2ClientError):
    def __init__(self, code, message):
        super().__init__(code, message)


def network_info(instance_type):
    info = INSTANCE_TYPES.get(instance_type, {}).get("NetworkInfo", {})
    return (
        int(info.get("MaximumNetworkInterfaces", 2)),
        int(info.get("Ipv4AddressesPerInterface", 2)),
    )


def eni_prefixes(eni):
    return [p["Ipv4Prefix"] for p in getattr(eni, "ipv4_prefixes", None) or []]


def eni_addresses(eni):
    return [a["PrivateIpAddress"] for a in eni.private_ip_addresses if a.get("PrivateIpAddress")]


def used_in_subnet(backend, subnet, include_reserved_for_instances=True):
    used = set()
    for eni in backend.enis.values():
        if eni.subnet.id != subnet.id:
            continue
        used.update(addressing.to_int(a) for a in eni_addresses(eni))
        for p in eni_prefixes(eni):
            used.update(addressing.prefix_addresses(p))
    if include_reserved_for_instances:
        used.update(addressing.to_int(a) for a in getattr(subnet, "_subnet_ips", {}))
    return used


def eni_ipv6(eni):
    return [a for a in getattr(eni, "ipv6_addresses", None) or [] if a]


def eni_prefixes6(eni):
    return [p["Ipv6Prefix"] for p in getattr(eni, "ipv6_prefixes", None) or []]


def subnet_ipv6_cidr(subnet):
    for assoc in (getattr(subnet, "ipv6_cidr_block_associations", None) or {}).values():
        cidr = assoc.get("ipv6CidrBlock")
        if cidr:
            return cidr
    return None


def used6_in_subnet(backend, subnet):
    """(address ints, /80 prefix network ints) on the subnet's ENIs."""
    addrs, prefixes = set(), set()
    for eni in backend.enis.values():
        if eni.subnet.id != subnet.id:
            continue
        addrs.update(addressing.to_int6(a) for a in eni_ipv6(eni))
        for p in eni_prefixes6(eni):
            prefixes.add(addressing.to_int6(p.split("/")[0]))
    return addrs, prefixes


def slots6_used(eni):
    return len(eni_ipv6(eni)) + len(eni_prefixes6(eni))


def slot6_limit(eni):
    if eni.instance is not None:
        return slot6_limit_of(eni.instance)
    return UNATTACHED_ADDRESS_LIMIT


def take_ipv6(backend, subnet, ips, count, prefixes, prefix_count, slots_now, limit):
    """Checks and allocates IPv6 addresses and /80 prefixes in `subnet`; returns (ips, prefixes)."""
    wanted = len(ips) + count + len(prefixes) + prefix_count
    if not wanted:
        return [], []
    cidr = subnet_ipv6_cidr(subnet)
    if cidr is None:
        raise EmuError(
            "InvalidParameterValue", f"The subnet {subnet.id} has no IPv6 CIDR block: it cannot hold IPv6 addresses."
        )
    if slots_now + wanted > limit:
        raise EmuError(
            "PrivateIpAddressLimitExceeded", "Number of IPv6 addresses and prefixes will exceed the interface's limit."
        )
    used, taken = used6_in_subnet(backend, subnet)
    for ip in ips:
        if not addressing.is_usable6(cidr, ip):
            raise EmuError("InvalidParameterValue", f"Address {ip} is not in {cidr} or is reserved.")
        n = addressing.to_int6(ip)
        if n in used or (n >> addressing.PREFIX6_SHIFT << addressing.PREFIX6_SHIFT) in taken:
            raise EmuError("InvalidIPAddress.InUse", f"Address {ip} is in use.")
        used.add(n)
    for p in prefixes:
        try:
            ok = addressing.prefix6_is_free(cidr, p, used, taken)
        except ValueError:
            ok = False
        if not ok:
            raise EmuError("InvalidParameterValue", f"Prefix {p} is not an aligned /80 within {cidr}, or is in use.")
        taken.add(addressing.to_int6(p.split("/")[0]))
    try:
        new_ips = list(ips) + addressing.allocate_addresses6(cidr, used, taken, count)
    except addressing.InsufficientAddresses:
        raise EmuError(
            "InsufficientFreeAddressesInSubnet", f"The specified subnet {subnet.id} does not have enough free addresses."
        )
    used.update(addressing.to_int6(a) for a in new_ips)
    try:
        new_prefixes = list(prefixes) + addressing.allocate_prefixes6(cidr, used, taken, prefix_count)
    except addressing.InsufficientCidrBlocks:
        raise EmuError(
            "InsufficientCidrBlocks", f"The specified subnet {subnet.id} does not have enough free cidr blocks."
        )
    return new_ips, new_prefixes


def assign6(self, eni_id, ips, count, prefixes, prefix_count):
    eni = self.get_network_interface(eni_id)
    new_ips, new_prefixes = take_ipv6(
        self, eni.subnet, ips, count, prefixes, prefix_count, slots6_used(eni), slot6_limit(eni)
    )
    eni.ipv6_addresses = eni_ipv6(eni) + new_ips
    eni.ipv6_prefixes = (getattr(eni, "ipv6_prefixes", None) or []) + [{"Ipv6Prefix": p} for p in new_prefixes]
    mark_appeared(*[(eni.id, a) for a in new_ips + new_prefixes])
    return eni, new_ips, new_prefixes


def unassign6(self, eni_id, ips, prefixes):
    eni = self.get_network_interface(eni_id)
    have, have_p = set(eni_ipv6(eni)), set(eni_prefixes6(eni))
    missing = [ip for ip in ips if ip not in have] + [p for p in prefixes if p not in have_p]
    if missing:
        raise EmuError(
            "InvalidParameterValue",
            f"Some of the specified IPv6 addresses or prefixes are not assigned to interface {eni.id}: "
            + ", ".join(missing),
        )
    eni.ipv6_addresses = [a for a in eni_ipv6(eni) if a not in ips]
    eni.ipv6_prefixes = [p for p in getattr(eni, "ipv6_prefixes", None) or [] if p["Ipv6Prefix"] not in prefixes]
    for k in ips + prefixes:
        APPEARED_AT.pop((eni.id, k), None)
    return eni


def slots_used(eni):
    return len(eni_addresses(eni)) + len(eni_prefixes(eni))


def slot_limit(eni):
    if eni.instance is not None:
        return network_info(eni.instance.instance_type)[1]
    return UNATTACHED_ADDRESS_LIMIT


def slot6_limit_of(instance):
    info = INSTANCE_TYPES.get(instance.instance_type, {}).get("NetworkInfo", {})
    return int(info.get("Ipv6AddressesPerInterface", 0))


def limit_error():
    return EmuError("PrivateIpAddressLimitExceeded", "Number of private addresses will exceed limit.")


def allocate(subnet, used, count):
    try:
        return addressing.allocate_addresses(subnet.cidr_block, used, count)
    except addressing.InsufficientAddresses:
        raise EmuError(
            "InsufficientFreeAddressesInSubnet",
            f"The specified subnet {subnet.id} does not have enough free addresses to satisfy the request.",
        )


def allocate_prefixes(subnet, used, count):
    try:
        return addressing.allocate_prefixes(subnet.cidr_block, used, count)
    except addressing.InsufficientCidrBlocks:
        raise EmuError(
            "InsufficientCidrBlocks",
            f"The specified subnet {subnet.id} does not have enough free cidr blocks to satisfy the request.",
        )


def check_explicit(subnet, ips, used):
    for ip in ips:
        if not addressing.is_usable(subnet.cidr_block, ip):
            raise EmuError(
                "InvalidParameterValue",
                f"Address {ip} does not fall within the subnet's address range or is reserved.",
            )
        if addressing.to_int(ip) in used:
            raise EmuError("InvalidIPAddress.InUse", f"Address {ip} is in use.")


def check_explicit_prefixes(subnet, prefixes, used):
    for p in prefixes:
        try:
            ok = addressing.prefix_is_free(subnet.cidr_block, p, used)
        except ValueError:
            ok = False
        if not ok:
            raise EmuError(
                "InvalidParameterValue",
                f"Prefix {p} is not an aligned /28 within {subnet.cidr_block}, or is in use.",
            )


def mark_appeared(*keys):
    now = time.monotonic()
    for k in keys:
        APPEARED_AT[k] = now


# --- backend patches -------------------------------------------------------------

_orig_create = NetworkInterfaceBackend.create_network_interface


def create_network_interface(
    self,
    subnet,
    private_ip_address,
    private_ip_addresses=None,
    group_ids=None,
    description=None,
    tags=None,
    delete_on_termination=False,
    **kwargs,
):
    if isinstance(subnet, str):
        subnet = self.get_subnet(subnet)
    secondary = int(kwargs.pop("secondary_ips_count", 0) or 0)
    prefix_count = int(kwargs.pop("ipv4_prefix_count", 0) or 0)
    prefixes = list(kwargs.pop("ipv4_prefixes", None) or [])
    ipv6_ips = [a for a in kwargs.pop("ipv6_addresses", None) or [] if a]
    ipv6_count = int(kwargs.pop("ipv6_address_count", 0) or 0)
    ipv6_prefixes = list(kwargs.pop("ipv6_prefixes", None) or [])
    ipv6_prefix_count = int(kwargs.pop("ipv6_prefix_count", 0) or 0)
    if isinstance(private_ip_address, list):
        private_ip_address = private_ip_address[0] if private_ip_address else None
    explicit = []
    for item in private_ip_addresses or []:
        ip = item.get("PrivateIpAddress") if isinstance(item, dict) else item
        primary = item.get("Primary") if isinstance(item, dict) else False
        if primary and not private_ip_address:
            private_ip_address = ip
        elif ip and ip != private_ip_address:
            explicit.append(ip)
    if 1 + len(explicit) + secondary + len(prefixes) + prefix_count > UNATTACHED_ADDRESS_LIMIT:
        raise limit_error()
    # Only addresses on ENIs conflict with an explicit primary: RunInstances reserves
    # the instance's primary address in the subnet just before creating its ENI.
    on_enis = used_in_subnet(self, subnet, include_reserved_for_instances=False)
    check_explicit(subnet, explicit + ([private_ip_address] if private_ip_address else []), on_enis)
    used = used_in_subnet(self, subnet)
    if not private_ip_address:
        private_ip_address = allocate(subnet, used, 1)[0]
    used.add(addressing.to_int(private_ip_address))
    used.update(addressing.to_int(a) for a in explicit)
    secondaries = explicit + allocate(subnet, used, secondary)
    used.update(addressing.to_int(a) for a in secondaries)
    check_explicit_prefixes(subnet, prefixes, used)
    for p in prefixes:
        used.update(addressing.prefix_addresses(p))
    prefixes += allocate_prefixes(subnet, used, prefix_count)
    new6, new6_prefixes = take_ipv6(
        self, subnet, ipv6_ips, ipv6_count, ipv6_prefixes, ipv6_prefix_count, 0, UNATTACHED_ADDRESS_LIMIT
    )
    if kwargs.get("device_index") == 0 and description == "Primary network interface":
        delete_on_termination = True  # as RunInstances does for the primary ENI
    addrs = [{"Primary": True, "PrivateIpAddress": private_ip_address}] + [
        {"Primary": False, "PrivateIpAddress": ip} for ip in secondaries
    ]
    eni = _orig_create(
        self,
        subnet,
        private_ip_address,
        addrs,
        group_ids=group_ids,
        description=description,
        tags=tags,
        delete_on_termination=delete_on_termination,
        **kwargs,
    )
    eni.ipv4_prefixes = [{"Ipv4Prefix": p} for p in prefixes]
    eni.ipv6_addresses = new6
    eni.ipv6_prefixes = [{"Ipv6Prefix": p} for p in new6_prefixes]
    mark_appeared(*[(eni.id, a) for a in [private_ip_address] + secondaries], *[(eni.id, p) for p in prefixes])
    mark_appeared(*[(eni.id, a) for a in new6 + new6_prefixes])
    return eni


def assign(self, eni_id, ips, count, prefixes, prefix_count):
    eni = self.get_network_interface(eni_id)
    if slots_used(eni) + len(ips) + count + len(prefixes) + prefix_count > slot_limit(eni):
        raise limit_error()
    used = used_in_subnet(self, eni.subnet)
    check_explicit(eni.subnet, ips, used)
    used.update(addressing.to_int(a) for a in ips)
    new_ips = list(ips) + allocate(eni.subnet, used, count)
    used.update(addressing.to_int(a) for a in new_ips)
    check_explicit_prefixes(eni.subnet, prefixes, used)
    for p in prefixes:
        used.update(addressing.prefix_addresses(p))
    new_prefixes = list(prefixes) + allocate_prefixes(eni.subnet, used, prefix_count)
    eni.private_ip_addresses.extend({"Primary": False, "PrivateIpAddress": ip} for ip in new_ips)
    eni.ipv4_prefixes = (getattr(eni, "ipv4_prefixes", None) or []) + [
        {"Ipv4Prefix": p} for p in new_prefixes
    ]
    mark_appeared(*[(eni.id, a) for a in new_ips], *[(eni.id, p) for p in new_prefixes])
    return eni, new_ips, new_prefixes


def unassign(self, eni_id, ips, prefixes):
    eni = self.get_network_interface(eni_id)
    have = set(eni_addresses(eni))
    missing = [ip for ip in ips if ip not in have] + [p for p in prefixes if p not in eni_prefixes(eni)]
    if missing:
        raise EmuError(
            "InvalidParameterValue",
            f"Some of the specified addresses are not assigned to interface {eni.id}: {', '.join(missing)}",
        )
    if eni.private_ip_address in ips:
        raise EmuError("InvalidParameterValue", f"The primary address {eni.private_ip_address} cannot be unassigned.")
    eni.private_ip_addresses = [a for a in eni.private_ip_addresses if a.get("PrivateIpAddress") not in ips]
    eni.ipv4_prefixes = [p for p in getattr(eni, "ipv4_prefixes", None) or [] if p["Ipv4Prefix"] not in prefixes]
    for k in ips + prefixes:
        APPEARED_AT.pop((eni.id, k), None)
    return eni


def attach(self, eni_id, instance_id, device_index):
    eni = self.get_network_interface(eni_id)
    instance = self.get_instance(instance_id)
    device_index = int(device_index)
    if eni.instance is not None or eni.status != "available":
        raise EmuError("InvalidParameterValue", f"Interface {eni.id} is currently in use.")
    max_enis, per_eni = network_info(instance.instance_type)
    if device_index in instance.nics:
        raise EmuError(
            "InvalidParameterValue",
            f"Instance '{instance.id}' already has an interface attached at device index '{device_index}'.",
        )
    if len(instance.nics) >= max_enis:
        raise EmuError(
            "AttachmentLimitExceeded",
            f"Interface count {len(instance.nics) + 1} exceeds the limit for {instance.instance_type}",
        )
    if slots_used(eni) > per_eni or slots6_used(eni) > slot6_limit_of(instance):
        raise limit_error()
    if eni.subnet.availability_zone != instance._placement.zone:
        raise EmuError(
            "InvalidParameterCombination",
            f"You may not attach a network interface to an instance if they are not in the same availability zone",
        )
    instance.attach_eni(eni, device_index)
    eni.delete_on_termination = False
    mark_appeared((eni.id, "attachment"))
    return eni.attachment


def detach(self, attachment_id, force=False):
    for eni in list(self.enis.values()):
        if eni.attachment_id != attachment_id:
            continue
        if eni.device_index == 0:
            raise EmuError(
                "OperationNotPermitted",
                f"The network interface at device index 0 cannot be detached.",
            )
        instance = eni.instance
        APPEARED_AT.pop((eni.id, "attachment"), None)
        seconds = SETTINGS["detach_seconds"]
        if seconds <= 0:
            instance.detach_eni(eni)
            return
        eni.status = "detaching"

        def finish():
            with LOCK:
                if eni.status == "detaching" and eni.instance is instance:
                    instance.detach_eni(eni)

        t = threading.Timer(seconds, finish)
        t.daemon = True
        t.start()
        return
    raise EmuError("InvalidAttachmentID.NotFound", f"The attachment ID '{attachment_id}' does not exist")


_orig_delete = NetworkInterfaceBackend.delete_network_interface


def delete(self, eni_id):
    eni = self.get_network_interface(eni_id)
    if eni.instance is not None or eni.status != "available":
        raise EmuError("InvalidNetworkInterface.InUse", f"Interface: [{eni.id}] in use.")
    for k in [k for k in APPEARED_AT if k[0] == eni.id]:
        APPEARED_AT.pop(k, None)
    _orig_delete(self, eni_id)


def get_available_subnet_ip(self, instance):
    ip = allocate(self, used_in_subnet(self.ec2_backend, self), 1)[0]
    self._subnet_ips[ip] = instance
    return ip


_orig_terminate = Instance.terminate


def terminate(self):
    # EC2 detaches ENIs without DeleteOnTermination; they stay "available".
    for idx, nic in list(self.nics.items()):
        if not nic.delete_on_termination and idx != 0:
            self.detach_eni(nic)
    for nic in list(self.nics.values()):
        if nic.delete_on_termination:
            nic.instance = None
            nic.attachment_id = None
            nic.status = "available"
            try:
                self.ec2_backend.enis.pop(nic.id, None)
            except AttributeError:
                pass
    self.nics = {i: n for i, n in self.nics.items() if n.id in self.ec2_backend.enis}
    for ip in list(self._private_ips):
        subnet = self.ec2_backend.get_subnet(self.subnet_id) if self.subnet_id else None
        if subnet is not None:
            subnet._subnet_ips.pop(ip, None)
    return _orig_terminate(self)


# --- response patches (the query parameters moto does not read) ------------------


def _strs(values, key):
    out = []
    for v in values or []:
        out.append(v.get(key) if isinstance(v, dict) else v)
    return [v for v in out if v]


def resp_create_network_interface(self):
    subnet = self.ec2_backend.get_subnet(self._get_param("SubnetId"))
    self.error_on_dryrun()
    eni = self.ec2_backend.create_network_interface(
        subnet,
        self._get_param("PrivateIpAddress"),
        self._get_param("PrivateIpAddresses", []),
        self._get_param("Groups", []),
        self._get_param("Description"),
        add_tag_specification(self._get_param("TagSpecifications", [])),
        secondary_ips_count=self._get_int_param("SecondaryPrivateIpAddressCount", 0),
        ipv4_prefix_count=self._get_int_param("Ipv4PrefixCount", 0),
        ipv4_prefixes=_strs(self._get_param("Ipv4Prefixes", []), "Ipv4Prefix"),
        ipv6_addresses=_strs(self._get_param("Ipv6Addresses", []), "Ipv6Address"),
        ipv6_address_count=self._get_int_param("Ipv6AddressCount", 0),
        ipv6_prefixes=_strs(self._get_param("Ipv6Prefixes", []), "Ipv6Prefix"),
        ipv6_prefix_count=self._get_int_param("Ipv6PrefixCount", 0),
    )
    return ActionResult({"NetworkInterface": eni})


def resp_assign_ipv6_addresses(self):
    eni, ips, prefixes = assign6(
        self.ec2_backend,
        self._get_param("NetworkInterfaceId"),
        _strs(self._get_param("Ipv6Addresses", []), "Ipv6Address"),
        self._get_int_param("Ipv6AddressCount", 0),
        _strs(self._get_param("Ipv6Prefixes", []), "Ipv6Prefix"),
        self._get_int_param("Ipv6PrefixCount", 0),
    )
    return ActionResult(
        {"NetworkInterfaceId": eni.id, "AssignedIpv6Addresses": ips, "AssignedIpv6Prefixes": prefixes}
    )


def resp_unassign_ipv6_addresses(self):
    ips = _strs(self._get_param("Ipv6Addresses", []), "Ipv6Address")
    prefixes = _strs(self._get_param("Ipv6Prefixes", []), "Ipv6Prefix")
    eni = unassign6(self.ec2_backend, self._get_param("NetworkInterfaceId"), ips, prefixes)
    return ActionResult(
        {"NetworkInterfaceId": eni.id, "UnassignedIpv6Addresses": ips, "UnassignedIpv6Prefixes": prefixes}
    )


def resp_assign_private_ip_addresses(self):
    eni, ips, prefixes = assign(
        self.ec2_backend,
        self._get_param("NetworkInterfaceId"),
        _strs(self._get_param("PrivateIpAddresses", []), "PrivateIpAddress"),
        self._get_int_param("SecondaryPrivateIpAddressCount", 0),
        _strs(self._get_param("Ipv4Prefixes", []), "Ipv4Prefix"),
        self._get_int_param("Ipv4PrefixCount", 0),
    )
    if SETTINGS.get("assign_echoes_primary") and ips:
        ips = [eni.private_ip_address, ips[0], *ips]
    return ActionResult(
        {
            "NetworkInterfaceId": eni.id,
            "AssignedPrivateIpAddresses": [{"PrivateIpAddress": ip} for ip in ips],
            "AssignedIpv4Prefixes": [{"Ipv4Prefix": p} for p in prefixes],
        }
    )


def resp_unassign_private_ip_addresses(self):
    unassign(
        self.ec2_backend,
        self._get_param("NetworkInterfaceId"),
        _strs(self._get_param("PrivateIpAddresses", []), "PrivateIpAddress"),
        _strs(self._get_param("Ipv4Prefixes", []), "Ipv4Prefix"),
    )
    return EmptyResult()


_orig_resp_modify = ElasticNetworkInterfaces.modify_network_interface_attribute


def resp_modify_network_interface_attribute(self):
    dot = self._get_param("Attachment.DeleteOnTermination")
    if dot is None:
        att = self._get_param("Attachment") or {}
        dot = att.get("DeleteOnTermination") if isinstance(att, dict) else None
    if dot is not None:
        eni = self.ec2_backend.get_network_interface(self._get_param("NetworkInterfaceId"))
        if eni.attachment_id is None:
            raise EmuError("InvalidParameterValue", f"Interface {eni.id} is not attached.")
        eni.delete_on_termination = str(dot).lower() == "true"
        return EmptyResult()
    return _orig_resp_modify(self)


def _eni_group_set(self):
    # The primary ENI's groups are the instance's; any other ENI has only its own.
    if self.instance is not None and getattr(self, "device_index", None) == 0 and not self._group_set:
        return list(self.instance.security_groups)
    return self._group_set


def install():
    NetworkInterface.group_set = property(_eni_group_set)
    NetworkInterfaceBackend.create_network_interface = create_network_interface
    NetworkInterfaceBackend.delete_network_interface = delete
    NetworkInterfaceBackend.attach_network_interface = attach
    NetworkInterfaceBackend.detach_network_interface = detach
    Subnet.get_available_subnet_ip = get_available_subnet_ip
    Instance.terminate = terminate
    ElasticNetworkInterfaces.create_network_interface = resp_create_network_interface
    ElasticNetworkInterfaces.assign_private_ip_addresses = resp_assign_private_ip_addresses
    ElasticNetworkInterfaces.unassign_private_ip_addresses = resp_unassign_private_ip_addresses
    ElasticNetworkInterfaces.modify_network_interface_attribute = resp_modify_network_interface_attribute
    ElasticNetworkInterfaces.assign_ipv6_addresses = resp_assign_ipv6_addresses
    ElasticNetworkInterfaces.unassign_ipv6_addresses = resp_unassign_ipv6_addresses
    vpcs.random_ipv6_cidr = _next_vpc_ipv6_cidr


_VPC_IPV6_SEQ = [0]


def _next_vpc_ipv6_cidr():
    # Amazon-provided blocks, in order: 2600:1f14:0:100::/56, 2600:1f14:0:200::/56, ...
    _VPC_IPV6_SEQ[0] += 1
    return f"2600:1f14:0:{_VPC_IPV6_SEQ[0]:x}00::/56"


def _available_ip_address_count(self):
    used = used_in_subnet(self.ec2_backend, self, include_reserved_for_instances=False)
    return max(0, addressing.usable_count(self.cidr_block) - len(used))


Subnet.available_ip_address_count = property(_available_ip_address_count)
