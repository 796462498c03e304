"""``confide simulate``: many virtual nodes on one machine (or a Ray cluster) against a real
coordinator.

The coordinator is the real one (its own process, SQLite, the real round engine and its
deadlines); the nodes are virtual: a small pool of hosts, about one per CPU, each running
many real node sessions over one shared base model (``cluster.simulate_host``). With
``backend="ray"`` every host is a Ray actor (``--address``/``RAY_ADDRESS``: an existing
cluster; otherwise a local Ray on 127.0.0.1 only); with ``backend="local"`` the hosts run in
this process (no Ray needed: tests, and a check of the same code without Ray).

Data (``dataset``): "bbc", BBC News split over the nodes with Dirichlet label skew
(``node.data.dirichlet_shards``: per label, Dirichlet(alpha) proportions over the nodes), which
also gives quantity skew (the shards' sizes vary with the draws); every node gets at least
``max(1, min(10, train // (2 * nodes)))`` articles: 4 at 200 nodes. "trivia", the trivia
question/answer pairs for a causal LM (``node.data_trivia``: quantity skew, at least one pair a
node; 209 training pairs, so at most 209 nodes), evaluated by held-out perplexity.

Privacy options of the job go through unchanged: ``secure_aggregation`` (SecAgg+ among the
round's virtual nodes, through the coordinator) and ``anonymous`` (ring-signed uploads on their
own calls), as ``params`` does for a method's options (e.g. dp-lora's node-level DP).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil  # installed with peft and amqtt, core dependencies

from confide.cluster.experiment import ExperimentResult, run_experiment, shard_dirs
from confide.cluster.local import LocalCluster
from confide.cluster.simulate_host import Faults, HostSpec, VirtualNodeHost
from confide.coordinator.jobs import normalize_spec
from confide.node.data import load_jsonl, prepare_bbc_shards
from confide.node.data_trivia import prepare_trivia_shards
from confide.sdk.client import Client, job_spec

#: ``--dataset``: what each trains (the job's task) and the bases that can train it
DATASETS = {"bbc": "sequence-classification", "trivia": "causal-lm"}
CAUSAL_BASES = ("tiny-llama", "smollm2")

#: tries at starting a local Ray; Ray gives its raylet a fixed 30 s to register per try
RAY_START_ATTEMPTS = 3
#: what Ray must be told so that it stays on loopback and sends nothing home
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class SimulationError(RuntimeError):
    pass


@dataclass
class SimulationConfig:
    nodes: int = 20
    method: str = "fedavg-lora"
    rounds: int = 3
    #: nodes trained per round (0: all)
    per_round: int = 0
    min_nodes: int = 1
    alpha: float = 0.3
    #: "bbc" (classification) or "trivia" (causal LM): ``DATASETS``
    dataset: str = "bbc"
    base: str = "tiny-bert"
    max_length: int = 64
    batch_size: int = 8
    max_steps: int = 0
    learning_rate: float = 5e-4
    round_timeout_s: float = 300.0
    seed: int = 0
    test_size: int = 200
    dropout: float = 0.0
    stragglers: float = 0.0
    delay_mean_s: float = 5.0
    delay_max_s: float = 60.0
    backend: str = "ray"
    #: an existing Ray cluster ("" = RAY_ADDRESS, or a local Ray)
    address: str = ""
    cpus_per_node: float = 1.0
    gpus_per_node: float = 0.0
    #: how many nodes may train at once (one per host: the host pool's size); 0 = the CPUs
    max_concurrent_trainers: int = 0
    workdir: Path = Path("runs/simulate")
    quiet: bool = False
    #: the method's options (e.g. dp-lora's ``{"unit": "node", "target_epsilon": 8}``)
    params: dict = field(default_factory=dict)
    #: SecAgg+: the coordinator learns only each round's sum
    secure_aggregation: bool = False
    #: ring-signed uploads; ``anonymity_set``: the smallest ring (0: the coordinator's default)
    anonymous: bool = False
    anonymity_set: int = 0


@dataclass
class SimulationResult:
    config: dict
    shard_sizes: dict
    hosts: int
    startup_s: float
    experiment: ExperimentResult
    host_stats: list[dict]
    memory: dict
    listeners: list[str]

    def as_dict(self) -> dict:
        return {"config": self.config, "shard_sizes": self.shard_sizes, "hosts": self.hosts,
                "startup_s": self.startup_s, "experiment": asdict(self.experiment),
                "host_stats": self.host_stats, "memory": self.memory,
                "listeners": self.listeners}

    @property
    def ok(self) -> bool:
        """The job completed (``experiment.state``, ``experiment.reason`` say why not)."""
        return self.experiment.ok

    def table(self) -> str:
        """What ``confide simulate`` prints: the demo's table (cli.demo) with the simulation's
        own lines around it. Classification shows held-out accuracy; a causal LM (trivia),
        held-out perplexity."""
        exp = self.experiment
        sizes = self.shard_sizes
        trivia = self.config.get("dataset") == "trivia"
        metric, unit = ("perplexity", "pairs") if trivia else ("accuracy", "articles")
        lines = [
            f"\n{self.config['nodes']} virtual nodes on {self.hosts} host(s) "
            f"({self.config['backend']}), shards min/median/max "
            f"{sizes['min']}/{sizes['median']:g}/{sizes['max']} {unit}; up in "
            f"{self.startup_s:.0f}s",
            f"job {exp.job_id} ({exp.method}): {exp.state} {exp.reason}",
            f"{'round':>5} {'nodes':>5} {'dropped':>7} {'train loss':>10} {metric:>10} "
            f"{'up (KB)':>10} {'down (KB)':>10} {'seconds':>8}"]
        if exp.before:
            lines.append(f"{0:>5} {'-':>5} {'-':>7} {'-':>10} "
                         f"{exp.before.get(metric, math.nan):>10.3f}")
        for r in exp.rounds:
            loss = r["metrics"].get("loss_last", math.nan)
            lines.append(f"{r['round']:>5} {r['participants']:>5} {len(r['dropped']):>7} "
                         f"{loss:>10.4f} {r['eval'].get(metric, math.nan):>10.3f} "
                         f"{r['bytes_up'] / 1e3:>10.1f} {r['bytes_down'] / 1e3:>10.1f} "
                         f"{r['seconds']:>8.1f}")
        injected = {k: sum(h[k] for h in self.host_stats) for k in ("dropped", "delayed")}
        lines.append(f"injected: {injected['dropped']} dropout(s), {injected['delayed']} "
                     f"straggler(s); memory: peak {self.memory['total_rss_peak_mb']:.0f} MB "
                     f"summed RSS of every process, {self.memory['host_rss_peak_mb']:.0f} MB "
                     "the largest host")
        lines.append("listeners: " + ", ".join(self.listeners))
        return "\n".join(lines)


def prepare_data(cfg: SimulationConfig) -> tuple[list[Path], dict]:
    """The nodes' shards (one folder each: a node keeps its key there between runs) and the
    summary of their sizes."""
    root = Path(cfg.workdir) / "data"
    if cfg.dataset == "trivia":
        summary = prepare_trivia_shards(root, cfg.nodes, alpha=cfg.alpha, seed=cfg.seed)
    else:
        summary = prepare_bbc_shards(root, cfg.nodes, alpha=cfg.alpha, seed=cfg.seed)
    sizes = summary["train_sizes"]
    return shard_dirs(root, cfg.nodes), {
        "min": min(sizes), "median": statistics.median(sizes), "max": max(sizes),
        "total": sum(sizes), "labels": len(summary["labels"])}


def pool_size(cfg: SimulationConfig, cpus: float) -> int:
    """Hosts: one per ``cpus_per_node`` CPUs, at most ``max_concurrent_trainers``, at most
    one per node (each host trains one node at a time)."""
    if cfg.cpus_per_node <= 0:
        raise ValueError(f"cpus_per_node must be > 0, got {cfg.cpus_per_node}")
    size = max(1, int(cpus // cfg.cpus_per_node))
    if cfg.max_concurrent_trainers > 0:
        size = min(size, cfg.max_concurrent_trainers)
    return max(1, min(size, cfg.nodes))


def host_specs(cfg: SimulationConfig, address: str, folders: list[Path], hosts: int
               ) -> list[HostSpec]:
    """The nodes dealt round-robin over the hosts, so each host trains its share of a
    round's sample."""
    faults = Faults(cfg.dropout, cfg.stragglers, cfg.delay_mean_s, cfg.delay_max_s, cfg.seed)
    threads = max(1, int(cfg.cpus_per_node))
    device = "auto" if cfg.gpus_per_node > 0 else "cpu"
    return [HostSpec(address, tuple((i, str(folders[i])) for i in range(h, cfg.nodes, hosts)),
                     faults, threads, device=device) for h in range(hosts)]


