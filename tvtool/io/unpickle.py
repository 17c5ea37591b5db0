"""The restricted unpickler: torch checkpoints read without executing pickle code.

* only tensor-rebuild functions, storages, dtypes, ``OrderedDict`` and plain containers
  (``dict``, ``list``, ``tuple``, ``set``, ``frozenset``) are real;
* every other global (classes, functions such as ``os.system``) becomes an inert
  :class:`Stub` class: calling or instantiating it records the arguments, ``__setstate__``
  records the state, and nothing else happens.

Both of torch's on-disk formats are read: the zip archive (torch >= 1.6: ``data.pkl`` plus
one record per storage) and the legacy stream (magic number, protocol, system info, the
object pickle, the storage keys, then raw storage bytes).

Memory stays bounded by the file's size: storages hold raw bytes that are in the file, so the
sizes the pickle declares must add up to no more than the file size, and that is checked
before each storage is allocated. torch writes zip members uncompressed (stored); a
compressed member could inflate a few hundred bytes into gigabytes, so it is refused.

:func:`read_plain_pickle` reads plain pickles of data (CIFAR's batch files) more strictly:
dicts, lists, strings, numbers and uint8 numpy arrays only, any other global refused outright
(no stubs), with bounds on the file's size and number of operations.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from tvtool.errors import InvalidInputError
from tvtool.io.images import open_regular
from tvtool.limits import MAX_NESTING, short_name, short_repr

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_PICKLE_BYTES = 256 * 1024 * 1024

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_RENAMED_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


# ---------------------------------------------------------------- inert stand-ins


class Stub:
    """An inert stand-in for a global (class or function) named in a pickle.

    Instantiating or calling a stub only records the arguments; ``__setstate__`` only records
    the state; list- and dict-style filling is recorded too. Nothing named by the file runs.
    """

    stub_module: str = ""
    stub_name: str = ""
    # Per-instance records, set in __new__ (never from the file's own attribute names).
    stub_args: tuple[Any, ...]
    stub_kwargs: dict[str, Any]
    stub_state: Any
    stub_items: list[Any]
    stub_mapping: dict[Any, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        obj = object.__new__(cls)
        obj.__dict__.update(stub_args=args, stub_kwargs=kwargs, stub_state=None,
                            stub_items=[], stub_mapping={})
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Arguments were recorded by __new__; a real __init__ must not run.
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["stub_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["stub_mapping"][key] = value

    def append(self, item: Any) -> None:
        self.__dict__["stub_items"].append(item)

    def extend(self, items: Any) -> None:
        self.__dict__["stub_items"].extend(items)

    def add(self, item: Any) -> None:
        self.__dict__["stub_items"].append(item)

    def __call__(self, *args: Any, **kwargs: Any) -> Stub:
        return _CallResult(*args, **kwargs)

    @classmethod
    def qualified_name(cls) -> str:
        """``module.name`` of the global this stub stands for."""
        return f"{cls.stub_module}.{cls.stub_name}"

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name()}>"


class _CallResult(Stub):
    stub_module = "<call>"
    stub_name = "result"


@dataclass
class _Storage:
    """A storage read from the file: flat bytes viewed as ``dtype``."""

    data: torch.Tensor
    key: str

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype


_HINT = "the file may be truncated or damaged; tvtool reads it without running pickled code"


def bad(message: str, hint: str | None = _HINT) -> InvalidInputError:
    """The error for a malformed checkpoint (by default hinting at a damaged file)."""
    return InvalidInputError(message, hint=hint)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise bad(f"malformed tensor {what}: {value!r:.80}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor view of a storage, bounds-checked before torch sees it."""
    if not isinstance(storage, _Storage):
        raise bad(f"tensor built from {type(storage).__name__}, not a storage")
    flat = storage.data
    if dtype is not None and dtype != flat.dtype:
        width = torch.empty((), dtype=dtype).element_size()
        if flat.numel() * flat.element_size() % width:
            raise bad(f"storage {storage.key} does not hold whole {dtype} elements")
        flat = flat.view(torch.uint8).view(dtype)
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool) \
            or storage_offset < 0:
        raise bad(f"malformed storage offset {storage_offset!r:.40}")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise bad(f"tensor size {shape} and stride {strides} differ in length")
    if math.prod(shape):
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= flat.numel():
            raise bad(f"tensor of size {shape} reaches past the end of storage {storage.key}")
    return torch.as_strided(flat, shape, strides, storage_offset)


