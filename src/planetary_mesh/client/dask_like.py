"""A client with the shape of ``dask.distributed.Client``, for code written against dask's
futures API (``submit``, ``map``, ``gather``, ``as_completed``, ``cancel``) to run on the mesh.

Only the API is dask's: no dask is imported, and there is no scheduler, graph or data held on
workers. It is a thin layer on :class:`~planetary_mesh.client.executor.MeshExecutor`, so the
futures are the stdlib's ``concurrent.futures.Future`` and every call is a task of the mesh,
with the mesh's semantics::

    from planetary_mesh.client.dask_like import Client

    with Client(config=path, memory="1G") as client:
        futures = client.map(score, items)
        for future, result in client.as_completed(futures, with_results=True):
            ...

Differences from dask a caller may meet: a call that has started is cancelled only with
``cancel(..., force=True)`` (its worker is killed); ``close()`` cancels the calls not started
yet and lets running ones finish; dask's ``key``, ``pure``, ``workers``, ``resources`` do not
exist here (any other keyword goes to the function, as in dask).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

from planetary_mesh.client.client import Client as MeshClient
from planetary_mesh.client.executor import MeshExecutor

__all__ = ["Client", "as_completed"]

_SKIPPED = object()  # a failed future's place, with errors="skip"


class Client:
    """Run calls on the mesh through dask.distributed's Client API.

    ``Client(mesh_client)`` uses a connected :class:`planetary_mesh.client.Client`;
    ``Client(config=path)`` reads a client config (by default the one the ``mesh`` CLI uses).
    Keyword options set every call's resources and policy, as MeshExecutor's do: ``cpus``,
    ``memory``, ``timeout``, ``retries``, ``priority``, ``network``, ``env``, ``name``.
    """

    def __init__(
        self,
        client: MeshClient | None = None,
        *,
        config: Path | str | None = None,
        **options: Any,
    ) -> None:
        self._config = None if config is None else Path(config)
        self._executor = MeshExecutor(client, config=self._config, **options)
        self._closed = False

    @property
    def executor(self) -> MeshExecutor:
        """The MeshExecutor underneath, for what dask's API has no word for."""
        return self._executor

    def submit(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        retries: int | None = None,
        priority: int | None = None,
        **kwargs: Any,
    ) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` on the mesh. ``retries`` and ``priority`` (higher runs
        first) are this call's own; they put it in a job of its own options."""
        return self._executor.submit(fn, *args, mesh_options=_options(retries, priority), **kwargs)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        retries: int | None = None,
        priority: int | None = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> list[Future[Any]]:
        """A future per item, ``fn(*item, **kwargs)``, stopping at the shortest iterable.

        ``batch_size`` is accepted for dask's sake and not needed: the executor already sends
        all the calls submitted at once in a handful of requests.
        """
        del batch_size
        options = _options(retries, priority)
        return [
            self._executor.submit(fn, *args, mesh_options=options, **kwargs)
            for args in zip(*iterables, strict=False)
        ]

    def gather(self, futures: Any, errors: Literal["raise", "skip"] = "raise") -> Any:
        """Wait for the futures and put their results where they were: a Future, or lists,
        tuples, sets and dicts of them, nested as deep as wanted; other values stay as they are.

        ``errors="raise"`` raises the first failure met (in the order of the structure);
        ``"skip"`` leaves failed and cancelled futures out of their list, tuple, set or dict
        (a lone failed future gives None).
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', not {errors!r}")
        gathered = _gather(futures, errors == "skip")
        return None if gathered is _SKIPPED else gathered

    def as_completed(
        self, futures: Iterable[Future[Any]], with_results: bool = False, raise_errors: bool = True
    ) -> Iterator[Any]:
        """See the module-level :func:`as_completed`."""
        return as_completed(futures, with_results=with_results, raise_errors=raise_errors)

    def cancel(self, futures: Any, force: bool = False) -> None:
        """Cancel the calls behind the futures (a Future or a structure of them, as ``gather``
        takes). Calls not started never run. A running call goes on unless ``force``: then it
        is killed on the mesh and its future raises CallCancelled, for killing is not undone."""
        for future in _futures_in(futures):
            if not future.cancel() and force and not future.done():
                self._executor.cancel_running(future)

    def close(self) -> None:
        """Cancel the calls not started yet and stop taking new ones (``submit`` then raises
        RuntimeError); returns at once, without waiting for the mesh. Running calls finish
        there and their futures still get their results (dask would drop them)."""
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"config={str(self._config)!r}, " if self._config is not None else ""
        jobs = ", ".join(self._executor.job_ids()) or "none yet"
        state = "closed" if self._closed else "open"
        return f"<planetary_mesh Client: {where}jobs: {jobs}; {state}>"


def as_completed(
    futures: Iterable[Future[Any]], with_results: bool = False, raise_errors: bool = True
) -> Iterator[Any]:
    """Yield the futures as they finish (each once), or ``(future, result)`` pairs with
    ``with_results``; then a failed future raises its exception, or with
    ``raise_errors=False`` comes as ``(future, exception)``."""
    for future in concurrent.futures.as_completed(list(futures)):
        if not with_results:
            yield future
        elif raise_errors:
            yield future, future.result()
        else:
            yield future, _result_or_exception(future)


def _options(retries: int | None, priority: int | None) -> dict[str, Any] | None:
    options = {"retries": retries, "priority": priority}
    return {key: value for key, value in options.items() if value is not None} or None


def _result_or_exception(future: Future[Any]) -> Any:
    try:
        return future.result()
    except Exception as error:  # CancelledError too: the caller asked for it, not a raise
        return error


def _gather(obj: Any, skip: bool) -> Any:
    if isinstance(obj, Future):
        if skip:
            try:
                failed = obj.exception() is not None  # waits, as result() would
            except concurrent.futures.CancelledError:
                failed = True
            if failed:
                return _SKIPPED
        return obj.result()
    if isinstance(obj, dict):
        pairs = ((key, _gather(value, skip)) for key, value in obj.items())
        return _rebuilt(obj, dict, [(k, v) for k, v in pairs if v is not _SKIPPED])
    for kind in (list, tuple, set, frozenset):
        if isinstance(obj, kind):
            values = (_gather(value, skip) for value in obj)
            return _rebuilt(obj, kind, [value for value in values if value is not _SKIPPED])
    return obj


def _rebuilt(original: Any, kind: type[Any], items: list[Any]) -> Any:
    """The same type as the original where that is safe to build; the plain one otherwise."""
    if type(original) is kind:
        return kind(items)
    if hasattr(original, "_fields") and len(items) == len(original):  # a namedtuple
        return type(original)(*items)
    return kind(items)


def _futures_in(obj: Any) -> Iterator[Future[Any]]:
    if isinstance(obj, Future):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _futures_in(value)
    elif isinstance(obj, list | tuple | set | frozenset):
        for value in obj:
            yield from _futures_in(value)
