"""Domain errors. ``cli.py`` alone turns them into ``Error: ...`` lines and exit code 1; SIGINT and
SIGTERM become ``Interrupted`` inside ``stop_on_signals``.

Every error names the config key (or file) it is about, so the message reads
``<key>: <what is wrong, with the bad value>``. They are plain ``Exception``
subclasses with picklable state, so that Ray re-raises them on the driver as
themselves.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from collections.abc import Iterator

# How Zarr's errors name a store or a node in it, and what the user gave instead: ``StorePath(LocalStore,
# 'file:///a/k.zarr/kernel')`` and ``LocalStore('file:///a/k.zarr')`` are /a/k.zarr/kernel and /a/k.zarr;
# ``<FsspecStore(S3FileSystem, bucket/k.zarr)>`` is bucket/k.zarr.
_STORE_NAMES = (
    (re.compile(r"StorePath\(\w+, '([^']*)'\)"), r"\1"),
    (re.compile(r"<?\b\w*Store\(\w+, ([^)>]*)\)>?"), r"\1"),
    (re.compile(r"\b\w*Store\('([^']*)'\)"), r"\1"),
    (re.compile(r"file://([^\s'\"]+)"), r"\1"),  # file:///a/k.zarr, and file://k.zarr for a relative path
)
# What zarr's crc32c codec raises for a chunk whose bytes changed: it quotes both checksums as raw bytes.
_CHECKSUM = "Stored and computed checksum do not match"


def plain_paths(text: str) -> str:
    """``text`` with Zarr's reprs of stores and store paths replaced by the paths they stand for."""
    for pattern, replacement in _STORE_NAMES:
        text = pattern.sub(replacement, text)
    return text


def is_checksum_error(err: BaseException) -> bool:
    """Whether ``err`` is zarr's error for a chunk that fails its crc32c checksum."""
    return isinstance(err, ValueError) and str(err).startswith(_CHECKSUM)


def brief(err: BaseException, limit: int = 2000) -> str:
    """An exception as ``Type: first line`` for one-line messages: the whole first line (cut only past
    ``limit`` characters, for a cause that quotes a whole array), stores named by their paths; a chunk
    that fails its checksum as "checksum mismatch" (zarr's message quotes raw bytes)."""
    if is_checksum_error(err):
        return "checksum mismatch"
    lines = plain_paths(str(err)).strip().splitlines()
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


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run (``signal``: the signal's name); a KeyboardInterrupt, so that
    whatever treats Ctrl-C treats it the same. ``written``, inside a run: whether it had begun writing its
    output (then it records "interrupted" and its finished blocks stay) or stopped before (nothing
    written); None outside a run (another command)."""

    # The Interrupted ``stop_on_signals`` last raised in this process (None outside).
    received: Interrupted | None = None

    def __init__(self, signal: str, written: bool | None = None) -> None:
        super().__init__(signal)
        self.signal = signal
        self.written = written

    def __str__(self) -> str:
        return f"interrupted by {self.signal}"

    @property
    def outcome(self) -> str | None:
        """What became of a run's output, for the one line the command prints after ``interrupted by X: ``
        (None outside a run)."""
        if self.written is None:
            return None
        if self.written:
            return "the finished blocks are kept; rerun the same command to resume"
        return "nothing was written; rerun the same command to start again"

    @classmethod
    def of(cls, err: KeyboardInterrupt) -> KeyboardInterrupt:
        """``err``, or the Interrupted received where a library re-raised ours as a plain
        KeyboardInterrupt (Ray's ``wait`` does: it catches any KeyboardInterrupt and raises a new one)."""
        if isinstance(err, cls) or cls.received is None:
            return err
        return cls.received


@contextlib.contextmanager
def stop_on_signals(written: bool | None = None) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise Interrupted (``written``, in a run: whether the output is
    being written by then) in this thread (the main one: elsewhere this does nothing), so that a command
    stopped by either at any stage says so in one line, and a run records "interrupted", keeps its
    finished blocks and releases its lease. May be nested; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        Interrupted.received = err = Interrupted(signal.Signals(signum).name, written)
        raise err

    with handlers_kept():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, interrupt)
        try:
            yield
        except KeyboardInterrupt as err:
            raise Interrupted.of(err) from None
        finally:
            Interrupted.received = None


@contextlib.contextmanager
def handlers_kept() -> Iterator[None]:
    """Put back the SIGINT and SIGTERM handlers of before on leaving (in the main thread): around a call
    that sets its own, as ``ray.init`` starting a local instance sets a SIGTERM handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
