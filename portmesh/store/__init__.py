"""portmesh store component."""
