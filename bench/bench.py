"""`make bench`: whole `lora-prep prepare` processes against the bare ten-line script, across model sizes.

    .venv/bin/python bench/bench.py [--sizes 0.2b-f32,0.85b,0.85b-128k,3.4b] [--runs 3] [--no-profile] [--skip PART,...]

What it does (every figure is a whole fresh process, measured from outside):

1. Builds each size once, cached under bench/.cache/models/ (tests.model_factory.build_big_model_dir; SIZES below):
     0.2b-f32     hidden 1024, 16 layers, vocab 8 k, float32, 100 MB shards
     0.85b        hidden 2048, 18 layers, vocab 8 k, bfloat16, 100 MB shards
     0.85b-128k   hidden 2048, 7 layers, vocab 128,256, bfloat16, one file
     3.4b         hidden 3072, 32 layers, vocab 32 k, bfloat16, one file
     7b           hidden 4096, 32 layers, intermediate 11008, 32 KV heads, vocab 32 k, bfloat16 (14 GB; `make bench SIZES=7b`)
     smoke        hidden 256, 2 layers: the benchmark itself in minutes
   plus two 512-wide k-bit models (mixture of experts, hybrid), and serves them all from the Hub-compatible
   test server (tests.hubserver) on 127.0.0.1 (HF_ENDPOINT pointing at it, HF_HUB_DISABLE_XET=1).
2. Launches one `prefect server start` for the scenarios "with a running server", initialises the two SQLite
   MLflow stores (one per side), and per size runs untimed warm-ups that fill that size's warm HF cache.
3. Per size, alternately (bare, lora-prep, then lora-prep, bare, ...), --runs times per scenario:
     cold-api       fresh HF cache per run, PREFECT_API_URL = the running server
     warm-api       warm HF cache, the running server; plus `--no-check` (the check's cost)
     warm-embedded  warm HF cache, PREFECT_API_URL unset: lora-prep's shared local server; on the first size
                    its first run (new database) and one run after `lora-prep server stop` are reported apart
4. Then: kbit (one `--quantization 4bit` and one `8bit` prepare of each dense size up to 0.85 B and of the
   two wide models: the plan's estimate against the loaded tensors) and plan (`lora-prep plan` of the smoke
   model against `python -c "import torch, transformers"` and `import prefect`, plus a pyinstrument profile).
5. Per run: wall and CPU seconds, peak RSS of the process tree (psutil, /proc/<pid>/status every 50 ms)
   with its anonymous and file-backed parts, ru_maxrss, hub bytes and requests, and from lora-prep's JSON and
   manifest: per-stage seconds, the plan's estimate_bytes and memory classes, load_used.memory_bytes, the
   check's layers, head rows and seconds.
6. Profiles one warm run of the largest size with pyinstrument when it is installed (bench/profile-warm.txt).
7. Writes bench/results.md (ratios of the medians, lora-prep − bare, estimate against held, the check against
   one layer, the k-bit table, stage seconds, targets met or missed); raw figures in bench/.cache/results.json.

Disk: models/ holds every size once (10 GB for the default sweep, 22 GB with 7b; the hub store hard-links it);
while a size runs, its warm HF cache and one cold one add twice its weights (14 GB at 3.4 B, 25 GB at 7 B).
The default sweep takes about an hour on 2 cores with --runs 3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
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
DISK_MARGIN = 8 * 10**9  # the two MLflow stores keep every run's adapter (4.2 GB after a sweep to 7 B), and the outputs
RETRIES = 2  # a run that saw more than QUIET_CORES of other load is run again, at most this often


@dataclass(frozen=True)
class ModelSpec:
    size: str
    hidden: int
    layers: int
    dtype: str  # stored on disk, and loaded in, by both sides
    vocab: int = 8192
    intermediate: int | None = None  # None: the factory's 2.75 x hidden
    shard: str = "100MB"  # save_pretrained's max_shard_size: "50GB" writes one file
    kv_heads: int | None = None  # None: heads / 4 (grouped-query attention)
    arch: str = "llama"  # not llama: tests.model_factory's wide variant of that architecture (the k-bit table)

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.size}"

    @property
    def repo_id(self) -> str:
        return f"bench/{self.name}"


# The sweep: `--sizes` picks from these (DEFAULT_SIZES unless told); `make bench SIZES=7b` adds the 14 GB one.
SIZES = {
    "smoke": ModelSpec("smoke", hidden=256, layers=2, dtype="bfloat16"),  # seconds: for trying the benchmark itself
    "0.2b-f32": ModelSpec("0.2b-f32", hidden=1024, layers=16, dtype="float32"),
    "0.85b": ModelSpec("0.85b", hidden=2048, layers=18, dtype="bfloat16"),
    "0.85b-128k": ModelSpec("0.85b-128k", hidden=2048, layers=7, dtype="bfloat16", vocab=128256, shard="50GB"),
    "3.4b": ModelSpec("3.4b", hidden=3072, layers=32, dtype="bfloat16", vocab=32000, shard="50GB"),
    "7b": ModelSpec("7b", hidden=4096, layers=32, dtype="bfloat16", vocab=32000, intermediate=11008, shard="50GB", kv_heads=32),
}
DEFAULT_SIZES = "0.2b-f32,0.85b,0.85b-128k,3.4b"
PLAN_MODEL = SIZES["smoke"]  # `lora-prep plan` is timed on a small model (its time does not depend on the size)
KBIT_SIZES = ("smoke", "0.2b-f32", "0.85b")  # the dense sizes of the sweep the k-bit table quantizes (CPU quantization is slow)
# The k-bit table's mixture-of-experts and hybrid models: tests.model_factory's wide variants (4/8-bit kernels want
# layers at least one 64-weight block wide).
KBIT_WIDTH = 512
KBIT_WIDE = {kind: ModelSpec(f"w{KBIT_WIDTH}", hidden=KBIT_WIDTH, layers=2, dtype="bfloat16", arch=arch)
             for kind, arch in (("mixture of experts", "qwen3_moe"), ("hybrid (Mamba + attention + experts)", "jamba"))}

# The issue's targets: lora-prep / bare of the medians.
TARGETS = {"cold-api": 1.0, "warm-api": 1.1, "warm-embedded": 1.3}
ESTIMATE_TOLERANCE = 0.10
PLAN_TARGET_S = 3.0


def rss_target(spec: ModelSpec) -> float:
    return 1.05 if spec.hidden >= 3072 else 1.1


# --- models -----------------------------------------------------------------------------------

_BUILD = r"""
import json, shutil, sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.model_factory import build_big_model_dir, build_wide_model_dir
out, kind, kw = Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
if kind.startswith("wide:"):
    build_wide_model_dir(kind.removeprefix("wide:"), out, **kw)
