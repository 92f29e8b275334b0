"""portmesh controller component."""
