"""Pydantic models of the spool protocol: requests, status and their JSON schemas."""
