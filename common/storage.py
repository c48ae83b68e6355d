"""Paths and URIs through `pyarrow.fs`: a location is a local path (which every node must see at that same path,
e.g. a shared mount) or a URI (`file://`, `s3://`, `gs://`, `hdfs://`: whatever the installed pyarrow supports).

Libraries that need files on local disk (DeepSpeed checkpoints, vLLM and transformers model folders) get them
through a per-node staging folder: `CORESEG_STAGE_DIR`, default `<tmp>/coreseg-stage-<uid>`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, List, Tuple

import pyarrow as pa
import pyarrow.fs as pafs

STAGE_ENV = "CORESEG_STAGE_DIR"
TMP_SUFFIX = ".tmp"


class StorageError(OSError):
    """A location cannot be opened, read or written; the message names it."""


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def resolve(location: str | os.PathLike) -> Tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or URI."""
    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise StorageError(f"{location}: cannot be opened ({str(err).splitlines()[0]})") from None


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location` / parts, keeping a URI a URI."""
    location = str(location)
    if is_uri(location):
        return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location, *parts))


def kind(location: str) -> str:
    """'file', 'dir' or 'missing'."""
    fs, path = resolve(location)
    found = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(found, "missing")


def exists(location: str) -> bool:
    return kind(location) != "missing"


def read_text(location: str) -> str:
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except (pa.ArrowException, OSError) as err:
        raise StorageError(f"{location}: cannot be read ({str(err).splitlines()[0]})") from None


def write_text(location: str, text: str) -> None:
    """`location` holds its old content or `text`, never a part: a sibling NAME.tmp is written, then moved (a
    rename on local disks; an object store makes the moved object visible whole)."""
    fs, path = resolve(location)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = path + TMP_SUFFIX
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    if isinstance(fs, pafs.LocalFileSystem):
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    fs.move(tmp, path)


def list_dir(location: str) -> List[str]:
    """Names of the entries directly inside a folder ([] when it does not exist)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)))


def delete_dir(location: str) -> None:
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def copy_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Every file under folder `src` to folder `dst` (either a local path or a URI); symlinks are followed."""
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    if src_fs.get_file_info(src_path).type != pafs.FileType.Directory:
        raise StorageError(f"{src}: no such folder")
    dst_fs.create_dir(dst_path, recursive=True)
    try:
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
    except (pa.ArrowException, OSError) as err:
        raise StorageError(f"copying {src} to {dst} failed ({str(err).splitlines()[0]})") from None


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    dst_fs.create_dir(dst_path.rsplit("/", 1)[0], recursive=True)
    try:
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
    except (pa.ArrowException, OSError) as err:
        raise StorageError(f"copying {src} to {dst} failed ({str(err).splitlines()[0]})") from None


def move_dir(src: str, dst: str) -> None:
    """Folder `src` becomes `dst` (same filesystem): a rename where the filesystem has one, else copy + delete."""
    fs, src_path = resolve(src)
    _, dst_path = resolve(dst)
    try:
        fs.move(src_path, dst_path)
    except (pa.ArrowException, OSError, NotImplementedError):
        copy_dir(src, dst)
        fs.delete_dir(src_path)


def stage_dir() -> Path:
    """This node's local staging folder."""
    root = os.environ.get(STAGE_ENV) or os.path.join(tempfile.gettempdir(), f"coreseg-stage-{os.getuid()}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(location: str) -> str:
    """Path, size and modification time of every file under `location`: a staged copy is reused only while
    this is unchanged (a run folder deleted and written again at the same URI is downloaded again)."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    infos = ([info] if info.type != pafs.FileType.Directory
             else fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    return ";".join(f"{i.path}:{i.size}:{i.mtime_ns}" for i in sorted(infos, key=lambda i: i.path)
                    if i.type == pafs.FileType.File)


def staged_copy(location: str | os.PathLike) -> Path:
    """A local file or folder with the content of `location`: a local path as it is; a URI downloaded once per
    node into the staging folder (into a temporary sibling first, renamed when complete, so a killed download is
    never taken for a finished one), and downloaded again when its files change (`fingerprint`)."""
    location = str(location)
    if not is_uri(location):
        return Path(location)
    found = kind(location)
    if found == "missing":
        raise StorageError(f"{location} does not exist")
    digest = hashlib.sha1((location + fingerprint(location)).encode()).hexdigest()[:16]
    out = stage_dir() / "uri" / f"{Path(location.rstrip('/')).name}-{digest}"
    if out.exists():
        return out
    tmp = out.with_name(f"{out.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        (copy_file if found == "file" else copy_dir)(location, tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process on this node finished the same download first
            if not out.exists():
                raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return out


def local_file(value: str) -> str:
    """A config value naming a file (a checkpoint, an embedding file) as a local path: "" and local paths as
    they are, a URI downloaded once to this node's staging folder."""
    return str(staged_copy(value)) if value and is_uri(value) else value


@contextlib.contextmanager
def writable_folder(location: str | os.PathLike) -> Iterator[Path]:
    """A local folder to write into whose files end up in `location`: the folder itself when local; for a URI a
    fresh staging folder, uploaded when the block ends without an error and removed either way."""
    location = str(location)
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    local = stage_dir() / "upload" / uuid.uuid4().hex
    local.mkdir(parents=True)
    try:
        yield local
        copy_dir(local, location)
    finally:
        shutil.rmtree(local, ignore_errors=True)
