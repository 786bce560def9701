"""Feature views for the `lca` probe: row and column selections of (memory-mapped, float16)
activation matrices, read onto the device in chunks of about `CHUNK_VALUES` floats."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

# Float32 values read onto the device at once (256 MiB). A view that fits is read once and kept for
# all epochs; a larger one is read one chunk of rows at a time.
CHUNK_VALUES = 1 << 26


class Features:
    """A lazy (rows x columns) view of one or more activation matrices placed side by side.

    Nothing is read until `read`; rows and columns are selected by index, so a train/dev carve or
    a neuron subset of a memory-mapped float16 matrix costs no copy.

    Args:
        blocks: 2-D arrays with the same number of rows (numpy arrays, memmaps or torch tensors),
            concatenated along the columns in this order.
        rows: indices of the rows in view (None: all), in the order they are read.
        columns: indices of the concatenated columns in view (None: all), in this order.
    """

    def __init__(self, blocks: Sequence, rows: np.ndarray | None = None, columns: np.ndarray | None = None):
        self.blocks = tuple(blocks)
        if not self.blocks or any(len(b.shape) != 2 for b in self.blocks):
            raise ValueError("Features needs one or more 2-D matrices (rows x neurons)")
        n = {int(b.shape[0]) for b in self.blocks}
        if len(n) != 1:
            raise ValueError(f"the matrices to place side by side have different row counts {sorted(n)}")
        self.n_total = n.pop()
        self.widths = [int(b.shape[1]) for b in self.blocks]
        self.rows = None if rows is None else _indices(rows, self.n_total, "row")
        self.columns = None if columns is None else _indices(columns, sum(self.widths), "column")

    @property
    def shape(self) -> tuple[int, int]:
        n = self.n_total if self.rows is None else len(self.rows)
        return n, sum(self.widths) if self.columns is None else len(self.columns)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows) -> "Features":
        """The view's rows `rows` (indices into this view)."""
        rows = _indices(rows, len(self), "row")
        return Features(self.blocks, rows if self.rows is None else self.rows[rows], self.columns)

    def select(self, columns) -> "Features":
        """The view's columns `columns` (indices into this view)."""
        columns = _indices(columns, self.shape[1], "column")
        return Features(self.blocks, self.rows, columns if self.columns is None else self.columns[columns])

    def devices(self) -> set[torch.device]:
        return {b.device for b in self.blocks if isinstance(b, torch.Tensor)}

    def read(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Rows [start, stop) of the view as a float32 (stop - start, n_columns) tensor on `device`."""
        rows = slice(start, stop) if self.rows is None else self.rows[start:stop]
        offsets = np.concatenate([[0], np.cumsum(self.widths)])
        if self.columns is None:
            parts = [_read_block(b, rows, device) for b in self.blocks]
            return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        # Read only the blocks that hold selected columns, then pick the columns in view order.
        owner = np.searchsorted(offsets, self.columns, side="right") - 1
        needed = np.unique(owner)
        widths = np.asarray(self.widths)
        start_in_read = np.zeros(len(widths), dtype=np.int64)
        start_in_read[needed] = np.cumsum(widths[needed]) - widths[needed]
        local = start_in_read[owner] + self.columns - offsets[owner]
        parts = [_read_block(self.blocks[i], rows, device) for i in needed]
        block = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return block.index_select(1, torch.as_tensor(local, dtype=torch.long, device=device))

    def chunk_rows(self) -> int:
        """Rows per chunk, so that one chunk of the underlying blocks is about CHUNK_VALUES floats."""
        return max(1, CHUNK_VALUES // max(1, sum(self.widths)))


def _indices(idx, n: int, what: str) -> np.ndarray:
    idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValueError(f"a boolean {what} mask must have length {n}, got shape {idx.shape}")
        return np.flatnonzero(idx)
    idx = idx.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{what} indices must lie in 0..{n - 1}; got {idx.min()}..{idx.max()}")
    return idx


def _read_block(block, rows, device: torch.device) -> torch.Tensor:
    if isinstance(block, torch.Tensor):
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows, dtype=torch.long, device=block.device)
        return block[rows].to(device=device, dtype=torch.float32)
    part = np.asarray(block[rows], dtype=np.float32)  # float16 memmap -> float32 chunk
    return torch.from_numpy(part).to(device)


def as_features(X) -> Features:
    """`X` as a `Features` view (a 2-D numpy array, memmap or torch tensor, or a view already)."""
    return X if isinstance(X, Features) else Features([X])


def _device(device, feats: Features) -> torch.device:
    if device is not None:
        return torch.device(device)
    on = feats.devices()
    cuda = [d for d in on if d.type == "cuda"]
    return cuda[0] if cuda else torch.device("cpu")


def _chunks(feats: Features, device: torch.device, order: np.ndarray | None = None
            ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, stop, rows) chunks of the view, in chunk order `order` (default: in sequence)."""
    n, size = len(feats), feats.chunk_rows()
    starts = np.arange(0, n, size)
    for i in (range(len(starts)) if order is None else order):
        start = int(starts[i])
        stop = min(n, start + size)
        yield start, stop, feats.read(start, stop, device)
