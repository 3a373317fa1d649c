"""The comparison report: Pod start-up per cache outcome, as a table, JSON, CSV and an HTML chart.

Owns the statistics (count, p50/p90/p99, mean, min, max, bytes pulled per outcome; the speed-up of
cache hits over starts without a cache), the filters (namespace, label selector, time window) and
every rendering. All of it is pure: it takes :class:`~vk_provider.domain.records.PodStartRecord`
values and returns values or text. The one I/O function, :func:`load_records`, reads them from
the registry database; ``vk-provider report`` and ``vk-provider simulate`` print the result.

Percentiles use the NEAREST-RANK method: the p-th percentile of n sorted values is the value at
rank ``ceil(p / 100 * n)`` (1-based), always an observed start-up time. It is what the SQL in
docs/report.md computes with ``row_number()``, so the numbers can be checked with ``sqlite3``.

Groups for the speed-up: *hits* are ``explicit_hit`` and ``auto_hit`` (a cache provided every
image); *without a cache* are ``miss`` and ``none`` (every image pulled). ``partial`` and
``failed`` belong to neither. Speed-up = p50 without / p50 with (and the same for the mean).

Must not: write to the database, or draw from a clock or a random generator (the chart's point
scatter is derived from a hash of the Pod's position, so the same data gives the same page).
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vk_provider.domain.labels import is_label_name, is_label_value, is_namespace_name
from vk_provider.domain.messages import first_line
from vk_provider.domain.records import CacheOutcome, PodStartRecord

PERCENTILE_METHOD = "nearest-rank"
OUTCOME_ORDER: tuple[CacheOutcome, ...] = tuple(CacheOutcome)
HIT_OUTCOMES = frozenset({CacheOutcome.EXPLICIT_HIT, CacheOutcome.AUTO_HIT})
NO_CACHE_OUTCOMES = frozenset({CacheOutcome.MISS, CacheOutcome.NONE})
AXIS_LABEL = "Pod start-up (simulated seconds)"
CSV_COLUMNS = (
    "outcome",
    "pods",
    "p50_seconds",
    "p90_seconds",
    "p99_seconds",
    "mean_seconds",
    "min_seconds",
    "max_seconds",
    "mean_pull_seconds",
    "bytes_pulled",
    "mean_bytes_pulled",
)


class ReportError(ValueError):
    """Bad report input (a filter, a database that is missing or not a registry); one-line message."""


# ---- filters -----------------------------------------------------------------------------------

_KEY_PREFIX = re.compile(r"^[a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?$")
_SET_RE = re.compile(r"^\s*(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*$")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One term of a label selector. ``op``: ``=``, ``!=``, ``in``, ``notin``, ``exists``, ``!``."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        # != and notin match Pods without the label, as in Kubernetes.
        return not present or labels[self.key] not in self.values

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "!":
            return f"!{self.key}"
        if self.op in ("=", "!="):
            return f"{self.key}{self.op}{self.values[0]}"
        return f"{self.key} {self.op} ({','.join(self.values)})"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A Kubernetes label selector (equality- and set-based); every requirement must hold."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(requirement) for requirement in self.requirements)


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses (``a in (x,y),b=c`` is two terms)."""
    terms: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(char)
    terms.append("".join(current))
    return terms


def _check_key(key: str, term: str) -> str:
    prefix, slash, name = key.rpartition("/")
    if (slash and not _KEY_PREFIX.match(prefix)) or not is_label_name(name):
        raise ReportError(f"label selector {term.strip()!r}: invalid label key {key!r}")
    return key


def _check_value(value: str, term: str) -> str:
    if not is_label_value(value):
        raise ReportError(f"label selector {term.strip()!r}: invalid label value {value!r}")
    return value


