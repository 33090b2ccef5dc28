"""crossret: unsupervised domain-adaptive retrieval.

A labelled source collection and an unlabelled target collection go in; a retrieval model that
works on the target comes out, with an index to search it. See ``docs/architecture.md``.

``crossret.fit`` / ``crossret.load`` (:mod:`crossret.model`) are imported on first use, so
``import crossret`` stays light (no torch).
"""

from crossret.errors import CrossretError, DataError
from crossret.lazy_exports import lazy_getattr

__version__ = "0.1.0"

__all__ = ["CrossretError", "DataError", "FittedModel", "__version__", "fit", "load"]

__getattr__ = lazy_getattr(__name__, {"fit": "crossret.model", "load": "crossret.model",
                                      "FittedModel": "crossret.model"})