class _LocalPool:
    """The hosts in this process (no Ray)."""

    def __init__(self, specs: list[HostSpec]) -> None:
        self.hosts = [VirtualNodeHost(spec) for spec in specs]
        for host in self.hosts:
            host.start()

    def stats(self) -> list[dict]:
        return [host.stats() for host in self.hosts]

    def close(self) -> None:
        for host in self.hosts:
            host.stop()


class _RayPool:
    """The hosts as Ray actors, one CPU share (and GPU share) each."""

    def __init__(self, cfg: SimulationConfig, specs_for) -> None:
        ray = require_ray()
        self.ray = ray
        address = cfg.address or os.environ.get("RAY_ADDRESS", "")
        self._own = not address
        self._temp = Path("/tmp") / f"confide-ray-{os.getpid()}"
        if not ray.is_initialized():
            if address:
                ray.init(address=address, runtime_env={"env_vars": RAY_ENV},
                         log_to_driver=False)
            else:
                self._start_local_ray()
        cpus = ray.cluster_resources().get("CPU", 1.0)
        specs = specs_for(pool_size(cfg, cpus))
        actor = ray.remote(num_cpus=cfg.cpus_per_node, num_gpus=cfg.gpus_per_node)(
            VirtualNodeHost)
        self.actors = [actor.remote(spec) for spec in specs]
        ray.get([a.start.remote() for a in self.actors])

    def _start_local_ray(self, attempts: int = RAY_START_ATTEMPTS) -> None:
        """Start a one-machine Ray. Ray waits a fixed 30 s for its raylet to register with
        its GCS; a loaded 2-core machine can take longer, so a timed-out start is shut down
        and tried again before the simulation gives up with a clear error."""
        for attempt in range(1, attempts + 1):
            try:
                # a short path: Ray's unix sockets live under it (about 100 bytes at most)
                self.ray.init(num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False,
                              _node_ip_address="127.0.0.1", _temp_dir=str(self._temp),
                              runtime_env={"env_vars": RAY_ENV}, log_to_driver=False)
                return
            except Exception as exc:  # Ray raises a bare Exception on a startup timeout
                with contextlib.suppress(Exception):
                    self.ray.shutdown()
                shutil.rmtree(self._temp, ignore_errors=True)
                if "timed out during startup" not in str(exc) or attempt == attempts:
                    raise SimulationError(
                        f"Ray did not start on this machine (attempt {attempt} of "
                        f"{attempts}): {exc}; a busy machine slows Ray's start, try again "
                        "or use --backend local") from exc

    def stats(self) -> list[dict]:
        return self.ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ray.get([a.stop.remote() for a in self.actors], timeout=60)
        for a in self.actors:
            self.ray.kill(a)
        if self._own:
            self.ray.shutdown()
            shutil.rmtree(self._temp, ignore_errors=True)  # its logs and sockets


