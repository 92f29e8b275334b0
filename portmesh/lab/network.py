"""A whole portmesh cloud on one machine: ``up`` builds it, ``down`` removes exactly what ``up`` recorded.

Topology (every address in a documentation/benchmark range, nothing in the
machine's namespace but the API on loopback and the store's unix socket):

    <prefix>mgmt   the "control machine": Linux bridge mgmt0 198.18.0.1/24, where the store
                   (TCP 6640) and the controller (TCP 6653) listen; Linux bridge ul0, the underlay
    <prefix>hN     host N: mgmt0 198.18.0.(10+N)/24, ul0 198.19.0.(10+N)/24 (MTU 1500), OVS + agent;
                   h1 is the gateway host and the only one with an uplink, up0 198.51.100.1/24,
                   which its agent makes a br0 port (--uplink up0): inbound pool traffic skips h1's routing
    <prefix>inet   the outside world: eth0 198.51.100.2/24, route to the public pools via h1

Each daemon runs with the flags of a real deployment (docs/deploy.md): agents reach the
store and the controller over TCP on the management network, their VXLAN tunnels run
over ul0; no unix socket is shared with a host namespace.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from portmesh.lab import ha, link, node, services, sysctl
from portmesh.lab.datapaths import DATAPATHS, parse_datapaths
from portmesh.lab.ovs import OvsInstance, wait_unix_socket
from portmesh.lab.state import LAB_NAME_RE, LabState, Process, lab_dir
from portmesh.model.config import DEFAULT_CONFIG, NetworkConfig
from portmesh.runtime import docker as docker_runtime
from portmesh.runtime import procs
from portmesh.runtime.image import BUSYBOX_IMAGE, ensure_busybox_image
from portmesh.runtime.light import LightRuntime

log = logging.getLogger("portmesh.lab")

MGMT_NET = "198.18.0"
UNDERLAY_NET = "198.19.0"
UNDERLAY_MTU = 1500
INET_IP, UPLINK_IP = "198.51.100.2", "198.51.100.1"
UPLINK_DEV = "up0"  # h1's interface facing inet; its agent runs with --uplink up0
INET_PREFIXLEN = 24
RMEM_KEY = "net.core.rmem_default"
RMEM_LAB = 4 * 1024 * 1024  # OVS reads each port through a packet socket with this buffer (see ARCHITECTURE)
PODMAN_LABEL = "podman"

Say = Callable[[str], None]


def mgmt_ip(index: int) -> str:
    """Host number ``index`` (1-based) on the management network."""
    return f"{MGMT_NET}.{10 + index}"


def underlay_ip(index: int) -> str:
    """Host number ``index`` (1-based) on the underlay: where the other hosts' tunnels to it end."""
    return f"{UNDERLAY_NET}.{10 + index}"


def host_index(host: str) -> int:
    """``h3`` -> 3: the host's number (its datapath id and the last octet of its addresses minus 10)."""
    return int(host.removeprefix("h"))


def host_role(host: str) -> str:
    """h1 faces inet (the gateway host); every other lab host is a compute host."""
    return "gateway" if host == "h1" else "compute"


def bpf_dir(state: LabState, host: str) -> Path:
    """Where an eBPF host's agent pins its datapath's maps (a bpffs the lab mounts)."""
    return state.dir / host / "bpf"


def ovs_of(state: LabState, host: str) -> OvsInstance:
    return OvsInstance(host, state.ns(host), state.dir / host)


