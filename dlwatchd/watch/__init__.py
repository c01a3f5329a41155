"""Filesystem events as hints: a thin watchdog handler that only says which directory to look at."""