def require_ray():
    """Ray, with the settings that keep it on loopback; a clear error when not installed."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import ray
    except ImportError as exc:
        raise SimulationError("the Ray backend needs the `sim` extra: pip install "
                              "'confide[sim]' (or use --backend local)") from exc
    return ray


class _MemorySampler:
    """The peak summed RSS of this process and everything it started (coordinator, Ray's
    processes and actors). RSS counts shared pages once per process: an upper bound."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(1.0)

    def close(self) -> float:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak_mb


def loopback_listeners(pids: set[int]) -> list[str]:
    """Every TCP listener of ``pids`` as "ip:port" (the test checks they are 127.0.0.1)."""
    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids and conn.laddr:
            found.append(f"{conn.laddr.ip}:{conn.laddr.port}")
    return sorted(set(found))


def _wait_online(address: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    online = 0
    with Client(address) as client:
        while time.monotonic() < deadline:
            online = sum(n.online for n in client.list_nodes())
            if online >= count:
                return
            time.sleep(0.5)
    raise SimulationError(f"only {online} of {count} virtual node(s) came online in "
                          f"{timeout:.0f}s")


def simulation_spec(cfg: SimulationConfig, labels: int):
    """The job the simulation submits (the same job run on daemons gives the same result)."""
    return job_spec(cfg.method, name=f"simulate-{cfg.nodes}", rounds=cfg.rounds,
                    min_nodes=cfg.min_nodes, nodes_per_round=cfg.per_round,
                    task=DATASETS[cfg.dataset], base=cfg.base, num_labels=labels,
                    max_length=cfg.max_length, max_steps=cfg.max_steps,
                    batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                    round_timeout_s=cfg.round_timeout_s, seed=cfg.seed,
                    params=cfg.params or None, secure_aggregation=cfg.secure_aggregation,
                    anonymous=cfg.anonymous, anonymity_set=cfg.anonymity_set)


def check_config(cfg: SimulationConfig) -> None:
    """Refuse a configuration before any work (no data written, no process started)."""
    if cfg.backend not in ("ray", "local"):
        raise ValueError(f"backend must be 'ray' or 'local', got {cfg.backend!r}")
    if cfg.nodes < 1 or cfg.rounds < 1:
        raise ValueError(f"nodes and rounds must be >= 1, got {cfg.nodes} and {cfg.rounds}")
    if not 0 <= cfg.per_round <= cfg.nodes:
        raise ValueError(f"per_round must be 0 (all) to nodes ({cfg.nodes}), got "
                         f"{cfg.per_round}")
    if cfg.dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    if cfg.dataset == "trivia" and cfg.base not in CAUSAL_BASES:
        raise ValueError(f"the trivia dataset trains a causal LM: base must be one of "
                         f"{', '.join(CAUSAL_BASES)}, got {cfg.base!r}")
    if cfg.anonymity_set < 0:
        raise ValueError(f"anonymity_set must be >= 0, got {cfg.anonymity_set}")
    Faults(cfg.dropout, cfg.stragglers, cfg.delay_mean_s, cfg.delay_max_s)  # checks them
    # the job itself, as the coordinator will check it (e.g. secure aggregation's two nodes
    # a round, a method's params): before any data is written or process started
    normalize_spec(simulation_spec(cfg, labels=2))


def run_simulation(cfg: SimulationConfig) -> SimulationResult:
    """Prepare the shards, start the coordinator and the host pool, run the job with a
    progress bar, evaluate the global model on held-out articles, tear everything down."""
    check_config(cfg)
    if cfg.backend == "ray":
        require_ray()  # before any work: a missing extra is the first thing said
    folders, sizes = prepare_data(cfg)
    sampler = _MemorySampler()
    test = load_jsonl(Path(cfg.workdir) / "data" / "test.jsonl")[:cfg.test_size]
    started = time.monotonic()
    cluster = LocalCluster(Path(cfg.workdir) / "cluster", folders, mqtt=False,
                           heartbeat_interval_s=5.0, log_level="WARNING")
    pool: _LocalPool | _RayPool | None = None
    try:
        cluster.start_coordinator()

        def specs_for(hosts: int) -> list[HostSpec]:
            return host_specs(cfg, cluster.address, folders, hosts)

        if cfg.backend == "local":
            pool = _LocalPool(specs_for(pool_size(cfg, os.cpu_count() or 1)))
        else:
            pool = _RayPool(cfg, specs_for)
        _wait_online(cluster.address, cfg.nodes, timeout=120 + cfg.nodes)
        startup_s = time.monotonic() - started
        me = psutil.Process()
        listeners = loopback_listeners({me.pid, *(p.pid for p in me.children(recursive=True))})
        experiment = run_experiment(cluster, simulation_spec(cfg, sizes["labels"]), test,
                                    label=f"{cfg.nodes} nodes, ",
                                    quiet=cfg.quiet)
        host_stats = pool.stats()
    finally:
        if pool is not None:
            pool.close()
        cluster.stop()
        peak = sampler.close()
    memory = {"total_rss_peak_mb": peak,
              "host_rss_peak_mb": max((h["rss_peak_mb"] for h in host_stats), default=0.0)}
    return SimulationResult(config={k: str(v) if isinstance(v, Path) else v
                                    for k, v in asdict(cfg).items()},
                            shard_sizes=sizes, hosts=len(host_stats), startup_s=startup_s,
                            experiment=experiment, host_stats=host_stats, memory=memory,
                            listeners=listeners)
