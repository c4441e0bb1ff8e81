"""Transports turn a medium into byte-stream links between two nodes."""
