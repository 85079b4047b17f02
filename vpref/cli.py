"""The `vpref` command line: synth, sft, build-data, pairs, train-rm, run, eval, demo, config."""

from __future__ import annotations

import argparse
import json
import sys
import time

from vpref.config import ConfigError, describe_keys, load_config
from vpref.utils import quiet_libraries


def _config(args):
    return load_config(args.config, args.set or [])


def cmd_synth(args) -> int:
    from vpref.data.synth import SynthSpec, synthesize
    from vpref.utils import log

    spec = SynthSpec(n=args.n, seed=args.seed, size=args.size)
    summary = synthesize(args.out, spec, progress=None)
    log(f"synth: {sum(summary['videos'].values())} videos in {summary['seconds']}s -> {args.out}")
    for split, fam in summary["questions"].items():
        log(f"  {split}: {summary['videos'][split]} videos, {sum(fam.values())} questions {fam}")
    return 0


def cmd_sft(args) -> int:
    from vpref.train.sft import run_sft

    report = run_sft(_config(args))
    _print_sft_table(report)
    return 0


def _print_sft_table(report: dict) -> None:
    members = report["members"]
    fams = list(next(iter(members.values()))["dev_accuracy"])
    print(f"\nDev exact-match accuracy per question family ({report['dev_questions']} questions)")
    print("| member | params | steps | noise | " + " | ".join(fams) + " |")
    print("|---" * (4 + len(fams)) + "|")
    for name, m in members.items():
        accs = " | ".join(f"{m['dev_accuracy'][f]:.2f}" for f in fams)
        print(f"| {name} | {m['params'] / 1e6:.2f}M | {m['steps']} | {m['label_noise']:.1f} | {accs} |")


def cmd_build_data(args) -> int:
    from pathlib import Path

    from vpref.build import DataEngine
    from vpref.cluster import init_ray
    from vpref.data.card import write_card
    from vpref.data.manifest import append_rejects, load_manifest
    from vpref.utils import log

    cfg = _config(args)
    out = Path(cfg.build.out)
    manifest = load_manifest(getattr(cfg.data, cfg.build.split), cfg.data.root)
    log(manifest.summary())
    if append_rejects(out / "rejects.jsonl", manifest.rejects):
        log(f"{len(manifest.rejects)} manifest rows set aside in {out / 'rejects.jsonl'}")
    samples = manifest.samples[: cfg.build.max_samples]
    init_ray(cfg.ray)
    engine = DataEngine(cfg, out / "_actors")
    try:
        result = engine.build(samples, out)
    finally:
        engine.shutdown()
    stats = write_card(out, result.summary())
    _print_card(stats, result, out)
    return 0


def _print_card(stats: dict, result, out) -> None:
    print(f"\nBuild of {stats['questions']} questions in {result.seconds:.1f}s -> {out}")
    print(f"  responses {stats['responses']} | judgments {stats['judgments']} | judge failures "
          f"{stats['judge_failures']} ({stats['parse_failure_rate']:.1%}) | pairs {stats['pairs']} | "
          f"rejects {result.rejects}")
    print(f"  decodes {result.decodes['decodes']} for {result.decodes['videos']} videos "
          f"(at most {result.decodes['max_per_video']} per video)")
    print(f"  chosen scored above rejected: {stats['chosen_beats_rejected']}")
    print("  | model | responses | mean score | chosen | rejected | win rate |")
    for m, w in stats["win_rate"].items():
        print(f"  | {m} | {w['responses']} | {w['mean_score']} | {w['chosen']} | {w['rejected']} | {w['win_rate']} |")
    print(f"  dataset card: {out}/README.md")


