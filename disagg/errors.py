"""The engine's error types. Each one is a user-facing condition with a message meant to be printed as it is
(the CLI prints it without a traceback); a bug in the engine is never one of these."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine reports to its user."""


class ModelLoadError(EngineError):
    """A model directory cannot be loaded: missing file, unsupported architecture or setting, bad weights."""


class ExportError(EngineError):
    """A KV export is refused: unreadable, truncated, corrupted, of an unknown format version, or for another
    model. Raised before any page of the importing pool is allocated."""


class RequestError(EngineError):
    """A request cannot be served (empty prompt, longer than the context or the pool); the others go on."""


class PoolFullError(EngineError):
    """The KV pool has fewer free pages than an allocation needs. Stages catch it and let the request wait."""


class DistributedError(EngineError):
    """A distributed run cannot go on: its ranks disagree (model, KV dtype, options) or a peer rank was lost."""
