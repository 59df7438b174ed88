#!/usr/bin/env python3
"""Checks a Grafana dashboard of Prometheus queries, without Grafana.

Structure (always): the file is JSON; panel ids are unique; every panel other than a row
has a Prometheus datasource and at least one target, and every target an expression; every
variable an expression or a datasource names is defined (or is one of Grafana's own); a
variable's query uses only variables defined before it.

Metric names (with --exposition FILE, repeatable): every edgesync_* metric an expression
names is in one of the given Prometheus text expositions, so a renamed metric fails here
with its name rather than as an empty panel.

Data (with --prometheus URL): every expression of the dashboard, the variables' queries,
the panels' targets and the annotations' queries, is evaluated through Prometheus's HTTP
API the way Grafana would send it: variables substituted with the values their own queries
return (a multi-value variable as a regular expression of all of them), and $__interval,
$__rate_interval, $__range and the like computed from the time range and the scrape
interval as Grafana computes them. An expression that errors, or returns no sample that is
a number, fails the check. Grafana itself is not run: what the panels draw from the data is
not checked.

Python 3 standard library only. Exits 0 when every check passes, 1 otherwise.
"""

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# Variables Grafana defines itself; a dashboard may use them without declaring them.
BUILTIN_VARIABLES = {
    "__interval",
    "__interval_ms",
    "__rate_interval",
    "__rate_interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
    "__from",
    "__to",
    "__dashboard",
    "__user",
    "__org",
    "__name",
    "__all",
    "__auto",
    "__timeFilter",
}

# $name, ${name}, ${name:format} and the deprecated [[name]] / [[name:format]].
VARIABLE_REF = re.compile(
    r"\$(\w+)|\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]"
)
METRIC_NAME = re.compile(r"\bedgesync_[a-zA-Z0-9_]+\b")
# Characters with a meaning in Prometheus's (RE2) regular expressions.
REGEX_SPECIAL = re.compile(r"([\\^$.|?*+()\[\]{}])")
# A selector's label matchers, e.g. federation="x": metric names only come before them.
LABEL_MATCHERS = re.compile(r"\{[^}]*\}")
# Grafana's default step of an annotation query.
ANNOTATION_STEP_DEFAULT = 60


class Failures:
    def __init__(self):
        self.items = []

    def add(self, where, what):
        self.items.append(f"{where}: {what}")


def refs(text):
    """Names of the variables `text` refers to."""
    if not isinstance(text, str):
        return []
    return [a or b or c for a, b, c in VARIABLE_REF.findall(text)]


def seconds(duration):
    """Seconds in a Prometheus/Grafana duration such as 15s, 1m30s or 500ms."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(n) * units[u] for n, u in parts)


def duration(secs):
    """A whole-millisecond duration Prometheus accepts."""
    ms = max(1, round(secs * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def all_panels(dashboard):
    """Every panel, rows' collapsed panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        for inner in panel.get("panels", []) or []:
            yield inner


def panel_name(panel):
    return f"panel {panel.get('id')!r} ({panel.get('title', 'untitled')})"


def query_text(variable):
    """The query of a query variable: a string, or the editor's object holding one."""
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    return query if isinstance(query, str) else None


def expressions(dashboard):
    """(where, kind, expression, item) for every PromQL expression of the dashboard."""
    for panel in all_panels(dashboard):
        if panel.get("type") == "row":
            continue
        for target in panel.get("targets", []) or []:
            where = f"{panel_name(panel)} target {target.get('refId')}"
            yield where, "target", target.get("expr"), target
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if is_prometheus(annotation.get("datasource"), dashboard):
            where = f"annotation {annotation.get('name')!r}"
            yield where, "annotation", annotation.get("expr"), annotation


def variables(dashboard):
    return dashboard.get("templating", {}).get("list", [])


def is_prometheus(datasource, dashboard):
    """Whether a panel's, target's or annotation's datasource is a Prometheus one, either
    directly or through a datasource variable of type prometheus."""
    if isinstance(datasource, str):
        datasource = {"uid": datasource}
    if not isinstance(datasource, dict):
        return False
    if datasource.get("type") == "prometheus":
        return True
    for name in refs(datasource.get("uid", "")):
        for v in variables(dashboard):
            if v.get("name") == name and v.get("type") == "datasource":
                return v.get("query") == "prometheus"
    return False


