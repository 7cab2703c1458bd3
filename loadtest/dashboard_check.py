"""Does every query of the Grafana dashboard return data? Asks a live Prometheus that scrapes iterserve.

  python -m loadtest.dashboard_check --prometheus http://127.0.0.1:9090 [--dashboard deploy/grafana-dashboard.json]

Each panel's expressions are sent to Prometheus's query API with the dashboard's variables
filled in (`$model_name` as `.*`, `$__rate_interval` as `--rate-interval`); a query that
comes back without a series is reported, and the exit status is 1 if any did. Talks to
Prometheus over HTTP only.
"""

import argparse
import json
from pathlib import Path
import sys

import httpx

DEFAULT_DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json"


def dashboard_queries(dashboard: dict, rate_interval: str) -> list[tuple[str, str]]:
    """(panel title, expression with the variables filled in), for every target of every panel."""
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expression = target["expr"].replace("$model_name", ".*").replace("$__rate_interval", rate_interval)
            queries.append((panel["title"], expression))
    return queries


def check(prometheus: str, queries: list[tuple[str, str]]) -> list[dict]:
    results = []
    with httpx.Client(base_url=prometheus, timeout=30) as http:
        for title, expression in queries:
            answer = http.get("/api/v1/query", params={"query": expression}).json()
            series = answer.get("data", {}).get("result", []) if answer.get("status") == "success" else []
            results.append({"panel": title, "query": expression, "status": answer.get("status"),
                            "error": answer.get("error"), "series": len(series)})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.dashboard_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--dashboard", default=str(DEFAULT_DASHBOARD))
    parser.add_argument("--rate-interval", default="1m")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    queries = dashboard_queries(json.loads(Path(args.dashboard).read_text()), args.rate_interval)
    results = check(args.prometheus, queries)
    empty = [result for result in results if not result["series"]]
    for result in results:
        print(f"{'ok   ' if result['series'] else 'EMPTY'} {result['series']:3d}  {result['panel']}: {result['query']}")
    print(f"{len(results) - len(empty)} of {len(results)} queries returned data")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 1 if empty else 0


if __name__ == "__main__":
    sys.exit(main())
