"""The one save path is atomic: written beside, verified, moved into place, the finish marker
last. A save killed at any point leaves the previous checkpoint verifying in place, and a first
save killed mid-write leaves nothing that is taken as finished."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import tiny_vit

from nmsparse_hf import NMSparsifier, NMSparsityConfig
from nmsparse_hf.cli import main as cli
from nmsparse_hf.export import (
    NMIncompleteCheckpointError,
    atomic,
    checkpoint_state,
    save_sparse_pretrained,
    verify_checkpoint,
)
from nmsparse_hf.export.metadata import MANIFEST

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _finalized(seed: int):
    model = tiny_vit(seed=seed)
    sparsifier = NMSparsifier(model, NMSparsityConfig(n_keep=1, m=4, locations="FF,QKV"), 4)
    sparsifier.finalize()
    return model, sparsifier


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


# ---------------------------------------------------------------------------------- states
def test_checkpoint_state_missing_finished_incomplete(tmp_path):
    final = tmp_path / "final"
    assert checkpoint_state(final) == "missing"
    final.mkdir()
    assert checkpoint_state(final) == "missing"  # an empty folder holds nothing to lose
    model, sparsifier = _finalized(0)
    save_sparse_pretrained(model, sparsifier, final)
    assert checkpoint_state(final) == "finished"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # nothing left beside it
    (final / MANIFEST).unlink()  # no finish marker: not taken as finished ...
    assert checkpoint_state(final) == "incomplete"
    assert verify_checkpoint(final).ok  # ... but a copy without a manifest still verifies
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("x")
    assert checkpoint_state(other) == "incomplete"


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import nmsparse_hf.export.checkpoint as checkpoint

    final = tmp_path / "final"
    save_sparse_pretrained(*_finalized(0), final)
    before = _digests(final)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "_check_written", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_sparse_pretrained(*_finalized(1), final)
    assert _digests(final) == before and verify_checkpoint(final).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # staging removed


def test_a_failed_move_in_a_folder_with_other_files_puts_everything_back(tmp_path, monkeypatch):
    final = tmp_path / "final"
    save_sparse_pretrained(*_finalized(0), final)
    (final / "notes.txt").write_text("mine")
    (final / "checkpoint-10").mkdir()
    before = _digests(final)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(Path(dst).name)
        if Path(src).parent.name.startswith(".final.nmsparse-tmp-") and len(calls) > 5:
            raise OSError("device went away")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="device went away"):
        save_sparse_pretrained(*_finalized(1), final, overwrite=True)
    assert _digests(final) == before and (final / "checkpoint-10").is_dir()
    assert checkpoint_state(final) == "finished" and verify_checkpoint(final).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    save_sparse_pretrained(*_finalized(1), final, overwrite=True)
    assert (final / "notes.txt").read_text() == "mine" and (final / "checkpoint-10").is_dir()
    assert _digests(final)["model.safetensors"] != before["model.safetensors"]
    assert checkpoint_state(final) == "finished" and verify_checkpoint(final).ok


def test_a_card_rewritten_later_stays_a_file_of_the_save(tmp_path):
    """The Trainer writes its card after the save: the manifest follows the card (and only the
    card), so the next save still replaces the folder without overwrite=True."""
    from nmsparse_hf.export.checkpoint import write_model_card
    from nmsparse_hf.export.metadata import load_sparse_metadata

    final = tmp_path / "final"
    save_sparse_pretrained(*_finalized(0), final)
    (final / "notes.txt").write_text("mine")
    write_model_card(final, load_sparse_metadata(final), model_name="renamed", tags=["x"])
    assert "renamed" in (final / "README.md").read_text()
    manifest = json.loads((final / MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["README.md", "config.json", "model.safetensors"]
    assert manifest["README.md"] == _digests(final)["README.md"]
    save_sparse_pretrained(*_finalized(1), final, overwrite=True)
    assert (final / "notes.txt").read_text() == "mine"
    (final / "notes.txt").unlink()
    save_sparse_pretrained(*_finalized(2), final)  # only our files: no overwrite needed
    assert checkpoint_state(final) == "finished"


# ---------------------------------------------------------------------------------- killed saves
# One child imports the stack once and forks a saver per round; each saver is SIGKILLed.
SERVER = """
import os, sys, time
sys.path.insert(0, {tests!r})
import transformers.modeling_utils as mu
from conftest import tiny_vit
from nmsparse_hf import NMSparsifier, NMSparsityConfig
from nmsparse_hf.export import save_sparse_pretrained

