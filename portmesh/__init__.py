"""portmesh: standard ports on shared public IPs for containers, via OpenFlow MAC rewrite."""
