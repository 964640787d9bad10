"""``harmonica bench``: the benchmark results (``benchmarks/results/*.json``) as markdown tables.

The files are written by ``pytest benchmarks`` (see ``benchmarks/conftest.py``): one per suite and
device, ``{"suite", "device", "torch", "size", "date", ..., "rows": [...]}``. Every table names the
device, torch version, op backend, size convention and date of the run it shows, and links its
JSON file. Known suites get their own layout (``kernels``: fused vs unfused time, ratio and share
of the copy bandwidth per dtype; ``e2e``: measured speedup, with its range over rounds, next to the
cache usage ratio, the FLOP-ideal speedup and, where recorded, the non-view ops per run); any other
suite (e.g. ``training``) is shown as a plain table of its rows.

A README keeps generated tables between marker comments, which :func:`update_readme` rewrites in
place (atomically) and nothing else::

    <!-- harmonica-bench:begin e2e -->      (a suite name, or none for every suite)
    ...generated...
    <!-- harmonica-bench:end -->
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_results", "render", "render_payload", "update_readme"]

BEGIN = re.compile(r"<!-- harmonica-bench:begin(?:[ \t]+(?P<suite>[\w.-]+))?[ \t]*-->")
END = "<!-- harmonica-bench:end -->"
SUITE_ORDER = ("kernels", "e2e", "training")
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_E2E_NAMES = {
    "uncached": "uncached",
    "full": "`CacheSchedule.full`",
    "fora2": "FORA N=2",
    "fora3": "FORA N=3",
    "forecast3": "FORA N=3 + order-2 forecast",
    "mask37": "`from_mask`, CUR 37.5 %",
}


def load_results(
    directory: str | os.PathLike[str], suites: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """The result files in ``directory`` (files without ``suite`` and ``rows`` are skipped), each
    with its ``path`` added, ordered by suite (kernels, e2e, training, others) then device.

    Raises:
        FileNotFoundError: the folder does not exist or holds no result file (of those suites).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"no results folder {folder}; run `pytest benchmarks` first")
    wanted = set(suites) if suites else None
    payloads = []
    for path in sorted(folder.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
            continue
        if "suite" not in payload:
            continue
        if wanted is not None and payload["suite"] not in wanted:
            continue
        payload["path"] = str(path)
        payloads.append(payload)
    if not payloads:
        which = f" for suites {', '.join(sorted(wanted))}" if wanted else ""
        raise FileNotFoundError(f"no benchmark results{which} in {folder}; run `pytest benchmarks` first")

    def order(p: dict[str, Any]) -> tuple[Any, ...]:
        suite = p["suite"]
        rank = SUITE_ORDER.index(suite) if suite in SUITE_ORDER else len(SUITE_ORDER)
        return (rank, suite, p.get("device_type") != "cuda", str(p.get("device")), p["path"])

    return sorted(payloads, key=order)


def render(payloads: Sequence[dict[str, Any]], *, link_from: str | os.PathLike[str] | None = None) -> str:
    """Markdown for every payload; links to the JSON files are relative to folder ``link_from``."""
    return "\n\n".join(render_payload(p, link_from=link_from) for p in payloads) + "\n"


def render_payload(payload: dict[str, Any], *, link_from: str | os.PathLike[str] | None = None) -> str:
    """Markdown for one result file: a line naming the run, then its table(s)."""
    suite = payload["suite"]
    rows = payload["rows"]
    parts = [_run_line(payload, link_from)]
    if not rows:
        parts.append("(no rows)")
    elif suite == "kernels":
        parts.extend(_kernel_tables(rows))
    elif suite == "e2e":
        parts.extend(_e2e_tables(rows))
    else:
        parts.extend(_generic_tables(rows))
    return "\n\n".join(parts)


def update_readme(
    readme: str | os.PathLike[str],
    payloads: Sequence[dict[str, Any]],
    suites: Iterable[str] | None = None,
) -> int:
    """Rewrites every marked section of ``readme`` with the tables of its suite (all suites for a
    marker without one); returns how many sections were written. With ``suites`` (the suites
    ``payloads`` was loaded for), the sections marked with another suite are left as they are. The
    file is replaced atomically.

    Raises:
        ValueError: no markers, or a begin marker without its end marker.
    """
    path = Path(readme)
    text = path.read_text()
    out: list[str] = []
    position = 0
    sections = 0
    found = False
    for match in BEGIN.finditer(text):
        if match.start() < position:  # a begin marker inside a section being replaced
            continue
        end = text.find(END, match.end())
        if end < 0:
            raise ValueError(f"{path}: {match.group(0)} has no {END} after it")
        suite = match.group("suite")
        if suites is not None and suite is not None and suite not in set(suites):
            found = True
            continue  # another suite's section: its results were not loaded
        chosen = [p for p in payloads if suite is None or p["suite"] == suite]
        body = render(chosen, link_from=path.parent) if chosen else f"(no `{suite}` results yet)\n"
        out += [text[position : match.end()], "\n", body, text[end : end + len(END)]]
        position = end + len(END)
        sections += 1
    if sections == 0 and not found:
        raise ValueError(
            f"{path} has no generated-table markers; add `<!-- harmonica-bench:begin [suite] -->` and "
            f"`{END}` where the tables belong"
        )
    out.append(text[position:])
    new_text = "".join(out)
    if new_text != text:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            f.write(new_text)
        os.chmod(f.name, path.stat().st_mode & 0o777)
        os.replace(f.name, path)
    return sections


# -- formatting --


def _time(seconds: Any) -> str:
    if not _finite(seconds):
        return "–"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale or unit == "µs":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError


def _ratio(value: Any) -> str:
    return f"{value:.2f}×" if _finite(value) else "–"


def _pct(value: Any) -> str:
    return f"{value:.0f} %" if _finite(value) else "–"


def _cur(ratio: Any) -> str:
    return f"{100 * ratio:.1f} %" if _finite(ratio) else "–"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "–"
    if isinstance(value, (list, tuple)):
        return "×".join(str(v) for v in value)
    return str(value).replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _run_line(payload: dict[str, Any], link_from: str | os.PathLike[str] | None) -> str:
    facts = [f"torch {payload.get('torch', '?')}"]
    if payload.get("cuda"):
        facts[0] += f" (CUDA {payload['cuda']})"
    for key, label in (("backend", "op backend"), ("size", "size"), ("date", None), ("commit", "commit")):
        if payload.get(key):
            facts.append(f"{label} `{payload[key]}`" if label else str(payload[key]))
    line = f"**{payload['suite']}** on **{payload.get('device', 'unknown device')}**: " + ", ".join(facts)
    if "path" in payload:
        target = Path(payload["path"])
        href = os.path.relpath(target, link_from) if link_from is not None else target.as_posix()
        line += f" ([JSON]({Path(href).as_posix()}))"
    return line


def _first_seen(values: Iterable[Any]) -> list[Any]:
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


# -- kernels --


def _kernel_tables(rows: list[dict[str, Any]]) -> list[str]:
    """Per shape: one row per (op, fused backend, baseline), per dtype fused time, baseline time,
    baseline / fused, and the fused op's GB/s as a share of the measured copy bandwidth."""
    tables = []
    for shape in _first_seen(tuple(r.get("shape") or ()) for r in rows):
        of_shape = [r for r in rows if tuple(r.get("shape") or ()) == shape]
        dtypes = _first_seen(r.get("dtype") for r in of_shape)
        index = {(r.get("session"), r["op"], r["impl"], r.get("dtype")): r for r in of_shape}
        header = ["op", "fused", "vs"]
        for dtype in dtypes:
            short = _DTYPES.get(dtype, dtype)
            header += [f"{short} fused", f"{short} baseline", f"{short} ratio", f"{short} % copy bw"]
        body = []
        for op in _first_seen(r["op"] for r in of_shape):
            impls = _first_seen(r["impl"] for r in of_shape if r["op"] == op)
            for fused in (i for i in impls if i.startswith("fused")):
                for base in (i for i in impls if not i.startswith("fused")):
                    cells = [f"`{op}`", fused.removeprefix("fused").strip(" ()") or "fused", base]
                    for dtype in dtypes:
                        f_row, b_row = _pair(index, op, fused, base, dtype)
                        ratio = b_row["median_s"] / f_row["median_s"] if f_row and b_row else None
                        ratio = ((f_row or {}).get("paired_speedups") or {}).get(base, ratio)
                        cells += [
                            _time(f_row["median_s"]) if f_row else "–",
                            _time(b_row["median_s"]) if b_row else "–",
                            _ratio(ratio),
                            _pct(f_row.get("pct_copy_bandwidth")) if f_row else "–",
                        ]
                    body.append(cells)
        name = next((r.get("shape_name") for r in of_shape if r.get("shape_name")), None)
        title = f"Shape B, N, D = {', '.join(map(str, shape))}" + (f" ({name})" if name else "")
        if any(r.get("paired_speedups") for r in of_shape):
            title += "; ratios from interleaved pairs of calls"
        tables.append(f"{title}:\n\n" + _table(header, body))
    return tables


def _pair(index: dict, op: str, fused: str, base: str, dtype: Any) -> tuple[Any, Any]:
    """The fused and baseline rows of one op and dtype, from the same run (the latest such run)."""
    for session in sorted({k[0] for k in index if k[1:] == (op, fused, dtype)}, key=str, reverse=True):
        f_row, b_row = index.get((session, op, fused, dtype)), index.get((session, op, base, dtype))
        if b_row is not None:
            return f_row, b_row
    f_any = next((r for k, r in index.items() if k[1:] == (op, fused, dtype)), None)
    return f_any, None


# -- end to end --


def _e2e_tables(rows: list[dict[str, Any]]) -> list[str]:
    tables = []
    for group in _first_seen(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == group]
        header = ["schedule", "mode", "cache usage", "time", "paired uncached", "measured speedup",
                  "FLOP-ideal", "% of ideal"]  # fmt: skip
        with_ops = any("ops_per_run" in r for r in members)
        if with_ops:
            header.append("ops / run")
        body = []
        for r in sorted(members, key=_e2e_order):
            schedule = r.get("schedule", r["impl"].split(" ")[0])
            speedup = _ratio(r.get("speedup"))
            spread = [v for v in r.get("speedups") or () if _finite(v)]
            if len(spread) > 1:
                speedup += f" ({min(spread):.2f}–{max(spread):.2f})"
            if r.get("baseline"):
                speedup = "1.00× (baseline)"
            elif r.get("speedup_vs") == "uncached eager" and schedule == "uncached":
                speedup += " vs eager"
            body.append(
                [
                    _E2E_NAMES.get(schedule, str(schedule)),
                    str(r.get("mode", "eager")),
                    _cur(r.get("cache_usage_ratio")),
                    _time(r.get("median_s")),
                    _time(r.get("uncached_median_s")),
                    speedup,
                    _ratio(r.get("ideal_speedup")),
                    _pct(r.get("pct_of_ideal")),
                ]
                + ([_value(r.get("ops_per_run"))] if with_ops else [])
            )
        tables.append(f"{_e2e_title(group, members)}:\n\n" + _table(header, body))
    return tables


def _e2e_order(row: dict[str, Any]) -> tuple[int, int]:
    modes = ("eager", "graph")
    mode = row.get("mode", "eager")
    schedule = row.get("schedule", "")
    names = list(_E2E_NAMES)
    return (
        modes.index(mode) if mode in modes else len(modes),
        names.index(schedule) if schedule in names else len(names),
    )


def _e2e_title(group: str, rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    extra = []
    if r.get("backend"):
        extra.append(f"`{r['backend']}` ops")
    if r.get("threads") and r.get("device") == "cpu":
        extra.append(f"{r['threads']} thread{'s' if r['threads'] != 1 else ''}")
    if r.get("rounds"):
        pairing = "lockstep" if any(m.get("pairing") == "lockstep" for m in rows) else "paired"
        extra.append(f"median of {r['rounds']} {pairing} rounds")
    return f"{group}" + (f" ({', '.join(extra)})" if extra else "")


# -- anything else --

_SKIP = {"suite", "session", "group", "impl"}


_MAX_COLUMNS = 12


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    keys = _first_seen(
        k for r in rows for k, v in r.items() if k not in _SKIP and not isinstance(v, (dict, list))
    )
    priority = [k for k in ("median_s", "speedup") if k in keys]
    return priority + [k for k in keys if k not in priority]


def _generic_tables(rows: list[dict[str, Any]]) -> list[str]:
    """One table of every row, or, when the rows need more than :data:`_MAX_COLUMNS` columns
    together, one table per group (the rows of one measurement share their columns)."""
    if len(_columns(rows)) <= _MAX_COLUMNS:
        return [_generic_table(rows)]
    groups = _first_seen(r.get("group") for r in rows)
    return [_generic_table([r for r in rows if r.get("group") == g]) for g in groups]


def _generic_table(rows: list[dict[str, Any]]) -> str:
    keys = _columns(rows)[:_MAX_COLUMNS]
    header = ["group", "impl", *keys]
    body = []
    for r in rows:
        cells = [_value(r.get("group")), _value(r.get("impl"))]
        for k in keys:
            v = r.get(k)
            if k.endswith("_s") and _finite(v):
                cells.append(_time(v))
            elif k == "speedup" and _finite(v):
                cells.append(_ratio(v))
            else:
                cells.append(_value(v))
        body.append(cells)
    return _table(header, body)
