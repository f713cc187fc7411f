"""Talk to a coordinator from Python."""

from planetary_mesh.client.client import Client

__all__ = ["Client"]
