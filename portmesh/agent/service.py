"""The host agent: make this host's bridge and containers match the store, and say how far it got.

One asyncio loop. The store's monitor wakes it (never polling the store), and so
do the container engine's events (a restarted image container has a new network
namespace to plumb); a slow timer only re-checks the light containers'
processes, which have neither. Containers with an image go to the image runtime
(Docker/Podman), the others to the light runtime.
Every step is idempotent and reads before it writes, so the agent may be
killed and restarted at any time: it adopts the bridge, the plumbing and the
processes it finds (the runtime recorded their PIDs) and disturbs no traffic.

A pass converges only the containers whose desired state (the Container row and
its desired run state) changed since they last settled; every
``recheck_interval`` one full pass re-checks them all (processes that died,
plumbing changed behind our back: see _find_drift, and the host gateway) and sweeps
orphan ports. Before, every store
change -- including the agent's own status reports -- re-converged every
container (runtime records rewritten, namespaces listed, the bridge's ports read
per container), so bringing up N containers cost O(N^2): at 1,000 containers,
seconds per pass. Containers with an image are checked on every pass (their
engine's events wake the agent).

With ``--uplink IFACE`` (a gateway host) the agent makes IFACE a br0 port, reports it in
its Host row (the controller compiles the uplink's flows: inbound pool traffic is mapped
straight from it) and drops the kernel's copy of that traffic at IFACE's ingress
(isolation.ensure_uplink), in that order, so a frame is never lost while the switch
takes over; the host keeps its address on IFACE and routes everything else.

With ``--datapath ebpf`` the host runs the eBPF datapath (ebpf/host.py) instead of OVS: the
same plumbing and tunnels, the same port verbs (a port is a device with the datapath's program
at its ingress), and after the containers one more step: the desired state compiled into the
datapath's maps and the difference written, after which the agent itself reports the host's
switch generation (on an OVS host the controller does). Its store view is the whole state:
the maps hold every mapping of the cloud, as an OVS switch's flows do.

With ``--underlay-dev`` the agent also keeps this host's part of the VXLAN mesh
(tunnels.py): one kernel VXLAN device per peer host as a plain br0 port, made
when the store's hosts change and re-checked on every full pass, and the host
firewall's list of peers; it reports each tunnel's state to the store when it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import cast

from portmesh.agent import isolation, plumbing, tunnels
from portmesh.agent.bridge import Bridge, BridgeSpec, parse_controller_targets
from portmesh.agent.ebpf.host import EbpfDatapath
from portmesh.model.config import DEFAULT_CONFIG, NetworkConfig
from portmesh.model.entities import (
    Container,
    ContainerStatus,
    DesiredState,
    Host,
    HostRole,
    RunState,
    is_tunnel_port,
    port_name_for,
)
from portmesh.model.errors import NotFound
from portmesh.runtime.base import Runtime
from portmesh.store.client import Store

log = logging.getLogger("portmesh.agent")

# How long after starting a container the agent looks at it again before reporting the pass's
# generation, so a command that exits at once is reported exited, not running (see _recheck_fresh).
STARTUP_GRACE = 0.05


@dataclass(frozen=True)
class AgentConfig:
    """Who this agent is and where things are."""

    host: str
    controller: str  # br0's controller targets, comma-separated (bridge.parse_controller_targets)
    netns_prefix: str
    underlay_dev: str | None = None  # the interface the VXLAN tunnels run over; None: no tunnels (one machine)
    uplink: str | None = None  # a gateway host's uplink, made a br0 port for inbound pool traffic (--uplink)
    recheck_interval: float = 5.0  # seconds between full passes (processes, plumbing drift, host gateway)
    drift_budget: float = 0.1  # share of recheck_interval a full pass may spend reading plumbing for drift
    retry_interval: float = 2.0  # after a failed convergence


class Agent:
    """Converges one host; see the module docstring."""

    def __init__(
        self,
        cfg: AgentConfig,
        store: Store,
        bridge: Bridge | EbpfDatapath,
        runtime: Runtime,
        image_runtime: Runtime | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.bridge = bridge
        self.runtime = runtime
        self.image_runtime = image_runtime
        self._wake = asyncio.Event()
        # What this process has plumbed and verified, and into which namespace (plumbing.netns_identity).
        self._plumbed: dict[str, tuple[Container, tuple[str, int, int]]] = {}
        self._reported_generation = -1
        # Containers that converged without error, with the desired state they converged to.
        self._settled: dict[str, tuple[Container, bool]] = {}
        self._next_full = 0.0  # monotonic time of the next full pass
        self._bridge_ok: BridgeSpec | None = None
        self._drift_cursor = 0  # where the next drift check resumes (see _find_drift)
        self._drift_checked = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Containers this pass started (with when): looked at again before the generation is reported.
        self._fresh: list[tuple[Container, float]] = []
        # The cloud's network config (MTU, gateway, pools, protected networks) from the store's
        # Global row, as of the snapshot being converged; DEFAULT_CONFIG only before the first one.
        self.network: NetworkConfig = DEFAULT_CONFIG
        # The tunnels last found exactly as planned (None: check on the next pass), the firewall's
        # (peers, compute) last written, and the tunnel report last sent to the store.
        self._tunnels_ok: dict[str, tunnels.TunnelSpec] | None = None  # the plan last converged
        self._firewall: tuple[frozenset[tuple[IPv4Address, int]], bool] = (frozenset(), False)
        self._firewall_ok: tuple[frozenset[tuple[IPv4Address, int]], bool] | None = None
        self._reported_tunnels: dict[str, str] | None = None
        self._tunnel_devices: set[str] = set()  # the tunnel devices found or made by the last tunnel pass
        self._uplink_ok: tuple[str | None, object] | None = None  # (uplink, pools) last converged
        # The uplink's MTU as last read (None: no uplink, or not read yet); containers' eth0 follows it.
        self._outside_mtu: int | None = None
        self._outside_read = False

    def notify(self) -> None:
        """Store callback (called from the store's IDL thread): converge soon."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        """Converge on every store change (and re-check processes now and then) until ``stop``."""
        self._loop = asyncio.get_running_loop()
        self.store.subscribe(self.notify)
        self._wake.set()
        while not stop.is_set():
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, timeout=self.cfg.recheck_interval, return_when=asyncio.FIRST_COMPLETED)
            for task in (waiter, stopper):
                task.cancel()
            if stop.is_set():
                break
            self._wake.clear()
            try:
                state = await asyncio.to_thread(self.store.snapshot)
                ok = await asyncio.to_thread(self.converge, state)
            except Exception:
                log.exception("convergence failed; retrying in %.0f s", self.cfg.retry_interval)
                ok = False
            if not ok:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.cfg.retry_interval)
                self._wake.set()

    # -- one pass (runs in a worker thread: pyroute2 and ovsdbapp calls block) --------

    def converge(self, state: DesiredState) -> bool:
        """One idempotent pass; True if the host now matches ``state`` (then its generation is reported)."""
        host = state.hosts.get(self.cfg.host)
        if host is None:
            log.info("host %s is not registered in the store (yet, or any more)", self.cfg.host)
            if self._tunnels_ok != {}:
                # Removed from the cloud: its tunnels go too (the others remove theirs to it).
                self._converge_tunnels({}, report=False)
                self._reported_tunnels = None
            return True
        if state.config != self.network:
            if self._plumbed:
                # MTU, gateway or pools changed: every container's plumbing is re-checked against the new config.
                log.info("network config changed; re-plumbing %d containers", len(self._plumbed))
            self.network = state.config
            self._plumbed.clear()
            self._settled.clear()
            self._bridge_ok = None
        full = time.monotonic() >= self._next_full
        self._check_outside_mtu(host, full)
        controllers = parse_controller_targets(self.cfg.controller) if self.cfg.controller else ()
        spec = BridgeSpec(host.datapath_id, self.network.gateway_mac, controllers,
                          local_mtu=self.network.bridge_port_mtu)
        specs = tunnels.plan(state, self.cfg.host, self.cfg.underlay_dev) if self.cfg.underlay_dev else {}
        self._firewall = (frozenset((s.remote, s.vni) for s in specs.values()), host.role is HostRole.COMPUTE)
        # Both read first (the bridge from the IDL's memory, the gateway with two netlink dumps), so a
        # full pass re-checks them too: a deleted gateway address or pool route is put back.
        ebpf = self.bridge if isinstance(self.bridge, EbpfDatapath) else None
        if ebpf is not None and (self._bridge_ok != spec or full or self._firewall_ok != self._firewall):
            # No br0 and no gateway address: the program answers for the gateway and forwards by
            # itself; the host firewall (VXLAN only from peers) and forwarding (fib lookups) stay.
            peers, compute = self._firewall
            plumbing.host_firewall(self.network, underlay_dev=self.cfg.underlay_dev, peers=peers, compute=compute)
            plumbing.write_sysctls({"net.ipv4.ip_forward": "1"})
            self._bridge_ok, self._firewall_ok = spec, self._firewall
        elif self._bridge_ok != spec or full or self._firewall_ok != self._firewall:
            if cast(Bridge, self.bridge).ensure(spec):
                log.info("bridge br0 set for datapath %s, controller %s", spec.dpid_hex, ",".join(spec.controllers))
            peers, compute = self._firewall
            plumbing.ensure_host_gateway(self.network, underlay_dev=self.cfg.underlay_dev, peers=peers, compute=compute)
            self._bridge_ok, self._firewall_ok = spec, self._firewall
        if ebpf is None and (full or self._uplink_ok != (self.cfg.uplink, self.network.public_pools)):
            self._converge_uplink(host)
        if full or self._tunnels_ok != specs:
            try:
                self._converge_tunnels(specs)
            except Exception:
                # The mesh must not hold back this host's containers: logged, retried on the next full pass.
                log.exception("tunnels of %s could not be converged; retrying", self.cfg.host)
                self._tunnels_ok = dict(specs)

        wanted = {c.name: c for c in state.containers_on(self.cfg.host)}
        ok = self._remove_unwanted(wanted)
        # The host's links, read once per full pass for the sweep, the isolation re-check and the drift
        # check: pyroute2 parses a dump link by link (~1 ms each), so three dumps cost seconds at 1,000.
        view = plumbing.host_view() if full else None
        if view is not None:
            self._sweep_orphans(wanted, view)
        self._fresh = []
        failed = self._converge_containers(wanted, view)
        self._recheck_fresh()
        if full:
            self._next_full = time.monotonic() + self.cfg.recheck_interval
        # A container that cannot start (bad command, ...) carries its error in its own status and is
        # retried; it must not hold back the generation of the whole host, or every later --wait on
        # this host would time out instead of reporting the real error.
        if failed:
            log.warning("containers in error on %s: %s (retrying)", self.cfg.host, ", ".join(failed))
        if ebpf is not None:
            ok = self._converge_maps(ebpf, state) and ok
        if ok and state.generation != self._reported_generation:
            if ebpf is not None:
                waiting = [c.name for c in wanted.values() if c.name not in self._settled]
                self.store.report_switch(self.cfg.host, state.generation, connected=True, waiting=waiting)
            self.store.report_agent(self.cfg.host, state.generation)
            self._reported_generation = state.generation
            log.info("host %s realised generation %d (%d containers)", self.cfg.host, state.generation, len(wanted))
        return ok and not failed

    def _converge_maps(self, ebpf: EbpfDatapath, state: DesiredState) -> bool:
        """The eBPF datapath's maps as the state says, then its uplink program; False if a write failed.

        The uplink's program goes on after the first sync: with empty maps it would pass pool
        traffic to the host kernel, which has no route for it.
        """
        try:
            stats = ebpf.sync(state, self.cfg.host)
            if stats.writes:
                log.info("eBPF maps of %s: %s", self.cfg.host, stats)
            if ebpf.ensure():
                log.info("eBPF uplink program attached to %s", ebpf.uplink)
        except Exception:
            log.exception("eBPF maps of %s could not be converged; retrying", self.cfg.host)
            return False
        return True

    def _check_outside_mtu(self, host: Host, full: bool) -> None:
        """The uplink's MTU, read on the first and every full pass: the containers of a gateway host with
        an uplink get it on eth0 (NetworkConfig.container_mtus); a change re-plumbs them all."""
        if self._outside_read and not full:
            return
        mtu = None
        if self.cfg.uplink and host.role is HostRole.GATEWAY:
            try:
                mtu = plumbing.link_mtu(self.cfg.uplink)
            except Exception:
                # Kept as it was (no re-plumb on a passing error); read again on the next full pass.
                log.exception("MTU of uplink %s unreadable; containers keep %s", self.cfg.uplink, self._outside_mtu)
                return
        self._outside_read = True
        if mtu != self._outside_mtu:
            if self._plumbed:
                log.info("uplink MTU %s (was %s); re-plumbing %d containers", mtu, self._outside_mtu, len(self._plumbed))
            self._outside_mtu = mtu
            self._plumbed.clear()
            self._settled.clear()

    def _converge_uplink(self, host: Host) -> None:
        """The uplink as a br0 port for inbound pool traffic (``--uplink``), or no more of it.

        Taking over: port on br0, reported (the controller compiles its flows), then the
        kernel's copy dropped; for the moment between the last two steps both paths deliver
        (a duplicate, never a loss). Giving up (the agent runs without ``--uplink`` now, and
        the Host row still names one): the kernel routes again first, then the port and,
        last, the report go (so a pass that fails half-way is finished by the next one). A failure is
        logged and retried on the next full pass; it must not hold back the containers.
        """
        want = self.cfg.uplink
        if want is not None and not isolation.needed():
            # The kernel datapath's rx_handler would take every frame of IFACE from the host's stack.
            log.error("--uplink %s ignored: with the kernel datapath the host would lose the interface", want)
            want = None
        try:
            if want is not None:
                if self.bridge.ensure_port(want):
                    log.info("uplink %s added to br0: inbound pool traffic goes straight to the switch", want)
                self.store.report_uplink(self.cfg.host, want)
                if plumbing.ensure_uplink(want, self.network):
                    log.info("uplink %s: the host no longer routes pool traffic in (%s)", want,
                             ", ".join(str(p) for p in self.network.public_pools))
            elif host.uplink is not None:  # the store still says so until the last step is done
                if isolation.needed() and isolation.release_uplink():
                    log.info("uplink table removed: the host routes inbound pool traffic again")
                if self.bridge.remove_port(host.uplink):
                    log.info("uplink %s removed from br0", host.uplink)
                self.store.report_uplink(self.cfg.host, None)
            self._uplink_ok = (self.cfg.uplink, self.network.public_pools)
        except Exception:
            log.exception("uplink %s of %s could not be converged; retrying", want, self.cfg.host)
            self._uplink_ok = None

    def _converge_tunnels(self, specs: dict[str, tunnels.TunnelSpec], report: bool = True) -> None:
        """The VXLAN mesh as planned (tunnels.py), each device a plain br0 port; report it when it changed.

        A failing tunnel does not fail the pass (the host's containers are fine); it is
        reported down with the reason and retried on the next full pass (or when the plan
        changes), not on every pass: a host bringing up many containers while a peer's
        tunnel is down must not re-read its links on each of them.
        """
        on_br0 = {p for p in self.bridge.ports() if is_tunnel_port(p)}
        done = tunnels.realise(specs, known=on_br0 | self._tunnel_devices)
        self._tunnel_devices = done.present
        for name in done.removed:
            self.bridge.remove_port(name)
        # br0 ports of tunnels no longer planned whose device went some other way.
        for port in sorted(p for p in on_br0 if p not in specs):
            log.info("removing tunnel port %s from br0: its host left the mesh", port)
            self.bridge.remove_port(port)
        if not done.underlay_problem:
            # A remade device under a name br0 holds: ovs-vswitchd must open it afresh.
            self.bridge.reattach_ports(done.made)
            self.bridge.ensure_ports([n for n in sorted(specs) if n not in done.errors])
        devices, underlay = tunnels.observe(specs)
        on_bridge = {n for n in specs if self.bridge.has_port(n)}
        status = tunnels.status(specs, devices, on_bridge, underlay, done.errors)
        down = {peer: why for peer, why in status.items() if why != "up"}
        if down:
            log.warning("tunnels down on %s: %s", self.cfg.host, "; ".join(f"{p}: {w}" for p, w in sorted(down.items())))
        self._tunnels_ok = dict(specs)
        if report and status != self._reported_tunnels:
            self.store.report_tunnels(self.cfg.host, status)
            self._reported_tunnels = status
            log.info("tunnels of %s: %d up, %d down", self.cfg.host, len(status) - len(down), len(down))

    def _recheck_fresh(self) -> None:
        """Look again at the containers this pass started, :data:`STARTUP_GRACE` after their start.

        A command that exits at once (``-- false``) was "running" when started; reported as such
        with this pass's generation, ``run --wait`` would answer "created, running" for a container
        that is already gone. The second look, before the generation is reported, lets the API's
        per-object wait see "exited" (with its exit code) instead. Bounded: one pause per pass that
        started something, not one per container; an exit after the grace is seen by the next check.
        """
        if not self._fresh:
            return
        pause = self._fresh[0][1] + STARTUP_GRACE - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        for c, _ in self._fresh:
            try:
                status = self._runtime_for(c).status(c.name)
                if status is not None and status.state != RunState.RUNNING and self.store.container_status(c.name) != status:
                    log.info("container %s %s right after its start: %s", c.name, status.state.value, status.message)
                    self.store.report_container_status(c.name, status)
            except NotFound:
                continue  # removed meanwhile
            except Exception:
                log.exception("container %s: second look after its start failed", c.name)
        self._fresh = []

    def _runtimes(self) -> list[Runtime]:
        return [self.runtime] + ([self.image_runtime] if self.image_runtime is not None else [])

    def _runtime_for(self, c: Container) -> Runtime:
        if not c.image:
            return self.runtime
        if self.image_runtime is None:
            raise RuntimeError("this agent has no container engine (Docker/Podman) for image containers")
        return self.image_runtime

    def _remove_unwanted(self, wanted: dict[str, Container]) -> bool:
        ok = True
        for runtime in self._runtimes():
            # Unwanted here, or wanted but now in the other runtime (image added or dropped).
            for name in sorted(n for n in runtime.known() if n not in wanted or self._runtime_for(wanted[n]) is not runtime):
                try:
                    self._tear_down(name, runtime)
                except Exception:
                    log.exception("could not tear down container %s", name)
                    ok = False
        return ok

    def _sweep_orphans(self, wanted: dict[str, Container], view: plumbing.NsView) -> None:
        """Ports left behind by a crash between plumbing and recording (named like ours, owned by nobody)."""
        wanted_ports = {c.port_name for c in wanted.values()}
        present = {p for p in view.links if plumbing.is_container_port(p)}
        orphans = {p for p in self.bridge.ports() | present if plumbing.is_container_port(p)} - wanted_ports
        for port in sorted(orphans):
            log.info("removing orphan port %s", port)
            self.bridge.remove_port(port)
            plumbing.unplumb_container(port)
        peers, compute = self._firewall
        plumbing.recheck_isolation(self.network, container_ports=present - orphans, tunnel_ports=self._tunnel_devices,
                                   underlay_dev=self.cfg.underlay_dev, peers=peers, compute=compute)

    def _converge_containers(self, wanted: dict[str, Container], view: plumbing.NsView | None) -> list[str]:
        """Converge the containers not settled in their current desired state (all on a full pass, which
        passes the host's ``view``); return the names of those in error (retried, never settled)."""
        full = view is not None
        running = self.store.running_containers()  # one lock for all, not one lookup each
        if view is not None:
            self._find_drift(wanted, view)
        todo = [c for c in wanted.values() if full or c.image or self._settled.get(c.name) != (c, c.name in running)]
        self._plumb_light(todo)
        failed: list[str] = []
        for c in todo:
            if self._converge_container(c):
                self._settled[c.name] = (c, c.name in running)
            else:
                self._settled.pop(c.name, None)
                failed.append(c.name)
        for name in set(self._settled) - set(wanted):
            del self._settled[name]
        return failed

    def _find_drift(self, wanted: dict[str, Container], host: plumbing.NsView) -> None:
        """Forget the plumbing of containers whose namespace, veth or bridge port drifted, so this pass redoes it.

        Read only: the host's links once, each namespace once (plumbing.read_namespaces), the bridge's
        ports from the IDL's memory, the isolation chains once. Bounded: at most ``drift_budget`` of
        the recheck interval is spent per pass, resuming where the last pass stopped, so a host with
        thousands of containers checks them all over a few passes instead of spending a core on it.
        """
        names = [n for n in sorted(self._plumbed) if n in wanted]
        if not names:
            return
        start = self._drift_cursor % len(names)
        order = names[start:] + names[:start]
        t0 = time.monotonic()
        chains = plumbing.isolated_chains()
        by_ns: dict[str, list[str]] = {}
        for name in order:
            by_ns.setdefault(self._plumbed[name][1][0], []).append(name)
        views = plumbing.read_namespaces(list(by_ns), budget=self.cfg.recheck_interval * self.cfg.drift_budget)
        checked = 0
        for netns, view in views.items():
            for name in by_ns[netns]:
                checked += 1
                c = self._plumbed[name][0]
                if isinstance(view, Exception):
                    problems = [f"namespace unreadable: {view}"]
                else:
                    problems = plumbing.container_drift(c, self.network, host, view, self._outside_mtu)
                if chains is not None and c.port_name not in chains:
                    problems.append("its isolation chain is missing")
                if not self.bridge.has_port(c.port_name):
                    problems.append(f"port {c.port_name} is not on br0")
                if problems:
                    log.warning("container %s: plumbing drifted (%s); repairing", name, "; ".join(problems))
                    del self._plumbed[name]
        self._drift_cursor = start + checked
        # The first check of a process at INFO (its cost, and a mark that it ran), then at DEBUG every full pass.
        log.log(logging.DEBUG if self._drift_checked else logging.INFO, "drift check: %d of %d containers in %.1f ms",
                checked, len(names), (time.monotonic() - t0) * 1000)
        self._drift_checked = True

    def _plumb_light(self, todo: list[Container]) -> None:
        """Plumb the light containers of this pass that are not plumbed yet, their bridge ports in one transaction.

        Light containers keep their namespace while stopped, so all of them can be
        wired before any process starts; the per-container step below then finds
        them plumbed. A container that fails here is left to that step, which
        retries it and reports the error in its status.
        """
        fresh: dict[str, tuple[Container, tuple[str, int, int]]] = {}
        made: list[str] = []  # veths (re)made: a bridge port of that name must be re-attached
        for c in todo:
            if c.image or not self.runtime.keeps_netns_when_stopped:
                continue
            try:
                netns = self.runtime.prepare(c, self.cfg.netns_prefix)
                ident = plumbing.netns_identity(netns)
                if self._plumbed.get(c.name) == (c, ident):
                    continue
                if plumbing.plumb_container(c, netns, self.network, self._outside_mtu):
                    made.append(c.port_name)
            except Exception as exc:
                log.warning("container %s: plumbing deferred to its own step: %s", c.name, exc)
                continue
            fresh[c.name] = (c, ident)
        if fresh:
            self.bridge.reattach_ports(made)
            added = self.bridge.ensure_ports([c.port_name for c, _ in fresh.values()])
            self._plumbed.update(fresh)
            log.info("plumbed %d containers, %d bridge ports added in one transaction", len(fresh), len(added))

    def _tear_down(self, name: str, runtime: Runtime) -> None:
        port = port_name_for(name)
        self.bridge.remove_port(port)
        plumbing.unplumb_container(port)
        runtime.remove(name)
        self._plumbed.pop(name, None)
        log.info("container %s removed", name)

    def _converge_container(self, c: Container) -> bool:
        try:
            runtime = self._runtime_for(c)
            running = self.store.container_running(c.name)
            if runtime.keeps_netns_when_stopped:
                # Plumbed before its process starts, so the process finds its network ready.
                self._plumb(c, runtime.prepare(c, self.cfg.netns_prefix))
                if running:
                    status = runtime.start(c, self.cfg.netns_prefix)
                else:
                    runtime.stop(c.name, c.stop_timeout)
                    status = runtime.status(c.name) or ContainerStatus(RunState.EXITED)
            elif running:
                # The namespace is the running process's own: plumb after start, again after each restart.
                status = runtime.start(c, self.cfg.netns_prefix)
                if status.state == RunState.RUNNING:
                    self._plumb(c, status.netns)
            else:
                runtime.stop(c.name, c.stop_timeout)
                status = runtime.status(c.name) or ContainerStatus(RunState.EXITED)
        except Exception as exc:
            log.exception("container %s failed", c.name)
            self._plumbed.pop(c.name, None)
            status = ContainerStatus(RunState.ERROR, "", None, f"{type(exc).__name__}: {exc}")
        try:
            before = self.store.container_status(c.name)
            if before != status:
                self.store.report_container_status(c.name, status)
                if status.state == RunState.RUNNING and (before is None or before.pid != status.pid):
                    self._fresh.append((c, time.monotonic()))
        except NotFound:
            # Removed from the store since our snapshot; that change woke us already and the next pass tears it down.
            return True
        return status.state != RunState.ERROR

    def _plumb(self, c: Container, netns: str) -> None:
        """Plumb ``c`` into ``netns`` unless this process already did, into that very namespace."""
        ident = plumbing.netns_identity(netns)
        before = self._plumbed.get(c.name)
        if before == (c, ident):
            return
        if plumbing.plumb_container(c, netns, self.network, self._outside_mtu):
            self.bridge.reattach_ports([c.port_name])  # a new veth under a name the bridge may hold
        else:
            self.bridge.ensure_port(c.port_name)
        self._plumbed[c.name] = (c, ident)
        log.info("container %s plumbed (checked) in %s on port %s", c.name, netns, c.port_name)
