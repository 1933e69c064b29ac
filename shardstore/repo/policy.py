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
from shardstore.repo.quality import EncodedStream, ErrorStats, PieceOriginal, measure_piece
from shardstore.textfile import read_user_text

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
        prepared: Prepared | None = None,
    ) -> dict[str, Pipeline]:
        """The pipeline of every tensor in ``plans`` (auto tensors are measured on their data in ``views``).

        ``prepared``, when given, receives the streams the auto mode already
        encoded for the pipelines it chose, keyed by (tensor, rows).
        """
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
            pipelines, streams = chooser.choose(auto, chosen)
            chosen.update(pipelines)
            if prepared is not None:
                prepared.update(streams)
        return {spec.name: chosen[spec.name] for spec in specs}


@dataclass(frozen=True)
class Measured:
    pipeline: Pipeline
    stored_bytes: int
    error: ErrorStats
    # Each piece's stream, kept while this option may still be chosen (push then stores it as is).
    streams: tuple[EncodedStream, ...] | None = None

    @property
    def snr_db(self) -> float:
        return self.error.snr_db

    def without_streams(self) -> Measured:
        return dataclasses.replace(self, streams=None)


# Candidate streams kept for push between measuring and storing: what the --lossy auto mode saves by
# not encoding its winners twice. Past this many bytes the remaining winners are encoded again.
KEEP_STREAM_BYTES = 1 << 30
Prepared = dict[tuple[str, tuple[int, int]], EncodedStream]  # (tensor, rows) -> the stream push stores


