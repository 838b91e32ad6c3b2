"""Benchmark driver: flowcore vs Ray vs Dask, each (engine, run) in a fresh interpreter.

    python -m benchmarks.run [--runs 3] [--engines flowcore,ray,dask] [--quick]
                             [--only NAME,...] [--json out.json] [--timeout S]

See benchmarks/README.md for what each metric means.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import proctree
from benchmarks.metrics import (ENGINES, METRICS, WORKLOADS, ZERO_COPY_ABS_MS,
                                oriented_ratio, target_met)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "engine_worker.py")
PREFIX = "@@BENCH "

# Environment for the engine subprocesses: no usage-stat reporting (there is no
# network here; Ray would otherwise try), unbuffered output so partial results
# survive a kill.
WORKER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
# The head alone (benchmarks/head_scale.py): flowcore only, its own table.
HEAD_SCALE = "head_scale"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# One (engine, run)

def run_engine(engine, args):
    cmd = [args.python, WORKER, engine]
    if args.quick:
        cmd.append("--quick")
    if args.only:
        cmd += ["--only", ",".join(args.only)]
    if args.workload_timeout:
        cmd += ["--workload-timeout", str(args.workload_timeout)]
    env = dict(os.environ)
    for k, v in WORKER_ENV.items():
        env.setdefault(k, v)
    rec = {"engine": engine, "status": "ok", "metrics": {}, "errors": {}, "info": {},
           "version": None, "reason": None, "stopped_by_harness": [],
           "stopped_after_shutdown": []}
    known = {}
    timed_out = False
    rec["loadavg_1min_at_start"] = os.getloadavg()[0]
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=REPO, env=env, start_new_session=True)
        try:
            while proc.poll() is None:
                proctree.snapshot_descendants(proc.pid, known)
                if time.monotonic() - t0 > args.timeout:
                    timed_out = True
                    break
                time.sleep(0.25)
        finally:
            if proc.poll() is None:
                proctree.snapshot_descendants(proc.pid, known)
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # Anything the run started and left behind is stopped here, by pid.
            rec["stopped_by_harness"] = proctree.reap(known, grace=5.0)
        rec["seconds"] = time.monotonic() - t0
        rec["returncode"] = proc.returncode
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    rec["stderr_tail"] = stderr.strip().splitlines()[-25:]

    lines = []
    for line in stdout.splitlines():
        i = line.find(PREFIX)
        if i >= 0:
            try:
                lines.append(json.loads(line[i + len(PREFIX):]))
            except ValueError:
                pass
    seen = set()
    got_done = False
    for msg in lines:
        kind = msg.get("kind")
        if kind == "startup":
            seen.add("startup")
            rec["version"] = msg.get("version")
            if not msg.get("available", True):
                rec["status"] = "unavailable"
                rec["reason"] = msg.get("reason")
            elif msg.get("error"):
                rec["errors"]["startup"] = msg["error"]
            else:
                rec["metrics"].update(msg.get("metrics", {}))
                rec["info"] = msg.get("info", {})
        elif kind == "workload":
            seen.add(msg["name"])
            rec.setdefault("workload_seconds", {})[msg["name"]] = msg.get("seconds")
            if msg.get("error"):
                rec["errors"][msg["name"]] = msg["error"]
            else:
                rec["metrics"].update(msg.get("metrics", {}))
        elif kind == "cluster":  # the 2-node cluster for the multi-node workloads
            rec["info"]["cluster"] = {k: v for k, v in msg.items() if k != "kind"}
            rec["metrics"].update(msg.get("metrics", {}))
        elif kind == "done":
            got_done = True
            rec["stopped_after_shutdown"] = msg.get("stopped_after_shutdown", [])
            if msg.get("shutdown_error"):
                rec["errors"]["shutdown"] = msg["shutdown_error"]
            rec["shutdown_s"] = msg.get("shutdown_s")

    if rec["status"] != "unavailable" and not got_done:
        if timed_out:
            why = f"engine subprocess timed out after {args.timeout:.0f} s"
            rec["status"] = "timeout"
        else:
            why = f"engine subprocess died (exit code {proc.returncode})"
            rec["status"] = "crashed"
        expected = ["startup"] + [w for w in WORKER_WORKLOADS if not args.only or w in args.only]
        missing = [w for w in expected if w not in seen]
        for w in missing[:1]:
            rec["errors"][w] = why  # the workload that was running
        for w in missing[1:]:
            rec["errors"][w] = "not run (" + why + ")"
        if not missing:
            rec["errors"]["shutdown"] = why
    return rec


# Workloads as the worker names them (cold_start/idle_memory come from "startup").
WORKER_WORKLOADS = [w for w in WORKLOADS if w not in ("cold_start", "idle_memory")]


def metric_workload_key(metric):
    return "startup" if metric.workload in ("cold_start", "idle_memory") else metric.workload


# --------------------------------------------------------------------------------------
# Aggregation and the table

def aggregate(records, engines):
    agg = {}
    for eng in ENGINES:
        recs = [r for r in records if r["engine"] == eng]
        entry = {"state": "skipped", "runs": len(recs), "medians": {}, "counts": {},
                 "errors": {}, "reason": None, "version": None}
        if eng in engines:
            entry["state"] = "run"
        if recs and all(r["status"] == "unavailable" for r in recs):
            entry["state"] = "n/a"
            entry["reason"] = recs[0]["reason"]
        for r in recs:
            entry["version"] = entry["version"] or r.get("version")
            for w, e in r["errors"].items():
                entry["errors"].setdefault(w, [])
                if e not in entry["errors"][w]:
                    entry["errors"][w].append(e)
        keys = {k for r in recs for k in r["metrics"]}
        for k in keys:
            vals = [r["metrics"][k] for r in recs if k in r["metrics"]]
            entry["medians"][k] = statistics.median(vals)
            entry["counts"][k] = len(vals)
        agg[eng] = entry
    return agg


def fmt_value(v, unit):
    if v is None:
        return "-"
    if unit == "%":
        return f"{100 * v:.0f}%"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def cell(entry, metric, runs_done):
    state = entry["state"]
    if state == "skipped":
        return "skip"
    if state == "n/a":
        return "n/a"
    med = entry["medians"].get(metric.key)
    if med is None:
        wk = metric_workload_key(metric)
        return "ERR" if (wk in entry["errors"] or "startup" in entry["errors"]) else "-"
    s = fmt_value(med, metric.unit)
    if entry["counts"].get(metric.key, 0) < runs_done:
        s += "*"
    return s


def build_rows(agg, only):
    rows = []
    for m in METRICS:
        if only and m.workload not in only:
            continue
        vals = {e: (agg[e]["medians"].get(m.key) if agg[e]["state"] == "run" else None)
                for e in ENGINES}
        r_ray = oriented_ratio(m, vals["flowcore"], vals["ray"]) if m.ratios else None
        r_dask = oriented_ratio(m, vals["flowcore"], vals["dask"]) if m.ratios else None
        met = target_met(m, vals, agg["flowcore"]["medians"]) if m.target else None
        rows.append({"metric": m.key, "label": m.label, "unit": m.unit,
                     "higher_is_better": m.higher_is_better,
                     "values": vals, "flowcore_vs_ray": r_ray, "flowcore_vs_dask": r_dask,
                     "target": m.target.text if m.target else None,
                     "target_met": met, "_metric": m})
    return rows


def render_table(rows, agg):
    runs_done = {e: agg[e]["runs"] for e in ENGINES}
    header = ["metric", "unit", "flowcore", "ray", "dask", "fc/ray", "fc/dask",
              "target (flowcore)", "met"]
    body = []
    for row in rows:
        m = row["_metric"]
        ratios = []
        for r in (row["flowcore_vs_ray"], row["flowcore_vs_dask"]):
            ratios.append("-" if r is None else f"{r:.2f}x")
        met = row["target_met"]
        body.append([row["label"], row["unit"]]
                    + [cell(agg[e], m, runs_done[e]) for e in ENGINES]
                    + ratios
                    + [row["target"] or "", "" if not row["target"] else
                       ("n/a" if met is None else ("yes" if met else "NO"))])
    widths = [max(len(str(x[i])) for x in [header] + body) for i in range(len(header))]
    right = {2, 3, 4, 5, 6}

    def line(cols):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cols, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(b) for b in body]
    return "\n".join(out)


# --------------------------------------------------------------------------------------

def run_head_scale(args):
    """``benchmarks.head_scale`` in a fresh interpreter: (table text, rows) or
    (error text, None)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "head_scale.json")
        cmd = [args.python, "-m", "benchmarks.head_scale", "--runs", str(args.runs),
               "--json", out_json] + (["--quick"] if args.quick else [])
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  timeout=args.timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"head scale: no result within {args.timeout:.0f} s", None
        if proc.returncode != 0 or not os.path.exists(out_json):
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            return f"head scale: failed (exit {proc.returncode}): {tail}", None
        with open(out_json) as f:
            return proc.stdout.rstrip(), json.load(f)["rows"]


