"""The host's OVS bridge, kept as the contract says, through OVSDB (ovsdbapp's Open_vSwitch API).

Only differences are written: an unchanged bridge gets an empty transaction-free
pass. That matters because replacing the Controller row makes ``ovs-vswitchd``
drop the connection and flush every flow; the agent restarting must not do that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from ovsdbapp.backend.ovs_idl import connection, idlutils
from ovsdbapp.schema.open_vswitch import impl_idl

BRIDGE = "br0"
PROTOCOLS = ["OpenFlow13"]
CONTROLLER_RATE_LIMIT = 100  # packet-ins per second: they only carry rejects
CONTROLLER_BURST_LIMIT = 25
# How long (ms) a switch waits at most between attempts to reach a controller it lost. OVS's default
# is 8,000: its backoff doubles 1, 2, 4, 8 s while the controller is down, so a controller that took
# a few seconds to come back (its store read at 100k mappings) found its switches only up to 8 s
# later. 1,000 is the least rconn accepts (it counts whole seconds): a switch tries every second, so
# a restarted controller has every switch within a second of listening, at the cost of one refused
# TCP connect per second per switch while no controller is up (nothing while one is connected).
# Written only while the row is connected: see _ensure_controller_limits.
CONTROLLER_MAX_BACKOFF_MS = 1000
POKE_KEY = "portmesh-reconfigure"  # Controller external_ids key written to make OVS apply max_backoff again
STATUS_LAG_S = 15.0  # OVS refreshes Controller is_connected/status every ~5 s: after this, they are current
# The AFFINITY table (the controller's Table.AFFINITY, pinned equal by tests/switch/test_affinity_limit.py:
# the agent does not import the controller). It used to hold one learned flow per balanced connection and
# its Flow_Table row capped it (flow_limit=100000, overflow_policy=evict). Connections now live in conntrack
# zone 2 and AFFINITY holds only the controller's flows (a pin per backend and 256 buckets per balanced
# mapping, none with a timeout, so none evictable): a cap there would refuse the controller's adds past
# ~390 balanced mappings. The row keeps only the table's name, and the agent clears an older agent's cap.
# The SYN-flood bound is now conntrack's: OVS 3.1's schema has CT_Zone (timeout_policy) but no
# CT_Zone.limit, so zone 2 shares the datapath's connection limit (userspace: ct-set-maxconns, default
# 3,000,000) with OVS's default timeouts (docs/pipeline.md, AFFINITY).
AFFINITY_TABLE = 7
AFFINITY_TABLE_NAME = "AFFINITY"


def parse_controller_targets(text: str) -> tuple[str, ...]:
    """``tcp:IP:PORT[,tcp:IP:PORT...]`` as a tuple of targets; ValueError saying which one is wrong and why.

    One Controller row per target on br0 (several controller instances, issue 13). Duplicates are
    an error rather than silently merged: a repeated target is a typo in a deployment file.
    """
    targets = tuple(t.strip() for t in text.split(","))
    if not text.strip():
        raise ValueError("empty: expected tcp:IP:PORT[,tcp:IP:PORT...]")
    for target in targets:
        kind, _, rest = target.partition(":")
        host, _, port = rest.rpartition(":")
        if kind != "tcp" or not host or not port:
            raise ValueError(f"{target!r} is not tcp:IP:PORT")
        try:
            ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(f"{target!r}: {host!r} is not an IP address") from None
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{target!r}: port {port!r} is not 1-65535")
    if len(set(targets)) != len(targets):
        raise ValueError(f"{text!r} names a target twice")
    return targets


def default_datapath_type() -> str:
    """``system`` where the OVS kernel module is loaded, else the userspace ``netdev`` datapath."""
    return "system" if Path("/sys/module/openvswitch").exists() else "netdev"


@dataclass(frozen=True)
class BridgeSpec:
    """What br0 must look like on one host."""

    datapath_id: int
    hwaddr: str
    controllers: tuple[str, ...]  # one Controller row each, in this order
    datapath_type: str = ""
    name: str = BRIDGE
    local_mtu: int | None = None  # the bridge's own port (NetworkConfig.egress_mtu); None: OVS's choice

    @property
    def dpid_hex(self) -> str:
        """``other_config:datapath-id`` wants exactly 16 hex digits."""
        return f"{self.datapath_id:016x}"


class Bridge:
    """A connection to one host's ``ovsdb-server`` and the bridge kept on it."""

    def __init__(self, remote: str, timeout: float = 10.0) -> None:
        self.remote = remote
        self.timeout = timeout
        self.api: Any = None
        # Controller row UUID -> when this process wrote its max_backoff (or poked it): not yet seen
        # applied to a connection (see _backoff_unconfirmed). An agent restart starts empty: no writes.
        self._backoff_written: dict[str, float] = {}

    def start(self, wait: float = 30.0) -> None:
        """Connect, retrying while the server is not up yet (the lab starts everything at once)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                idl = connection.OvsdbIdl.from_server(self.remote, "Open_vSwitch")
                conn = connection.Connection(idl=idl, timeout=self.timeout)
                # ovsdbapp keeps ONE connection per API class for the whole process (the first ever
                # made, even once stopped): a class of its own per Bridge, so a second Bridge in one
                # process (tests, the bench: an agent restart, a fresh switch) gets its own IDL.
                api_class = type("BridgeIdl", (impl_idl.OvsdbIdl,), {"_ovsdb_connection": None})
                self.api = api_class(conn)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        if self.api is not None:
            self.api.ovsdb_connection.stop()
            self.api = None

    def _bridge_row(self, name: str) -> Any:
        return idlutils.row_by_value(self.api.idl, "Bridge", "name", name, None)

    def ensure(self, spec: BridgeSpec) -> bool:
        """Make br0 match ``spec``; return True if anything was written."""
        dp_type = spec.datapath_type or default_datapath_type()
        changed = False
        row = self._bridge_row(spec.name)
        with self.api.transaction(check_error=True) as txn:
            if row is None:
                txn.add(self.api.add_br(spec.name, may_exist=True, datapath_type=dp_type))
                changed = True
            columns: list[tuple[str, Any]] = []
            if row is None or row.datapath_type != dp_type:
                columns.append(("datapath_type", dp_type))
            if row is None or list(row.fail_mode) != ["secure"]:
                columns.append(("fail_mode", "secure"))
            if row is None or sorted(row.protocols) != PROTOCOLS:
                columns.append(("protocols", PROTOCOLS))
            other = dict(row.other_config) if row is not None else {}
            # disable-in-band: the controller is reached over the management network, never through
            # br0; in-band mode would add hidden NORMAL flows (priority 180000+) that flood ARP for
            # the public IPs to the containers and bypass the pipeline.
            wanted = {"hwaddr": spec.hwaddr, "datapath-id": spec.dpid_hex, "disable-in-band": "true"}
            if any(other.get(k) != v for k, v in wanted.items()):
                columns.append(("other_config", wanted))
            if columns:
                txn.add(self.api.db_set("Bridge", spec.name, *columns))
                changed = True
            # Compared as sets: OVSDB keeps a set of Controller rows, with no order to preserve. Only a
            # different set is written, and then only the difference: rows of targets that stay are
            # kept as they are (their max_backoff, see _ensure_controller_limits), new ones added.
            if row is None:
                txn.add(self.api.set_controller(spec.name, list(spec.controllers)))
                changed = True
            elif {c.target for c in row.controller} != set(spec.controllers):
                keep = [c.uuid for c in row.controller if c.target in spec.controllers]
                have = {c.target for c in row.controller}
                new = [self.api.db_create("Controller", target=t) for t in spec.controllers if t not in have]
                for command in new:
                    txn.add(command)
                txn.add(self.api.db_set("Bridge", spec.name, ("controller", [*keep, *new])))
                changed = True
        changed = self._ensure_local_mtu(spec) or changed
        changed = self._ensure_affinity_table(spec) or changed
        return self._ensure_controller_limits(spec) or changed

    def _ensure_affinity_table(self, spec: BridgeSpec) -> bool:
        """br0's Flow_Table row for AFFINITY: its name, and no cap (see AFFINITY_TABLE above).

        Read first, like every column here: an unchanged row means no transaction. A row that differs
        (an older agent's ``flow_limit``/``overflow_policy=evict``) is updated in place; another
        Flow_Table entry of the bridge, if any, is left as it is; a missing one is created and put in
        ``flow_tables`` under key 7 in one transaction.
        """
        row = self._bridge_row(spec.name)
        if row is None:
            return False
        wanted: list[tuple[str, Any]] = [
            ("name", AFFINITY_TABLE_NAME),
            ("flow_limit", []),
            ("overflow_policy", []),
            ("groups", []),
        ]
        table = dict(row.flow_tables).get(AFFINITY_TABLE)
        if table is not None:
            have = {"name": list(table.name), "flow_limit": list(table.flow_limit),
                    "overflow_policy": list(table.overflow_policy), "groups": list(table.groups)}
            stale = [(k, v) for k, v in wanted if have[k] != (v if isinstance(v, list) else [v])]
            if not stale:
                return False
            self.api.db_set("Flow_Table", table.uuid, *stale).execute(check_error=True)
            return True
        with self.api.transaction(check_error=True) as txn:
            new = txn.add(self.api.db_create("Flow_Table", name=AFFINITY_TABLE_NAME))
            txn.add(self.api.db_set("Bridge", spec.name, ("flow_tables", {AFFINITY_TABLE: new})))
        return True

    def _ensure_local_mtu(self, spec: BridgeSpec) -> bool:
        """``mtu_request`` on the bridge's internal interface: without it OVS gives that port the smallest
        MTU of the bridge's other ports, and OVS cuts TSO frames leaving by it to that size."""
        if spec.local_mtu is None:
            return False
        row = idlutils.row_by_value(self.api.idl, "Interface", "name", spec.name, None)
        if row is None or list(row.mtu_request) == [spec.local_mtu]:
            return False
        self.api.db_set("Interface", spec.name, ("mtu_request", spec.local_mtu)).execute(check_error=True)
        return True

    def _ensure_controller_limits(self, spec: BridgeSpec) -> bool:
        """Rate limits, out-of-band mode and ``max_backoff`` on each of br0's Controller rows.

        ``max_backoff`` is written only to a row whose connection is up (``is_connected``). OVS
        before 3.3 (Debian 12 ships 3.1.0) creates a controller's connection with the 8 s default
        whatever the row says, and applies the row's ``max_backoff`` to it only when it reconfigures
        while that connection is up (fixed by OVS commit 155f632e7, "connmgr: Fix ofconn
        configuration on vswitchd startup"); the connection keeps it across later reconnects. So
        the value set with the row, or before the switch first connected, was silently ignored
        (the bench did that and still waited up to 8 s). Written while connected, the write itself
        is that reconfiguration. An agent restart finds the value there and writes nothing.
        """
        row = self._bridge_row(spec.name)
        if row is None:
            return False
        commands = []
        for ctl in row.controller:
            columns: list[tuple[str, Any]] = []
            if (
                list(ctl.controller_rate_limit) != [CONTROLLER_RATE_LIMIT]
                or list(ctl.controller_burst_limit) != [CONTROLLER_BURST_LIMIT]
                or list(ctl.connection_mode) != ["out-of-band"]
            ):
                columns += [
                    ("controller_rate_limit", CONTROLLER_RATE_LIMIT),
                    ("controller_burst_limit", CONTROLLER_BURST_LIMIT),
                    ("connection_mode", "out-of-band"),
                ]
            if ctl.is_connected and list(ctl.max_backoff) != [CONTROLLER_MAX_BACKOFF_MS]:
                columns.append(("max_backoff", CONTROLLER_MAX_BACKOFF_MS))
            elif ctl.is_connected and self._backoff_unconfirmed(ctl):
                # Perhaps written while the connection was in fact down: make OVS reconfigure now
                # that it is up, with a change it does not act on.
                columns.append(("external_ids", {**dict(ctl.external_ids), POKE_KEY: str(int(time.time()))}))
            if columns:
                if any(name == "max_backoff" for name, _ in columns):
                    self._backoff_written[str(ctl.uuid)] = time.monotonic()
                commands.append(self.api.db_set("Controller", ctl.uuid, *columns))
        if commands:
            with self.api.transaction(check_error=True) as txn:
                for command in commands:
                    txn.add(command)
        return bool(commands)

    def _backoff_unconfirmed(self, ctl: Any) -> bool:
        """True once: STATUS_LAG_S after this process wrote ``ctl``'s max_backoff, if the row is up now.

        ``is_connected`` is refreshed by OVS only every ~5 s, so the write may have landed while the
        connection was in fact down (a controller restart, a frozen switch): OVS < 3.3 then applied
        it to no connection, and the one that came later still has OVS's 8 s. One more change to
        the row once the status is current makes OVS reconfigure with that connection up. Status
        columns cannot say whether it is needed (their own staleness blurs a connection's start by
        as much), so it is done once per write; an agent restart writes neither.
        """
        written = self._backoff_written.get(str(ctl.uuid))
        if written is None or time.monotonic() - written < STATUS_LAG_S:
            return False
        if dict(ctl.status).get("state") not in ("ACTIVE", "IDLE"):
            return False
        del self._backoff_written[str(ctl.uuid)]
        return True

    def ports(self, bridge: str = BRIDGE) -> set[str]:
        """Names of the bridge's ports, the bridge's own internal port excluded."""
        row = self._bridge_row(bridge)
        if row is None:
            return set()
        return {p.name for p in row.ports if p.name != bridge}

    def has_port(self, port: str, bridge: str = BRIDGE) -> bool:
        """True if ``port`` is on ``bridge``, without listing the bridge's ports.

        ``ports()`` reads every Port row's name (about 10 ms at 1,000 ports); calling it once
        per container made plumbing N containers cost O(N^2). The Port table's name index
        finds the row, and Port rows are not root rows (one exists only while a bridge holds
        it), so with a single bridge the row's existence is the answer; with several, the
        owning bridge's port list is checked by UUID.
        """
        row = next(iter(idlutils.index_lookup_all(self.api.tables["Port"], name=port)), None)
        if row is None:
            return False
        bridges = self.api.tables["Bridge"].rows
        owner = self._bridge_row(bridge)
        if owner is None:
            return False
        return len(bridges) == 1 or row.uuid in {p.uuid for p in owner.ports}

    def ensure_port(self, port: str, bridge: str = BRIDGE) -> bool:
        """Add ``port`` to the bridge unless it is there; True if added."""
        if self.has_port(port, bridge):
            return False
        self.api.add_port(bridge, port, may_exist=True).execute(check_error=True)
        return True

    def ensure_ports(self, ports: list[str], bridge: str = BRIDGE) -> list[str]:
        """Add every port of ``ports`` the bridge lacks, in ONE transaction; returns those added.

        ovs-vswitchd reconfigures all of a bridge's ports after each transaction that
        changes it: adding 1,000 ports one transaction at a time made it the bottleneck of
        a 1,000-container bring-up (O(N^2) port work). One transaction per agent pass instead.
        """
        missing = [p for p in dict.fromkeys(ports) if not self.has_port(p, bridge)]
        if missing:
            with self.api.transaction(check_error=True) as txn:
                for port in missing:
                    txn.add(self.api.add_port(bridge, port, may_exist=True))
        return missing

    def reattach_ports(self, ports: list[str], bridge: str = BRIDGE) -> list[str]:
        """Make ``ovs-vswitchd`` open each of ``ports`` afresh: remove those on the bridge, then add all.

        For veths just (re)made under a name the bridge already holds: with the
        userspace datapath, ovs-vswitchd keeps the port bound to the deleted device
        and never reads the new one. Removing and adding in ONE transaction leaves
        its configuration unchanged (nothing is reopened), so these are two: one
        removal transaction and one addition transaction for all ports. Returns
        the ports that were re-attached (on the bridge before).
        """
        present = [p for p in dict.fromkeys(ports) if self.has_port(p, bridge)]
        if present:
            with self.api.transaction(check_error=True) as txn:
                for port in present:
                    txn.add(self.api.del_port(port, bridge=bridge, if_exists=True))
        self.ensure_ports(list(ports), bridge)
        return present

    def remove_port(self, port: str, bridge: str = BRIDGE) -> bool:
        """Remove ``port`` from the bridge if it is there; True if removed."""
        if not self.has_port(port, bridge):
            return False
        self.api.del_port(port, bridge=bridge, if_exists=True).execute(check_error=True)
        return True
