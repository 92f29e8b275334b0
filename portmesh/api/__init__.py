"""portmesh api component."""