def _rebuild_tensor_v1(storage: Any, storage_offset: Any, size: Any, stride: Any
                       ) -> torch.Tensor:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> torch.Tensor:
    if metadata:
        raise bad("tensors with conjugate/negative bits are not supported")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, dtype: Any,
                       metadata: Any = None) -> torch.Tensor:
    if not isinstance(dtype, torch.dtype):
        raise bad(f"malformed tensor dtype {dtype!r:.40}")
    if metadata:
        raise bad("tensors with conjugate/negative bits are not supported")
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> Any:
    # A Parameter is only its data here; requires_grad and hooks do not matter for weights.
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # func is itself something find_class returned (a safe rebuild function or a stub).
    if not callable(func) or not isinstance(args, tuple):
        raise bad("malformed tensor subclass record")
    return func(*args)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if isinstance(cls, type) and issubclass(cls, Stub):
        return cls.__new__(cls)
    if cls in (dict, OrderedDict, list, set):
        return cls()
    raise bad(f"cannot reconstruct {cls!r:.60}")


def _newobj(cls: Any, *args: Any) -> Any:
    return _reconstructor(cls, object, None)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    # Scalars and strings have opcodes of their own; bytes(n) or str(...) as callables would
    # only let a file allocate memory it does not contain, so they stay inert.
    ("torch", "Size"): tuple,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v1,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
}


@dataclass(frozen=True)
class _StorageType:
    """What a pickled storage class (``torch.FloatStorage``...) stands for: its dtype."""

    dtype: torch.dtype


class _RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose globals are safe functions or inert stubs."""

    def __init__(self, handle: IO[bytes], load_storage: Callable[[tuple[Any, ...]], Any]
                 ) -> None:
        super().__init__(handle)
        self._load_storage = load_storage
        self.stub_classes: dict[tuple[str, str], type[Stub]] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _RENAMED_MODULES.get(module, module)
        safe = _SAFE_GLOBALS.get((module, name))
        if safe is not None:
            return safe
        if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return self._stub(module, name)

    def _stub(self, module: str, name: str) -> type[Stub]:
        key = (module, name)
        if key not in self.stub_classes:
            self.stub_classes[key] = type(name.rsplit(".", 1)[-1] or "stub", (Stub,),
                                          {"stub_module": module, "stub_name": name})
        return self.stub_classes[key]

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise bad(f"unexpected persistent id {pid!r:.60}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) >= 2:
            # Legacy files wrap module classes as (class, source file, source code); the
            # class was itself resolved by find_class (so it is a stub); the source is ignored.
            return pid[1]
        if kind != "storage":
            raise bad(f"unexpected persistent id {kind!r:.40}")
        return self._load_storage(pid[1:])


def _storage_dtype(storage_type: Any) -> torch.dtype:
    if isinstance(storage_type, _StorageType):
        return storage_type.dtype
    name = storage_type.qualified_name() if isinstance(storage_type, type) and issubclass(
        storage_type, Stub) else repr(storage_type)
    raise bad(f"unsupported storage type {name:.60}")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------- the two torch formats


def _stored(info: zipfile.ZipInfo, label: str, size: int) -> zipfile.ZipInfo:
    """The member, if it is stored uncompressed and lies within the file."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise bad(f"{label}: archive member {info.filename[:80]!r} is compressed; torch "
                   "writes uncompressed members, and tvtool does not inflate untrusted data",
                   hint="re-save the checkpoint with torch.save, or convert it where it was made")
    if info.file_size > size:
        raise bad(f"{label}: archive member {info.filename[:80]!r} declares "
                   f"{info.file_size} bytes, more than the whole file ({size})")
    return info


