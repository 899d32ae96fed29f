"""A converted copy of a GGUF's weights, so a restart skips dequantization.

The first load of a GGUF dequantizes every tensor (seconds for SmolLM2's Q4_1, minutes for
large models) and writes the result, already under our parameter names and in the target
dtype, as one safetensors file:

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

import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shared.engine import load_progress

FORMAT_VERSION = "1"
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
    """`load_or_convert` reads the cached copy, or converts and writes one. Counts both for tests."""

    def __init__(self, directory: Path | str | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.hits = 0  # loads served from the cache
        self.misses = 0  # loads that had to convert (absent, stale or corrupt copy)

    def path_for(self, key: CacheKey) -> Path:
        return self.directory / f"{key.digest}.safetensors"

    def load_or_convert(
        self,
        source: Path,
        dtype: torch.dtype,
        expected: dict[str, torch.Size],
        convert: Callable[[], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Weights named and shaped as `expected`, in `dtype`; `convert()` runs only on a miss."""
        key = CacheKey.of(source, dtype)
        path = self.path_for(key)
        cached = self._read(path, key, dtype, expected)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        weights = {name: tensor.to(dtype).contiguous() for name, tensor in convert().items()}
        load_progress.report("writing the converted weights to the cache")
        self._write(path, key, weights)
        return weights

    def _read(self, path: Path, key: CacheKey, dtype: torch.dtype, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
            weights = load_file(path)
            problem = _problem(weights, metadata, key, dtype, expected)
        except Exception as error:  # any unreadable file is just a miss
            problem = f"unreadable ({type(error).__name__}: {error})"
        if problem is None:
            return weights
        log.warning("weight_cache_invalid", path=str(path), problem=problem)
        path.unlink(missing_ok=True)
        return None

    def _write(self, path: Path, key: CacheKey, weights: dict[str, torch.Tensor]) -> None:
        tmp_name = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            metadata = {**key.metadata(), "crc32": str(_crc32(weights))}
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".tmp-", suffix=".safetensors", delete=False) as tmp:
                tmp_name = tmp.name
            save_file(weights, tmp_name, metadata=metadata)
            os.chmod(tmp_name, 0o644)  # like any cache file (mkstemp makes it 0600)
            with open(tmp_name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
            tmp_name = None
            log.info("weight_cache_written", path=str(path), source=key.source, dtype=key.dtype)
        except OSError as error:
            log.warning("weight_cache_not_written", path=str(path), error=str(error))
        finally:
            if tmp_name is not None:
                Path(tmp_name).unlink(missing_ok=True)


def _problem(
    weights: dict[str, torch.Tensor], metadata: dict[str, str], key: CacheKey, dtype: torch.dtype, expected: dict[str, torch.Size]
) -> str | None:
    if {k: metadata.get(k) for k in key.metadata()} != key.metadata():
        return "metadata does not match the source file"
    if weights.keys() != expected.keys():
        return "tensor names differ from the model's parameters"
    bad = [name for name, t in weights.items() if t.shape != expected[name] or t.dtype != dtype]
    if bad:
        return f"shape or dtype differs for {bad[:3]}"
    if metadata.get("crc32") != str(_crc32(weights)):
        return "checksum mismatch"
    return None


def _crc32(weights: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(weights):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(weights[name].contiguous().view(-1).view(torch.uint8).numpy(), crc)
    return crc
