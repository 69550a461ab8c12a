"""`make bench`: whole `lora-prep prepare` processes against the bare ten-line script, on a 0.85 B model.

    .venv/bin/python bench/bench.py [--runs 3] [--no-profile] [--skip SCENARIO,...]

What it does (every figure is a whole fresh process, measured from outside):

1. Builds once, cached under bench/.cache/models/ (tests.model_factory.build_big_model_dir):
     llama-0.85b      hidden 2048, 18 layers, intermediate 5632, vocab 8192, untied head: 845,228,032
                      parameters, bfloat16 safetensors in 100 MB shards (1.69 GB)
     llama-0.2b-f32   hidden 1024, 16 layers, intermediate 2816: 197,166,080 parameters, the factory's
                      bfloat16 weights re-saved as float32 (0.79 GB), for the float32 memory figure
   and serves them from the Hub-compatible test server (tests.hubserver) on 127.0.0.1
   (HF_ENDPOINT pointing at it, HF_HUB_DISABLE_XET=1).
2. Launches one `prefect server start` (tests.servers.start_prefect_server) for the scenarios
   "with a running server", initialises the two SQLite MLflow stores (one per side, as on a
   user's machine), and runs one untimed warm-up of each side that also fills the warm HF cache.
3. Runs, alternately (bare, lora-prep, then lora-prep, bare, ...), --runs times per scenario:
     cold-api       fresh HF cache per run, PREFECT_API_URL = the running server
     warm-api       warm HF cache, the running server; plus `--no-check` (cost of the check)
     warm-embedded  warm HF cache, PREFECT_API_URL unset: lora-prep's shared local server in a new
                    PREFECT_HOME; its first run (server start, new database) is reported apart, and so
                    is one run after `lora-prep server stop` (restart on the existing database)
     mem-0.2b-f32   the float32 model, warm cache, the running server, both sides load float32
   bare = bench/bare_script.py; lora-prep = `lora-prep prepare <repo> --dtype D --r 16
   --tracking-uri sqlite:///... --output-dir ... --json` (target modules: all-linear, the default).
4. Per run: wall seconds (spawn to reap), CPU seconds (rusage of the process and what it waited
   for), peak RSS of the process tree (psutil tree, /proc/<pid>/status every 50 ms, summed) with its
   anonymous (RssAnon) and file-backed (RssFile) parts, the largest single process (sampled, and the
   kernel's ru_maxrss high-water mark), body bytes and requests served by the hub, and for
   lora-prep the JSON's per-stage seconds, bytes_downloaded and the manifest's check seconds.
5. Profiles one warm lora-prep run (running server) with pyinstrument when it is installed
   (`.venv/bin/pip install pyinstrument`): bench/profile-warm.txt, and a summary in the results.
6. Prints and writes bench/results.md: ratios lora-prep / bare of the medians first, then medians
   and min-max; raw figures in bench/.cache/results.json.

Needs ~8 GB of disk under bench/.cache and 10-20 minutes on 2 cores with --runs 3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH = ROOT / "bench"
CACHE = BENCH / ".cache"
BIN = Path(sys.executable).parent
LORA_PREP = str(BIN / "lora-prep")
BARE = str(BENCH / "bare_script.py")
MiB = 2**20
SAMPLE_S = 0.05
# Before each run: wait until the rest of the machine uses under QUIET_CORES (the machine is shared).
QUIET_CORES = 0.3
QUIET_MAX_WAIT_S = 300
RETRIES = 2  # a run that saw more than QUIET_CORES of other load is run again, at most this often


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    dtype: str  # stored on disk, and loaded in, by both sides

    @property
    def repo_id(self) -> str:
        return f"bench/{self.name}"


BIG = ModelSpec("llama-0.85b", hidden=2048, layers=18, dtype="bfloat16")
SMALL = ModelSpec("llama-0.2b-f32", hidden=1024, layers=16, dtype="float32")

# The issue's targets: lora-prep / bare of the medians.
TARGETS = {"cold-api": 1.0, "warm-api": 1.1, "warm-embedded": 1.3}
RSS_TARGET = 1.1


# --- models -----------------------------------------------------------------------------------

_BUILD = r"""
import shutil, sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.model_factory import build_big_model_dir
out, hidden, layers, dtype = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if dtype == "bfloat16":
    build_big_model_dir(out, hidden=hidden, layers=layers, seed=0)
else:  # the factory writes bfloat16: load those weights in float32 and save them again, same shard size
    from transformers import AutoModelForCausalLM
    tmp = out.with_name(out.name + ".bf16")
    build_big_model_dir(tmp, hidden=hidden, layers=layers, seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=getattr(torch, dtype))
    model.save_pretrained(str(out), max_shard_size="100MB")
    for f in tmp.iterdir():
        if not f.name.startswith("model") and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    shutil.rmtree(tmp)