def cmd_pairs(args) -> int:
    from vpref.actors.writer import repair
    from vpref.config import PairsConfig
    from vpref.data.card import write_card

    cfg = PairsConfig(strategy=args.strategy, min_margin=args.min_margin, max_length_ratio=args.max_length_ratio)
    status = repair(args.src, args.out, cfg.model_dump())
    stats = write_card(args.out)
    print(f"re-paired {args.src} with {cfg.strategy} (min margin {cfg.min_margin}): {status['pairs']} pairs -> {args.out}")
    print(f"  chosen scored above rejected: {stats['chosen_beats_rejected']}")
    return 0


def cmd_train_rm(args) -> int:
    from vpref.cluster import init_ray
    from vpref.train.rm import train_rm

    cfg = _config(args)
    init_ray(cfg.ray)
    res = train_rm(cfg.rm, cfg.data, cfg.rm.data, cfg.rm.out, name=f"{cfg.run.name}-rm", seed=cfg.run.seed)
    d = res.data
    print(f"\nReward model -> {res.checkpoint} ({res.seconds:.0f}s, {res.restarts} restarts)")
    print(f"  trained on {d['train_pairs']} pairs, {d['eval_pairs']} held out, from {', '.join(d['sources'])}")
    print(f"  teacher: {', '.join(t['judge'] for t in d['teacher']) or '(unknown)'}")
    print("  | epoch | held-out pairwise accuracy | held-out loss | pairs |")
    for e in res.evals:
        print(f"  | {e['epoch']} | {e['eval/accuracy']:.3f} | {e['eval/loss']:.3f} | {e['eval/pairs']} |")
    c = res.calibration
    if c.get("kind") in ("linear", "quantile"):
        how = (f"teacher score = {c['a']:.3f} * reward + {c['b']:.3f}, clipped to [{c['lo']}, {c['hi']}]"
               if c["kind"] == "linear" else "the teacher's score distribution, by quantile")
        print(f"  calibration ({c['kind']}): {how}; on {c['n']} answers: R^2 {c['r2_train']:.2f} train / "
              f"{c.get('r2_heldout', float('nan')):.2f} held out, Spearman {c.get('spearman_heldout', float('nan')):.2f}"
              " held out")
    else:
        print(f"  calibration: none ({c.get('why')}); the judge's score is the raw reward")
    if not res.evals:
        print("vpref train-rm: no held-out pairs (rm.eval_fraction is 0 or the data too small): accuracy unmeasured",
              file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    from vpref.loop import print_table, run

    metrics = run(_config(args))
    print_table(metrics)
    return 0


def cmd_eval(args) -> int:
    import tempfile
    from pathlib import Path

    from vpref.build import DataEngine
    from vpref.cluster import init_ray
    from vpref.eval.report import family_table, table
    from vpref.loop import Evaluator, _split

    cfg = _config(args)
    member = cfg.policy_member
    if member is None:
        raise ValueError("the zoo has no policy member to host the checkpoint (set policy: true on one)")
    init_ray(cfg.ray)
    with tempfile.TemporaryDirectory() as tmp:
        engine = DataEngine(cfg, tmp, members=[member.name])
        try:
            evaluator = Evaluator(engine, cfg, _split(cfg, cfg.eval.split, Path(tmp) / "rejects.jsonl"),
                                  Path(tmp) / "rejects.jsonl")
            engine.reload_policy(args.checkpoint, version=0)
            metrics, _ = evaluator(cfg.eval.max_samples)
        finally:
            engine.shutdown()
    rounds = [{"round": 0, "eval": metrics}]
    print(f"\n{args.checkpoint} on the {cfg.eval.split} split ({metrics['questions']} questions)")
    print(table(rounds))
    print(family_table(rounds))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


def cmd_demo(args) -> int:
    import shutil
    from pathlib import Path

    from vpref.config import load_config
    from vpref.data.synth import SynthSpec, synthesize
    from vpref.loop import print_table, run
    from vpref.train.sft import run_sft
    from vpref.utils import log

    cfg = load_config(None, args.set or [])
    if args.fresh:
        for d in (cfg.synth.out, cfg.sft.out, cfg.run.out_dir):
            shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    if not Path(cfg.data.train).is_file():
        s = cfg.synth
        synthesize(s.out, SynthSpec(s.n, s.seed, s.size, s.min_frames, s.max_frames, s.fps, tuple(s.split)))
        log(f"demo: synthetic world written to {s.out}")
    if not all((Path(cfg.sft.out) / m.name / "model.safetensors").is_file() for m in cfg.sft.members):
        report = run_sft(cfg)
        _print_sft_table(report)
    metrics = run(cfg)
    print(f"\nvpref demo: {cfg.loop.rounds} Iter-W2S-RLAIF rounds on the synthetic test split "
          f"({metrics['rounds'][0]['eval']['questions']} questions), {time.perf_counter() - t0:.0f}s in all")
    print_table(metrics)
    print(f"\nreport: {cfg.run.out_dir}/report.md, metrics: {cfg.run.out_dir}/metrics.json")
    return 0


def cmd_config_show(args) -> int:
    if args.doc:
        for key, default, doc in describe_keys():
            print(f"{key:42s} {default:24s} {doc}")
        return 0
    print(_config(args).to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vpref", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, optional=False):
        sp.add_argument("config", nargs="?" if optional else None, help="YAML config (see configs/)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. dpo.beta=0.2")
        return sp

    s = sub.add_parser("synth", help="write the synthetic video-QA world (mp4 clips + manifests)")
    s.add_argument("--out", default="data/synth", help="output folder")
    s.add_argument("--n", type=int, default=800, help="number of videos")
    s.add_argument("--seed", type=int, default=0, help="world seed")
    s.add_argument("--size", type=int, default=64, help="frame size in pixels")
    s.set_defaults(fn=cmd_synth)

    s = with_config(sub.add_parser("sft", help="SFT warm start of the tiny policy and zoo members"))
    s.set_defaults(fn=cmd_sft)

    s = with_config(sub.add_parser("build-data", help="build preference pairs with the zoo and the judge pool"))
    s.set_defaults(fn=cmd_build_data)

    s = sub.add_parser("pairs", help="re-pair a build's saved judgments with another strategy (no regeneration)")
    s.add_argument("src", help="folder of a finished build")
    s.add_argument("--out", required=True, help="folder for the new pairs")
    s.add_argument("--strategy", choices=["best_vs_worst", "all_pairs"], default="all_pairs")
    s.add_argument("--min-margin", type=float, default=0.5)
    s.add_argument("--max-length-ratio", type=float, default=None)
    s.set_defaults(fn=cmd_pairs)

    s = with_config(sub.add_parser("train-rm", help="train a reward model on judged pairs (Ray Train); rm.* keys"))
    s.set_defaults(fn=cmd_train_rm)

    s = with_config(sub.add_parser("run", help="Iter-W2S-RLAIF rounds: data, DPO on Ray Train, ExPO, evaluation"))
    s.set_defaults(fn=cmd_run)

    s = with_config(sub.add_parser("eval", help="evaluate a checkpoint on the eval split"))
    s.add_argument("--checkpoint", required=True, help="HF checkpoint folder of a policy")
    s.add_argument("--json", help="also write the metrics to this file")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("demo", help="synth -> SFT -> 3 rounds -> eval on the embedded default (CPU, minutes)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    s.add_argument("--fresh", action="store_true", help="delete earlier demo outputs first")
    s.set_defaults(fn=cmd_demo)

    c = sub.add_parser("config", help="inspect configs")
    csub = c.add_subparsers(dest="config_command", required=True)
    s = with_config(csub.add_parser("show", help="print the resolved config"), optional=True)
    s.add_argument("--doc", action="store_true", help="list every key with its default and description")
    s.set_defaults(fn=cmd_config_show)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"vpref: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"vpref {args.command}: {e}", file=sys.stderr)
        return 2
