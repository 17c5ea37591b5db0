"""Lazy safetensors reading and streaming, atomic safetensors writing.

Readers never unpickle anything: safetensors is a JSON header plus raw bytes, validated by
the safetensors library (offsets, sizes, dtypes) before any tensor is touched. Writers emit
the header first and then one tensor at a time, so a result of N input files is produced
with about one tensor of extra memory. Plain files (input checks, stdin, stdout, JSON and
bytes) are :mod:`tvtool.io.documents`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from tvtool.errors import InvalidInputError, NumericalError, TvtoolError
from tvtool.io.atomic import STDIO, atomic_output, check_output, os_error
from tvtool.io.documents import input_file, short_text, spooled_stdin, write_stdout_from

_DTYPE_TO_CODE: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODE_TO_DTYPE = {code: dtype for dtype, code in _DTYPE_TO_CODE.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of one stored tensor (known without reading its data)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the raw data in bytes."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class TensorSource(Protocol):
    """A read-only, lazily loaded collection of named tensors plus string metadata."""

    label: str
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        ...

    def info(self, name: str) -> TensorInfo:
        """Dtype and shape of ``name`` without loading it."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a CPU tensor the caller may keep)."""
        ...

    def close(self) -> None:
        """Release the underlying file."""
        ...


class DictSource:
    """A :class:`TensorSource` over tensors already in memory."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
        label: str = "<memory>",
    ) -> None:
        self._tensors = dict(tensors)
        self.metadata = dict(metadata or {})
        self.label = label

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        tensor = self._tensors[name]
        return TensorInfo(name, tensor.dtype, tuple(tensor.shape))

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def close(self) -> None:
        self._tensors = {}


class _SafetensorsFileSource:
    """A :class:`TensorSource` over a safetensors file, read one tensor at a time.

    The safetensors library validates the header (JSON, dtypes, shapes, offsets that are
    contiguous, in bounds and match shape x dtype) when the file is opened; tensor data is
    then read with ``pread`` into a fresh buffer per tensor. Memory-mapping would be simpler,
    but every page touched through a mapping stays in the process's resident set until the
    file is closed, so streaming N inputs would cost N models of RSS.
    """

    def __init__(self, path: Path, label: str, fd: int | None = None) -> None:
        self.label = label
        self._fd = -1
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError, UnicodeError, OverflowError) as exc:
            if fd is not None:
                os.close(fd)
            raise InvalidInputError(
                f"{label} is not a valid safetensors file: {short_text(exc)}",
                hint=_format_hint(path),
            ) from exc
        try:
            with handle as ctx:
                self.metadata = dict(ctx.metadata() or {})
                names = list(ctx.keys())
                self._infos: dict[str, TensorInfo] = {}
                for name in names:
                    view = ctx.get_slice(name)
                    code = view.get_dtype()
                    if code not in _CODE_TO_DTYPE:
                        raise InvalidInputError(
                            f"{label}: tensor {name!r} has unsupported dtype {code}",
                            hint=f"tvtool reads {', '.join(sorted(_CODE_TO_DTYPE))}")
                    self._infos[name] = TensorInfo(name, _CODE_TO_DTYPE[code],
                                                   tuple(view.get_shape()))
            self._keys, self._spans = _data_spans(path, names)
            self._fd = os.open(path, os.O_RDONLY) if fd is None else fd
        except (SafetensorError, ValueError, UnicodeError, OverflowError) as exc:
            if fd is not None:
                os.close(fd)
            raise InvalidInputError(
                f"{label} is not a valid safetensors file: {short_text(exc)}") from exc
        except BaseException:
            if fd is not None and self._fd == -1:
                os.close(fd)
            raise

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def get(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        start, stop = self._spans[name]
        if stop == start:
            return torch.empty(info.shape, dtype=info.dtype)
        buffer = bytearray(stop - start)
        view = memoryview(buffer)
        done = 0
        try:
            while done < len(buffer):
                count = os.preadv(self._fd, [view[done:]], start + done)
                if count == 0:
                    raise InvalidInputError(f"{self.label} was truncated while tvtool read "
                                            f"tensor {name!r}")
                done += count
        except OSError as exc:
            raise InvalidInputError(
                f"{self.label}: cannot read tensor {name!r}: {exc.strerror or exc}") from exc
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def _data_spans(path: Path, names: list[str]) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Names in file order and the absolute byte range of each tensor.

    The header was already validated by safetensors; this only reads the offsets (and the
    order: safetensors lists names sorted, writers store them in state-dict order).
    """
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    base = 8 + length
    spans = {n: (base + header[n]["data_offsets"][0], base + header[n]["data_offsets"][1])
             for n in names}
    return sorted(names, key=lambda n: (spans[n][0], n)), spans


