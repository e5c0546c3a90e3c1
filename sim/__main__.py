"""`python -m sim`: the `fl-sweep` command."""

from sim.sweeps.cli import main

raise SystemExit(main())
