"""Planetary Mesh: turn the idle machines of a home, lab or office into one computer."""

__version__ = "0.1.0"
