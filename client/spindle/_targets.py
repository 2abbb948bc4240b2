"""Where a channel connects: one address as given, or several balanced with gRPC's ``round_robin``.

A single ``host:port`` goes to grpc unchanged (its default ``pick_first``), so nothing changes
for the common case. Several addresses (a list, or ``"h1:p1,h2:p2"``) become one ``ipv4:`` or
``ipv6:`` target, the static address lists grpc's own resolvers understand; a name in such a
list is looked up once, when the channel is made. A target that names a resolver (``dns:///name:port``,
``ipv4:...``, ``ipv6:...``) is passed through. Both balance with ``round_robin``: every call goes to
the next connected replica, and one that is down is skipped until it comes back.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass

ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:")


@dataclass(frozen=True)
class ChannelTarget:
    """What grpc is given: the target URI, and whether to balance over what it resolves to."""

    uri: str
    balanced: bool = False
    # The first address as the user wrote it: the :authority header and the name TLS checks the
    # server's certificate against (grpc would use the whole address list otherwise).
    authority: str | None = None


def join(target: str | Sequence[str]) -> str:
    """One target string: a list of addresses becomes ``"h1:p1,h2:p2"``."""
    if isinstance(target, str):
        return target.strip()
    addresses = [address.strip() for address in target]
    if not addresses or any(not address or "," in address for address in addresses):
        raise ValueError(f"target list needs addresses host:port, got {list(target)!r}")
    return ",".join(addresses)


def channel_target(target: str) -> ChannelTarget:
    """The grpc target for ``target`` (see the module's docstring); ValueError if it cannot be."""
    if target.startswith(RESOLVER_SCHEMES):
        return ChannelTarget(target, balanced=True)
    if "," not in target:
        return ChannelTarget(target)
    addresses = [address.strip() for address in target.split(",")]
    resolved = [_resolve(address) for address in addresses]
    for family, scheme in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        if all(any(f == family for f, _ in entry) for entry in resolved):
            listed = [a for entry in resolved for f, a in entry if f == family]
            uri = f"{scheme}:{','.join(dict.fromkeys(listed))}"
            return ChannelTarget(uri, balanced=True, authority=addresses[0])
    raise ValueError(f"the addresses of target {target!r} are not all IPv4 or all IPv6")


def _resolve(address: str) -> list[tuple[socket.AddressFamily, str]]:
    """(family, "ip:port") for each address of ``host:port`` (an IP literal or a name)."""
    host, port = _split(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return (
            [(socket.AF_INET, f"{ip}:{port}")] if ip.version == 4 else [(socket.AF_INET6, f"[{ip}]:{port}")]
        )
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"cannot resolve {host!r} of target address {address!r}: {exc}") from exc
    entries: list[tuple[socket.AddressFamily, str]] = []
    for family, _, _, _, sockaddr in found:
        if family == socket.AF_INET:
            entries.append((family, f"{sockaddr[0]}:{port}"))
        elif family == socket.AF_INET6:
            entries.append((family, f"[{sockaddr[0]}]:{port}"))
    return entries


def _split(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into its parts; a port is required in a list."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target address {address!r} is not host:port")
    return host, int(port)
