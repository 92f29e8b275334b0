"""``python -m portmesh.agent --host H --store REMOTE --ovsdb REMOTE --controller tcp:IP:PORT[,...] --underlay-dev IFACE``
(and ``--uplink IFACE`` on a gateway host).

Runs inside the host's network namespace (the lab puts it there). Stopping the
agent leaves containers and plumbing as they are: traffic keeps flowing and a
new agent adopts them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path

import pyroute2.config

from portmesh.agent.bridge import Bridge, parse_controller_targets
from portmesh.agent.ebpf.counters import TrafficReporter, datapath_maps
from portmesh.agent.ebpf.host import DEFAULT_PIN_DIR, EbpfDatapath
from portmesh.agent.health import HealthChecker
from portmesh.agent.heartbeat import DEFAULT_INTERVAL, Heartbeat
from portmesh.agent.service import Agent, AgentConfig
from portmesh.runtime import docker as docker_runtime
from portmesh.runtime.light import LightRuntime
from portmesh.store.client import Store

log = logging.getLogger("portmesh.agent")


def _controllers(text: str) -> str:
    """argparse type for --controller: validated, normalised (spaces dropped), kept comma-separated."""
    try:
        return ",".join(parse_controller_targets(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    """argparse type for --heartbeat-interval: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number of seconds")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m portmesh.agent", description=__doc__)
    ap.add_argument("--host", required=True, help="this host's name in the store")
    ap.add_argument("--store", required=True, help="state store remote: unix:PATH or tcp:IP:PORT[,...]")
    ap.add_argument(
        "--datapath",
        choices=("ovs", "ebpf"),
        default="ovs",
        help="what forwards on this host: Open vSwitch programmed by the controller (needs --ovsdb and "
        "--controller), or the eBPF datapath this agent loads and fills (default ovs)",
    )
    ap.add_argument(
        "--bpf-dir",
        type=Path,
        default=DEFAULT_PIN_DIR,
        help="eBPF datapath: the bpffs directory its maps are pinned in (mounted if it is not one; "
        f"default {DEFAULT_PIN_DIR})",
    )
    ap.add_argument("--ovsdb", default=None, help="this host's Open_vSwitch db: unix:PATH or tcp:IP:PORT")
    ap.add_argument(
        "--controller",
        default=None,
        type=_controllers,
        help="OpenFlow controller target(s) for br0, comma-separated: tcp:IP:PORT[,tcp:IP:PORT...] "
        "(one Controller row each; every controller instance, e.g. tcp:IP:6653,tcp:IP:6654)",
    )
    ap.add_argument(
        "--underlay-dev",
        default=None,
        help="the interface the VXLAN tunnels to other hosts run over; this host's underlay IP (registered in the "
        "store) must be on it (default: none, no tunnels: a cloud of one machine)",
    )
    ap.add_argument(
        "--uplink",
        default=None,
        help="a gateway host's interface facing the outside (it keeps its address): made a br0 port so the switch "
        "takes inbound traffic to the public pools straight from it, and the kernel's copy of that traffic is "
        "dropped at its ingress (default: none, the host routes it in through br0)",
    )
    ap.add_argument("--netns-prefix", default="", help="prefix of the containers' namespace names")
    ap.add_argument(
        "--state-dir", type=Path, default=None, help="where the runtime records containers (default /var/lib/portmesh/agent/HOST)"
    )
    ap.add_argument(
        "--docker-url",
        default=None,
        help="Docker Engine API for image containers: a Docker daemon or Podman's service, e.g. unix:///PATH "
        "(default: /var/run/docker.sock if it exists; 'none' for light containers only)",
    )
    ap.add_argument(
        "--heartbeat-interval",
        type=_positive_seconds,
        default=DEFAULT_INTERVAL,
        help="seconds between this agent's heartbeats in its Host row: the API counts an eBPF host down once "
        "they stop for its --agent-lease (default 3 beats); on OVS a stopped heartbeat is only reported "
        f"(default {DEFAULT_INTERVAL:g})",
    )
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    if args.datapath == "ovs" and (args.ovsdb is None or not args.controller):
        ap.error("--datapath ovs needs --ovsdb and --controller")
    args.controller = args.controller or ""
    return args


