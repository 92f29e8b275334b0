"""``python -m portmesh.lab``."""

from portmesh.lab.cli import main

main()
