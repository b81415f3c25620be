"""Fault injection around every file-system step of dorakit.atomic (issue 19).

Crashes are simulated faithfully: the write runs in a forked child that calls ``os._exit`` just before
its k-th step (a rename, fsync, unlink, mkdir, open, chmod), like a kill -9: no ``except``/``finally``
runs. For every k the survivor must find a complete copy, the newest one whose renaming had begun, and
recovery must leave no temporary copy. Errors (a full disk, a read-only file system) are injected the
same way in-process: the write raises ``OSError``, the previous content is whole and nothing is left over.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from dorakit import atomic

STEPS = ("replace", "rename", "fsync", "unlink", "rmdir", "mkdir", "open", "chmod")
CRASHED, COMPLETED = 77, 0


class Steps:
    """Counts the file-system steps of a call, and fails or dies at one of them."""

    def __init__(self, at: int | None = None, action=None) -> None:
        self.count, self.at, self.action = 0, at, action

    def install(self, setattr_) -> None:
        for name in STEPS:
            real = getattr(os, name)
            setattr_(os, name, self._wrap(real))

    def _wrap(self, real):
        def step(*args, **kwargs):
            self.count += 1
            if self.count - 1 == self.at:
                self.action()  # once: the clean-up that follows an error takes its steps normally
            return real(*args, **kwargs)
        return step


def count_steps(operation) -> int:
    """How many steps ``operation`` takes (run once, fully, in a child, which returns the count)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        steps = Steps()
        steps.install(setattr)
        operation()
        os.write(write, str(steps.count).encode())
        os._exit(COMPLETED)
    os.close(write)
    count = int(os.read(read, 64) or b"0")
    os.close(read)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == COMPLETED
    return count


def crash_at(step: int, operation) -> int:
    """Run ``operation`` in a forked child that dies just before its ``step``-th step; its exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            Steps(step, lambda: os._exit(CRASHED)).install(setattr)
            operation()
            os._exit(COMPLETED)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def write_version(directory, version: str) -> None:
    for name in ("weights.bin", "state.json"):
        (directory / name).write_text(f"{version} {name}")


def version_of(directory) -> str:
    """The one version every file of a directory holds (a mix or a missing file fails the test)."""
    found = {(directory / name).read_text().split()[0] for name in ("weights.bin", "state.json")}
    assert len(found) == 1, f"a mix of versions in {directory}: {found}"
    return found.pop()


def replace_with(target, version):
    def operation():
        with atomic.new_directory(target, overwrite=True, what="checkpoint") as tmp:
            write_version(tmp, version)
    return operation


def test_a_kill_at_any_step_of_a_directory_replacement_leaves_a_complete_copy_that_recovery_restores(tmp_path):
    target = tmp_path / "checkpoint"
    replace_with(target, "v1")()
    total = count_steps(replace_with(target, "v2"))
    recovered = []
    for step in range(total + 1):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        (tmp_path / "run").mkdir()
        case = tmp_path / "run" / "checkpoint"
        replace_with(case, "v1")()
        code = crash_at(step, replace_with(case, "v2"))
        assert code in (CRASHED, COMPLETED), step
        best = atomic.complete_copy(case)
        assert best is not None, f"no complete copy after a kill before step {step}"
        seen = version_of(best)
        assert atomic.recover_directory(case) == case
        assert version_of(case) == seen and atomic.leftovers(case) == []
        assert sorted(p.name for p in case.parent.iterdir()) == ["checkpoint"]
        recovered.append(seen)
    # Never back to v1 once v2 was complete (the newest complete copy wins), and v2 in the end.
    first_new = recovered.index("v2")
    assert set(recovered[first_new:]) == {"v2"} and recovered[-1] == "v2" and recovered[0] == "v1"


def test_a_kill_while_writing_one_file_leaves_the_old_or_the_new_content(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    operation = lambda: atomic.write_text(path, "new")  # noqa: E731
    total = count_steps(operation)
    path.write_text("old")
    for step in range(total + 1):
        crash_at(step, operation)
        assert path.read_text() in ("old", "new"), step
        atomic.discard_leftovers(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
        path.write_text("old")


def test_a_kill_while_writing_an_adapter_never_leaves_its_config_beside_other_weights(tmp_path):
    directory = tmp_path / "adapter"

    def writer(version):
        return lambda: atomic.write_files(directory, {
            "adapter_model.safetensors": lambda p: p.write_text(version),
            "adapter_config.json": lambda p: p.write_text(version),
        }, marker="adapter_config.json")

    writer("v1")()
    total = count_steps(writer("v2"))
    for step in range(total + 1):
        writer("v1")()
        crash_at(step, writer("v2"))
        config = directory / "adapter_config.json"
        if config.exists():  # readers trust the set only with its marker: then it is one version
            assert config.read_text() == (directory / "adapter_model.safetensors").read_text(), step


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EROFS, errno.EIO])
def test_an_error_at_any_step_raises_oserror_and_keeps_the_previous_copy(tmp_path, monkeypatch, number):
    target = tmp_path / "checkpoint"
    replace_with(target, "v1")()
    total = count_steps(replace_with(target, "v2"))
    replace_with(target, "v1")()

    def fail():
        raise OSError(number, os.strerror(number))

    for step in range(total):
        replace_with(target, "v1")()
        steps = Steps(step, fail)
        with monkeypatch.context() as patch:
            steps.install(patch.setattr)
            try:
                replace_with(target, "v2")()
                failed = False
            except OSError as err:
                failed = err.errno == number
        if not failed:
            continue  # the step swallows errors (an fsync of a directory, removing the replaced copy)
        assert version_of(target) == "v1", step  # an error after the last rename is swallowed, not raised
        assert atomic.leftovers(target) == [], (step, atomic.leftovers(target))


def test_new_directory_never_replaces_a_file_or_a_link_and_ours_guards_overwrite(tmp_path):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "data.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for name, kind in (("file", "a file"), ("link", "a symbolic link")):
        with pytest.raises(NotADirectoryError, match=f"is {kind}, not a merged checkpoint directory"):
            with atomic.new_directory(tmp_path / name, overwrite=True, what="merged checkpoint"):
                pass
    with pytest.raises(FileExistsError, match="is not a merged checkpoint .*overwrite only replaces"):
        with atomic.new_directory(tmp_path / "real", overwrite=True, what="merged checkpoint",
                                  ours=lambda d: (d / "dorakit_merge.safetensors").is_file()):
            pass
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "real" / "data.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "real"]


def test_a_failed_write_removes_the_directories_it_created(tmp_path):
    (tmp_path / "kept").mkdir()

    def fail(path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_files(tmp_path / "kept" / "new" / "adapter", {"a.bin": fail}, marker="a.bin")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]


def test_a_failed_write_keeps_a_directory_that_existed(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "notes.txt").write_text("mine")

    def fail(path):
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.write_files(tmp_path / "adapter", {"a.bin": fail}, marker="a.bin")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["notes.txt"]
