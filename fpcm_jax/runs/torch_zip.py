"""Read PyTorch `.pt` / `.pth` files without PyTorch, and without running pickled code.

    state = torch_zip.load("ResNet18-CIFAR10.pt")   # {name: numpy array}, nested dicts kept

`torch.save` (PyTorch >= 1.6) writes a zip archive: `<prefix>/data.pkl` pickles the object,
each tensor's storage is the raw bytes of `<prefix>/data/<key>`, and `<prefix>/byteorder` says
"little" or "big". The pickle is read with an unpickler that resolves only the few names a
state dict needs (OrderedDict, the tensor-rebuild functions, storage types), each to
a local function that builds numpy arrays; any other name (a class, `os.system`, ...) stops
the read before anything is called. Tensors come back as numpy arrays with their dtype, shape,
strides and storage offset (bfloat16 as `ml_dtypes.bfloat16`); tensors sharing a storage are
independent copies. The legacy pre-1.6 format is refused with the fix.

`save(handle, {name: array})` writes such a file (what `torch.save` writes for a state dict of
tensors: an OrderedDict, one storage per array, 64-byte aligned), which `torch.load` reads, also
with `weights_only=True`.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Dict, Mapping, NamedTuple

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}


class TorchFileError(ValueError):
    """The file is not a PyTorch zip checkpoint of tensors and dicts that we can read."""


class _StorageType(NamedTuple):
    dtype: np.dtype


def _tensor_from_storage(storage: np.ndarray, offset: Any, size: Any, stride: Any) -> np.ndarray:
    """A copy of the tensor viewing `storage` (elements) from `offset` with `size`/`stride`,
    bounds-checked so that no view reaches outside the storage."""
    numbers = [offset, *size, *stride]
    if (not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride)
            or not all(isinstance(n, int) and n >= 0 for n in numbers)):
        raise TorchFileError(f"a tensor has a malformed layout (offset {offset!r}, size "
                             f"{size!r}, stride {stride!r})")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise TorchFileError(f"a tensor reaches element {last} of a storage of {storage.size}")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=[s * storage.itemsize for s in stride],
                                           writeable=False)
    return np.array(view)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
    if not isinstance(storage, np.ndarray):
        raise TorchFileError("a tensor is built from something that is not a storage")
    return _tensor_from_storage(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


class _Sealed:
    """A function handed to the unpickler that the pickle cannot modify (its BUILD opcode would
    otherwise set attributes such as `__defaults__` on our functions)."""

    __slots__ = ("_function",)

    def __init__(self, function):
        object.__setattr__(self, "_function", function)

    def __setattr__(self, name, value):
        raise TorchFileError(f"the pickle tries to set {name!r} on a tensor-rebuild function")

    def __call__(self, *args):
        return self._function(*args)


_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _Sealed(_rebuild_tensor_v2),
            ("torch._utils", "_rebuild_parameter"): _Sealed(_rebuild_parameter),
            ("torch._utils", "_rebuild_parameter_with_state"): _Sealed(_rebuild_parameter)}
_ALLOWED.update({("torch", name): _StorageType(np.dtype(dtype))
                 for name, dtype in _STORAGE_DTYPES.items()})


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` names; storages come from the zip's `data/` records."""

    def __init__(self, handle, archive: zipfile.ZipFile, prefix: str, byteorder: str,
                 path: str):
        super().__init__(handle)
        self._archive, self._prefix, self._path = archive, prefix, path
        self._byteorder = "<" if byteorder == "little" else ">"
        self._storages: Dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise TorchFileError(
                f"{self._path} contains {module}.{name}, which is not a tensor or dict; "
                f"fpcm-jax reads only tensors and dicts (it never runs pickled code): save the "
                f"model's state_dict() instead (torch.save(model.state_dict(), path)).")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise TorchFileError(f"{self._path} holds an unknown record {pid!r:.80}")
        key = pid[2]
        if key not in self._storages:
            member = f"{self._prefix}/data/{key}"
            try:
                raw = self._archive.read(member)
            except KeyError:
                raise TorchFileError(f"{self._path} lacks its record {member}") from None
            dtype = pid[1].dtype.newbyteorder(self._byteorder)
            usable = len(raw) - len(raw) % dtype.itemsize
            self._storages[key] = np.frombuffer(raw[:usable], dtype).astype(dtype.newbyteorder("="))
        return self._storages[key]


