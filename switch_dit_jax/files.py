"""Reading the `.npz` and `.safetensors` files a user hands us, pickle-free, with every failure
turned into one BadFileError sentence naming the file (and the array or tensor).

NumPy's and safetensors' own errors (`BadZipFile`, `SafetensorError`, "Object arrays cannot be
loaded") name no path, and a float16 or bfloat16 checkpoint needs a cast safetensors' NumPy
reader cannot do, so both formats are parsed here: .npz through `zipfile` and the `.npy`
header, .safetensors from its documented layout (8-byte header size, JSON header, raw data).
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib

import numpy as np

from switch_dit_jax.errors import BadFileError

# safetensors dtype names -> NumPy dtypes (little-endian); BF16 is decoded by hand.
_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
_FLOAT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_HEADER_LIMIT = 100 << 20  # the safetensors reference reader's own limit
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, struct.error)


def _exists(path: str, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist (or is not a file).")
    return path


# ----------------------------------------------------------------------------- .npz


def _npy_header(f, path: str, key: str):
    """(shape, fortran_order, dtype) of a `.npy` stream; never unpickles."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise BadFileError(f"array {key!r} in {path!r} uses .npy format {version}, which "
                               "is not supported; save it with np.savez.")
    except BadFileError:
        raise
    except _READ_ERRORS as e:
        raise BadFileError(f"array {key!r} in {path!r} is not a readable .npy array ({e}); "
                           "the file is truncated or corrupt, so write it again.") from None
    if dtype.hasobject:
        raise BadFileError(f"array {key!r} in {path!r} holds Python objects ({dtype}), which "
                           "only unpickling could read and unpickling can run code; save plain "
                           "numeric arrays with np.savez.")
    return tuple(shape), fortran, dtype


class NpzFile:
    """An `.npz` opened for checked reads: `keys()`, `header(key)`, `read(key)`, `open(key)`."""

    def __init__(self, path, what: str = "file"):
        self.path = _exists(path, what)
        try:
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
        except _READ_ERRORS as e:
            size = os.path.getsize(self.path)
            state = "is empty" if size == 0 else f"is not a readable .npz ({e})"
            raise BadFileError(f"{what} {self.path!r} {state}; it is truncated, corrupt or not "
                               "an .npz, so write it again (np.savez).") from None
        self._members = {n[:-4]: n for n in names if n.endswith(".npy")}
        other = [n for n in names if not n.endswith(".npy")]
        if other:
            self._zip.close()
            raise BadFileError(f"{what} {self.path!r} holds {other[0]!r}, which is not a .npy "
                               "array; pass an .npz written by np.savez.")

    def keys(self) -> list[str]:
        return list(self._members)

    def __contains__(self, key) -> bool:
        return key in self._members

    def open(self, key: str):
        """(stream positioned at the data, shape, fortran_order, dtype) of one array."""
        if key not in self._members:
            raise BadFileError(f"{self.path!r} has no array {key!r} (it has "
                               f"{sorted(self._members)}).")
        try:
            f = self._zip.open(self._members[key])
        except _READ_ERRORS as e:
            raise BadFileError(f"array {key!r} in {self.path!r} cannot be read ({e}); the file "
                               "is corrupt, so write it again.") from None
        shape, fortran, dtype = _npy_header(f, self.path, key)
        return f, shape, fortran, dtype

    def header(self, key: str):
        f, shape, _, dtype = self.open(key)
        f.close()
        return shape, dtype

    def read(self, key: str) -> np.ndarray:
        f, shape, fortran, dtype = self.open(key)
        with f:
            data = read_exactly(f, int(np.prod(shape)) * dtype.itemsize, self.path, key)
        return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "NpzFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_exactly(f, nbytes: int, path: str, key: str) -> bytearray:
    """`nbytes` from a zip member, or a BadFileError saying the array is cut short."""
    buf = bytearray(nbytes)
    try:
        got = f.readinto(buf)
        while got < nbytes:
            more = f.readinto(memoryview(buf)[got:])
            if not more:
                break
            got += more
    except _READ_ERRORS as e:
        raise BadFileError(f"array {key!r} in {path!r} is corrupt ({e}); write the file "
                           "again.") from None
    if got != nbytes:
        raise BadFileError(f"array {key!r} in {path!r} is truncated ({got} of {nbytes} bytes); "
                           "write the file again.")
    return buf


def load_npz(path, what: str = "file", keys=None) -> dict[str, np.ndarray]:
    """Every array of an `.npz` (or only `keys`, those present), checked; no unpickling."""
    with NpzFile(path, what) as f:
        wanted = f.keys() if keys is None else [k for k in keys if k in f]
        return {k: f.read(k) for k in wanted}


