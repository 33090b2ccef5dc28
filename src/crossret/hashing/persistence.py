"""Saving and loading fitted hashing methods: one place for the file format.

:class:`PersistentMethod` gives a method ``save`` / ``load``; loading a file of any method, chosen by
the name it records, is :func:`crossret.hashing.registry.load_method`.

A fitted method is one sealed file (:mod:`crossret.storage.sealed`: kind, format version, size and SHA-256
verified before parsing), written atomically, whose payload never executes code when read:

* ``npz`` storage (LSH, ITQ): ``numpy.savez`` of the method's arrays plus ``__header__``, a uint8
  array holding UTF-8 JSON; read with ``allow_pickle=False``.
* ``torch`` storage (networks): ``torch.save`` of ``{"header": json_str, "arrays": {name: tensor},
  "state_dict": module.state_dict()}``; read with ``torch.load(weights_only=True)``.

The JSON header holds ``format``, ``version``, ``method``, ``bits``, ``seed``, ``input_dim``,
``config`` (the method's dataclass as plain types) and ``diagnostics``. Anything unreadable,
truncated, foreign, of the wrong method or of a newer format version raises
:class:`~crossret.errors.FileFormatError` naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np

from crossret.errors import ConfigError, FileFormatError
from crossret.storage.atomic import to_jsonable
from crossret.storage.safe_read import read_npy_header
from crossret.storage.sealed import open_payload, write_sealed

FORMAT_NAME = "crossret.hashing.method"
FORMAT_VERSION = 1
_HEADER_KEY = "__header__"


def _header(method: Any) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "method": method.name,
        "bits": method.bits,
        "seed": method.seed,
        "input_dim": method.input_dim,
        "config": dataclasses.asdict(method.config),
        "diagnostics": to_jsonable(method.diagnostics),
    }


def _check_header(header: Any, path: Path, expected_method: str | None) -> dict[str, Any]:
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise FileFormatError(f"{path}: not a crossret hashing-method file (no '{FORMAT_NAME}' header)")
    version = header.get("version")
    if not isinstance(version, int) or version < 1:
        raise FileFormatError(f"{path}: invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{path}: format version {version} was written by a newer crossret "
            f"(this one reads up to {FORMAT_VERSION}); upgrade crossret to load it"
        )
    method = header.get("method")
    if expected_method is not None and method != expected_method:
        raise FileFormatError(f"{path}: holds a fitted {method!r} method, not {expected_method!r}")
    for key, kind in (("bits", int), ("seed", int), ("input_dim", int), ("config", dict)):
        if not isinstance(header.get(key), kind):
            raise FileFormatError(f"{path}: header field {key!r} is missing or malformed")
    return header


def _read_npz(stream: BinaryIO, where: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    # numpy allocates an npz member's declared shape before reading it: check every header first.
    with zipfile.ZipFile(stream) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                read_npy_header(member, f"{where}: {info.filename}", info.file_size, error=FileFormatError)
    stream.seek(0)
    with np.load(stream, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    raw = arrays.pop(_HEADER_KEY)
    return json.loads(raw.astype(np.uint8).tobytes().decode("utf-8")), arrays


def _read_torch(stream: BinaryIO) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    import torch

    payload = torch.load(stream, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or not isinstance(payload.get("header"), str):
        raise ValueError("no header")
    arrays = {str(k): v.numpy() for k, v in dict(payload.get("arrays", {})).items()}
    state_dict = dict(payload.get("state_dict", {}))
    return json.loads(payload["header"]), arrays, state_dict


def _storage_of(stream: BinaryIO) -> str:
    """``npz`` or ``torch``: both are zip archives; an npz names its members ``*.npy``."""
    with zipfile.ZipFile(stream) as archive:
        names = archive.namelist()
    stream.seek(0)
    return "npz" if f"{_HEADER_KEY}.npy" in names else "torch"


def read_method_file(
    path: str | os.PathLike, expected_method: str | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """Read ``(header, arrays, state_dict)`` from a saved method; ``state_dict`` is empty for npz."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file (expected a method saved with .save())")
    # Size and SHA-256 are verified before anything is parsed; files from before the sealed container
    # are read too, after their zip CRC-32s check out.
    with open_payload(path, FORMAT_NAME, FORMAT_VERSION, "saved crossret method") as (_, stream):
        try:
            if _storage_of(stream) == "npz":
                header, arrays = _read_npz(stream, str(path))
                state_dict: dict[str, Any] = {}
            else:
                header, arrays, state_dict = _read_torch(stream)
        except Exception as exc:  # any parse failure of an untrusted file is a format error
            raise FileFormatError(
                f"{path}: cannot read a saved crossret method ({type(exc).__name__}: {exc}); "
                "the file is corrupt, truncated or not a crossret file"
            ) from exc
    return _check_header(header, path, expected_method), arrays, state_dict


class PersistentMethod:
    """Mixin giving a :class:`~crossret.hashing.base.HashMethod` ``save`` / ``load``.

    Subclasses set ``storage`` and implement :meth:`_get_state` / :meth:`_set_state`; the state is
    a dict of numpy arrays (plus, for ``torch`` storage, a module ``state_dict``).
    """

    storage: ClassVar[str] = "npz"

    # Provided by HashMethod; declared for the type checker.
    name: ClassVar[str]
    config_class: ClassVar[type]
    bits: int
    seed: int
    config: Any
    input_dim: int | None
    diagnostics: dict[str, Any]

    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, state_dict)`` of the fitted method."""
        raise NotImplementedError

    def _set_state(self, arrays: dict[str, np.ndarray], state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`_get_state`'s output; raise ``KeyError``/``ValueError`` if malformed."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted method to ``path`` atomically; returns the path."""
        if self.input_dim is None:
            raise ConfigError(f"{self.name}: call fit() before save()")
        path = Path(path)
        header = json.dumps(_header(self))
        arrays, state_dict = self._get_state()
        buffer = io.BytesIO()
        if self.storage == "npz":
            blob = np.frombuffer(header.encode("utf-8"), dtype=np.uint8)
            np.savez(buffer, **{_HEADER_KEY: blob}, **arrays)
        else:
            import torch

            payload = {
                "header": header,
                "arrays": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
                "state_dict": state_dict,
            }
            torch.save(payload, buffer)
        return write_sealed(path, FORMAT_NAME, FORMAT_VERSION, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Any:
        """Load a method saved by :meth:`save` (of this class); corrupt files raise FileFormatError."""
        path = Path(path)
        header, arrays, state_dict = read_method_file(path, expected_method=cls.name)
        try:
            config = cls.config_class(**header["config"])
            method = cls(bits=header["bits"], seed=header["seed"], config=config)  # type: ignore[call-arg]
            method.input_dim = header["input_dim"]
            method.diagnostics = dict(header.get("diagnostics") or {})
            method._set_state(arrays, state_dict)
        except (TypeError, KeyError, ValueError, RuntimeError) as exc:
            raise FileFormatError(
                f"{path}: the saved {cls.name!r} state is inconsistent ({type(exc).__name__}: {exc})"
            ) from exc
        return method
