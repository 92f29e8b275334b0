"""portmesh runtime component."""