def check_structure(dashboard, failures):
    for key, kind in [("title", str), ("uid", str), ("schemaVersion", int), ("panels", list)]:
        if not isinstance(dashboard.get(key), kind):
            failures.add("dashboard", f"{key} is missing or not a {kind.__name__}")

    defined = []
    for v in variables(dashboard):
        name = v.get("name")
        if not name:
            failures.add("templating", "a variable has no name")
            continue
        if name in defined:
            failures.add(f"variable {name}", "defined twice")
        if v.get("type") == "query":
            query = query_text(v)
            if not query:
                failures.add(f"variable {name}", "has no query")
            if not is_prometheus(v.get("datasource"), dashboard):
                failures.add(f"variable {name}", "has no Prometheus datasource")
            for ref in refs(query) + refs(json.dumps(v.get("datasource"))):
                if ref not in defined and ref not in BUILTIN_VARIABLES:
                    failures.add(f"variable {name}", f"uses ${ref} before it is defined")
        if v.get("type") == "datasource" and v.get("query") != "prometheus":
            failures.add(f"variable {name}", "is not a Prometheus datasource variable")
        defined.append(name)
    known = set(defined) | BUILTIN_VARIABLES

    ids = {}
    for panel in all_panels(dashboard):
        pid = panel.get("id")
        name = panel_name(panel)
        if not isinstance(pid, int):
            failures.add(name, "has no integer id")
        elif pid in ids:
            failures.add(name, f"shares its id with {ids[pid]}")
        else:
            ids[pid] = name
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in "hwxy"):
            failures.add(name, "has no complete gridPos")
        elif grid["x"] + grid["w"] > 24:
            failures.add(name, "reaches past the 24 grid columns")
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets:
            failures.add(name, "has no targets")
        panel_ds = panel.get("datasource")
        if panel_ds is None and not all(t.get("datasource") for t in targets):
            failures.add(name, "has no datasource")
        for ds in [panel_ds] + [t.get("datasource") for t in targets]:
            if ds is not None and not is_prometheus(ds, dashboard):
                failures.add(name, f"datasource {ds!r} is not Prometheus")
            for ref in refs(json.dumps(ds)):
                if ref not in known:
                    failures.add(name, f"datasource uses undefined variable ${ref}")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids) or None in ref_ids:
            failures.add(name, "targets need distinct refIds")

    for where, _, expr, item in expressions(dashboard):
        if not isinstance(expr, str) or not expr.strip():
            failures.add(where, "has no expression")
            continue
        texts = [expr, item.get("legendFormat"), item.get("titleFormat"), item.get("step")]
        for ref in [r for t in texts for r in refs(t)]:
            if ref not in known:
                failures.add(where, f"uses undefined variable ${ref}")
    return ids


def exposed_names(paths):
    """Metric names in Prometheus text expositions, with histogram and summary series."""
    names = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"# TYPE (\S+) (\S+)", line)
                if m:
                    name, kind = m.groups()
                    names.add(name)
                    if kind in ("histogram", "summary"):
                        names.update(f"{name}_{s}" for s in ("bucket", "sum", "count"))
                elif line and not line.startswith("#"):
                    names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def check_metric_names(dashboard, paths, failures):
    names = exposed_names(paths)
    texts = [(w, e) for w, _, e, _ in expressions(dashboard)]
    texts += [(f"variable {v.get('name')}", query_text(v)) for v in variables(dashboard)]
    for where, text in texts:
        if not isinstance(text, str):
            continue
        for metric in sorted(set(METRIC_NAME.findall(LABEL_MATCHERS.sub("", text)))):
            if metric not in names:
                failures.add(where, f"{metric} is in no exposition given")


class Prometheus:
    def __init__(self, url, timeout):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def get(self, path, params):
        url = f"{self.url}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:
            try:
                body = json.load(e)
            except ValueError:
                raise RuntimeError(f"HTTP {e.code} from {path}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise RuntimeError(f"{path}: {e}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]


