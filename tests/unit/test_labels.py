"""Node labels: what `mesh agent --label` accepts, and what the coordinator accepts in a hello."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from planetary_mesh.cli.main import _parse_labels
from planetary_mesh.errors import ConfigError
from planetary_mesh.protocol import Hello


def hello(**fields: object) -> Hello:
    base: dict[str, object] = {
        "type": "hello", "name": "n", "cpus": 1.0, "memory": 1, "sandbox": "", "version": "0",
        "held": [],
    }  # fmt: skip
    return Hello.model_validate({**base, **fields})


def test_labels_are_key_value_pairs() -> None:
    assert _parse_labels(["room=lab", "gpu.model=a100", "empty=", "x=a=b"]) == {
        "room": "lab",
        "gpu.model": "a100",
        "empty": "",
        "x": "a=b",
    }
    assert hello(labels={"room": "lab"}).labels == {"room": "lab"}
    assert hello().labels == {} and hello().gpus == 0 and hello().usage is None


@pytest.mark.parametrize("bad", ["room", "=lab", "-x=1", "a b=1", "k=" + "v" * 129, "é=1"])
def test_a_bad_label_is_refused_with_the_rule(bad: str) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        _parse_labels([bad])


def test_too_many_labels_are_refused() -> None:
    with pytest.raises(ConfigError, match="at most 32"):
        _parse_labels([f"k{i}=v" for i in range(33)])
    with pytest.raises(ValidationError, match="at most 32"):
        hello(labels={f"k{i}": "v" for i in range(33)})


def test_the_coordinator_refuses_bad_labels_and_usage_in_a_hello() -> None:
    with pytest.raises(ValidationError, match="label name"):
        hello(labels={"no spaces": "x"})
    with pytest.raises(ValidationError, match="128"):
        hello(labels={"k": "v" * 129})
    with pytest.raises(ValidationError):
        hello(usage={"cpu_percent": 101.0, "memory_in_use": 0})
    with pytest.raises(ValidationError):
        hello(gpus=-1)