def parse_selector(text: str) -> LabelSelector:
    """Parse ``kubectl -l`` syntax: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a)``,
    ``k``, ``!k``, comma separated. Raises :class:`ReportError` naming the bad term."""
    if not text.strip():
        return LabelSelector()
    if text.count("(") != text.count(")"):
        raise ReportError(f"label selector {text!r}: unbalanced parentheses")
    requirements: list[Requirement] = []
    for term in _split_terms(text):
        stripped = term.strip()
        if not stripped:
            raise ReportError(f"label selector {text!r}: empty term")
        found = _SET_RE.match(stripped)
        if found is not None:
            if not found["values"].strip():
                raise ReportError(
                    f"label selector {text!r}: {found['op']} needs at least one value in {term.strip()!r}"
                )
            values = tuple(_check_value(value.strip(), term) for value in found["values"].split(","))
            requirements.append(Requirement(_check_key(found["key"], term), found["op"], values))
            continue
        for op, kind in (("!=", "!="), ("==", "="), ("=", "=")):
            if op in stripped:
                key, value = stripped.split(op, 1)
                requirements.append(
                    Requirement(_check_key(key.strip(), term), kind, (_check_value(value.strip(), term),))
                )
                break
        else:
            if stripped.startswith("!"):
                requirements.append(Requirement(_check_key(stripped[1:].strip(), term), "!"))
            else:
                requirements.append(Requirement(_check_key(stripped, term), "exists"))
    return LabelSelector(tuple(requirements))


