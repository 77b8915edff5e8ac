"""Peak memory of a refinement step's candidate sampling: measured on the toy reasoner, extrapolated to R1 at 9k tokens.

    python benchmarks/bench_memory.py            # about a minute on one CPU thread

Part 1 (measured): generation's prefill + decode of R rows continuing one T-token prefix (what refinement does for
its K candidates when it samples them through generation.sample) on the shipped toy reasoner, on the CPU. The peak
is the process's peak resident memory (VmHWM, reset before each case) above its resident memory before the case;
beside it, the model of that peak used for the extrapolation: KV cache + the prefill's transient activations (one
layer's MLP and attention-block tensors, at most generation.PREFILL_CHUNK_TOKENS rows x positions at once) + the
last position's logits, and measured / model. Without logits_to_keep=1 the prefill would also build R x T x
vocab logits; the "full logits" column says what those would have added.

Part 2 (estimated, not measured): the same model of the peak for DeepSeek-R1-Distill-Qwen-1.5B and -7B in bf16 at a
9,000-token prefix with K = 64 candidates (the r1 profiles), plus the KL-scoring phase (refinement.batch_size = 16 rows
x a 512-token window of bf16 logits, the float32 KL slice, and the prefix cache repeated for 16 rows), and the weights.

Part 3 (arithmetic, not measured): DPO-L training's model state per GPU for each profile's training settings, and the
two reference strategies, from which dpo_l.training_args decides (see training_memory and REFERENCE_DECISION).
    python benchmarks/bench_memory.py --training-only   # part 3 alone, instant
"""

from __future__ import annotations

import argparse
import gc
import re
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


@dataclass
class Arch:
    name: str
    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: float
    bytes_per: int  # bytes per activation / weight element

    def kv_bytes(self, rows: int, tokens: int) -> float:
        """Keys and values of every layer for rows x tokens positions."""
        return rows * tokens * 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per

    def prefill_transient(self, rows: int, tokens: int, chunk_tokens: int) -> float:
        """One layer's live activations in a prefill forward: the MLP's gate, up and act, and the attention block's
        normed input, queries, keys, values, output and residual."""
        width = 3 * self.intermediate + 4 * self.hidden + 2 * self.kv_heads * self.head_dim
        return min(rows * tokens, max(rows, chunk_tokens)) * width * self.bytes_per

    def last_logits(self, rows: int) -> float:
        """The prefill's kept logits plus their float32 copy for sampling."""
        return rows * self.vocab * (self.bytes_per + 4)

    def full_logits(self, rows: int, tokens: int) -> float:
        return rows * tokens * self.vocab * self.bytes_per


# Published configs (config.json) of the two R1-Distill models (Qwen2 architecture)
R1 = {
    "r1-1.5b": Arch("R1-Distill-Qwen-1.5B", 28, 1536, 8960, 2, 128, 151_936, 1.78e9, 2),
    "r1-7b": Arch("R1-Distill-Qwen-7B", 28, 3584, 18944, 4, 128, 152_064, 7.62e9, 2),
}


