"""YAML config -> frozen, validated config objects. The only place YAML is read.

    cfg = load_config("configs/quickstart.yaml")
    cfg.ntk.mode  # 'trace'

Unknown keys and wrong types are errors; relative paths are taken relative to the config file.
"""

from __future__ import annotations

import os
import re
import typing
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError


class Method(StrEnum):
    """How a block is computed (``ntk.method``); pipeline.methods holds one module per method but ``auto``."""

    AUTO = "auto"  # chosen per run by the cost model, confirmed by timing (pipeline.methods.auto)
    STRUCTURED = "structured"
    JACOBIAN_CONTRACTION = "jacobian_contraction"
    NTK_VECTOR_PRODUCTS = "ntk_vector_products"


class Mode(StrEnum):
    """What is stored per pair of samples (``ntk.mode``)."""

    FULL = "full"  # (n1, n2, o, o)
    TRACE = "trace"  # (n1, n2): the sum over a = b
    DIAGONAL = "diagonal"  # (n1, n2, o): the a = b entries
    PNTK = "pntk"  # (n1, n2): the NTK of sum_a f_a / sqrt(o), an o = 1 trace kernel
    FEATURES = "features"  # not a kernel: sketched features per sample, (n, o, k) or (n, k) (ntk.features)


# The kernel a feature run estimates (ntk.features.of); its Mode is ``feature_mode(of)``.
FeatureOf = Literal["full", "trace", "pntk"]
FEATURE_MODES: tuple[Mode, ...] = (Mode.FULL, Mode.TRACE, Mode.PNTK)


def feature_mode(of: str) -> Mode:
    """The Mode of the kernel features of ``of`` estimate (full and trace features serve full, trace and
    diagonal reads alike; pntk features, of the o = 1 model, only pntk): the one reading of ``of``.

    Raises:
      ValueError: ``of`` is not one of full, trace, pntk.
    """
    if of not in FEATURE_MODES:
        raise ValueError(f"of: expected one of {', '.join(FEATURE_MODES)}, got {of!r}")
    return Mode(of)


DType = Literal["float32", "float64"]
Precision = Literal["highest", "tf32"]


def is_url(path: str) -> bool:
    """True for fsspec URLs such as ``s3://bucket/key`` (not for Windows drive letters)."""
    return "://" in path


