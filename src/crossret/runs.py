"""Run directories: create, lock, resume, replace and read them, and never touch what crossret did not write.

Every command that writes a run directory (``crossret run``, ``demo``, ``gckd pretrain|adapt``) goes through
:func:`open_run`; every reader of a run's files (``serve``, ``index build --run``, ``index encode``,
``report``) through :func:`run_file` / :func:`find_model_file`::

    handle = open_run("runs/itq", "hashing", overwrite=False, resume=False)
    try:
        ...                         # write every file into handle.path, metrics.json last
        handle.commit()             # --overwrite: the new run replaces the old one only now
    except BaseException:
        handle.abort()              # --overwrite: the staging directory goes, the old run stays
        raise
    finally:
        handle.release()

Rules:

* crossret marks the directories it creates with :data:`MARKER` (JSON: ``format``, ``kind``, the
  crossret version, the creation time). Only marked directories are ever cleaned, resumed or replaced.
  A new path or an empty directory becomes a run; a non-empty directory without the marker is refused,
  and so are the file-system root, the home directory and anything that is not a directory.
* A run holds an advisory lock (``fcntl.flock`` on :data:`LOCK`, non-blocking, the holder's PID
  written in it) from :func:`open_run` to :meth:`RunDirectory.release`: a second process on the same
  directory is refused with that PID.
* ``metrics.json``, written last, marks a finished run. A finished run is replaced only with
  ``overwrite``; an interrupted one (marker, no ``metrics.json``) is continued only with ``resume`` or
  replaced only with ``overwrite``.
* ``overwrite`` builds the new run in a hidden sibling (``.NAME.crossret-new-XXXXXXXX``, same file
  system) and swaps it in on success; a failure or an interruption removes the sibling and leaves the
  old run as it was.
* The files of a run (:data:`RUN_ENTRIES`, ``checkpoints/*``) are never read or written through
  symbolic links.

Output files that are not run directories (indexes, packed codes, plots, search results) are checked
by :func:`check_output_file`: an existing file is replaced only with ``overwrite`` and only when its
content shows it is crossret's own file of that kind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import logging
import os
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from crossret.errors import ConfigError, DataError, FileFormatError
from crossret.storage.atomic import fsync_directory as _fsync_directory
from crossret.storage.atomic import remove_stale_temporaries, write_json_atomic
from crossret.storage.atomic import umask as _umask
from crossret.storage.safe_read import read_json_file

__all__ = [
    "KINDS",
    "LOCK",
    "MARKER",
    "OUTPUT_KINDS",
    "RUN_ENTRIES",
    "RunDirectory",
    "attach_run_log",
    "check_output_file",
    "check_run_target",
    "detach_run_log",
    "find_model_file",
    "open_run",
    "read_marker",
    "run_file",
    "run_kind",
]

#: The marker file crossret writes into every run directory it creates.
MARKER = ".crossret-run"
#: The lock file a running process holds (``fcntl.flock``) for the whole run.
LOCK = ".crossret-lock"
MARKER_FORMAT = "crossret-run"
#: Kinds of run directories: ``crossret run`` / ``demo``, ``crossret gckd pretrain|adapt`` and ``crossret fit``.
KINDS = ("hashing", "gckd", "model")
#: The file written last into a run of each kind: its presence marks a finished run.
DONE_FILES = {"hashing": "metrics.json", "gckd": "metrics.json", "model": "diagnostics.json"}
MODEL_FILES = ("model.npz", "model.pt")
#: The top-level entries of a run directory; crossret never follows a symbolic link at these names.
RUN_ENTRIES = ("config.yaml", "metrics.json", "diagnostics.json", "run.log", "codes", "checkpoints", "plots",
               "vocab.txt", *MODEL_FILES, MARKER, LOCK)
_STAGING = ".crossret-new-"
_ASIDE = ".crossret-old-"
_MAX_MARKER_BYTES = 4096

Mode = str  # "create" | "adopt" | "resume" | "replace"


# ---------------------------------------------------------------------------------------------- marker and lock
def read_marker(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of ``run_dir`` (``None`` when there is none); a marker that is a link, not a regular
    file or not crossret's is a :class:`FileFormatError`."""
    path = Path(run_dir) / MARKER
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(info.st_mode):
        raise FileFormatError(f"{path}: the run marker is not a regular file (a link or a folder); remove the "
                              "directory yourself or choose another --out")
    data = read_json_file(path, "run marker", max_bytes=_MAX_MARKER_BYTES)
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT or data.get("kind") not in KINDS:
        raise FileFormatError(f"{path}: not a crossret run marker; remove the directory yourself or choose another "
                              "--out")
    return data


