"""Compiling a C source shipped with the package into a shared library, once per machine.

    $PDSERVE_KERNEL_CACHE_DIR/<stem>-<key>.so    (default $XDG_CACHE_HOME/pdserve/kernels,
                                                  next to the weight cache)

`key` hashes the source bytes, the compiler's path and version, and every flag, so an
edited source or another compiler never loads a stale library. The library is built
under a temporary name and renamed into place (atomic): workers starting together may
each compile, and each loads a complete file. A cache folder that cannot be written
falls back to a temporary folder for this process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from shared.engine.weight_cache import user_cache_root

_COMPILE_TIMEOUT_S = 120


class BuildError(RuntimeError):
    """No compiler, or the compiler failed (the message says which)."""


def kernel_cache_dir() -> Path:
    override = os.environ.get("PDSERVE_KERNEL_CACHE_DIR")
    if override:
        return Path(override)
    return user_cache_root() / "kernels"


def find_compiler() -> str | None:
    """$CC, else cc or gcc on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_library(source: Path, compile_flags: list[str], link_inputs: list[str]) -> Path:
    """The path of `source` compiled with `compile_flags` and linked with `link_inputs` (built on first use)."""
    compiler = find_compiler()
    if compiler is None:
        raise BuildError("no C compiler (set CC, or install gcc)")
    key = _key(source, compiler, compile_flags, link_inputs)
    name = f"{source.stem}-{key}.so"
    for directory in _candidate_dirs():
        target = directory / name
        if target.is_file():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            _compile(compiler, source, compile_flags, link_inputs, target)
            return target
        except OSError:
            continue  # unwritable cache folder: the temporary one
    raise BuildError(f"could not write {name} to {kernel_cache_dir()} nor to a temporary folder")


def _compile(compiler: str, source: Path, compile_flags: list[str], link_inputs: list[str], target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        obj, lib = Path(scratch) / "kernel.o", Path(scratch) / target.name
        # Compile and link as two steps: flags such as -fopenmp would otherwise add their own
        # runtime libraries to the link, and `link_inputs` chooses those.
        _run([compiler, *compile_flags, "-fPIC", "-c", str(source), "-o", str(obj)])
        _run([compiler, "-shared", str(obj), *link_inputs, "-o", str(lib)])
        os.replace(lib, target)


def _run(command: list[str]) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"{' '.join(command)}: {error}") from error
    if result.returncode != 0:
        raise BuildError(f"{' '.join(command)} failed:\n{result.stderr.strip()}")


def _key(source: Path, compiler: str, compile_flags: list[str], link_inputs: list[str]) -> str:
    digest = hashlib.sha256(source.read_bytes())
    for part in (compiler, _compiler_version(compiler), *compile_flags, "--link--", *link_inputs):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _candidate_dirs():
    yield kernel_cache_dir()
    yield _process_temp_dir()


@cache
def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


@cache
def _process_temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pdserve-kernels-"))
