r"""Feature sources for zooming models: a slide's patch levels, read level by level on demand.

A zooming model (:class:`wsigraph.models.ZoomMIL`) at evaluation needs the whole lowest level,
then only the children of the parents it selects, level after level. A *zoom source* answers
exactly those questions:

* :meth:`ZoomSource.root` — every node of a level (features, slide index, CSR offsets);
* :meth:`ZoomSource.children` — the children ``[B, K, R]`` (by slot, ``-1`` where missing) of
  given parents, through intermediate levels when the two levels are not consecutive (the
  descendants of a child are then consecutive: depth-first order);
* :meth:`ZoomSource.rows` — the features of given nodes.

:class:`GraphZoomSource` answers from a (batched) :class:`~wsigraph.data.graph.SlideGraph` in
memory, following its zoom edges. :class:`H5FeatureSource` answers from one slide's CLAM/TRIDENT
feature files and reads only what is asked: the lowest level's rows, the coordinates of the levels
(to link children geometrically with :func:`~wsigraph.data.graph.link_levels`, exactly as the graph
builder does), and the rows of the requested children — so the I/O of a zooming model grows with
:math:`K`, not with the slide. Both build their child tables with
:func:`wsigraph.nn.functional.zoom.child_table` and the same collision rule, so a model gives the
same result on either.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from wsigraph.data.graph import link_levels
from wsigraph.data.readers import SlideError, _infer_patch_size, _patch_size_from_attrs, find_feature_file
from wsigraph.data.schema import level_magnification, level_name, node_batch, num_slides, patch_levels, zoom_edge
from wsigraph.nn.functional.zoom import cell_centre_distance, child_table, compose_child_tables, gather_rows

__all__ = ["ZoomSource", "GraphZoomSource", "H5FeatureSource", "ReadStats"]

PathLike = Union[str, os.PathLike]


def _fanout(parent_size: float, child_size: float) -> int:
    r"""Children per parent, :math:`r^2` with :math:`r = \mathrm{round}(s_p / s_c)`."""
    ratio = max(1, int(round(float(parent_size) / float(child_size))))
    return ratio * ratio


class ZoomSource:
    r"""What a zooming model asks of a slide (or a batch of slides); see the module docstring."""

    #: Number of slides :math:`B`.
    num_slides: int = 1

    def levels(self) -> List[str]:
        r"""Patch levels available, low → high magnification."""
        raise NotImplementedError

    def num_nodes(self, level: str) -> int:
        raise NotImplementedError

    def root(self, level: str) -> Tuple[Tensor, Tensor, Tensor]:
        r"""``(x [N, D], batch [N], ptr [B + 1])`` of every node of ``level``."""
        raise NotImplementedError

    def rows(self, level: str, index: Tensor) -> Tensor:
        r"""Features of the nodes ``index`` (any shape, ``-1`` → zero row), ``index.shape + (D,)``."""
        raise NotImplementedError

    def children(self, parent_level: str, child_level: str, parents: Tensor) -> Tensor:
        r"""Children at ``child_level`` of the ``[B, K]`` ``parents`` (``-1``: none), ``[B, K, R]``."""
        raise NotImplementedError

    def _chain(self, parent_level: str, child_level: str) -> List[str]:
        available = self.levels()
        if parent_level not in available or child_level not in available:
            raise KeyError(f"levels {parent_level} → {child_level} not both available (have {available})")
        low, high = available.index(parent_level), available.index(child_level)
        if high <= low:
            raise ValueError(f"{child_level} is not a higher magnification than {parent_level}")
        return available[low:high + 1]


class GraphZoomSource(ZoomSource):
    r"""Zoom source over a (batched) slide graph in memory.

    Child tables are built once per level pair from the zoom edges and their ``slot``
    (:func:`~wsigraph.nn.functional.zoom.child_table`; colliding slots keep the child nearest to
    the cell centre), with :math:`R = r^2` columns, :math:`r` the largest patch-size ratio of the
    batch; tables of non-consecutive levels are compositions (depth-first).

    Args:
        data (HeteroData): a slide graph or a batch of them.
    """

    def __init__(self, data):
        self.data = data
        self.num_slides = num_slides(data)
        self._levels = patch_levels(data)
        self._tables: Dict[Tuple[str, str], Tensor] = {}

    def levels(self) -> List[str]:
        return list(self._levels)

    def num_nodes(self, level: str) -> int:
        return int(self.data[level].num_nodes)

    def root(self, level: str) -> Tuple[Tensor, Tensor, Tensor]:
        store = self.data[level]
        x = store.x
        batch = node_batch(self.data, level)
        ptr = getattr(store, "ptr", None)
        if ptr is None:
            ptr = torch.tensor([0, x.size(0)], dtype=torch.long, device=x.device)
        return x, batch, ptr

    def rows(self, level: str, index: Tensor) -> Tensor:
        return gather_rows(self.data[level].x, index)

    def _patch_sizes(self, level: str) -> Optional[Tensor]:
        size = getattr(self.data[level], "patch_size", None)
        if size is None:
            return None
        size = torch.as_tensor(size, dtype=torch.float64)
        if size.dim() == 0:
            size = size.expand(self.num_slides)
        return size.to(self.data[level].x.device)

    def _edge_table(self, parent_level: str, child_level: str) -> Tensor:
        store = self.data[zoom_edge(parent_level, child_level)]
        edge_index = getattr(store, "edge_index", None)
        num_parents = self.num_nodes(parent_level)
        device = self.data[parent_level].x.device
        if edge_index is None:
            raise KeyError(f"the slide graph has no zoom edges {parent_level} → {child_level}")
        parent, child = edge_index[0], edge_index[1]
        slot = getattr(store, "slot", None)
        if slot is None:
            raise KeyError(f"zoom edges {parent_level} → {child_level} carry no 'slot'")
        parent_sizes, child_sizes = self._patch_sizes(parent_level), self._patch_sizes(child_level)
        if parent_sizes is not None and child_sizes is not None:
            num_slots = max(_fanout(p, c) for p, c in zip(parent_sizes.tolist(), child_sizes.tolist()))
        else:
            num_slots = int(slot.max()) + 1 if slot.numel() else 1
        distance = None
        if parent_sizes is not None and child_sizes is not None and parent.numel():
            slide = node_batch(self.data, parent_level).index_select(0, parent)
            distance = cell_centre_distance(self.data[parent_level].pos.index_select(0, parent),
                                            parent_sizes.index_select(0, slide),
                                            self.data[child_level].pos.index_select(0, child),
                                            child_sizes.index_select(0, slide), slot)
        return child_table(parent.to(device), child.to(device), slot.to(device), num_parents, num_slots, distance)

    def child_table(self, parent_level: str, child_level: str) -> Tensor:
        r"""``[N_parent, R]`` table of the children (or descendants, depth-first) of every node."""
        key = (parent_level, child_level)
        if key not in self._tables:
            chain = self._chain(parent_level, child_level)
            table = self._edge_table(chain[0], chain[1])
            for low, high in zip(chain[1:-1], chain[2:]):
                table = compose_child_tables(table, self._edge_table(low, high))
            self._tables[key] = table
        return self._tables[key]

    def children(self, parent_level: str, child_level: str, parents: Tensor) -> Tensor:
        table = self.child_table(parent_level, child_level)
        found = table.index_select(0, parents.clamp(min=0).reshape(-1)).view(*parents.shape, table.size(1)) \
            if table.size(0) else table.new_full((*parents.shape, table.size(1)), -1)
        return torch.where((parents >= 0).unsqueeze(-1), found, found.new_full((), -1))


@dataclass
class ReadStats:
    r"""What an :class:`H5FeatureSource` has read, per level.

    Attributes:
        feature_rows: feature rows read.
        feature_bytes: bytes of the feature rows read (as stored).
        coord_rows: coordinate rows read.
        reads: number of h5 read calls.
    """
    feature_rows: Dict[str, int] = field(default_factory=dict)
    feature_bytes: Dict[str, int] = field(default_factory=dict)
    coord_rows: Dict[str, int] = field(default_factory=dict)
    reads: int = 0

    def add(self, table: Dict[str, int], level: str, value: int) -> None:
        table[level] = table.get(level, 0) + int(value)

    @property
    def total_feature_rows(self) -> int:
        return sum(self.feature_rows.values())

    @property
    def total_feature_bytes(self) -> int:
        return sum(self.feature_bytes.values())


@dataclass
class _Level:
    name: str
    magnification: float
    path: Path
    patch_size: Optional[float]
    coords: Optional[Tensor] = None



def _read_by_chunk_index(dataset) -> Optional[np.ndarray]:
    r"""A whole 2-D dataset chunked by rows, unfiltered, read through its chunk index and a
    memory map of the file; ``None`` when that does not apply or does not check out.

    TRIDENT stores every row (also of ``coords``) in its own chunk; HDF5 then pays a B-tree
    lookup and a read call per row, so reading the 16-byte coordinates of 100k patches costs
    about as much as reading their features. Here the chunk addresses are listed once
    (``H5Dchunk_iter``) and the rows are gathered from a memory map.
    """
    if (dataset.ndim != 2 or dataset.chunks is None or dataset.chunks[1] != dataset.shape[1]
            or dataset.shape[0] == 0 or dataset.id.get_create_plist().get_nfilters() != 0
            or not hasattr(dataset.id, "chunk_iter") or dataset.file.driver != "sec2"
            or dataset.file.userblock_size != 0 or dataset.dtype.hasobject):
        return None
    rows_per_chunk = dataset.chunks[0]
    num_chunks = -(-dataset.shape[0] // rows_per_chunk)
    if dataset.id.get_num_chunks() != num_chunks:  # unwritten chunks hold the fill value
        return None
    chunk_bytes = rows_per_chunk * dataset.shape[1] * dataset.dtype.itemsize
    first_row = np.empty(num_chunks, dtype=np.int64)
    address = np.empty(num_chunks, dtype=np.int64)
    size = np.empty(num_chunks, dtype=np.int64)
    count = [0]

    def visit(info):
        i = count[0]
        first_row[i], address[i], size[i] = info.chunk_offset[0], info.byte_offset, info.size
        count[0] = i + 1

    dataset.id.chunk_iter(visit)
    if count[0] != num_chunks or (size != chunk_bytes).any():
        return None
    order = np.argsort(first_row)
    if (first_row[order] != np.arange(num_chunks) * rows_per_chunk).any():
        return None
    memory = np.memmap(dataset.file.filename, dtype=np.uint8, mode="r")
    raw = memory[address[order][:, None] + np.arange(chunk_bytes)]
    values = raw.view(dataset.dtype).reshape(num_chunks * rows_per_chunk, dataset.shape[1])[:dataset.shape[0]]
    # Cross-check against HDF5 itself before trusting the addresses.
    for row in {0, dataset.shape[0] // 2, dataset.shape[0] - 1}:
        if not np.array_equal(values[row], dataset[row]):
            return None
    return np.ascontiguousarray(values)


def _read_whole(dataset) -> np.ndarray:
    r"""A whole dataset, through its chunk index when it is row-chunked and unfiltered."""
    try:
        values = _read_by_chunk_index(dataset)
    except Exception:  # an HDF5 / h5py without chunk iteration, an unusual layout: the plain read
        values = None
    return np.asarray(dataset[()]) if values is None else values


class H5FeatureSource(ZoomSource):
    r"""Zoom source reading one slide's feature files (CLAM/TRIDENT ``.h5``: ``features`` [N, D]
    or [1, N, D], ``coords`` [N, 2]) on demand.

    * :meth:`root` reads a level's feature rows in one call;
    * :meth:`coords` reads a level's coordinates once (cached; pass ``coords`` to reuse an index,
      e.g. the cached graph's positions, and skip those reads);
    * :meth:`children` links the given parents to the next level's patches geometrically: the
      candidates are the patches whose centre lies inside a given parent's box, linked with
      :func:`~wsigraph.data.graph.link_levels` against *all* parents of the level, so the result
      equals the zoom edges of the full graph;
    * :meth:`rows` reads only the requested rows (sorted unique indices, contiguous runs read as
      slices — one-row chunks make h5py's point selections slower than runs of slices).

    :attr:`stats` counts rows and bytes read. Node indices are row indices of the files (the
    order of :func:`~wsigraph.data.readers.read_slide` and the graph builder).

    Args:
        feature_dirs (Mapping[float, PathLike]): magnification → feature directory.
        slide_id (str): the slide.
        patch_sizes (Mapping[float, float], optional): level-0 patch sides overriding the files'
            attributes.
        coords (Mapping, optional): magnification (or level name) → ``[N, 2]`` coordinates
            already known.
        chunk_index (bool, optional): read row-chunked, unfiltered ``coords`` through the file's
            chunk index (see :func:`_read_by_chunk_index`), else with a plain h5py read.
            (default: ``True``)
    """

    def __init__(self, feature_dirs: Mapping[float, PathLike], slide_id: str,
                 patch_sizes: Optional[Mapping[float, float]] = None,
                 coords: Optional[Mapping[Union[float, str], object]] = None, chunk_index: bool = True):
        self.slide_id = str(slide_id)
        self.chunk_index = bool(chunk_index)
        self.num_slides = 1
        self.stats = ReadStats()
        self._files: Dict[str, object] = {}
        self._levels: Dict[str, _Level] = {}
        for magnification in sorted(feature_dirs, key=float):
            path = find_feature_file(feature_dirs[magnification], slide_id)
            if path is None or path.suffix == ".pt":
                raise SlideError(slide_id, Path(feature_dirs[magnification]) / f"{slide_id}.h5",
                                 f"no {float(magnification):g}x .h5 feature file")
            name = level_name(float(magnification))
            size = (patch_sizes or {}).get(magnification)
            self._levels[name] = _Level(name, float(magnification), path, None if size is None else float(size))
        for key, value in (coords or {}).items():
            name = key if isinstance(key, str) else level_name(float(key))
            self._levels[name].coords = torch.as_tensor(np.asarray(value)).round().long().float()

    # ------------------------------------------------------------------ files
    def _file(self, level: str):
        import h5py
        if level not in self._files:
            path = self._levels[level].path
            try:
                self._files[level] = h5py.File(path, "r")
            except OSError as error:
                raise SlideError(self.slide_id, path, f"cannot open the HDF5 file: {error}") from None
        return self._files[level]

    def _features(self, level: str):
        handle = self._file(level)
        if "features" not in handle:
            raise SlideError(self.slide_id, self._levels[level].path, "no 'features' dataset in the file")
        return handle["features"]

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> "H5FeatureSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ geometry
    def levels(self) -> List[str]:
        return sorted(self._levels, key=level_magnification)

    def num_nodes(self, level: str) -> int:
        features = self._features(level)
        return int(features.shape[1] if features.ndim == 3 else features.shape[0])

    def coords(self, level: str) -> Tensor:
        r"""``[N, 2]`` float32 top-left corners (level-0 pixels), as the graph builder stores them."""
        entry = self._levels[level]
        if entry.coords is None:
            handle = self._file(level)
            if "coords" not in handle:
                raise SlideError(self.slide_id, entry.path, "no 'coords' dataset in the file")
            values = _read_whole(handle["coords"]) if self.chunk_index else np.asarray(handle["coords"][()])
            self.stats.reads += 1
            self.stats.add(self.stats.coord_rows, level, values.shape[0])
            if values.ndim != 2 or values.shape[1] != 2 or not np.isfinite(values).all():
                raise SlideError(self.slide_id, entry.path, f"bad 'coords' (shape {values.shape} or NaN/Inf)")
            entry.coords = torch.from_numpy(np.rint(values).astype(np.int64)).float()
        return entry.coords

    def patch_size(self, level: str) -> float:
        r"""Patch side in level-0 pixels (override, file attributes, or the lattice step)."""
        entry = self._levels[level]
        if entry.patch_size is None:
            handle = self._file(level)
            sets = [dict(handle["coords"].attrs)] if "coords" in handle else []
            sets += [dict(self._features(level).attrs), dict(handle.attrs)]
            size = _patch_size_from_attrs(*sets)
            if size is None:
                size = _infer_patch_size(self.coords(level).long().numpy())
            if size is None or not np.isfinite(size) or size <= 0:
                raise SlideError(self.slide_id, entry.path, "unknown patch size in level-0 pixels")
            entry.patch_size = float(size)
        return entry.patch_size

    # ------------------------------------------------------------------ reads
    def _read_runs(self, level: str, rows: np.ndarray) -> np.ndarray:
        dataset = self._features(level)
        three_d = dataset.ndim == 3
        dim = dataset.shape[-1]
        out = np.empty((rows.size, dim), dtype=np.float32)
        if rows.size:
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            starts = rows[np.concatenate([[0], breaks])]
            stops = rows[np.concatenate([breaks - 1, [rows.size - 1]])] + 1
            offset = 0
            for start, stop in zip(starts.tolist(), stops.tolist()):
                out[offset:offset + stop - start] = dataset[0, start:stop] if three_d else dataset[start:stop]
                offset += stop - start
            self.stats.reads += len(starts)
        self.stats.add(self.stats.feature_rows, level, rows.size)
        self.stats.add(self.stats.feature_bytes, level, rows.size * dim * dataset.dtype.itemsize)
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            raise SlideError(self.slide_id, self._levels[level].path,
                             f"NaN/Inf features in row {int(rows[np.argmax(bad)])}")
        return out

    def root(self, level: str) -> Tuple[Tensor, Tensor, Tensor]:
        count = self.num_nodes(level)
        x = torch.from_numpy(self._read_runs(level, np.arange(count)))
        return x, torch.zeros(count, dtype=torch.long), torch.tensor([0, count])

    def rows(self, level: str, index: Tensor) -> Tensor:
        flat = index.reshape(-1)
        wanted = flat[flat >= 0]
        unique = torch.unique(wanted)  # sorted
        count = self.num_nodes(level)
        if unique.numel() and int(unique[-1]) >= count:
            raise IndexError(f"row {int(unique[-1])} beyond the {count} rows of {level}")
        x = torch.from_numpy(self._read_runs(level, unique.numpy()))
        local = torch.searchsorted(unique, flat.clamp(min=0))
        local = torch.where(flat >= 0, local, local.new_full((), -1))
        return gather_rows(x, local).view(*index.shape, x.size(1))

    def _link(self, parent_level: str, child_level: str, parents: Tensor) -> Tensor:
        r"""Children ``[M, R]`` of the ``[M]`` parents (``-1``: none) at the next level."""
        parent_pos, child_pos = self.coords(parent_level), self.coords(child_level)
        parent_size, child_size = self.patch_size(parent_level), self.patch_size(child_level)
        num_slots = _fanout(parent_size, child_size)
        table = torch.full((parents.numel(), num_slots), -1, dtype=torch.long)
        real = torch.nonzero(parents >= 0).view(-1)
        if real.numel() == 0 or child_pos.size(0) == 0:
            return table
        chosen = parents[real]
        # Candidates: children whose centre lies inside a chosen parent's box (blocks bound memory).
        centre = child_pos.double() + child_size / 2.0
        inside = torch.zeros(child_pos.size(0), dtype=torch.bool)
        corners = parent_pos.index_select(0, chosen).double()
        for start in range(0, corners.size(0), 64):
            low = corners[start:start + 64].unsqueeze(0)
            offset = centre.unsqueeze(1) - low
            inside |= ((offset >= 0) & (offset < parent_size)).all(dim=2).any(dim=1)
        candidates = torch.nonzero(inside).view(-1)
        if candidates.numel() == 0:
            return table
        # Linking against every parent gives each candidate the parent the full graph gives it.
        parent, child, slot = link_levels(parent_pos, parent_size, child_pos.index_select(0, candidates), child_size)
        child = candidates.index_select(0, child)
        row_of_parent = torch.full((parent_pos.size(0),), -1, dtype=torch.long)
        row_of_parent[chosen] = real
        row = row_of_parent.index_select(0, parent)
        keep = row >= 0
        parent, child, slot, row = parent[keep], child[keep], slot[keep], row[keep]
        distance = cell_centre_distance(parent_pos.index_select(0, parent), parent_size,
                                        child_pos.index_select(0, child), child_size, slot)
        return child_table(row, child, slot, parents.numel(), num_slots, distance)

    def children(self, parent_level: str, child_level: str, parents: Tensor) -> Tensor:
        chain = self._chain(parent_level, child_level)
        current = parents.reshape(-1)
        for low, high in zip(chain[:-1], chain[1:]):
            current = self._link(low, high, current.reshape(-1)).view(current.numel(), -1)
        total = current.numel() // max(parents.numel(), 1)
        return current.view(*parents.shape, total)
