"""Pigeon's Textual terminal UI."""
