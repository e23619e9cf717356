"""Domain errors. ``cli.py`` alone turns them into ``Error: ...`` lines and exit code 1.

Every error names the config key (or file) it is about, so the message reads
``<key>: <what is wrong, with the bad value>``. They are plain ``Exception``
subclasses with picklable state, so that Ray re-raises them on the driver as
themselves.
"""

from __future__ import annotations


def brief(err: BaseException, limit: int = 200) -> str:
    """An exception as ``Type: first line``, cut to ``limit`` characters, for one-line messages."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PipelineError(Exception):
    """Base class of every error the pipeline raises on purpose."""

    def __init__(self, key: str, message: str) -> None:
        # One line, whatever the cause said: messages quote exceptions that may span lines.
        message = " ".join(str(message).split())
        super().__init__(key, message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(PipelineError):
    """The config file or one of its values is wrong."""


class DataError(PipelineError):
    """An input (x1, x2) cannot be read or does not fit the model."""


class ModelError(PipelineError):
    """The model cannot be built, loaded or run."""


class StoreError(PipelineError):
    """The output store exists, cannot be written, or holds something else."""


class BlockError(PipelineError):
    """A block failed for good; the finished blocks are kept."""
