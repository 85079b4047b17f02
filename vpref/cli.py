"""The `vpref` command line: synth, sft, build-data, pairs, run, eval, demo, config."""

from __future__ import annotations

import argparse
import json
import os
import sys

from vpref.config import ConfigError, describe_keys, load_config


def _quiet_libraries() -> None:
    """Progress bars and advisory warnings of the libraries drown vpref's own progress lines."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


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
    s.add_argument("--n", type=int, default=480, help="number of videos")
    s.add_argument("--seed", type=int, default=0, help="world seed")
    s.add_argument("--size", type=int, default=64, help="frame size in pixels")
    s.set_defaults(fn=cmd_synth)

    s = with_config(sub.add_parser("sft", help="SFT warm start of the tiny policy and zoo members"))
    s.set_defaults(fn=cmd_sft)

    c = sub.add_parser("config", help="inspect configs")
    csub = c.add_subparsers(dest="config_command", required=True)
    s = with_config(csub.add_parser("show", help="print the resolved config"), optional=True)
    s.add_argument("--doc", action="store_true", help="list every key with its default and description")
    s.set_defaults(fn=cmd_config_show)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"vpref: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"vpref {args.command}: {e}", file=sys.stderr)
        return 2