"""


def ensure_model(spec: ModelSpec) -> Path:
    out = CACHE / "models" / spec.name
    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".bf16"), ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"building {spec.name} (once; cached in {out.relative_to(ROOT)}) ...", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", _BUILD, str(ROOT), str(out), str(spec.hidden), str(spec.layers), spec.dtype], check=True)
    (out / ".complete").write_text("")
    print(f"  built in {time.perf_counter() - started:.1f} s", flush=True)
    return out


def model_facts(model_dir: Path) -> dict:
    from tests.hubserver import safetensors_param_counts

    counts: dict[str, int] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for dtype, n in safetensors_param_counts(f).items():
            counts[dtype] = counts.get(dtype, 0) + n
    cfg = json.loads((model_dir / "config.json").read_text())
    return {
        "params": sum(counts.values()), "dtypes": counts,
        "weight_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
        "shards": len(list(model_dir.glob("*.safetensors"))),
        "config": {k: cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                                           "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
    }


# --- measuring one process tree --------------------------------------------------------------


def _proc_status(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS, RssAnon, RssFile) in bytes, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) * 1024
    if "VmRSS" not in values:  # a zombie
        return None
    return values["VmRSS"], values.get("RssAnon", 0), values.get("RssFile", 0)


class TreeSampler(threading.Thread):
    """Every SAMPLE_S: the root and all its descendants, RSS summed (and its anon / file parts)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.stop_event = threading.Event()
        self.peak_tree = self.peak_anon = self.peak_file = self.peak_single = 0
        self.max_procs = 0
        self.samples = 0

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop_event.is_set():
            try:
                pids = [self.pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.Error:
                pids = [self.pid]
            tree = anon = file = 0
            alive = 0
            for pid in pids:
                st = _proc_status(pid)
                if st is None:
                    continue
                alive += 1
                tree += st[0]
                anon += st[1]
                file += st[2]
                self.peak_single = max(self.peak_single, st[0])
            if alive:
                self.samples += 1
                self.peak_tree = max(self.peak_tree, tree)
                self.peak_anon = max(self.peak_anon, anon)
                self.peak_file = max(self.peak_file, file)
                self.max_procs = max(self.max_procs, alive)
            self.stop_event.wait(SAMPLE_S)


@dataclass
class Run:
    scenario: str
    side: str
    index: int
    rc: int
    wall_s: float
    cpu_s: float
    peak_tree_rss: int
    peak_tree_anon: int
    peak_tree_file: int
    peak_single_rss: int
    maxrss_hwm: int  # ru_maxrss of the root (largest of it and its waited-for children), kernel-exact
    max_procs: int
    body_bytes: int  # every GET body the hub sent: API JSON and files
    requests: int
    file_bytes: int = 0  # GET bodies of /resolve/ (file contents: weights, config, tokenizer)
    stages: dict[str, float] = field(default_factory=dict)
    bytes_downloaded: int | None = None
    check_s: float | None = None
    load_s: float | None = None
    server_cpu_s: float = 0.0  # CPU of the Prefect server this run used, during the run
    other_load: float = 0.0  # cores used by other processes during the run
    waited_s: float = 0.0  # waited for a quiet machine before it
    error: str = ""


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores, /proc/stat)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


def own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def wait_quiet(max_wait: float | None = None) -> float:
    """Wait (bounded) until the rest of the machine uses under QUIET_CORES cores; the seconds waited."""
    max_wait = QUIET_MAX_WAIT_S if max_wait is None else max_wait
    started = time.perf_counter()
    said = False
    while True:
        b0, o0, t0 = busy_cpu_s(), own_cpu_s(), time.perf_counter()
        time.sleep(1.0)
        load = ((busy_cpu_s() - b0) - (own_cpu_s() - o0)) / (time.perf_counter() - t0)
        waited = time.perf_counter() - started
        if load < QUIET_CORES or waited > max_wait:
            return waited
        if not said:
            print(f"  (machine busy: {load:.1f} cores used by other processes; waiting up to {max_wait:.0f} s)", flush=True)
            said = True


def _cpu_of(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


@dataclass
class Measured:
    rc: int
    wall: float
    cpu: float  # the process and the children it waited for
    sampler: TreeSampler
    hwm: int
    server_cpu: float  # the Prefect server the run talked to (running one, or the embedded local one)
    other_load: float  # cores used by everything else: other users of the machine


def measure(cmd: list[str], env: dict[str, str], log_prefix: Path, servers=lambda: [], timeout: float = 900) -> Measured:
    """Run cmd to completion, stdout/stderr to files. The machine's busy CPU during the run minus this
    tree, this driver (the hub server runs here) and the Prefect servers is other processes' load."""
    log_prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{log_prefix}.out", "wb") as out, open(f"{log_prefix}.err", "wb") as err:
        server0 = _cpu_of(servers())
        busy0, own0 = busy_cpu_s(), own_cpu_s()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=str(ROOT))
        sampler = TreeSampler(proc.pid)
        sampler.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.daemon = True
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: end the run too, and reap it
            killer.cancel()
            proc.kill()
            proc.wait(timeout=30)
            raise
        wall = time.perf_counter() - started
        busy, own = busy_cpu_s() - busy0, own_cpu_s() - own0
        server = sum(v - server0.get(pid, 0.0) for pid, v in _cpu_of(servers()).items())
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop_event.set()
    sampler.join()
    cpu = usage.ru_utime + usage.ru_stime
    other = max(0.0, busy - cpu - own - server) / wall
    return Measured(proc.returncode, wall, cpu, sampler, usage.ru_maxrss * 1024, server, other)


# --- the benchmark -----------------------------------------------------------------------------


