"""portmesh cli component."""