def parse_time(text: str, flag: str) -> datetime:
    """An ISO 8601 time (``2026-01-01T10:00``, ``…Z``, ``…+02:00``); without an offset it is UTC."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReportError(f"{flag} {text!r}: not an ISO 8601 time (e.g. 2026-01-01T10:00:00Z)") from None
    try:
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00 is before the year 1 in UTC
        raise ReportError(f"{flag} {text!r}: out of range once in UTC (years 1 to 9999)") from None


@dataclass(frozen=True, slots=True)
class ReportFilter:
    """Which Pod starts the report covers; ``since`` inclusive, ``until`` exclusive, on ``started_at``."""

    namespace: str | None = None
    selector: LabelSelector = field(default_factory=LabelSelector)
    since: datetime | None = None
    until: datetime | None = None

    def problems(self) -> tuple[str, ...]:
        if self.namespace is not None and not is_namespace_name(self.namespace):
            return (f"--namespace {self.namespace!r}: not a namespace name (lowercase letters, digits and '-')",)
        if self.since is not None and self.until is not None and self.until <= self.since:
            return (f"--until {self.until.isoformat()} is not after --since {self.since.isoformat()}",)
        return ()

    def matches(self, record: PodStartRecord) -> bool:
        if self.namespace is not None and record.namespace != self.namespace:
            return False
        if self.since is not None and record.started_at < self.since:
            return False
        if self.until is not None and record.started_at >= self.until:
            return False
        return self.selector.matches(dict(record.labels))

    def describe(self) -> dict[str, str]:
        shown: dict[str, str] = {}
        if self.namespace is not None:
            shown["namespace"] = self.namespace
        if self.selector.requirements:
            shown["selector"] = str(self.selector)
        if self.since is not None:
            shown["since"] = _iso(self.since)
        if self.until is not None:
            shown["until"] = _iso(self.until)
        return shown


# ---- statistics --------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values: the value at 1-based rank ceil(p/100 · n).

    ``p`` in (0, 100]; p50 of [1, 2, 3, 4] is 2, p99 of 100 values is the 99th smallest.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    # The small epsilon keeps p·n that is an integer in exact arithmetic (e.g. 0.9 · 10) from
    # rounding up to the next rank through binary floating point.
    rank = max(1, math.ceil(p * len(sorted_values) / 100 - 1e-9))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class OutcomeStats:
    """Start-up statistics of one cache outcome; seconds are simulated, bytes compressed."""

    outcome: CacheOutcome
    pods: int
    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    mean_pull_seconds: float
    bytes_pulled: int
    startup_seconds: tuple[float, ...]
    """Every start-up time of the outcome, sorted (the chart draws them)."""

    @property
    def mean_bytes_pulled(self) -> float:
        return self.bytes_pulled / self.pods

    def quartiles(self) -> tuple[float, float]:
        return percentile(self.startup_seconds, 25), percentile(self.startup_seconds, 75)


@dataclass(frozen=True, slots=True)
class Speedup:
    """How much faster cache hits start than starts without a cache (ratios of seconds)."""

    hit_pods: int
    no_cache_pods: int
    hit_p50: float
    no_cache_p50: float
    hit_mean: float
    no_cache_mean: float

    @property
    def p50_ratio(self) -> float:
        return self.no_cache_p50 / self.hit_p50 if self.hit_p50 > 0 else math.inf

    @property
    def mean_ratio(self) -> float:
        return self.no_cache_mean / self.hit_mean if self.hit_mean > 0 else math.inf


@dataclass(frozen=True, slots=True)
class Comparison:
    """The report: one row per outcome present (in :data:`OUTCOME_ORDER`), and the speed-up
    when both hits and starts without a cache are present."""

    rows: tuple[OutcomeStats, ...]
    speedup: Speedup | None
    filters: Mapping[str, str] = field(default_factory=dict)
    # The speed-up over only the Pods whose image set is among both the hits and the starts without
    # a cache (None when no image set is).
    same_images: Speedup | None = None

    @property
    def pods(self) -> int:
        return sum(row.pods for row in self.rows)

    @property
    def images_differ(self) -> bool:
        """Whether the same-images speed-up leaves out some of the Pods the speed-up covers."""
        every, same = self.speedup, self.same_images
        if every is None:
            return False
        return same is None or same.hit_pods + same.no_cache_pods < every.hit_pods + every.no_cache_pods


def _stats(outcome: CacheOutcome, records: Sequence[PodStartRecord]) -> OutcomeStats:
    values = tuple(sorted(record.startup_seconds for record in records))
    count = len(values)
    return OutcomeStats(
        outcome=outcome,
        pods=count,
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
        mean=math.fsum(values) / count,
        min=values[0],
        max=values[-1],
        mean_pull_seconds=math.fsum(record.pull_seconds for record in records) / count,
        bytes_pulled=sum(record.bytes_pulled for record in records),
        startup_seconds=values,
    )


def _speedup(hits: Sequence[PodStartRecord], without: Sequence[PodStartRecord]) -> Speedup | None:
    if not hits or not without:
        return None
    hit = sorted(record.startup_seconds for record in hits)
    none = sorted(record.startup_seconds for record in without)
    return Speedup(
        hit_pods=len(hit),
        no_cache_pods=len(none),
        hit_p50=percentile(hit, 50),
        no_cache_p50=percentile(none, 50),
        hit_mean=math.fsum(hit) / len(hit),
        no_cache_mean=math.fsum(none) / len(none),
    )


def _image_set(record: PodStartRecord) -> frozenset[str]:
    return frozenset(image.reference for image in record.images)


def build_comparison(records: Iterable[PodStartRecord], report_filter: ReportFilter | None = None) -> Comparison:
    """Compare start-up per cache outcome over the ``records`` the filter keeps."""
    chosen = report_filter or ReportFilter()
    kept = [record for record in records if chosen.matches(record)]
    by_outcome: dict[CacheOutcome, list[PodStartRecord]] = {}
    for record in kept:
        by_outcome.setdefault(record.outcome, []).append(record)
    rows = tuple(_stats(outcome, by_outcome[outcome]) for outcome in OUTCOME_ORDER if outcome in by_outcome)
    hits = [record for record in kept if record.outcome in HIT_OUTCOMES]
    without = [record for record in kept if record.outcome in NO_CACHE_OUTCOMES]
    speedup = _speedup(hits, without)
    # A mix of images (small ones hit, big ones pulled) can say anything: the same images only.
    both = {_image_set(record) for record in hits} & {_image_set(record) for record in without}
    same_hits = [record for record in hits if _image_set(record) in both]
    same_without = [record for record in without if _image_set(record) in both]
    return Comparison(
        rows=rows,
        speedup=speedup,
        filters=chosen.describe(),
        same_images=_speedup(same_hits, same_without),
    )


# ---- text, JSON, CSV ---------------------------------------------------------------------------


def format_bytes(count: float) -> str:
    """Bytes in decimal units (as registries show image sizes): 0 B, 950 kB, 39.0 MB, 1.23 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.3g} {unit}" if count / scale < 100 else f"{count / scale:.0f} {unit}"
    return f"{count:.0f} B"


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _ratio(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}x"


