"""Previous import path of :mod:`crossret.hashing.persistence` and of ``load_method``, kept for one release:
import ``load_method`` from :mod:`crossret.hashing` instead."""

from __future__ import annotations

from crossret.hashing.persistence import FORMAT_NAME as FORMAT_NAME
from crossret.hashing.persistence import FORMAT_VERSION as FORMAT_VERSION
from crossret.hashing.persistence import PersistentMethod as PersistentMethod
from crossret.hashing.persistence import read_method_file as read_method_file
from crossret.hashing.registry import load_method as load_method
