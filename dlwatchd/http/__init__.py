"""The optional, read-only, localhost-only HTTP shim for health, GPU, job and catalog queries."""
