"""Restart to SERVING and resident memory at start (issue 16: <= 5 s and <= 1.0 GB at 1M items).

Each round starts ``recsvc serve`` as a fresh process (imports, catalog, index, recovery, warm-up: the
whole start a deployment waits for) and times it from spawn to its "recsvc serving" line, written after
the health service says SERVING. The process's /proc status at that moment gives the memory: VmRSS, split
into RssAnon (the process's own) and RssFile (mapped file pages: the catalog's embeddings, shared page
cache), and VmHWM (the peak). Two variants in one group, alternating:

- ``columns``: the catalog as binary columns (the demo cache, converted once), what every restart reads;
- ``jsonl``: the same catalog and index, but items.jsonl parsed at every start (its conversion blocked),
  as every restart did before the binary columns.

Full mode: the 1M x 64 demo catalog and index from ~/.cache/recsvc (built once, by
``benchmarks/conftest.py``'s ``timed_load``, if missing). RECSVC_BENCH_QUICK=1: a 10k-item demo catalog in a
temporary cache (the first start builds it, untimed).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import QUICK, demo_config

N_ITEMS = 10_000 if QUICK else 1_000_000
ROUNDS = 2 if QUICK else 3
START_TIMEOUT_S = 120 if QUICK else 600

CONFIG = """
[metrics]
port = 0
[server]
port = 0
[catalog]
cache_dir = "{cache}"
{path}
[catalog.demo]
n_items = {n}
dim = 64
[exploration]
seed = 1
[state]
dir = "{state}"
"""


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) // 1024
    return out


class Server:
    """``recsvc serve`` in a child process: started, timed to SERVING, stopped."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: subprocess.Popen | None = None

    def start(self) -> tuple[float, dict[str, int]]:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "recsvc.cli", "serve", "--config", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in self.proc.stdout:
            if line.startswith("recsvc serving"):
                return time.perf_counter() - t0, proc_status(self.proc.pid)
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError(f"recsvc serve with {self.config} did not reach SERVING")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """(columns config, jsonl config), each started once untimed (a build, a conversion, a layout)."""
    from recsvc.catalog import Catalog
    from recsvc.recovery import demo_cache_dir

    tmp = tmp_path_factory.mktemp("restart")
    cache = tmp / "cache" if QUICK else Path("~/.cache/recsvc").expanduser()
    columns = tmp / "columns.toml"
    columns.write_text(CONFIG.format(cache=cache, path="", n=N_ITEMS, state=tmp / "state-columns"))
    server = Server(columns)
    server.start()  # builds (quick) or converts (once) the demo catalog
    server.stop()
    demo = demo_cache_dir(demo_config(N_ITEMS).with_overrides({"catalog": {"cache_dir": str(cache)}}))
    # The same catalog in JSON lines, its index beside it, and its conversion blocked: parsed every start.
    legacy = tmp / "jsonl-catalog"
    legacy.mkdir()
    if (demo / "items.jsonl").exists():
        for name in ("embeddings.npy", "items.jsonl", "catalog.json"):
            _link_or_copy(demo / name, legacy / name)
    else:
        Catalog.load(demo).save_jsonl(legacy, compact=False)
    for name in ("index.bin", "index.json"):
        _link_or_copy(demo / name, legacy / name)
    (legacy / "converted").write_text("conversion blocked: this catalog is parsed at every start\n")
    jsonl = tmp / "jsonl.toml"
    jsonl.write_text(CONFIG.format(cache=cache, path=f'path = "{legacy}"', n=N_ITEMS, state=tmp / "state-jsonl"))
    return {"columns": columns, "jsonl": jsonl}


@pytest.mark.parametrize("catalog", ["columns", "jsonl"])
@pytest.mark.benchmark(group=f"restart-{N_ITEMS}")
def test_restart_to_serving(benchmark, configs, catalog):
    server = Server(configs[catalog])
    seen: list[tuple[float, dict[str, int]]] = []
    try:
        benchmark.pedantic(lambda: seen.append(server.start()), setup=server.stop, rounds=ROUNDS, iterations=1)
    finally:
        server.stop()
    benchmark.extra_info.update({
        "n_items": N_ITEMS,
        "serving_s": [round(s, 2) for s, _ in seen],
        **{f"{k}_mib": [st[k] for _, st in seen] for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")},
    })
    print(f"\n{catalog} {N_ITEMS}: to SERVING {[round(s, 2) for s, _ in seen]} s; at SERVING "
          + "; ".join(f"{k} {[st[k] for _, st in seen]} MiB" for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")))