class Lab:
    """Lab ``name``: its recorded state and the operations on it."""

    def __init__(self, name: str, say: Say = print, config: NetworkConfig = DEFAULT_CONFIG) -> None:
        if not LAB_NAME_RE.match(name):
            raise ValueError(f"lab name {name!r}: lowercase letters, digits and '-', at most 16 characters")
        self.name = name
        self.say = say
        self.config = config

    def state(self) -> LabState | None:
        return LabState.load(self.name)

    # -- up -----------------------------------------------------------------------

    def up(self, hosts: int = 1, tune_rmem: bool = True, ha: bool = False, datapath: str = "ovs") -> LabState:
        """Build the lab; on any failure tear down what was built, then re-raise.

        ``ha``: the store is a 3-member Raft cluster and two controllers run (see ha.py).
        ``datapath``: ``ovs``, ``ebpf`` or per host ``h2=ebpf,...`` (datapaths.py): an eBPF host
        runs no OVS; its agent loads the eBPF datapath, its maps pinned in a bpffs of its own.
        """
        if self.state() is not None:
            raise FileExistsError(f"lab {self.name} is already up (state in {lab_dir(self.name)}); run down first")
        names = [f"h{i}" for i in range(1, hosts + 1)]
        state = LabState(self.name, hosts=names, ha=ha, datapaths=parse_datapaths(datapath, names))
        state.dir.mkdir(parents=True, exist_ok=True)
        state.save()
        try:
            self._up(state, tune_rmem)
        except BaseException:
            self.say(f"lab {self.name}: up failed, tearing down what was made")
            self.down()
            raise
        return state

    def _up(self, state: LabState, tune_rmem: bool) -> None:
        if tune_rmem:
            self._set_machine_sysctl(state, RMEM_KEY, str(RMEM_LAB))
        for ns in ["mgmt", "inet"]:
            self._namespace(state, state.ns(ns))
        mgmt = state.ns("mgmt")
        self._bridge(state, mgmt, "mgmt0")
        link.address(mgmt, "mgmt0", f"{services.CONTROLLER_IP}/24")
        self._bridge(state, mgmt, services.UNDERLAY_DEV)
        for host in state.hosts:
            self._host_links(state, host)
        h1, inet = state.ns(state.hosts[0]), state.ns("inet")
        self._veth(state, inet, "eth0", h1, UPLINK_DEV)
        link.address(inet, "eth0", f"{INET_IP}/{INET_PREFIXLEN}")
        link.address(h1, UPLINK_DEV, f"{UPLINK_IP}/{INET_PREFIXLEN}")
        for pool in self.config.public_pools:
            link.route(inet, str(pool), UPLINK_IP)
        self.say(f"lab {self.name}: namespaces and links made ({', '.join(state.namespaces)})")

        for host in state.hosts:
            self._host_datapath(state, host)
        on_ovs = [state.ns(h) for h in state.hosts if state.datapath(h) == "ovs"]
        on_ebpf = [state.ns(h) for h in state.hosts if state.datapath(h) == "ebpf"]
        self.say(f"lab {self.name}: " + "; ".join(
            f"{what} in {', '.join(where)}" for what, where in (("OVS running", on_ovs), ("eBPF datapath", on_ebpf)) if where))
        self._start_components(state)

    def _host_links(self, state: LabState, host: str) -> None:
        """Host namespace with its management and underlay interfaces, each a veth into the mgmt namespace's bridge."""
        i, ns, mgmt = host_index(host), state.ns(host), state.ns("mgmt")
        self._namespace(state, ns)
        self._veth(state, ns, "mgmt0", mgmt, f"m-{host}")
        link.enslave(mgmt, f"m-{host}", "mgmt0")
        link.address(ns, "mgmt0", f"{mgmt_ip(i)}/24")
        self._veth(state, ns, services.UNDERLAY_DEV, mgmt, f"u-{host}", mtu=UNDERLAY_MTU)
        link.enslave(mgmt, f"u-{host}", services.UNDERLAY_DEV)
        link.address(ns, services.UNDERLAY_DEV, f"{underlay_ip(i)}/24")

    def _host_datapath(self, state: LabState, host: str) -> None:
        """OVS for an OVS host; for an eBPF host the bpffs its agent pins the maps in (``ip netns exec``
        remounts /sys, so /sys/fs/bpf is not one there), recorded before it is made."""
        if state.datapath(host) != "ebpf":
            self._host_ovs(state, host)
            return
        where = bpf_dir(state, host)
        where.mkdir(parents=True, exist_ok=True)
        state.mounts.append(str(where))
        state.save()
        node.run(["mount", "-t", "bpf", "bpf", str(where)], check=True)

    def _host_ovs(self, state: LabState, host: str) -> None:
        ovs = ovs_of(state, host)
        self._record(state, f"ovsdb-server:{host}", ovs.start_db, ovs.netns, ovs.rundir / "ovsdb-server.log")
        self._record(state, f"ovs-vswitchd:{host}", ovs.start_vswitchd, ovs.netns, ovs.rundir / "ovs-vswitchd.log")

    def _register(self, state: LabState, host: str) -> None:
        """Register ``host`` through the API as an operator would (``portmesh host add``)."""
        i = host_index(host)
        self.api(state).register_host(host, i, underlay_ip(i), role=host_role(host))

    def api(self, state: LabState) -> services.ApiClient:
        """The lab's API as the lab itself uses it (with its token)."""
        return services.ApiClient(state.api_url, services.token_file(state.dir).read_text().strip())

    def _start_agent(self, state: LabState, host: str) -> None:
        state.agent_state_dirs.append(str(services.agent_state_dir(state.dir, host)))
        state.save()
        # The gateway host's uplink is a switch port: inbound pool traffic skips its routing (issue 14).
        uplink = UPLINK_DEV if host == state.hosts[0] else ""
        argv = services.agent_argv(state.dir, host, ovs_of(state, host).remote, state.prefix, state.docker_url,
                                   store=state.agent_store, controller=state.agent_controller, uplink=uplink,
                                   datapath=state.datapath(host), bpf_dir=bpf_dir(state, host))
        self._spawn(state, f"agent:{host}", argv, state.ns(host))

    def _start_components(self, state: LabState) -> None:
        labdir = state.dir
        if not services.available("portmesh.store.__main__"):
            self.say("portmesh.store is not there yet: no store, controller, agents or API started")
            return
        api_store = ""
        if state.ha:
            api_store = self._start_ha(state)
        else:
            store = self._spawn(state, "store", services.store_argv(labdir), state.ns("mgmt"))
            wait_unix_socket(services.store_socket(labdir), store.ref)
            if services.available("portmesh.controller.__main__"):
                self._spawn(state, "controller", services.controller_argv(labdir), state.ns("mgmt"))
            else:
                self.say("portmesh.controller is not there yet: no controller started (switches stay fail-secure)")
        if not services.available("portmesh.api.__main__"):
            self.say("portmesh.api is not there yet: no API started and no host registered")
        else:
            services.make_token(labdir)
            # The default lab answers where the CLI looks by default (127.0.0.1:8470, token in
            # /run/portmesh/lab/api.token), so `portmesh lab up; portmesh run ...` needs no settings.
            port = services.free_port(services.DEFAULT_API_PORT if self.name == services.DEFAULT_LAB else 0)
            state.api_url = f"http://127.0.0.1:{port}"
            self._spawn(state, "api", services.api_argv(labdir, port, store=api_store))
            services.wait_http(f"{state.api_url}/v1/hosts")
            for host in state.hosts:
                self._register(state, host)
            self.say(f"lab {self.name}: API on {state.api_url}, hosts registered: {', '.join(state.hosts)}")
        if services.available("portmesh.agent.__main__"):
            self._container_engine(state)
            for host in state.hosts:
                self._start_agent(state, host)
        else:
            self.say("portmesh.agent is not there yet: no agents started")

    def _start_ha(self, state: LabState) -> str:
        """The 3-member Raft store and the two controllers (ha.py); returns the API's store remote.

        The controllers get ``--name controller-N`` and the agents every controller, each only
        once the component takes it (the flags are being added alongside): until then a
        controller runs unnamed and the agents are given controller-1 alone.
        """
        labdir, mgmt = state.dir, state.ns("mgmt")
        ha.make_cluster(state)
        for n in range(1, services.STORE_MEMBERS + 1):
            member = self._spawn(state, services.member_label(n), services.member_argv(labdir, n), mgmt)
            wait_unix_socket(services.member_socket(labdir, n), member.ref)
        lead = ha.wait_formed(state)
        self.say(f"lab {self.name}: store cluster of {services.STORE_MEMBERS} members formed, store-{lead} leads")
        state.agent_store = services.cluster_tcp_remote()
        multi = services.takes_flag("portmesh.agent", "--controller", "tcp:IP:PORT[,")
        state.agent_controller = services.ha_controller_targets() if multi else services.ha_controller_target(1)
        state.save()
        if not services.available("portmesh.controller.__main__"):
            self.say("portmesh.controller is not there yet: no controller started (switches stay fail-secure)")
            return services.cluster_unix_remote(labdir)
        named = services.takes_flag("portmesh.controller", "--name")
        for n in range(1, services.HA_CONTROLLERS + 1):
            label = services.controller_label(n)
            argv = services.controller_argv(labdir, services.cluster_tcp_remote(), services.ha_controller_target(n),
                                            label if named else "")
            self._spawn(state, label, argv, mgmt)
        if not multi:
            self.say(f"lab {self.name}: the agent takes one --controller: switches connect to controller-1 only")
        return services.cluster_unix_remote(labdir)

    def _container_engine(self, state: LabState) -> None:
        """A Docker daemon if the machine has one, else a Podman service of the lab's own; the busybox image in it.

        Without either, the lab still runs light containers (image containers report an error).
        """
        url = docker_runtime.default_url()
        if url is None:
            if shutil.which("podman") is None:
                self.say(f"lab {self.name}: no Docker daemon and no podman: light containers only")
                return
            sock = services.podman_socket(state.dir)
            self._spawn(state, PODMAN_LABEL, services.podman_argv(state.dir))
            url = f"unix://{sock}"
        state.docker_url = url
        state.save()
        client = docker_runtime.connect(url, wait=30.0)
        try:
            self.say(f"lab {self.name}: importing {BUSYBOX_IMAGE} (built here from busybox-static)...")
            imported = ensure_busybox_image(client)
            self.say(f"lab {self.name}: container engine at {url}; {BUSYBOX_IMAGE} {'imported' if imported else 'present'}")
        finally:
            client.close()

    def _namespace(self, state: LabState, ns: str) -> None:
        if node.exists(ns):
            raise FileExistsError(f"network namespace {ns} exists but is not this lab's: refusing to touch it")
        state.namespaces.append(ns)
        state.save()
        node.create(ns)

    def _bridge(self, state: LabState, ns: str, name: str) -> None:
        state.links.append((ns, name))
        state.save()
        link.bridge(ns, name)

    def _veth(self, state: LabState, ns_a: str, if_a: str, ns_b: str, if_b: str, mtu: int | None = None) -> None:
        state.links.append((ns_a, if_a))
        state.save()
        link.veth(ns_a, if_a, ns_b, if_b, mtu=mtu)

    def _set_machine_sysctl(self, state: LabState, key: str, value: str) -> None:
        """Set a machine-wide sysctl for this lab; the last lab holding it puts the original back (sysctl.py)."""
        before = sysctl.read(key)
        original = sysctl.hold(key, value, self.name)
        if original is None:
            return
        state.sysctls[key] = original
        state.save()
        if before != value:
            self.say(f"lab {self.name}: {key} {before} -> {value} (put back on down)")

    def _spawn(self, state: LabState, label: str, argv: Sequence[str], netns: str | None = None) -> Process:
        logfile = state.dir / "logs" / f"{label.replace(':', '-')}.log"
        return self._record(state, label, lambda: procs.spawn(argv, logfile, netns=netns), netns, logfile, argv)

    def _record(
        self,
        state: LabState,
        label: str,
        start: Callable[[], procs.ProcRef],
        netns: str | None,
        logfile: Path,
        argv: Sequence[str] = (),
    ) -> Process:
        ref = start()
        proc = Process(label, ref.pid, ref.start_time, list(argv), netns, str(logfile))
        state.processes.append(proc)
        state.save()
        return proc

    def restart(self, label: str) -> Process:
        """Stop a recorded daemon by its PID and start it again the same way (fault and restart tests).

        Works for every component and for a host's ``ovsdb-server``/``ovs-vswitchd`` (a host whose switch died).
        A process that is already gone (stopped by a test) is simply started again.
        """
        state = self.state()
        old = state.process(label) if state is not None else None
        if state is None or old is None:
            raise LookupError(f"lab {self.name} has no process {label!r}")
        kind, _, host = label.partition(":")
        ovs = ovs_of(state, host) if kind in ("ovsdb-server", "ovs-vswitchd") and host in state.hosts else None
        if not old.argv and ovs is None:
            raise ValueError(f"{label} was not started from a recorded command line")
        procs.stop(old.ref)
        state.processes.remove(old)
        state.save()
        if ovs is not None:  # OVS keeps its own paths and environment: start it the way up did
            start = ovs.start_db if kind == "ovsdb-server" else ovs.start_vswitchd
            return self._record(state, label, start, ovs.netns, Path(old.log))
        return self._spawn(state, label, old.argv, old.netns)

    # -- hosts joining and leaving a running lab ----------------------------------

    def add_host(self, datapath: str | None = None) -> str:
        """A new compute host in a running lab, made as a real one joins: links, its datapath, ``host add``, its agent.

        ``datapath``: ``ovs`` or ``ebpf``; by default the lab's own when all its hosts run the
        same one, else OVS. Returns its name (the next free number). A failure half-way leaves
        what was made recorded, so ``down`` (or :meth:`remove_host`) still removes it.
        """
        state = self.state()
        if state is None:
            raise LookupError(f"lab {self.name} is not up")
        if datapath is None:
            kinds = {state.datapath(h) for h in state.hosts}
            datapath = kinds.pop() if len(kinds) == 1 else "ovs"
        if datapath not in DATAPATHS:
            raise ValueError(f"datapath {datapath!r}: expected {' or '.join(DATAPATHS)}")
        host = f"h{max(host_index(h) for h in state.hosts) + 1}"
        state.hosts.append(host)
        if datapath != "ovs":
            state.datapaths[host] = datapath
        state.save()
        self._host_links(state, host)
        self._host_datapath(state, host)
        if state.api_url:
            self._register(state, host)
        if state.process("agent:h1") is not None:
            self._start_agent(state, host)
        self.say(f"lab {self.name}: host {host} added ({underlay_ip(host_index(host))} on the underlay)")
        return host

    def remove_host(self, host: str) -> list[str]:
        """Take ``host`` out as an operator would (``host rm``, then its daemons stop) and remove what the lab made for it.

        Returns the problems met (empty when all went). The gateway host h1 cannot leave.
        """
        state = self.state()
        if state is None or host not in state.hosts:
            raise LookupError(f"lab {self.name} has no host {host!r}")
        if host == state.hosts[0]:
            raise ValueError(f"{host} is the lab's gateway host (the uplink to inet); it cannot leave")
        problems: list[str] = []
        unregistered: list[str] = []
        if state.api_url:
            try:
                self.api(state).remove_host(host)
            except Exception as exc:
                unregistered.append(f"host rm {host}: {exc}")
        ns = state.ns(host)
        for proc in [p for p in reversed(state.processes) if p.label.endswith(f":{host}")]:
            try:
                procs.stop(proc.ref)
                state.processes.remove(proc)
            except Exception as exc:
                problems.append(f"stop {proc.label} ({proc.pid}): {exc}")
        state_dir = str(services.agent_state_dir(state.dir, host))
        if state_dir in state.agent_state_dirs and Path(state_dir).is_dir():
            runtime = LightRuntime(Path(state_dir))
            for name in runtime.known():
                try:
                    runtime.remove(name)
                except Exception as exc:
                    problems.append(f"remove container {name}: {exc}")
        for entry in [e for e in reversed(state.links) if e[0] == ns]:
            try:
                if node.exists(ns):
                    link.delete(*entry)  # a veth takes its peer (m-hN, u-hN in mgmt) with it
                state.links.remove(entry)
            except Exception as exc:
                problems.append(f"delete {entry[0]}:{entry[1]}: {exc}")
        try:
            node.remove(ns)
            state.namespaces.remove(ns)
        except Exception as exc:
            problems.append(f"remove namespace {ns}: {exc}")
        where = str(bpf_dir(state, host))
        if where in state.mounts:
            try:
                if Path(where).is_mount():
                    node.run(["umount", where], check=True)
                state.mounts.remove(where)
            except Exception as exc:
                problems.append(f"unmount {where}: {exc}")
        if not problems:
            state.hosts.remove(host)
            state.datapaths.pop(host, None)
            if state_dir in state.agent_state_dirs:
                state.agent_state_dirs.remove(state_dir)
            shutil.rmtree(state.dir / host, ignore_errors=True)
        state.save()
        problems = unregistered + problems
        self.say(f"lab {self.name}: host {host} removed" + (f" with problems: {problems}" if problems else ""))
        return problems

    # -- down ---------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove everything the lab recorded; returns the problems met (empty when all went)."""
        state = self.state()
        if state is None:
            self.say(f"lab {self.name} is not up")
            return []
        problems: list[str] = []

        def attempt(what: str, action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as exc:
                problems.append(f"{what}: {exc}")

        engine_cleared = not state.docker_url
        for proc in reversed(state.processes):
            if proc.label == PODMAN_LABEL and not engine_cleared:
                # Agents are stopped (they were started after it): remove the image containers while it serves.
                attempt("remove image containers", partial(self._remove_image_containers, state))
                engine_cleared = True
            attempt(f"stop {proc.label} ({proc.pid})", partial(procs.stop, proc.ref))
        if not engine_cleared:
            attempt("remove image containers", partial(self._remove_image_containers, state))
        for state_dir in state.agent_state_dirs:
            if Path(state_dir).is_dir():
                runtime = LightRuntime(Path(state_dir))
                for name in runtime.known():
                    attempt(f"remove container {name}", partial(runtime.remove, name))
        for where in reversed(state.mounts):
            if Path(where).is_mount():
                attempt(f"unmount {where}", partial(node.run, ["umount", where], check=True))
        for ns, ifname in reversed(state.links):
            if node.exists(ns):
                attempt(f"delete {ns}:{ifname}", partial(link.delete, ns, ifname))
        for ns in reversed(state.namespaces):
            attempt(f"remove namespace {ns}", partial(node.remove, ns))
        for key, value in state.sysctls.items():
            attempt(f"restore {key}", partial(sysctl.release, key, self.name, value))
        if problems:
            self.say(f"lab {self.name}: down left problems (state kept in {state.dir}):")
            for problem in problems:
                self.say(f"  {problem}")
        else:
            shutil.rmtree(state.dir, ignore_errors=True)
            self.say(f"lab {self.name}: down, nothing left")
        return problems

    def _remove_image_containers(self, state: LabState) -> None:
        """The lab's containers in the engine: those its agents recorded, and any labelled with its prefix."""
        for state_dir in state.agent_state_dirs:
            if Path(state_dir).is_dir():
                host = Path(state_dir).parent.name
                runtime = docker_runtime.DockerRuntime(state.docker_url, Path(state_dir), host, scope=state.prefix)
                try:
                    for name in runtime.known():
                        runtime.remove(name)
                finally:
                    runtime.close()
        docker_runtime.remove_scope(state.docker_url, state.prefix)

    # -- status / exec ------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """What is recorded and whether it is still there."""
        state = self.state()
        if state is None:
            return {"name": self.name, "up": False}
        return {
            "name": self.name,
            "up": True,
            "dir": str(state.dir),
            "api": state.api_url,
            "hosts": state.hosts,
            "namespaces": {ns: node.exists(ns) for ns in state.namespaces},
            "processes": {
                p.label: {"pid": p.pid, "alive": procs.alive(p.ref), "netns": p.netns, "log": p.log} for p in state.processes
            },
            "sysctls_changed": state.sysctls,
            **(self._ha_status(state) if state.ha else {}),
        }

    @staticmethod
    def _ha_status(state: LabState) -> dict[str, object]:
        """The store members as each describes itself, and each controller's role from its log."""
        store = {
            services.member_label(m.member): {"role": m.role or None, "status": m.status or m.error, "term": m.term}
            for m in ha.members(state)
        }
        lead = ha.leader(state)
        ctls = {
            p.label: {"pid": p.pid, "alive": procs.alive(p.ref), "role": ha.controller_state(p) or None,
                      "listen": p.argv[p.argv.index("--listen") + 1] if "--listen" in p.argv else None}
            for p in state.processes if p.label.startswith("controller-")
        }
        return {"ha": True, "store_members": store, "store_leader": services.member_label(lead) if lead else None,
                "controllers": ctls}

    def netns_of(self, target: str) -> str:
        """Namespace of a lab node (``inet``, ``mgmt``, ``h1``...) or of a container (asked from the API)."""
        state = self.state()
        if state is None:
            raise LookupError(f"lab {self.name} is not up")
        if state.ns(target) in state.namespaces:
            return state.ns(target)
        if not state.api_url:
            raise LookupError(f"{target!r} is not a lab node and this lab has no API to ask about containers")
        token = services.token_file(state.dir).read_text().strip()
        return services.ApiClient(state.api_url, token).container_netns(target)
