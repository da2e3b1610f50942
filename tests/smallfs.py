"""Small or read-only filesystems for the failed-write tests.

``small_tmpfs(path, size)`` mounts a tmpfs of `size` bytes at `path` (root in a container may;
the test skips with the reason otherwise) and unmounts it afterwards; ``remount_readonly(path)``
makes it read-only (root ignores file permissions, a read-only mount it cannot ignore).
``LIMITED`` runs ``parml`` under a file-size limit: writes past it fail with EFBIG (Python ignores
SIGXFSZ), the same path a full disk takes.
"""
from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

LIMITED = ("import resource, runpy, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
           "sys.argv = ['parml'] + sys.argv[2:]; runpy.run_module('parml', run_name='__main__', alter_sys=True)")


def _mount(*args: str) -> str | None:
    try:
        r = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exit code {r.returncode}")


@contextlib.contextmanager
def small_tmpfs(path, size: int):
    path = str(path)
    os.makedirs(path, exist_ok=True)
    problem = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    if problem:
        pytest.skip(f"cannot mount a {size}-byte tmpfs here ({problem}); the file-size-limit tests cover "
                    f"the same path")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)


def remount_readonly(path) -> None:
    problem = _mount("-o", "remount,ro", str(path))
    if problem:
        pytest.skip(f"cannot remount {path} read-only ({problem})")


def temporaries(root) -> list[str]:
    """Every temporary file (``*.tmp-<pid>``) under `root`."""
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if ".tmp-" in f]