class Bench:
    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.work = CACHE / "run"
        self.results: list[Run] = []
        self.notes: list[str] = []
        self.problems: list[str] = []
        self.hub = None
        self.api = None
        self.counter = 0
        self.retried = 0

    # environments

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HF_", "HUGGINGFACE_"))}
        env.update(
            HF_ENDPOINT=self.hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(self.work / "hf-home"),
            LORA_PREP_HOME=str(self.work / "lora-prep-home"), PYTHONUNBUFFERED="1",
        )
        return env

    def env(self, prefect_home: Path, hf_cache: Path, api: bool) -> dict[str, str]:
        from tests.servers import prefect_client_env

        client = prefect_client_env(self.api.url, prefect_home)
        if not api:
            client.pop("PREFECT_API_URL")
        prefect_home.mkdir(parents=True, exist_ok=True)
        return {**self.base_env(), **client, "HF_HUB_CACHE": str(hf_cache)}

    # one run of each side

    def lora_prep_cmd(self, spec: ModelSpec, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
        return [LORA_PREP, "prepare", spec.repo_id, "--dtype", spec.dtype, "--r", "16",
                "--tracking-uri", self.lp_uri, "--output-dir", str(out), "--json", *extra]

    def bare_cmd(self, spec: ModelSpec, out: Path) -> list[str]:
        return [sys.executable, BARE, spec.repo_id, str(out), self.bare_uri, self.bare_artifacts, spec.dtype]

    def one(self, scenario: str, side: str, index: int, spec: ModelSpec, env: dict[str, str], extra: tuple[str, ...] = (),
            record: bool = True) -> Run:
        self.counter += 1
        out = self.work / "out" / f"{self.counter:03d}-{scenario}-{side}"
        cmd = self.bare_cmd(spec, out) if side == "bare" else self.lora_prep_cmd(spec, out, extra)
        waited = wait_quiet()
        self.hub.reset_counters()
        got = measure(cmd, env, self.work / "logs" / f"{self.counter:03d}-{scenario}-{side}", lambda: self.server_pids(env))
        rc, wall, s, other = got.rc, got.wall, got.sampler, got.other_load
        run = Run(scenario, side, index, rc, round(wall, 3), round(got.cpu, 3), s.peak_tree, s.peak_anon, s.peak_file, s.peak_single,
                  got.hwm, s.max_procs, self.hub.body_bytes(), self.hub.requests(), file_bytes=self.hub.body_bytes("*/resolve/*"), server_cpu_s=round(got.server_cpu, 2),
                  other_load=round(other, 2), waited_s=round(waited, 1))
        log = self.work / "logs" / f"{self.counter:03d}-{scenario}-{side}"
        if rc != 0:
            tail = Path(f"{log}.err").read_text(errors="replace").strip().splitlines()[-3:]
            run.error = " | ".join(tail)[-600:]
            self.problems.append(f"{scenario} {side} run {index}: exit {rc}: {run.error}")
        elif side != "bare":
            lines = [line for line in Path(f"{log}.out").read_text().splitlines() if line.startswith("{")]
            if lines:
                result = json.loads(lines[-1])
                run.stages = result.get("seconds", {})
                run.bytes_downloaded = result.get("bytes_downloaded")
                try:
                    manifest = json.loads((Path(result["artifact_dir"]) / "manifest.json").read_text())
                    run.check_s = (manifest.get("check") or {}).get("seconds")
                    run.load_s = (manifest.get("load_used") or {}).get("seconds")
                except (OSError, ValueError, KeyError):
                    pass
        shutil.rmtree(out, ignore_errors=True)
        if record:
            self.results.append(run)
        print(f"  {scenario:<22} {side:<18} #{index}  {wall:7.2f} s  tree {s.peak_tree / MiB:6.0f} MiB "
              f"(anon {s.peak_anon / MiB:5.0f}, file {s.peak_file / MiB:5.0f})  {run.body_bytes / 1e6:8.1f} MB  "
              f"other load {other:.2f} cores  rc {rc}", flush=True)
        return run

    def alternate(self, scenario: str, spec: ModelSpec, env_for, sides: list[tuple[str, tuple[str, ...]]]) -> None:
        """runs x each side, order flipped every round (A B, B A, ...): drift hits both sides alike."""
        for i in range(self.runs):
            order = sides if i % 2 == 0 else list(reversed(sides))
            for side, extra in order:
                # The machine is shared: a run that saw other load is run again (at most RETRIES times), the cleanest kept.
                tries = []
                for _ in range(1 + RETRIES):
                    tries.append(self.one(scenario, side, i, spec, env_for(i), extra, record=False))
                    if tries[-1].rc != 0 or tries[-1].other_load <= QUIET_CORES:
                        break
                    print("    (other load during the run: running it again)", flush=True)
                self.retried += len(tries) - 1
                self.results.append(min(tries, key=lambda r: (r.rc != 0, r.other_load)))

    # setup

    def setup(self, big_dir: Path, small_dir: Path) -> None:
        from tests.hubserver import HubServer, publish
        from tests.servers import start_prefect_server

        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.hub = HubServer(CACHE / "store").start()
        for spec, d in ((BIG, big_dir), (SMALL, small_dir)):
            publish(self.hub.store, spec.repo_id, d)  # a commit already in the store: hashes only, no copy
        print(f"hub {self.hub.url} serving {BIG.repo_id}, {SMALL.repo_id}", flush=True)
        started = time.perf_counter()
        self.api = start_prefect_server(self.work / "prefect-server")
        print(f"prefect server {self.api.url} healthy after {time.perf_counter() - started:.1f} s", flush=True)
        self.lp_uri = f"sqlite:///{self.work / 'mlflow-lora-prep' / 'mlflow.db'}"
        self.bare_uri = f"sqlite:///{self.work / 'mlflow-bare' / 'mlflow.db'}"
        self.bare_artifacts = (self.work / "mlflow-bare" / "artifacts").as_uri()
        for uri in (self.lp_uri, self.bare_uri):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Existing stores, as on a user's machine: a new SQLite store costs ~10 s of migrations on its first use.
        subprocess.run([sys.executable, "-c", "import sys, mlflow\nfor u in sys.argv[1:]: mlflow.MlflowClient(u).search_experiments()",
                        self.lp_uri, self.bare_uri], check=True, env=self.base_env(), capture_output=True)

    # scenarios

    def run_all(self, skip: set[str], profile: bool) -> None:
        w = self.work
        warm = {BIG: w / "hf-warm", SMALL: w / "hf-warm"}
        ph_warm = w / "prefect-home-warm-api"
        print("warm-up (untimed): fills the warm HF cache, the page cache and both stores", flush=True)
        for spec in (BIG, SMALL):
            self.one("warm-up", "bare", 0, spec, self.env(ph_warm, warm[spec], True), record=False)
            self.one("warm-up", "lora-prep", 0, spec, self.env(ph_warm, warm[spec], True), record=False)
            self.one("warm-up", "lora-prep", 1, spec, self.env(ph_warm, warm[spec], True), record=False)

        if "cold-api" not in skip:
            print("cold-api: fresh HF cache per run, running Prefect server", flush=True)
            ph = w / "prefect-home-cold-api"

            def cold_env(i: int, _ph=ph) -> dict[str, str]:
                cache = w / "hf-cold"
                shutil.rmtree(cache, ignore_errors=True)  # every run starts from an empty cache
                return self.env(_ph, cache, True)

            self.alternate("cold-api", BIG, cold_env, [("bare", ()), ("lora-prep", ())])
            shutil.rmtree(w / "hf-cold", ignore_errors=True)

        if "warm-api" not in skip:
            print("warm-api: warm HF cache, running Prefect server", flush=True)
            self.alternate("warm-api", BIG, lambda i: self.env(ph_warm, warm[BIG], True),
                           [("bare", ()), ("lora-prep", ()), ("lora-prep --no-check", ("--no-check",))])

        if "warm-embedded" not in skip:
            print("warm-embedded: warm HF cache, PREFECT_API_URL unset (lora-prep's shared local server)", flush=True)
            ph = w / "prefect-home-embedded"
            env = self.env(ph, warm[BIG], False)
            self.one("embedded-first", "lora-prep", 0, BIG, env)  # starts the server: new database, migrations
            self.alternate("warm-embedded", BIG, lambda i: env, [("bare", ()), ("lora-prep", ())])
            self.idle_server(env)
            self.server_stop(env)
            self.one("embedded-restart", "lora-prep", 0, BIG, env)  # starts it again on the existing database
            self.server_stop(env)
            # the same bare figure for the two one-off runs: the warm-embedded bare runs
            for r in [r for r in self.results if r.scenario == "warm-embedded" and r.side == "bare"]:
                for one_off in ("embedded-first", "embedded-restart"):
                    self.results.append(Run(**{**asdict(r), "scenario": one_off}))

        if "mem-0.2b-f32" not in skip:
            print("mem-0.2b-f32: float32 model, warm HF cache, running Prefect server", flush=True)
            self.alternate("mem-0.2b-f32", SMALL, lambda i: self.env(ph_warm, warm[SMALL], True), [("bare", ()), ("lora-prep", ())])

        if profile:
            self.profile(self.env(ph_warm, warm[BIG], True))

    def server_pids(self, env: dict[str, str]) -> list[int]:
        """The running `prefect server start` (and its children), or the embedded local server of env's PREFECT_HOME."""
        pids = []
        if self.api is not None and self.api.alive():
            try:
                root = psutil.Process(self.api.process.pid)
                pids += [root.pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.Error:
                pass
        try:
            state = json.loads((Path(env["PREFECT_HOME"]) / "lora-prep-server.json").read_text())
            pids.append(int(state["pid"]))
        except (OSError, ValueError, KeyError):
            pass
        return pids

    def idle_server(self, env: dict[str, str], seconds: float = 15.0) -> None:
        """What the shared local server costs while nobody uses it (it stays up until its idle timeout)."""
        try:
            pid = int(json.loads((Path(env["PREFECT_HOME"]) / "lora-prep-server.json").read_text())["pid"])
            proc = psutil.Process(pid)
            t0 = sum(proc.cpu_times()[:2])
            time.sleep(seconds)
            cores = (sum(proc.cpu_times()[:2]) - t0) / seconds
            rss = proc.memory_info().rss
        except (OSError, ValueError, KeyError, psutil.Error) as exc:
            self.notes.append(f"idle local server not measured: {exc}")
            return
        from lora_prep.local_server import IDLE_TIMEOUT_S

        self.notes.append(f"the shared local Prefect server, idle between runs: {cores * 100:.1f}% of a core over {seconds:.0f} s, "
                          f"RSS {rss / MiB:.0f} MiB; it stays up {IDLE_TIMEOUT_S} s after the last run")
        print(f"  idle local server: {cores * 100:.1f}% of a core, {rss / MiB:.0f} MiB", flush=True)

    def server_stop(self, env: dict[str, str]) -> None:
        done = subprocess.run([LORA_PREP, "server", "stop"], env=env, capture_output=True, text=True, timeout=120)
        print(f"  lora-prep server stop: {done.stdout.strip() or done.stderr.strip()[-200:]}", flush=True)
        if done.returncode != 0 or done.stdout.strip() != "stopped":
            self.problems.append(f"`lora-prep server stop` said {done.stdout.strip()!r} (exit {done.returncode}): {done.stderr.strip()[-300:]}")

    def profile(self, env: dict[str, str]) -> None:
        pyinstrument = BIN / "pyinstrument"
        if not pyinstrument.exists():
            self.notes.append("profile skipped: pyinstrument is not installed (.venv/bin/pip install pyinstrument)")
            print("profile skipped: pyinstrument not installed", flush=True)
            return
        session_file = CACHE / "profile-warm.pyisession"
        out = self.work / "out" / "profile"
        cmd = [str(pyinstrument), "-r", "pyisession", "-o", str(session_file), *self.lora_prep_cmd(BIG, out)]
        print("profile: one warm lora-prep run under pyinstrument (running server)", flush=True)
        wait_quiet()
        got = measure(cmd, env, self.work / "logs" / "profile", lambda: self.server_pids(env))
        rc, wall = got.rc, got.wall
        self.notes.append(f"profiled run: other processes used {got.other_load:.2f} cores meanwhile")
        shutil.rmtree(out, ignore_errors=True)
        if rc != 0:
            self.problems.append(f"profiled run exited {rc}; see {self.work / 'logs' / 'profile.err'}")
            return
        self.profile_summary = summarise_profile(session_file, BENCH / "profile-warm.txt")
        self.profile_summary["wall_s"] = round(wall, 2)

    def stop(self) -> None:
        home = CACHE / "run" / "prefect-home-embedded"
        if (home / "lora-prep-server.json").exists():  # the embedded scenario's local server, if it still runs
            subprocess.run([LORA_PREP, "server", "stop"], env={**os.environ, "PREFECT_HOME": str(home)},
                           capture_output=True, timeout=120)
        if self.api is not None:
            self.api.stop()
        if self.hub is not None:
            self.hub.stop()


# --- the profile -------------------------------------------------------------------------------

# Our stage bodies (functions the prepare flow calls as Prefect tasks), by function name.
STAGE_FUNCTIONS = {
    "resolve": "resolve", "probe_hardware": "probe", "plan_prepare": "plan", "open_run": "open MLflow run",
    "download": "download", "download_snapshot": "download", "build_adapter_ready": "build", "_track": "track",
    "publish_run_artifacts": "publish Prefect artifacts",
}
OURS = "lora_prep (ours)"
OUR_DIRS = tuple(str(ROOT / d) + os.sep for d in ("tasks", "flows", "lora_prep", "deployments"))


def _package(path: str) -> str:
    """'transformers' from .../site-packages/transformers/..., 'lora_prep' for ours, else the file name."""
    if path.startswith(OUR_DIRS):
        return OURS
    parts = Path(path).parts
    if "site-packages" in parts:
        i = parts.index("site-packages")
        return parts[i + 1].removesuffix(".py") if len(parts) > i + 1 else path
    return "stdlib" if "python3" in path else Path(path).name


def summarise_profile(session_file: Path, text_out: Path) -> dict:
    """Wall time of the profiled (main) thread by what it was doing: imports (by package), our stages
    (with the first function of ours below the stage), Prefect outside the stages, the rest."""
    from pyinstrument.renderers import ConsoleRenderer
    from pyinstrument.session import Session

    session = Session.load(str(session_file))
    text_out.write_text(ConsoleRenderer(unicode=False, color=False, show_all=False, short_mode=False).render(session))
    root = session.root_frame()
    buckets: dict[str, float] = {}

    def walk(frame, importing: str | None, stage: str | None, sub: str | None, prefect: bool | str) -> None:
        path = frame.file_path or ""
        fn = frame.function or ""
        if stage is None and importing is None and fn == "wait" and path.endswith("prefect/futures.py"):
            prefect = "prefect: waiting on a submitted task's future (the task runs in a worker thread, not sampled)"
        if importing is None and fn == "_find_and_load":
            importing = "?"
        elif importing in ("?", OURS) and fn == "<module>" and path and "importlib" not in path:
            # the outermost module being imported, unless it is ours: then the first library one below it
            importing = _package(path)
        if stage is None and path.startswith(OUR_DIRS) and fn in STAGE_FUNCTIONS:
            stage = STAGE_FUNCTIONS[fn]
        elif stage is not None and sub is None and path.startswith(OUR_DIRS) and fn not in STAGE_FUNCTIONS:
            sub = fn
        prefect = prefect or "/site-packages/prefect/" in path
        self_time = frame.total_self_time
        if self_time:
            if importing is not None:
                key = f"imports: {importing if importing != '?' else 'importlib'}"
            elif stage is not None:
                key = f"stage: {stage}" + (f" / {sub}" if sub else "")
            elif isinstance(prefect, str):
                key = prefect
            elif prefect:
                key = "prefect (engine, client, settings; outside our stages)"
            else:
                key = "other (CLI, interpreter, our flow body)"
            buckets[key] = buckets.get(key, 0.0) + self_time
        for child in frame.children:
            if not child.is_synthetic:  # [self] / [await] leaves: already in this frame's total_self_time
                walk(child, importing, stage, sub, prefect)

    walk(root, None, None, None, False)
    total = root.time
    imports = sum(v for k, v in buckets.items() if k.startswith("imports"))
    stages = sum(v for k, v in buckets.items() if k.startswith("stage"))
    prefect = sum(v for k, v in buckets.items() if k.startswith("prefect"))
    return {
        "total_s": round(total, 2),
        "groups": {"imports": round(imports, 2), "our stages": round(stages, 2), "prefect outside stages": round(prefect, 2),
                   "other": round(total - imports - stages - prefect, 2)},
        "buckets": {k: round(v, 2) for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])},
    }


