"""Planetary Mesh: turn the idle machines of a home, lab or office into one computer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from planetary_mesh.client.executor import MeshExecutor

__all__ = ["MeshExecutor", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the agent and the coordinator import this package too, and need
    # none of the client's machinery.
    if name == "MeshExecutor":
        from planetary_mesh.client.executor import MeshExecutor

        return MeshExecutor
    raise AttributeError(f"module 'planetary_mesh' has no attribute {name!r}")