def load(path: str | os.PathLike) -> Any:
    """The object a `torch.save` zip file holds, with numpy arrays for its tensors."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise TorchFileError(_not_a_zip_message(path))
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive, path)
        byteorder = _byteorder(archive, prefix, path)
        with archive.open(f"{prefix}/data.pkl") as handle:
            unpickler = _StateDictUnpickler(handle, archive, prefix, byteorder, path)
            try:
                return unpickler.load()
            except TorchFileError as error:
                if str(error).startswith(path):
                    raise
                raise TorchFileError(f"{path}: {error}.") from None
            except Exception as error:  # a damaged pickle can fail in many ways
                raise TorchFileError(f"{path} is damaged or not a saved state dict "
                                     f"({type(error).__name__}: {error}).") from None


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    pickles = [name for name in archive.namelist()
               if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise TorchFileError(f"{path} is a zip file but not one written by torch.save (it has "
                             f"no <name>/data.pkl record).")
    return pickles[0][:-len("/data.pkl")]


def _byteorder(archive: zipfile.ZipFile, prefix: str, path: str) -> str:
    try:
        mark = archive.read(f"{prefix}/byteorder").decode("ascii", "replace")
    except KeyError:
        return "little"  # files from before the mark were written on little-endian machines
    if mark not in ("little", "big"):
        raise TorchFileError(f"{path} names an unknown byte order {mark!r}.")
    return mark


def _not_a_zip_message(path: str) -> str:
    with open(path, "rb") as handle:
        start = handle.read(2)
    if start == b"\x80\x02":  # the legacy format starts with a protocol-2 pickle
        return (f"{path} is in PyTorch's legacy format (torch < 1.6), which fpcm-jax does not "
                f"read; re-save it with torch >= 1.6: torch.save(torch.load(path), "
                f"'new.pt'), or write an .npz of its state_dict (see the README).")
    return f"{path} is not a PyTorch checkpoint (not a zip archive written by torch.save)."


_STORAGE_NAMES = {np.dtype(dtype): name for name, dtype in _STORAGE_DTYPES.items()
                  if name != "UntypedStorage"}
_ALIGNMENT = 64  # torch.save starts each storage's bytes at a multiple of 64 (for mmap)


class _Global:
    """A name the pickle refers to (written as a GLOBAL opcode, never imported here)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # the pickler accepts only callables as what REDUCE calls
        raise TypeError(f"{self.module}.{self.name} only stands for a name in a pickle")


_GLOBALS: Dict[str, _Global] = {}  # one object per name, so that the pickle memoizes each


def _global(module: str, name: str) -> _Global:
    return _GLOBALS.setdefault(f"{module}.{name}", _Global(module, name))


class _Storage(NamedTuple):
    key: str
    array: np.ndarray  # C-contiguous, little-endian


class _Tensor:
    """An array pickled as torch pickles a contiguous tensor with its own storage."""

    def __init__(self, storage: _Storage):
        self.storage = storage

    def __reduce__(self):
        shape = self.storage.array.shape
        strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        return (_global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, 0, shape, strides, False, collections.OrderedDict()))


class _StateDictPickler(pickle._Pickler):  # the Python pickler: it lets `save` be extended
    def save(self, obj, save_persistent_id=True):
        if not isinstance(obj, _Global):
            super().save(obj, save_persistent_id)
        elif id(obj) in self.memo:
            self.write(self.get(self.memo[id(obj)][0]))
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            self.memoize(obj)

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        storage_type = _global("torch", _STORAGE_NAMES[obj.array.dtype.newbyteorder("=")])
        return ("storage", storage_type, obj.key, "cpu", obj.array.size)


def save(handle: BinaryIO, state: Mapping[str, np.ndarray]) -> None:
    """Write {name: array} as `torch.save` writes a state dict of tensors (see the module doc)."""
    storages, tensors = [], collections.OrderedDict()
    for index, (name, value) in enumerate(state.items()):
        array = np.array(value, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        if array.dtype.newbyteorder("=") not in _STORAGE_NAMES:
            raise TorchFileError(f"{name!r} has dtype {array.dtype}, which has no PyTorch "
                                 f"storage type.")
        storages.append(_Storage(str(index), array.astype(array.dtype.newbyteorder("<"))))
        tensors[name] = _Tensor(storages[-1])
    pickled = io.BytesIO()
    _StateDictPickler(pickled, protocol=2).dump(tensors)
    with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickled.getvalue())
        archive.writestr("archive/.format_version", "1")
        archive.writestr("archive/.storage_alignment", str(_ALIGNMENT))
        archive.writestr("archive/byteorder", "little")
        for storage in storages:
            _write_aligned(archive, f"archive/data/{storage.key}", storage.array.tobytes())
        archive.writestr("archive/version", "3\n")


def _write_aligned(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    """A stored record whose data starts at a multiple of `_ALIGNMENT` in the file, padded by
    an extra field of the local header as torch's writer pads it."""
    header_end = archive.fp.tell() + 30 + len(name) + 4  # fixed header, name, extra's own 4
    padding = -header_end % _ALIGNMENT
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.extra = struct.pack("<HH", 0x4246, padding) + b"Z" * padding  # 'FB', as torch
    archive.writestr(info, data, zipfile.ZIP_STORED)