# --- the report --------------------------------------------------------------------------------


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")



def _verification_line(warm: list) -> str:
    """Verification on a warm run: bounded by the whole download stage (which holds it), against the in-flow time."""
    if not warm:
        return "Verification on warm runs: no per-stage figures."
    shares = [r.stages.get("download", 0.0) / max(sum(r.stages.values()), 1e-9) for r in warm]
    secs = [r.stages.get("download", 0.0) for r in warm]
    median, worst = statistics.median(shares), max(shares)
    return (f"Warm runs, verification < 5 % of the in-flow time: {'met' if median < 0.05 else '**missed**'} (median) — the "
            f"whole download stage (cache lookup and verification against the markers of verified blobs) took "
            f"{_span(secs, '.3f')} s, {median:.1%} (at most {worst:.1%}) of the sum of the stages over {len(warm)} warm runs"
            + ("; the largest share is a run whose every stage was slowed by other load" if worst >= 0.05 else "") + ".")

def _span(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = format(_med(values), fmt)
    return med if len(values) == 1 else f"{med} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def _mib(values: list[int]) -> list[float]:
    return [v / MiB for v in values]


def _ok(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "**missed**"


PRODUCT_PATHS = ("tasks", "flows", "lora_prep", "deployments", "pyproject.toml")


def product_version() -> dict:
    """The commit, the product files that differ from it, and a digest of their contents: lora-prep is
    edited while benchmarks run, so the report says which code it measured, and whether that changed."""
    import hashlib

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=str(ROOT), capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    digest = hashlib.sha256()
    for rel in PRODUCT_PATHS:
        base = ROOT / rel
        for f in sorted([base] if base.is_file() else base.rglob("*.py") if base.exists() else []):
            digest.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    dirty = [line[3:] for line in git("status", "--porcelain", "--", *PRODUCT_PATHS).splitlines() if line]
    return {"commit": git("rev-parse", "--short=12", "HEAD"), "subject": git("log", "-1", "--format=%s")[:100],
            "dirty": dirty, "digest": digest.hexdigest()[:16]}


def machine() -> dict:
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "prefect", "mlflow", "huggingface_hub", "safetensors"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "-"
    return {
        "cores": os.cpu_count(), "cpu": cpu, "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(), "versions": versions,
    }


SCENARIO_TEXT = {
    "cold-api": "cold HF cache, running Prefect server",
    "warm-api": "warm HF cache, running Prefect server",
    "warm-embedded": "warm HF cache, embedded default (shared local server already up)",
    "embedded-first": "embedded default, first run: starts the local server on a new PREFECT_HOME (migrations)",
    "embedded-restart": "embedded default, first run after `lora-prep server stop` (existing database)",
    "mem-0.2b-f32": "0.2 B float32 model, warm cache, running server (the float32 memory figure)",
}


def report(bench: Bench, facts: dict, started: float, argv: list[str]) -> str:
    runs = [r for r in bench.results if r.rc == 0]

    def pick(scenario: str, side: str) -> list[Run]:
        return [r for r in runs if r.scenario == scenario and r.side == side]

    scenarios = [s for s in SCENARIO_TEXT if any(r.scenario == s for r in runs)]
    m = machine()
    lines = [
        "# lora-prep benchmark: whole processes against the bare script",
        "",
        f"Generated by `make bench` (`{' '.join(['bench/bench.py', *argv])}`) on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{bench.runs} runs per side and scenario, alternating; whole benchmark {(time.perf_counter() - started) / 60:.1f} min.",
        "",
        "Code measured: commit {commit} ({subject!r}){dirty}, product digest {digest} (tasks/, flows/, lora_prep/, "
        "deployments/, pyproject.toml).".format(**{**bench.version_start, "dirty": (
            f", with uncommitted changes to {', '.join(bench.version_start['dirty'])}" if bench.version_start["dirty"] else ", clean")}),
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, {m['os']}, no GPU; Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "",
    ]
    for spec in (BIG, SMALL):
        f = facts[spec.name]
        c = f["config"]
        lines.append(
            f"Model `{spec.repo_id}`: llama, {f['params']:,} parameters ({', '.join(f'{k} {v:,}' for k, v in f['dtypes'].items())}), "
            f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, intermediate {c['intermediate_size']}, "
            f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads, vocab {c['vocab_size']}, untied head; "
            f"{f['weight_bytes'] / 1e9:.2f} GB of safetensors in {f['shards']} shards; both sides load it in {spec.dtype}."
        )
    lines += [
        "",
        "Bare side: [`bench/bare_script.py`](bare_script.py) (snapshot_download → from_pretrained → get_peft_model(r=16, "
        "all-linear) → save_pretrained + tokenizer → mlflow.log_artifacts into a SQLite store). lora-prep side: "
        "`lora-prep prepare <repo> --dtype <dtype> --r 16 --tracking-uri sqlite:///… --output-dir … --json` "
        "(all-linear is the default; the default forward/backward check runs unless `--no-check`).",
        "",
        "## Ratios (lora-prep / bare, of the medians)",
        "",
        "| scenario | wall | target | peak RSS, tree | target | anon RSS | file RSS | largest process (ru_maxrss) | body bytes lora-prep / bare |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = {}
    for s in scenarios:
        bare = pick(s, "bare")
        for side in ("lora-prep", "lora-prep --no-check"):
            lp = pick(s, side)
            if not lp or not bare:
                continue
            wall = _med([r.wall_s for r in lp]) / _med([r.wall_s for r in bare])
            tree = _med([r.peak_tree_rss for r in lp]) / _med([r.peak_tree_rss for r in bare])
            anon = _med([r.peak_tree_anon for r in lp]) / _med([r.peak_tree_anon for r in bare])
            file = _med([r.peak_tree_file for r in lp]) / _med([r.peak_tree_file for r in bare])
            hwm = _med([r.maxrss_hwm for r in lp]) / _med([r.maxrss_hwm for r in bare])
            ratios[(s, side)] = dict(wall=wall, tree=tree)
            t = TARGETS.get(s) if side == "lora-prep" else None
            wall_target = f"≤ {t} {_ok(wall, t)}" if t else "-"
            rss_target = f"≤ {RSS_TARGET} {_ok(tree, RSS_TARGET)}" if side == "lora-prep" and s in ("warm-api", "cold-api", "mem-0.2b-f32") else "-"
            body = f"{_med([r.body_bytes for r in lp]) / 1e6:,.1f} MB / {_med([r.body_bytes for r in bare]) / 1e6:,.1f} MB"
            name = s if side == "lora-prep" else f"{s}, `--no-check`"
            lines.append(f"| {name} | **{wall:.2f}×** | {wall_target} | **{tree:.2f}×** | {rss_target} | {anon:.2f}× | {file:.2f}× | {hwm:.2f}× | {body} |")
    warm_zero = [r for r in runs if r.side.startswith("lora-prep") and r.scenario.startswith(("warm", "embedded", "mem"))]
    nonzero = [r for r in warm_zero if r.file_bytes]
    lines += [
        "",
        f"Warm runs, 0 body bytes: {'met' if not nonzero else '**missed**'} — {len(warm_zero) - len(nonzero)} of {len(warm_zero)} warm lora-prep runs "
        f"received 0 bytes of file content (`/resolve/` GET bodies) from the hub (max {max((r.file_bytes for r in warm_zero), default=0):,} B). "
        f"What they did receive is API JSON: {_span([r.body_bytes for r in warm_zero], ',.0f')} B in "
        f"{_span([r.requests for r in warm_zero], '.0f')} requests per run (commit resolution: the revision `main` is asked for "
        f"its sha each run); the bare script sends {_span([r.requests for r in runs if r.side == 'bare' and r.scenario.startswith('warm')], '.0f')} "
        f"request(s), {_span([r.body_bytes for r in runs if r.side == 'bare' and r.scenario.startswith('warm')], ',.0f')} B.",
        "",
        _verification_line([r for r in warm_zero if r.stages]),
        "",
        "Peak RSS is the sum over the process tree (the process and its descendants while they live), sampled every "
        f"{SAMPLE_S * 1000:.0f} ms from /proc/<pid>/status; anon = RssAnon, file = RssFile (memory-mapped safetensors pages "
        "that were read); ru_maxrss is the kernel's exact high-water mark of the largest single process. "
        "The RSS targets are checked on the scenarios with a running server, where the tree is the CLI process alone; "
        "in the embedded first run the freshly started local server is the CLI's child while the CLI lives and is counted.",
    ]
    lp_warm, bare_warm = pick("warm-api", "lora-prep"), pick("warm-api", "bare")
    if lp_warm and bare_warm:
        w = facts[BIG.name]["weight_bytes"] / MiB
        lp_file, bare_file = _med(_mib([r.peak_tree_file for r in lp_warm])), _med(_mib([r.peak_tree_file for r in bare_warm]))
        nc = pick("warm-api", "lora-prep --no-check")
        nc_file = _med(_mib([r.peak_tree_file for r in nc])) if nc else float("nan")
        lp_anon, bare_anon = _med(_mib([r.peak_tree_anon for r in lp_warm])), _med(_mib([r.peak_tree_anon for r in bare_warm]))
        lines += ["", f"Where the RSS difference is (warm-api, medians): anonymous {lp_anon:.0f} vs {bare_anon:.0f} MiB "
                  f"(+{lp_anon - bare_anon:.0f} MiB: what lora-prep imports and holds besides the model: Prefect, its client, "
                  f"pydantic models, the LoRA wrapping, the check's activations); file-backed {lp_file:.0f} vs {bare_file:.0f} MiB "
                  f"(+{lp_file - bare_file:.0f} MiB, {(lp_file - bare_file) / w:.0%} of the {w:.0f} MiB of weights; "
                  f"{nc_file:.0f} MiB with `--no-check`). File-backed pages are weight pages read through the memory map "
                  "(loading safetensors into the dtype they are stored in, on CPU, keeps the tensors memory-mapped, and the "
                  "bare script never reads most of them) and shared libraries: clean page cache the kernel can drop under "
                  "pressure, unlike the anonymous part."]
    lines += [
        "",
        "## Absolute figures: median (min–max)",
        "",
        "| scenario | side | wall s | CPU s | Prefect server CPU s | peak RSS tree MiB | anon MiB | file MiB | ru_maxrss MiB | procs | hub body MB | hub requests | other load, cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        for side in ("bare", "lora-prep", "lora-prep --no-check"):
            rs = pick(s, side)
            if not rs:
                continue
            lines.append(
                f"| {s} | {side} | {_span([r.wall_s for r in rs], '.2f')} | {_span([r.cpu_s for r in rs], '.1f')} | "
                f"{_span([r.server_cpu_s for r in rs], '.1f') if side != 'bare' else '-'} | "
                f"{_span(_mib([r.peak_tree_rss for r in rs]), '.0f')} | {_span(_mib([r.peak_tree_anon for r in rs]), '.0f')} | "
                f"{_span(_mib([r.peak_tree_file for r in rs]), '.0f')} | {_span(_mib([r.maxrss_hwm for r in rs]), '.0f')} | "
                f"{max(r.max_procs for r in rs)} | {_span([r.body_bytes / 1e6 for r in rs], ',.1f')} | {_span([r.requests for r in rs], '.0f')} | "
                f"{max(r.other_load for r in rs):.2f} |"
            )
    lines += ["", "The embedded one-off rows are single runs compared with the warm-embedded bare runs. CPU s: the process "
              "and the children it waited for (the embedded server is detached, so its CPU is in the Prefect server column). "
              "Other load: the most any run of the row saw other processes use (cores), from /proc/stat less this "
              f"tree, the driver (which also serves the hub) and the Prefect server; each run waited for under {QUIET_CORES} "
              f"cores of other load first (at most {QUIET_MAX_WAIT_S} s) and was repeated (at most {RETRIES} times) when it saw more.", ""]
    if bench.retried:
        bench.notes.append(f"{bench.retried} run(s) were repeated because other processes used more than {QUIET_CORES} cores "
                           f"during them (at most {RETRIES} repeats per run; the one with the least other load is kept)")
    measured = [r for r in bench.results if not (r.side == "bare" and r.scenario.startswith("embedded-"))]  # those are copies
    busy = [r for r in measured if r.other_load > QUIET_CORES]
    if busy:
        bench.notes.append(f"{len(busy)} of {len(measured)} runs shared the machine with other work (> {QUIET_CORES} cores of other load): "
                           + ", ".join(f"{r.scenario} {r.side} #{r.index} ({r.other_load:.2f})" for r in busy)
                           + "; their wall times are inflated")
    lines += ["## Where lora-prep's time goes: per-stage seconds from `--json` (median)", "",
              "`outside stages` = wall − sum of stages: interpreter start, imports not yet paid inside a stage, "
              "finding or starting the Prefect API, the flow engine around the stages, process exit. `check` and `load` "
              "come from the manifest (both are inside `build`).", ""]
    stage_names: list[str] = []
    for r in runs:
        for k in r.stages:
            if k not in stage_names:
                stage_names.append(k)
    lines.append("| scenario | side | " + " | ".join(stage_names) + " | (load) | (check) | outside stages | wall |")
    lines.append("|---|---|" + "---|" * (len(stage_names) + 4))
    for s in scenarios:
        for side in ("lora-prep", "lora-prep --no-check"):
            rs = [r for r in pick(s, side) if r.stages]
            if not rs:
                continue
            cells = [f"{_med([r.stages.get(k, 0.0) for r in rs]):.2f}" for k in stage_names]
            load = f"{_med([r.load_s for r in rs if r.load_s is not None]):.2f}" if any(r.load_s is not None for r in rs) else "-"
            check = f"{_med([r.check_s for r in rs if r.check_s is not None]):.2f}" if any(r.check_s is not None for r in rs) else "-"
            outside = _med([r.wall_s - sum(r.stages.values()) for r in rs])
            lines.append(f"| {s} | {side} | " + " | ".join(cells) + f" | {load} | {check} | {outside:.2f} | {_med([r.wall_s for r in rs]):.2f} |")
    cold = pick("cold-api", "lora-prep")
    if cold:
        lines += ["", f"Bytes: a cold lora-prep run reported bytes_downloaded {_span([r.bytes_downloaded or 0 for r in cold], ',.0f')}; "
                  f"the hub served {_span([r.body_bytes for r in cold], ',.0f')} body bytes to it "
                  f"({_span([r.file_bytes for r in cold], ',.0f')} of them file content) and "
                  f"{_span([r.body_bytes for r in pick('cold-api', 'bare')], ',.0f')} to the bare script "
                  f"({_span([r.file_bytes for r in pick('cold-api', 'bare')], ',.0f')} file content); the weights are "
                  f"{facts[BIG.name]['weight_bytes']:,} B. lora-prep's extra file bytes are the safetensors headers it reads "
                  "(Range requests) to plan before downloading."]
    prof = getattr(bench, "profile_summary", None)
    if prof:
        lines += ["", "## Profile of one warm run (pyinstrument, running server)", "",
                  f"`pyinstrument` on `lora-prep prepare {BIG.repo_id} …` (warm cache, running server): {prof['wall_s']:.1f} s wall "
                  f"under the profiler, {prof['total_s']:.1f} s sampled on the main thread. Full tree: `bench/profile-warm.txt` "
                  "(small, kept in git). Main-thread wall time by what it was doing (a wait on an import lock held by the CLI's "
                  "background import thread counts as imports):", "",
                  "| group | seconds | share |", "|---|---|---|"]
        for k, v in prof["groups"].items():
            lines.append(f"| {k} | {v:.2f} | {v / prof['total_s']:.0%} |")
        lines += ["", "| bucket | seconds |", "|---|---|"]
        for k, v in list(prof["buckets"].items())[:18]:
            lines.append(f"| {k} | {v:.2f} |")
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in bench.notes] or ["- none"]
    lines += ["", "## Problems", ""]
    lines += [f"- {p}" for p in bench.problems] or ["- none: every run exited 0"]
    lines += ["", "Raw figures: `bench/.cache/results.json`; logs of every run: `bench/.cache/run/logs/`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global QUIET_MAX_WAIT_S
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per side and scenario (default 3)")
    parser.add_argument("--no-profile", action="store_true", help="skip the pyinstrument profile")
    parser.add_argument("--skip", default="", help="comma-separated scenarios to skip: cold-api,warm-api,warm-embedded,mem-0.2b-f32")
    parser.add_argument("--out", type=Path, default=BENCH / "results.md")
    parser.add_argument("--quiet-wait", type=float, default=QUIET_MAX_WAIT_S,
                        help=f"before each run, wait at most this many seconds for other load under {QUIET_CORES} cores (default %(default)s)")
    args = parser.parse_args(argv)
    QUIET_MAX_WAIT_S = args.quiet_wait
    started = time.perf_counter()
    big_dir, small_dir = ensure_model(BIG), ensure_model(SMALL)
    facts = {BIG.name: model_facts(big_dir), SMALL.name: model_facts(small_dir)}
    for name, f in facts.items():
        print(f"{name}: {f['params']:,} params, {f['weight_bytes'] / 1e9:.2f} GB in {f['shards']} shards", flush=True)
    bench = Bench(args.runs)
    bench.version_start = product_version()
    try:
        bench.setup(big_dir, small_dir)
        bench.run_all({s for s in args.skip.split(",") if s}, profile=not args.no_profile)
    finally:
        bench.stop()
    bench.version_end = product_version()
    if bench.version_end["digest"] != bench.version_start["digest"]:
        bench.problems.append(f"lora-prep's code changed while the benchmark ran (product digest {bench.version_start['digest']} → "
                              f"{bench.version_end['digest']}, commit {bench.version_start['commit']} → {bench.version_end['commit']}): "
                              "the figures mix versions; run it again")
    (CACHE / "results.json").write_text(json.dumps({"facts": facts, "runs": [asdict(r) for r in bench.results],
                                                     "profile": getattr(bench, "profile_summary", None),
                                                     "version": [bench.version_start, bench.version_end],
                                                     "problems": bench.problems}, indent=1))
    text = report(bench, facts, started, argv)
    args.out.write_text(text)
    print()
    print(text)
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
