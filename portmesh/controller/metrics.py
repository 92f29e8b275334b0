"""Prometheus metrics of the controller: what each sync cost and what it sent.

One registry per controller instance (no process-global state), served by
``python -m portmesh.controller --metrics ADDR:PORT``. Benchmarks read these
instead of parsing logs.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ControllerMetrics:
    """The controller's counters and gauges, labelled by host."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.flow_mods = Counter(
            "portmesh_controller_flow_mods", "Flow-mods sent to switches", ["host", "op"], registry=self.registry
        )
        self.syncs = Counter("portmesh_controller_syncs", "Syncs that reached the switch", ["host"], registry=self.registry)
        self.sync_seconds = Histogram(
            "portmesh_controller_sync_seconds", "Compile + diff + bundle commit, per sync", ["host"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30), registry=self.registry,
        )
        self.flows = Gauge("portmesh_controller_flows", "Flows the switch holds (desired = installed)", ["host"],
                           registry=self.registry)
        self.generation = Gauge("portmesh_controller_generation", "Store generation the switch realises", ["host"],
                                registry=self.registry)
        self.is_master = Gauge("portmesh_controller_is_master",
                               "1 if this instance holds the store lock and programs the switches, 0 if standby",
                               registry=self.registry)
        self.epoch = Gauge("portmesh_controller_epoch",
                           "Controller epoch (OpenFlow role generation id) of the current master as this instance knows it",
                           registry=self.registry)
        self.packet_ins = Counter("portmesh_controller_packet_ins",
                                  "Packet-ins received, by this instance's role then (OVS sends none to a slave)",
                                  ["role"], registry=self.registry)
        self.switches = Gauge("portmesh_controller_switches", "Connected switches", registry=self.registry)
        self.icmp_errors = Counter(
            "portmesh_controller_icmp_errors",
            "ICMP errors punted to the controller (after the switch's meter), by direction (in: to a public IP, "
            "out: from a container) and verdict (delivered, passed, unowned, foreign, malformed)",
            ["host", "direction", "verdict"], registry=self.registry,
        )
