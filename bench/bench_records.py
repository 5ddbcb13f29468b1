"""Verifying a table of 1,000 signed peer records, against parsing the same table as JSON.

Run: .venv/bin/python bench/bench_records.py [--records 1000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from p2prc_core.identity import NodeIdentity
from p2prc_core.records import sign_record, verify_record


def make_table(count: int) -> bytes:
    records = []
    for index in range(count):
        records.append(sign_record(NodeIdentity.generate(), {
            "name": f"node-{index}", "addresses": [f"2001:db8::{index:x}", "192.0.2.1"],
            "port": 8088, "seq": 1, "time": int(time.time()),
            "specs": {"cpus": 8, "memory": 16 << 30, "gpus": []}, "metadata": {},
            "version": "0.1.0"}))
    return json.dumps({"records": records}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    raw = make_table(args.records)
    parse_times, verify_times = [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        json.loads(raw)
        parse_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        for record in json.loads(raw)["records"]:
            verify_record(record)
        verify_times.append(time.perf_counter() - started)
    parse, verify = statistics.median(parse_times), statistics.median(verify_times)
    n = args.records
    print(f"\n{n} signed records ({len(raw) / 1024:.0f} KiB), median of {args.rounds} rounds")
    print(f"  parse as plain JSON    {parse * 1e3:8.2f} ms  {parse / n * 1e6:7.2f} us/record")
    print(f"  parse and verify each  {verify * 1e3:8.2f} ms  {verify / n * 1e6:7.2f} us/record")
    print(f"  ratio verify/parse {verify / parse:.1f}")


if __name__ == "__main__":
    main()
