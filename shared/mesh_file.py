"""Where the running mesh is: the small file `baton up` writes in its state folder.

`baton up` records its addresses (NATS, gateway, collector) and its pid in
`<state_dir>/mesh.json`; clients that are not told NATS_URL read it, so a second
terminal finds the mesh without copying a port. A file left by a mesh that died
without cleaning up (its pid is gone) is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILE_NAME = "mesh.json"


def mesh_file(state_dir: Path) -> Path:
    return Path(state_dir) / FILE_NAME


def write_mesh_file(state_dir: Path, addresses: dict[str, Any]) -> Path:
    path = mesh_file(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**addresses, "pid": os.getpid()}))
    return path


def read_mesh_file(state_dir: Path) -> dict[str, Any]:
    """The running mesh's addresses, or {} when no live `baton up` wrote them."""
    try:
        state = json.loads(mesh_file(state_dir).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict) or not _alive(state.get("pid")):
        return {}
    return state


def remove_mesh_file(state_dir: Path) -> None:
    mesh_file(state_dir).unlink(missing_ok=True)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
