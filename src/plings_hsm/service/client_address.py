"""Find a request's client address, reading forwarding headers only from trusted proxies.

uvicorn's proxy middleware reads ``X-Forwarded-For`` only and trusts loopback by
default, so the service turns it off and reads ``X-Forwarded-For`` or ``Forwarded``
(RFC 7239) here. Only the header the proxies are configured to write is read, because a
client can put anything into the other one.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "IPNetwork",
    "ProxyHeader",
    "budget_key",
    "parse_networks",
    "resolve_client",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

IPV6_BUDGET_PREFIX = 64
"""IPv6 clients share one budget per /64, the smallest network a site is usually given."""

_FORWARDED_PAIR_RE = re.compile(
    r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)'
)


class ProxyHeader(enum.StrEnum):
    """The forwarding header the trusted proxies write."""

    X_FORWARDED_FOR = "x-forwarded-for"
    FORWARDED = "forwarded"


def parse_networks(text: str, variable: str) -> tuple[IPNetwork, ...]:
    """Parse a comma-separated list of addresses and CIDR networks.

    Raises:
        ValueError: naming ``variable`` and the entry that is not an address or network.
    """
    networks = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError as exc:
            raise ValueError(
                f"{variable} entry {entry!r} is not an IP address or CIDR network"
            ) from exc
    return tuple(networks)


def _parse_address(text: str) -> IPAddress | None:
    value = text.strip()
    if value.startswith("["):
        # "[2001:db8::1]" or "[2001:db8::1]:4711"
        value = value[1 : value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:
        # "192.0.2.1:4711"
        value = value.partition(":")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded_for(values: Iterable[str]) -> list[str]:
    hops = []
    for value in values:
        for element in _split_elements(value):
            hop = ""
            for match in _FORWARDED_PAIR_RE.finditer(element):
                if match.group(1).lower() == "for":
                    hop = match.group(2).strip('"').replace("\\", "")
            hops.append(hop)
    return hops


def _split_elements(value: str) -> list[str]:
    elements: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            elements.append("".join(current))
            current = []
            continue
        current.append(char)
    elements.append("".join(current))
    return elements


def _is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


def resolve_client(
    peer: str,
    header_values: Sequence[str],
    trusted: Sequence[IPNetwork],
    header: ProxyHeader,
) -> str:
    """Return the client address of a request.

    When the TCP peer is a trusted proxy, the hops of ``header`` are read from the right
    and the first hop that is not a trusted proxy is the client. A hop that is not an IP
    address (``unknown``, an obfuscated name, garbage) cannot be checked, so the request
    counts against the trusted proxy that reported it. When every hop is trusted, the
    leftmost one is the client.

    Args:
        peer: the TCP peer address.
        header_values: every value of the forwarding header, in the order received.
        trusted: the trusted proxy networks; empty means no header is ever read.
        header: which forwarding header the proxies write.
    """
    peer_address = _parse_address(peer)
    if peer_address is None or not trusted or not _is_trusted(peer_address, trusted):
        return str(peer_address) if peer_address is not None else peer

    if header is ProxyHeader.FORWARDED:
        hops = _forwarded_for(header_values)
    else:
        hops = [hop for value in header_values for hop in value.split(",")]

    client = peer_address
    for hop in reversed(hops):
        address = _parse_address(hop)
        if address is None:
            return str(client)
        client = address
        if not _is_trusted(address, trusted):
            return str(address)
    return str(client)


def budget_key(client: str) -> str:
    """Return the key under which a client address is budgeted: the address, or its /64."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        network = ipaddress.IPv6Network((address, IPV6_BUDGET_PREFIX), strict=False)
        return str(network)
    return str(address)