def _format_hint(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return None
    if _looks_pickled(head):
        return "this looks like a pickled PyTorch checkpoint; convert it with `tvtool convert`"
    return "the file may be truncated or not a safetensors file"


def _check_header(path: Path, label: str) -> None:
    """Cheap structural checks that give clearer messages than the library's."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if _looks_pickled(head):
        raise InvalidInputError(
            f"{label} is a pickled PyTorch checkpoint, not a safetensors file",
            hint="convert it with `tvtool convert IN.pt -o OUT.safetensors` (no pickle code runs)",
        )
    if size < 8:
        raise InvalidInputError(f"{label} is not a valid safetensors file: only {size} bytes",
                                hint=_format_hint(path))
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > _MAX_HEADER_BYTES or header_len + 8 > size:
        raise InvalidInputError(
            f"{label} is not a valid safetensors file: header length {header_len} does not fit "
            f"in {size} bytes",
            hint=_format_hint(path),
        )


def _looks_pickled(head: bytes) -> bool:
    """Whether the first 9 bytes are a zip or pickle signature rather than safetensors.

    A safetensors header length such as 640 (``80 02 00 ...``) starts like a pickle, so a
    JSON header opening at byte 8 wins.
    """
    if head[8:9] == b"{":
        return False
    return head.startswith(_ZIP_MAGIC) or head[:2] in _PICKLE_MAGIC


def open_tensors(path: str) -> TensorSource:
    """Open a safetensors file, or ``-`` for safetensors bytes on stdin, for lazy reading.

    Args:
        path: File path or ``-``.

    Returns:
        A validated :class:`TensorSource`; call ``close()`` when done.

    Raises:
        InvalidInputError: if the file is missing, truncated, not safetensors, or lies in its
            header (offsets, sizes, dtypes).
    """
    if path == STDIO:
        return _open_stdin()
    file = input_file(path)
    _check_header(file, repr(path))
    return _SafetensorsFileSource(file, repr(path))


def _open_stdin() -> TensorSource:
    with spooled_stdin(".safetensors") as tmp_path:
        _check_header(tmp_path, "stdin")
        # The descriptor keeps the spooled data readable after the file is unlinked.
        fd = os.open(tmp_path, os.O_RDONLY)
        return _SafetensorsFileSource(tmp_path, "stdin", fd=fd)


def _layout_header(layout: Sequence[TensorInfo], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metadata must map str to str, got {key!r}: {type(value)}")
        # Sorted: metadata read from an input comes in the order of a hash map, so a copied
        # header would otherwise differ from run to run (files must be byte-stable).
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    seen: set[str] = set()
    for info in layout:
        if info.name in seen:
            raise ValueError(f"duplicate tensor name {info.name!r}")
        seen.add(info.name)
        if info.dtype not in _DTYPE_TO_CODE:
            raise InvalidInputError(f"tensor {info.name!r} has unsupported dtype {info.dtype}")
        end = offset + info.nbytes
        header[info.name] = {"dtype": _DTYPE_TO_CODE[info.dtype], "shape": list(info.shape),
                             "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf (always true for non-floating tensors).

    One min/max reduction (NaN propagates through both): ~30x faster than
    ``torch.isfinite(t).all()``, which materialises boolean tensors.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _write(handle: IO[bytes], data: bytes | memoryview) -> None:
    # The single place safetensors bytes reach a file: tests replace it to simulate a full
    # disk.
    handle.write(data)


def _stream_to(handle: IO[bytes], layout: Sequence[TensorInfo], metadata: Mapping[str, str],
               tensors: Iterable[tuple[str, torch.Tensor]], check_finite: bool) -> None:
    _write(handle, _layout_header(layout, metadata))
    produced = iter(tensors)
    for info in layout:
        try:
            name, tensor = next(produced)
        except StopIteration:
            raise TvtoolError(f"internal error: writer expected tensor {info.name!r}") from None
        if name != info.name or tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise TvtoolError(
                f"internal error: writer got {name!r} {tensor.dtype} {tuple(tensor.shape)}, "
                f"expected {info.name!r} {info.dtype} {info.shape}"
            )
        if check_finite and not all_finite(tensor):
            raise NumericalError(f"result tensor {name!r} contains NaN or Inf",
                                 hint="check the inputs and coefficients for overflow")
        data = tensor.detach().to("cpu").contiguous().view(-1)
        if data.numel():
            _write(handle, data.view(torch.uint8).numpy().data)
    leftover = next(produced, None)
    if leftover is not None:
        raise TvtoolError(f"internal error: writer got unexpected tensor {leftover[0]!r}")


def write_tensors(
    output: str,
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    *,
    layout: Sequence[TensorInfo] | None = None,
    inputs: Sequence[str] = (),
    check_finite: bool = True,
) -> None:
    """Write tensors as safetensors, atomically, to a file or to stdout (``-``).

    Args:
        output: Destination path, or ``-`` for stdout.
        tensors: Either a mapping, or an iterator of ``(name, tensor)`` pairs produced lazily in
            the order of ``layout`` (streaming: one tensor in memory at a time).
        metadata: String-to-string metadata stored in the header.
        layout: Names, dtypes and shapes in write order; required when ``tensors`` is an
            iterator, derived from the mapping otherwise.
        inputs: Paths this command read; an output equal to one of them is refused.
        check_finite: Refuse to write NaN or Inf values.

    Raises:
        InvalidInputError: output equals an input, or its directory is missing.
        NumericalError: a tensor holds NaN or Inf (nothing is written).
        TvtoolError: the disk is full or the write failed (the target is left unchanged).
    """
    check_output(output, inputs)
    if isinstance(tensors, Mapping):
        items: Iterable[tuple[str, torch.Tensor]] = list(tensors.items())
        if layout is None:
            layout = [TensorInfo(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    else:
        items = tensors
    if layout is None:
        raise TypeError("layout is required when tensors is an iterator")
    meta = dict(metadata or {})
    if output == STDIO:
        # Buffer in an anonymous temp file so a failure never leaves half a file in the pipe.
        try:
            with tempfile.TemporaryFile(prefix="tvtool-out-") as spool:
                _stream_to(spool, layout, meta, items, check_finite)
                spool.seek(0)
                write_stdout_from(spool)
        except OSError as exc:
            raise os_error(exc, "buffering the output for stdout") from exc
        return
    with atomic_output(output) as tmp, open(tmp, "wb") as handle:
        _stream_to(handle, layout, meta, items, check_finite)


def iter_source(source: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` pairs of a source one at a time."""
    names = source.keys()
    for name in names:
        yield name, source.get(name)