class _AutoChooser:
    """The automatic mode: measure every candidate on every auto tensor, then pick per tensor.

    Each candidate is encoded once: its streams are kept while it can still be
    picked, and the winners' are handed to push (``prepared``), which stores
    them without encoding again.
    """

    def __init__(self, policy: Policy, plans: Sequence[Sequence[PiecePlan]], views: dict[str, memoryview],
                 threads: int, progress: ProgressCallback | None, keep_bytes: int | None = None) -> None:
        self.policy = policy
        self.threads = threads
        self.progress = progress
        self.views = views
        self.keep_bytes = KEEP_STREAM_BYTES if keep_bytes is None else keep_bytes
        self.kept_bytes = 0
        self.pieces: dict[str, list[PiecePlan]] = {}
        for plan in plans:
            for piece in plan:
                self.pieces.setdefault(piece.tensor.name, []).append(piece)

    def _measure(self, job: tuple[str, list[Pipeline]]) -> list[Measured]:
        """Every option on one tensor, piece by piece (each piece converted once for all options)."""
        name, options = job
        stored = [0] * len(options)
        errors = [ErrorStats()] * len(options)
        streams: list[list[EncodedStream] | None] = [[] for _ in options]
        for piece in self.pieces[name]:
            start = piece.rows[0] * piece.tensor.row_bytes
            raw = self.views[name][start : start + piece.nbytes]
            info = piece_info(piece)
            original = PieceOriginal.of(raw, info) if not all(o.lossless for o in options) else None
            for index, option in enumerate(options):
                kept = streams[index]
                if kept is None:
                    continue  # refused on an earlier piece
                try:
                    stream = measure_piece(option, raw, info, original)
                except CodecError:  # NaN or infinity in the tensor: no quantizer takes it, lossless does
                    streams[index] = None
                    stored[index], errors[index] = 1 << 62, ErrorStats(squared_error=math.inf)
                    continue
                kept.append(stream)
                stored[index] += len(stream.data)
                errors[index] = errors[index] + (stream.error or ErrorStats())
        rows = [Measured(option, stored[i], errors[i], tuple(kept) if kept is not None else None)
                for i, (option, kept) in enumerate(zip(options, streams, strict=True))]
        return self._prune(rows)

    def _prune(self, rows: list[Measured]) -> list[Measured]:
        """Drop the streams of options that no floor can pick (only the figures matter for those)."""
        if len(rows) == 1:
            return rows
        if self.policy.max_ratio is None and self.policy.min_snr_db is not None:
            winner = pick(rows, self.policy.min_snr_db)
            return [row if row is winner else row.without_streams() for row in rows]

        def beats(b: Measured, a: Measured, b_first: bool) -> bool:
            # b qualifies whenever a does and pick() prefers it: a is never picked.
            key_b, key_a = (b.stored_bytes, -b.snr_db), (a.stored_bytes, -a.snr_db)
            return b.snr_db >= a.snr_db and (key_b < key_a or (key_b == key_a and b_first))

        return [row if not any(beats(other, row, j < i) for j, other in enumerate(rows) if j != i)
                else row.without_streams() for i, row in enumerate(rows)]

    def _raw_bytes(self, name: str) -> int:
        return sum(p.nbytes for p in self.pieces[name])

    def _measure_all(self, jobs: list[tuple[str, list[Pipeline]]], label: str) -> dict[str, list[Measured]]:
        table: dict[str, list[Measured]] = {}
        advance = progress_task(self.progress, label, sum(self._raw_bytes(n) * len(o) for n, o in jobs))
        for (name, options), rows in zip(jobs, ordered_map(self._measure, jobs, self.threads), strict=True):
            table[name] = [self._keep(row) for row in rows]
            advance(self._raw_bytes(name) * len(options))
        return table

    def _keep(self, row: Measured) -> Measured:
        """Hold a row's streams only within the budget (memory stays bounded on any model)."""
        if row.streams is None:
            return row
        size = sum(len(s.data) for s in row.streams)
        if self.kept_bytes + size > self.keep_bytes:
            return row.without_streams()
        self.kept_bytes += size
        return row

    def _prepared(self, chosen: dict[str, Measured]) -> Prepared:
        return {(name, piece.rows): stream for name, row in chosen.items() if row.streams is not None
                for piece, stream in zip(self.pieces[name], row.streams, strict=True)}

    def choose(self, auto: list[TensorSpec], fixed: dict[str, Pipeline]) -> tuple[dict[str, Pipeline], Prepared]:
        policy = self.policy
        options = [policy.pipeline_for(c) for c in policy.auto_candidates()] + [Pipeline((policy.lossless,))]
        table = self._measure_all([(spec.name, options) for spec in auto], "auto: trying codecs")
        if policy.max_ratio is None:
            assert policy.min_snr_db is not None
            chosen = {name: pick(rows, policy.min_snr_db) for name, rows in table.items()}
            return {name: row.pipeline for name, row in chosen.items()}, self._prepared(chosen)
        return self._within_ratio(table, fixed, policy.max_ratio)

    def _within_ratio(self, table: dict[str, list[Measured]], fixed: dict[str, Pipeline],
                      max_ratio: float) -> tuple[dict[str, Pipeline], Prepared]:
        """The highest SNR floor (at least --min-snr) whose picks keep the whole model within ``max_ratio``."""
        fixed_sizes = self._measure_all([(name, [pipeline]) for name, pipeline in fixed.items()],
                                        "auto: sizing the rest")
        raw_total = sum(self._raw_bytes(name) for name in self.pieces)
        piece_count = sum(len(pieces) for pieces in self.pieces.values())
        fixed_bytes = sum(rows[0].stored_bytes for rows in fixed_sizes.values())
        budget = max_ratio * raw_total - fixed_bytes - HEADER_ALLOWANCE * piece_count

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
        chosen = {name: pick(rows, floor) for name, rows in table.items()}
        chosen.update({name: rows[0] for name, rows in fixed_sizes.items()})
        pipelines = {name: row.pipeline for name, row in chosen.items() if name not in fixed}
        return pipelines, self._prepared(chosen)


def pick(rows: Iterable[Measured], min_snr_db: float) -> Measured:
    """The smallest measured option with at least ``min_snr_db`` (lossless always qualifies); ties to higher SNR."""
    qualified = [m for m in rows if m.snr_db >= min_snr_db]
    return min(qualified, key=lambda m: (m.stored_bytes, -m.snr_db))


def piece_info(piece: PiecePlan) -> PieceInfo:
    return PieceInfo(piece.tensor.dtype, piece.shape)


def load_policy_file(path: str | Path) -> dict[str, Any]:
    """A policy file's settings (JSON, or YAML for ``.yaml`` / ``.yml``), checked for unknown keys."""
    path = Path(path)
    text = read_user_text(path, "policy file")
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
