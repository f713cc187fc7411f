"""Finding the coordinator on the LAN: mDNS/DNS-SD, as a hint only.

The coordinator advertises ``_planetary-mesh._tcp.local.`` on its interfaces, with TXT records
for the mesh's name, the SHA-256 of its CA's public key (the hash every join token carries) and
its version. An agent or client that has a token or a certificate, but no address, browses for
the service and keeps only advertisements whose CA hash is the one it trusts: a second mesh on
the LAN, or a rogue advertiser, is ignored. Discovery proves nothing: the TLS connection that
follows still pins the CA, and is the only proof.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from dataclasses import dataclass

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from planetary_mesh.errors import DiscoveryError

log = logging.getLogger(__name__)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SERVICE_TYPE = "_planetary-mesh._tcp.local."
RESOLVE_TIMEOUT_MS = 1500


@dataclass(frozen=True)
class Advertised:
    """One coordinator seen on the LAN."""

    name: str  # the DNS-SD instance name
    mesh: str
    ca_hash: str
    version: str
    addresses: tuple[str, ...]  # as advertised (IPv6 link-local ones with their %scope)
    port: int

    def urls(self) -> list[str]:
        """https URLs for each address, IPv4 first."""
        ordered = sorted(self.addresses, key=lambda a: ":" in a)
        return [
            f"https://[{a}]:{self.port}" if ":" in a else f"https://{a}:{self.port}"
            for a in ordered
        ]


def interface_addresses() -> list[tuple[str, IPAddress]]:
    """(interface, address) for every address of this machine but loopback."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                continue
            if not address.is_loopback:
                found.append((adapter.nice_name, address))
    return found


def lan_addresses() -> list[str]:
    """This machine's addresses worth advertising: not loopback; IPv6 link-local left out (an
    address without its interface cannot be dialled from another machine's view)."""
    usable = {
        str(address)
        for _, address in interface_addresses()
        if not (address.is_link_local or address.is_unspecified)
    }
    return sorted(usable)


def advertised_addresses(listen_host: str) -> list[str]:
    """What to advertise for a coordinator listening on ``listen_host``."""
    if listen_host in ("", "0.0.0.0", "::", "[::]"):
        return lan_addresses()
    try:
        address = ipaddress.ip_address(listen_host.strip("[]"))
    except ValueError:
        return lan_addresses()  # a name: advertise where it can be reached
    return [] if address.is_loopback else [str(address)]


class Advertiser:
    """The coordinator's advertisement, for as long as it runs."""

    def __init__(self, mesh: str, ca_hash: str, version: str, port: int, addresses: list[str]):
        self.mesh = mesh
        self.ca_hash = ca_hash
        self.version = version
        self.port = port
        self.addresses = addresses
        self._zeroconf: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    async def start(self) -> None:
        """Advertise; raises DiscoveryError (the coordinator then runs without mDNS)."""
        if not self.addresses:
            raise DiscoveryError(
                "no LAN address to advertise (the coordinator listens on loopback only):"
                " agents must be given --coordinator"
            )
        instance = f"{self.mesh} {self.ca_hash[:12]}.{SERVICE_TYPE}"
        self._info = self._record(instance, f"pm-{self.ca_hash[:12]}.local.")
        try:
            self._zeroconf = AsyncZeroconf(
                interfaces=InterfaceChoice.All, ip_version=_ip_version(self.addresses)
            )
            await self._zeroconf.async_register_service(self._info, allow_name_change=True)
        except Exception as error:  # zeroconf raises its own tree, and OSError
            await self.stop()
            raise DiscoveryError(f"cannot advertise the mesh over mDNS: {error}") from error
        except BaseException:  # cancelled while probing: leave no sockets behind
            await self.stop()
            raise

    async def update(self, addresses: list[str]) -> None:
        """Advertise ``addresses`` from now on (DHCP gave this machine another one)."""
        if not addresses or addresses == self.addresses:
            return
        if self._zeroconf is None or self._info is None:
            return
        self.addresses = addresses
        # Under the name it was registered with (changed on a clash, or not).
        self._info = self._record(self._info.name, self._info.server)
        await self._zeroconf.async_update_service(self._info)

    def _record(self, name: str, server: str | None) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            name,
            parsed_addresses=self.addresses,
            port=self.port,
            properties={"mesh": self.mesh, "ca": self.ca_hash, "version": self.version},
            server=server,
        )

    async def stop(self) -> None:
        if self._zeroconf is not None:
            with contextlib.suppress(Exception):
                if self._info is not None:
                    await self._zeroconf.async_unregister_service(self._info)
            with contextlib.suppress(Exception):
                await self._zeroconf.async_close()
            self._zeroconf = None


def _ip_version(addresses: list[str]) -> IPVersion:
    v6 = any(":" in a for a in addresses)
    v4 = any(":" not in a for a in addresses)
    return IPVersion.All if v4 and v6 else IPVersion.V6Only if v6 else IPVersion.V4Only


async def browse(seconds: float) -> list[Advertised]:
    """Every mesh coordinator that answers within ``seconds``, over IPv4 and IPv6."""
    zeroconf = AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.All)
    names: set[str] = set()

    def changed(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.add(name)

    browser = AsyncServiceBrowser(zeroconf.zeroconf, [SERVICE_TYPE], handlers=[changed])
    try:
        await asyncio.sleep(seconds)
        found = []
        for name in sorted(names):
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(zeroconf.zeroconf, RESOLVE_TIMEOUT_MS):
                continue
            props = {
                k.decode(errors="replace"): (v or b"").decode(errors="replace")
                for k, v in info.properties.items()
            }
            addresses = tuple(info.parsed_scoped_addresses())
            if info.port is None or not addresses:
                continue
            found.append(
                Advertised(
                    name=name,
                    mesh=props.get("mesh", ""),
                    ca_hash=props.get("ca", ""),
                    version=props.get("version", ""),
                    addresses=addresses,
                    port=info.port,
                )
            )
        return found
    finally:
        await browser.async_cancel()
        await zeroconf.async_close()


async def find_coordinator(
    ca_hash: str, seconds: float = 3.0
) -> tuple[list[str], list[Advertised]]:
    """URLs of the coordinator whose CA hash is ``ca_hash`` (best first), and the other meshes
    seen (ignored: another CA)."""
    try:
        seen = await browse(seconds)
    except Exception as error:  # zeroconf's own tree, OSError: no multicast socket here at all
        raise DiscoveryError(
            f"cannot look for the coordinator over mDNS ({error}): pass --coordinator"
            " https://HOST:PORT"
        ) from error
    mine = [a for a in seen if a.ca_hash == ca_hash]
    others = [a for a in seen if a.ca_hash != ca_hash]
    return [url for a in mine for url in a.urls()], others


def describe_others(others: list[Advertised]) -> str:
    if not others:
        return "no mesh answered over mDNS"
    listed = ", ".join(f"{a.mesh or a.name} (CA {a.ca_hash[:12]}…)" for a in others)
    return f"only meshes with another CA answered (ignored): {listed}"
