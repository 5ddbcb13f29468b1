"""Dashboard pages against a table of 1,000 peers, measured in the browser (headless
Chromium): each page's load time (navigation start to the load event, the server's render
included) and what the browser downloads for it, against the command line's answer for the
same table ('p2prc peers ls --json', a whole process) as the baseline.

Run: .venv/bin/python bench/bench_ui.py [--peers 1000] [--rounds 5]
Needs Chromium and ChromeDriver (scripts/browser).
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import P2PRC

from p2prc_core.identity import NodeIdentity
from p2prc_core.peertable import PeerTable
from p2prc_core.records import sign_record

PAGES = ["/peers", "/peers?sort=latency&order=desc", "/containers", "/host", "/runs",
         "/specs"]


def plant(home: Path, count: int) -> None:
    me = NodeIdentity.load_or_create(home)
    table = PeerTable(home, me.node_id, max_peers=count + 10, max_unverified=count + 10)
    records = [sign_record(NodeIdentity.generate(), {
        "name": f"node-{i}", "addresses": [f"2001:db8::{i:x}", "192.0.2.1"], "port": 8088,
        "seq": 1, "time": int(time.time()), "metadata": {}, "version": "0.1.0",
        "specs": {"cpus": 8, "memory": 16 << 30, "gpus": ["A100"] if i % 10 == 0 else [],
                  **({"gpus_free": 1} if i % 10 == 0 else {})}}) for i in range(count)]
    result = table.merge(records)
    if len(result.added) != count:
        raise SystemExit(f"planted {len(result.added)} of {count} peers: {result.dropped}")


def browser(profile: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 f"--user-data-dir={profile}", "--disable-cache"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


TIMING = """
const nav = performance.getEntriesByType("navigation")[0];
const resources = performance.getEntriesByType("resource");
return {load: nav.loadEventEnd - nav.startTime, server: nav.responseEnd - nav.requestStart,
        html: nav.encodedBodySize,
        bytes: nav.transferSize + resources.reduce((n, r) => n + r.transferSize, 0),
        body: nav.encodedBodySize + resources.reduce((n, r) => n + r.encodedBodySize, 0),
        files: 1 + resources.length};
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="p2prc-bench-ui-") as tmp:
        home = Path(tmp) / "me"
        plant(home, args.peers)
        env = {**os.environ, "P2PRC_HOME": str(home), "P2PRC_MAX_TABLE_PEERS":
               str(args.peers + 10), "P2PRC_MAX_UNVERIFIED_PEERS": str(args.peers + 10)}
        cli = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            subprocess.run([P2PRC, "peers", "ls", "--json"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            cli.append((time.perf_counter() - started) * 1000)
        ui = subprocess.Popen([P2PRC, "ui", "--no-browser"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(ui.stdout.readline()),  # type: ignore
                         daemon=True).start()
        url = lines.get(timeout=30).strip()
        base = url.split("/?", 1)[0]
        driver = browser(Path(tmp) / "chromium")
        try:
            driver.get(url)
            print(f"{args.peers} peers; median of {args.rounds} loads each, headless Chromium")
            print(f"{'page':34} {'load ms':>8} {'server ms':>9} {'downloaded':>11} {'files':>5}")
            peers_load = None
            for page in PAGES:
                found = []
                for _ in range(args.rounds + 1):  # the first warms the caches; not counted
                    driver.get(base + page)
                    found.append(driver.execute_script(TIMING))
                found = found[1:]
                load = statistics.median(f["load"] for f in found)
                server = statistics.median(f["server"] for f in found)
                first = found[0]
                if page == "/peers":
                    peers_load = load
                    rows = len(driver.find_elements("css selector", "#peers tbody tr"))
                    assert rows == args.peers, rows
                print(f"{page:34} {load:8.0f} {server:9.0f} {first['body'] / 1024:9.1f} KiB "
                      f"{first['files']:5}")
            # The first load of /peers with an empty cache: everything it downloads.
            driver.execute_cdp_cmd("Network.clearBrowserCache", {})
            driver.get(base + "/peers")
            cold = driver.execute_script(TIMING)
            print(f"/peers, cold cache: {cold['body'] / 1024:.1f} KiB in {cold['files']} "
                  f"files ({cold['bytes'] / 1024:.1f} KiB on the wire, the HTML "
                  f"{cold['html'] / 1024:.1f} KiB)")
        finally:
            driver.quit()
            ui.terminate()
            ui.wait(15)
        baseline = statistics.median(cli)
        print(f"baseline 'p2prc peers ls --json' (a whole process): {baseline:.0f} ms")
        if peers_load is not None:
            print(f"ratio /peers page load / peers ls --json: {peers_load / baseline:.2f}")


if __name__ == "__main__":
    main()
