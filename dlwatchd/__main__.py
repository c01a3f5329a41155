"""`python -m dlwatchd` runs the command-line interface."""

from dlwatchd.cli import main

raise SystemExit(main())
