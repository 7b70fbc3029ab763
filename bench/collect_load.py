"""Load figures of `preflab collect serve`: votes/second sustained by N concurrent annotators over loopback HTTP
and the p50/p99 latency of POST /api/votes, on SQLite (default) or PostgreSQL (--db URL), beside this
machine's fp32 matmul GFLOP/s so the numbers can be compared across machines.

    .venv/bin/python bench/collect_load.py                       # SQLite in a temporary project
    .venv/bin/python bench/collect_load.py --db postgresql://preflab:preflab@127.0.0.1/preflab_bench

Each annotator loops GET /api/next -> POST /api/votes; votes/second counts acknowledged votes over the
wall time of the whole run (so it includes the GET of every cycle). The clients run in this process, on the
same cores as the server: on a small machine they take part of the CPU the server could have used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "collect"))  # support.py


def matmul_gflops(n: int = 512, seconds: float = 2.0) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="", help="a PostgreSQL URL; a fresh database is made on that server")
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--votes", type=int, default=50, help="votes per annotator")
    args = parser.parse_args()
    from support import Server, new_project  # the tests' project and server helpers

    from preflab.collect import store
    from preflab.collect.db import open_database

    db = args.db
    if db:
        import uuid

        from sqlalchemy import create_engine, text

        name = f"preflab_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(db.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        db = db.rsplit("/", 1)[0] + "/" + name
    with tempfile.TemporaryDirectory() as tmp:
        project = new_project(Path(tmp) / "bench", db, n_pairs=args.annotators * args.votes, overlap=1)
        engine, sessions = open_database(project.db_url)
        with sessions() as s:
            tokens = [store.create_annotator(s, name=f"b{i:03d}")[1] for i in range(args.annotators)]
        engine.dispose()
        server = Server(project.dir, db).start()
        latencies, lock = [], threading.Lock()

        def annotate(token: str) -> None:
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
                for i in range(args.votes):
                    pair_id = http.get("/api/next").json()["pair_id"]
                    start = time.perf_counter()
                    r = http.post("/api/votes", json={"pair_id": pair_id, "choice": "left", "client_id": f"{i}"})
                    elapsed = time.perf_counter() - start
                    r.raise_for_status()
                    with lock:
                        latencies.append(elapsed)

        threads = [threading.Thread(target=annotate, args=(t,)) for t in tokens]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        server.stop()
    if args.db:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    result = {
        "backend": "postgresql" if args.db else "sqlite",
        "annotators": args.annotators,
        "votes": len(latencies),
        "seconds": round(wall, 2),
        "votes_per_second": round(len(latencies) / wall, 1),
        "post_p50_ms": round(1000 * statistics.median(latencies), 1),
        "post_p99_ms": round(1000 * pick(0.99), 1),
        "matmul_fp32_gflops": round(matmul_gflops(), 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
