"""The `vpref` command line: synth, sft, build-data, pairs, train-rm, run, eval, demo, judge-eval, cluster, config."""

from __future__ import annotations

import argparse
import json
import sys
import time

from vpref.config import ConfigError, describe_keys, load_config
from vpref.utils import configure as configure_output, keep_internal_logs, quiet_libraries, release_internal_logs, say, terminal


def _config(args):
    return load_config(args.config, args.set or [])


def _run_folder_logs(args, run_dir) -> None:
    """Ray's and Ray Train's own output goes to `<run_dir>/logs/` unless --verbose."""
    from pathlib import Path

    configure_output(log_dir=Path(run_dir) / "logs")
    if not args.verbose:
        keep_internal_logs(Path(run_dir) / "logs")


def cmd_synth(args) -> int:
    from pydantic import ValidationError

    from vpref.config import SynthConfig
    from vpref.data.synth import SynthSpec, synthesize
    from vpref.utils import log

    try:  # the same bounds as the synth.* keys
        SynthConfig(out=args.out, n=args.n, seed=args.seed, size=args.size)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"--{err['loc'][0]} {err['input']!r} is not allowed: {err['msg']} (`vpref synth --help`)") from None
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
    say(f"\nDev exact-match accuracy per question family ({report['dev_questions']} questions)")
    say("| member | params | steps | noise | " + " | ".join(fams) + " |")
    say("|---" * (4 + len(fams)) + "|")
    for name, m in members.items():
        accs = " | ".join(f"{m['dev_accuracy'][f]:.2f}" for f in fams)
        say(f"| {name} | {m['params'] / 1e6:.2f}M | {m['steps']} | {m['label_noise']:.1f} | {accs} |")


def cmd_build_data(args) -> int:
    from pathlib import Path

    from vpref.build import DataEngine
    from vpref.cluster import init_ray
    from vpref.data.card import write_card
    from vpref.data.manifest import append_rejects, load_manifest
    from vpref.utils import log

    from vpref import preflight
    from vpref.folders import FolderLock, clear_build

    cfg = _config(args)
    preflight.require(cfg, "build-data")
    out = Path(cfg.build.out)
    with FolderLock(out, "build-data", key="build.out"):
        if args.fresh:
            removed = clear_build(out)
            if removed:
                log(f"--fresh: removed the earlier build in {out} ({', '.join(removed)})")
        manifest = load_manifest(getattr(cfg.data, cfg.build.split), cfg.data.root)
        log(manifest.summary())
        if append_rejects(out / "rejects.jsonl", manifest.rejects):
            log(f"{len(manifest.rejects)} manifest rows set aside in {out / 'rejects.jsonl'}")
        samples = manifest.samples[: cfg.build.max_samples]
        if not samples:
            from vpref.loop import require_questions

            require_questions(cfg, cfg.build.split, samples, out / "rejects.jsonl")
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
              file=terminal())
    return 0


def cmd_run(args) -> int:
    from vpref.loop import print_table, run

    cfg = _config(args)
    _run_folder_logs(args, cfg.run.out_dir)
    metrics = run(cfg)
    print_table(metrics)
    return 0


