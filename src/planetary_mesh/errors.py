"""One exception tree for the whole project.

Every error a person can see derives from :class:`MeshError` and carries a message that says what
happened and what to do next. The CLI prints ``str(error)`` as one line and exits non-zero; it
never shows a traceback for a ``MeshError``::

    MeshError
    ├── ConfigError            bad flag, file, duration or size
    ├── IllegalTransition      the state machine refused an event (a bug or a stale report)
    ├── TrustError             certificates, tokens and CA pinning
    │   ├── TokenError         malformed, expired, used up or unknown join token
    │   └── CAMismatchError    the server's CA is not the one the token pins
    ├── StoreError             the durable store failed or holds something unexpected
    ├── SandboxError           a task could not be started in its sandbox
    └── ClientError            talking to the coordinator failed
        ├── CoordinatorUnreachable
        ├── NotFound           unknown job, task or node (HTTP 404)
        └── RequestRejected    the coordinator refused the request (other 4xx)
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error Planetary Mesh raises on purpose."""


class ConfigError(MeshError):
    """A flag, environment variable or configuration file holds something unusable."""


class IllegalTransition(MeshError):
    """An event does not apply to the state a task is in."""

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"a task in state {state!r} cannot take event {event!r}")
        self.state = state
        self.event = event


class TrustError(MeshError):
    """Certificates, keys, tokens or CA pinning failed."""


class TokenError(TrustError):
    """A join token is malformed, expired, used up, revoked or unknown."""


class CAMismatchError(TrustError):
    """The coordinator presents a CA other than the one the join token pins."""


class StoreError(MeshError):
    """The durable store failed."""


class DiscoveryError(MeshError):
    """Finding the coordinator on the LAN (mDNS) failed, or advertising it did."""


class SandboxError(MeshError):
    """A task could not be started inside its sandbox."""


class ClientError(MeshError):
    """A request to the coordinator failed."""


class CoordinatorUnreachable(ClientError):
    """No connection to the coordinator could be made."""


class NotFound(ClientError):
    """The coordinator does not know the job, task or node asked for."""


class RequestRejected(ClientError):
    """The coordinator refused the request (bad input, not allowed)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