elif kind == "bfloat16":
    build_big_model_dir(out, **kw)
else:  # the factory writes bfloat16: load those weights in float32 and save them again, same shard size
    from transformers import AutoModelForCausalLM
    tmp = out.with_name(out.name + ".bf16")
    build_big_model_dir(tmp, **kw)
    model = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=getattr(torch, kind))
    model.save_pretrained(str(out), max_shard_size=kw["max_shard_size"])
    for f in tmp.iterdir():
        if not f.name.startswith("model") and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    shutil.rmtree(tmp)
"""


def _build(name: str, kind: str, kwargs: dict) -> Path:
    out = CACHE / "models" / name
    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".bf16"), ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"building {name} (once; cached in {out.relative_to(ROOT)}) ...", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", _BUILD, str(ROOT), str(out), kind, json.dumps(kwargs)], check=True)
    (out / ".complete").write_text("")
    print(f"  built in {time.perf_counter() - started:.1f} s", flush=True)
    return out


def ensure_model(spec: ModelSpec) -> Path:
    if spec.arch != "llama":
        return _build(spec.name, f"wide:{spec.arch}", dict(width=spec.hidden, seed=0, dtype=spec.dtype))
    kwargs = dict(hidden=spec.hidden, layers=spec.layers, seed=0, vocab=spec.vocab, intermediate=spec.intermediate,
                  max_shard_size=spec.shard, kv_heads=spec.kv_heads)
    return _build(spec.name, spec.dtype, kwargs)


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


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
        **_layer_facts(model_dir, cfg),
        "config": {k: cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                                           "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
    }


def _layer_facts(model_dir: Path, cfg: dict) -> dict:
    """Bytes of one decoder layer, of the output head and of the check's 64-row head slice, from the headers."""
    layer = head = 0
    width = 2
    for f in sorted(model_dir.glob("*.safetensors")):
        for name, entry in _safetensors_header(f).items():
            size = entry["data_offsets"][1] - entry["data_offsets"][0]
            if ".layers.0." in name:
                layer += size
            elif name == "lm_head.weight":
                head = size
                width = size // max(1, entry["shape"][0] * entry["shape"][1])
    return {"layer_bytes": layer, "head_bytes": head, "head_slice_bytes": 64 * (cfg.get("hidden_size") or 0) * width}


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
    size: str = ""  # the model (ModelSpec.name)
    # from the manifest of a lora-prep run
    estimate_bytes: int | None = None  # load_plan.estimate_bytes (includes the adapter)
    estimate_parts: dict[str, int] = field(default_factory=dict)
    memory_bytes: int | None = None  # load_used.memory_bytes: the loaded model's tensors, each once (before LoRA)
    trainable: int | None = None
    check_layers: str = ""
    head_rows: int | None = None
    quantization: str = ""


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
                    check, used, plan = manifest.get("check") or {}, manifest.get("load_used") or {}, manifest.get("load_plan") or {}
                    run.check_s, run.load_s = check.get("seconds"), used.get("seconds")
                    run.check_layers = f"{check.get('layers')}/{check.get('layers_total')}"
                    run.head_rows = check.get("head_rows")
                    run.estimate_bytes = plan.get("estimate_bytes")
                    run.estimate_parts = {part["name"]: part["bytes"] for part in plan.get("memory") or []}
                    run.memory_bytes = used.get("memory_bytes")
                    run.quantization = used.get("quantization") or ""
                    run.trainable = (manifest.get("parameters") or {}).get("trainable")
                except (OSError, ValueError, KeyError):
                    pass
        shutil.rmtree(out, ignore_errors=True)
        run.size = spec.name
        if record:
            self.results.append(run)
        print(f"  {spec.size:<11} {scenario:<17} {side:<18} #{index}  {wall:7.2f} s  tree {s.peak_tree / MiB:6.0f} MiB "
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

    def setup(self, specs: list[ModelSpec], dirs: dict[str, Path]) -> None:
        from tests.hubserver import HubServer, publish
        from tests.servers import start_prefect_server

        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        # One size's HF cache at a time, plus the stores' adapter copies and the outputs: refused now, with the
        # numbers, rather than after half an hour of runs.
        need = max(self.facts[s.name]["weight_bytes"] for s in specs) + DISK_MARGIN
        free = shutil.disk_usage(self.work).free
        if free < need:
            raise SystemExit(f"bench: needs {need / 1e9:.1f} GB free under {self.work} (the largest size's weights once, "
                             f"plus {DISK_MARGIN / 1e9:.0f} GB for stores and outputs), only {free / 1e9:.1f} GB is: "
                             "free some space, or run fewer sizes (--sizes)")
        self.hub = HubServer(CACHE / "store").start()
        for spec in specs:
            # Each size as the root commit of its repo: the same files give the same sha on every run, so a
            # rerun finds the commit in the store and only hashes. (Published on top of the last run's head, each
            # run made a new commit, that is a new copy of every size: 22 GB more per `make bench`.) Hard links
            # into models/: the store adds no second copy of the weights.
            repo_dir = self.hub.store / spec.repo_id
            (repo_dir / "repo.json").unlink(missing_ok=True)
            sha = publish(self.hub.store, spec.repo_id, dirs[spec.name], link=True)
            for old in (repo_dir / "commits").iterdir():  # copies earlier runs left
                if old.name != sha:
                    shutil.rmtree(old)
        print(f"hub {self.hub.url} serving {', '.join(s.repo_id for s in specs)}", flush=True)
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

    def run_all(self, sizes: list[ModelSpec], kbit: list[ModelSpec], skip: set[str], profile: bool) -> None:
        w = self.work
        ph_warm = w / "prefect-home-warm-api"
        ph_embedded = w / "prefect-home-embedded"
        largest = max(sizes, key=lambda s: s.hidden * s.layers)
        for n, spec in enumerate(sizes):
            warm = w / f"hf-warm-{spec.size}"
            print(f"== {spec.repo_id}: warm-up (untimed): fills the warm HF cache, the page cache and both stores", flush=True)
            self.one("warm-up", "bare", 0, spec, self.env(ph_warm, warm, True), record=False)
            self.one("warm-up", "lora-prep", 0, spec, self.env(ph_warm, warm, True), record=False)
            self.one("warm-up", "lora-prep", 1, spec, self.env(ph_warm, warm, True), record=False)

            if "warm-api" not in skip:
                print("warm-api: warm HF cache, running Prefect server", flush=True)
                self.alternate("warm-api", spec, lambda i, _c=warm: self.env(ph_warm, _c, True),
                               [("bare", ()), ("lora-prep", ()), ("lora-prep --no-check", ("--no-check",))])

            if "warm-embedded" not in skip:
                print("warm-embedded: warm HF cache, PREFECT_API_URL unset (lora-prep's shared local server)", flush=True)
                env = self.env(ph_embedded, warm, False)
                first = n == 0
                # starts the server: on the first size a new database (migrations, reported), later the existing one
                self.one("embedded-first", "lora-prep", 0, spec, env, record=first)
                self.alternate("warm-embedded", spec, lambda i, _e=env: _e, [("bare", ()), ("lora-prep", ())])
                if first:
                    self.idle_server(env)
                    self.server_stop(env)
                    self.one("embedded-restart", "lora-prep", 0, spec, env)  # starts it again on the existing database
                    # the same bare figure for the two one-off runs: the warm-embedded bare runs
                    for r in [r for r in self.results if r.size == spec.name and r.scenario == "warm-embedded" and r.side == "bare"]:
                        for one_off in ("embedded-first", "embedded-restart"):
                            self.results.append(Run(**{**asdict(r), "scenario": one_off}))
                self.server_stop(env)

            if profile and spec == largest:
                self.profile(spec, self.env(ph_warm, warm, True))
            # Disk: the cold runs come last, once the warm cache is gone, so a size never needs two copies of its
            # weights beside the store (at 7 B that was 25 GB, and a disk with 21 GB free failed halfway).
            shutil.rmtree(warm, ignore_errors=True)

            if "cold-api" not in skip:
                print("cold-api: fresh HF cache per run, running Prefect server", flush=True)
                ph = w / "prefect-home-cold-api"

                def cold_env(i: int, _ph: Path = ph) -> dict[str, str]:
                    cache = w / "hf-cold"
                    shutil.rmtree(cache, ignore_errors=True)  # every run starts from an empty cache
                    return self.env(_ph, cache, True)

                self.alternate("cold-api", spec, cold_env, [("bare", ()), ("lora-prep", ())])
                shutil.rmtree(w / "hf-cold", ignore_errors=True)

        if "kbit" not in skip:
            self.kbit(kbit, self.env(ph_warm, w / "hf-kbit", True))
        if "plan" not in skip:
            self.plan_timing(self.env(ph_warm, w / "hf-kbit", True))

    def kbit(self, specs: list[ModelSpec], env: dict[str, str]) -> None:
        """One 4-bit and one 8-bit prepare per model (the memory figures do not vary between runs)."""
        print("kbit: 4-bit and 8-bit prepares, the plan's estimate against the loaded model's tensors", flush=True)
        for spec in specs:
            for q in ("4bit", "8bit"):
                self.one(f"kbit-{q}", "lora-prep", 0, spec, env, ("--quantization", q))

    def plan_timing(self, env: dict[str, str]) -> None:
        """`lora-prep plan` of a small model, alternating with the floor: a process that imports torch and transformers."""
        print(f"plan: `lora-prep plan {PLAN_MODEL.repo_id}` against `python -c 'import torch, transformers'`", flush=True)
        sides = {"lora-prep plan": [LORA_PREP, "plan", PLAN_MODEL.repo_id, "--json"],
                 "import torch, transformers": [sys.executable, "-c", "import torch, transformers"],
                 # what building a Llama skeleton and asking PEFT for its targets imports at least (bitsandbytes kept
                 # out, as lora-prep plan keeps it out when nothing is quantized)
                 "skeleton floor: torch, transformers' Llama class, peft": [
                     sys.executable, "-c",
                     "import sys; sys.modules['bitsandbytes'] = None; import torch, peft; from transformers import LlamaForCausalLM"],
                 "import prefect": [sys.executable, "-c", "import prefect"]}
        self.plan_walls: dict[str, list[float]] = {k: [] for k in sides}
        for i in range(self.runs + 1):  # the first round warms the page cache, untimed
            for side, cmd in (sides.items() if i % 2 else reversed(sides.items())):
                wait_quiet()
                got = measure(cmd, env, self.work / "logs" / f"plan-{i}-{side.split()[-1]}")
                if got.rc != 0:
                    self.problems.append(f"{side} exited {got.rc}; see {self.work / 'logs'}")
                elif i:
                    self.plan_walls[side].append(round(got.wall, 3))
                print(f"  {side:<28} #{i} {got.wall:6.2f} s{'  (warm-up)' if not i else ''}", flush=True)
        self.plan_profile = self._profile("plan", sides["lora-prep plan"], env)

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

    def profile(self, spec: ModelSpec, env: dict[str, str]) -> None:
        out = self.work / "out" / "profile"
        self.profile_summary = self._profile("warm", self.lora_prep_cmd(spec, out), env)
        if self.profile_summary:
            self.profile_summary["repo"] = spec.repo_id
        shutil.rmtree(out, ignore_errors=True)

    def _profile(self, name: str, cmd: list[str], env: dict[str, str]) -> dict | None:
        """One run of cmd under pyinstrument: bench/profile-<name>.txt and its summary."""
        pyinstrument = BIN / "pyinstrument"
        if not pyinstrument.exists():
            self.notes.append(f"profile {name} skipped: pyinstrument is not installed (.venv/bin/pip install pyinstrument)")
            print("profile skipped: pyinstrument not installed", flush=True)
            return None
        session_file = CACHE / f"profile-{name}.pyisession"
        print(f"profile {name}: {' '.join(cmd[:3])} ... under pyinstrument (running server)", flush=True)
        wait_quiet()
        got = measure([str(pyinstrument), "-r", "pyisession", "-o", str(session_file), *cmd], env,
                      self.work / "logs" / f"profile-{name}", lambda: self.server_pids(env))
        self.notes.append(f"profiled {name} run: other processes used {got.other_load:.2f} cores meanwhile")
        if got.rc != 0:
            self.problems.append(f"profiled {name} run exited {got.rc}; see {self.work / 'logs' / f'profile-{name}.err'}")
            return None
        summary = summarise_profile(session_file, BENCH / f"profile-{name}.txt")
        summary["wall_s"] = round(got.wall, 2)
        return summary

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
    "resolve_model": "resolve", "probe_hardware": "probe", "plan_prepare": "plan", "open_preparation_run": "open MLflow run",
    "download": "download", "download_snapshot": "download", "build_adapter_ready": "build", "track_artifact": "track",
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
}


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.3f} GiB"


