"""``python -m portmesh.cli``: the same CLI as the ``portmesh`` console script (used by ``lab exec``)."""

from portmesh.cli.app import main

main()
