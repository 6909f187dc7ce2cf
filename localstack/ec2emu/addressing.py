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


# --- IPv6: a subnet is a /64; addresses are /128s, prefixes (prefix delegation) /80s ----

PREFIX6_LEN = 80
PREFIX6_SHIFT = 128 - PREFIX6_LEN


def usable_bounds6(cidr):
    """(first, last) usable IPv6 addresses as ints: EC2 reserves the first four and the last."""
    net = ipaddress.IPv6Network(cidr)
    return int(net.network_address) + 4, int(net.broadcast_address) - 1


def to_int6(ip):
    return int(ipaddress.IPv6Address(ip))


def is_usable6(cidr, ip):
    try:
        first, last = usable_bounds6(cidr)
        return first <= to_int6(ip) <= last
    except ValueError:
        return False


def _prefix_of(ip_int):
    return ip_int >> PREFIX6_SHIFT << PREFIX6_SHIFT


def allocate_addresses6(cidr, used, prefixes, count):
    """The `count` lowest free usable addresses outside every delegated prefix (ints in
    `used`, prefix network ints in `prefixes`), or InsufficientAddresses."""
    if count <= 0:
        return []
    first, last = usable_bounds6(cidr)
    out = []
    ip = first
    while ip <= last and len(out) < count:
        if _prefix_of(ip) in prefixes:
            ip = _prefix_of(ip) + (1 << PREFIX6_SHIFT)
            continue
        if ip not in used:
            out.append(str(ipaddress.IPv6Address(ip)))
        ip += 1
    if len(out) < count:
        raise InsufficientAddresses(f"wanted {count}, {len(out)} free")
    return out


def prefix6_is_free(cidr, prefix, used, prefixes):
    net = ipaddress.IPv6Network(prefix, strict=True)
    if net.prefixlen != PREFIX6_LEN or not net.subnet_of(ipaddress.IPv6Network(cidr)):
        return False
    first, last = usable_bounds6(cidr)
    start = int(net.network_address)
    end = start + (1 << PREFIX6_SHIFT) - 1
    if start < first or end > last or start in prefixes:
        return False
    return not any(start <= a <= end for a in used)


def allocate_prefixes6(cidr, used, prefixes, count):
    """`count` wholly free /80 blocks of the /64 (lowest first), or InsufficientCidrBlocks."""
    if count <= 0:
        return []
    net = ipaddress.IPv6Network(cidr)
    if net.prefixlen > PREFIX6_LEN:
        raise InsufficientCidrBlocks(f"{cidr} is smaller than a /{PREFIX6_LEN}")
    busy = set(prefixes) | {_prefix_of(a) for a in used}
    out = []
    base = int(net.network_address)
    for k in range(1 << (PREFIX6_LEN - net.prefixlen)):
        if len(out) == count:
            break
        start = base + (k << PREFIX6_SHIFT)
        if start in busy:
            continue
        p = f"{ipaddress.IPv6Address(start)}/{PREFIX6_LEN}"
        if prefix6_is_free(cidr, p, used, busy):
            out.append(p)
            busy.add(start)
    if len(out) < count:
        raise InsufficientCidrBlocks(f"wanted {count} /{PREFIX6_LEN}, {len(out)} free")
    return out