def measured_bytes(r: Run) -> int | None:
    """What the prepared model holds: the loaded model's tensors (load_used.memory_bytes: parameters, buffers and
    quantization state, each once) plus the LoRA adapter's float32 A/B matrices (trainable parameters x 4)."""
    if r.memory_bytes is None or r.trainable is None:
        return None
    return r.memory_bytes + 4 * r.trainable


def report(bench: Bench, specs: list[ModelSpec], kbit: list[ModelSpec], facts: dict, started: float, argv: list[str]) -> str:
    runs = [r for r in bench.results if r.rc == 0]

    def pick(spec: ModelSpec, scenario: str, side: str) -> list[Run]:
        return [r for r in runs if r.size == spec.name and r.scenario == scenario and r.side == side]

    def med(rs: list[Run], attr: str) -> float:
        return _med([getattr(r, attr) for r in rs])

    m = machine()
    lines = [
        "# lora-prep benchmark: whole processes against the bare script, by model size",
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
        "Models (generated once by tests.model_factory, cached under bench/.cache/models, served by the Hub-compatible test "
        "server on 127.0.0.1):",
        "",
        "| size | parameters | hidden | layers | intermediate | heads / KV | vocab | safetensors | one decoder layer | output head | both sides load in |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in dict.fromkeys([*specs, *kbit]):
        f = facts[spec.name]
        c = f["config"]
        lines.append(
            f"| `{spec.repo_id}` | {f['params']:,} | {c['hidden_size']} | {c['num_hidden_layers']} | {c['intermediate_size']} | "
            f"{c['num_attention_heads']} / {c['num_key_value_heads']} | {c['vocab_size']:,} | {f['weight_bytes'] / 1e9:.2f} GB in "
            f"{f['shards']} file(s) | {f['layer_bytes'] / MiB:.0f} MiB | {f['head_bytes'] / MiB:.0f} MiB | {spec.dtype} |")
    lines += [
        "",
        "Bare side: [`bench/bare_script.py`](bare_script.py) (snapshot_download → from_pretrained → get_peft_model(r=16, "
        "all-linear) → save_pretrained + tokenizer → mlflow.log_artifacts into a SQLite store). lora-prep side: "
        "`lora-prep prepare <repo> --dtype <dtype> --r 16 --tracking-uri sqlite:///… --output-dir … --json` "
        "(all-linear is the default; the default forward/backward check runs unless `--no-check`).",
        "",
        "## What lora-prep adds, by size (medians)",
        "",
        "Ratios are lora-prep / bare of the medians; Δ is lora-prep − bare. RSS: the process tree's peak (sampled every "
        f"{SAMPLE_S * 1000:.0f} ms from /proc/<pid>/status), split into anonymous (RssAnon) and file-backed (RssFile: "
        "memory-mapped weight pages and shared libraries, clean page cache the kernel can drop).",
        "",
        "| size | scenario | bare s | lora-prep s | ratio | target | Δ s | bare RSS MiB | lora-prep RSS MiB | RSS ratio | target | Δ MiB | Δ anon MiB | Δ file MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts: list[str] = []
    for spec in specs:
        for s in SCENARIO_TEXT:
            bare = pick(spec, s, "bare")
            for side in ("lora-prep", "lora-prep --no-check"):
                lp = pick(spec, s, side)
                if not lp or not bare:
                    continue
                wall = med(lp, "wall_s") / med(bare, "wall_s")
                tree = med(lp, "peak_tree_rss") / med(bare, "peak_tree_rss")
                t = TARGETS.get(s) if side == "lora-prep" else None
                rt = rss_target(spec) if side == "lora-prep" and s in ("warm-api", "cold-api") else None
                wall_target = f"≤ {t} {_ok(wall, t)}" if t else "-"
                rss_t = f"≤ {rt} {_ok(tree, rt)}" if rt else "-"
                if t:
                    verdicts.append(f"{spec.size} {s} wall {wall:.2f}× (≤ {t}): {_ok(wall, t)}")
                if rt:
                    verdicts.append(f"{spec.size} {s} RSS {tree:.2f}× (≤ {rt}): {_ok(tree, rt)}")
                name = s if side == "lora-prep" else f"{s}, `--no-check`"
                lines.append(
                    f"| {spec.size} | {name} | {med(bare, 'wall_s'):.2f} | {med(lp, 'wall_s'):.2f} | **{wall:.2f}×** | {wall_target} | "
                    f"{med(lp, 'wall_s') - med(bare, 'wall_s'):+.2f} | {med(bare, 'peak_tree_rss') / MiB:.0f} | "
                    f"{med(lp, 'peak_tree_rss') / MiB:.0f} | **{tree:.2f}×** | {rss_t} | "
                    f"{(med(lp, 'peak_tree_rss') - med(bare, 'peak_tree_rss')) / MiB:+.0f} | "
                    f"{(med(lp, 'peak_tree_anon') - med(bare, 'peak_tree_anon')) / MiB:+.0f} | "
                    f"{(med(lp, 'peak_tree_file') - med(bare, 'peak_tree_file')) / MiB:+.0f} |")
    lines += ["", "Embedded one-off rows (embedded-first, embedded-restart) are single runs against the warm-embedded bare runs. "
              "The RSS targets are checked where the tree is the CLI process alone (a running server); in the embedded first run "
              "the freshly started local server is the CLI's child while the CLI lives and is counted.", ""]

    # the plan's estimate against what the model holds
    lines += ["## The plan's memory estimate against what the prepared model holds", "",
              "Estimate: `load_plan.estimate_bytes` from the manifest (the skeleton's census: weights in their dtype or quantized, "
              "quantization state, buffers and the adapter). Held: `load_used.memory_bytes` (the loaded model's tensors, each "
              "storage once: parameters, buffers, bitsandbytes' quantization state; on CPU a memory-mapped weight counts as "
              "resident, i.e. the size once every weight has been read) plus the adapter's float32 A/B matrices (trainable "
              f"parameters × 4 B). Target: within {ESTIMATE_TOLERANCE:.0%}.", "",
              "| size | run | quantization | estimate | held | estimate / held | within 10 % |", "|---|---|---|---|---|---|---|"]
    rows = [(spec, "warm-api", "lora-prep") for spec in specs] + [(spec, f"kbit-{q}", "lora-prep") for spec in kbit for q in ("4bit", "8bit")]
    for spec, scenario, side in rows:
        rs = [r for r in pick(spec, scenario, side) if r.estimate_bytes and measured_bytes(r)]
        if not rs:
            continue
        r = rs[0]
        held = measured_bytes(r)
        ratio = r.estimate_bytes / held
        ok = abs(ratio - 1) <= ESTIMATE_TOLERANCE
        verdicts.append(f"{spec.size} {scenario} estimate {ratio:.3f}× of held: {'met' if ok else '**missed**'}")
        lines.append(f"| {spec.size} | {scenario} | {r.quantization or 'none'} | {_gib(r.estimate_bytes)} | {_gib(held)} | "
                     f"{ratio:.3f} | {'met' if ok else '**missed**'} |")
    kb = [r for r in runs if r.scenario.startswith("kbit-") and r.estimate_parts]
    if kb:
        lines += ["", "The k-bit estimates by class (bytes, from `load_plan.memory`):", "",
                  "| size | run | " + " | ".join(kb[0].estimate_parts) + " | wall s | peak RSS MiB |",
                  "|---|---|" + "---|" * (len(kb[0].estimate_parts) + 2)]
        for r in kb:
            spec = next(s for s in kbit if s.name == r.size)
            lines.append(f"| {spec.size} ({spec.arch}) | {r.scenario} | " + " | ".join(f"{r.estimate_parts.get(k, 0):,}" for k in kb[0].estimate_parts)
                         + f" | {r.wall_s:.1f} | {r.peak_tree_rss / MiB:.0f} |")
        lines += ["", "bitsandbytes quantizes `nn.Linear` only: a mixture-of-experts model's fused 3-D expert parameters "
                  "stay in the compute dtype (`fused expert parameters`), and the plan counts them so."]

    # the check
    lines += ["", "## What the forward/backward check costs, by size", "",
              "Δ = the warm-api lora-prep runs against the same runs with `--no-check` (medians). The check runs one "
              "decoder layer of each kind and scores 64 rows of the output head; its budget is one decoder layer plus that "
              "head slice plus 64 MiB for activations, autograd state and allocator slack at the check's 4 tokens.", "",
              "| size | check s (manifest) | Δ wall s | Δ peak RSS MiB | Δ anon MiB | Δ file MiB | one layer MiB | head slice MiB | layers run | head rows | within budget |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec in specs:
        lp, nc = pick(spec, "warm-api", "lora-prep"), pick(spec, "warm-api", "lora-prep --no-check")
        if not lp or not nc:
            continue
        f = facts[spec.name]
        d_rss = med(lp, "peak_tree_rss") - med(nc, "peak_tree_rss")
        budget = f["layer_bytes"] + f["head_slice_bytes"] + 64 * MiB
        ok = d_rss <= budget
        verdicts.append(f"{spec.size} check Δ RSS {d_rss / MiB:+.0f} MiB (budget {budget / MiB:.0f}): {'met' if ok else '**missed**'}")
        lines.append(
            f"| {spec.size} | {_med([r.check_s for r in lp if r.check_s is not None]):.2f} | {med(lp, 'wall_s') - med(nc, 'wall_s'):+.2f} | "
            f"{d_rss / MiB:+.0f} | {(med(lp, 'peak_tree_anon') - med(nc, 'peak_tree_anon')) / MiB:+.0f} | "
            f"{(med(lp, 'peak_tree_file') - med(nc, 'peak_tree_file')) / MiB:+.0f} | {f['layer_bytes'] / MiB:.0f} | "
            f"{f['head_slice_bytes'] / MiB:.2f} | {lp[0].check_layers} | {lp[0].head_rows} | {'met' if ok else '**missed**'} |")

    # stages
    lines += ["", "## Where lora-prep's time goes: per-stage seconds from `--json` (median)", "",
              "`outside stages` = wall − sum of stages: interpreter start, imports not yet paid inside a stage, "
              "finding or starting the Prefect API, the flow engine around the stages, process exit. `load` and `check` "
              "come from the manifest (both are inside `build`).", ""]
    stage_names: list[str] = []
    for r in runs:
        for k in r.stages:
            if k not in stage_names:
                stage_names.append(k)
    lines.append("| size | scenario | " + " | ".join(stage_names) + " | (load) | (check) | outside stages | wall |")
    lines.append("|---|---|" + "---|" * (len(stage_names) + 4))
    for spec in specs:
        for s in SCENARIO_TEXT:
            for side in ("lora-prep", "lora-prep --no-check"):
                rs = [r for r in pick(spec, s, side) if r.stages]
                if not rs:
                    continue
                cells = [f"{_med([r.stages.get(k, 0.0) for r in rs]):.2f}" for k in stage_names]
                load = f"{_med([r.load_s for r in rs if r.load_s is not None]):.2f}" if any(r.load_s is not None for r in rs) else "-"
                check = f"{_med([r.check_s for r in rs if r.check_s is not None]):.2f}" if any(r.check_s is not None for r in rs) else "-"
                outside = _med([r.wall_s - sum(r.stages.values()) for r in rs])
                name = s if side == "lora-prep" else f"{s}, --no-check"
                lines.append(f"| {spec.size} | {name} | " + " | ".join(cells) + f" | {load} | {check} | {outside:.2f} | {med(rs, 'wall_s'):.2f} |")

    # bytes
    warm_runs = [r for r in runs if r.side.startswith("lora-prep") and r.scenario.startswith(("warm", "embedded"))]
    nonzero = [r for r in warm_runs if r.file_bytes]
    lines += ["", "## Bytes", "",
              f"Warm runs, 0 body bytes of file content: {'met' if not nonzero else '**missed**'} — {len(warm_runs) - len(nonzero)} of "
              f"{len(warm_runs)} warm lora-prep runs received no `/resolve/` GET body from the hub (max "
              f"{max((r.file_bytes for r in warm_runs), default=0):,} B); what they did receive is API JSON, "
              f"{_span([r.body_bytes for r in warm_runs], ',.0f')} B in {_span([r.requests for r in warm_runs], '.0f')} requests.", "",
              _verification_line([r for r in warm_runs if r.stages]), ""]
    for spec in specs:
        cold = pick(spec, "cold-api", "lora-prep")
        if cold:
            lines.append(f"- {spec.size} cold: lora-prep received {_span([r.file_bytes for r in cold], ',.0f')} B of file content "
                         f"(bare {_span([r.file_bytes for r in pick(spec, 'cold-api', 'bare')], ',.0f')} B) for "
                         f"{facts[spec.name]['weight_bytes']:,} B of weights; the difference is the safetensors headers read "
                         "(Range requests) to plan before downloading.")

    # plan
    walls = getattr(bench, "plan_walls", None)
    if walls:
        plan_s = _med(walls["lora-prep plan"])
        ok = plan_s < PLAN_TARGET_S
        verdicts.append(f"`lora-prep plan` {plan_s:.2f} s (< {PLAN_TARGET_S:.0f} s): {'met' if ok else '**missed**'}")
        lines += ["", "## `lora-prep plan` of a small model", "",
                  f"`lora-prep plan {PLAN_MODEL.repo_id} --json` (resolve, probe, plan: headers only, no weights), alternating with "
                  "the floors of any process that builds a transformers skeleton (the imports alone; with the model class and "
                  "PEFT, which the target resolution needs), and with Prefect's import alone (which the plan does not pay):", "",
                  "| process | wall s, median (min–max) |", "|---|---|"]
        lines += [f"| {k} | {_span(v, '.2f')} |" for k, v in walls.items()]
        lines += ["", f"Target < {PLAN_TARGET_S:.0f} s: {'met' if ok else '**missed**'} ({plan_s:.2f} s)."]
        floor = next((v for k, v in walls.items() if k.startswith("skeleton floor")), None)
        if floor:
            lines += [f"Above the skeleton floor ({_med(floor):.2f} s): {plan_s - _med(floor):+.2f} s, which is resolve, probe, "
                      "the skeleton, PEFT's target resolution on it, the load plan and the report."]
        pp = getattr(bench, "plan_profile", None)
        if pp:
            lines += ["", f"Profile of one `lora-prep plan` (bench/profile-plan.txt), {pp['total_s']:.2f} s sampled:", "",
                      "| bucket | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.2f} |" for k, v in list(pp["buckets"].items())[:12]]

    prof = getattr(bench, "profile_summary", None)
    if prof:
        lines += ["", "## Profile of one warm run of the largest size (pyinstrument, running server)", "",
                  f"`pyinstrument` on `lora-prep prepare {prof.get('repo')} …` (warm cache, running server): {prof['wall_s']:.1f} s wall "
                  f"under the profiler, {prof['total_s']:.1f} s sampled on the main thread. Full tree: `bench/profile-warm.txt`. "
                  "Main-thread wall time by what it was doing:", "",
                  "| group | seconds | share |", "|---|---|---|"]
        for k, v in prof["groups"].items():
            lines.append(f"| {k} | {v:.2f} | {v / prof['total_s']:.0%} |")
        lines += ["", "| bucket | seconds |", "|---|---|"]
        for k, v in list(prof["buckets"].items())[:18]:
            lines.append(f"| {k} | {v:.2f} |")

    lines += ["", "## Absolute figures: median (min–max)", "",
              "| size | scenario | side | wall s | CPU s | Prefect server CPU s | peak RSS tree MiB | anon MiB | file MiB | ru_maxrss MiB | hub body MB | requests | other load, cores |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec in specs:
        for s in SCENARIO_TEXT:
            for side in ("bare", "lora-prep", "lora-prep --no-check"):
                rs = pick(spec, s, side)
                if not rs:
                    continue
                lines.append(
                    f"| {spec.size} | {s} | {side} | {_span([r.wall_s for r in rs], '.2f')} | {_span([r.cpu_s for r in rs], '.1f')} | "
                    f"{_span([r.server_cpu_s for r in rs], '.1f') if side != 'bare' else '-'} | "
                    f"{_span(_mib([r.peak_tree_rss for r in rs]), '.0f')} | {_span(_mib([r.peak_tree_anon for r in rs]), '.0f')} | "
                    f"{_span(_mib([r.peak_tree_file for r in rs]), '.0f')} | {_span(_mib([r.maxrss_hwm for r in rs]), '.0f')} | "
                    f"{_span([r.body_bytes / 1e6 for r in rs], ',.1f')} | {_span([r.requests for r in rs], '.0f')} | "
                    f"{max(r.other_load for r in rs):.2f} |")
    lines += ["", "CPU s: the process and the children it waited for (the embedded server is detached: its CPU is in the Prefect "
              "server column). Other load: the most any run of the row saw other processes use, from /proc/stat less this tree, "
              f"the driver (which also serves the hub) and the Prefect server; each run waited for under {QUIET_CORES} cores of "
              f"other load first (at most {QUIET_MAX_WAIT_S} s) and was repeated (at most {RETRIES} times) when it saw more.", ""]
    if bench.retried:
        bench.notes.append(f"{bench.retried} run(s) were repeated because other processes used more than {QUIET_CORES} cores "
                           f"during them (at most {RETRIES} repeats per run; the one with the least other load is kept)")
    measured = [r for r in bench.results if not (r.side == "bare" and r.scenario.startswith("embedded-"))]  # those are copies
    busy = [r for r in measured if r.other_load > QUIET_CORES]
    if busy:
        bench.notes.append(f"{len(busy)} of {len(measured)} runs shared the machine with other work (> {QUIET_CORES} cores of other load): "
                           + ", ".join(f"{r.size} {r.scenario} {r.side} #{r.index} ({r.other_load:.2f})" for r in busy)
                           + "; their wall times are inflated")
    lines += ["## Targets", ""] + [f"- {v}" for v in verdicts]
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
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated, from {', '.join(SIZES)} (default %(default)s)")
    parser.add_argument("--no-profile", action="store_true", help="skip the pyinstrument profiles")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: cold-api,warm-api,warm-embedded,kbit,plan")
    parser.add_argument("--out", type=Path, default=BENCH / "results.md")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report again from bench/.cache/results.json (the last run's raw figures), running nothing")
    parser.add_argument("--quiet-wait", type=float, default=QUIET_MAX_WAIT_S,
                        help=f"before each run, wait at most this many seconds for other load under {QUIET_CORES} cores (default %(default)s)")
    args = parser.parse_args(argv)
    QUIET_MAX_WAIT_S = args.quiet_wait
    unknown = [s for s in args.sizes.split(",") if s and s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    specs = [SIZES[s] for s in args.sizes.split(",") if s]
    skip = {s for s in args.skip.split(",") if s}
    kbit = [] if "kbit" in skip else [s for s in specs if s.size in KBIT_SIZES] + list(KBIT_WIDE.values())
    started = time.perf_counter()
    if args.report_only:
        return write_report(load_results(args.runs), specs, kbit, started, argv, args.out)
    every = list(dict.fromkeys([*specs, *kbit, PLAN_MODEL]))
    dirs = {spec.name: ensure_model(spec) for spec in every}
    facts = {name: model_facts(d) for name, d in dirs.items()}
    for name, f in facts.items():
        print(f"{name}: {f['params']:,} params, {f['weight_bytes'] / 1e9:.2f} GB in {f['shards']} file(s)", flush=True)
    # A SIGTERM (kill, `timeout`, a CI job cancelled) ends the benchmark through the finally below, which stops
    # the Prefect server and the hub it started: without this the process died with them still running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    bench = Bench(args.runs)
    bench.version_start = product_version()
    bench.facts = facts
    try:
        bench.setup(every, dirs)
        bench.run_all(specs, kbit, skip, profile=not args.no_profile)
    finally:
        bench.stop()
        bench.version_end = product_version()
        if bench.version_end["digest"] != bench.version_start["digest"]:
            bench.problems.append(f"lora-prep's code changed while the benchmark ran (product digest {bench.version_start['digest']} → "
                                  f"{bench.version_end['digest']}, commit {bench.version_start['commit']} → {bench.version_end['commit']}): "
                                  "the figures mix versions; run it again")
        save_results(bench)  # also after a failure: what was measured can still be reported (--report-only)
    return write_report(bench, specs, kbit, started, argv, args.out)


RESULTS = CACHE / "results.json"
_SAVED = ("notes", "problems", "retried", "profile_summary", "plan_walls", "plan_profile", "version_start", "version_end", "facts")


def save_results(bench: Bench) -> None:
    raw = {k: getattr(bench, k, None) for k in _SAVED}
    RESULTS.write_text(json.dumps({**raw, "runs": [asdict(r) for r in bench.results]}, indent=1, default=str))


def load_results(runs: int) -> Bench:
    raw = json.loads(RESULTS.read_text())
    bench = Bench(runs)
    bench.results = [Run(**r) for r in raw.pop("runs")]
    for key, value in raw.items():
        if value is not None:
            setattr(bench, key, value)
    return bench


def write_report(bench: Bench, specs: list[ModelSpec], kbit: list[ModelSpec], started: float, argv: list[str], out: Path) -> int:
    text = report(bench, specs, kbit, bench.facts, started, argv)
    out.write_text(text)
    print()
    print(text)
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
