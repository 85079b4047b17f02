"""Pre-flight checks: the config against the filesystem and the cluster, before any actor starts.

Each problem is one line naming the key, its value and the fix; all of them are reported at
once (`InputError`, exit code 2).  Checked: the manifests and checkpoints a command reads
(with what creates them), the policy member, and -- when vpref starts the local cluster itself --
whether the actors fit in `ray.num_cpus` (an actor or a Train worker that no node can place
would otherwise wait forever).  On a cluster vpref joins, resources are checked as they are
asked for, with `ray.placement_timeout_s` (see vpref.health).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from vpref.config import Config
from vpref.errors import problems

SYNTH_HINT = "`vpref synth --out DIR` writes the synthetic world's (DIR/train.jsonl, dev.jsonl, test.jsonl); for " \
             "your own data point it at your manifest"


@dataclass(frozen=True)
class Problem:
    key: str
    value: object
    fix: str

    def __str__(self) -> str:
        return f"{self.key} = {self.value!r}: {self.fix}"


def _splits(cfg: Config, command: str) -> list[str]:
    if command == "build-data":
        return [cfg.build.split]
    if command == "eval":
        return [cfg.eval.split]
    splits = ["train", cfg.eval.split] + (["dev"] if cfg.loop.alpha_grid else [])
    return list(dict.fromkeys(splits))


def _members(cfg: Config, command: str):
    if command == "eval":
        return [(i, m) for i, m in enumerate(cfg.zoo) if m.policy]
    return list(enumerate(cfg.zoo))


def check_files(cfg: Config, command: str) -> list[Problem]:
    out = []
    for split in _splits(cfg, command):
        path = getattr(cfg.data, split)
        if not Path(path).is_file():
            out.append(Problem(f"data.{split}", path, f"no such manifest; {SYNTH_HINT}"))
    if not Path(cfg.data.root).is_dir():
        out.append(Problem("data.root", cfg.data.root, "no such folder (the folder the manifests' videos live in)"))
    for i, m in _members(cfg, command):
        p = Path(m.path)
        made_by = f"`vpref sft` writes it ({cfg.sft.out}/<member>; run `vpref sft CONFIG` first)"
        if not p.exists():
            out.append(Problem(f"zoo.{i}.path", m.path, f"zoo member {m.name!r}: no such checkpoint; {made_by}, or "
                                                         f"point it at a Hugging Face checkpoint folder"))
        elif not (p / "config.json").is_file():
            out.append(Problem(f"zoo.{i}.path", m.path, f"zoo member {m.name!r}: not a Hugging Face checkpoint folder "
                                                         f"(no config.json); {made_by}"))
    j = cfg.judge
    from vpref.judges.engines import SMOLLM2

    if j.kind == "reward_model" and j.model and not (Path(j.model) / "reward_model.json").is_file():
        out.append(Problem("judge.model", j.model, "not a reward model folder (no reward_model.json); `vpref train-rm "
                                                   "CONFIG` writes one at rm.out/rm"))
    if j.kind in ("llm", "grounding") and j.backend in ("hf", "vllm") and j.model and j.model != SMOLLM2 \
            and not Path(j.model).exists():
        if j.model.startswith(("/", ".", "~")) or j.model.count("/") != 1:  # a path, not a hub id (org/name)
            out.append(Problem("judge.model", j.model, "no such judge checkpoint folder; put the judge model there "
                                                       "(the hf and vllm judge backends load a local folder), or "
                                                       "serve it and use judge.backend=openai"))
    if command in ("run", "eval", "demo") and cfg.policy_member is None:
        out.append(Problem("zoo.<i>.policy", False, "no zoo member is the policy: set `policy: true` on the model "
                                                     "being trained"))
    if command in ("run", "demo") and cfg.dpo.num_workers == 0:
        out.append(Problem("dpo.num_workers", 0, "`vpref run` trains on Ray Train, which needs at least 1 worker"))
    return out


def starts_local_cluster(cfg: Config) -> bool:
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def engine_cpus(cfg: Config, command: str) -> tuple[float, str]:
    """CPUs the data engine's actors hold at once, and how that adds up."""
    from vpref.actors.decode import DECODER_CPUS

    members = _members(cfg, command)
    zoo = sum(m.replicas * m.resources.num_cpus for _, m in members)
    judges = cfg.judge.pool.min * cfg.judge.pool.resources.num_cpus
    decoders = cfg.data.decoders * DECODER_CPUS
    parts = f"zoo {zoo:g}, judge.pool.min {cfg.judge.pool.min} x {cfg.judge.pool.resources.num_cpus:g}, " \
            f"data.decoders {cfg.data.decoders} x {DECODER_CPUS:g}"
    return zoo + judges + decoders, parts


def check_resources(cfg: Config, command: str) -> list[Problem]:
    """Whether the actors fit in the local cluster vpref starts (`ray.num_cpus`, null: all cores)."""
    if not starts_local_cluster(cfg):
        return []
    cap = cfg.ray.num_cpus if cfg.ray.num_cpus is not None else (os.cpu_count() or 1)
    need, parts = engine_cpus(cfg, command)
    out = []
    if cap <= 0 or need > cap + 1e-9:
        out.append(Problem("ray.num_cpus", cfg.ray.num_cpus,
                           f"the local cluster vpref starts would have {cap:g} CPUs, but the data engine's actors need "
                           f"{need:g} at once ({parts}); set ray.num_cpus to at least {math.ceil(need)} (null: all "
                           f"{os.cpu_count()} cores; logical CPUs may exceed the cores), or lower the actors' "
                           f"resources.num_cpus"))
        return out
    d = cfg.dpo
    if command in ("run", "demo") and d.num_workers:
        train = d.num_workers * d.cpus_per_worker
        if need + train > cap + 1e-9:
            fit = max(0, math.floor((cap - need) / d.cpus_per_worker + 1e-9))
            out.append(Problem("dpo.num_workers", d.num_workers,
                               f"{d.num_workers} Ray Train workers x {d.cpus_per_worker:g} CPU (dpo.cpus_per_worker) "
                               f"need {train:g} CPUs, but the data engine's actors keep {need:g} of the {cap:g} "
                               f"(ray.num_cpus) during training; use dpo.num_workers <= {fit}, or raise ray.num_cpus "
                               f"to at least {math.ceil(need + train)}"))
    return out


def check(cfg: Config, command: str) -> list[Problem]:
    return check_files(cfg, command) + check_resources(cfg, command)


def require(cfg: Config, command: str) -> None:
    """Raise InputError listing every problem (one per line) if there is any."""
    found = check(cfg, command)
    if found:
        raise problems(f"`vpref {command}` cannot start ({len(found)} problem{'s' if len(found) > 1 else ''}):",
                       [str(p) for p in found])
