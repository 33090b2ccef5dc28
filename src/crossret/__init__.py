"""crossret: unsupervised domain-adaptive retrieval.

A labelled source collection and an unlabelled target collection go in; a retrieval model that
works on the target comes out, with an index to search it. See ``docs/architecture.md``.
"""

from crossret.errors import CrossretError, DataError

__version__ = "0.1.0"

__all__ = ["CrossretError", "DataError", "__version__"]
