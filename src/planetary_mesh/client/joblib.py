"""A joblib parallel backend named "mesh": ``joblib.Parallel`` code runs on the mesh unchanged.

Importing this module registers the backend::

    import joblib
    import planetary_mesh.client.joblib

    with joblib.parallel_config(backend="mesh", config=path):  # or client=, cpus=, memory=...
        results = joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in xs)

It is a thin layer on :class:`~planetary_mesh.client.executor.MeshExecutor`: each ``Parallel``
call gets an executor of its own (so one mesh job, visible in `mesh jobs`), and each joblib batch
travels as one task through ``submit_batch``. Only the batch's ``(func, args, kwargs)`` items are
shipped, never joblib's ``BatchedCalls`` wrapper: cloudpickle sends installed packages by
reference, so shipping the wrapper would make every agent need joblib installed.

``n_jobs=-1`` means every CPU of the mesh's ready nodes, counted when ``Parallel`` starts. As
joblib does for all its backends, an effective ``n_jobs`` of 1 runs the calls here, in this
process, one after the other: a mesh with a single CPU, or none ready, runs nothing remotely.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

try:
    import joblib
    from joblib._parallel_backends import (
        AutoBatchingMixin,
        ParallelBackendBase,
        SequentialBackend,
    )
except ImportError as missing:  # an optional dependency: say how to get it
    raise ImportError(
        "planetary_mesh.client.joblib needs joblib, which is not installed here: run"
        " `pip install joblib` (or `pip install 'planetary-mesh[joblib]'`)"
    ) from missing

from planetary_mesh.client.client import Client
from planetary_mesh.client.executor import MeshExecutor

__all__ = ["MeshBackend", "register"]

# What joblib's Parallel hands every backend's configure(); meaningful to process pools only.
_JOBLIB_OWN = frozenset({"max_nbytes", "temp_folder", "mmap_mode", "verbose", "context"})

Call = tuple[Any, tuple[Any, ...], dict[str, Any]]


class MeshBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's backend protocol, answered with a MeshExecutor per ``Parallel`` call.

    Keyword arguments (from ``parallel_config(backend="mesh", ...)`` or ``Parallel(...)``) go to
    the executor: ``client`` or ``config``, and the calls' options ``cpus``, ``memory``,
    ``timeout``, ``retries``, ``priority``, ``network``, ``env``, ``name``. joblib's automatic
    batching (AutoBatchingMixin) sizes the batches so that each task runs long enough to hide
    the mesh's round trip, as it does for process pools.
    """

    default_n_jobs = -1  # Parallel() with no n_jobs: the whole mesh, not one local process
    supports_retrieve_callback = True
    # Calls on the mesh share no memory with the caller: joblib runs require="sharedmem" code on
    # its local threading backend instead.
    supports_sharedmem = False
    uses_threads = False

    def __init__(self, nesting_level: int | None = None, **backend_kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level, **backend_kwargs)
        self._given: dict[str, Any] = dict(backend_kwargs)  # from parallel_config(...)
        self._settings: dict[str, Any] = dict(backend_kwargs)  # and this Parallel(...)'s
        self._executor: MeshExecutor | None = None
        self._pending: set[Future[Any]] = set()
        self._lock = threading.Lock()

    # -- sizing -------------------------------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """``n_jobs`` as given when positive; negative counts back from the mesh's ready CPUs
        (-1 all of them, -2 all but one), as joblib counts back from the local CPUs."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning: use -1 for the whole mesh")
        if n_jobs is not None and n_jobs > 0:
            return n_jobs
        return max(self._ready_cpus() + 1 + (n_jobs if n_jobs is not None else -1), 1)

    def _ready_cpus(self) -> int:
        client: Client | None = self._settings.get("client")
        if client is not None:
            nodes = client.nodes()
        else:
            with Client.from_config(_path(self._settings.get("config"))) as own:
                nodes = own.nodes()
        return math.floor(sum(node.cpus for node in nodes if node.state == "ready"))

    # -- one Parallel call ----------------------------------------------------------------------

    def configure(
        self,
        n_jobs: int = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **backend_kwargs: Any,
    ) -> int:
        """A fresh executor for this ``Parallel`` call; the mesh-wide worker count."""
        self.parallel = parallel
        self._settings = {
            **self._given,
            **{key: value for key, value in backend_kwargs.items() if key not in _JOBLIB_OWN},
        }
        n = self.effective_n_jobs(n_jobs)
        self._drop_executor()  # a backend reused without terminate() in between
        self._executor = self._new_executor()
        return n

    def _new_executor(self) -> MeshExecutor:
        options = dict(self._settings)
        client = options.pop("client", None)
        config = options.pop("config", None)
        return MeshExecutor(client, config=_path(config), **options)

    def submit(self, func: Any, callback: Any = None) -> Future[Any]:
        """Send a joblib batch as one task; ``callback`` (joblib's) runs when it ends."""
        if self._executor is None:
            raise RuntimeError(
                "the mesh backend was not configured: use it through joblib.Parallel"
            )
        items = getattr(func, "items", None)
        if items is not None:
            calls: list[Call] = [(fn, tuple(args), dict(kwargs)) for fn, args, kwargs in items]
            future: Future[Any] = self._executor.submit_batch(calls)
        else:  # a plain callable, not a BatchedCalls: run it as it is
            future = self._executor.submit(func)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._ended)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _ended(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        """The batch's list of results, or the exception one of its calls raised."""
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A call failed: calls not started yet never run (those running finish unread)."""
        self._drop_executor()
        if ensure_ready:
            self._executor = self._new_executor()

    def terminate(self) -> None:
        """The ``Parallel`` call is over: stop the executor's threads and close its client."""
        self._drop_executor()

    def _drop_executor(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        with self._lock:
            busy, self._pending = bool(self._pending), set()
        # Waiting is only for a clean end; with calls still out, it would wait on the mesh.
        executor.shutdown(wait=not busy, cancel_futures=busy)

    def get_nested_backend(self) -> tuple[Any, int | None]:
        """Sequential: a call that itself uses joblib runs its inner loop where it runs."""
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


def _path(config: Any) -> Path | None:
    return None if config is None else Path(config)


def register() -> None:
    """Make ``backend="mesh"`` known to joblib (done on import; again is harmless)."""
    joblib.register_parallel_backend("mesh", MeshBackend)


register()
