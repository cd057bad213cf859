"""scripts/slurm_local.sh never trusts a state folder it did not make (issue 16, item 7): a planted
/tmp/ipt-slurm-like folder with a munge.key / mysql.pass is refused before any package or daemon is touched."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_local.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="slurm_local.sh up needs root")


def _up(state: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "up", str(state)], capture_output=True, text=True, timeout=60)


def _planted(state: Path) -> None:
    (state / "munge").mkdir(parents=True)
    (state / "munge" / "munge.key").write_bytes(b"k" * 1024)
    (state / "mysql.pass").write_text("known\n")


@pytest.mark.parametrize("how, message", [("other_owner", "owned by uid 65534, not by this user"),
                                          ("world_writable", "writable by others"),
                                          ("link", "is not a folder (a link or a file)"),
                                          ("linked_pass", "mysql.pass: a link")])
def test_a_state_folder_it_did_not_make_is_refused_before_anything_runs(tmp_path, how, message):
    state = tmp_path / "ipt-slurm"
    if how == "link":
        (tmp_path / "elsewhere").mkdir()
        _planted(tmp_path / "elsewhere")
        state.symlink_to(tmp_path / "elsewhere")
    else:
        _planted(state)
        if how == "other_owner":
            os.chown(state, 65534, 65534)
        elif how == "world_writable":
            state.chmod(0o777)
        else:
            (state / "mysql.pass").unlink()
            (state / "mysql.pass").symlink_to(tmp_path / "attacker.pass")
    r = _up(state)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert "refusing" in r.stderr or "remove it" in r.stderr
    assert not (state / "etc").exists()  # nothing was written or started
