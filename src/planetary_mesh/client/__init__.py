"""Talk to a coordinator from Python; run Python calls on the mesh."""

from planetary_mesh.client.client import Client
from planetary_mesh.client.executor import MeshExecutor

__all__ = ["Client", "MeshExecutor"]
