"""`python -m sim`: the `fl-sweep` command."""

from sim.sweep import main

raise SystemExit(main())
