"""dlwatchd: a spool-directory daemon for deep-learning pixel classification."""

__version__ = "0.1.0"