# ----------------------------------------------------------------------------- .safetensors


class SafetensorsFile:
    """A `.safetensors` file whose header has been checked against the file size.

    `keys()`, `shape(key)` and `dtype(key)` need only the header; `get(key)` reads one tensor
    and returns float32 (float16 / bfloat16 / float64 are cast: released checkpoints often are
    half precision), refusing integer tensors and NaN or inf values by name.
    """

    def __init__(self, path, what: str = "weights file", error: type = BadFileError):
        self.path, self.what, self.error = _exists(path, what), what, error
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                self._bad("is empty" if size == 0 else f"has only {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > _HEADER_LIMIT or 8 + n > size:
                self._bad(f"announces a {n}-byte header but has {size} bytes")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                self._bad(f"has a header that is not JSON ({e})")
        if not isinstance(header, dict):
            self._bad("has a header that is not a JSON object")
        header.pop("__metadata__", None)
        self._start, self._tensors = 8 + n, {}
        for key, entry in header.items():
            self._tensors[key] = self._check_entry(key, entry, size - self._start)

    def _bad(self, why: str):
        raise self.error(f"{self.what} {self.path!r} is not a readable safetensors file (it "
                         f"{why}); it is truncated or corrupt, so download or write it again.")

    def _check_entry(self, key: str, entry, data_size: int):
        try:
            dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), \
                entry["data_offsets"]
            sane = (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                    and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError):
            sane = False
        if not sane:
            self._bad(f"describes tensor {key!r} incompletely ({entry!r})")
        if dtype not in _SAFETENSORS_DTYPES:
            raise self.error(f"tensor {key!r} in {self.path!r} has dtype {dtype}, which is "
                             "not supported; save it as float32, float16 or bfloat16.")
        want = int(np.prod(shape)) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
        if end - begin != want:
            self._bad(f"gives tensor {key!r} {end - begin} bytes for shape {shape} {dtype}")
        if end > data_size:
            self._bad(f"ends tensor {key!r} at byte {self._start + end} of "
                      f"{self._start + data_size}")
        return dtype, tuple(shape), begin

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key][1]

    def dtype(self, key: str) -> str:
        return self._tensors[key][0]

    def check_float(self, key: str) -> None:
        """Header-only: refuse a tensor that is not floating point."""
        dtype = self.dtype(key)
        if dtype not in _FLOAT_NAMES:
            raise self.error(f"tensor {key!r} in {self.path!r} has dtype "
                             f"{np.dtype(_SAFETENSORS_DTYPES[dtype]).name}, but weights must be "
                             "floating point (float32, float16, bfloat16 or float64); the file "
                             "is not a checkpoint of these weights.")

    def get(self, key: str) -> np.ndarray:
        self.check_float(key)
        dtype, shape, begin = self._tensors[key]
        count = int(np.prod(shape))
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            raw = np.fromfile(f, dtype=_SAFETENSORS_DTYPES[dtype], count=count)
        if raw.size != count:  # the file shrank after the header was checked
            self._bad(f"ends inside tensor {key!r}")
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            value = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            value = raw.astype(np.float32)
        return check_finite(value.reshape(shape), key, self.path, self.error)

    def load(self) -> dict[str, np.ndarray]:
        return {k: self.get(k) for k in self._tensors}


# ----------------------------------------------------------------------------- weights


def check_finite(value: np.ndarray, key: str, path: str, error: type = BadFileError):
    bad = ~np.isfinite(value)
    if bad.any():
        raise error(f"tensor {key!r} in {path!r} holds {int(bad.sum())} NaN or inf "
                           f"value(s) of {value.size}; the checkpoint is corrupt or comes from "
                           "a diverged run, so use another one.")
    return value


def weights_as_float32(value: np.ndarray, key: str, path: str) -> np.ndarray:
    """A floating-point array as float32 (finite), else a BadFileError naming key and dtype."""
    if value.dtype.kind != "f":
        raise BadFileError(f"tensor {key!r} in {path!r} has dtype {value.dtype}, but weights "
                           "must be floating point (float32, float16, bfloat16 or float64); the "
                           "file is not a checkpoint of these weights.")
    return check_finite(np.asarray(value, np.float32), key, path)


def load_weights(path, what: str = "checkpoint file") -> dict[str, np.ndarray]:
    """name -> float32 array of a `.npz` or `.safetensors` state dict, every tensor finite."""
    path = _exists(path, what)
    if path.endswith(".safetensors"):
        return SafetensorsFile(path, what).load()
    if path.endswith(".npz"):
        return {k: weights_as_float32(v, k, path) for k, v in load_npz(path, what).items()}
    raise BadFileError(f"{what} {path!r} is neither .npz nor .safetensors; convert it to one "
                       "of them first.")