def _write_marker(run_dir: Path, kind: str) -> None:
    from crossret import __version__

    write_json_atomic(run_dir / MARKER, {
        "format": MARKER_FORMAT, "kind": kind, "crossret_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


class _Lock:
    """An exclusive, non-blocking ``flock`` on ``DIR/.crossret-lock`` holding this process's PID."""

    def __init__(self, fd: int, path: Path, created: bool) -> None:
        self.fd: int | None = fd
        self.path = path
        self.created = created

    @classmethod
    def acquire(cls, run_dir: Path, shown: Path) -> _Lock:
        path = run_dir / LOCK
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        created = not os.path.lexists(path)
        try:
            fd = os.open(path, flags, 0o666 & ~_umask())
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FileFormatError(f"{shown / LOCK}: is a symbolic link; crossret never writes through links: "
                                      "remove it") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise ConfigError(f"--out {shown} is in use by another crossret process (PID {pid}); wait for it to "
                              "finish or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path, created)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return "unknown"
    return text if text.isdigit() else "unknown"


def _probe_lock(run_dir: Path, shown: Path) -> None:
    """Refuse when another process holds the run's lock; changes nothing (no file is created)."""
    path = run_dir / LOCK
    if not os.path.lexists(path):
        return
    if os.path.islink(path):
        raise FileFormatError(f"{shown / LOCK}: is a symbolic link; crossret never writes through links: remove it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # unreadable here: open_run's exclusive lock decides
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"--out {shown} is in use by another crossret process (PID {_holder(fd)}); wait for it "
                          "to finish or choose another --out") from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- inspection
def _check_options(overwrite: bool, resume: bool, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if overwrite and resume:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the interrupted run in "
                          "--out, --overwrite replaces it; give one")


def _check_target(path: Path, shown: Path) -> None:
    """Refuse the file-system root, the home directory, links and anything that is not a directory."""
    if path.is_symlink():
        raise ConfigError(f"--out {shown} is a symbolic link; give the directory it points to ({path.resolve()})")
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise ConfigError(f"--out {shown} is the file-system root; give a new or empty directory for the run")
    with contextlib.suppress(RuntimeError, KeyError):  # no home directory: nothing to protect
        if resolved == Path.home().resolve():
            raise ConfigError(f"--out {shown} is your home directory; give a new or empty directory for the run")
    if os.path.lexists(path) and not path.is_dir():
        raise ConfigError(f"--out {shown} exists and is not a directory; give a new or empty directory for the run")


def _entries(path: Path) -> list[str] | None:
    """The names in ``path`` (``None`` when it does not exist)."""
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return None


def _decide(path: Path, shown: Path, kind: str, overwrite: bool, resume: bool) -> Mode:
    """What to do with ``path``: ``create`` / ``adopt`` (an empty directory) / ``resume`` / ``replace``;
    every case crossret must not touch is a :class:`ConfigError` saying what to do instead."""
    names = _entries(path)
    if names is None:
        return "create"
    marker = read_marker(path)
    if marker is None:
        if not [n for n in names if n != LOCK]:
            return "adopt"
        raise ConfigError(
            f"--out {shown} is a non-empty directory without the {MARKER} marker: crossret did not create it (or an "
            "older crossret wrote it, whose runs are still read by serve, report and index build --run); crossret "
            "never writes into or deletes such folders: choose a new or empty directory (delete an old run "
            "yourself if you no longer need it)")
    if resume and marker["kind"] != kind:
        raise ConfigError(f"--resume: {shown} holds a {marker['kind']} run, not a {kind} run; choose its own command "
                          "or another --out")
    done = DONE_FILES[marker["kind"]]
    if done in names:
        if overwrite:
            return "replace"
        raise ConfigError(f"--out {shown} already holds a finished run ({done}); choose another directory "
                          "or pass --overwrite")
    if resume:
        return "resume"
    if overwrite:
        return "replace"
    raise ConfigError(f"--out {shown} holds an interrupted run (no {done}); pass --resume to continue it "
                      "or --overwrite to replace it")


def _refuse_links(path: Path, shown: Path) -> None:
    """A run's own files and ``checkpoints/*`` must not be symbolic links (they could lead anywhere)."""
    names = [*RUN_ENTRIES, *(n for n in _entries(path) or [] if n.startswith("model."))]
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        names += [f"checkpoints/{n}" for n in os.listdir(checkpoints)]
    for name in names:
        if os.path.islink(path / name):
            raise FileFormatError(f"{shown / name}: is a symbolic link; crossret never reads or writes a run's files "
                                  "through links: replace it with the real file or folder, or choose another --out")


def check_run_target(path: str | os.PathLike, kind: str, *, overwrite: bool = False, resume: bool = False) -> str:
    """Check, without changing anything, that :func:`open_run` would accept ``path``; returns what it
    would do (``create``, ``adopt``, ``resume`` or ``replace``). For early refusals, before slow work."""
    _check_options(overwrite, resume, kind)
    shown = Path(path)
    target = Path(os.path.abspath(shown))
    _check_target(target, shown)
    if read_marker(target) is not None:
        _probe_lock(target, shown)
    mode = _decide(target, shown, kind, overwrite, resume)
    if mode in ("resume", "replace"):
        _refuse_links(target, shown)
    return mode


# ---------------------------------------------------------------------------------------------- the handle
class RunDirectory:
    """An open run directory: its lock is held until :meth:`release`.

    ``path`` is where this run writes (``final`` itself, or the staging sibling under ``overwrite``
    until :meth:`commit`); ``final`` is the directory the user named; ``mode`` is ``create``, ``adopt``,
    ``resume`` or ``replace``.
    """

    def __init__(self, final: Path, path: Path, mode: Mode, locks: list[_Lock]) -> None:
        self.final = final
        self.path = path
        self.mode = mode
        self._locks = locks
        self._committed = mode != "replace"

    def commit(self) -> Path:
        """Make the finished run the one at ``final`` (``replace``: swap it in and remove the old run)."""
        if self._committed:
            return self.final
        old = _swap(self.path, self.final)
        self._committed = True
        self.path = self.final
        try:
            marked = read_marker(old) is not None
        except FileFormatError:  # its marker was changed meanwhile: leave it where it is
            marked = False
        if marked:  # the previous run, marked by crossret: safe to delete
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        """After a failure: remove the staging directory of an uncommitted ``replace`` (the old run is
        untouched). A created, adopted or resumed run is kept as an interrupted run (``--resume``)."""
        if not self._committed and self.path != self.final:
            shutil.rmtree(self.path, ignore_errors=True)
            self._committed = True

    def release(self) -> None:
        """Release the lock (idempotent)."""
        for lock in self._locks:
            lock.release()
        self._locks = []

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:
                self.abort()
        finally:
            self.release()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap(staging: Path, final: Path) -> Path:
    """Put ``staging`` at ``final``; returns where the previous ``final`` now is."""
    if not _exchange(staging, final):
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}{_ASIDE}", dir=final.parent))
        os.rename(final, aside)  # replaces the empty directory mkdtemp made
        try:
            os.rename(staging, final)
        except BaseException:
            os.rename(aside, final)
            raise
        staging = aside
    _fsync_directory(final.parent)
    return staging


def _new_dir(final: Path, kind: str) -> tuple[Path, _Lock]:
    """A marked, locked hidden sibling of ``final`` (same file system, so it can be renamed into place)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}{_STAGING}", dir=final.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes a private 0700 folder
        lock = _Lock.acquire(staging, staging)
        _write_marker(staging, kind)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, lock


def _remove_stale_siblings(final: Path) -> None:
    """Staging siblings of ``final`` left by killed ``overwrite`` runs: marked, and no process holds
    their lock. Called only while ``final`` is an existing, locked run."""
    for prefix in (f".{final.name}{_STAGING}", f".{final.name}{_ASIDE}"):
        for sibling in final.parent.glob(f"{glob.escape(prefix)}*"):
            if sibling.is_symlink() or not sibling.is_dir():
                continue
            try:
                if read_marker(sibling) is None:
                    continue
                lock = _Lock.acquire(sibling, sibling)
            except (ConfigError, FileFormatError, OSError):
                continue  # in use or not ours: leave it
            lock.release()
            shutil.rmtree(sibling, ignore_errors=True)


def _clean_for_resume(path: Path) -> None:
    """Before continuing an interrupted run in place: drop its partial results (codes, plots, model) and
    the temporaries of killed writes; keep checkpoints, config.yaml, vocab.txt and run.log."""
    (path / "metrics.json").unlink(missing_ok=True)
    (path / "diagnostics.json").unlink(missing_ok=True)
    for name in ("codes", "plots"):
        if (path / name).is_dir():
            shutil.rmtree(path / name)
    for name in os.listdir(path):
        if name.startswith("model.") and (path / name).is_file():
            (path / name).unlink()
    remove_stale_temporaries(path, path / "checkpoints")


def open_run(path: str | os.PathLike, kind: str, *, overwrite: bool = False, resume: bool = False,
             check_resume: Callable[[Path], None] | None = None) -> RunDirectory:
    """Open ``path`` as a run directory of ``kind`` (``hashing``, ``gckd`` or ``model``) under its lock.

    A new path is created marked and locked (built as a hidden sibling and renamed into place); an
    empty directory is adopted. An interrupted run is continued in place with ``resume`` (after
    ``check_resume(path)``, e.g. the same configuration, and after its partial results are removed);
    a finished or interrupted run is replaced with ``overwrite``. Everything else is refused (see the
    module docstring); a refusal changes nothing.
    """
    _check_options(overwrite, resume, kind)
    shown = Path(path)
    final = Path(os.path.abspath(shown))
    for _ in range(3):
        _check_target(final, shown)
        mode = _decide(final, shown, kind, overwrite, resume)
        if mode == "create":
            staging, lock = _new_dir(final, kind)
            try:
                os.rename(staging, final)  # fails when a non-empty final appeared meanwhile
            except OSError as exc:
                lock.release()
                shutil.rmtree(staging, ignore_errors=True)
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    continue
                raise
            _fsync_directory(final.parent)
            return RunDirectory(final, final, "create", [lock])
        lock = _Lock.acquire(final, shown)
        try:
            mode = _decide(final, shown, kind, overwrite, resume)  # again, now that no one else can change it
            if mode == "create":  # removed meanwhile
                lock.release()
                continue
            if mode == "adopt":
                _write_marker(final, kind)
                return RunDirectory(final, final, "adopt", [lock])
            _refuse_links(final, shown)
            _remove_stale_siblings(final)
            if mode == "resume":
                if check_resume is not None:
                    check_resume(final)
                _clean_for_resume(final)
                return RunDirectory(final, final, "resume", [lock])
            staging, staging_lock = _new_dir(final, kind)
            return RunDirectory(final, staging, "replace", [lock, staging_lock])
        except BaseException:
            lock.release()
            if lock.created and not os.path.lexists(final / MARKER):  # refused an unmarked folder: leave it as it was
                with contextlib.suppress(OSError):
                    os.unlink(lock.path)
            raise
    raise ConfigError(f"--out {shown} kept changing while the run started; is another program writing there?")


# ---------------------------------------------------------------------------------------------- reading runs
def run_file(run_dir: str | os.PathLike, *parts: str) -> Path:
    """``run_dir/parts...``, refusing a symbolic link at any part below ``run_dir`` (the run directory
    itself may be a link): a run's files are never read through links that could lead anywhere."""
    path = Path(run_dir)
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise FileFormatError(f"{path}: is a symbolic link; crossret reads a run's files only as real files "
                                  "inside the run directory: replace it with the file itself")
    return path


def run_kind(run_dir: str | os.PathLike) -> str | None:
    """The kind of run in ``run_dir``: ``hashing`` or ``gckd`` from its marker; for a run without one
    (an older crossret), ``gckd`` when it holds ``vocab.txt`` and ``model.pt``, ``hashing`` when it
    holds ``codes/``; ``None`` when it is neither."""
    marker = read_marker(run_dir)
    if marker is not None:
        return str(marker["kind"])
    if run_file(run_dir, "vocab.txt").is_file() and run_file(run_dir, "model.pt").is_file():
        return "gckd"
    if run_file(run_dir, "codes").is_dir():
        return "hashing"
    return None


def find_model_file(run_dir: str | os.PathLike) -> Path | None:
    """The fitted method of a run (``model.npz`` or ``model.pt``); ``None`` when the run saved none.
    Two model files are a :class:`DataError`; a linked one a :class:`FileFormatError`."""
    found = [path for name in MODEL_FILES if (path := run_file(run_dir, name)).is_file()]
    if len(found) > 1:
        raise DataError(f"{run_dir}: several model files ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


class _RunLogHandler(logging.StreamHandler):
    """A log handler appending to ``run.log``, opened without following a symbolic link."""

    def close(self) -> None:
        try:
            self.acquire()
            try:
                stream = self.stream
                if stream is not None and not stream.closed:
                    stream.close()
            finally:
                self.release()
        finally:
            super().close()


def attach_run_log(run_dir: Path) -> logging.Handler:
    """Append crossret's log to ``run_dir/run.log`` (refused when ``run.log`` is a symbolic link)."""
    path = run_dir / "run.log"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     0o666 & ~_umask())
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileFormatError(f"{path}: is a symbolic link; crossret never writes a run's log through links: "
                                  "remove it") from None
        raise
    stream: IO[str] = os.fdopen(fd, "a", encoding="utf-8")
    handler = _RunLogHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("crossret")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def detach_run_log(handler: logging.Handler | None) -> None:
    """Stop writing the log to a run's ``run.log`` (``None``: nothing attached)."""
    if handler is not None:
        logging.getLogger("crossret").removeHandler(handler)
        handler.close()


# ---------------------------------------------------------------------------------------------- output files
#: Kinds of output files :func:`check_output_file` recognises, and how a message names them.
OUTPUT_KINDS = {"index": "crossret index (.crbi or Milvus locator)", "codes": "crossret packed-codes file",
                "plot": "crossret plot", "search": "crossret search-results file"}
_PNG = b"\x89PNG\r\n\x1a\n"
#: The PNG ``Software`` text crossret's plots carry (crossret.report.plots).
PLOT_SOFTWARE = "crossret"


def _starts_with(path: Path, prefixes: tuple[bytes, ...]) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(max(len(p) for p in prefixes))
    except OSError:
        return False
    return any(head.startswith(p) for p in prefixes)


def _is_index(path: Path) -> bool:
    """An index file crossret wrote: a ``.crbi`` of either type, or the locator of a Milvus collection."""
    from crossret.retrieval.index import INDEX_MAGICS
    from crossret.retrieval.milvus import LOCATOR_PREFIX

    return _starts_with(path, (*INDEX_MAGICS, LOCATOR_PREFIX))


def _is_sidecar(path: Path) -> bool:
    from crossret.retrieval.streaming import SIDECAR_FORMAT

    try:
        record = read_json_file(path, "sidecar", max_bytes=_MAX_MARKER_BYTES * 16)
    except FileFormatError:
        return False
    return isinstance(record, dict) and record.get("format") == SIDECAR_FORMAT


def _is_packed_codes(path: Path) -> bool:
    from crossret.retrieval.streaming import sidecar_path

    return _starts_with(path, (b"\x93NUMPY",)) and _is_sidecar(sidecar_path(path))


def _is_plot(path: Path) -> bool:
    """A PNG whose ``Software`` text chunk (before the image data) names crossret."""
    try:
        with open(path, "rb") as handle:
            if handle.read(8) != _PNG:
                return False
            for _ in range(64):
                head = handle.read(8)
                if len(head) < 8:
                    return False
                length, chunk = struct.unpack(">I4s", head)
                if chunk in (b"IDAT", b"IEND"):
                    return False
                if chunk == b"tEXt" and length <= 4096:
                    key, _, value = handle.read(length).partition(b"\0")
                    if key == b"Software" and value.decode("latin-1").startswith(PLOT_SOFTWARE):
                        return True
                    handle.seek(4, os.SEEK_CUR)
                else:
                    handle.seek(length + 4, os.SEEK_CUR)
    except (OSError, struct.error):
        return False
    return False


def _is_search_results(path: Path) -> bool:
    from crossret.storage.safe_read import npz_members

    try:
        return set(npz_members(path)) == {"distances", "ids"}
    except Exception:  # any unreadable file is simply not ours
        return False


_OWNERS: dict[str, Callable[[Path], bool]] = {"index": _is_index, "codes": _is_packed_codes, "plot": _is_plot,
                                              "search": _is_search_results}


def check_output_file(path: str | os.PathLike, kind: str, *, overwrite: bool = False, option: str = "--out") -> None:
    """Refuse to write the ``kind`` output file ``path`` (see :data:`OUTPUT_KINDS`) over an existing
    file, unless ``overwrite`` is given and the existing file is crossret's own file of that kind
    (recognised by its content: an index's magic bytes, packed codes' crossret sidecar, a plot's PNG
    ``Software`` tag, search results' two arrays). Links and directories are always refused. For
    packed codes the sidecar ``PATH.json`` is checked too."""
    if kind not in _OWNERS:
        raise ValueError(f"kind must be one of {sorted(_OWNERS)}, got {kind!r}")
    path = Path(path)
    paths = [path]
    if kind == "codes":
        from crossret.retrieval.streaming import sidecar_path

        paths.append(sidecar_path(path))
    what = OUTPUT_KINDS[kind]
    for target in paths:
        if not os.path.lexists(target):
            continue
        if target.is_symlink():
            raise ConfigError(f"{option} {target} is a symbolic link; crossret does not replace links: choose another "
                              "path")
        if target.is_dir():
            raise ConfigError(f"{option} {target} is a directory; give the path of a file to write")
        if not overwrite:
            raise ConfigError(f"{option} {target} already exists; pass --overwrite to replace it, or choose another "
                              "path")
        own = _is_sidecar(target) if target is not path else _OWNERS[kind](target)
        if not own:
            raise ConfigError(f"{option} {target} exists and is not a {what}; crossret never replaces files it did "
                              "not write, even with --overwrite: choose another path")