def _load_zip(handle: IO[bytes], label: str, size: int) -> tuple[Any, set[str]]:
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        text = " ".join(str(exc).split())[:160]
        raise bad(f"{label} is not a readable torch zip archive: {text}") from exc
    with archive:
        pickles = [i for i in archive.infolist() if i.filename.endswith("data.pkl")
                   and i.filename.count("/") == 1]
        if len(pickles) != 1:
            raise bad(f"{label} is a zip file but not a torch checkpoint (no single data.pkl)",
                       hint=None)
        prefix = pickles[0].filename[: -len("data.pkl")]
        names = {i.filename: i for i in archive.infolist()}
        order = names.get(prefix + "byteorder")
        if order is not None:
            with archive.open(_stored(order, label, size)) as member:
                byteorder = member.read(16).strip()
        if order is not None and byteorder not in (b"little", b""):
            raise bad(f"{label} was saved on a big-endian machine; that is not supported",
                       hint=None)
        _stored(pickles[0], label, size)
        if pickles[0].file_size > _MAX_PICKLE_BYTES:
            raise bad(f"{label}: data.pkl is implausibly large ({pickles[0].file_size} bytes)")
        storages: dict[str, _Storage] = {}
        declared = [0]  # bytes of all storages so far; they must fit in the file

        def load_storage(fields: tuple[Any, ...]) -> _Storage:
            if len(fields) != 4:
                raise bad(f"{label}: malformed storage record")
            storage_type, key, _location, numel = fields
            key = _text(key)
            if len(key) > 256:
                raise bad(f"{label}: malformed storage key {key[:40]!r}...")
            if key in storages:
                return storages[key]
            dtype = _storage_dtype(storage_type)
            if not isinstance(numel, int) or numel < 0:
                raise bad(f"{label}: malformed storage size {numel!r:.40}")
            nbytes = numel * _element_size(dtype)
            declared[0] += nbytes
            if declared[0] > size:
                raise bad(f"{label}: the storages declare {declared[0]} bytes or more, "
                           f"more than the whole file ({size} bytes)")
            info = names.get(f"{prefix}data/{key}")
            if info is None:
                raise bad(f"{label}: storage {key[:40]!r} is missing from the archive")
            if _stored(info, label, size).file_size < nbytes:
                raise bad(f"{label}: storage {key[:40]!r} holds {info.file_size} bytes, "
                           f"{nbytes} expected (truncated file?)")
            with archive.open(info) as member:
                raw = bytearray(member.read(nbytes))
            if len(raw) != nbytes:
                raise bad(f"{label}: storage {key[:40]!r} is truncated")
            flat = torch.frombuffer(raw, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
            storages[key] = _Storage(flat, key)
            return storages[key]

        with archive.open(pickles[0]) as member:
            unpickler = _RestrictedUnpickler(io.BytesIO(member.read()), load_storage)
        root = unpickler.load()
    return root, {cls.qualified_name() for cls in unpickler.stub_classes.values()}


def _load_stream(handle: IO[bytes], label: str, size: int) -> tuple[Any, set[str]]:
    """A legacy ``torch.save`` stream, or a plain pickle."""
    pending: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}
    declared = [0]  # bytes of all storages so far; their raw bytes follow in the file

    def load_storage(fields: tuple[Any, ...]) -> _Storage:
        if len(fields) != 5:
            raise bad(f"{label}: malformed legacy storage record")
        storage_type, root_key, _location, numel, view = fields
        root_key = _text(root_key)
        dtype = _storage_dtype(storage_type)
        if not isinstance(numel, int) or numel < 0 or numel * _element_size(dtype) > size:
            raise bad(f"{label}: storage size {numel!r:.40} does not fit in the file")
        if root_key not in pending:
            declared[0] += numel * _element_size(dtype)
            if declared[0] > size:
                raise bad(f"{label}: the storages declare {declared[0]} bytes or more, "
                           f"more than the whole file ({size} bytes)")
            # Filled from the raw section after the object pickle (see below).
            pending[root_key] = _Storage(torch.zeros(numel, dtype=dtype), root_key)
        storage = pending[root_key]
        if view is None:
            return storage
        view_key, offset, view_size = view
        view_key = _text(view_key)
        if view_key not in views:
            if not (isinstance(offset, int) and isinstance(view_size, int) and offset >= 0
                    and view_size >= 0 and offset + view_size <= storage.data.numel()):
                raise bad(f"{label}: storage view {view_key!r} is out of bounds")
            views[view_key] = _Storage(storage.data[offset: offset + view_size], view_key)
        return views[view_key]

    unpickler = _RestrictedUnpickler(handle, load_storage)
    first = unpickler.load()
    if not (type(first) is int and first == _LEGACY_MAGIC):
        # A plain pickle: the first object is the whole content.
        return first, {cls.qualified_name() for cls in unpickler.stub_classes.values()}
    protocol = unpickler.load()
    if protocol != 1001:
        raise bad(f"{label}: unknown legacy torch protocol {protocol!r:.20}")
    unpickler.load()  # system info: endianness and type sizes of the saving machine
    root = unpickler.load()
    keys = unpickler.load()
    if not isinstance(keys, list):
        raise bad(f"{label}: malformed storage key list")
    for key in keys:
        storage = pending.get(_text(key))
        if storage is None:
            raise bad(f"{label}: storage {key!r:.40} listed but never used")
        head = handle.read(8)
        if len(head) != 8:
            raise bad(f"{label} is truncated (storage {key!r:.40})")
        (numel,) = struct.unpack("<q", head)
        if numel != storage.data.numel():
            raise bad(f"{label}: storage {key!r:.40} holds {numel} elements, "
                       f"{storage.data.numel()} expected")
        nbytes = numel * storage.data.element_size()
        raw = handle.read(nbytes)
        if len(raw) != nbytes:
            raise bad(f"{label} is truncated (storage {key!r:.40})")
        if nbytes:
            storage.data.view(torch.uint8).copy_(torch.frombuffer(bytearray(raw),
                                                                  dtype=torch.uint8))
    return root, {cls.qualified_name() for cls in unpickler.stub_classes.values()}


