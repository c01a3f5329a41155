"""The supervisor process: watcher, intake, queue, claims, lanes of worker processes, heartbeat."""
