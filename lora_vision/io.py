"""Safe file I/O: atomic writes and a defensive safetensors reader (files we read can be hostile)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; a larger header is refused before it is read


class AdapterFileError(ValueError):
    """A file could not be read as a LoRA adapter; the message says what was wrong and what to do."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed over `path`, on error it is removed.

    A crash never leaves a half-written file under the final name; what a killed process leaves under the temporary
    name (it carries the writer's PID) is removed by `remove_stale_temps`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written folder `tmp` to `final`; an existing `final` is swapped out first and then removed,
    so at every moment one complete folder exists under the final name (or the old one)."""
    tmp, final = Path(tmp), Path(final)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes owner-only folders; give the usual permissions
    if final.exists():
        old = temp_sibling(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def unwritable_reason(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into `folder` (created if missing), or None when they can; creates nothing.

    Looks at `folder` or, when it does not exist yet, the nearest existing folder above it.
    """
    probe = Path(folder).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        return f"{probe} is on a read-only file system"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user (permission denied)"
    return None


# Temporary names made here and by temp_sibling: `.NAME.PID-XXXX.tmp` files (atomic_path) and `.NAME.KIND-PID`
# folders (KIND: tmp = being written, old = being replaced, trash = being deleted). The PID says whose they are.
_TEMP_FILE = re.compile(r"^\..+\.(\d+)-[^.]*\.tmp$")
_TEMP_DIR = re.compile(r"^\..+\.(?:tmp|old|trash)-(\d+)$")


def temp_sibling(path: str | os.PathLike, kind: str) -> Path:
    """`.NAME.KIND-PID` next to `path`: a temporary name that remove_stale_temps recognises (kind: tmp, old, trash)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder so that a crash half-way never leaves a partial folder under its name: it is first renamed
    to a trash name (one atomic step), then deleted; a killed deletion leaves only the trash name behind."""
    path = Path(path)
    if not path.exists():
        return
    trash = temp_sibling(path, "trash")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders in `folder` (not below it) that atomic_path, replace_dir, remove_tree
    and temp_sibling users left behind when their process was killed; those of live processes are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        m = (_TEMP_DIR if entry.is_dir() and not entry.is_symlink() else _TEMP_FILE).match(entry.name)
        if not m or pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors (made contiguous, on CPU) and string metadata to a .safetensors file atomically. Tensors that
    share memory (one lora_down used by the q, k and v of a split fused module, row slices of one lora_up) are
    written each in full: safetensors refuses shared storage."""
    bad = {k: type(v).__name__ for k, v in (metadata or {}).items() if not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata values must be strings; got {bad}")
    clean, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        clean[k] = t.clone() if storage in seen and t.numel() else t
        seen.add(storage)
    with atomic_path(path) as tmp:
        _save_file(clean, tmp, dict(metadata or {}))
    return Path(path)


def _save_file(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """The one place safetensors files are written; an I/O failure (e.g. a full disk) comes out as an OSError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:  # an I/O failure reads "Error while serializing: I/O error: ... (os error 28) ..."
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _sniff(head: bytes) -> str | None:
    # `head` is the first 9 bytes. A safetensors file is an 8-byte little-endian length, then a JSON header that
    # starts with "{"; the length bytes alone can look like a zip ("PK") or pickle (0x80) signature.
    if head[8:9] == b"{":
        return None
    if head[:2] == b"PK":
        return "a zip archive (torch.save / .pt / .ckpt pickle)"
    if head[:1] == b"\x80":
        return "a Python pickle"
    return None


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Parse and validate the JSON header of a .safetensors file; returns (header, header_length)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        kind = _sniff(head)
        if kind:
            raise AdapterFileError(f"{path} is {kind}; lora_vision loads only .safetensors files, never pickles "
                                   f"(convert it in a trusted environment first)")
        if len(head) < 8:
            raise AdapterFileError(f"{path}: file too short ({size} bytes) to be a safetensors file")
        (n,) = struct.unpack("<Q", head[:8])
        if n > MAX_HEADER_BYTES:
            raise AdapterFileError(f"{path}: header length {n:,} bytes exceeds the {MAX_HEADER_BYTES:,} byte limit; "
                                   "not a valid safetensors file")
        if 8 + n > size:
            raise AdapterFileError(f"{path}: header says {n:,} bytes but the file has only {size - 8:,} after the "
                                   "length field; the file is truncated")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: header is not valid JSON ({e}); not a safetensors file") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: header is JSON but not an object")
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise AdapterFileError(f"{path}: __metadata__ must map strings to strings")
            continue
        try:
            start, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise AdapterFileError(f"{path}: tensor {key!r} has no valid data_offsets") from None
        if not (0 <= start <= end <= data_len):
            raise AdapterFileError(f"{path}: tensor {key!r} spans bytes {start}..{end} but the data region has "
                                   f"{data_len} bytes; the file is truncated or corrupt")
    return header, n


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _tensors_from_data(path: str | os.PathLike, header: dict, header_len: int) -> dict[str, torch.Tensor] | None:
    """The tensors of a validated safetensors file from one read of its data region, each floating tensor a view of
    it (an adapter's thousand small tensors load several times faster than through one read per tensor). None where
    this reader does not apply (a big-endian machine, a dtype it does not know): the caller uses safetensors."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if sys.byteorder != "little" or any(v.get("dtype") not in _ST_DTYPES for v in entries.values()):
        return None
    size = Path(path).stat().st_size
    data = bytearray(size - 8 - header_len)
    with open(path, "rb") as f:
        f.seek(8 + header_len)
        if f.readinto(data) != len(data):
            raise AdapterFileError(f"{path}: the file changed while it was read")
    # the format's rule (as safetensors checks it): the tensors tile the data region, in order, without gaps
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in entries.items())
    pos = 0
    for start, end, key in spans:
        if start != pos:
            raise AdapterFileError(f"{path}: tensor {key!r} starts at byte {start} of the data region, expected "
                                   f"{pos} (tensors must follow each other without gaps or overlaps)")
        pos = end
    if pos != len(data):
        raise AdapterFileError(f"{path}: the tensors end at byte {pos} but the data region has {len(data)} bytes")
    raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    typed: dict[torch.dtype, torch.Tensor] = {}  # the region seen as each dtype: one as_strided per tensor
    out = {}
    for key, info in entries.items():
        dtype, shape = _ST_DTYPES[info["dtype"]], info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise AdapterFileError(f"{path}: tensor {key!r} has no valid shape ({shape!r})")
        start, end = info["data_offsets"]
        numel = 1
        for d in shape:
            numel *= d
        item = dtype.itemsize
        if end - start != numel * item:
            raise AdapterFileError(f"{path}: tensor {key!r} of shape {shape} in {info['dtype']} needs "
                                   f"{numel * item} bytes, the file gives it {end - start}")
        if start % item:  # not aligned for its dtype (an old writer): its own aligned copy
            out[key] = raw[start:end].clone().view(dtype).view(shape)
            continue
        base = typed.get(dtype)
        if base is None:
            base = typed[dtype] = raw[:len(raw) - len(raw) % item].view(dtype)
        strides, acc = [], 1
        for d in reversed(shape):
            strides.append(acc)
            acc *= max(d, 1)
        view = base.as_strided(shape, strides[::-1], start // item)
        # integer tensors (RNG states, step counts) get their own storage: torch's generators read a state from
        # the start of its storage, not from a view's offset; they are a few bytes
        out[key] = view if dtype.is_floating_point else view.clone()
    return out


def read_safetensors(path: str | os.PathLike, check_finite: bool = True) -> tuple[dict[str, torch.Tensor],
                                                                                 dict[str, str]]:
    """Load tensors and metadata from a .safetensors file after validating it.

    Raises AdapterFileError for pickles, truncated files, bad headers, and (with check_finite) NaN/Inf tensors,
    naming the offending tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header, header_len = read_header(path)
    try:
        tensors = _tensors_from_data(path, header, header_len)
        if tensors is None:
            tensors = load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{path}: could not read tensors ({e})") from None
    if check_finite:
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
            raise AdapterFileError(f"{path}: {len(bad)} tensor(s) contain NaN/Inf: {', '.join(bad[:5])}{more}")
    return tensors, dict(header.get("__metadata__", {}))
