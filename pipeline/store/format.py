"""The store's provenance record: one typed, versioned model of the group attribute ``ntk_pipeline``.

    prov = read_provenance(group, path)    # a Provenance, or one StoreError line naming the store
    prov.n1, prov.method, prov.status      # 600, "structured", "complete"
    write_provenance(group, prov.model_copy(update={"status": "failed", "error": "..."}))

Versions: a record without ``format_version`` is format 0 (the stores written before the key existed)
and is read as it is; format 1 is format 0 plus ``format_version``, so every key keeps its name and
JSON shape and plain Zarr readers (``zarr.open_group(p).attrs["ntk_pipeline"]["status"]``) need no
change. A record of a newer format than this code reads is refused, never guessed at. Keys added
within format 1 are optional and read as what every earlier run did: ``function`` and
``block_sizing`` absent, ``precision`` (and, when a config is compared with the record, the recorded
config's ``ntk.precision``) "highest"; a feature record's ``projection`` "kronecker" and ``split_rule``
"parameters" (and so the recorded config's ``ntk.features.projection`` and ``split``).

What a reader may trust: the record is data, written by whoever wrote the store. Parsing checks its
shape and types (a malformed record is refused naming the store), not its truth: the config,
fingerprints, versions and status are the writer's claims. Nothing in it is ever imported or
executed by reading it: a resume recomputes the fingerprints (and the functional fingerprint,
``function``) from the config it runs and compares them with the recorded ones, and ``verify``
recomputes blocks only from a config the user gives, checked against the record first. Keys this
code does not know are kept as they are when the record is rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer

from pipeline.config import FeatureOf, FeaturesSpec, Method, Mode
from pipeline.errors import StoreError

ATTRIBUTE = "ntk_pipeline"  # the group attribute that holds the record
FORMAT_VERSION = 1  # what this code writes, and the newest it reads

# Typed, frozen and strict (a count that is a string is malformed, not converted); unknown keys are kept.
_RECORD = ConfigDict(frozen=True, strict=True, extra="allow")


def _drop_none(data: dict[str, Any], optional: frozenset[str]) -> dict[str, Any]:
    """The record without its optional keys that hold None: they are absent from the JSON, not null."""
    return {k: v for k, v in data.items() if not (k in optional and v is None)}


class Strip(BaseModel):
    """How many blocks of one row a task computes, and why (``saving``: a side's share of a block's cost)."""

    model_config = _RECORD

    length: int
    reason: str
    saving: float | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _drop_none(handler(self), frozenset({"saving"}))


class BlockSizing(BaseModel):
    """How ``tiling.block: auto`` chose the block (``Provenance.block``) when the store was created:
    the largest square block whose task (``methods.task_memory``) fits ``headroom`` of
    ``memory_bytes``, the memory one block task may use, as measured on a worker (``source``), then
    halved while fewer than 4 tasks per worker (``workers`` at once) would leave some idle.
    ``limited_by``: "memory", "balance" or "kernel" (the whole kernel fits one block)."""

    model_config = _RECORD

    block: tuple[int, int]  # the square block chosen, a multiple of the chunk; the plan clips it to n1 x n2
    memory_bytes: int
    source: str
    headroom: float
    workers: int
    task_memory_bytes: int  # the estimate for the chosen block
    limited_by: str


class Values(BaseModel):
    """A tensor as a functional fingerprint keeps it: its shape, up to ``pipeline.fingerprint.SAMPLE``
    of its values (at evenly spaced flat indices; all of them when there are no more), and the L2
    norm and the sum of all of them."""

    model_config = _RECORD

    shape: tuple[int, ...]
    values: tuple[float, ...]
    norm: float
    sum: float


class SourceFile(BaseModel):
    """A Python module the model's code comes from, and the sha256 of its file."""

    model_config = _RECORD

    module: str
    file: str
    sha256: str


class Function(BaseModel):
    """What the model computed when the store was created (``pipeline.fingerprint``): its outputs on
    rows 0:rows of x1 (and of x2), the kernel block of those rows with the run's method, mode and
    dtype, and the source files of the model's code. A resume recomputes it and refuses to mix."""

    model_config = _RECORD

    rows: int
    outputs_x1: Values  # (rows, o)
    outputs_x2: Values | None = None  # None: K(x1, x1)
    block: Values  # K(x1[0:rows], x2[0:rows] or x1[0:rows]): (rows, rows[, o[, o]]) by mode
    sources: tuple[SourceFile, ...] = ()  # () for a builtin model, or a module without a source file

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _drop_none(handler(self), frozenset({"outputs_x2"}))


