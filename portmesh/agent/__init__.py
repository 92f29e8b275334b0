"""portmesh agent component."""
