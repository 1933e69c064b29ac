"""Which codec pipeline each tensor of a push gets: lossless by default, lossy by name pattern, or chosen to a budget.

Grammar (``push --lossy RULE``, repeatable; the first rule whose pattern
matches a tensor's name wins)::

    RULE    = [PATTERN "="] SPEC            no PATTERN: every tensor ("*")
    PATTERN = an fnmatch glob over tensor names, without ":" ("*.weight", "encoder.layer.[0-3].*")
    SPEC    = "auto" | NAME [":" OPTION {"," OPTION}]
    OPTION  = KEY "=" VALUE | VALUE           a bare first VALUE sets the codec's first config field
    NAME    = a codec name or id ("int8", "int4", "intn", "fp8", "fp8-e5m2", "lossless"...)
    VALUE   = JSON (numbers, true/false) or a bare string

``int4:group=128,clip_steps=1`` is ``intn-group.v1`` with those config fields.
A lossy codec becomes the first stage, followed by the push's lossless codec
(``--codec``); a lossless SPEC stands alone.

Some tensors always stay lossless, whatever the rules say: tensors that are
not floats, have fewer than two dims (norms, biases, scalars), fewer than
``min_elements`` elements, or a name matching ``keep_lossless`` (default
``*norm*``, ``*Norm*``, ``*.bias``). A policy file (JSON, or YAML by its
``.yaml``/``.yml`` suffix) holds the same things::

    {"rules": ["*.weight=int8", {"pattern": "embeddings.*", "codec": "int4:group=128"}],
     "keep_lossless": ["*norm*", "*.bias"], "min_elements": 16384,
     "min_snr_db": 30, "max_ratio": 0.2, "candidates": ["int4", "int5", "int6", "int8"]}

``auto`` (automatic mode) tries every candidate codec on the tensor's own
pieces, measures the stored size (after the lossless stage) and the SNR, and
keeps the *smallest* that meets the budget: ``--min-snr DB``, or ``--max-ratio
R`` (stored / raw bytes of the whole model), for which it finds the highest
SNR floor that every auto tensor can meet within the size. Lossless is always
a candidate, so a tensor no quantizer can serve stays exact.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardstore.codecs import DEFAULT_CODEC_NAME, Codec, PieceInfo, Pipeline, codec_from_name, get_codec
from shardstore.codecs.quantize import FLOAT_DTYPES
from shardstore.errors import CodecError, InvalidInputError
from shardstore.progress import ProgressCallback, progress_task
from shardstore.repo.chunking import PiecePlan, TensorSpec
from shardstore.repo.pool import default_threads, ordered_map
from shardstore.repo.quality import ErrorStats, measure_piece

AUTO = "auto"
DEFAULT_KEEP_LOSSLESS = ("*norm*", "*Norm*", "*.bias")
DEFAULT_MIN_ELEMENTS = 16384
# What auto tries: N-bit groups of 64 and 128 and whole rows, and int8 per row. FP8 is left out
# by default: on MiniLM it is larger than int6 for the same SNR (docs/lossy.md).
DEFAULT_CANDIDATES = (*(f"int{bits}:group={group}" for bits in range(3, 8) for group in (64, 128, 0)), "int8")
# Stream headers (codec configs, checksum) are not in the measured sizes; --max-ratio keeps this much room per piece.
HEADER_ALLOWANCE = 512
_FILE_KEYS = {"rules", "keep_lossless", "min_elements", "min_snr_db", "max_ratio", "candidates"}


@dataclass(frozen=True)
class Rule:
    pattern: str
    spec: str
    codec: Codec | None  # None: auto

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


def parse_spec(spec: str, what: str) -> Codec | None:
    """A codec from ``NAME[:KEY=VALUE,...]``, or ``None`` for ``auto``."""
    name, _sep, options = spec.strip().partition(":")
    if name == AUTO:
        if options:
            raise InvalidInputError(f"{what}: 'auto' takes no options (the budget is --min-snr / --max-ratio)")
        return None
    try:
        named = codec_from_name(name)
    except CodecError as exc:
        raise InvalidInputError(f"{what}: {exc}") from None
    config = named.get_config()
    for index, item in enumerate(options.split(",") if options else []):
        key, sep, value = item.partition("=")
        if not sep and index == 0 and dataclasses.fields(named):  # ``prune:0.5``: the codec's first field
            key, sep, value = dataclasses.fields(named)[0].name, "=", item
        if not sep or not key.strip() or key.strip() == "id":
            raise InvalidInputError(f"{what}: codec option {item!r} is not KEY=VALUE")
        try:
            config[key.strip()] = json.loads(value)
        except ValueError:
            config[key.strip()] = value.strip()
    try:
        return get_codec(config)
    except CodecError as exc:
        raise InvalidInputError(f"{what}: {exc}") from None


def parse_rule(text: str, what: str = "--lossy") -> Rule:
    """``PATTERN=SPEC`` or a bare ``SPEC`` (every tensor)."""
    pattern, sep, spec = text.partition("=")
    if not sep or ":" in pattern:  # ``int4:group=128``: a bare SPEC whose options hold the "="
        pattern, spec = "*", text
    pattern, spec = pattern.strip(), spec.strip()
    where = f"{what} {text!r}"
    if not pattern or not spec:
        raise InvalidInputError(f"{where}: expected PATTERN=CODEC, e.g. '*.weight=int8'")
    if pattern.count("[") != pattern.count("]"):
        raise InvalidInputError(f"{where}: unbalanced [ ] in the pattern")
    return Rule(pattern, spec, parse_spec(spec, where))


def _tensor_elements(spec: TensorSpec) -> int:
    return math.prod(spec.shape)


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    lossless: Codec = field(default_factory=lambda: codec_from_name(DEFAULT_CODEC_NAME))
    keep_lossless: tuple[str, ...] = DEFAULT_KEEP_LOSSLESS
    min_elements: int = DEFAULT_MIN_ELEMENTS
    min_snr_db: float | None = None
    max_ratio: float | None = None
    candidates: tuple[Codec, ...] = ()  # empty: DEFAULT_CANDIDATES

    def __post_init__(self) -> None:
        if not self.lossless.lossless:
            raise InvalidInputError(
                f"--codec takes a lossless codec, not {self.lossless.codec_id}; name lossy ones with --lossy")
        if self.max_ratio is not None and not self.max_ratio > 0:
            raise InvalidInputError(f"--max-ratio must be positive, got {self.max_ratio}")
        uses_auto = any(rule.codec is None for rule in self.rules)
        if uses_auto and self.min_snr_db is None and self.max_ratio is None:
            raise InvalidInputError("--lossy auto needs a budget: --min-snr DB or --max-ratio R")
        if not uses_auto and (self.min_snr_db is not None or self.max_ratio is not None):
            raise InvalidInputError("--min-snr and --max-ratio apply to --lossy auto only")
        if any(c.lossless for c in self.candidates):
            raise InvalidInputError("auto candidates are lossy codecs (lossless is always tried)")

    def pipeline_for(self, codec: Codec) -> Pipeline:
        return Pipeline((codec,)) if codec.lossless else Pipeline((codec, self.lossless))

    def may_be_lossy(self, spec: TensorSpec) -> bool:
        """Whether rules may apply at all: a float tensor of 2+ dims, big enough, not kept lossless by name."""
        return (
            spec.dtype in FLOAT_DTYPES
            and len(spec.shape) >= 2
            and _tensor_elements(spec) >= self.min_elements
            and not any(fnmatch.fnmatchcase(spec.name, p) for p in self.keep_lossless)
        )

    def rule_for(self, spec: TensorSpec) -> Rule | None:
        if not self.may_be_lossy(spec):
            return None
        return next((rule for rule in self.rules if rule.matches(spec.name)), None)

    def auto_candidates(self) -> tuple[Codec, ...]:
        if self.candidates:
            return self.candidates
        return tuple(c for c in (parse_spec(s, "auto candidate") for s in DEFAULT_CANDIDATES) if c is not None)

    def check_patterns(self, specs: Sequence[TensorSpec]) -> None:
        """Every rule must match some tensor: a pattern that matches nothing is a typo, said before any work."""
        unmatched = [r for r in self.rules if not any(r.matches(s.name) for s in specs)]
        if unmatched:
            first = unmatched[0]
            raise InvalidInputError(f"--lossy {first.pattern}={first.spec}: the pattern matches no tensor")

    def resolve(
        self,
        plans: Sequence[Sequence[PiecePlan]],
        views: dict[str, memoryview],
        *,
        threads: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Pipeline]:
        """The pipeline of every tensor in ``plans`` (auto tensors are measured on their data in ``views``)."""
        specs = list({p.tensor.name: p.tensor for plan in plans for p in plan}.values())
        self.check_patterns(specs)
        lossless = Pipeline((self.lossless,))
        chosen: dict[str, Pipeline] = {}
        auto: list[TensorSpec] = []
        for spec in specs:
            rule = self.rule_for(spec)
            if rule is None:
                chosen[spec.name] = lossless
            elif rule.codec is None:
                auto.append(spec)
            else:
                chosen[spec.name] = self.pipeline_for(rule.codec)
        if auto:
            chooser = _AutoChooser(self, plans, views, threads or default_threads(), progress)
            chosen.update(chooser.choose(auto, chosen))
        return {spec.name: chosen[spec.name] for spec in specs}


@dataclass(frozen=True)
class Measured:
    pipeline: Pipeline
    stored_bytes: int
    error: ErrorStats

    @property
    def snr_db(self) -> float:
        return self.error.snr_db


class _AutoChooser:
    """The automatic mode: measure every candidate on every auto tensor, then pick per tensor."""

    def __init__(self, policy: Policy, plans: Sequence[Sequence[PiecePlan]], views: dict[str, memoryview],
                 threads: int, progress: ProgressCallback | None) -> None:
        self.policy = policy
        self.threads = threads
        self.progress = progress
        self.views = views
        self.pieces: dict[str, list[PiecePlan]] = {}
        for plan in plans:
            for piece in plan:
                self.pieces.setdefault(piece.tensor.name, []).append(piece)

    def _measure(self, job: tuple[str, Pipeline]) -> Measured:
        name, pipeline = job
        stored, error = 0, ErrorStats()
        for piece in self.pieces[name]:
            start = piece.rows[0] * piece.tensor.row_bytes
            raw = self.views[name][start : start + piece.nbytes]
            try:
                size, piece_error = measure_piece(pipeline, raw, piece_info(piece))
            except CodecError:  # NaN or infinity in the tensor: no quantizer takes it, lossless does
                return Measured(pipeline, 1 << 62, ErrorStats(squared_error=math.inf))
            stored, error = stored + size, error + piece_error
        return Measured(pipeline, stored, error)

    def _raw_bytes(self, name: str) -> int:
        return sum(p.nbytes for p in self.pieces[name])

    def _measure_all(self, jobs: list[tuple[str, Pipeline]], label: str) -> list[Measured]:
        results: list[Measured] = []
        advance = progress_task(self.progress, label, sum(self._raw_bytes(name) for name, _ in jobs))
        for (name, _pipeline), measured in zip(jobs, ordered_map(self._measure, jobs, self.threads), strict=True):
            results.append(measured)
            advance(self._raw_bytes(name))
        return results

    def choose(self, auto: list[TensorSpec], fixed: dict[str, Pipeline]) -> dict[str, Pipeline]:
        policy = self.policy
        options = [policy.pipeline_for(c) for c in policy.auto_candidates()] + [Pipeline((policy.lossless,))]
        jobs = [(spec.name, option) for spec in auto for option in options]
        measured = self._measure_all(jobs, "auto: trying codecs")
        table = {spec.name: measured[i * len(options) : (i + 1) * len(options)] for i, spec in enumerate(auto)}
        if policy.max_ratio is None:
            assert policy.min_snr_db is not None
            return {name: pick(rows, policy.min_snr_db).pipeline for name, rows in table.items()}
        return self._within_ratio(table, fixed, policy.max_ratio)

    def _within_ratio(self, table: dict[str, list[Measured]], fixed: dict[str, Pipeline],
                      max_ratio: float) -> dict[str, Pipeline]:
        """The highest SNR floor (at least --min-snr) whose picks keep the whole model within ``max_ratio``."""
        fixed_sizes = self._measure_all(list(fixed.items()), "auto: sizing the rest")
        raw_total = sum(self._raw_bytes(name) for name in self.pieces)
        piece_count = sum(len(pieces) for pieces in self.pieces.values())
        budget = max_ratio * raw_total - sum(m.stored_bytes for m in fixed_sizes) - HEADER_ALLOWANCE * piece_count

        def size_at(floor: float) -> int:
            return sum(pick(rows, floor).stored_bytes for rows in table.values())

        floors = sorted({m.snr_db for rows in table.values() for m in rows if math.isfinite(m.snr_db)})
        floor_min = self.policy.min_snr_db if self.policy.min_snr_db is not None else -math.inf
        floors = [f for f in floors if f >= floor_min]
        lowest = size_at(floor_min)
        if lowest > budget:
            best = (lowest + max_ratio * raw_total - budget) / raw_total  # what the rest and headers add back
            raise InvalidInputError(
                f"--max-ratio {max_ratio}: the smallest choice stores {best:.4f} of the raw bytes"
                + (f" at --min-snr {floor_min}" if math.isfinite(floor_min) else ""))
        # size_at grows with the floor: bisect for the last floor within the budget.
        low, high = -1, len(floors)  # size_at(floors[low]) fits (low == -1: floor_min), floors[high] does not
        while high - low > 1:
            middle = (low + high) // 2
            if size_at(floors[middle]) <= budget:
                low = middle
            else:
                high = middle
        floor = floors[low] if low >= 0 else floor_min
        return {name: pick(rows, floor).pipeline for name, rows in table.items()}


def pick(rows: Iterable[Measured], min_snr_db: float) -> Measured:
    """The smallest measured option with at least ``min_snr_db`` (lossless always qualifies); ties to higher SNR."""
    qualified = [m for m in rows if m.snr_db >= min_snr_db]
    return min(qualified, key=lambda m: (m.stored_bytes, -m.snr_db))


def piece_info(piece: PiecePlan) -> PieceInfo:
    return PieceInfo(piece.tensor.dtype, piece.shape)


def load_policy_file(path: str | Path) -> dict[str, Any]:
    """A policy file's settings (JSON, or YAML for ``.yaml`` / ``.yml``), checked for unknown keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"policy file {path}: {exc.strerror or exc}") from None
    data: Any
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError or ValueError: either way, one line naming the file
        raise InvalidInputError(f"policy file {path}: not valid {'YAML' if path.suffix != '.json' else 'JSON'}: "
                                f"{' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"policy file {path}: expected an object of settings")
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        known = ", ".join(sorted(_FILE_KEYS))
        raise InvalidInputError(f"policy file {path}: unknown key {unknown[0]!r} (known: {known})")
    return data


def _file_rules(raw: Any, path: str) -> list[Rule]:
    if not isinstance(raw, list):
        raise InvalidInputError(f"policy file {path}: rules must be a list")
    rules = []
    for item in raw:
        if isinstance(item, str):
            rules.append(parse_rule(item, f"policy file {path}: rule"))
        elif isinstance(item, dict) and set(item) == {"pattern", "codec"} and all(
                isinstance(v, str) for v in item.values()):
            rules.append(parse_rule(f"{item['pattern']}={item['codec']}", f"policy file {path}: rule"))
        else:
            raise InvalidInputError(f"policy file {path}: a rule is 'PATTERN=CODEC' or {{pattern, codec}}: {item!r}")
    return rules


def _number(value: Any, what: str, kind: Callable[[Any], Any] = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"{what} must be a number, got {value!r}")
    return kind(value)


def build_policy(
    lossy: Sequence[str] = (),
    policy_file: str | Path | None = None,
    *,
    codec: Codec | str = DEFAULT_CODEC_NAME,
    min_snr_db: float | None = None,
    max_ratio: float | None = None,
) -> Policy:
    """A policy from the CLI's pieces: ``--lossy`` rules come before the file's, flags override its budget."""
    settings: dict[str, Any] = load_policy_file(policy_file) if policy_file is not None else {}
    where = f"policy file {policy_file}"
    rules = [parse_rule(text) for text in lossy] + _file_rules(settings.get("rules", []), str(policy_file))
    keep = settings.get("keep_lossless", list(DEFAULT_KEEP_LOSSLESS))
    if not isinstance(keep, list) or not all(isinstance(p, str) for p in keep):
        raise InvalidInputError(f"{where}: keep_lossless must be a list of patterns")
    candidates: list[Codec] = []
    for text in settings.get("candidates", []):
        candidate = parse_spec(str(text), f"{where}: candidate {text!r}")
        if candidate is None or candidate.lossless:
            raise InvalidInputError(f"{where}: candidate {text!r}: auto candidates are lossy codecs "
                                    "(lossless is always tried)")
        candidates.append(candidate)
    min_elements = _number(settings.get("min_elements", DEFAULT_MIN_ELEMENTS), f"{where}: min_elements", int)
    if min_snr_db is None and "min_snr_db" in settings:
        min_snr_db = _number(settings["min_snr_db"], f"{where}: min_snr_db")
    if max_ratio is None and "max_ratio" in settings:
        max_ratio = _number(settings["max_ratio"], f"{where}: max_ratio")
    lossless = codec_from_name(codec) if isinstance(codec, str) else codec
    return Policy(tuple(rules), lossless, tuple(keep), min_elements, min_snr_db, max_ratio, tuple(candidates))