class FeatureProbe(BaseModel):
    """How far a feature run's kernel is from the exact one on a probe: the exact kernel of x1's first
    ``rows`` samples (the structured method, float64) against the features' inner products."""

    model_config = _RECORD

    rows: int
    relative_error: float  # ||K_features - K||_F / ||K||_F over the probe
    eigenvalue_error: float  # max_i |lambda_i(K_features) - lambda_i(K)| / lambda_1(K), over the probe's matrix


class FeatureRecord(BaseModel):
    """A feature run's settings and results (``ntk.mode: features``): its ``features`` array is (n, o, k),
    or (n, k) for pntk, and <phi(x), phi(x')> estimates the ``of`` kernel."""

    model_config = _RECORD

    k: int
    seed: int
    of: FeatureOf  # its kernel's Mode: config.feature_mode(of)
    split: dict[str, int]  # features per part of the model, in the order of the features (features.split)
    # How Linear / Conv parts were projected (ntk.features.projection); records written before the choice
    # existed were all "kronecker".
    projection: Literal["kronecker", "khatri_rao"] = "kronecker"
    # How ``split`` was chosen (ntk.features.split): "trace" (computed from x1's first rows when the store
    # was created), "parameters", or the path of the feature store it was taken from; records written
    # before the choice existed were all split by parameters.
    split_rule: str = "parameters"
    probe: FeatureProbe | None = None  # set when the run completes

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _drop_none(handler(self), frozenset({"probe"}))


# The optional keys a record may lack (run state, absent until a run sets it; fallbacks; the functional
# fingerprint, the precision and auto's block sizing, absent from stores written before them): written
# only when set.
RUN_STATE = frozenset({
    "last_started", "runs", "strip", "nodes", "block_nodes", "devices", "block_devices", "updated", "finished",
    "seconds", "block_seconds", "write_seconds", "startup_seconds", "error", "fallbacks", "function", "block_sizing",
    "precision", "features", "jacobian_parameters",
})


