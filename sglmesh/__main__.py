"""Lets ``python -m sglmesh`` behave exactly like the ``sglmesh`` console script."""

from sglmesh.cli import main

raise SystemExit(main())
