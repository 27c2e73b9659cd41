#!/usr/bin/env python3
"""Run py-amqp's and kombu's own integration suites directly against RabbitMQ and through warren,
and compare the outcomes test by test.

    run_suites.py setup [--venv .venv]
        Download the sdists of amqp==5.4.2 and kombu==5.7.0 (pip download --no-binary :all:),
        unpack them under .venv/suites/. Cached: a stamp file per sdist.

    run_suites.py run --direct HOST:PORT [--proxy HOST:PORT] [--out DIR] [--suite NAME ...]
        For each suite: run pytest against --direct, then (if given) against --proxy, each with
        --junitxml. The run fails if a test that passed directly did not pass through the proxy;
        a table of every difference is printed. Without --proxy only the direct run is made; it
        fails only if the suite could not run at all (pytest usage/internal error, nothing passed).

Suites (the broker address goes in as RABBITMQ_HOST / RABBITMQ_5672_TCP, which both read):
    py-amqp  amqp-5.4.2/t/integration/test_rmq.py   (-E rabbitmq)
    kombu    kombu-5.7.0/t/integration/test_py_amqp.py (-E py-amqp)
The `-E` option and `env` marker come from tests/python/warren_envmarker.py (upstream keeps them in a
conftest.py that is not in the sdists).

Isolation: the suites use fixed queue names and leave messages behind, so give --reset-cmd
(e.g. "scripts/rabbit.sh wipe shard-a") to wipe the clusters before every pytest run.

Excluded tests (deselected, listed in the summary):
  * py-amqp's TLS tests: test_tls_default_certs / test_tls_no_default_certs_fails connect to
    tls-v1-2.badssl.com on the internet, which must never be contacted from here; the `[tls]`
    parametrisations and test_tls_connect_fails need t/certs/*.pem (not in the sdist) and a TLS
    listener on RABBITMQ_5671_TCP, and warren speaks plain TCP only.

Upstream marks most tests @flaky(reruns=5, reruns_delay=2). By default pytest-rerunfailures is
disabled (-p no:rerunfailures) so that a proxy bug that makes a test fail now and then is seen, and
a broken proxy does not cost 10 s per test; --upstream-reruns turns it back on.
Every test gets --timeout (pytest-timeout, default 30 s) and each pytest run a wall-clock limit
(--suite-timeout, default 600 s), so a proxy that hangs cannot hang the run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

SUITES = {
    "py-amqp": {
        "requirement": "amqp==5.4.2",
        "dir": "amqp-5.4.2",
        "paths": ["t/integration/test_rmq.py"],
        "env_marker": "rabbitmq",
    },
    "kombu": {
        "requirement": "kombu==5.7.0",
        "dir": "kombu-5.7.0",
        "paths": ["t/integration/test_py_amqp.py"],
        "env_marker": "py-amqp",
    },
}


# Through a proxy with two shard clusters, messages of one queue live on two brokers: order holds
# per cluster, not globally. These tests assert a global order (priority order across all
# messages of a queue) and may differ from a single broker; any other difference fails the run.
SHARDED_ORDER_DEPENDENT = {
    "test_PyAMQPPriority::test_publish_consume":
        "asserts priority order over all messages; priorities are ordered per shard cluster",
    "test_PyAMQPPriority::test_simple_queue_publish_consume":
        "asserts priority order over all messages; priorities are ordered per shard cluster",
    "test_PyAMQPPriority::test_simple_buffer_publish_consume":
        "asserts priority order over all messages; priorities are ordered per shard cluster",
    "test_PyAMQPPriority::test_publish_requeue_consume":
        "asserts that the max-priority message published last is delivered before requeued "
        "ones; it lands on one shard cluster while the requeued ones sit on both",
    "test_PyAMQPEventLoop::test_ack_from_another_thread":
        "asserts that message 0 is consumed before message 1; the two land on different shard "
        "clusters (round-robin), each consumed with its own prefetch share",
}


def order_dependent(test_id: str) -> str | None:
    for key, why in SHARDED_ORDER_DEPENDENT.items():
        if key in test_id:
            return why
    return None


def excluded_reason(suite: str, test_id: str) -> str | None:
    """Why a collected test is deselected, or None to run it."""
    if suite == "py-amqp":
        if "test_tls_default_certs" in test_id or "test_tls_no_default_certs_fails" in test_id:
            return "connects to tls-v1-2.badssl.com (internet): never run here"
        if "test_tls_connect_fails" in test_id or "[tls" in test_id or "-tls" in test_id:
            return "needs t/certs/*.pem (not in sdist) and a TLS listener; warren is plain TCP"
    return None


def log(msg: str) -> None:
    print(f"[run_suites {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# setup


def suites_dir(venv: Path) -> Path:
    return venv / "suites"


def cmd_setup(args: argparse.Namespace) -> int:
    venv = Path(args.venv).resolve()
    sdir = suites_dir(venv)
    dl = sdir / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    py = venv / "bin" / "python"
    for name, s in SUITES.items():
        stamp = sdir / f".{s['dir']}.ok"
        if stamp.exists() and (sdir / s["dir"]).is_dir():
            log(f"{name}: {s['dir']} already unpacked")
            continue
        log(f"{name}: downloading sdist {s['requirement']}")
        subprocess.run(
            [str(py), "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
             "-d", str(dl), s["requirement"]],
            check=True,
        )
        tarball = dl / f"{s['dir']}.tar.gz"
        if not tarball.exists():
            log(f"{name}: expected {tarball} after download")
            return 1
        shutil.rmtree(sdir / s["dir"], ignore_errors=True)
        with tarfile.open(tarball) as tf:
            tf.extractall(sdir, filter="data")
        stamp.write_text(s["requirement"] + "\n")
    # The suites' own test requirements are covered by tests/python/requirements.txt (see there
    # why the sdists' files are not installed verbatim); check that the plugins are importable.
    missing = []
    for mod in ("pytest", "pytest_timeout", "pytest_rerunfailures", "amqp", "kombu"):
        r = subprocess.run([str(py), "-c", f"import {mod}"], capture_output=True)
        if r.returncode != 0:
            missing.append(mod)
    if missing:
        log(f"missing in {venv}: {', '.join(missing)} (pip install -r tests/python/requirements.txt)")
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# running


def split_hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


def probe_amqp(hostport: str, timeout: float = 10.0) -> str | None:
    """Open and close one AMQP connection. Returns an error text, or None when it worked."""
    import amqp  # noqa: PLC0415 (the venv's)

    host, port = split_hostport(hostport)
    try:
        conn = amqp.Connection(
            host=f"{host}:{port}", connect_timeout=timeout, read_timeout=timeout,
            write_timeout=timeout,
        )
        conn.connect()
        ch = conn.channel()
        ch.close()
        conn.close()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def pytest_base(suite: str, args: argparse.Namespace) -> list[str]:
    s = SUITES[suite]
    cmd = [
        sys.executable, "-m", "pytest", *s["paths"],
        "-p", "warren_envmarker", "-E", s["env_marker"],
        "-p", "no:cacheprovider",
        "-o", "junit_family=xunit2",
        f"--timeout={args.timeout}",
    ]
    if not args.upstream_reruns:
        cmd += ["-p", "no:rerunfailures"]
    return cmd


def suite_env(hostport: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE), env.get("PYTHONPATH", "")) if p
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if hostport:
        host, port = split_hostport(hostport)
        env["RABBITMQ_HOST"] = host
        env["RABBITMQ_5672_TCP"] = str(port)
    return env


def collect(suite: str, cwd: Path, args: argparse.Namespace) -> list[str]:
    """Node ids of the tests pytest collects for the suite (nothing connects at collection)."""
    cmd = pytest_base(suite, args) + ["--collect-only", "-q"]
    r = subprocess.run(cmd, cwd=cwd, env=suite_env(None), capture_output=True, text=True,
                       timeout=300)
    ids = [ln.strip() for ln in r.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]
    if r.returncode != 0 or not ids:
        log(f"{suite}: collection failed (rc={r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return ids


def junit_id(nodeid: str) -> str:
    """Our canonical test id from a pytest node id: path::Class::test[param]."""
    return nodeid


def parse_junit(path: Path, paths: list[str]) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, message). Outcome: passed | failed | error | skipped."""
    out: dict[str, tuple[str, str]] = {}
    if not path.exists():
        return out
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return out
    for tc in root.iter("testcase"):
        classname = tc.get("classname", "")
        name = tc.get("name", "")
        # classname is "t.integration.test_rmq.test_rabbitmq_operations": map back to a node id.
        tid = classname_to_nodeid(classname, paths) + "::" + name
        outcome, msg = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                msg = (child.get("message") or (child.text or "")).strip().splitlines()
                msg = msg[0][:200] if msg else ""
                # A test that failed and errored at teardown: failure wins.
                if outcome in ("failed", "error"):
                    break
        # pytest writes one <testcase> per test; a teardown error adds a second with the same
        # name: keep the worst outcome.
        prev = out.get(tid)
        if prev and rank(prev[0]) >= rank(outcome):
            continue
        out[tid] = (outcome, msg)
    return out


