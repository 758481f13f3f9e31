"""ModelExpress client errors and the small values shared by the client and its snapshot writer."""

from __future__ import annotations

from collections.abc import Callable

import attrs

WantFn = Callable[[str, int], bool]
"""The caller's choice of files: ``want(path, size)``."""


class ModelExpressError(Exception):
    """Any failure talking to ModelExpress."""


class ModelExpressUnavailable(ModelExpressError):
    """The server cannot be reached (down, refused, DNS)."""


class ModelExpressNotFound(ModelExpressError):
    """The server does not have (and cannot get) the model, the revision or the requested files."""


class ModelExpressUnsupported(ModelExpressError):
    """The server cannot do what was asked (e.g. it predates pinned revisions)."""


class ModelExpressProtocolError(ModelExpressError):
    """The server sent something invalid: an unsafe path, wrong offsets or sizes, unexpected files."""


@attrs.frozen
class RemoteFile:
    path: str
    size: int
