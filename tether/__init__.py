"""Tether: keeps MCP sessions and their SSE streams alive across failures."""

__version__ = "0.1.0"
