"""PNG figures of result files, drawn with matplotlib's object API (no pyplot, no display needed).

A result file holds one run or a sweep (`{"runs": [...]}`, one run per request rate).
One run gets latency CDFs and each tenant's TTFT over time; several single runs are
drawn as overlaid CDFs, one line each; sweeps as latency and throughput against the
offered request rate, one line per file, so iterserve and a peer share the axes.
"""

import json
import math
from pathlib import Path

CDF_PANELS = (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("e2el_ms", "end-to-end latency (ms)"))
RATE_PANELS = (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("e2el_ms", "end-to-end latency (ms)"))


def load_runs(path: str | Path) -> list[dict]:
    data = json.loads(Path(path).read_text())
    return data["runs"] if "runs" in data else [data]


def series_label(path: str | Path, data: dict) -> str:
    return data.get("label") or Path(path).stem


def plot_files(paths: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Sweeps are drawn against rate, single runs as overlaid CDFs."""
    series = {}
    for index, path in enumerate(paths):
        data = json.loads(Path(path).read_text())
        label = labels[index] if labels and index < len(labels) else series_label(path, data)
        while label in series:
            label += "'"
        series[label] = data["runs"] if "runs" in data else [data]
    if any(len(runs) > 1 for runs in series.values()):
        return plot_rates(series, out)
    return plot_cdfs({label: runs[0] for label, runs in series.items()}, out)


def plot_run(result: dict, out: str | Path) -> Path:
    """Latency CDFs of one run, and each tenant's TTFT against the time its requests were sent."""
    figure, axes = _figure(2, 2, f"{result.get('label') or result.get('model_id', '')}: {_rate_text(result)}")
    for axis, (field, title) in zip(axes.flat, CDF_PANELS):
        _cdf(axis, _values(result, field), None)
        axis.set_xlabel(title)
        axis.set_ylabel("fraction of requests")
    axis = axes.flat[3]
    requests = [r for r in result.get("requests", []) if r["success"]]
    for tenant in sorted({r["tenant"] for r in requests}):
        mine = [r for r in requests if r["tenant"] == tenant]
        axis.plot([r["start_s"] for r in mine], [r["ttft_ms"] for r in mine], ".", label=tenant)
    axis.set_xlabel("sent at (s from start)")
    axis.set_ylabel("TTFT (ms)")
    axis.set_title("TTFT over time, by tenant")
    if requests:
        axis.legend()
    return _save(figure, out)


def plot_cdfs(series: dict[str, dict], out: str | Path) -> Path:
    figure, axes = _figure(1, 3, "latency CDFs")
    for axis, (field, title) in zip(axes.flat, CDF_PANELS):
        for label, result in series.items():
            _cdf(axis, _values(result, field), label)
        axis.set_xlabel(title)
        axis.set_ylabel("fraction of requests")
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    return _save(figure, out)


def plot_rates(series: dict[str, list[dict]], out: str | Path) -> Path:
    """Mean (solid) and p99 (dashed) latencies, throughput and goodput against the offered request rate.

    Runs without a finite rate (all at once, or a trace's own times) have no place on the axis.
    """
    figure, axes = _figure(2, 2, "latency and throughput against request rate")
    for label, runs in series.items():
        runs = sorted((run for run in runs if _finite_rate(run)), key=lambda run: run["request_rate"])
        rates = [run["request_rate"] for run in runs]
        for axis, (field, title) in zip(axes.flat, RATE_PANELS):
            line, = axis.plot(rates, _series(runs, f"mean_{field}"), "o-", label=f"{label} mean")
            axis.plot(rates, _series(runs, f"p99_{field}"), "s--", color=line.get_color(),
                      label=f"{label} p99")
            axis.set_ylabel(title)
        throughput = axes.flat[3]
        line, = throughput.plot(rates, [run["request_throughput"] for run in runs], "o-",
                                label=f"{label} throughput")
        throughput.plot(rates, [run["goodput"] for run in runs], "^--", color=line.get_color(),
                        label=f"{label} goodput")
        throughput.set_ylabel("completed requests/s")
    for axis in axes.flat:
        axis.set_xlabel("request rate (req/s)")
        axis.legend(fontsize="small")
    return _save(figure, out)


def _figure(rows: int, columns: int, title: str):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * columns, 4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    figure.suptitle(title)
    for axis in axes.flat:
        axis.grid(True, alpha=0.3)
    return figure, axes


def _save(figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def _cdf(axis, values: list[float], label: str | None) -> None:
    if not values:
        return
    ordered = sorted(values)
    fractions = [index / len(ordered) for index in range(len(ordered) + 1)]
    axis.step(ordered[:1] + ordered, fractions, where="post", label=label)


def _values(result: dict, field: str) -> list[float]:
    return [r[field] for r in result.get("requests", []) if r["success"] and r[field] is not None]


def _series(runs: list[dict], field: str) -> list[float]:
    """A pass where nothing completed has no latency: a gap in the line, not a zero."""
    return [math.nan if run[field] is None else run[field] for run in runs]


def _finite_rate(run: dict) -> bool:
    return isinstance(run.get("request_rate"), (int, float)) and math.isfinite(run["request_rate"])


def _rate_text(result: dict) -> str:
    rate = result.get("request_rate")
    return f"{rate:g} req/s" if _finite_rate(result) else {"inf": "all at once"}.get(rate, "trace times")
