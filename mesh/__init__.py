"""Pigeon: the mesh protocol, storage, transports, node runtime and CLI."""
