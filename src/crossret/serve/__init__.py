"""Search service (optional extra ``serve``): a read-only FastAPI app over a trained run.

``create_app(run_dir, database="cross"|"single", index=None, limits=ServiceLimits(...))`` loads the
run's fitted model and database codes (or a saved ``.crbi`` index) and answers Hamming k-NN queries
by feature vectors, codes or item ids; ``crossret serve RUN_DIR`` runs it with uvicorn. See
docs/serve.md. ``create_text_app(gckd_run_dir, gallery=DATASET_DIR | index=GALLERY_INDEX)`` serves
text → image search with a GCKD run's model instead. :mod:`crossret.serve.state` (limits, snapshot,
query logic) needs no web framework.
"""

from __future__ import annotations

from crossret.lazy_exports import lazy_getattr

_EXPORTS = {
    "create_app": "crossret.serve.app",
    "build_app": "crossret.serve.app",
    "create_text_app": "crossret.serve.app",
    "build_text_app": "crossret.serve.app",
    "TextSearchState": "crossret.serve.text",
    "run_server": "crossret.serve.app",
    "require_serve_extra": "crossret.serve.app",
    "server_config": "crossret.serve.app",
    "ServerSettings": "crossret.serve.app",
    "ServiceLimits": "crossret.serve.state",
    "ServiceState": "crossret.serve.state",
    "RequestError": "crossret.serve.state",
    "Query": "crossret.serve.state",
    "load_snapshot": "crossret.serve.state",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("crossret.serve", _EXPORTS)