real = mu.safe_save_file
print("ready", flush=True)
for command in sys.stdin:
    final, pause = command.split()
    pid = os.fork()
    if pid == 0:
        def save_then_wait(*args, **kwargs):  # a weight file is on disk, the save goes on
            real(*args, **kwargs)
            if pause == "1":
                print("written", flush=True)
                time.sleep(600)

        mu.safe_save_file = save_then_wait
        for seed in range(1, 1000):
            model = tiny_vit(seed=seed)
            config = NMSparsityConfig(n_keep=1, m=4, locations="FF,QKV")
            sparsifier = NMSparsifier(model, config, 4)
            sparsifier.finalize()
            save_sparse_pretrained(model, sparsifier, final)
            print("saved", flush=True)
        os._exit(0)
    print("pid", pid, flush=True)
    os.waitpid(pid, 0)
    print("done", flush=True)
"""


@pytest.fixture(scope="module")
def kill_save():
    """``kill_save(final, pause, delay)``: start a save into ``final`` in a fresh process and
    SIGKILL it, either once its first weight file is written (``pause``) or ``delay`` seconds
    after its first finished save (it keeps re-saving in a loop)."""
    code = textwrap.dedent(SERVER.format(tests=str(TESTS)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert server.stdout.readline().strip() == "ready"

    def run(final: Path, pause: bool, delay: float = 0.0) -> None:
        server.stdin.write(f"{final} {int(pause)}\n")
        server.stdin.flush()
        pid, trigger = None, "written" if pause else "saved"
        fired = False
        while pid is None or not fired:
            line = server.stdout.readline()
            assert line, "the save server died"
            if line.startswith("pid "):
                pid = int(line.split()[1])
            fired = fired or line.strip() == trigger
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        while server.stdout.readline().strip() != "done":
            pass

    yield run
    server.stdin.close()
    server.wait(timeout=60)


def test_a_first_save_killed_mid_write_is_incomplete(tmp_path, capsys, kill_save):
    final = tmp_path / "final"
    kill_save(final, pause=True)
    assert checkpoint_state(final) == "incomplete"
    with pytest.raises(NMIncompleteCheckpointError, match="incomplete"):
        verify_checkpoint(final)
    assert cli(["verify", str(final)]) == 2
    err = capsys.readouterr().err
    assert "incomplete" in err and len(err.strip().splitlines()) == 1
    # the next save clears the killed save's staging directory and finishes
    save_sparse_pretrained(*_finalized(0), final)
    assert checkpoint_state(final) == "finished" and verify_checkpoint(final).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_resave_killed_mid_write_keeps_the_previous_checkpoint(tmp_path, kill_save):
    final = tmp_path / "final"
    save_sparse_pretrained(*_finalized(0), final)
    before = _digests(final)
    kill_save(final, pause=True)
    assert atomic.leftovers(final)  # the killed save's staging directory
    assert _digests(final) == before
    assert checkpoint_state(final) == "finished" and verify_checkpoint(final).ok


def test_saves_killed_at_random_points_leave_a_finished_checkpoint(tmp_path, kill_save):
    """Re-saving into final/ in a loop, killed at random times: final/ is always a finished
    checkpoint that verifies (the previous one or the new one, never a mix)."""
    final = tmp_path / "final"
    save_sparse_pretrained(*_finalized(0), final)
    rng = random.Random(0)
    for _ in range(4):
        kill_save(final, pause=False, delay=rng.uniform(0.0, 1.0))
        assert checkpoint_state(final) == "finished"
        report = verify_checkpoint(final)
        assert report.ok, str(report)
        manifest = json.loads((final / MANIFEST).read_text())["files"]
        assert manifest == {n: d for n, d in _digests(final).items() if n != MANIFEST}


# ---------------------------------------------------------------------------------- module graph
def test_no_import_cycle_in_the_export_package():
    """card renders, checkpoint saves: no module of export/ imports, directly or through
    others, the module that imports it (imports inside functions count too)."""
    import ast

    package = ROOT / "nmsparse_hf" / "export"
    modules = {p.stem: p for p in package.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                edges.update(t.split(".")[0] for t in targets)
        graph[name] = {e for e in edges if e in modules}
    assert "checkpoint" in graph["hub"] and "card" in graph["checkpoint"]  # the graph is real

    def cycle_from(start, node, seen):
        for nxt in graph[node]:
            if nxt == start:
                return [*seen, nxt]
            if nxt not in seen:
                found = cycle_from(start, nxt, [*seen, nxt])
                if found:
                    return found
        return None

    cycles = {m: cycle_from(m, m, [m]) for m in graph}
    assert not any(cycles.values()), cycles