class Provenance(BaseModel):
    """Everything the ``ntk_pipeline`` attribute holds: what was computed, how, from what, and how far.

    Shapes: ``block``, ``chunk`` (rows, cols) of a block and of a chunk; ``grid`` (blocks along x1,
    along x2); ``block_nodes`` one entry per block of the plan, an index into ``nodes`` or -1, and
    ``block_devices`` likewise into ``devices`` ("cpu", "cuda:0 NVIDIA H200"; absent in older stores).
    """

    model_config = _RECORD

    format_version: int = FORMAT_VERSION
    config: dict[str, Any]  # the resolved config, as JSON
    method: Method = Field(strict=False)  # the method actually used (auto resolved)
    auto: dict[str, Any] | None  # auto's decision with its estimates and timings; None when a method was named
    mode: Mode = Field(strict=False)
    dtype: str
    # ntk.precision of the run: "highest", or "tf32" when float32 products ran in TensorFloat-32; None
    # (absent) in stores written before the setting existed, which computed in float32 (``ntk_precision``).
    precision: Literal["highest", "tf32"] | None = None
    n1: int
    n2: int
    o: int
    p: int  # trainable parameters
    symmetric: bool
    block: tuple[int, int]
    chunk: tuple[int, int]
    compression: str
    grid: tuple[int, int]
    blocks_total: int
    versions: dict[str, str]  # distribution -> version ("not installed")
    fingerprints: dict[str, str | None]  # "parameters", "x1", "x2" -> sha256 or spec fingerprint; x2 None
    status: str  # "running", "complete", "failed", "interrupted" (another writer may write another word)
    started: str  # ISO 8601, UTC
    blocks_done: int
    # Run state, absent until a run sets it.
    last_started: str | None = None
    runs: int | None = None
    strip: Strip | None = None
    nodes: tuple[str, ...] | None = None
    block_nodes: tuple[int, ...] | None = None
    devices: tuple[str, ...] | None = None
    block_devices: tuple[int, ...] | None = None
    updated: str | None = None
    finished: str | None = None
    seconds: float | None = None
    block_seconds: float | None = None
    write_seconds: float | None = None
    startup_seconds: float | None = None
    error: str | None = None
    # Transforms the model does not support and so the paths the methods took instead (transform ->
    # why; pipeline.methods.capabilities); absent when every method ran as it does by default.
    fallbacks: dict[str, str] | None = None
    # For method structured: the trainable parameters it takes by per-sample Jacobians (no rule fits their
    # module, or the rule's check against autograd failed); None where the rules cover every parameter,
    # for other methods, and in stores written before it was recorded.
    jacobian_parameters: tuple[str, ...] | None = None
    # The functional fingerprint taken when the store was created; None in stores written before it
    # existed, whose resume checks the config and the fingerprints alone.
    function: Function | None = None
    # How tiling.block: auto chose ``block``; None for a block the config gave.
    block_sizing: BlockSizing | None = None
    # A feature run's (mode "features"): k, seed, the kernel estimated, the split, the probe's error.
    features: FeatureRecord | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _drop_none(handler(self), RUN_STATE)

    @property
    def plan_block(self) -> tuple[int, int]:
        """The block to plan this store's run with again: ``tiling.block: auto``'s choice (which the
        chunk divides; ``block`` is it clipped to the kernel), else ``block``."""
        return self.block_sizing.block if self.block_sizing is not None else self.block

    @property
    def ntk_precision(self) -> str:
        """The run's ntk.precision: "highest" for a store written before the setting existed."""
        return self.precision or "highest"

    def resume_mismatch(self, config: Mapping[str, Any], fingerprints: Mapping[str, str | None]) -> str | None:
        """What differs between this recorded run and one of ``config`` (the resolved config as JSON) over
        inputs and parameters with these ``fingerprints``, or None: the record's own resume check."""
        return self.mismatch(config, fingerprints, RESUME_SECTIONS)

    def mismatch(self, config: Mapping[str, Any], fingerprints: Mapping[str, str | None], sections: tuple[str, ...],
                 ignore: frozenset[str] = frozenset()) -> str | None:
        """The first difference in ``sections`` of the config (keys in ``ignore``, dotted, left out), else
        in the parameter and input fingerprints, or None. Where blocks run (PLACEMENT) is never a difference."""
        ignore = ignore | PLACEMENT
        recorded, config = _config_defaults(self.config, self.features), _feature_settings(config)
        for section in sections:
            found = _first_difference(recorded.get(section), config[section], section, ignore)
            if found:
                return found
        for key, what in _FINGERPRINTS.items():
            if self.fingerprints.get(key) != fingerprints[key]:
                return (f"the {what} differ from those recorded (fingerprint {self.fingerprints.get(key)}, "
                        f"now {fingerprints[key]})")
        return None

    def record(self) -> dict[str, Any]:
        """The JSON record as this code writes it: the current ``format_version``, run-state keys only when set."""
        data: dict[str, Any] = self.model_dump(mode="json")
        return {**data, "format_version": FORMAT_VERSION}


# What a resume must find unchanged: everything that decides the kernel's values and layout, but for
# RESUME_FREE: how many blocks one task computes (tiling.strip) changes neither a block's bits nor where
# it lies. The other sections (output's lease, overwrite, timeouts; ray.*) never change the kernel.
RESUME_SECTIONS = ("model", "data", "ntk", "tiling")
RESUME_FREE = frozenset({"tiling.strip"})
# What ``verify`` checks a given config against: what decides the kernel's values. Where the inputs and
# the checkpoint lie is left out (a store is often verified on another machine): the fingerprints
# of their contents are compared instead.
VERIFY_SECTIONS = ("model", "data", "ntk")
LOCATIONS = frozenset({"model.checkpoint", "data.x1.path", "data.x1.storage_options", "data.x2.path",
                       "data.x2.storage_options"})
# Where blocks run: a resume or a verify may run them on another device (their values agree to the dtype's
# rounding, which the functional fingerprint checks); each block's device is recorded in ``block_devices``.
PLACEMENT = frozenset({"ntk.device"})
_FINGERPRINTS = {"parameters": "model parameters", "x1": "data.x1 values", "x2": "data.x2 values"}


