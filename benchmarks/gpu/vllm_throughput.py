"""vLLM generation throughput inside vpref's GeneratorActor vs vLLM's own offline `LLM.generate`.

Both sides get the same prompts (same frames, same chat prompt token ids, same `(frames,
metadata)` video items) and the same per-request SamplingParams (`ignore_eos` by default, so
every request generates exactly --max-tokens tokens).  Each side runs in its own fresh process
(the GPU is empty for each):

* offline: `vllm.LLM(**engine_kwargs(...))` and one timed `llm.generate(prompts, params)` on
  prompts built beforehand -- vLLM alone, the reference.
* actor: a Ray `GeneratorActor` with backend vllm (options from `vllm_actor_options`); clips are
  put in the object store once; one timed `ray.get(actor.generate.remote(...))` from the driver,
  which includes prompt building, the Ray round trip and output conversion.

Goal: actor output tokens/s >= 0.9 x offline output tokens/s.

Exact command (GPU machine, vLLM installed; from the repository root):

    python benchmarks/gpu/vllm_throughput.py --size 3m --prompts 512 --max-tokens 128 \
        --out benchmarks/results/vllm_throughput.json

A real model (its own processor config decides the resize; frames resized to --frame-size):

    python benchmarks/gpu/vllm_throughput.py --model /models/Qwen2.5-VL-7B-Instruct --prompts 256 \
        --frame-size 448 --num-frames 16 --max-tokens 256 --gpu-memory-utilization 0.85 \
        --out benchmarks/results/vllm_throughput_qwen7b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from _common import prepare, require_cuda  # noqa: E402


def device_info() -> dict:
    import torch

    info = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- inputs


def inputs(args):
    """(clips, questions): the first --prompts questions of the world, cycled; each video decoded once."""
    from vpref.data.manifest import load_manifest
    from vpref.data.video import decode_video

    world = Path(args.workdir) / f"world-{args.videos}"
    samples = load_manifest(world / "train.jsonl").samples
    samples = [samples[i % len(samples)] for i in range(args.prompts)]
    cache = {}
    for s in samples:
        if s.video not in cache:
            cache[s.video] = decode_video(s.video, args.num_frames, args.frame_size, timeout_s=None)
    return [cache[s.video] for s in samples], [s.question for s in samples], len(cache)


def sampling(args):
    from vpref.config import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_tokens, n=args.n)


def vllm_config(args):
    from vpref.config import VLLMConfig

    return VLLMConfig(tensor_parallel_size=args.tp, gpu_memory_utilization=args.gpu_memory_utilization,
                      max_model_len=args.max_model_len, enforce_eager=args.enforce_eager)


# --------------------------------------------------------------------------- the two sides


def run_offline(args, ckpt: Path) -> dict:
    import vllm

    from vpref.actors.backends import GenRequest
    from vpref.actors.vllm_backend import engine_kwargs, sampling_kwargs, stop_token_ids, video_prompt
    from vpref.models.families import family_of

    clips, questions, videos = inputs(args)
    family = family_of(ckpt)
    proc = family.load_processor(ckpt)
    stops, s = stop_token_ids(proc.tokenizer, ckpt, proc.chat_template), sampling(args)
    prompts = [video_prompt(proc, GenRequest(c.frames, c.sampled_fps, q),
                            family.vllm_prompt_mm_kwargs(ckpt, len(c.frames))) for c, q in zip(clips, questions)]
    params = [vllm.SamplingParams(**sampling_kwargs(s, args.seed, i, stops, args.ignore_eos)[0])
              for i in range(len(prompts))]
    t0 = time.perf_counter()
    llm = vllm.LLM(**engine_kwargs(ckpt, args.dtype, vllm_config(args), family))
    startup = time.perf_counter() - t0
    llm.generate(prompts[:args.warmup], params[:args.warmup], use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    out_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) * len(o.outputs) for o in outs)
    return summary("offline", len(prompts), videos, seconds, out_tokens, prompt_tokens, startup)


def run_actor(args, ckpt: Path) -> dict:
    import ray

    from vpref.actors.generator import GeneratorActor
    from vpref.actors.vllm_backend import IGNORE_EOS_ENV, vllm_actor_options
    from vpref.config import ZooMember

    clips, questions, videos = inputs(args)
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:  # a new local cluster, never someone else's by accident
        ray.init(address="local", include_dashboard=False)
    member = ZooMember(name="bench", path=str(ckpt), backend="vllm", dtype=args.dtype, sampling=sampling(args),
                       vllm=vllm_config(args))
    opts = vllm_actor_options(member)
    if args.ignore_eos:
        opts["runtime_env"] = {"env_vars": {IGNORE_EOS_ENV: "1"}}
    t0 = time.perf_counter()
    actor = ray.remote(GeneratorActor).options(name="gen-bench-0", **opts).remote(member.model_dump(), "gen-bench-0")
    info = ray.get(actor.info.remote())
    startup = time.perf_counter() - t0
    refs, by_id = [], {}
    for c in clips:  # each decoded video goes to the object store once, as the data engine does
        if id(c) not in by_id:
            by_id[id(c)] = ray.put(c)
        refs.append(by_id[id(c)])
    s = member.sampling.model_dump()
    ray.get(actor.generate.remote(refs[:args.warmup], questions[:args.warmup], s, args.seed))
    step = args.actor_batch or len(refs)
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(refs), step):  # the actor serves one call at a time
        out += ray.get(actor.generate.remote(refs[i:i + step], questions[i:i + step], s, args.seed))
    seconds = time.perf_counter() - t0
    out_tokens = sum(c.num_tokens for per in out for c in per)
    res = summary("actor", len(refs), videos, seconds, out_tokens, None, startup)
    res.update(actor_batch=step, engine=info.get("vllm_version"), engine_startup_s=info.get("startup_seconds"))
    ray.kill(actor)
    ray.shutdown()
    return res


def summary(side, prompts, videos, seconds, out_tokens, prompt_tokens, startup) -> dict:
    r = {"side": side, "prompts": prompts, "videos": videos, "seconds": round(seconds, 4),
         "output_tokens": out_tokens, "requests_per_s": round(prompts / seconds, 3),
         "output_tokens_per_s": round(out_tokens / seconds, 2), "startup_s": round(startup, 2)}
    if prompt_tokens is not None:
        r["prompt_tokens"] = prompt_tokens
        r["total_tokens_per_s"] = round((prompt_tokens + out_tokens) / seconds, 2)
    return r


# --------------------------------------------------------------------------- driver


def child(args, mode: str) -> dict:
    """Run one side in a fresh Python process (an empty GPU for each)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        tmp = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--mode", mode, "--out", tmp]
    proc = subprocess.run(cmd, check=False, cwd=ROOT)
    if proc.returncode != 0:
        return {"side": mode, "error": f"exit code {proc.returncode}"}
    result = json.loads(Path(tmp).read_text())
    os.unlink(tmp)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (default: build a tiny Qwen2.5-VL of --size)")
    p.add_argument("--size", default="3m", help="tiny size when no --model (3m/5m: head_dim 64)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--videos", type=int, default=64, help="synthetic videos the prompts cycle over")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--frame-size", type=int, default=None, help="resize frames to this square size")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="stop at end of turn (output lengths then vary; compare tokens/s only)")
    p.add_argument("--warmup", type=int, default=8, help="prompts generated once before timing")
    p.add_argument("--actor-batch", type=int, default=0,
                   help="prompts per actor call (0: all in one call, like the offline side)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--ray-address", default=None, help="Ray cluster for the actor side (default: a new local one)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vpref-bench"))
    p.add_argument("--mode", choices=["both", "offline", "actor"], default="both")
    p.add_argument("--goal", type=float, default=0.9, help="required actor/offline output tokens/s ratio")
    p.add_argument("--out", default="benchmarks/results/vllm_throughput.json")
    args = p.parse_args(argv)
    require_cuda("vllm")
    _, ckpt = prepare(args)
    if args.mode == "offline":
        result = run_offline(args, ckpt)
    elif args.mode == "actor":
        result = run_actor(args, ckpt)
    else:
        offline, actor = child(args, "offline"), child(args, "actor")
        ratio = None
        if "error" not in offline and "error" not in actor:
            ratio = round(actor["output_tokens_per_s"] / offline["output_tokens_per_s"], 4)
        result = {"benchmark": "vllm_throughput", "model": str(ckpt), "device": device_info(),
                  "settings": {k: v for k, v in vars(args).items() if k not in ("out", "mode")},
                  "offline": offline, "actor": actor, "ratio": ratio, "goal": args.goal,
                  "meets_goal": ratio is not None and ratio >= args.goal}
        print(json.dumps({k: result[k] for k in ("offline", "actor", "ratio", "meets_goal")}, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if args.mode == "both":
        print(f"wrote {out}")
        return 0 if result["meets_goal"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
