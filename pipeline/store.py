"""The Zarr v3 output: layout, provenance attributes, block writes and completion markers.

    <output.path>/            a Zarr v3 group; its attributes hold the provenance and run status
      kernel                  (n1, n2[, o[, o]]) chunks = one block, NaN where not yet computed
      done                    (grid rows, grid cols) uint8, one chunk per block: 1 once its data is written

Read it without this package: ``zarr.open_group(path)["kernel"]``. The only module that imports zarr
for writing.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.config import is_url
from pipeline.errors import StoreError
from pipeline.plan import Block, Plan, trailing_shape

KERNEL = "kernel"
DONE = "done"
DIMENSIONS = {
    "full": ("x1", "x2", "o1", "o2"), "trace": ("x1", "x2"), "diagonal": ("x1", "x2", "o"), "pntk": ("x1", "x2"),
}


def check_output(path: str, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; never overwrite what is not a Zarr store."""
    if is_url(path):
        try:
            zarr.open_group(path, mode="r")
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
            return
        except Exception as err:
            raise StoreError("output.path", f"cannot reach {path}: {err}") from None
        exists, is_zarr = True, True
    else:
        exists = os.path.lexists(path)
        is_zarr = os.path.isfile(os.path.join(path, "zarr.json"))
        if exists and os.path.isdir(path) and not os.listdir(path):
            return  # an empty folder holds nothing to lose
    if exists and not overwrite:
        raise StoreError("output.path",
                         f"{path} already exists; set output.overwrite: true (or --overwrite) to replace it")
    if exists and not is_zarr:
        raise StoreError("output.path", f"{path} exists and is not a Zarr store; refusing to overwrite it")


def create(path: str, plan: Plan, mode: str, o: int, dtype: str, attrs: dict[str, Any]) -> None:
    """Create the group, the kernel and the markers (replacing an old store; check_output first)."""
    try:
        group = zarr.open_group(path, mode="w", zarr_format=3, attributes=attrs)
        trailing = trailing_shape(mode, o)
        group.create_array(
            KERNEL,
            shape=(plan.n1, plan.n2, *trailing),
            chunks=(*plan.chunks, *trailing),
            dtype=dtype,
            fill_value=np.nan,  # a region no block has written reads as NaN, never as a plausible 0
            compressors=[Crc32cCodec()],  # kernel values barely compress; a checksum catches corruption
            dimension_names=DIMENSIONS[mode],
            attributes={"mode": mode},
        )
        group.create_array(
            DONE,
            shape=plan.grid,
            chunks=(1, 1),  # one marker per block, so concurrent writers never share a chunk
            dtype="uint8",
            fill_value=0,
            dimension_names=("block_row", "block_col"),
        )
    except OSError as err:
        raise StoreError("output.path", f"cannot create {path}: {err}") from None


def update_attrs(path: str, attrs: dict[str, Any]) -> None:
    zarr.open_group(path, mode="r+").attrs.update(attrs)


def transpose(values: np.ndarray) -> np.ndarray:
    """K(x2, x1) from K(x1, x2): K(x_j, x_i)[b, a] = K(x_i, x_j)[a, b]; swaps sample and output axes."""
    return values.transpose(1, 0, *reversed(range(2, values.ndim)))


class BlockWriter:
    """Writes blocks and their markers; picklable (holds the path), opens the arrays lazily."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._arrays: tuple[Any, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_arrays": None}

    def _open(self) -> tuple[Any, Any]:
        if self._arrays is None:
            group = zarr.open_group(self.path, mode="r+")
            self._arrays = (group[KERNEL], group[DONE])
        return self._arrays

    def write(self, block: Block, values: np.ndarray) -> None:
        """Write a block's values (and their transpose for a mirrored block), then mark it done."""
        kernel, done = self._open()
        try:
            kernel[block.i0 : block.i1, block.j0 : block.j1] = values
            if block.mirrored:
                # K(x_j, x_i)[b, a] = K(x_i, x_j)[a, b]: swap the sample axes and the output axes.
                kernel[block.j0 : block.j1, block.i0 : block.i1] = transpose(values)
            # Markers only after all of the block's data is written.
            done[block.row, block.col] = 1
            if block.mirrored:
                done[block.col, block.row] = 1
        except OSError as err:
            raise StoreError("output.path", f"writing block {block.index} to {self.path} failed: {err}") from None


def done_count(path: str) -> int:
    """Blocks marked done (a symmetric run marks both of an off-diagonal block's places)."""
    markers: Any = zarr.open_group(path, mode="r")[DONE]
    return int(np.asarray(markers[...]).sum())