class Window:
    """The time range, and Grafana's interval variables for one query's step."""

    def __init__(self, start, end, scrape, max_points):
        self.start, self.end, self.scrape = start, end, scrape
        self.range = end - start
        # Grafana: range over the panel's data points, never below the scrape interval.
        self.interval = max(scrape, math.ceil(self.range / max_points))

    def builtins(self, interval=None):
        interval = interval or self.interval
        rate = max(interval + self.scrape, 4 * self.scrape)
        return {
            "__interval": duration(interval),
            "__interval_ms": str(round(interval * 1000)),
            "__rate_interval": duration(rate),
            "__rate_interval_ms": str(round(rate * 1000)),
            "__range": duration(self.range),
            "__range_s": str(round(self.range)),
            "__range_ms": str(round(self.range * 1000)),
            "__from": str(round(self.start * 1000)),
            "__to": str(round(self.end * 1000)),
        }


def regex_escape(value):
    """A value inside a PromQL regular expression string, as Grafana escapes it."""
    return REGEX_SPECIAL.sub(r"\\\\\1", value)


def substitute(text, values, builtins):
    """Replaces variable references the way Grafana's Prometheus datasource does."""

    def replace(match):
        name = match.group(1) or match.group(2) or match.group(3)
        if name in builtins:
            return builtins[name]
        if name not in values:
            return match.group(0)
        value, multi = values[name]
        if multi:
            return "(" + "|".join(regex_escape(v) for v in value) + ")"
        return value.replace("\\", "\\\\").replace("'", "\\'")

    return VARIABLE_REF.sub(replace, text)


def resolve_variable(prom, variable, query, window):
    """The values of a query variable's query (label_values or query_result)."""
    m = re.fullmatch(r"\s*label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)\s*", query, re.S)
    if m:
        selector, label = m.groups()
        params = {"start": window.start, "end": window.end}
        if selector:
            params["match[]"] = selector
        values = prom.get(f"/api/v1/label/{label}/values", params)
    else:
        m = re.fullmatch(r"\s*query_result\((.+)\)\s*", query, re.S)
        if not m:
            raise RuntimeError(f"unsupported variable query {query!r}")
        data = prom.get("/api/v1/query", {"query": m.group(1), "time": window.end})
        values = [json.dumps(s["metric"]) + " " + s["value"][1] for s in data["result"]]
    if variable.get("regex"):
        pattern = re.compile(variable["regex"].strip("/"))
        kept = []
        for v in values:
            found = pattern.search(v)
            if found:
                kept.append(found.group(1) if found.groups() else v)
        values = kept
    return sorted(set(values))


def has_number(data):
    """Whether a query result holds at least one sample that is not NaN."""

    def number(v):
        return v[1] not in ("NaN", "nan")

    result = data.get("result", [])
    if data.get("resultType") == "matrix":
        return any(number(v) for s in result for v in s.get("values", []))
    if data.get("resultType") == "vector":
        return any(number(s["value"]) for s in result)
    if data.get("resultType") == "scalar":
        return number(result)
    return False