async def serve(args: argparse.Namespace) -> None:
    # pyroute2 forks helper children (netns work) and stops them with SIGTERM. A forked child
    # inherits asyncio's signal wake-up fd, so its SIGTERM reached *our* loop and stopped the
    # agent mid-convergence. Children with the default SIGTERM disposition write nothing.
    pyroute2.config.disable_mp_signal = True
    state_dir = args.state_dir or Path("/var/lib/portmesh/agent") / args.host
    # The store's agent view (host=): only this host's Container rows (issue 12: an agent's cost
    # grows with its own host's work, not with the cloud), Host rows whole (peers' underlay IPs),
    # Global (its generation is what the agent reports; the cloud's config), and of the Mapping
    # table only the rows with a health check (issue 15: which of its containers to check), never
    # all of it (at 100,000 mappings that replica would be most of the agent's memory).
    # An eBPF host's maps hold every mapping of the cloud (as an OVS switch's flows do): whole view.
    # Its own traffic reports and other hosts' are written, never read, by an agent (reports=False:
    # a host's counters every few seconds must not wake every eBPF agent into a pass).
    store = Store(args.store, host=None if args.datapath == "ebpf" else args.host, reports=False)
    await asyncio.to_thread(store.start)
    bridge: Bridge | EbpfDatapath = (
        EbpfDatapath(args.bpf_dir, uplink=args.uplink) if args.datapath == "ebpf" else Bridge(args.ovsdb)
    )
    await asyncio.to_thread(bridge.start)
    cfg = AgentConfig(args.host, args.controller, args.netns_prefix, args.underlay_dev, args.uplink)
    docker_url = args.docker_url if args.docker_url is not None else docker_runtime.default_url()
    engine = None
    if docker_url and docker_url != "none":
        engine = docker_runtime.DockerRuntime(docker_url, state_dir, args.host, scope=args.netns_prefix)
    agent = Agent(cfg, store, bridge, LightRuntime(state_dir), engine)
    stop_events = threading.Event()
    if engine is not None:
        engine.watch(agent.notify, stop_events)
        log.info("image containers through %s", docker_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("agent for host %s got %s; stopping", args.host, sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info("agent for host %s started (state in %s)", args.host, state_dir)
    died: BaseException | None = None
    # The health checks (issue 15) run beside the converge loop and follow the store themselves, so
    # a long convergence never delays a check. Checks that died are an agent not doing its job:
    # like a dead converge loop, it exits non-zero and its supervisor restarts it.
    health = HealthChecker(args.host, store)
    checks_died: list[BaseException] = []

    def checks_ended(task: asyncio.Future[None]) -> None:
        if not stop.is_set() and not task.cancelled():
            checks_died.append(task.exception() or RuntimeError("the health checks returned without being asked to stop"))
            stop.set()

    checks = asyncio.ensure_future(health.run(stop))
    checks.add_done_callback(checks_ended)
    # An eBPF host's per-mapping counters and drops (no switch for the master to read): reported into
    # its Host row every few seconds, in a worker thread beside the converge loop, never in it.
    reporter: asyncio.Future[None] | None = None
    if isinstance(bridge, EbpfDatapath):
        ebpf = bridge
        traffic = TrafficReporter(args.host, store, lambda: datapath_maps(ebpf.loaded.map))
        reporter = asyncio.ensure_future(traffic.run(stop))
    # The lease (schema 1.9.0): beats beside the converge loop, never in it (agent/heartbeat.py).
    beats = asyncio.ensure_future(Heartbeat(args.host, store, args.datapath, args.heartbeat_interval).run(stop))
    try:
        await agent.run(stop)
        if checks_died:
            died = checks_died[0]
            log.error("agent for host %s: health checks died: %s: %s", args.host, type(died).__name__, died, exc_info=died)
        elif not stop.is_set():
            died = RuntimeError("the converge loop returned without being asked to stop")
    except Exception as exc:
        # Supervision (issue 13): an agent whose loop died must not linger holding its store and
        # OVSDB connections while plumbing nothing; it exits non-zero so its supervisor restarts it.
        died = exc
        log.error("agent for host %s: main task died: %s: %s", args.host, type(exc).__name__, exc, exc_info=exc)
    finally:
        checks.cancel()
        beats.cancel()
        await asyncio.gather(checks, beats, return_exceptions=True)
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
        stop_events.set()
        if engine is not None:
            engine.unwatch()
            engine.close()
        await asyncio.to_thread(bridge.close)
        await asyncio.to_thread(store.close)
    if died is not None:
        log.error("agent for host %s exits with status 1 so its supervisor restarts it; containers left running", args.host)
        sys.exit(1)
    log.info("agent for host %s stopped; containers left running", args.host)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
