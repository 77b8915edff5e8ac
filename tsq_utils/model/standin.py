"""A tiny local stand-in for the DeepSeek-R1-Distill models, for offline runs of the GPU profiles on a CPU.

It has the shape the hub path expects of a model folder: a Llama-format causal LM in safetensors, a byte-level
BPE tokenizer (any text encodes), R1's special tokens, and a chat template that, like the newer R1-Distill
templates, opens the thinking block itself (prompts end with "<think>\\n"). It is trained for a few seconds to
answer every prompt in the R1 format, with a short trace that boxes 9 or a longer one that boxes 3, so sampling,
grading (math-verify), selection and the metrics all see both lengths and, on a problem whose answer is 9 or 3,
both grades. It knows no mathematics; it exists so that the real prompt, sampling, grading and metric paths run
end to end without the hub or a GPU:

    python -m tsq_utils.model.standin runs/standin-r1
    TSQ_ALLOW_CPU=1 ./run_all.sh --profile r1-1.5b --only 00,01,05 -p model_override runs/standin-r1 ...   (see README)
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..task.data import R1_INSTRUCTION, r1_prompt
from ..task.format import THINK_CLOSE, THINK_OPEN

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
# The R1-Distill template reduced to a single user turn and an assistant turn; it writes the BOS text itself.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}" + EOS + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + THINK_OPEN + "\n{% endif %}"
)
# The two habits the stand-in learns (completions continue the prompt's "<think>\n"; steps are blank-line separated).
COMPLETIONS = (
    "Let me see.\n\nSo the answer is 9.\n</think>\n\nThe answer is $\\boxed{9}$.",
    "Let me think about this carefully.\n\nFirst, I read the problem again.\n\nWait, let me check the numbers "
    "once more.\n\nSo the answer is 3.\n</think>\n\nThe answer is $\\boxed{3}$.",
)


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE with R1's special tokens and an R1-style chat template (PreTrainedTokenizerFast)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # the full byte alphabet first: every text encodes, whatever a benchmark problem holds
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([R1_INSTRUCTION, *COMPLETIONS, "What is $1+1$? Find the value of $x$."] * 4, trainer)
    # like R1-Distill: EOS doubles as the pad token, and there is no unk (byte-level)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=[USER, ASSISTANT])
    # <think> and </think> are ordinary added tokens, as in R1-Distill: decoding with skip_special_tokens keeps them
    fast.add_tokens([THINK_OPEN, THINK_CLOSE])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _prompts(tokenizer, n: int, rng: random.Random) -> list[str]:
    """Varied R1 prompts (random problem-like text of varied length) so the answer habit ignores the problem."""
    words = ["Find", "the", "value", "of", "$x$", "if", "$2x+3=11$.", "How", "many", "integers", "satisfy",
             "\\frac{1}{2}", "triangle", "area", "is", "What", "sum", "$n$", "?", "Compute", "$\\sqrt{5}$"]
    return [r1_prompt(" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))), tokenizer) for _ in range(n)]


def build_standin(path: str | Path, seed: int = 0, steps: int = 120, hidden_size: int = 64) -> Path:
    """Train the stand-in (seconds on one CPU thread) and save it with its tokenizer into a folder."""
    path = Path(path)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in _prompts(tok, 64, rng)]
    completion_ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in COMPLETIONS]
    model.train()
    for _ in range(steps):
        rows, labels = [], []
        for _ in range(8):
            p_ids, c_ids = rng.choice(prompt_ids), rng.choice(completion_ids)
            rows.append(p_ids + c_ids)
            labels.append([-100] * len(p_ids) + c_ids)  # loss on the completion only
        width = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: build the stand-in into a folder."""
    ap = argparse.ArgumentParser(description="Build the tiny R1 stand-in model folder (a few seconds on CPU).")
    ap.add_argument("path", help="output folder, e.g. runs/standin-r1")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(build_standin(args.path, seed=args.seed))


if __name__ == "__main__":
    main()
