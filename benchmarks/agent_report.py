"""Results and the markdown table of ``benchmarks/agent.py`` (issue #5 goals)."""

from __future__ import annotations

from dataclasses import dataclass

IDLE_RSS_GOAL_MB = 60.0
IDLE_CPU_GOAL_PERCENT = 1.0
TRAINING_RATIO_GOAL = 0.35
VENV_GOAL_MB = 200.0


#: what ``python3 -m venv`` installs on its own (reported apart from the agent's packages)
VENV_BOOTSTRAP = ("pip", "setuptools")


def normalize_name(name: str) -> str:
    """A distribution name as pip compares them."""
    return name.lower().replace("_", "-").replace(".", "-")


def mib(n: float) -> float:
    return n / 2**20


def mb(n: float) -> float:
    return n / 1e6


@dataclass(frozen=True, kw_only=True)
class IdleResult:
    seconds: float
    startup_wall_s: float
    startup_cpu_s: float
    rss_median: int
    rss_max: int
    uss_median: int | None
    cpu_percent: float
    threads: int


@dataclass(frozen=True, kw_only=True)
class TrainingResult:
    examples: int
    rounds: int
    epochs: int
    agent_peak: int
    agent_sampled_peak: int
    #: RSS a few seconds after the last task, the agent still connected (what an idle device holds)
    agent_rss_after: int
    #: CPU time of the agent while the server ran the rounds (tasks, codecs, MQTT)
    agent_task_cpu_s: float
    #: whole process, start-up included
    agent_cpu_s: float
    torch_peak: int
    torch_sampled_peak: int
    #: CPU time of the PyTorch training loop alone
    torch_train_cpu_s: float
    torch_cpu_s: float

    @property
    def ratio(self) -> float:
        return self.agent_peak / self.torch_peak


@dataclass(frozen=True, kw_only=True)
class VenvResult:
    total: int
    distributions: dict[str, int]
    estimate: bool
    note: str


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def memory(n: float) -> str:
    return f"{mib(n):.1f} MiB ({mb(n):.1f} MB)"


def seconds_pair(agent: float, torch: float) -> str:
    return f"{agent:.2f} s / {torch:.2f} s ({agent / torch:.2f}×)"


def render(idle: IdleResult | None, training: TrainingResult | None, venv: VenvResult | None, *, top: int = 6) -> str:
    lines = ["| section | measurement | value | goal | met |", "|---|---|---:|---:|:---:|"]

    def row(section: str, what: str, value: str, goal: str = "", met: bool | None = None) -> None:
        lines.append(f"| {section} | {what} | {value} | {goal} | {'' if met is None else verdict(met)} |")

    if idle is not None:
        section = f"1. idle agent ({idle.seconds:.0f} s)"
        rss_ok = mb(idle.rss_median) < IDLE_RSS_GOAL_MB
        row(section, "RSS, median of 1 s samples", memory(idle.rss_median), f"< {IDLE_RSS_GOAL_MB:.0f} MB", rss_ok)
        row(section, "RSS, max", memory(idle.rss_max))
        row(section, "USS (private memory), median", "n/a" if idle.uss_median is None else memory(idle.uss_median))
        cpu_ok = idle.cpu_percent < IDLE_CPU_GOAL_PERCENT
        row(section, "CPU, % of one core", f"{idle.cpu_percent:.2f} %", f"< {IDLE_CPU_GOAL_PERCENT:.0f} %", cpu_ok)
        row(section, "start-up until online, wall / CPU", f"{idle.startup_wall_s:.1f} s / {idle.startup_cpu_s:.1f} s")
        row(section, "threads", str(idle.threads))
    if training is not None:
        t = training
        section = f"2. training ({t.rounds} tasks × {t.epochs} epochs, {t.examples} examples)"
        row(section, "fedflock agent peak RSS (onnxruntime + MQTT)", memory(t.agent_peak))
        row(section, "PyTorch eager peak RSS (same model, data, epochs; no MQTT)", memory(t.torch_peak))
        ratio_ok = t.ratio <= TRAINING_RATIO_GOAL
        row(section, "agent / PyTorch", f"{t.ratio:.2f}×", f"≤ {TRAINING_RATIO_GOAL}×", ratio_ok)
        sampled = f"{mib(t.agent_sampled_peak):.1f} / {mib(t.torch_sampled_peak):.1f} MiB"
        row(section, "5 ms-sampled peaks, agent / PyTorch", sampled)
        row(section, "agent RSS, idle again after the tasks", memory(t.agent_rss_after))
        cpu = seconds_pair(t.agent_task_cpu_s, t.torch_train_cpu_s)
        row(section, "CPU time of the training: agent tasks (incl. MQTT, codec) / PyTorch loop", cpu)
        row(
            section,
            "whole-process CPU time incl. start-up, agent / PyTorch",
            seconds_pair(t.agent_cpu_s, t.torch_cpu_s),
        )
    if venv is not None:
        section = "3. agent-only install" + (" (**estimate**)" if venv.estimate else "")
        what = "installed files (estimate)" if venv.estimate else "venv size on disk"
        row(section, what, memory(venv.total), f"≤ {VENV_GOAL_MB:.0f} MB", mb(venv.total) <= VENV_GOAL_MB)
        bootstrap = sum(size for name, size in venv.distributions.items() if normalize_name(name) in VENV_BOOTSTRAP)
        if bootstrap and not venv.estimate:
            row(section, "venv size without pip and setuptools (venv's own bootstrap)", memory(venv.total - bootstrap))
        biggest = sorted(venv.distributions.items(), key=lambda item: -item[1])
        for name, size in biggest[:top]:
            row(section, f"— {name}", f"{mib(size):.1f} MiB ({100 * size / venv.total:.0f} %)")
        if rest := biggest[top:]:
            row(section, f"— {len(rest)} others", f"{mib(sum(size for _, size in rest)):.1f} MiB")
        row(section, "note", venv.note)
    return "\n".join(lines)
