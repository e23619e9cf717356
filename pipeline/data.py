"""Data spec -> lazily sliced inputs: ``source.read(i0, i1)`` reads only rows i0..i1.

    x1 = open_source(spec.data.x1, "data.x1")
    x1.n, x1.sample_shape      # 500, (3, 32, 32)
    x1.read(0, 64)             # torch.Tensor (64, 3, 32, 32)

Sources are picklable (they hold paths, not arrays), so each Ray worker opens its own view.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from pipeline.config import InputSpec, Synthetic, is_url, url_options
from pipeline.errors import DataError, brief
from pipeline.models import load_tensors

# Synthetic rows are drawn in fixed groups, each from its own seeded generator, so that any
# slice is reproducible without drawing the rows before it.
SYNTHETIC_GROUP = 1024
# Inputs up to this size are hashed whole; larger ones by shape plus an even sample of rows.
FULL_HASH_BYTES = 1 << 30


def as_tensor(rows: np.ndarray) -> torch.Tensor:
    """Rows read from an input as a tensor that owns writable memory (a memory-mapped or read-only view
    is copied)."""
    return torch.from_numpy(np.array(rows, copy=not (rows.flags.writeable and rows.flags.c_contiguous)))


class Source:
    """Rows of one input. Subclasses set ``n``, ``sample_shape``, ``dtype`` and implement ``_rows``."""

    key: str
    n: int
    sample_shape: tuple[int, ...]
    dtype: np.dtype[Any]

    def read(self, i0: int, i1: int) -> torch.Tensor:
        """Rows ``i0:i1`` as a tensor of shape (i1 - i0, *sample_shape)."""
        return as_tensor(self._rows(i0, i1))

    def _rows(self, i0: int, i1: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.sample_shape)) * self.dtype.itemsize

    @property
    def step(self) -> int:
        """Rows per piece of a pass over every row: about 4 MiB."""
        return max(1, (1 << 22) // max(self.row_bytes, 1))

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Every row once, in order: ``(i0, rows)`` pieces of ``step`` rows, C-contiguous."""
        step = self.step
        for i0 in range(0, self.n, step):
            yield i0, np.ascontiguousarray(self._rows(i0, min(i0 + step, self.n)))

    def fingerprint(self, each: Callable[[int, np.ndarray], None] | None = None) -> str:
        """One pass over every row: refuse NaN or Inf (naming the first bad rows), and a sha256 of
        shape, dtype and values (of an even sample of rows for inputs over 1 GiB).

        Args:
          each: called with ``(i0, rows)`` for every piece the pass reads (rows i0:i0 + len(rows)), so
            that the pass's one read of the data serves another check too (``prepare`` runs the model
            on every row); not called once a row with NaN or Inf is found.
        """
        h = hashlib.sha256(f"{self.n}|{self.sample_shape}|{self.dtype}|".encode())
        whole = self.n * self.row_bytes <= FULL_HASH_BYTES
        every = max(1, self.n // (1024 * self.step))  # hash every piece, or about 1024 of them
        bad: list[int] = []
        for k, (i0, rows) in enumerate(self.chunks()):
            if np.issubdtype(rows.dtype, np.floating) and len(bad) < 5:
                finite = np.isfinite(rows.reshape(rows.shape[0], -1)).all(axis=1)
                bad += [i0 + int(i) for i in np.flatnonzero(~finite)[: 5 - len(bad)]]
            if whole or k % every == 0:
                h.update(rows.tobytes())
            if each is not None and not bad:
                each(i0, rows)
        if bad:
            raise DataError(self.key, f"non-finite values (NaN or Inf) in rows {', '.join(map(str, bad))}"
                            + (" and maybe more" if len(bad) == 5 else ""))
        return f"{'sha256' if whole else 'sha256-sampled'}:{h.hexdigest()}"

    def describe(self) -> dict[str, Any]:
        return {"n": self.n, "sample_shape": list(self.sample_shape), "dtype": str(self.dtype)}


def _check_array(key: str, shape: tuple[int, ...], dtype: Any, where: str) -> None:
    if len(shape) < 1 or shape[0] == 0:
        raise DataError(key, f"{where} has shape {shape}; expected (n, ...) with n > 0 samples")
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise DataError(key, f"{where} has dtype {dtype}; expected a numeric array")


class NpySource(Source):
    """A .npy file, memory-mapped: a block reads only its own rows. At a URL, a block reads the
    byte range of its rows (fsspec)."""

    def __init__(self, key: str, path: str, options: dict[str, Any] | None = None) -> None:
        self.key, self.path, self.options = key, path, options or {}
        if is_url(path):
            shape, dtype, self._offset = self._header()
        else:
            arr = self._array()
            shape, dtype = arr.shape, arr.dtype
        _check_array(key, shape, dtype, path)
        self.n, self.sample_shape, self.dtype = shape[0], tuple(shape[1:]), np.dtype(dtype)

    def _array(self) -> np.ndarray:
        try:
            array: np.ndarray = np.load(self.path, mmap_mode="r", allow_pickle=False)
            return array
        except Exception as err:
            raise DataError(f"{self.key}.path", f"cannot read {self.path} as .npy: {brief(err)}") from None

    def _header(self) -> tuple[tuple[int, ...], np.dtype[Any], int]:
        import fsspec

        try:
            with fsspec.open(self.path, "rb", **self.options) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                offset = f.tell()
        except Exception as err:
            raise DataError(f"{self.key}.path", f"cannot read {self.path} as .npy: {brief(err)}") from None
        if fortran and len(shape) > 1:
            raise DataError(f"{self.key}.path", f"{self.path} is stored in Fortran order; save it C-contiguous")
        if dtype.hasobject:
            raise DataError(f"{self.key}.path", f"{self.path} holds Python objects; expected a numeric array")
        return tuple(shape), dtype, offset

    def _rows(self, i0: int, i1: int) -> np.ndarray:
        if not is_url(self.path):
            return self._array()[i0:i1]
        import fsspec

        row = int(np.prod(self.sample_shape)) * self.dtype.itemsize
        with fsspec.open(self.path, "rb", **self.options) as f:
            f.seek(self._offset + i0 * row)
            data = f.read((i1 - i0) * row)
        return np.frombuffer(data, dtype=self.dtype).reshape(i1 - i0, *self.sample_shape)


@lru_cache(maxsize=4)
def _load_pt(path: str, options: str = "{}") -> torch.Tensor:
    loaded: torch.Tensor  # checked by the caller: torch.load gives whatever the file holds
    if not is_url(path):
        loaded = load_tensors(path)
        return loaded
    import fsspec

    with fsspec.open(path, "rb", **json.loads(options)) as f:
        loaded = load_tensors(io.BytesIO(f.read()))
    return loaded


class PtSource(Source):
    """A tensor saved with torch.save; loaded whole (once per process), then sliced."""

    def __init__(self, key: str, path: str, options: dict[str, Any] | None = None) -> None:
        self.key, self.path, self._options = key, path, json.dumps(options or {}, sort_keys=True)
        try:
            t = _load_pt(path, self._options)
        except Exception as err:
            raise DataError(f"{key}.path", f"cannot read {path} as a torch tensor: {brief(err)}") from None
        if not isinstance(t, torch.Tensor):
            raise DataError(f"{key}.path", f"{path} holds a {type(t).__name__}, expected a tensor")
        npdtype = t.numpy().dtype if t.dtype != torch.bfloat16 else np.dtype("float32")
        _check_array(key, tuple(t.shape), npdtype, path)
        self.n, self.sample_shape, self.dtype = t.shape[0], tuple(t.shape[1:]), npdtype

    def _rows(self, i0: int, i1: int) -> np.ndarray:
        rows = _load_pt(self.path, self._options)[i0:i1]
        return (rows.float() if rows.dtype == torch.bfloat16 else rows).numpy()


class ZarrSource(Source):
    """An array in a Zarr store (``{path, array}``); reads only the chunks a block needs."""

    def __init__(self, key: str, path: str, array: str | None, options: dict[str, Any] | None = None) -> None:
        self.key, self.path, self.array, self.options = key, path, array, options
        arr = self._open()
        _check_array(key, arr.shape, arr.dtype, f"{path}" + (f"/{array}" if array else ""))
        self.n, self.sample_shape, self.dtype = arr.shape[0], tuple(arr.shape[1:]), np.dtype(arr.dtype)

    def _open(self) -> Any:
        import zarr

        try:
            node = zarr.open(self.path, mode="r", path=self.array or "",
                             storage_options=url_options(self.path, self.options))
        except Exception as err:
            what = f"no array {self.array!r} in {self.path}" if self.array else f"cannot open {self.path} as Zarr"
            key = f"{self.key}.array" if self.array else f"{self.key}.path"
            raise DataError(key, f"{what}: {brief(err)}") from None
        if not isinstance(node, zarr.Array):
            raise DataError(f"{self.key}.array", f"{self.path} is a Zarr group; name the array with 'array'")
        return node

    def _rows(self, i0: int, i1: int) -> np.ndarray:
        return np.asarray(self._open()[i0:i1])


class SyntheticSource(Source):
    """Seeded standard-normal samples, as in the tutorial's ``torch.randn(n, 3, 32, 32)``."""

    def __init__(self, key: str, spec: Synthetic) -> None:
        self.key, self.seed = key, spec.seed
        self.n, self.sample_shape, self.dtype = spec.n, tuple(spec.shape), np.dtype("float32")

    def _group(self, g: int) -> torch.Tensor:
        rows = min(SYNTHETIC_GROUP, self.n - g * SYNTHETIC_GROUP)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + g)
        return torch.randn(rows, *self.sample_shape, generator=gen)

    def _rows(self, i0: int, i1: int) -> np.ndarray:
        g0, g1 = i0 // SYNTHETIC_GROUP, (max(i1, i0 + 1) - 1) // SYNTHETIC_GROUP
        rows = torch.cat([self._group(g) for g in range(g0, g1 + 1)])
        off = g0 * SYNTHETIC_GROUP
        return rows[i0 - off : i1 - off].numpy()

    def fingerprint(self, each: Callable[[int, np.ndarray], None] | None = None) -> str:
        """A hash of the spec (the rows follow from it); ``each`` still sees every row, drawn once."""
        if each is not None:
            for i0, rows in self.chunks():
                each(i0, rows)
        h = hashlib.sha256(f"synthetic-v1|{self.n}|{self.sample_shape}|{self.seed}".encode())
        return f"spec:{h.hexdigest()}"


