"""``harness cache list|prune`` on a real cache: a converted checkpoint (sound), a copy of it
damaged on disk, a leftover build and a build in progress."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from harness.cli import main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache root holding: a sound converted tiny checkpoint, a copy with its weights truncated,
    a .tmp build two hours old (left by a killed run) and a .tmp build from just now."""
    from backends.models import checkpoint_dir, resolve_model

    built = checkpoint_dir(resolve_model("tiny-llama"))  # converted (or found) in the user's cache
    monkeypatch.setenv("QUANTARENA_CACHE", str(tmp_path / "cache"))
    sound = tmp_path / "cache" / "checkpoints" / built.name  # the same entry, alone in a fresh cache
    shutil.copytree(built, sound)
    damaged = sound.with_name(sound.name + "-copy")
    shutil.copytree(sound, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    leftover = sound.with_name(sound.name + ".tmp123")
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"x" * 100)
    old = time.time() - 7200
    os.utime(leftover / "model.safetensors", (old, old))
    running = sound.with_name(sound.name + ".tmp456")
    running.mkdir()
    (running / "config.json").write_text("{}")
    return {"sound": sound, "damaged": damaged, "leftover": leftover, "running": running}


def test_list_shows_each_entry_with_its_size_and_state(cache, capsys):
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert cache["sound"].name in out and "ok" in out
    assert "size differs" in out or "model.safetensors" in out  # the damaged copy's reason
    assert "leftover build" in out and "build in progress" in out


def test_prune_removes_damaged_entries_and_leftovers_and_keeps_sound_ones_and_running_builds(cache, capsys):
    assert main(["cache", "prune", "--dry-run"]) == 0
    assert "would remove 2 entries" in capsys.readouterr().out
    assert all(path.exists() for path in cache.values())  # a dry run removes nothing
    assert main(["cache", "prune"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert not cache["damaged"].exists() and not cache["leftover"].exists()
    assert cache["sound"].exists() and cache["running"].exists()


def test_prune_older_than_removes_entries_not_used_for_that_long(cache, capsys):
    week_ago = time.time() - 7 * 86400
    for file in cache["sound"].rglob("*"):
        os.utime(file, (week_ago, week_ago))
    assert main(["cache", "prune", "--older-than", "30"]) == 0
    assert cache["sound"].exists()  # used within 30 days
    assert main(["cache", "prune", "--older-than", "3"]) == 0
    assert not cache["sound"].exists() and cache["running"].exists()


def test_prune_all_keeps_only_builds_in_progress_and_bad_flags_are_exit_2(cache, capsys):
    assert main(["cache", "list", "--all"]) == 2
    assert "are for cache prune" in capsys.readouterr().err
    assert main(["cache", "prune", "--older-than", "-1"]) == 2
    assert main(["cache", "prune", "--all"]) == 0
    remaining = [p.name for p in Path(cache["sound"].parent).iterdir()]
    assert remaining == [cache["running"].name]
