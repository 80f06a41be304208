"""`python -m dense` is the `dense` command."""

from dense.cli import main

raise SystemExit(main())