def read_root_file(file: Path, label: str, size: int) -> tuple[Any, set[str]]:
    """:func:`read_root` on a file, with every failure as one InvalidInputError."""
    try:
        with open(file, "rb") as handle:
            return read_root(handle, label, size)
    except InvalidInputError:
        raise
    except RecursionError:
        raise bad(f"{label}: object graph nested too deeply") from None
    except Exception as exc:  # only our own code ran, so any error means a malformed file
        text = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise bad(f"{label} is not a readable torch checkpoint: {text}") from exc


def read_root(handle: IO[bytes], label: str, size: int) -> tuple[Any, set[str]]:
    """Unpickle a torch checkpoint of either format with every class left inert.

    Returns:
        The root object and the ``module.name`` of every global the file named.
    """
    head = handle.read(4)
    handle.seek(0)
    if head == b"PK\x03\x04":
        return _load_zip(handle, label, size)
    if head[:1] != b"\x80":
        raise bad(f"{label} is neither a torch zip archive nor a pickle (protocol 2+)",
                   hint="convert reads torch.save files (.pt, .pth, .bin) and safetensors")
    return _load_stream(handle, label, size)


# ---------------------------------------------------------------- plain pickles with arrays
#
# The python versions of some datasets (CIFAR-10/100) are plain pickles, not torch files: a
# dict of strings, numbers, lists and numpy arrays. Here no global becomes a stub: the few
# that such a file needs are stand-ins written here (numpy's array and dtype functions are
# never called), and any other name is refused before anything is built.

_NDARRAY_MAKERS = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1 / numpy 2
_FROMBUFFER_MAKERS = ("numpy.core.numeric", "numpy._core.numeric")
_REFUSED_OPCODES = frozenset({
    # Instances of named classes, persistent ids, the extension registry and out-of-band
    # buffers: none of them occurs in a plain pickle of data.
    "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4",
    "NEXT_BUFFER", "READONLY_BUFFER"})


@dataclass
class PlainPickleBounds:
    """Bounds on a plain pickle read by :func:`read_plain_pickle`.

    Attributes:
        max_bytes: Largest file.
        max_ops: Most pickle operations: each builds at most one object, so this bounds the
            memory of everything but the bytes and strings, which are in the file.
        max_ndim: Most dimensions of an array.
    """

    max_bytes: int
    max_ops: int
    max_ndim: int = 8


