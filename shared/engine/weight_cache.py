"""A converted copy of a GGUF's weights, so a restart skips dequantization.

The first load of a GGUF dequantizes every tensor (seconds for SmolLM2's Q4_1, minutes for
large models) and writes the result, already under our parameter names and in the target
dtype, as one safetensors file, written one tensor at a time (no process holds the whole
model; each rank of a group then reads only its own slices, memory-mapped):

    $PDSERVE_CACHE_DIR/<key>.safetensors      (default $XDG_CACHE_HOME/pdserve/weights,
                                               i.e. ~/.cache/pdserve/weights)

`key` hashes the source's resolved path, size, mtime and the sha256 of its first MiB (the
GGUF header and metadata), the target dtype and this module's format version; so an edited
or replaced GGUF, or another dtype, never reads a stale copy. The file is written to a
temporary name and renamed into place (atomic: readers see no half-written file). On read
the metadata, the tensor names/shapes/dtypes and a CRC32 of all tensor bytes are checked;
a file that fails any check is ignored, removed and rewritten. A cache that cannot be
written (read-only disk) only costs the speed-up.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch
from safetensors import safe_open

from shared.engine.safetensors_stream import write_streaming

FORMAT_VERSION = "2"  # 2: the CRC as ten digits, written last
_HEADER_BYTES = 1 << 20

log = structlog.get_logger()


def user_cache_root() -> Path:
    """pdserve's folder under the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pdserve"


def default_cache_dir() -> Path:
    override = os.environ.get("PDSERVE_CACHE_DIR")
    if override:
        return Path(override)
    return user_cache_root() / "weights"


@dataclass(frozen=True)
class CacheKey:
    """What the converted weights depend on."""

    source: str  # resolved path
    size: int
    mtime_ns: int
    header_sha256: str  # of the first MiB
    dtype: str
    format: str = FORMAT_VERSION

    @classmethod
    def of(cls, source: Path, dtype: torch.dtype) -> CacheKey:
        path = Path(source).resolve()
        stat = path.stat()
        with open(path, "rb") as f:
            header = hashlib.sha256(f.read(_HEADER_BYTES)).hexdigest()
        return cls(str(path), stat.st_size, stat.st_mtime_ns, header, str(dtype).removeprefix("torch."))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]

    def metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


class WeightCache:
    """`ensure` finds a valid converted copy or writes one (tensor by tensor); ranks read their slices from it.

    Counts hits and misses for tests. Concurrent converters (the ranks of a group starting
    together) take a file lock, so one converts and the others then read its file.
    """

    def __init__(self, directory: Path | str | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.hits = 0  # loads served from the cache
        self.misses = 0  # loads that had to convert (absent, stale or corrupt copy)

    def path_for(self, key: CacheKey) -> Path:
        return self.directory / f"{key.digest}.safetensors"

    def ensure(
        self,
        source: Path,
        dtype: torch.dtype,
        expected: dict[str, torch.Size],
        convert: Callable[[], Iterable[tuple[str, torch.Tensor]]],
    ) -> Path | None:
        """The path of a valid converted copy of `source` (names and shapes `expected`, in `dtype`),
        converting it first if needed (`convert()` yields tensors in sorted-name order). None
        when the cache cannot be written: the caller then reads from the source itself."""
        key = CacheKey.of(source, dtype)
        path = self.path_for(key)
        if self._valid(path, key, dtype, expected):
            self.hits += 1
            return path
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = open(self.directory / f".{key.digest}.lock", "w")
        except OSError as error:
            log.warning("weight_cache_not_written", path=str(path), error=str(error))
            self.misses += 1
            return None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be converting the same file
            try:
                if path.is_file() and self._valid(path, key, dtype, expected, quiet=True):
                    self.hits += 1
                    return path
                self.misses += 1
                return path if self._write(path, key, dtype, expected, convert) else None
            finally:
                # Whoever waits on this lock re-checks the file; later loaders find it valid without the lock.
                Path(lock.name).unlink(missing_ok=True)

    def _valid(self, path: Path, key: CacheKey, dtype: torch.dtype, expected: dict[str, torch.Size], quiet: bool = False) -> bool:
        if not path.is_file():
            return False
        try:
            problem = _problem(path, key, dtype, expected)
        except Exception as error:  # any unreadable file is just a miss
            problem = f"unreadable ({type(error).__name__}: {error})"
        if problem is None:
            return True
        if not quiet:
            log.warning("weight_cache_invalid", path=str(path), problem=problem)
        path.unlink(missing_ok=True)
        return False

    def _write(
        self, path: Path, key: CacheKey, dtype: torch.dtype, expected: dict[str, torch.Size],
        convert: Callable[[], Iterable[tuple[str, torch.Tensor]]],
    ) -> bool:
        tmp_name = None
        crc = _Crc()
        try:
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".tmp-", suffix=".safetensors", delete=False) as tmp:
                tmp_name = tmp.name
                tensors = (crc.add(name, tensor.to(dtype).contiguous()) for name, tensor in convert())
                write_streaming(tmp, expected, dtype, tensors, {**key.metadata(), "crc32": _CRC_PENDING})
                tmp.flush()
                _patch_crc(tmp, crc.value)
                os.fsync(tmp.fileno())
            os.chmod(tmp_name, 0o644)  # like any cache file (mkstemp makes it 0600)
            os.replace(tmp_name, path)
            tmp_name = None
            log.info("weight_cache_written", path=str(path), source=key.source, dtype=key.dtype)
            return True
        except OSError as error:
            log.warning("weight_cache_not_written", path=str(path), error=str(error))
            return False
        finally:
            if tmp_name is not None:
                Path(tmp_name).unlink(missing_ok=True)


# The CRC is known only once every tensor was written: the header reserves its ten digits.
_CRC_PENDING = "0" * 10


class _Crc:
    """CRC32 over names and bytes in sorted-name order (the order tensors are written in)."""

    def __init__(self) -> None:
        self.value = 0

    def add(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        self.value = zlib.crc32(name.encode(), self.value)
        self.value = zlib.crc32(tensor.view(-1).view(torch.uint8).numpy(), self.value)
        return name, tensor


def _patch_crc(file, crc: int) -> None:
    file.seek(0)
    length = int.from_bytes(file.read(8), "little")
    header = file.read(length)
    at = header.index(f'"crc32":"{_CRC_PENDING}"'.encode()) + len('"crc32":"')
    file.seek(8 + at)
    file.write(f"{crc:010d}".encode())
    file.seek(0, os.SEEK_END)


def _problem(path: Path, key: CacheKey, dtype: torch.dtype, expected: dict[str, torch.Size]) -> str | None:
    """Why the file at `path` is not a good copy (metadata, names, shapes, dtypes, checksum), or None.

    Reads one tensor at a time (memory-mapped), so checking never holds the whole model.
    """
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if {k: metadata.get(k) for k in key.metadata()} != key.metadata():
            return "metadata does not match the source file"
        names = set(f.keys())
        if names != expected.keys():
            return "tensor names differ from the model's parameters"
        crc = _Crc()
        for name in sorted(names):
            tensor = f.get_tensor(name)
            if tensor.shape != expected[name] or tensor.dtype != dtype:
                return f"shape or dtype differs for {name}"
            crc.add(name, tensor)
    if metadata.get("crc32") != f"{crc.value:010d}":
        return "checksum mismatch"
    return None
