"""The joblib backend and the Dask-like client against a real local mesh: the same calls as
MeshExecutor's, reached through the APIs people already write their code against.

Two agents of one CPU each, so "the whole mesh" is two workers. The functions below live in a
folder the agents' task user cannot read: they reach the workers by value.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections import namedtuple
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future, wait
from typing import Any

import joblib
import pytest
from helpers import wait_for

import planetary_mesh.client.joblib as mesh_joblib
from planetary_mesh.client.dask_like import Client, as_completed
from planetary_mesh.errors import CallCancelled
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.xdist_group("python-apis")

RESULT_S = 60  # per result: the machine may be busy with other tests


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("mesh"), agents=2, agent_cpus=1) as local:
        yield local


@pytest.fixture
def dask(mesh: LocalMesh, request: pytest.FixtureRequest) -> Iterator[Client]:
    # A job of its own per test: no test's calls queue behind another's.
    with Client(config=mesh.client_config, name=request.node.name[:100]) as client:
        yield client


def square(x: int) -> int:
    return x * x


def square_where(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def scaled(x: int, y: int = 0, *, factor: int = 1) -> int:
    return (x + y) * factor


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"no threes here (got {x})")
    return x


def slow(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


# -- joblib ---------------------------------------------------------------------------------------


def test_joblib_parallel_runs_on_the_whole_mesh_and_keeps_order(mesh: LocalMesh) -> None:
    with joblib.parallel_config(backend="mesh", config=mesh.client_config, name="joblib-order"):
        assert joblib.Parallel(n_jobs=-1)._effective_n_jobs() == 2  # the mesh's CPUs
        out = joblib.Parallel(n_jobs=-1, timeout=RESULT_S)(
            joblib.delayed(square_where)(x) for x in range(50)
        )
        assert [value for value, _ in out] == [x * x for x in range(50)]
        assert os.getpid() not in {pid for _, pid in out}  # not run here
        # A managed Parallel keeps one executor for several calls.
        with joblib.Parallel(n_jobs=2, timeout=RESULT_S) as parallel:
            assert parallel(joblib.delayed(square)(x) for x in range(5)) == [0, 1, 4, 9, 16]
            assert parallel(joblib.delayed(scaled)(x, y=1, factor=2) for x in range(3)) == [
                2,
                4,
                6,
            ]

    backend = mesh_joblib.MeshBackend(config=mesh.client_config)
    assert [backend.effective_n_jobs(n) for n in (-1, None, -2, -5, 3)] == [2, 2, 1, 1, 3]
    with pytest.raises(ValueError, match="no meaning"):
        backend.effective_n_jobs(0)


def test_joblib_raises_a_failed_calls_own_exception_and_can_go_on(mesh: LocalMesh) -> None:
    with joblib.parallel_config(backend="mesh", config=mesh.client_config, name="joblib-error"):
        with pytest.raises(ValueError, match="no threes here") as caught:
            joblib.Parallel(n_jobs=-1, timeout=RESULT_S)(
                joblib.delayed(fail_on_three)(x) for x in range(10)
            )
        assert any("raised on the mesh" in note for note in caught.value.__notes__)
        # The backend is left ready for the next Parallel call.
        out = joblib.Parallel(n_jobs=-1, timeout=RESULT_S)(
            joblib.delayed(square)(x) for x in range(6)
        )
        assert out == [x * x for x in range(6)]


def test_the_joblib_module_says_how_to_install_joblib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "joblib", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "planetary_mesh.client.joblib")
    with pytest.raises(ImportError, match="pip install joblib"):
        importlib.import_module("planetary_mesh.client.joblib")


# -- the Dask-like client ------------------------------------------------------------------------


def test_submit_passes_arguments_and_keywords_and_per_call_options(dask: Client) -> None:
    assert dask.submit(square, 7).result(timeout=RESULT_S) == 49
    assert dask.submit(scaled, 1, 2, factor=10).result(timeout=RESULT_S) == 30
    urgent = dask.submit(scaled, 1, factor=3, priority=5, retries=1)
    assert urgent.result(timeout=RESULT_S) == 3
    assert len(dask.executor.job_ids()) == 2  # the call with its own options had its own job
    assert "jobs:" in repr(dask) and "open" in repr(dask)


def test_map_and_gather_keep_order_and_structure(dask: Client) -> None:
    futures = dask.map(scaled, range(20), range(100, 120), factor=2)
    assert len(futures) == 20 and all(isinstance(f, Future) for f in futures)
    done, _ = wait(futures, timeout=RESULT_S)
    assert len(done) == 20
    assert dask.gather(futures) == [(x + 100 + x) * 2 for x in range(20)]

    a, b, c = dask.map(square, [2, 3, 4], batch_size=2)
    Pair = namedtuple("Pair", "left right")
    structure = {"a": a, "nested": [b, {"c": c}, "plain"], "pair": Pair(a, b), "t": (c,)}
    assert dask.gather(structure) == {
        "a": 4,
        "nested": [9, {"c": 16}, "plain"],
        "pair": Pair(4, 9),
        "t": (16,),
    }
    assert dask.gather(a) == 4
    with pytest.raises(ValueError, match="'raise' or 'skip'"):
        dask.gather(futures, errors="ignore")  # type: ignore[arg-type]


def test_as_completed_yields_every_future_once(dask: Client) -> None:
    futures = dask.map(square, range(8))
    seen = list(as_completed(futures))
    assert sorted(seen, key=futures.index) == futures
    pairs = list(dask.as_completed(futures, with_results=True))
    assert sorted(result for _, result in pairs) == [x * x for x in range(8)]
    assert all(future.result() == result for future, result in pairs)


def test_failed_futures_raise_or_are_skipped(dask: Client) -> None:
    futures = dask.map(fail_on_three, range(6))
    wait(futures, timeout=RESULT_S)
    with pytest.raises(ValueError, match="no threes here"):
        dask.gather(futures)
    assert dask.gather(futures, errors="skip") == [0, 1, 2, 4, 5]
    assert dask.gather({"ok": futures[0], "bad": futures[3]}, errors="skip") == {"ok": 0}
    assert dask.gather(futures[3], errors="skip") is None
    with pytest.raises(ValueError, match="no threes here"):
        list(as_completed(futures, with_results=True))
    outcomes = dict(as_completed(futures, with_results=True, raise_errors=False))
    assert isinstance(outcomes[futures[3]], ValueError) and outcomes[futures[0]] == 0


def test_cancel_drops_queued_calls_and_kills_running_ones_only_when_forced(
    dask: Client,
) -> None:
    busy = dask.map(slow, [60.0, 60.0])  # both CPUs taken: what follows must wait
    wait_for(lambda: all(f.running() for f in busy), RESULT_S, "both calls to start")
    queued = dask.submit(square, 5)
    dask.cancel(queued)
    assert queued.cancelled()
    with pytest.raises(CancelledError):
        dask.gather([queued])
    assert dask.gather([queued], errors="skip") == []

    dask.cancel(busy)  # running: left alone unless forced
    assert all(f.running() and not f.done() for f in busy)
    dask.cancel({"both": busy}, force=True)
    for future in busy:
        with pytest.raises(CallCancelled, match="cancelled"):
            future.result(timeout=RESULT_S)
    assert dask.submit(square, 6).result(timeout=RESULT_S) == 36

    dask.close()
    assert "closed" in repr(dask)
    with pytest.raises(RuntimeError, match="after shutdown"):
        dask.submit(square, 1)