class _NdarrayName:
    """What ``numpy.ndarray`` stands for: only the first argument of ``_reconstruct``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise bad("numpy.ndarray is called directly; a pickled array names it only through "
                  "numpy's _reconstruct")


_NDARRAY = _NdarrayName()


class _Uint8Dtype:
    """``numpy.dtype('u1')`` as a pickle names it; any other dtype is refused."""

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata]):
        # a plain byte has no subarray, names or fields.
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                and state[1] in ("|", "<", ">", "=") and state[2:5] == (None, None, None)):
            raise bad(f"malformed numpy dtype state {short_repr(state, 60)}")


def _numpy_dtype(code: Any, align: Any = False, copy: Any = False) -> _Uint8Dtype:
    if code not in ("u1", b"u1"):
        raise bad(f"a numpy array of dtype {short_repr(code, 40)}; only uint8 (u1) arrays "
                  "are read from a pickle", hint=None)
    return _Uint8Dtype()


class _PickledArray:
    """A numpy array being unpickled: built from its state, checked against its bytes."""

    def __init__(self, max_ndim: int, file_size: int) -> None:
        self.max_ndim = max_ndim
        self.file_size = file_size
        self.array: np.ndarray | None = None

    def set(self, shape: Any, dtype: Any, fortran: Any, raw: Any) -> _PickledArray:
        if self.array is not None:
            raise bad("a pickled numpy array is built twice")
        if not isinstance(dtype, _Uint8Dtype):
            raise bad(f"a numpy array whose dtype is {short_repr(dtype, 40)}")
        if not isinstance(shape, tuple) or len(shape) > self.max_ndim or not all(
                type(n) is int and n >= 0 for n in shape):
            raise bad(f"malformed numpy array shape {short_repr(shape, 60)}")
        if isinstance(raw, str):  # Python 2's str, read as latin-1 text: one byte a character
            try:
                raw = raw.encode("latin-1")
            except UnicodeEncodeError:
                raise bad("a numpy array's data is text, not bytes") from None
        if not isinstance(raw, (bytes, bytearray)):
            raise bad(f"a numpy array's data is {type(raw).__name__}, not bytes (object "
                      "arrays are never read)")
        count = 1
        for n in shape:
            # The data must be in the file: a declared shape may not promise more.
            count *= n
            if count > self.file_size:
                raise bad(f"a numpy array of shape {short_repr(shape, 60)} declares more "
                          f"bytes than the whole file ({self.file_size})")
        if count != len(raw):
            raise bad(f"a numpy array of shape {short_repr(shape, 60)} holds {len(raw)} bytes, "
                      f"{count} expected")
        if fortran not in (False, True, 0, 1):
            raise bad(f"malformed numpy array order {short_repr(fortran, 20)}")
        flat = np.frombuffer(raw, dtype=np.uint8)
        self.array = flat.reshape(shape, order="F") if fortran else flat.reshape(shape)
        return self

    def __setstate__(self, state: Any) -> None:
        # ndarray.__reduce__ state: ([version,] shape, dtype, is_fortran, raw data).
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise bad(f"malformed numpy array state {short_repr(state, 60)}")
        self.set(*state)


class _PlainUnpickler(pickle.Unpickler):
    """Reads dicts, lists, strings, numbers and uint8 numpy arrays; refuses every other name."""

    def __init__(self, data: bytes, label: str, bounds: PlainPickleBounds) -> None:
        # latin-1 reads Python 2 str as text byte for byte, as torchvision's readers do.
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.label = label
        self.max_ndim = bounds.max_ndim
        self.file_size = len(data)

    def find_class(self, module: str, name: str) -> Any:
        if module in _NDARRAY_MAKERS and name == "_reconstruct":
            return self._reconstruct
        if module in _FROMBUFFER_MAKERS and name == "_frombuffer":
            return self._frombuffer
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) == ("numpy", "dtype"):
            return _numpy_dtype
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise bad(f"{self.label} names {short_name(f'{module}.{name}', 80)}, which a data "
                  "file of this kind never holds; tvtool does not run code from data files",
                  hint=None)

    def _reconstruct(self, cls: Any, shape: Any, typecode: Any) -> _PickledArray:
        # numpy's _reconstruct(ndarray, (0,), b'b') makes an empty array that BUILD fills.
        if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
            raise bad(f"malformed numpy array record {short_repr((cls, shape, typecode), 60)}")
        return _PickledArray(self.max_ndim, self.file_size)

    def _frombuffer(self, raw: Any, dtype: Any, shape: Any, order: Any) -> _PickledArray:
        # Protocol 5's form: the bytes in-band, then dtype, shape and order.
        if order not in ("C", "F"):
            raise bad(f"malformed numpy array order {short_repr(order, 20)}")
        return _PickledArray(self.max_ndim, self.file_size).set(shape, dtype, order == "F",
                                                                raw)

    def persistent_load(self, pid: Any) -> Any:
        raise bad(f"{self.label} refers to outside objects (persistent id "
                  f"{short_repr(pid, 40)}); a data file of this kind never does", hint=None)


def _latin1_bytes(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode(text, 'latin1')``: how Python 3 pickles bytes in protocols 0-2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise bad(f"_codecs.encode of {type(text).__name__} as {short_repr(encoding, 20)}; "
                  "only latin-1 text is admitted (pickled bytes)")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise bad("pickled bytes hold characters beyond latin-1") from None


def _count_ops(data: bytes, label: str, bounds: PlainPickleBounds) -> None:
    """Walk the opcodes before anything is built: refuse too many, or ones data never uses."""
    for count, (opcode, _arg, _pos) in enumerate(pickletools.genops(io.BytesIO(data)), 1):
        if count > bounds.max_ops:
            raise bad(f"{label} holds more than {bounds.max_ops:,} pickle operations; "
                      "tvtool reads at most that many from a data file", hint=None)
        if opcode.name in _REFUSED_OPCODES:
            raise bad(f"{label} holds the pickle operation {opcode.name}, which a data file "
                      "of this kind never holds; tvtool does not run code from data files",
                      hint=None)


def _resolve(value: Any, depth: int, done: set[int], rebuilt: dict[int, Any]) -> Any:
    """``value`` with every unpickled array in place of its record.

    Lists and dicts are changed in place (a copy would double the memory of a file of many
    small containers) and remembered by id in ``done``; tuples are rebuilt and arrays
    replaced, both remembered in ``rebuilt``. Each object is visited once, so shared and
    cyclic references cost nothing more.
    """
    if isinstance(value, (str, bytes, int, float, type(None))):
        return value
    key = id(value)
    if key in done:
        return value
    if key in rebuilt:
        return rebuilt[key]
    if depth > MAX_NESTING:
        raise bad(f"pickled data nested more than {MAX_NESTING} levels deep")
    if isinstance(value, _PickledArray):
        if value.array is None:
            raise bad("a pickled numpy array has no data")
        rebuilt[key] = value.array
        return value.array
    if isinstance(value, list):
        done.add(key)
        for index, item in enumerate(value):
            value[index] = _resolve(item, depth + 1, done, rebuilt)
        return value
    if isinstance(value, dict):
        done.add(key)
        for name, item in value.items():
            if not isinstance(name, (str, bytes, int, float, type(None))):
                raise bad(f"pickled data has a dict key of type {type(name).__name__}")
            value[name] = _resolve(item, depth + 1, done, rebuilt)
        return value
    if isinstance(value, tuple):
        rebuilt[key] = tuple(_resolve(v, depth + 1, done, rebuilt) for v in value)
        return rebuilt[key]
    # A dtype or ndarray name left loose, a set, ...
    raise bad(f"pickled data holds {type(value).__name__.lstrip('_')}, which a data file "
              "of this kind never holds")


def read_plain_pickle(file: Path, label: str, bounds: PlainPickleBounds) -> Any:
    """Read a pickle of plain data and uint8 numpy arrays without running code from it.

    Admitted: what pickle's own opcodes build (dicts, lists, tuples, strings, bytes, numbers,
    ``None``, booleans) and numpy uint8 arrays in the forms numpy pickles them
    (``_reconstruct`` + state, or protocol 5's ``_frombuffer``), with Python 2 strings read as
    latin-1 text (as torchvision reads them). Any other global name, instances of classes,
    persistent ids and out-of-band buffers are refused before anything is built, and so are
    files over ``bounds.max_bytes`` or with more than ``bounds.max_ops`` operations; an
    array's declared shape must match the bytes the file holds for it.

    Returns:
        The unpickled root object, numpy arrays in place (read-only views of the file's bytes).

    Raises:
        InvalidInputError: anything else, one line naming the file.
    """
    try:
        with open_regular(file, "pickled data file") as handle:
            # read(n) allocates n bytes first: ask for what the file holds, never the bound.
            size = os.fstat(handle.fileno()).st_size
            data = handle.read(min(size, bounds.max_bytes) + 1)
    except FileNotFoundError:
        raise bad(f"{label} does not exist", hint=None) from None
    except OSError as exc:
        raise bad(f"cannot read {label}: {' '.join(str(exc).split())[:120]}", hint=None) from None
    try:
        if len(data) > bounds.max_bytes:
            mib, rest = divmod(bounds.max_bytes, 1024 * 1024)
            bound = f"{mib} MiB" if mib and not rest else f"{bounds.max_bytes:,} bytes"
            raise bad(f"{label} is larger than {bound}, more than a data file of this kind "
                      "holds", hint=None)
        _count_ops(data, label, bounds)
        root = _PlainUnpickler(data, label, bounds).load()
        return _resolve(root, 0, set(), {})
    except InvalidInputError as exc:
        if exc.message.startswith(label):
            raise
        raise bad(f"{label}: {exc.message}", hint=exc.hint) from None
    except RecursionError:
        raise bad(f"{label}: pickled data nested too deeply") from None
    except Exception as exc:  # only our own code ran, so any error means a malformed file
        text = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise bad(f"{label} is not a readable pickle: {text}") from exc
