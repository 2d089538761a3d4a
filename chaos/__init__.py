"""Chaos tooling: kill -9 runs against a real Alfred process and a fault-injecting fake Graph API."""
