"""DNS for `discover: dns://NAME:PORT`: the addresses a name resolves to, as the system's
resolver gives them (A and AAAA records, /etc/hosts; a Kubernetes headless Service answers with
one address per ready pod)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

RESOLVE_TIMEOUT = 5.0  # seconds; the resolver's own retries can take much longer

# getaddrinfo's answers for a name that exists nowhere or has no address: the name resolves to
# nothing (a headless Service without ready pods), which is not a failure to ask.
_NO_ADDRESS = {
    code
    for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None
}


async def resolve(host: str, port: int, timeout: float = RESOLVE_TIMEOUT) -> list[str]:
    """The IPv4 and IPv6 addresses `host` resolves to, each once, sorted (IPv4 first, then by
    value); [] when it resolves to none. Raises OSError when the answer could not be had (no
    DNS server answered in `timeout`, a server failure): the caller keeps what it knew."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP),
            timeout,
        )
    except socket.gaierror as exc:
        if exc.errno in _NO_ADDRESS:
            return []
        raise
    except TimeoutError:
        raise TimeoutError(f"no answer in {timeout:g}s") from None
    found = {str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)}
    return sorted(found, key=_order)


def _order(address: str) -> tuple[int, int, str]:
    ip = ipaddress.ip_address(address)
    return (ip.version, int(ip), address)
