"""The CLI refuses bad options before it does anything, and says what would be right."""

from __future__ import annotations

from pathlib import Path

import pytest

from planetary_mesh.cli import main as cli


def test_agent_refuses_an_unknown_warm_sandbox_mode(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    argv = ["mesh", "agent", "--data-dir", str(tmp_path), "--warm-sandboxes", "sometimes"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "bad --warm-sandboxes 'sometimes': use auto, always or off" in err
    assert not any(tmp_path.iterdir())  # it stopped before it did anything