def byte_compile_flowcore(python):
    """Byte-compile the flowcore package the engine subprocesses import, as
    installing it does (pip writes a wheel's .pyc files; Ray is measured with
    its own).  An editable install in a tree where PYTHONDONTWRITEBYTECODE is
    set never gets them, and every process of every run would compile
    flowcore from source at start.  Already current files are left alone.
    Returns a note for the log."""
    code = ("import importlib.util, os; "
            "print(os.path.dirname(importlib.util.find_spec('flowcore').origin))")
    try:
        where = subprocess.run([python, "-c", code], capture_output=True, text=True,
                               timeout=60, check=True).stdout.strip()
        subprocess.run([python, "-m", "compileall", "-q", where], capture_output=True,
                       timeout=300, check=True)
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        return f"flowcore not byte-compiled ({exc}): its cold start includes compiling it"
    return f"byte-compiled flowcore in {where} (as an install does; --no-compile: from source)"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="fresh-interpreter runs per engine")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma list of engines (default: flowcore,ray,dask)")
    p.add_argument("--quick", action="store_true", help="short smoke run")
    p.add_argument("--only", default=None,
                   help="comma list of workloads: " + ",".join(WORKLOADS + (HEAD_SCALE,)))
    p.add_argument("--json", default=None, help="write raw runs + medians to this file")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per engine subprocess (default 600, 180 with --quick)")
    p.add_argument("--workload-timeout", type=float, default=None,
                   help="seconds per workload inside a run (default 120, 60 with --quick)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for the engine subprocesses (default: this one)")
    p.add_argument("--no-compile", action="store_true",
                   help="do not byte-compile flowcore first (measure it run from source "
                        "without .pyc files, e.g. an editable install under "
                        "PYTHONDONTWRITEBYTECODE)")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in args.engines if e not in ENGINES]
    if bad:
        p.error(f"unknown engine(s) {bad}; known: {', '.join(ENGINES)}")
    if args.only:
        args.only = [w.strip() for w in args.only.split(",") if w.strip()]
        known = WORKLOADS + (HEAD_SCALE,)
        bad = [w for w in args.only if w not in known]
        if bad:
            p.error(f"unknown workload(s) {bad}; known: {', '.join(known)}")
    args.head_scale = not args.only or HEAD_SCALE in args.only
    args.skip_engines = bool(args.only) and set(args.only) == {HEAD_SCALE}
    if args.only:
        args.only = [w for w in args.only if w != HEAD_SCALE] or None
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.timeout is None:
        args.timeout = 180.0 if args.quick else 600.0
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    records = []
    unavailable = set()
    log(f"flowcore benchmarks: engines={','.join(args.engines)} runs={args.runs}"
        f"{' quick' if args.quick else ''}; {os.cpu_count()} CPUs, python {platform.python_version()}")
    if "flowcore" in args.engines and not args.skip_engines and not args.no_compile:
        log(byte_compile_flowcore(args.python))
    try:
        # Interleave engines within each run so slow drifts in machine load hit all alike.
        for run in range(0 if args.skip_engines else args.runs):
            for eng in args.engines:
                if eng in unavailable:
                    continue
                log(f"[run {run + 1}/{args.runs}] {eng} ...")
                rec = run_engine(eng, args)
                rec["run"] = run + 1
                records.append(rec)
                extra = ""
                if rec["status"] == "unavailable":
                    unavailable.add(eng)
                    extra = f": n/a ({rec['reason']})"
                elif rec["errors"]:
                    extra = f": errors in {', '.join(sorted(rec['errors']))}"
                log(f"[run {run + 1}/{args.runs}] {eng} {rec['status']} in "
                    f"{rec['seconds']:.1f} s{extra}")
                if rec["errors"] and rec["stderr_tail"]:
                    log("    stderr tail: " + " | ".join(rec["stderr_tail"][-3:])[:600])
    except KeyboardInterrupt:
        log("interrupted: reporting the runs completed so far")

    head_text, head_rows = None, None
    if args.head_scale:
        log("head scale (the head's state machine alone) ...")
        head_text, head_rows = run_head_scale(args)

    agg = aggregate(records, args.engines)
    rows = build_rows(agg, args.only)
    wall = time.monotonic() - started

    if not args.skip_engines:
        print()
        print(f"flowcore vs ray vs dask: median of {args.runs} fresh-process run(s) per engine"
              f"{' (QUICK smoke run: short loops, noisy)' if args.quick else ''}")
        print("ratio columns fc/ray, fc/dask: > 1 means flowcore is better "
              "(higher-is-better rows: flowcore/other; lower-is-better rows: other/flowcore)")
        print()
        print(render_table(rows, agg))
        print()
        notes = []
        partial = any(agg[e]["state"] == "run" and 0 < n < agg[e]["runs"]
                      for e in ENGINES for n in agg[e]["counts"].values())
        if partial:
            notes.append("* median over fewer runs than requested (some runs failed)")
        if any(r["metric"] == "large_get_growth" for r in rows):
            notes.append(f"zero-copy target: the 100 MiB get takes <= 2x the 10 MiB get, "
                         f"or <= {ZERO_COPY_ABS_MS:g} ms; flat: the 1 GiB get <= 2x the "
                         f"1 MiB get, or <= {ZERO_COPY_ABS_MS:g} ms")
        for eng in ENGINES:
            e = agg[eng]
            if e["state"] == "skipped":
                continue
            if e["state"] == "n/a":
                notes.append(f"{eng}: n/a - {e['reason']}")
                continue
            notes.append(f"{eng} {e['version'] or ''}".rstrip() + f": {e['runs']} run(s)")
            for w, errs in e["errors"].items():
                for err in errs:
                    one_line = " | ".join(x.strip() for x in err.splitlines() if x.strip())
                    notes.append(f"  {eng} {w}: {one_line}")
        for r in records:
            for kind in ("stopped_after_shutdown", "stopped_by_harness"):
                for p in r.get(kind, []):
                    notes.append(f"  {r['engine']} run {r['run']}: left running, "
                                 f"stopped by {'worker' if kind.endswith('shutdown') else 'harness'}: {p}")
        loads = [r["loadavg_1min_at_start"] for r in records if "loadavg_1min_at_start" in r]
        if loads:
            notes.append(f"1-min load average when each engine run started: {min(loads):.1f} .. "
                         f"{max(loads):.1f} on {os.cpu_count()} CPUs (higher = noisier numbers)")
        print("\n".join(notes))
    if head_text is not None:
        print()
        print(head_text)
    print(f"\ntotal wall time {wall:.0f} s")

    if args.json:
        payload = {
            "config": {"runs": args.runs, "engines": args.engines, "quick": args.quick,
                       "only": args.only, "timeout": args.timeout, "cpus": os.cpu_count(),
                       "python": platform.python_version(), "platform": platform.platform()},
            "wall_seconds": wall,
            "engines": {e: {k: v for k, v in agg[e].items()} for e in ENGINES},
            "rows": [{k: v for k, v in r.items() if k != "_metric"} for r in rows],
            "head_scale": head_rows,
            "runs": records,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
