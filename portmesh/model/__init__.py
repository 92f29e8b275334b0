"""portmesh model component."""
