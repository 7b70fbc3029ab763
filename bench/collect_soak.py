"""A soak run of `preflab collect serve` with a `kill -9` in the middle: N annotators vote over loopback HTTP for
T seconds; halfway through the server is killed with SIGKILL and restarted on the same port. Each annotator
retries an unacknowledged vote with the same client_id until it is acknowledged (the API stores a retry once).
At the end the votes in the database must be exactly the votes acknowledged: none lost, none doubled.

    .venv/bin/python bench/collect_soak.py --annotators 50 --seconds 300             # SQLite
    .venv/bin/python bench/collect_soak.py --annotators 50 --seconds 300 --db postgresql://USER:PW@127.0.0.1/DB

Prints one JSON line: votes acknowledged and stored, votes/second over the whole run (the restart included),
p50/p99 latency of acknowledged POST /api/votes, connection failures while the server was down (expected,
retried), other errors (must be 0), the seconds the restart took, and this machine's fp32 matmul GFLOP/s.
Every loop is bounded by the deadline; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "collect"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def vote_until(url: str, token: str, deadline: float, out: dict, lock: threading.Lock) -> None:
    """One annotator: next pair, vote, until the deadline; an unacknowledged vote is retried with its client_id."""
    acked, latencies, down, errors = [], [], 0, []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as http:
        n = 0
        while time.monotonic() < deadline:
            try:
                pair = http.get("/api/next")
            except httpx.TransportError:
                down += 1
                time.sleep(0.05)
                continue
            if pair.status_code == 503:  # the database was busy: retried, as after a restart
                down += 1
                time.sleep(0.1)
                continue
            if pair.status_code != 200 or pair.json().get("done"):
                errors.append(f"next: {pair.status_code} {pair.text[:200]}")
                break
            body = {
                "pair_id": pair.json()["pair_id"],
                "choice": ("left", "right", "tie")[n % 3],
                "client_id": f"{token[:8]}-{n}",
            }
            while time.monotonic() < deadline + 30:  # a started vote is finished after the deadline
                start = time.perf_counter()
                try:
                    r = http.post("/api/votes", json=body)
                except httpx.TransportError:
                    down += 1
                    time.sleep(0.05)
                    continue
                if r.status_code == 503:
                    down += 1
                    time.sleep(0.1)
                    continue
                if r.status_code in (200, 201):
                    acked.append(r.json()["id"])
                    latencies.append(time.perf_counter() - start)
                else:
                    errors.append(f"vote: {r.status_code} {r.text[:200]}")
                break
            n += 1
    with lock:
        out["acked"] += acked
        out["latencies"] += latencies
        out["down"] += down
        out["errors"] += errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotators", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--db", default="", help="a PostgreSQL URL (a role that may create databases)")
    parser.add_argument("--pairs", type=int, default=20000, help="pairs in the project (overlap 1)")
    args = parser.parse_args()
    from collect_load import matmul_gflops
    from sqlalchemy import func, select
    from support import Server, new_project

    from preflab.collect import store
    from preflab.collect.db import Vote, open_database

    db, admin = args.db, None
    if db:
        from sqlalchemy import create_engine, text

        name = f"preflab_soak_{uuid.uuid4().hex[:8]}"
        admin = create_engine(db.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        db = db.rsplit("/", 1)[0] + "/" + name
    with tempfile.TemporaryDirectory() as tmp:
        project = new_project(Path(tmp) / "soak", db, n_pairs=args.pairs, overlap=1)
        engine, sessions = open_database(project.db_url)
        with sessions() as s:
            tokens = [store.create_annotator(s, name=f"s{i:03d}")[1] for i in range(args.annotators)]
        server = Server(project.dir, db).start()
        out, lock = {"acked": [], "latencies": [], "down": 0, "errors": []}, threading.Lock()
        start = time.monotonic()
        deadline = start + args.seconds
        threads = [threading.Thread(target=vote_until, args=(server.url, t, deadline, out, lock)) for t in tokens]
        for t in threads:
            t.start()
        time.sleep(args.seconds / 2)
        server.kill9()  # SIGKILL: no shutdown, no flush, mid-request
        killed = time.monotonic()
        server.start()
        restart = time.monotonic() - killed
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        server.stop()
        with sessions() as s:
            stored = s.scalar(select(func.count()).select_from(Vote))
            stored_ids = set(s.scalars(select(Vote.id)))
        engine.dispose()
        if out["errors"]:  # the server's own account of what went wrong
            for log in sorted(project.dir.glob("server-*.log")):
                print(f"--- {log.name}", *log.read_text().splitlines()[-40:], sep="\n", file=sys.stderr)
    if admin is not None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    lat = sorted(out["latencies"])
    result = {
        "backend": "postgresql" if args.db else "sqlite",
        "annotators": args.annotators,
        "seconds": round(wall, 1),
        "acknowledged": len(out["acked"]),
        "stored": stored,
        "lost": len(set(out["acked"]) - stored_ids),
        "stored_not_acknowledged": len(stored_ids - set(out["acked"])),
        "errors": len(out["errors"]),
        "connection_failures_while_down": out["down"],
        "restart_seconds": round(restart, 2),
        "votes_per_second": round(len(out["acked"]) / wall, 1),
        "post_p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "post_p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
        "matmul_fp32_gflops": round(matmul_gflops(), 1),
    }
    print(json.dumps(result))
    if out["errors"]:
        print("errors:", *out["errors"][:5], sep="\n  ", file=sys.stderr)
    ok = result["lost"] == 0 and result["stored_not_acknowledged"] == 0 and not out["errors"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