def _first_difference(recorded: Any, now: Any, key: str, ignore: frozenset[str] = frozenset()) -> str | None:
    if key in ignore or key in RESUME_FREE:
        return None
    if isinstance(recorded, dict) and isinstance(now, dict):
        for k in sorted(set(recorded) | set(now)):
            found = _first_difference(recorded.get(k), now.get(k), f"{key}.{k}", ignore)
            if found:
                return found
        return None
    return None if recorded == now else f"{key} differs (recorded {recorded!r}, now {now!r})"


def write_provenance(group: Any, prov: Provenance) -> None:
    """Write ``prov`` as the ``ntk_pipeline`` attribute of a Zarr group (the one writer of the record)."""
    group.attrs.update(attributes(prov))


def attributes(prov: Provenance) -> dict[str, Any]:
    """The group attributes that hold ``prov``: ``{"ntk_pipeline": record}``, for a group being created."""
    return {ATTRIBUTE: prov.record()}


def read_provenance(group: Any, path: str) -> Provenance:
    """The Provenance of a Zarr group (the store at ``path``), parsed from its ``ntk_pipeline`` attribute."""
    return parse(group.attrs.get(ATTRIBUTE), path)


def parse(record: object, path: str) -> Provenance:
    """The Provenance of the store at ``path`` from its ``ntk_pipeline`` attribute (the one parser).

    Raises:
      StoreError: naming ``path``: the record is missing, malformed, or of a newer format than this code reads.
    """
    if not isinstance(record, Mapping):
        what = "missing" if record is None else f"a {type(record).__name__}, not a record"
        raise StoreError(path, f"its {ATTRIBUTE} attribute is {what}")
    version = record.get("format_version", 0)
    if type(version) is not int or version < 0:
        raise StoreError(path, f"its {ATTRIBUTE} attribute is malformed: format_version: expected an integer "
                         f">= 0, got {version!r}")
    if version > FORMAT_VERSION:
        raise StoreError(path, f"written in store format {version}, newer than this ntk-pipeline reads "
                         f"(format {FORMAT_VERSION}); upgrade ntk-pipeline to read it")
    data = {**record, "format_version": version}
    if version == 0:  # format 0 stores older than these keys: their chunk was the block, never compressed
        data = {"chunk": record.get("block"), "compression": "none", **data}
    try:
        return Provenance.model_validate_json(json.dumps(data, allow_nan=True))
    except (ValidationError, TypeError, ValueError) as err:
        raise StoreError(path, f"its {ATTRIBUTE} attribute is malformed: {first_error(err)}") from None


def _config_defaults(config: Mapping[str, Any], features: FeatureRecord | None = None) -> Mapping[str, Any]:
    """A recorded config with the keys added since it was written at the value every run had before
    (``ntk.precision``: "highest"; a feature run's ntk.features.projection and split: those its
    FeatureRecord holds, ``features``), so that a resume (or verify) of an older store compares like with
    like. The record itself is left as it was written."""
    if not isinstance(config.get("ntk"), Mapping):
        return config
    return _feature_settings({**config, "ntk": {"precision": "highest", **config["ntk"]}}, features)


def _feature_settings(config: Mapping[str, Any], features: FeatureRecord | None = None) -> Mapping[str, Any]:
    """A feature run's config with its ntk.features in full (their defaults where absent, so that a config
    without the key is compared by the settings it runs with); ``features``: the record of a run, whose
    projection and split rule stand where its config does not say (a record from before the keys:
    "kronecker" and "parameters")."""
    ntk = config.get("ntk")
    if not isinstance(ntk, Mapping) or ntk.get("mode") != Mode.FEATURES.value:
        return config
    given = ntk.get("features")
    recorded = {} if features is None else {"projection": features.projection, "split": features.split_rule}
    settings = {**FeaturesSpec().model_dump(mode="json"), **recorded, **(given if isinstance(given, Mapping) else {})}
    return {**config, "ntk": {**ntk, "features": settings}}


def first_error(err: Exception) -> str:
    """A validation error as ``key: what is wrong (and N more)``; other errors as their message."""
    if not isinstance(err, ValidationError):
        return str(err)
    errors = err.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "record"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


__all__ = ["ATTRIBUTE", "FORMAT_VERSION", "LOCATIONS", "PLACEMENT", "RESUME_FREE", "RESUME_SECTIONS", "RUN_STATE",
           "VERIFY_SECTIONS", "BlockSizing", "Function", "Provenance", "SourceFile", "Strip", "Values", "attributes",
           "first_error", "parse", "read_provenance", "write_provenance"]