def url_options(path: str, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fsspec storage options to open ``path`` with: ``options`` for a URL, None for a local path."""
    return options if is_url(path) else None


def _resolve(value: str | None, info: ValidationInfo, must_exist: bool) -> str | None:
    """Resolve a path against the config file's folder; optionally require that it exists."""
    if value is None or is_url(value):
        return value
    base = (info.context or {}).get("base")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    resolved = os.path.normpath(path)
    if must_exist and (info.context or {}).get("check_files", True) and not os.path.exists(resolved):
        raise ValueError(f"no such file: {resolved}")
    return resolved


def _existing_file(value: str | None, info: ValidationInfo) -> str | None:
    return _resolve(value, info, must_exist=True)


# A file the config names (a checkpoint, an input): resolved against the config file's folder (a URL is
# kept as it is), and it must exist.
ExistingFile = Annotated[str | None, AfterValidator(_existing_file)]


# storage_options keys that carry secrets: credentials come from the environment (AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...), never from a config file that gets
# copied, committed and recorded in the output's attributes.
SECRET_KEYS = frozenset({
    "key", "secret", "token", "password", "session_token", "access_key", "secret_key", "access_key_id",
    "secret_access_key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "account_key",
    "sas_token", "credential", "credentials", "client_secret",
})


def _check_storage_options(options: dict[str, Any] | None, path: str | None) -> dict[str, Any] | None:
    """Refuse storage options with credentials in them, or for a path that is not a URL."""
    if options is None:
        return None
    if path is None or not is_url(path):
        where = "there is no path" if path is None else f"the path {path!r} is local"
        raise ValueError(f"storage_options apply to URL paths (s3://..., gs://...), and {where}")

    def walk(d: dict[str, Any], where: str) -> None:
        for k, v in d.items():
            if str(k).lower() in SECRET_KEYS:
                raise ValueError(f"{where}{k} is a credential; credentials come from the environment "
                                 "(e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), never from the config file")
            if isinstance(v, dict):
                walk(v, f"{where}{k}.")

    walk(options, "")
    return options


def _exactly_one(spec: BaseModel, first: tuple[str, str], second: tuple[str, str]) -> None:
    """Raise ValueError unless exactly one of two fields of ``spec`` is given: (name, what it takes) each."""
    (a, a_takes), (b, b_takes) = first, second
    va, vb = getattr(spec, a), getattr(spec, b)
    if (va is None) == (vb is None):
        got = "neither" if va is None else f"both ({a}={va!r}, {b}={vb!r})"
        raise ValueError(f"give exactly one of '{a}' ({a_takes}) or '{b}' ({b_takes}), got {got}")


class _Spec(BaseModel):
    # strict: "256" is not an int and "yes" is not a bool; YAML already gives real types.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSpec(_Spec):
    builtin: Literal["cnn", "mlp"] | None = None
    target: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: ExistingFile = None
    seed: int = 0
    # What to take from the model's output: an attribute or key ("logits" for Hugging Face models) or a
    # tuple index; null: the output as it is (a tensor).
    output: str | int | None = None

    @field_validator("target")
    @classmethod
    def _target_form(cls, v: str | None) -> str | None:
        if v is not None and (v.count(":") != 1 or not all(v.split(":"))):
            raise ValueError(f"expected 'module:attribute', got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        _exactly_one(self, ("builtin", "cnn, mlp"), ("target", "'module:attribute'"))
        return self


class Synthetic(_Spec):
    n: PositiveInt
    shape: list[PositiveInt]
    seed: int = 0


class InputSpec(_Spec):
    path: ExistingFile = None
    array: str | None = None
    synthetic: Synthetic | None = None
    storage_options: dict[str, Any] | None = None  # fsspec options for a URL path (endpoint_url, anon, ...)

    @field_validator("storage_options")
    @classmethod
    def _options(cls, v: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        return _check_storage_options(v, info.data.get("path"))

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        _exactly_one(self, ("path", ".npy, .pt, .zarr"), ("synthetic", "{n, shape, seed}"))
        if self.array is not None and self.path is None:
            raise ValueError("'array' names an array inside a Zarr 'path'; there is no path")
        return self


class DataSpec(_Spec):
    x1: InputSpec
    x2: InputSpec | None = None  # None: K(x1, x1), symmetric


class NtkSpec(_Spec):
    # strict=False: YAML gives the names as strings; they become the enums here.
    method: Method = Field(default=Method.AUTO, strict=False)
    mode: Mode = Field(default=Mode.FULL, strict=False)
    dtype: DType = "float32"
    # Where blocks run (pipeline.execute.device.resolve_device): auto takes CUDA where a block task has a
    # GPU (the local executor on a machine with one; a Ray task given one by ray.gpus_per_task > 0).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # How float32 matrix products run on the workers (pipeline.precision): "highest" in float32,
    # "tf32" in TensorFloat-32 on GPUs that have it (10 mantissa bits per input, much faster).
    precision: Precision = "highest"
    # For mode: features (its defaults when absent); refused with any other mode.
    features: FeaturesSpec | None = None

    @field_validator("features")
    @classmethod
    def _features_mode(cls, v: FeaturesSpec | None, info: ValidationInfo) -> FeaturesSpec | None:
        mode = info.data.get("mode")
        if v is not None and mode is not None and mode != Mode.FEATURES:
            raise ValueError(f"ntk.features applies to ntk.mode: features, and ntk.mode is {mode}")
        return v

    @property
    def sketch(self) -> FeaturesSpec:
        """The feature settings of a features run (their defaults where ntk.features is absent)."""
        return self.features or FeaturesSpec()

    @field_validator("precision")
    @classmethod
    def _float32_only(cls, v: str, info: ValidationInfo) -> str:
        if v == "tf32" and info.data.get("dtype") == "float64":
            raise ValueError("tf32 applies to float32 products only, and ntk.dtype is float64; use "
                             "precision: highest with float64, or dtype: float32 with tf32")
        return v


class FeaturesSpec(_Spec):
    """``ntk.mode: features``: per-sample gradients projected to k numbers (pipeline.features), so that
    inner products of features estimate the kernel, without the kernel's N^2."""

    k: PositiveInt = 4096  # features per sample (and output)
    seed: NonNegativeInt = 0  # the projections' seed: the same seed gives the same features, bit for bit
    # Which kernel they estimate: full and trace (and diagonal) share one set, (n, o, k); pntk (n, k).
    of: FeatureOf = "trace"
    # How a Linear / Conv layer is projected from its inputs and cotangents (pipeline.features):
    # khatri_rao, an independent pair of vectors per feature, error ~ k^(-1/2) (on the tutorial CNN at
    # k = 4096, a third of kronecker's); kronecker, sum_s (P_out g_s)(P_in a_s)^T, error ~ k^(-1/4),
    # cheaper for convolutions (README "Sketched features").
    projection: Literal["kronecker", "khatri_rao"] = "khatri_rao"
    # How k is split over the model's parts (a Linear layer, a Conv group, another parameter tensor):
    # trace, by each part's share of the kernel's trace on x1's first rows (at most 64), computed once
    # when the store is created: the least total variance (on the wide MLP, n = 256, k = 4096, a relative
    # error of 5.5% where the split by parameters gives 45%); parameters, by their parameter counts; or the
    # path of a feature store (a train set's) whose recorded split this run takes, so that the two sets'
    # features are one feature map (the same model parameters, k, of and projection; README "Sketched
    # features"). A local path is relative to the config file; a URL opens with output.storage_options.
    split: str = "trace"

    @field_validator("split")
    @classmethod
    def _split_form(cls, v: str, info: ValidationInfo) -> str:
        if v in ("trace", "parameters"):
            return v
        if not v:
            raise ValueError("expected trace, parameters or the path of a feature store, got ''")
        # Not required to exist: a resume takes the split its store recorded, and a run that creates a store
        # names a missing one in one line (pipeline.prepare).
        return _resolve(v, info, must_exist=False) or v


def _pair_form(v: Any) -> bool:
    """Whether ``v`` is a positive int or a list of two."""
    parts = v if isinstance(v, list) else [v]
    ok = len(parts) == 2 if isinstance(v, list) else True
    return ok and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in parts)


class TilingSpec(_Spec):
    # 256 x 256 blocks: large enough that per-task overhead is small, small enough that a
    # CNN-sized model's Jacobians for 512 samples fit a worker's memory. "auto": the largest square
    # block whose task fits a worker's memory, measured on a worker when the store is created
    # (pipeline.prepare.auto_block); a resume keeps the block the store was made with.
    block: int | list[int] | Literal["auto"] = 256

    @field_validator("block", mode="before")
    @classmethod
    def _block_form(cls, v: Any) -> Any:
        if v == "auto":
            return v
        if not _pair_form(v):
            raise ValueError(f"expected a positive int, [rows, cols] of positive ints, or 'auto', got {v!r}")
        return v

    # Chunks for readers inside each block's shard (Zarr v3 sharding): one file per block however
    # small the chunks. None: the block is the chunk.
    chunk: int | list[int] | None = None

    @field_validator("chunk", mode="before")
    @classmethod
    def _chunk_form(cls, v: Any) -> Any:
        if v is not None and not _pair_form(v):
            raise ValueError(f"expected a positive int or [rows, cols] of positive ints, got {v!r}")
        return v

    # Blocks of one row computed by one task, forming the rows' Jacobians (or layer inputs and
    # cotangents) once. "auto": the cost model decides, at run time, from the blocks and the workers.
    strip: PositiveInt | Literal["auto"] = "auto"

    @property
    def shape(self) -> tuple[int, int] | None:
        """(rows, cols) of a block; None for ``auto`` (decided when the store is created)."""
        b = self.block
        return None if b == "auto" else (b, b) if isinstance(b, int) else (b[0], b[1])

    @property
    def chunk_shape(self) -> tuple[int, int] | None:
        c = self.chunk
        return None if c is None else (c, c) if isinstance(c, int) else (c[0], c[1])


class OutputSpec(_Spec):
    path: str
    overwrite: bool = False
    # A run renews its lease on the output every lease_seconds / 4; a run that died stops binding
    # the output lease_seconds after its last heartbeat (at once on the same host).
    lease_seconds: PositiveFloat = 60.0
    # Kernel values are close to incompressible (float mantissas): compression costs time for a few
    # percent. Every chunk carries a crc32c checksum either way.
    compression: Literal["none", "zstd", "blosc"] = "none"
    # fsspec options for a URL path, e.g. {endpoint_url: "http://minio:9000"} for s3://; no credentials.
    storage_options: dict[str, Any] | None = None
    # Seconds to wait for an object store (a URL path) to answer when the run first reaches it; a
    # minute covers a slow first connection, and a store that does not answer ends the run in one line.
    connect_timeout_s: PositiveFloat = 60.0

    @field_validator("path")
    @classmethod
    def _output_path(cls, v: str, info: ValidationInfo) -> str:
        return typing.cast(str, _resolve(v, info, must_exist=False))

    @field_validator("storage_options")
    @classmethod
    def _options(cls, v: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        return _check_storage_options(v, info.data.get("path"))


# What ``ray.address`` may be besides None (a local instance) and "auto" (Ray's own conventions, and the
# forms the README documents): HOST:PORT, a head node's GCS, or ray://HOST:PORT, its Ray client server.
_HOST_PORT = re.compile(r"(?:ray://)?(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(\d{1,5})")
RAY_ADDRESS_FORMS = "auto, HOST:PORT (a head node, e.g. 10.0.0.1:6379) or ray://HOST:PORT (e.g. ray://10.0.0.1:10001)"


def ray_address_problem(address: str) -> str | None:
    """Why ``address`` is no Ray address to join (one line, with the value), or None where it is one."""
    if address in ("auto", "local"):
        return None
    m = _HOST_PORT.fullmatch(address)
    if m and 0 < int(m.group(1)) < 65536:
        return None
    if address.startswith(("http://", "https://")):
        why = " (an http:// address is a job server's, for `ntk-pipeline submit --address`)"
    elif address.rstrip("/").endswith(":") or ":" not in address.split("://")[-1]:
        why = " (no port)"
    elif m:
        why = " (a port is 1 to 65535)"
    else:
        why = ""
    return f"expected {RAY_ADDRESS_FORMS}, got {address!r}{why}"


class RaySpec(_Spec):
    address: str | None = None  # None: a local Ray instance for this run; "auto" or ray://host:10001
    gpus_per_task: NonNegativeFloat = 0
    cpus_per_task: PositiveFloat = 1
    max_in_flight: PositiveInt | None = None  # None: twice the tasks the cluster can run at once
    max_retries: NonNegativeInt = 3  # re-runs of a block whose worker process or node died
    # Seconds to wait for a cluster at ``address`` to answer; Ray alone would retry for many minutes.
    connect_timeout_s: PositiveFloat = 60.0

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        why = None if v is None else ray_address_problem(v)
        if why:
            raise ValueError(why)
        return v


class RunConfig(_Spec):
    model: ModelSpec
    data: DataSpec
    ntk: NtkSpec = Field(default_factory=NtkSpec)
    tiling: TilingSpec = Field(default_factory=TilingSpec)
    output: OutputSpec
    ray: RaySpec = Field(default_factory=RaySpec)

    @property
    def symmetric(self) -> bool:
        return self.data.x2 is None


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys a mapping at ``loc`` may hold, by walking the spec classes (best effort)."""
    model: Any = RunConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        nxt = [a for a in typing.get_args(field.annotation) or (field.annotation,)
               if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nxt:
            return []
        model = nxt[0]
    return list(model.model_fields)


def _one_line(err: ValidationError) -> ConfigError:
    """The first validation error as ``key: what is wrong (got value)``."""
    e = err.errors()[0]
    # Drop the tags pydantic puts in a union's location ("int", "list[constrained-int]", ...).
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (p in {"int", "str"} or "[" in p or "-" in p)))
    key = ".".join(str(p) for p in loc)
    if e["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        return ConfigError(key, f"unknown key{hint}")
    if e["type"] == "missing":
        return ConfigError(key, "required key is missing")
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"].endswith("_type") or e["type"] in {"literal_error", "enum", "greater_than", "greater_than_equal"}:
        msg = f"{msg}, got {e['input']!r}"
    return ConfigError(key or "config", msg)


def parse_config(raw: Any, base: str | os.PathLike[str] | None = None, check_files: bool = True) -> RunConfig:
    """Validate a config mapping. ``base`` is the folder that relative paths are relative to;
    ``check_files`` False skips checking that input files exist (they may exist only on a cluster)."""
    if not isinstance(raw, dict):
        raise ConfigError("config", f"expected a mapping of sections, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw, context={"base": base, "check_files": check_files})
    except ValidationError as err:
        raise _one_line(err) from None


def load_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and validate a YAML config file.

    Args:
      path: the config file; relative paths inside it are relative to its folder.

    Returns:
      The frozen ``RunConfig``.

    Raises:
      ConfigError: naming the key and the bad value.
    """
    return parse_config(read_yaml(path), base=Path(path).resolve().parent)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice (at any depth); YAML's safe loader would keep the last silently."""

    def __init__(self, key: object, first: int, second: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.second = key, first, second

    def __str__(self) -> str:
        lines = f"line {self.first}, twice" if self.first == self.second else f"lines {self.first} and {self.second}"
        return f"duplicate key {self.key!r} ({lines})"


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a mapping with a duplicate key instead of keeping the last one
    (``mode: trace`` then ``mode: full`` would silently compute full). Keys a merge (``<<``) brings in
    may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: the safe loader refuses it with its own message
                continue
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """A config file's YAML, unvalidated; ConfigError naming the file if it is missing, not YAML, or
    gives a key twice in one mapping (naming the key and both lines)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), "no such config file")
    try:
        return yaml.load(p.read_text(), Loader=StrictLoader)  # a SafeLoader: no Python objects
    except DuplicateKeyError as err:
        raise ConfigError(str(path), str(err)) from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), f"not valid YAML: {err}") from None
