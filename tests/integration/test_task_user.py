"""The task account is made on first use, even when several agents start at once."""

from __future__ import annotations

import subprocess
import sys
import uuid

from planetary_mesh.sandbox.user import task_user


def test_agents_starting_together_all_get_the_one_new_task_account() -> None:
    name = f"mesh-t-{uuid.uuid4().hex[:8]}"
    code = f"from planetary_mesh.sandbox.user import task_user; print(task_user({name!r}).uid)"
    try:
        racers = [
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        uids = {racer.communicate(timeout=60)[0].strip() for racer in racers}
        assert all(racer.returncode == 0 for racer in racers)
        (uid,) = uids
        made = task_user(name)
        assert made is not None and str(made.uid) == uid and made.uid != 0
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)