def check_data(dashboard, prom, window, overrides, failures):
    """Evaluates every expression; returns how many were evaluated, by kind."""
    counts = {"variable": 0, "target": 0, "annotation": 0}
    values = {}
    base = window.builtins()
    for v in variables(dashboard):
        name = v.get("name")
        if v.get("type") == "datasource":
            continue
        if v.get("type") == "query":
            query = substitute(query_text(v) or "", values, base)
            counts["variable"] += 1
            try:
                found = resolve_variable(prom, v, query, window)
            except RuntimeError as e:
                failures.add(f"variable {name}", f"{query}: {e}")
                continue
            if not found:
                failures.add(f"variable {name}", f"{query} returned no values")
                continue
            print(f"ok   variable {name}: {query} -> {', '.join(found)}")
        else:
            current = v.get("current", {}).get("value")
            found = current if isinstance(current, list) else [str(current or v.get("query"))]
        multi = bool(v.get("multi") or v.get("includeAll"))
        if name in overrides:
            found = overrides[name]
        elif not multi:
            found = found[:1]
        values[name] = (found if multi else found[0], multi)

    for where, kind, expr, item in expressions(dashboard):
        if not isinstance(expr, str):
            continue
        interval = window.interval
        if kind == "annotation":
            # Grafana runs an annotation query at its own step, and takes that step as the
            # interval its $__interval and $__rate_interval follow.
            step_text = substitute(item.get("step") or "", values, base)
            step = seconds(step_text) if step_text else ANNOTATION_STEP_DEFAULT
            interval = max(interval, step)
        query = substitute(expr, values, window.builtins(interval))
        counts[kind] += 1
        instant = item.get("instant") and not item.get("range")
        try:
            if instant:
                data = prom.get("/api/v1/query", {"query": query, "time": window.end})
            else:
                # Steps counted back from the end, so the latest data is always evaluated.
                start = window.end - math.floor(window.range / interval) * interval
                params = {
                    "query": query,
                    "start": start,
                    "end": window.end,
                    "step": duration(interval),
                }
                data = prom.get("/api/v1/query_range", params)
        except RuntimeError as e:
            failures.add(where, f"{e}\n    {query}")
            continue
        if not has_number(data):
            failures.add(where, f"returned no data\n    {query}")
            continue
        series = len(data.get("result", []))
        print(f"ok   {where}: {series} series")
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dashboard", help="dashboard JSON file")
    parser.add_argument("--prometheus", help="Prometheus base URL; without it, no data check")
    parser.add_argument(
        "--exposition",
        action="append",
        default=[],
        help="Prometheus text exposition that must define every edgesync_* metric used",
    )
    parser.add_argument("--start", type=float, help="range start, Unix seconds (end - 1h)")
    parser.add_argument("--end", type=float, help="range end, Unix seconds (now)")
    parser.add_argument(
        "--scrape-interval",
        default="15s",
        help="the datasource's scrape interval, from which Grafana derives $__rate_interval",
    )
    parser.add_argument("--max-data-points", type=int, default=1000)
    parser.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE[,VALUE]",
        help="a variable's value instead of its query's values",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    args = parser.parse_args()

    failures = Failures()
    try:
        with open(args.dashboard, encoding="utf-8") as f:
            dashboard = json.load(f)
    except (OSError, ValueError) as e:
        print(f"FAIL: {args.dashboard}: {e}", file=sys.stderr)
        return 1
    if not isinstance(dashboard, dict):
        print(f"FAIL: {args.dashboard}: not a JSON object", file=sys.stderr)
        return 1

    ids = check_structure(dashboard, failures)
    exprs = list(expressions(dashboard))
    print(
        f"structure: {len(ids)} panels, {len(variables(dashboard))} variables, "
        f"{len(exprs)} expressions in targets and annotations"
    )
    if args.exposition:
        check_metric_names(dashboard, args.exposition, failures)
        print(f"metric names checked against {len(args.exposition)} expositions")

    if args.prometheus and not failures.items:
        end = args.end or time.time()
        start = args.start or end - 3600
        window = Window(start, end, seconds(args.scrape_interval), args.max_data_points)
        overrides = {}
        for item in args.var:
            name, _, value = item.partition("=")
            overrides[name] = value.split(",")
        print(
            f"data: {args.prometheus}, range {window.range:.0f}s, $__interval "
            f"{duration(window.interval)}, $__rate_interval "
            f"{window.builtins()['__rate_interval']}"
        )
        counts = check_data(dashboard, Prometheus(args.prometheus, args.timeout), window,
                            overrides, failures)
        total = sum(counts.values())
        print(
            f"evaluated {total} PromQL expressions: {counts['target']} panel targets, "
            f"{counts['variable']} variable queries, {counts['annotation']} annotation queries"
        )

    if failures.items:
        for item in failures.items:
            print(f"FAIL {item}", file=sys.stderr)
        print(f"FAIL: {len(failures.items)} problems in {args.dashboard}", file=sys.stderr)
        return 1
    print(f"PASS: {args.dashboard}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
