"""portmesh lab component."""
