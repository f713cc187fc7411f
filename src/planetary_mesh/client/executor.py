"""MeshExecutor: the standard ``concurrent.futures.Executor``, running calls on the mesh.

``submit`` returns a stdlib ``Future``; stdlib ``wait`` and ``as_completed`` work on it. Calls
travel pickled (cloudpickle) as tasks of one job per set of options (an executor's job, or one
per ``options(...)``), so every task semantic of the mesh holds: durable, fenced, placed by
resources, run again elsewhere when a node is lost, visible on the dashboard and in `mesh why`.

Two threads per executor do the talking: a *sender* that batches the calls submitted since it
last looked into one request (``map`` of 10,000 items is a handful of requests), and a
*follower* per job that long-polls the job's started and ended calls and resolves the futures.
A future turns ``running`` when the mesh says its call started: until then ``cancel()`` works
(as the stdlib says) and the call will not run, or is killed if it just began; a running call
is cancelled only by the explicit ``cancel_running(future)``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from planetary_mesh.client import pickling
from planetary_mesh.client.client import Client
from planetary_mesh.errors import MeshError
from planetary_mesh.protocol import MAX_ARRAY, CallUpdate, FunctionSubmit
from planetary_mesh.units import parse_size

log = logging.getLogger(__name__)

T = TypeVar("T")
REQUEST_BYTES = 32 * 1024 * 1024  # of pickled calls in one request (the coordinator takes 64)
FOLLOW_WAIT_S = 10.0  # each long poll of a job's calls


@dataclass(frozen=True)
class CallOptions:
    """What the calls of one job share: their resources and policy."""

    cpus: float = 1.0
    memory: int = 256 * 1024**2
    gpus: int = 0
    timeout: float | None = None
    retries: int = 0
    priority: int = 0
    network: bool = False
    env: tuple[tuple[str, str], ...] = ()
    name: str = "functions"

    def changed(self, **options: Any) -> CallOptions:
        if "memory" in options and isinstance(options["memory"], str):
            options["memory"] = parse_size(options["memory"])
        if "env" in options:
            options["env"] = tuple(sorted(dict(options["env"]).items()))
        unknown = set(options) - set(CallOptions.__dataclass_fields__)
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(sorted(unknown))}: the options are"
                f" {', '.join(CallOptions.__dataclass_fields__)}"
            )
        return replace(self, **options)


@dataclass
class _Job:
    """One job of calls: its futures by task index, and where its follower is."""

    options: CallOptions
    id: str | None = None
    futures: dict[int, Future[Any]] = field(default_factory=dict)
    cursor: int = 0
    follower: threading.Thread | None = None
    # Indices the mesh has given this executor's calls so far (they come in order). The mesh
    # places a call as it files it, so a quick call can start and end, and its follower hear of
    # it, before the sender has filed the answer that names its index: such updates wait here
    # for their future instead of being dropped (which left the future pending for ever).
    known: int = 0
    early: dict[int, list[CallUpdate]] = field(default_factory=dict)


@dataclass
class _Queued:
    future: Future[Any]
    options: CallOptions
    payload: str


class _Engine:
    """The threads and jobs behind an executor and its ``options`` views."""

    def __init__(self, client: Client, own_client: bool) -> None:
        self.client = client
        self.own_client = own_client
        self.lock = threading.Condition()
        self.queue: list[_Queued] = []
        # Taken from the queue and on their way: not in a job's futures until the mesh has
        # given them their indices, yet as outstanding as the rest (a shutdown cancels them).
        self.sending: list[_Queued] = []
        self.to_cancel: list[tuple[_Job, int]] = []
        self.jobs: dict[CallOptions, _Job] = {}
        self.where: dict[Future[Any], tuple[_Job, int]] = {}
        self.shutting_down = False
        self.closed = False
        self.sender = threading.Thread(target=self._send_loop, name="mesh-sender", daemon=True)
        self.sender.start()

    # -- submitting ---------------------------------------------------------------------------

    def enqueue(self, items: list[_Queued]) -> None:
        with self.lock:
            if self.shutting_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self.queue.extend(items)
            self.lock.notify_all()
        for item in items:
            item.future.add_done_callback(self._on_done)

    def _send_loop(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.to_cancel and not self.shutting_down:
                    self.lock.wait()
                if not self.queue and not self.to_cancel:
                    return  # shutting down, nothing left to send
                batch, self.queue = self.queue, []
                self.sending = batch
                cancels, self.to_cancel = self.to_cancel, []
            self._send(batch)
            with self.lock:
                self.sending = []
            self._send_cancels(cancels)

    def _send(self, batch: list[_Queued]) -> None:
        by_options: dict[CallOptions, list[_Queued]] = {}
        for item in batch:
            if not item.future.cancelled():  # cancelled before it was sent: never sent
                by_options.setdefault(item.options, []).append(item)
        for options, items in by_options.items():
            for part in _parts(items):
                try:
                    self._send_part(options, part)
                except Exception as error:  # the calls cannot reach the mesh: say so on each
                    for item in part:
                        _fail(item.future, error)

    def _send_part(self, options: CallOptions, part: list[_Queued]) -> None:
        with self.lock:
            job = self.jobs.get(options)
            if job is None:
                job = self.jobs[options] = _Job(options)
        calls = [item.payload for item in part]
        if job.id is None:
            info = self.client.submit_functions(
                FunctionSubmit(
                    name=options.name,
                    python=pickling.PYTHON,
                    calls=calls,
                    env=dict(options.env),
                    cpus=options.cpus,
                    memory=options.memory,
                    gpus=options.gpus,
                    timeout=options.timeout,
                    retries=options.retries,
                    priority=options.priority,
                    network=options.network,
                )
            )
            first = 0
        else:
            first = self.client.add_calls(job.id, calls).first
        with self.lock:
            if job.id is None:
                job.id = info.id
            for offset, item in enumerate(part):
                job.futures[first + offset] = item.future
                self.where[item.future] = (job, first + offset)
                if item.future.cancelled():  # cancelled while on its way: stop it there
                    self.to_cancel.append((job, first + offset))
            job.known = max(job.known, first + len(part))
            early = [u for i in range(first, first + len(part)) for u in job.early.pop(i, [])]
            if job.follower is None:
                job.follower = threading.Thread(
                    target=self._follow, args=(job,), name=f"mesh-follow-{job.id}", daemon=True
                )
                job.follower.start()
            self.lock.notify_all()
        for update in early:  # heard of before this thread could file their futures
            self._resolve(job, update)

    def _on_done(self, future: Future[Any]) -> None:
        if not future.cancelled():
            return
        # Tell the stdlib's wait() and as_completed(), which count a cancelled future only
        # once its executor has said so.
        future.set_running_or_notify_cancel()
        with self.lock:
            placed = self.where.get(future)
            if placed is not None:
                self.to_cancel.append(placed)
                self.lock.notify_all()

    def _send_cancels(self, cancels: list[tuple[_Job, int]]) -> None:
        by_job: dict[str, list[int]] = {}
        for job, index in cancels:
            if job.id is not None:
                by_job.setdefault(job.id, []).append(index)
        for job_id, indices in by_job.items():
            try:
                self.client.cancel_tasks(job_id, indices)
            except MeshError as error:
                log.warning("could not cancel calls %s of job %s: %s", indices, job_id, error)

    def cancel_running(self, future: Future[Any]) -> bool:
        with self.lock:
            placed = self.where.get(future)
        if placed is None or future.done() or placed[0].id is None:
            return False
        job, index = placed
        assert job.id is not None
        self.client.cancel_tasks(job.id, [index])
        return True

    # -- following ----------------------------------------------------------------------------

    def _follow(self, job: _Job) -> None:
        assert job.id is not None
        while True:
            with self.lock:
                while not job.futures and not self.shutting_down:
                    self.lock.wait()
                if not job.futures and self.shutting_down:
                    return
            try:
                updates = self.client.call_updates(job.id, job.cursor, wait=FOLLOW_WAIT_S)
            except Exception as error:  # whatever it is, the futures must not be left hanging
                if self.closed:
                    return
                log.warning("lost track of job %s for a moment (%s); asking again", job.id, error)
                with self.lock:  # a pause before the next try, cut short by a shutdown
                    self.lock.wait(1.0)
                continue
            for update in updates.updates:
                self._resolve(job, update)
            job.cursor = updates.cursor

    def _resolve(self, job: _Job, update: CallUpdate) -> None:
        with self.lock:
            future = job.futures.get(update.index)
            if future is None and update.index >= job.known:
                job.early.setdefault(update.index, []).append(update)  # filed in a moment
                return
        if future is None:  # ended already, and forgotten
            return
        if update.state == "running":
            if not future.done() and not future.running():  # a call run again starts twice
                future.set_running_or_notify_cancel()
            return
        if update.state not in ("succeeded", "failed", "cancelled"):
            return
        with self.lock:  # ended: forgotten, whether or not anyone still waits for it
            job.futures.pop(update.index, None)
            self.where.pop(future, None)
            self.lock.notify_all()
        if future.done():  # cancelled here before it ended there
            return
        assert job.id is not None
        result, error = pickling.outcome(update, job.id)
        _settle(future, result, error)

    # -- the end ------------------------------------------------------------------------------

    def outstanding(self) -> list[Future[Any]]:
        with self.lock:
            pending = {item.future: None for item in [*self.queue, *self.sending]}
            for job in self.jobs.values():
                pending.update(dict.fromkeys(job.futures.values()))
        return list(pending)

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        if cancel_futures:
            for future in self.outstanding():
                future.cancel()  # only those not running yet; their done callbacks send it
        with self.lock:
            already = self.shutting_down
            self.shutting_down = True
            self.lock.notify_all()
        if wait:
            self._finish()
        elif not already:  # the rest in the background: the futures still resolve
            threading.Thread(target=self._finish, name="mesh-shutdown", daemon=True).start()

    def _finish(self) -> None:
        """Wait for every future, then for the threads, then close what this engine opened."""
        wait_for(self.outstanding())
        self.sender.join()
        with self.lock:
            followers = [j.follower for j in self.jobs.values() if j.follower is not None]
            self.lock.notify_all()
        for follower in followers:
            if follower is not threading.current_thread():
                follower.join()
        with self.lock:
            if self.closed:
                return
            self.closed = True
        if self.own_client:
            self.client.close()


def _parts(items: list[_Queued]) -> Iterator[list[_Queued]]:
    """Requests of at most MAX_ARRAY calls and about REQUEST_BYTES."""
    part: list[_Queued] = []
    size = 0
    for item in items:
        if part and (len(part) >= MAX_ARRAY or size + len(item.payload) > REQUEST_BYTES):
            yield part
            part, size = [], 0
        part.append(item)
        size += len(item.payload)
    if part:
        yield part


def _settle(future: Future[Any], result: Any, error: BaseException | None) -> None:
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except Exception:  # InvalidStateError: it was cancelled meanwhile
        pass


def _fail(future: Future[Any], error: BaseException) -> None:
    if not future.done():
        _settle(future, None, error)


class MeshExecutor(Executor):
    """Run Python calls on the mesh with the stdlib's Executor interface.

    ``MeshExecutor()`` reads the client configuration as the ``mesh`` CLI does (or give
    ``client=`` or ``config=``); keyword options set the calls' resources and policy: ``cpus``,
    ``memory`` (bytes or "512M"), ``gpus`` (whole devices; ``CUDA_VISIBLE_DEVICES`` names
    them), ``timeout`` (seconds per call), ``retries``, ``priority``, ``network``, ``env`` and
    ``name`` (the job's, as `mesh jobs` shows it).
    """

    def __init__(
        self,
        client: Client | None = None,
        *,
        config: Path | None = None,
        **options: Any,
    ) -> None:
        self._options = CallOptions().changed(**options)  # a bad option fails before anything
        own = client is None
        self._engine = _Engine(client or Client.from_config(config), own)

    @classmethod
    def _view(cls, engine: _Engine, options: CallOptions) -> MeshExecutor:
        view = cls.__new__(cls)
        view._engine = engine
        view._options = options
        return view

    def options(self, **options: Any) -> MeshExecutor:
        """The same executor, for calls with other options (``cpus``, ``memory``, ``timeout``,
        ``retries``, ...): they go to a job of their own. Shutting down either shuts down both."""
        return MeshExecutor._view(self._engine, self._options.changed(**options))

    def submit(  # type: ignore[override]
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        mesh_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on the mesh; ``mesh_options`` for this call alone."""
        options = self._options.changed(**mesh_options) if mesh_options else self._options
        future: Future[T] = Future()
        payload = pickling.pickle_call(fn, args, kwargs)
        self._engine.enqueue([_Queued(future, options, payload)])
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Results in the order of the inputs; ``chunksize`` items per task (fewer, larger
        tasks for many quick calls). As the stdlib's: the calls are all submitted at once,
        ``timeout`` counts from this call, and leaving the iterator early cancels the rest."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        end = None if timeout is None else time.monotonic() + timeout
        items = list(zip(*iterables, strict=False))
        queued: list[_Queued] = []
        for start in range(0, len(items), chunksize):
            chunk = items[start : start + chunksize]
            future: Future[Any] = Future()
            if chunksize == 1:
                payload = pickling.pickle_call(fn, chunk[0], {})
            else:
                payload = pickling.pickle_batch([(fn, args, {}) for args in chunk])
            queued.append(_Queued(future, self._options, payload))
        self._engine.enqueue(queued)
        futures = [item.future for item in queued]

        def results() -> Iterator[T]:
            try:
                futures.reverse()
                while futures:
                    left = None if end is None else end - time.monotonic()
                    value = _result_or_cancel(futures.pop(), left)
                    if chunksize == 1:
                        yield value
                    else:
                        yield from value
            finally:
                for future in futures:
                    future.cancel()

        return results()

    def submit_batch(
        self, calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]
    ) -> Future[list[Any]]:
        """Run several calls ``(fn, args, kwargs)`` as one task, in order; the future's result
        is the list of their results (the first exception raised is the future's)."""
        future: Future[list[Any]] = Future()
        self._engine.enqueue([_Queued(future, self._options, pickling.pickle_batch(calls))])
        return future

    def cancel_running(self, future: Future[Any]) -> bool:
        """Cancel the call behind ``future`` on the mesh even if it runs (its worker is killed);
        the future then raises :class:`~planetary_mesh.errors.CallCancelled`. False if the
        call already ended or was never sent."""
        return self._engine.cancel_running(future)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._engine.shutdown(wait, cancel_futures)

    def job_ids(self) -> list[str]:
        """The mesh jobs this executor's calls went to (`mesh status JOB`, the dashboard)."""
        with self._engine.lock:
            return [job.id for job in self._engine.jobs.values() if job.id is not None]


def _result_or_cancel(future: Future[Any], timeout: float | None) -> Any:
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future