def cmd_eval(args) -> int:
    import tempfile
    from pathlib import Path

    from vpref import preflight
    from vpref.build import DataEngine
    from vpref.cluster import init_ray
    from vpref.config import SUITES
    from vpref.eval.evaluator import Evaluator, evaluate_round, suite_runner
    from vpref.eval.report import family_table, table
    from vpref.eval.suites import failed_share
    from vpref.eval.tables import suite_tables
    from vpref.loop import _split, require_questions

    cfg = _config(args)
    preflight.require(cfg, "eval")
    suites = cfg.eval.suites if args.suite is None else [x for x in args.suite.split(",") if x and x != "none"]
    unknown = [x for x in suites if x not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; known: {', '.join(SUITES)} (or 'none')")
    member = cfg.policy_member
    if member is None:
        raise ValueError("the zoo has no policy member to host the checkpoint (set policy: true on one)")
    for c in args.checkpoint:
        if not (Path(c) / "config.json").is_file():
            raise FileNotFoundError(f"--checkpoint {c}: not a Hugging Face checkpoint folder (no config.json); "
                                    f"`vpref sft` writes sft.out/<member>, and `vpref run` run.out_dir/round_<t>/policy")
    init_ray(cfg.ray)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        rejects = out / "rejects.jsonl"
        engine = DataEngine(cfg, out / "_actors", members=[member.name])
        runner = None
        results = []
        try:
            runner = suite_runner(cfg, out, rejects, suites)
            evaluator = Evaluator(engine, cfg, _split(cfg, cfg.eval.split, rejects), rejects,
                                  extra_videos=runner.videos if runner else ())
            require_questions(cfg, cfg.eval.split, evaluator.samples, rejects)
            if runner:
                runner.drop_videos(evaluator.failed_videos, rejects)
            for i, ckpt in enumerate(args.checkpoint):
                engine.reload_policy(ckpt, version=i)
                metrics = evaluate_round(evaluator, runner, i, ckpt, out / f"checkpoint_{i}", cfg.eval.max_samples)
                results.append({"round": i, "label": ckpt, "eval": metrics})
        finally:
            if runner is not None and hasattr(runner.judge, "shutdown"):
                runner.judge.shutdown()
            engine.shutdown()
    print(f"\nOn the {cfg.eval.split} split ({results[0]['eval']['questions']} questions); "
          + "; ".join(f"row {r['round']}: {r['label']}" for r in results))
    print(table(results))
    print(family_table(results))
    if runner:
        print("\n" + suite_tables(results, head="row"))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoints": results}, indent=2))
    worst = max((failed_share(r["eval"].get("suites", {})) for r in results), default=0.0)
    if worst > 0.5:
        print(f"vpref eval: {worst:.0%} of the judge's ratings failed (see the failure reasons in the JSON"
              f"{' and ' + str(out) + '/checkpoint_*/eval_ratings.jsonl' if args.out else ''})", file=terminal())
        return 1
    return 0


def cmd_demo(args) -> int:
    import shutil
    from pathlib import Path

    from vpref.config import load_config
    from vpref.data.synth import SynthSpec, synthesize
    from vpref.errors import FolderConflict
    from vpref.loop import print_table, run
    from vpref.train.sft import checkpoint_mismatches, run_sft
    from vpref.utils import log

    cfg = load_config(None, args.set or [])
    if args.fresh:
        for d in (cfg.synth.out, cfg.sft.out, cfg.run.out_dir):
            shutil.rmtree(d, ignore_errors=True)
    _run_folder_logs(args, cfg.run.out_dir)
    t0 = time.perf_counter()
    s = cfg.synth
    spec = SynthSpec(s.n, s.seed, s.size, s.min_frames, s.max_frames, s.fps, tuple(s.split))
    fresh = "run `vpref demo --fresh` (deletes synth.out, sft.out and run.out_dir first), or set those folders elsewhere"
    made = Path(s.out) / "synth.json"
    if made.is_file():  # the world there must be the one this demo asks for, not an earlier demo's
        import dataclasses

        old = json.loads(made.read_text()).get("spec", {})
        diff = {k: (old.get(k), v) for k, v in json.loads(json.dumps(dataclasses.asdict(spec))).items()
                if old.get(k) != v}
        if diff:
            raise FolderConflict(f"synth.out={s.out} holds a synthetic world made with other settings ("
                                 + ", ".join(f"synth.{k} {a!r} there, {b!r} asked" for k, (a, b) in diff.items())
                                 + f"): {fresh}")
    if not Path(cfg.data.train).is_file():
        synthesize(s.out, spec)
        log(f"demo: synthetic world written to {s.out}")
    need = checkpoint_mismatches(cfg)  # SFT checkpoints must be trained on this world with these settings
    other = [why for why in need.values() if why != "missing"]
    if other:
        raise FolderConflict(f"sft.out={cfg.sft.out} holds checkpoints not trained from this demo's world and "
                             f"settings ({'; '.join(other)}): {fresh}")
    if need:
        report = run_sft(cfg)
        _print_sft_table(report)
    else:
        log(f"demo: SFT checkpoints in {cfg.sft.out} match this world and settings; SFT skipped")
    metrics = run(cfg)
    say(f"\nvpref demo: {cfg.loop.rounds} Iter-W2S-RLAIF rounds on the synthetic test split "
          f"({metrics['rounds'][0]['eval']['questions']} questions), {time.perf_counter() - t0:.0f}s in all")
    print_table(metrics)
    say(f"\nreport: {cfg.run.out_dir}/report.md, metrics: {cfg.run.out_dir}/metrics.json")
    return 0


def cmd_cluster(args) -> int:
    from vpref.cluster import describe, init_ray, judge_bundle

    cfg = _config(args)
    init_ray(cfg.ray)
    print("\n".join(describe(cfg.ray, judge_bundle(cfg))))
    return 0


def cmd_judge_eval(args) -> int:
    from pathlib import Path

    from vpref.judges.judge_eval import run_judge_eval

    cfg = _config(args)
    report = run_judge_eval(cfg)
    print((Path(cfg.judge_eval.out) / "judge_eval.md").read_text())
    print(f"judge-eval: {cfg.judge_eval.out}/judge_eval.json, judge_eval.md, judge_eval.png")
    worst = [r["name"] for r in report["judges"] if (r.get("failure_rate") or 0) > 0.5]
    if worst:
        print(f"judge-eval: most judgments failed for {', '.join(worst)} (see failures_by_cause in the JSON)",
              file=terminal())
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
        return verbose_flag(sp)

    def verbose_flag(sp):
        sp.add_argument("--verbose", action="store_true",
                        help="also show Ray's and Ray Train's own output (run/demo keep it in <run>/logs/)")
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
    s.add_argument("--fresh", action="store_true",
                   help="delete the build already in build.out (even one of other inputs) and start again")
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

    s = with_config(sub.add_parser("eval", help="evaluate checkpoints on the eval split and the suites"),
                    optional=True)
    s.add_argument("--checkpoint", required=True, action="append",
                   help="HF checkpoint folder of a policy (repeat to compare several in one table)")
    s.add_argument("--suite", default=None,
                   help="comma-separated suites: videochatgpt,zeroshot,grounded,winrate, or none "
                        "(default: eval.suites)")
    s.add_argument("--out", help="folder for answers, ratings and the baseline's cached answers (default: temporary)")
    s.add_argument("--json", help="also write the metrics to this file")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("demo", help="synth -> SFT -> 3 rounds -> eval on the embedded default (CPU, minutes)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    s.add_argument("--fresh", action="store_true", help="delete earlier demo outputs first")
    verbose_flag(s)
    s.set_defaults(fn=cmd_demo)

    s = with_config(sub.add_parser("judge-eval", help="measure judges: accuracy on known-truth pairs, agreement, "
                                                      "position and length bias, failures, speed"))
    s.set_defaults(fn=cmd_judge_eval)
    s = with_config(sub.add_parser("cluster", help="the Ray cluster by pool: nodes, where judges and other work go"),
                    optional=True)
    s.set_defaults(fn=cmd_cluster)

    c = sub.add_parser("config", help="inspect configs")
    csub = c.add_subparsers(dest="config_command", required=True)
    s = with_config(csub.add_parser("show", help="print the resolved config"), optional=True)
    s.add_argument("--doc", action="store_true", help="list every key with its default and description")
    s.set_defaults(fn=cmd_config_show)
    return p


def exit_code(e: BaseException) -> int:
    """The exit code an error ends a command with (see vpref.errors): 2 bad input, 3 the work
    failed, 4 the output folder is in use or holds other results, 130 interrupted, 1 a bug."""
    from vpref.errors import VprefError

    if isinstance(e, VprefError):
        return e.exit_code
    if isinstance(e, (ConfigError, FileNotFoundError, ValueError)):
        return 2
    if isinstance(e, KeyboardInterrupt):
        return 130
    return 1


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # not imported for commands that need no cluster
    return ray is not None and ray.is_initialized()


def _stop_own_ray() -> None:
    """End the local cluster (or the connection) this command started, while its output still goes
    where the command's does: left to exit time, Ray's last lines (actors killed on an interrupt)
    came after vpref's final line."""
    if _ray_running():
        try:
            sys.modules["ray"].shutdown()
        except Exception:  # exiting anyway: a failed shutdown must not hide the command's own outcome
            pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    from vpref.errors import VprefError

    configure_output(verbose=getattr(args, "verbose", False))
    had_ray = _ray_running()
    try:
        try:
            return args.fn(args)
        finally:  # the error below goes to the caller's stderr; an in-process caller gets its fds back
            if not had_ray:
                _stop_own_ray()
            release_internal_logs()
    except ConfigError as e:
        print(f"vpref: {e}", file=terminal())
        return exit_code(e)
    except KeyboardInterrupt as e:  # str(KeyboardInterrupt()) is empty: say what happened and what is kept
        resumes = args.command in ("build-data", "run", "demo")  # the commands with durable, resumable stages
        print(f"vpref {args.command}: interrupted" + ("; what finished is kept, and the same command resumes from it"
                                                      if resumes else ""), file=terminal())
        return exit_code(e)
    except (VprefError, FileNotFoundError, ValueError) as e:
        print(f"vpref {args.command}: {e}", file=terminal())
        return exit_code(e)
