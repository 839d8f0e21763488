"""``python -m wattmesh.broker``: the same as ``wattmesh broker``."""

from wattmesh.broker.command import main

raise SystemExit(main())
