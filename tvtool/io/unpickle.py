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
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from tvtool.errors import InvalidInputError

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