def _rss_peak_reset() -> int:
    """Reset the peak resident size to the current one (Linux clear_refs 5); return the current resident bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def measure_toy(rows: int, tokens: int, chunk_tokens: int) -> float:
    """Peak resident bytes above the start of one prefill + 4 decode steps of rows x a tokens-long prefix."""
    from tsq_utils.model import generation
    from tsq_utils.model.toy_reasoner import load_reasoner

    model, tok = load_reasoner(REPO / "checkpoints" / "toy-reasoner")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (rows, tokens), generator=g)
    mask = torch.ones_like(ids)
    old = generation.PREFILL_CHUNK_TOKENS
    generation.PREFILL_CHUNK_TOKENS = chunk_tokens
    gc.collect()
    start = _rss_peak_reset()
    try:
        generation._decode(model, {"input_ids": ids, "attention_mask": mask}, generation.Decoding(max_new_tokens=4),
                           eos=-1, stop_hit=None, gen=torch.Generator().manual_seed(1))
    finally:
        generation.PREFILL_CHUNK_TOKENS = old
    return _status("VmHWM") - start


def toy_arch() -> Arch:
    import json

    c = json.loads((REPO / "checkpoints" / "toy-reasoner" / "config.json").read_text())
    return Arch("toy reasoner (fp32)", c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"],
                c["num_key_value_heads"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                c["vocab_size"], 0.0, 4)


# Bytes per parameter of the model state in training. bf16 autocast over fp32 weights (one process, or DDP: every GPU
# whole): fp32 weights 4 + fp32 gradients 4 + AdamW's two fp32 moments 8. DeepSpeed ZeRO with bf16 (our
# configs/accelerate/ds_zero*.json): the model in bf16 2 + gradients accumulated in fp32 4 + fp32 master weights 4 +
# AdamW 8, sharded over the processes (ZeRO-3: all of it; ZeRO-2: all but the bf16 weights).
STATE_BYTES = {"autocast": {"weights": 4, "grads": 4, "master": 0, "adam": 8},
               "deepspeed": {"weights": 2, "grads": 4, "master": 4, "adam": 8}}

# Written down for dpo_l.training_args (issue 23): which reference each profile's notebook-04 training uses.
REFERENCE_DECISION = """\
Reference strategy per profile (the reference is the base model, frozen):
- toy, ci (notebook 04: one epoch): precompute. Scoring every pair once costs one forward per pair, as scoring on the
  fly does over an epoch, but holds no second model and runs length-sorted batches with no padding waste (2.2x less
  CPU than TRL's pass, benchmarks/bench_training.py); with ref_cache a rerun on the same pairs skips it.
- toy notebook 06 rows (48 steps x 8 pairs, fewer than the pairs they draw from): on the fly with a frozen copy
  (a 1M-parameter model: 4 MB). Precomputing all pairs costs n_pairs / (48 x 8) times the forwards the row needs,
  so it pays only when that many trainings share the pairs and the base model (ref_cache then makes it free).
- r1-1.5b (1 GPU, one epoch): precompute. A second model in bf16 would take 3.6 GB beside the 28.5 GB of state
  and a forward per step (a quarter of a checkpointed step's compute); precomputing costs the same forwards once.
- r1-7b (ZeRO-3 on 8 GPUs, one epoch): precompute (DeepSpeed inference engine over the sharded policy before
  training). A second ZeRO-3 model would add 1.9 GB per GPU and an all-gather of its weights every step.
"""


def training_memory(params: float, processes: int, mode: str, stage: int = 0) -> dict[str, float]:
    """Bytes per GPU of the training state (weights, gradients, fp32 master, AdamW) for params parameters."""
    b = STATE_BYTES[mode]
    out = {}
    for key, per in b.items():
        sharded = mode == "deepspeed" and (stage >= 3 or key != "weights")
        out[key] = params * per / (processes if sharded else 1)
    out["total"] = sum(out.values())
    return out


def print_training() -> None:
    """Part 3: the profiles' training state per GPU and the cost of each reference strategy."""
    rows = [("r1-1.5b, 1 GPU (bf16 autocast)", R1["r1-1.5b"], 1, "autocast", 0),
            ("r1-1.5b, 8 GPUs DDP (ddp.yaml)", R1["r1-1.5b"], 8, "autocast", 0),
            ("r1-7b, 8 GPUs ZeRO-3 (zero3.yaml)", R1["r1-7b"], 8, "deepspeed", 3),
            ("r1-7b, 8 GPUs ZeRO-2 (zero2.yaml)", R1["r1-7b"], 8, "deepspeed", 2)]
    print("\nPart 3 (arithmetic, not measured): training state per GPU before activations, and the reference "
          "strategies (GB)")
    print(f"{'profile, layout':<36} {'weights':>8} {'grads':>6} {'master':>7} {'AdamW':>6} {'state':>6} "
          f"{'2nd model (bf16)':>17} {'precompute':>11}")
    for name, arch, n, mode, stage in rows:
        m = training_memory(arch.params, n, mode, stage)
        ref = arch.params * 2 / (n if stage >= 3 else 1)
        print(f"{name:<36} {m['weights'] / GB:>8.1f} {m['grads'] / GB:>6.1f} {m['master'] / GB:>7.1f} "
              f"{m['adam'] / GB:>6.1f} {m['total'] / GB:>6.1f} {ref / GB:>17.1f} {0.0:>11.1f}")
    print("A second model also costs a forward per step: with gradient checkpointing a step is about 4 forward-"
          "equivalents (forward, recomputed forward, backward = 2), so +25% compute; precomputing costs the same "
          "forwards once per dataset, before training, and can be cached across trainings.")
    print(REFERENCE_DECISION)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 960])
    ap.add_argument("--prefix", type=int, default=9000, help="R1 prefix tokens for part 2")
    ap.add_argument("--training-only", action="store_true", help="print part 3 only")
    args = ap.parse_args()
    if args.training_only:
        print_training()
        return
    torch.set_num_threads(1)
    from tsq_utils.model.generation import PREFILL_CHUNK_TOKENS

    a = toy_arch()
    print(f"Part 1 (measured on this CPU): {a.name}, {args.rows} rows continuing one prefix, 4 decode steps")
    print(f"{'prefix':>7} {'chunk':>8} {'measured MB':>12} {'model MB':>9} {'KV MB':>7} {'transient MB':>13} "
          f"{'measured/model':>15} {'full logits would add MB':>25}")
    for t in args.tokens:
        for chunk in (PREFILL_CHUNK_TOKENS, 4096):
            got = measure_toy(args.rows, t, chunk)
            kv, tr = a.kv_bytes(args.rows, t + 4), a.prefill_transient(args.rows, t, chunk)
            lg = a.last_logits(args.rows)
            print(f"{t:>7} {chunk:>8} {got / 1e6:>12.0f} {(kv + tr + lg) / 1e6:>9.0f} {kv / 1e6:>7.0f} "
                  f"{tr / 1e6:>13.0f} "
                  f"{got / (kv + tr + lg):>15.2f} {a.full_logits(args.rows, t) / 1e6:>25.0f}")

    t, k = args.prefix, 64
    print(f"\nPart 2 (estimated from the model above, not measured): one refinement step at a {t:,}-token prefix, "
          f"K = {k} candidates, bf16, chunk {PREFILL_CHUNK_TOKENS:,} rows x positions")
    print(f"{'model':<22} {'weights':>8} {'KV (K rows)':>11} {'prefill':>8} {'sampling peak':>14} {'KL scoring':>11} "
          f"{'step peak':>10} {'full logits (old code)':>23}   (GB)")
    for arch in R1.values():
        w = arch.params * arch.bytes_per
        kv = arch.kv_bytes(k, t + 512)
        tr = arch.prefill_transient(k, t, PREFILL_CHUNK_TOKENS)
        sampling = w + kv + tr + arch.last_logits(k)
        scoring = w + arch.kv_bytes(16, t) + 16 * 512 * arch.vocab * arch.bytes_per + 2**28 * 4
        print(f"{arch.name:<22} {w / GB:>8.1f} {kv / GB:>11.1f} {tr / GB:>8.1f} {sampling / GB:>14.1f} "
              f"{scoring / GB:>11.1f} {max(sampling, scoring) / GB:>10.1f} {arch.full_logits(k, t) / GB:>23.0f}")
    print_training()


if __name__ == "__main__":
    main()
