"""`python -m sim`: the `fl-sweep` command."""

from sweeps.cli import main

raise SystemExit(main())
