"""Binary little-endian PLY files with one ``vertex`` element of scalar properties.

This covers what gsr exchanges: point clouds (x y z red green blue) and 3DGS scenes in the Inria layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_PLY_TYPES = {
    "float": np.dtype("<f4"), "float32": np.dtype("<f4"), "double": np.dtype("<f8"), "float64": np.dtype("<f8"),
    "uchar": np.dtype("u1"), "uint8": np.dtype("u1"), "char": np.dtype("i1"), "int8": np.dtype("i1"),
    "ushort": np.dtype("<u2"), "uint16": np.dtype("<u2"), "short": np.dtype("<i2"), "int16": np.dtype("<i2"),
    "uint": np.dtype("<u4"), "uint32": np.dtype("<u4"), "int": np.dtype("<i4"), "int32": np.dtype("<i4"),
}
_NUMPY_TO_PLY = {np.dtype("<f4"): "float", np.dtype("<f8"): "double", np.dtype("u1"): "uchar",
                 np.dtype("<i4"): "int", np.dtype("<u4"): "uint"}


def write_ply(path: str | Path, columns: dict[str, np.ndarray]) -> None:
    """Write columns of equal length [P] as a binary PLY ``vertex`` element, in the given order."""
    if not columns:
        raise ValueError("`columns` must name at least one property")
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"all columns must have the same length, got {lengths}")
    dtypes = []
    for name, values in columns.items():
        dtype = np.asarray(values).dtype.newbyteorder("<")
        if dtype not in _NUMPY_TO_PLY:
            raise ValueError(f"column `{name}` has dtype {dtype}; expected one of {sorted(map(str, _NUMPY_TO_PLY))}")
        dtypes.append((name, dtype))
    count = next(iter(lengths.values()))
    table = np.empty(count, dtype=dtypes)
    for name, values in columns.items():
        table[name] = values
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {count}"]
    header += [f"property {_NUMPY_TO_PLY[dtype]} {name}" for name, dtype in dtypes]
    header.append("end_header")
    with open(path, "wb") as handle:
        handle.write(("\n".join(header) + "\n").encode("ascii"))
        handle.write(table.tobytes())


def _read_header(handle, path: Path) -> tuple[int, list[tuple[str, np.dtype]]]:
    """Parse the header of an open PLY file up to its data: the vertex count and the vertex properties."""
    if handle.readline().strip() != b"ply":
        raise ValueError(f"{path} is not a PLY file (no 'ply' magic line)")
    count, fields, element = None, [], None
    while True:
        line = handle.readline()
        if not line:
            raise ValueError(f"{path}: PLY header has no 'end_header'")
        words = line.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and words[1] != "binary_little_endian":
            raise ValueError(f"{path}: PLY format {words[1]!r} is not supported; expected binary_little_endian")
        if words[0] == "element":
            element = words[1]
            if element == "vertex":
                count = int(words[2])
            elif count is not None:
                break
        elif words[0] == "property" and element == "vertex":
            if words[1] == "list" or words[1] not in _PLY_TYPES:
                raise ValueError(f"{path}: vertex property {' '.join(words[1:])!r} is not a supported scalar")
            fields.append((words[2], _PLY_TYPES[words[1]]))
        elif words[0] == "end_header":
            break
    if count is None:
        raise ValueError(f"{path}: PLY file has no vertex element")
    return count, fields


def read_ply_header(path: str | Path) -> tuple[int, list[str]]:
    """The vertex count P and the vertex property names of a PLY file, reading only its header.

    Raises:
        ValueError naming the file when it is not a binary little-endian PLY file with a vertex element.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        count, fields = _read_header(handle, path)
    return count, [name for name, _ in fields]


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read the ``vertex`` element of a binary little-endian PLY file into columns [P] keyed by name.

    Raises:
        ValueError naming the file when it is not such a PLY file or is truncated.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        count, fields = _read_header(handle, path)
        dtype = np.dtype(fields)
        data = handle.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ValueError(f"{path}: PLY file is truncated ({len(data)} of {count * dtype.itemsize} data bytes)")
    table = np.frombuffer(data, dtype=dtype)
    return {name: table[name].copy() for name, _ in fields}
