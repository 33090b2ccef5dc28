"""File I/O primitives: atomic writes and the cleanup of killed ones (:mod:`~crossret.storage.atomic`),
hardened readers for untrusted ``.npy`` / ``.npz`` / JSON / YAML files (:mod:`~crossret.storage.safe_read`),
and the checksummed container of checkpoints, saved methods and indexes (:mod:`~crossret.storage.sealed`).

Names are imported lazily so that ``import crossret.storage`` stays cheap (no numpy until a reader is used).
"""

from __future__ import annotations

from crossret.lazy_exports import lazy_getattr

_ATOMIC = ("atomic_open", "fsync_directory", "is_temporary_name", "remove_stale_temporaries", "save_npy_atomic",
           "to_jsonable", "umask", "write_bytes_atomic", "write_json_atomic", "write_text_atomic",
           "write_yaml_atomic")
_SAFE_READ = ("DEFLATE_MAX_RATIO", "NpyHeader", "check_npy_file", "check_zip_member", "load_npy", "load_npz_array",
              "npz_headers", "npz_members", "read_json_file", "read_npy_header", "read_yaml_mapping")
_SEALED = ("Container", "Wording", "is_sealed", "is_zip_file", "load_torch", "open_payload", "save_torch",
           "verify_zip", "write_sealed")

_EXPORTS = {
    **dict.fromkeys(_ATOMIC, "crossret.storage.atomic"),
    **dict.fromkeys(_SAFE_READ, "crossret.storage.safe_read"),
    **dict.fromkeys(_SEALED, "crossret.storage.sealed"),
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("crossret.storage", _EXPORTS)