def open_source(spec: InputSpec, key: str) -> Source:
    """Open the input a spec names. ``key`` ("data.x1") goes into error messages."""
    if spec.synthetic is not None:
        return SyntheticSource(key, spec.synthetic)
    assert spec.path is not None  # guaranteed by InputSpec's validator
    path = spec.path
    if spec.array is not None or path.rstrip("/").endswith(".zarr"):
        return ZarrSource(key, path, spec.array, spec.storage_options)
    if path.endswith(".npy"):
        return NpySource(key, path, spec.storage_options)
    if path.endswith((".pt", ".pth")):
        return PtSource(key, path, spec.storage_options)
    raise DataError(f"{key}.path", f"expected a .npy, .pt or .zarr path, got {path!r}")


def load_real_array(value: np.ndarray | str, key: str) -> np.ndarray:
    """An array of real numbers (targets for ``predict`` and ``analyze``): a .npy file's (never
    unpickled) or the given one.

    Raises:
      DataError: named ``key``: no such file, not a .npy array, or not real numbers.
    """
    if isinstance(value, str):
        try:
            y: np.ndarray = np.load(value, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(key, "no such file") from None
        except (OSError, ValueError, EOFError) as err:
            raise DataError(key, f"cannot read it as a .npy array: {brief(err)}") from None
    else:
        y = np.asarray(value)
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool) or np.iscomplexobj(y):
        raise DataError(key, f"expected real numbers, got dtype {y.dtype}")
    return y
