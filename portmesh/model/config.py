"""Network-wide constants of a portmesh cloud, overridable but never hard-coded elsewhere.

The defaults keep every address inside ranges reserved for documentation and
benchmarking (RFC 5737 / RFC 2544), so a lab can never talk to a real network.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network


@dataclass(frozen=True)
class NetworkConfig:
    """Addresses and sizes shared by the controller, the agents and the API.

    - ``public_pools``: public IPs that may be given to containers.
    - ``gateway_ip``/``gateway_mac``: the link-local next hop every container
      uses; the switch answers ARP and ICMP echo for it, the host's bridge port
      owns it as a /32 (``gateway_prefix``): the host claims no more of
      169.254.0.0/16, where public clouds put their metadata service.
    - ``virtual_mac``: the one MAC that ARP replies give for every public IP;
      the mapping table rewrites it to the owning container's MAC.
    - ``ephemeral_*``: the range carved into per-container source-port blocks.
    - ``container_mtu``: leaves 50 bytes of VXLAN header on a 1500 underlay.
    - ``egress_mtu``: the MTU of the bridge's own port (br0), through which containers' traffic
      reaches the host kernel and the outside. OVS 3.1's userspace TSO cuts a large frame into
      segments sized by the port it leaves by, not by the sender's segment size, so a
      container that lowered its path MTU (a client behind a narrower link) would still
      send 1450-byte packets into the host and stall. Frames leave by br0 in segments of at most
      ``min(egress_mtu, container_mtu)``; 1280 (IPv6's minimum link MTU) fits any path in
      practice. Inbound is not clamped: the pool routes carry ``mtu container_mtu``.
    - ``vxlan_vni``/``vxlan_port``: the VXLAN network id and UDP port of the tunnels between hosts.
    - ``protected_networks``: the management and underlay networks (controller,
      store, agents, API, tunnels); containers never reach them, nor anything
      in 169.254.0.0/16 but the gateway (pipeline and host firewall).
    """

    public_pools: tuple[IPv4Network, ...] = (IPv4Network("203.0.113.0/24"),)
    gateway_ip: IPv4Address = IPv4Address("169.254.1.1")  # noqa: RUF009 (immutable value)
    gateway_prefix: int = 32
    gateway_mac: str = "0a:00:00:00:00:01"
    virtual_mac: str = "0a:00:00:00:00:02"
    ephemeral_start: int = 32768
    ephemeral_end: int = 65535
    block_size: int = 1024
    container_mtu: int = 1450
    egress_mtu: int = 1280
    protected_networks: tuple[IPv4Network, ...] = (IPv4Network("198.18.0.0/15"),)
    vxlan_vni: int = 4242
    vxlan_port: int = 4789

    @property
    def bridge_port_mtu(self) -> int:
        """The MTU the host's bridge port (br0) gets: see ``egress_mtu``."""
        return min(self.egress_mtu, self.container_mtu)

    def container_mtus(self, outside_mtu: int | None) -> tuple[int, int | None]:
        """(eth0's MTU, the MTU of the container's routes to the public pools, or None for no such routes).

        ``outside_mtu`` is the MTU of the host's way out when that is a local uplink (a gateway
        host's ``--uplink``), else None. Only traffic that may cross a VXLAN tunnel needs
        ``container_mtu``: the containers of a host with an uplink reach the outside, and are
        reached from it, without one. There eth0 takes the uplink's MTU (when larger) and only the
        routes to the pools (containers that may live on other hosts) keep ``container_mtu``.
        That is worth about 10 % of inbound throughput through the userspace switch: a client's
        1448-byte segments instead of 1398 (issue 14, docs/deploy.md).
        """
        if outside_mtu is None or outside_mtu <= self.container_mtu:
            return self.container_mtu, None
        return outside_mtu, self.container_mtu

    def in_pools(self, ip: IPv4Address) -> bool:
        """True if ``ip`` belongs to one of the configured public pools."""
        return any(ip in pool for pool in self.public_pools)


DEFAULT_CONFIG = NetworkConfig()