def render_text(comparison: Comparison) -> str:
    """A fixed-width table, then the speed-up; the last line says how percentiles are computed."""
    filters = ", ".join(f"{key}={value}" for key, value in comparison.filters.items()) or "none"
    lines = [
        f"Pod start-up by cache outcome ({comparison.pods} Pods; filters: {filters})",
        "",
    ]
    header = ("outcome", "pods", "p50 s", "p90 s", "p99 s", "mean s", "max s", "pulled", "pulled/pod")
    table = [header]
    for row in comparison.rows:
        table.append(
            (
                row.outcome.value,
                str(row.pods),
                _seconds(row.p50),
                _seconds(row.p90),
                _seconds(row.p99),
                _seconds(row.mean),
                _seconds(row.max),
                format_bytes(row.bytes_pulled),
                format_bytes(row.mean_bytes_pulled),
            )
        )
    widths = [max(len(cells[index]) for cells in table) for index in range(len(header))]
    for cells in table:
        first = cells[0].ljust(widths[0])
        rest = "  ".join(cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        lines.append(f"{first}  {rest}")
    if not comparison.rows:
        lines.append("(no Pod starts match)")
    lines.append("")
    speedup = comparison.speedup
    if speedup is None:
        lines.append("speed-up: needs both cache hits (explicit_hit, auto_hit) and starts without a cache (miss, none)")
    else:
        lines.append(
            f"speed-up of cache hits ({speedup.hit_pods} Pods) over starts without a cache "
            f"({speedup.no_cache_pods} Pods){_told(speedup)}"
        )
        same = comparison.same_images
        if comparison.images_differ and same is None:
            lines.append(
                "  but no Pods of the same images both hit a cache and started without one: this compares "
                "different images (narrow it with --namespace or --selector)"
            )
        elif comparison.images_differ and same is not None:
            lines.append(
                f"  the same, over Pods of the same images only ({same.hit_pods} hits, "
                f"{same.no_cache_pods} without a cache){_told(same)}"
            )
    lines.append(
        "times are simulated seconds, from the Pod taken (or arrived) to all containers started; "
        "percentiles: nearest-rank"
    )
    return "\n".join(lines) + "\n"


def _told(speedup: Speedup) -> str:
    return (
        f": {_ratio(speedup.p50_ratio)} at p50 "
        f"({_seconds(speedup.hit_p50)} s vs {_seconds(speedup.no_cache_p50)} s), "
        f"{_ratio(speedup.mean_ratio)} by mean "
        f"({_seconds(speedup.hit_mean)} s vs {_seconds(speedup.no_cache_mean)} s)"
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def comparison_to_dict(comparison: Comparison) -> dict[str, Any]:
    """The JSON document: every number unrounded, seconds simulated, bytes compressed."""
    speedup = comparison.speedup
    return {
        "percentile_method": PERCENTILE_METHOD,
        "units": {"seconds": "simulated seconds", "bytes": "compressed bytes"},
        "filters": dict(comparison.filters),
        "pods": comparison.pods,
        "outcomes": [
            {
                "outcome": row.outcome.value,
                "pods": row.pods,
                "p50_seconds": row.p50,
                "p90_seconds": row.p90,
                "p99_seconds": row.p99,
                "mean_seconds": row.mean,
                "min_seconds": row.min,
                "max_seconds": row.max,
                "mean_pull_seconds": row.mean_pull_seconds,
                "bytes_pulled": row.bytes_pulled,
                "mean_bytes_pulled": row.mean_bytes_pulled,
            }
            for row in comparison.rows
        ],
        "speedup": _speedup_dict(speedup),
        # Over only the Pods whose image set both hit a cache and started without one.
        "speedup_same_images": _speedup_dict(comparison.same_images),
        "images_differ": comparison.images_differ,
    }


def _speedup_dict(speedup: Speedup | None) -> dict[str, Any] | None:
    if speedup is None:
        return None
    return {
        "hit_outcomes": sorted(outcome.value for outcome in HIT_OUTCOMES),
        "no_cache_outcomes": sorted(outcome.value for outcome in NO_CACHE_OUTCOMES),
        "hit_pods": speedup.hit_pods,
        "no_cache_pods": speedup.no_cache_pods,
        "hit_p50_seconds": speedup.hit_p50,
        "no_cache_p50_seconds": speedup.no_cache_p50,
        "hit_mean_seconds": speedup.hit_mean,
        "no_cache_mean_seconds": speedup.no_cache_mean,
        "p50_ratio": _finite(speedup.p50_ratio),
        "mean_ratio": _finite(speedup.mean_ratio),
    }


def render_json(comparison: Comparison) -> str:
    return json.dumps(comparison_to_dict(comparison), indent=2) + "\n"


def render_csv(comparison: Comparison) -> str:
    """One row per outcome with :data:`CSV_COLUMNS` (the speed-up is in the text and JSON forms)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in comparison_to_dict(comparison)["outcomes"]:
        writer.writerow([row[column] for column in CSV_COLUMNS])
    return buffer.getvalue()


# ---- the chart ---------------------------------------------------------------------------------

_COLOURS = {
    CacheOutcome.EXPLICIT_HIT: "#1b9e77",
    CacheOutcome.AUTO_HIT: "#66a61e",
    CacheOutcome.PARTIAL: "#e6ab02",
    CacheOutcome.MISS: "#d95f02",
    CacheOutcome.NONE: "#7570b3",
    CacheOutcome.FAILED: "#e7298a",
}
_DESCRIPTIONS = {
    CacheOutcome.EXPLICIT_HIT: "the Pod named a cache",
    CacheOutcome.AUTO_HIT: "automatic match",
    CacheOutcome.PARTIAL: "cache lacked some images",
    CacheOutcome.MISS: "automatic, no cache matched",
    CacheOutcome.NONE: "no cache asked for",
    CacheOutcome.FAILED: "could not start: its cache",
}
_MAX_POINTS = 2000
"""Points drawn per outcome; beyond that an even sample of ranks (the box still uses all)."""


@dataclass(frozen=True, slots=True)
class _Scale:
    low: float
    high: float
    top: float
    bottom: float
    log: bool

    def y(self, value: float) -> float:
        if self.log:
            value = max(value, self.low)
            share = (math.log10(value) - math.log10(self.low)) / (math.log10(self.high) - math.log10(self.low))
        else:
            share = (value - self.low) / (self.high - self.low)
        return self.bottom - share * (self.bottom - self.top)

    def ticks(self) -> list[float]:
        if self.log:
            ticks: list[float] = []
            exponent = math.floor(math.log10(self.low))
            while 10**exponent <= self.high * 1.0001:
                for mantissa in (1, 2, 5):
                    tick = mantissa * 10.0**exponent
                    if self.low * 0.9999 <= tick <= self.high * 1.0001:
                        ticks.append(tick)
                exponent += 1
            return ticks
        step = _nice_step(self.high - self.low)
        count = math.floor((self.high - self.low) / step + 1e-9)
        return [self.low + step * index for index in range(count + 1)]


def _nice_step(span: float, target: int = 8) -> float:
    raw = span / target
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for multiple in (1.0, 2.0, 2.5, 5.0, 10.0):
        if multiple * magnitude >= raw:
            return multiple * magnitude
    return 10 * magnitude  # pragma: no cover - the loop always returns


def _scale(rows: Sequence[OutcomeStats], top: float, bottom: float) -> _Scale:
    high = max((row.max for row in rows), default=1.0)
    positive = [row.min for row in rows if row.min > 0]
    low = min(positive, default=high)
    # A log axis when the fastest and slowest differ by more than 50x: hits then stay readable
    # beside misses that a saturated registry made slow.
    if high > 0 and low > 0 and high / low > 50:
        return _Scale(10 ** math.floor(math.log10(low)), 10 ** math.ceil(math.log10(high)), top, bottom, True)
    step = _nice_step(max(high, 1e-9))
    return _Scale(0.0, max(step, math.ceil(high / step - 1e-9) * step), top, bottom, False)


def _spread(index: int) -> float:
    """A stable offset in [-1, 1] for the index-th point, so points do not hide each other."""
    digest = hashlib.sha256(str(index).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 0xFFFFFFFF * 2 - 1


def _tick_label(value: float) -> str:
    return f"{value:g}"


def render_svg(comparison: Comparison) -> str:
    """Box-and-strip plots of start-up per outcome, side by side, on one labelled axis."""
    rows = comparison.rows
    column = 150
    left, right, top, bottom = 90, 30, 50, 400
    width = left + right + column * max(1, len(rows))
    height = bottom + 110
    scale = _scale(rows, top, bottom)
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(AXIS_LABEL)} by cache outcome" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="{width / 2:.1f}" y="24" text-anchor="middle" font-size="15" font-weight="bold">'
        f"Pod start-up by cache outcome ({comparison.pods} Pods)</text>",
    ]
    for tick in scale.ticks():
        y = scale.y(tick)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(tick)}</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{bottom}" stroke="#333"/>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{bottom}" y2="{bottom}" stroke="#333"/>')
    axis = AXIS_LABEL + (", log scale" if scale.log else "")
    middle = (top + bottom) / 2
    out.append(
        f'<text x="22" y="{middle:.1f}" text-anchor="middle" transform="rotate(-90 22 {middle:.1f})" '
        f'font-size="13">{html.escape(axis)}</text>'
    )
    if not rows:
        out.append(f'<text x="{width / 2:.1f}" y="{middle:.1f}" text-anchor="middle">no Pod starts match</text>')
    for index, row in enumerate(rows):
        colour = _COLOURS[row.outcome]
        centre = left + column * index + column / 2
        values = row.startup_seconds
        step = max(1, math.ceil(len(values) / _MAX_POINTS))
        out.append(f'<g class="outcome" data-outcome="{row.outcome.value}">')
        for rank in range(0, len(values), step):
            x = centre + _spread(rank) * column * 0.3
            out.append(
                f'<circle cx="{x:.1f}" cy="{scale.y(values[rank]):.1f}" r="2.2" fill="{colour}" fill-opacity="0.35"/>'
            )
        q1, q3 = row.quartiles()
        box = column * 0.22
        out.append(
            f'<line x1="{centre:.1f}" x2="{centre:.1f}" y1="{scale.y(row.min):.1f}" y2="{scale.y(row.max):.1f}" '
            'stroke="#333" stroke-width="1"/>'
        )
        out.append(
            f'<rect x="{centre - box:.1f}" y="{scale.y(q3):.1f}" width="{2 * box:.1f}" '
            f'height="{max(1.0, scale.y(q1) - scale.y(q3)):.1f}" fill="{colour}" fill-opacity="0.25" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        for value, style in (
            (row.p50, 'stroke="#111" stroke-width="3"'),
            (row.p90, 'stroke="#111" stroke-dasharray="4 3"'),
        ):
            y = scale.y(value)
            out.append(f'<line x1="{centre - box:.1f}" x2="{centre + box:.1f}" y1="{y:.1f}" y2="{y:.1f}" {style}/>')
        mean_y = scale.y(row.mean)
        out.append(f'<path d="M {centre:.1f} {mean_y - 5:.1f} l 5 5 l -5 5 l -5 -5 z" fill="#fff" stroke="#111"/>')
        out.append(
            f'<text x="{centre:.1f}" y="{bottom + 20}" text-anchor="middle" font-weight="bold" '
            f'fill="{colour}">{row.outcome.value}</text>'
        )
        out.append(
            f'<text x="{centre:.1f}" y="{bottom + 36}" text-anchor="middle" fill="#555">'
            f"{html.escape(_DESCRIPTIONS[row.outcome])}</text>"
        )
        out.append(f'<text x="{centre:.1f}" y="{bottom + 52}" text-anchor="middle">n = {row.pods}</text>')
        out.append(
            f'<text x="{centre:.1f}" y="{bottom + 68}" text-anchor="middle">p50 {_seconds(row.p50)} s, '
            f"p90 {_seconds(row.p90)} s</text>"
        )
        out.append("</g>")
    out.append(
        f'<text x="{left}" y="{height - 12}" fill="#555">box: p25 to p75; thick line: p50; dashed: p90; '
        "diamond: mean; whisker: min to max; dots: each Pod</text>"
    )
    out.append("</svg>")
    return "\n".join(out)


_PAGE_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
p.note { color: #555; }
"""


def render_html(comparison: Comparison, title: str = "vk-provider: Pod start-up by cache outcome") -> str:
    """A self-contained page (no external script, style or font): the chart, then the table."""
    header = "".join(
        f"<th>{html.escape(name)}</th>"
        for name in ("outcome", "pods", "p50 (s)", "p90 (s)", "p99 (s)", "mean (s)", "max (s)", "bytes pulled")
    )
    body_rows = "".join(
        f"<tr><td>{row.outcome.value}</td><td>{row.pods}</td><td>{_seconds(row.p50)}</td>"
        f"<td>{_seconds(row.p90)}</td><td>{_seconds(row.p99)}</td><td>{_seconds(row.mean)}</td>"
        f"<td>{_seconds(row.max)}</td><td>{format_bytes(row.bytes_pulled)}</td></tr>"
        for row in comparison.rows
    )
    filters = ", ".join(f"{key}={value}" for key, value in comparison.filters.items()) or "none"
    speedup = comparison.speedup
    speed = (
        "Speed-up needs both cache hits and starts without a cache."
        if speedup is None
        else f"Cache hits start {_ratio(speedup.p50_ratio)} faster at p50 ({_seconds(speedup.hit_p50)} s vs "
        f"{_seconds(speedup.no_cache_p50)} s) and {_ratio(speedup.mean_ratio)} faster by mean than starts "
        "without a cache (miss, none)."
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_PAGE_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">Filters: {html.escape(filters)}. Times are simulated seconds from the Pod taken (or arrived)
to all containers started; percentiles are nearest-rank.</p>
{render_svg(comparison)}
<p>{html.escape(speed)}</p>
<table><thead><tr>{header}</tr></thead><tbody>{body_rows}</tbody></table>
</body>
</html>
"""


def write_chart(comparison: Comparison, path: Path) -> Path:
    """Write the HTML page to ``path`` (directories made as needed); returns the absolute path.

    A chart replaces an earlier chart, never another file (the database, a workload file, …):
    raises :class:`ReportError` for an existing file that is not one; OSError if it cannot be written.
    """
    target = chart_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_html(comparison), encoding="utf-8")
    return target


def chart_target(path: Path) -> Path:
    """The absolute path a chart for ``path`` goes to; :class:`ReportError` if that is a file
    other than a chart (checked before a long run, and again when writing)."""
    target = path.expanduser().resolve()
    if not _replaceable(target):
        raise ReportError(f"--chart {path}: {target} exists and is not a vk-provider chart; not overwriting it")
    return target


def _replaceable(target: Path) -> bool:
    """Whether ``target`` is absent, empty or a chart this module wrote (its head says so)."""
    try:
        with target.open("rb") as file:
            head = file.read(1024)
    except (FileNotFoundError, IsADirectoryError):  # a directory: writing says so
        return True
    except OSError:  # unreadable: writing says why
        return True
    return not head or (head.startswith(b"<!DOCTYPE html>") and b"<title>vk-provider" in head)


def default_chart_path(db: str) -> Path:
    """``<db directory>/<db name>-report.html`` for a SQLite file; else in the working directory."""
    if "://" in db or db == ":memory:":
        return Path("vk-provider-report.html")
    path = Path(db).expanduser()
    return path.with_name(f"{path.stem}-report.html")


# ---- reading the database ----------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def load_records(db: str, report_filter: ReportFilter | None = None) -> tuple[PodStartRecord, ...]:
    """The Pod starts recorded in the registry at ``db`` that the filter keeps.

    Raises :class:`ReportError` if ``db`` is a path with no file, or a database without the
    registry's schema; namespace and time window are applied in SQL, the selector here.
    """
    from vk_provider.registry import migrate, open_registry
    from vk_provider.registry.engine import DatabaseArgumentError, existing_sqlite_file

    try:
        existing_sqlite_file(db)
    except DatabaseArgumentError as exc:
        raise ReportError(str(exc)) from None
    chosen = report_filter or ReportFilter()
    registry = await open_registry(db, read_only=True)  # a report never changes the file it reads
    try:
        try:
            revision = await migrate.current(registry.engine)
        except Exception as exc:  # a file that is not SQLite, a server that refuses us
            raise ReportError(f"cannot read registry database {db}: {first_line(exc)}") from None
        if revision is None:
            others = await migrate.other_tables(registry.engine)
            if others:  # something else's database: upgrading it would fail (or mix two schemas)
                raise ReportError(f"{db} is not a vk-provider registry: it holds other tables ({others})")
            raise ReportError(f"{db} has no registry schema (run `vk-provider db upgrade --db {db}`)")
        try:
            records = await registry.list_pod_starts(namespace=chosen.namespace, since=chosen.since, until=chosen.until)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:  # a row edited by hand, say
            raise ReportError(
                f"cannot read registry database {db}: a Pod start row holds a value vk-provider did not write "
                f"({first_line(exc)})"
            ) from None
    finally:
        await registry.close()
    return tuple(record for record in records if chosen.matches(record))
