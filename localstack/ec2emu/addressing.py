"""Address allocation inside a subnet, as EC2 does it: unique, never one of the five
reserved addresses (network, router, DNS, future use, broadcast), /28 prefixes aligned
and wholly free. Pure functions over a set of used addresses."""

import ipaddress

PREFIX_LEN = 28
PREFIX_SIZE = 16


class InsufficientAddresses(Exception):
    pass


class InsufficientCidrBlocks(Exception):
    pass


def usable_bounds(cidr):
    """(first, last) usable addresses as ints: .0-.3 and the broadcast are reserved."""
    net = ipaddress.IPv4Network(cidr)
    first = int(net.network_address) + 4
    last = int(net.broadcast_address) - 1
    return first, last


def usable_count(cidr):
    first, last = usable_bounds(cidr)
    return max(0, last - first + 1)


def is_usable(cidr, ip):
    first, last = usable_bounds(cidr)
    return first <= int(ipaddress.IPv4Address(ip)) <= last


def prefix_addresses(prefix):
    net = ipaddress.IPv4Network(prefix)
    return range(int(net.network_address), int(net.network_address) + net.num_addresses)


def allocate_addresses(cidr, used, count):
    """The `count` lowest free usable addresses, or InsufficientAddresses."""
    if count <= 0:
        return []
    first, last = usable_bounds(cidr)
    out = []
    ip = first
    while ip <= last and len(out) < count:
        if ip not in used:
            out.append(str(ipaddress.IPv4Address(ip)))
        ip += 1
    if len(out) < count:
        raise InsufficientAddresses(f"wanted {count}, {len(out)} free")
    return out


def prefix_is_free(cidr, prefix, used):
    net = ipaddress.IPv4Network(prefix, strict=True)
    if net.prefixlen != PREFIX_LEN or not net.subnet_of(ipaddress.IPv4Network(cidr)):
        return False
    first, last = usable_bounds(cidr)
    addrs = prefix_addresses(prefix)
    return addrs[0] >= first and addrs[-1] <= last and not any(a in used for a in addrs)


def allocate_prefixes(cidr, used, count):
    """`count` aligned, wholly free /28 blocks (lowest first), or InsufficientCidrBlocks."""
    if count <= 0:
        return []
    net = ipaddress.IPv4Network(cidr)
    out = []
    taken = set(used)
    for block in net.subnets(new_prefix=PREFIX_LEN) if net.prefixlen <= PREFIX_LEN else []:
        if len(out) == count:
            break
        if prefix_is_free(cidr, str(block), taken):
            out.append(str(block))
            taken.update(prefix_addresses(str(block)))
    if len(out) < count:
        raise InsufficientCidrBlocks(f"wanted {count} /28, {len(out)} free")
    return out


def to_int(ip):
    return int(ipaddress.IPv4Address(ip))