def rank(outcome: str) -> int:
    return {"passed": 0, "skipped": 1, "failed": 2, "error": 3, "not-run": 4}.get(outcome, 5)


def classname_to_nodeid(classname: str, paths: list[str]) -> str:
    for p in paths:
        mod = p[:-3].replace("/", ".")
        if classname == mod:
            return p
        if classname.startswith(mod + "."):
            return p + "::" + classname[len(mod) + 1:].replace(".", "::")
    return classname


def run_pytest(suite: str, label: str, hostport: str, ids: list[str], excluded: list[str],
               args: argparse.Namespace, out_dir: Path) -> dict:
    s = SUITES[suite]
    cwd = suites_dir(Path(args.venv).resolve()) / s["dir"]
    junit = out_dir / f"{suite}-{label}.xml"
    logf = out_dir / f"{suite}-{label}.log"
    junit.unlink(missing_ok=True)
    cmd = pytest_base(suite, args) + [f"--junitxml={junit}", "-q", "-rfEs"]
    for d in excluded:
        cmd += ["--deselect", d]
    if args.reset_cmd:
        r = subprocess.run(args.reset_cmd, shell=True, cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            log(f"reset command failed (rc={r.returncode}): {r.stderr.strip()[-2000:]}")
    log(f"{suite}/{label}: pytest against {hostport} (log: {logf})")
    t0 = time.monotonic()
    rc: int | str
    with open(logf, "w") as lf:
        p = subprocess.Popen(cmd, cwd=cwd, env=suite_env(hostport), stdout=lf,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=args.suite_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = "timeout"
            log(f"{suite}/{label}: pytest exceeded {args.suite_timeout}s, killed")
    secs = time.monotonic() - t0
    results = parse_junit(junit, s["paths"])
    # Tests that were collected but have no result (crash, timeout) count as not-run.
    for tid in ids:
        if tid not in results and tid not in excluded:
            results[tid] = ("not-run", f"no result (pytest rc={rc})")
    counts: dict[str, int] = {}
    for o, _ in results.values():
        counts[o] = counts.get(o, 0) + 1
    log(f"{suite}/{label}: rc={rc} in {secs:.1f}s: {fmt_counts(counts)}")
    return {"rc": rc, "secs": round(secs, 1), "results": results, "counts": counts,
            "junit": str(junit), "log": str(logf)}


def fmt_counts(c: dict[str, int]) -> str:
    order = ["passed", "failed", "error", "skipped", "not-run"]
    return ", ".join(f"{c[k]} {k}" for k in order if c.get(k))


def not_run_all(ids: list[str], excluded: list[str], why: str) -> dict:
    results = {t: ("not-run", why) for t in ids if t not in excluded}
    return {"rc": "not-run", "secs": 0.0, "results": results,
            "counts": {"not-run": len(results)}, "junit": None, "log": None}


def print_table(rows: list[tuple[str, str, str]], headers: tuple[str, str, str]) -> None:
    w0 = max([len(headers[0])] + [len(r[0]) for r in rows])
    w1 = max([len(headers[1])] + [len(r[1]) for r in rows])
    print(f"  {headers[0]:<{w0}}  {headers[1]:<{w1}}  {headers[2]}")
    for r in rows:
        print(f"  {r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}")


def cmd_run(args: argparse.Namespace) -> int:
    venv = Path(args.venv).resolve()
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    suites = args.suite or list(SUITES)
    failed = False
    summary: dict = {}
    t_all = time.monotonic()

    proxy_err = None
    if args.proxy:
        proxy_err = probe_amqp(args.proxy)
        if proxy_err:
            log(f"proxy {args.proxy} does not complete an AMQP handshake: {proxy_err}")
            log("the proxy runs are skipped and every test counts as not-run through the proxy")

    for suite in suites:
        s = SUITES[suite]
        cwd = suites_dir(venv) / s["dir"]
        if not cwd.is_dir():
            log(f"{suite}: {cwd} missing; run: {sys.argv[0]} setup")
            return 1
        ids = collect(suite, cwd, args)
        if not ids:
            failed = True
            summary[suite] = {"error": "collection failed"}
            continue
        excluded = {t: r for t in ids if (r := excluded_reason(suite, t))}
        runnable = [t for t in ids if t not in excluded]
        direct = run_pytest(suite, "direct", args.direct, runnable, list(excluded), args, out_dir)
        proxy = None
        if args.proxy:
            if proxy_err:
                proxy = not_run_all(runnable, list(excluded), f"proxy handshake failed: {proxy_err}")
            else:
                proxy = run_pytest(suite, "proxy", args.proxy, runnable, list(excluded), args,
                                   out_dir)

        print()
        print(f"=== {suite}: {len(ids)} collected, {len(excluded)} excluded, "
              f"{len(runnable)} run ===")
        print(f"direct ({args.direct}): {fmt_counts(direct['counts'])}  [{direct['secs']}s]")
        if proxy:
            print(f"proxy  ({args.proxy}): {fmt_counts(proxy['counts'])}  [{proxy['secs']}s]")
        if excluded:
            by_reason: dict[str, list[str]] = {}
            for t, r in sorted(excluded.items()):
                by_reason.setdefault(r, []).append(t.split("::", 1)[1])
            print("excluded:")
            for r, ts in by_reason.items():
                print(f"  {len(ts)} x {r}: {', '.join(ts)}")
        dr = direct["results"]
        not_passing = sorted(t for t, (o, _) in dr.items() if o != "passed")
        if not_passing:
            print("not passing even directly (not held against the proxy):")
            for t in not_passing:
                print(f"  {t}: {dr[t][0]}: {dr[t][1]}")

        suite_failed = False
        if isinstance(direct["rc"], int) and direct["rc"] > 1 and direct["rc"] != 5:
            print(f"direct pytest run broke (rc={direct['rc']}); see {direct['log']}")
            suite_failed = True
        if not direct["counts"].get("passed"):
            print("no test passed directly: the environment is broken")
            suite_failed = True

        regressions: list[str] = []
        if proxy:
            pr = proxy["results"]
            rows = []
            for t in sorted(set(dr) | set(pr)):
                do = dr.get(t, ("missing", ""))[0]
                po = pr.get(t, ("missing", ""))[0]
                if do != po:
                    rows.append((t, do, po))
                    if do == "passed":
                        why = order_dependent(t) if args.sharded else None
                        if why:
                            print(f"  expected with shard clusters: {t}: {why}")
                        else:
                            regressions.append(t)
            if rows:
                print("differences (direct -> proxy):")
                print_table(rows, ("test", "direct", "proxy"))
                for t in regressions:
                    msg = pr.get(t, ("", ""))[1]
                    if msg:
                        print(f"  {t}: {msg}")
            else:
                print("no differences between direct and proxy")
            if regressions:
                print(f"{len(regressions)} test(s) passed directly but not through the proxy")
                suite_failed = True
        failed |= suite_failed
        summary[suite] = {
            "collected": len(ids),
            "excluded": excluded,
            "direct": {k: v for k, v in direct.items() if k != "results"},
            "proxy": {k: v for k, v in proxy.items() if k != "results"} if proxy else None,
            "direct_results": {t: o for t, (o, _) in dr.items()},
            "proxy_results": {t: o for t, (o, _) in proxy["results"].items()} if proxy else None,
            "regressions": regressions,
            "failed": suite_failed,
        }

    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    total = time.monotonic() - t_all
    print()
    print(f"suites: {'FAILED' if failed else 'OK'} in {total:.1f}s (junit + logs in {out_dir})")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=str(REPO / ".venv"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="download and unpack the suites")
    r = sub.add_parser("run", help="run the suites")
    r.add_argument("--direct", required=True, help="HOST:PORT of a RabbitMQ node")
    r.add_argument("--proxy", help="HOST:PORT of warren")
    r.add_argument("--out", default="/tmp/warren-suites", help="junit/log/summary dir")
    r.add_argument("--suite", action="append", choices=list(SUITES))
    r.add_argument("--timeout", type=int, default=30, help="per-test timeout (s)")
    r.add_argument("--sharded", action="store_true",
                   help="the proxy has several shard clusters: tolerate the global-order tests")
    r.add_argument("--suite-timeout", type=int, default=600, help="per pytest run (s)")
    r.add_argument("--reset-cmd",
                   help="shell command run (from the repo root) before every pytest run to give "
                        "it a clean broker, e.g. 'scripts/rabbit.sh wipe shard-a'. The suites use "
                        "fixed queue names and leave messages behind (priority_requeue_test "
                        "grows by 4 per run), so without it a second run sees the first's state")
    r.add_argument("--upstream-reruns", action="store_true",
                   help="keep upstream's @flaky(reruns=5) (pytest-rerunfailures)")
    args = ap.parse_args()
    if args.cmd == "setup":
        return cmd_setup(args)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
