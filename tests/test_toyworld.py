"""The toy world: problems, teacher traces, the oracle, tokenizer, model, pretraining, saving; the shipped reasoner."""

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch

from tsq_utils.task import toy as tw
from tsq_utils.model import toy_reasoner as tr
from tsq_utils.core.config import PretrainConfig, ToyWorldConfig, load_profile, stage_seed

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "checkpoints" / "toy-reasoner"
CFG = ToyWorldConfig()


@pytest.fixture(scope="module")
def tok():
    """A tokenizer trained on 500 teacher documents of the default world (vocab at most 256)."""
    return tr.train_tokenizer(CFG, vocab_size=256, n_docs=500, seed=0)


def tiny_pretrain_config(**kw) -> PretrainConfig:
    """A tiny model config (hidden 32, one layer): fast enough for unit tests."""
    base = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=256, block_size=256,
                batch_size=8, n_tokens=1000, lr=1e-2, warmup_ratio=0.1)
    base.update(kw)
    return PretrainConfig(**base)


def chain_value(question: str) -> int:
    """The arithmetic of a question line, computed independently of ToyProblem: 'Q:a5,b+6,c-3' -> 8."""
    expr = re.sub(r"[a-h]", "", question[2:]).replace(",", "")
    assert re.fullmatch(r"\d+([+-]\d+)*", expr)
    total, pos = 0, 0
    for m in re.finditer(r"([+-]?)(\d+)", expr):
        total = total - int(m.group(2)) if m.group(1) == "-" else total + int(m.group(2))
        pos = m.end()
    assert pos == len(expr)
    return total


# ----------------------------------------------------------------------------- problems


@pytest.mark.parametrize("max_value", [9, 12, 19, 49, 99])
def test_make_problem_property(max_value):
    """Over many seeds and every k: labels in order, operands 1..9, running totals within [0, max_value]."""
    for seed in range(300):
        rng = random.Random(seed)
        for k in range(2, 9):
            p = tw.make_problem(rng, k, max_value)
            assert p.k == k == len(p.terms)
            assert [t.label for t in p.terms] == list("abcdefgh"[:k])
            assert p.terms[0].op == "" and 1 <= p.terms[0].value <= max_value
            assert all(t.op in "+-" and t.op and 1 <= t.value <= 9 for t in p.terms[1:])
            totals = p.totals()
            assert len(totals) == k and all(0 <= v <= max_value for v in totals)
            assert p.answer == totals[-1] == chain_value(p.question)


def test_make_problem_values_and_text():
    p = tw.ToyProblem("x", 3, [tw.Term("a", "", 5), tw.Term("b", "+", 6), tw.Term("c", "-", 3)])
    assert p.question == "Q:a5,b+6,c-3"
    assert p.totals() == [5, 11, 8]
    assert p.answer == 8


def test_make_problem_rejects_bad_k():
    for k in (1, 9):
        with pytest.raises(ValueError, match="k must be in 2..8"):
            tw.make_problem(random.Random(0), k)


def test_make_problem_seeded_and_id():
    a = tw.make_problem(random.Random(3), 5)
    b = tw.make_problem(random.Random(3), 5)
    assert a == b and re.fullmatch(r"toy-5-[0-9a-f]{8}", a.problem_id)
    assert tw.make_problem(random.Random(3), 5, problem_id="mine").problem_id == "mine"


def test_make_problems_seeded_and_k_spread():
    a = tw.make_problems(70, seed=1)
    assert a == tw.make_problems(70, seed=1)
    assert a != tw.make_problems(70, seed=2)
    counts = {k: sum(p.k == k for p in a) for k in range(2, 9)}
    assert counts == {k: 10 for k in range(2, 9)}
    # an n that is not a multiple of the k range: counts differ by at most one
    b = tw.make_problems(23, seed=1, k_min=3, k_max=5)
    counts = [sum(p.k == k for p in b) for k in (3, 4, 5)]
    assert sorted(counts) == [7, 8, 8] and {p.k for p in b} == {3, 4, 5}
    assert all(p.problem_id == f"train-{i:05d}-k{p.k}" for i, p in enumerate(b))


def test_make_problems_respects_max_value():
    for p in tw.make_problems(100, seed=4, max_value=19):
        assert all(0 <= v <= 19 for v in p.totals())


def test_make_problems_rejects_inverted_k_range():
    with pytest.raises(ValueError, match="k_min"):
        tw.make_problems(10, seed=0, k_min=6, k_max=4)


def test_make_problems_splits_are_disjoint():
    splits = {s: tw.make_problems(140, seed=5, split=s) for s in ("train", "heldout", "test")}
    ids = {s: {p.problem_id for p in ps} for s, ps in splits.items()}
    assert all(i.startswith(s + "-") for s, ps in ids.items() for i in ps)
    assert not (ids["train"] & ids["heldout"]) and not (ids["train"] & ids["test"])
    assert not (ids["heldout"] & ids["test"])
    qs = {s: [p.question for p in ps] for s, ps in splits.items()}
    # different streams: the same seed does not give the same problems under another split name
    for a, b in (("train", "heldout"), ("train", "test"), ("heldout", "test")):
        overlap = len(set(qs[a]) & set(qs[b]))
        assert overlap <= 3, (a, b, overlap)  # only the odd short chain can coincide by chance


# ----------------------------------------------------------------------------- parse_question


def test_parse_question_round_trip():
    for p in tw.make_problems(70, seed=8):
        q = tw.parse_question(p.question, p.problem_id)
        assert q == p
        assert q.answer == p.answer


@pytest.mark.parametrize("bad", [
    "a5,b+6",            # no Q: prefix
    "Q:",                # no terms
    "Q:a5",              # one term is not a chain
    "Q:b5,c+6",          # labels must start at a
    "Q:a5,c+6",          # labels must be consecutive
    "Q:a+5,b+6",         # the start has no operator
    "Q:a5,b6",           # later terms need one
    "Q:a5,b*6",
    "Q:a5,b+x",
    "Q:a5,,b+6",
    "Q:a5,b+6,",
    "Q:a5, b+6",
    "Q:a1,b+1,c+1,d+1,e+1,f+1,g+1,h+1,a+1",   # more than 8 terms
    "Q:a1,b+1,c+1,d+1,e+1,f+1,g+1,h+1,i+1",
])
def test_parse_question_rejects_malformed(bad):
    with pytest.raises(ValueError):
        tw.parse_question(bad)


# ----------------------------------------------------------------------------- teacher traces

START = [re.compile(r"a(\d+): (\d+)"), re.compile(r"We start with a(\d+), so the total is (\d+)\.")]
OP = [re.compile(r"([a-h][+-]\d+): (\d+)([+-])(\d+)=(\d+)"),
      re.compile(r"Next is ([a-h][+-]\d+)\. The total was (\d+), and (\d+)([+-])(\d+)=(\d+), so now it is (\d+)\.")]
CHECK = re.compile(r"Wait, let me check ([a-h][+-]\d+): (\d+)([+-])(\d+)=(\d+)\."
                   r"(?: Yes\.| Not (\d+), so the total is (\d+)\.)")
REVIEW = re.compile(r"Let me double-check the whole chain: ([\d+-]+)=(\d+)\.")


def check_trace(p: tw.ToyProblem, text: str) -> dict:
    """Assert the structure of a teacher trace; return counts of what it holds (slips, checks, review, verbose)."""
    answer_part = f"\n</think>\n\nThe answer is \\boxed{{{p.answer}}}."
    assert text.endswith(answer_part)
    assert text.count("</think>") == 1
    thinking = text[: -len(answer_part)]
    steps = thinking.split("\n\n")
    assert all(s and "\n" not in s for s in steps), "steps are non-empty lines separated by blank lines"
    totals = p.totals()
    m = START[0].fullmatch(steps[0]) or START[1].fullmatch(steps[0])
    assert m and int(m.group(1)) == int(m.group(2)) == p.terms[0].value
    info = {"slips": 0, "checks": 0, "review": False, "verbose": int(START[1].fullmatch(steps[0]) is not None)}
    i, term = 1, 1
    while i < len(steps):
        s = steps[i]
        if term < p.k:
            t = p.terms[term]
            m_c, m_v = OP[0].fullmatch(s), OP[1].fullmatch(s)
            assert m_c or m_v, f"step {i} should work on {t.text()}: {s!r}"
            if m_c:
                label, prev, op, v, claimed = m_c.groups()
            else:
                label, prev, prev2, op, v, claimed, claimed2 = m_v.groups()
                assert prev == prev2 and claimed == claimed2
                info["verbose"] += 1
            assert label == t.text() and op == t.op and int(v) == t.value
            # a slip never propagates: each step starts from the true running total
            assert int(prev) == totals[term - 1]
            right = totals[term]
            nxt = steps[i + 1] if i + 1 < len(steps) else ""
            if int(claimed) != right:
                info["slips"] += 1
                # a slip is followed at once by the check that corrects it
                assert nxt == (f"Wait, let me check {t.text()}: {prev}{op}{v}={right}. "
                               f"Not {claimed}, so the total is {right}."), (s, nxt)
            if CHECK.fullmatch(nxt):
                mc = CHECK.fullmatch(nxt)
                assert mc.group(1) == t.text() and int(mc.group(5)) == right
                if int(claimed) == right:
                    assert nxt.endswith(" Yes.")
                info["checks"] += 1
                i += 1
            i += 1
            term += 1
        else:
            mr = REVIEW.fullmatch(s)
            assert mr and i == len(steps) - 1, f"only a final review may follow the last term: {s!r}"
            assert chain_value("Q:" + mr.group(1)) == p.answer == int(mr.group(2))
            info["review"] = True
            i += 1
    assert term == p.k, "every term has its step"
    return info


def test_teacher_trace_structure_property():
    probs = tw.make_problems(140, seed=11)
    seen = {"slips": 0, "checks": 0, "review": 0, "verbose": 0}
    for j, p in enumerate(probs):
        for r in range(10):
            info = check_trace(p, tw.teacher_trace(p, random.Random(j * 100 + r), CFG))
            for key in seen:
                seen[key] += int(info[key])
    # the run exercised every habit
    assert all(v > 0 for v in seen.values()), seen


def test_teacher_trace_with_every_step_a_slip():
    cfg = dataclasses.replace(CFG, p_concise=0.0, p_slip=1.0)
    for j, p in enumerate(tw.make_problems(56, seed=12, max_value=19)):
        info = check_trace(p, tw.teacher_trace(p, random.Random(j), cfg))
        assert info["slips"] == p.k - 1 and info["checks"] == p.k - 1


def test_teacher_trace_without_habits_is_plain():
    cfg = dataclasses.replace(CFG, p_concise=0.0, p_verbose_step=1.0, p_check=0.0, p_slip=0.0, p_review=0.0)
    p = tw.ToyProblem("x", 3, [tw.Term("a", "", 5), tw.Term("b", "+", 6), tw.Term("c", "-", 3)])
    assert tw.teacher_trace(p, random.Random(0), cfg) == (
        "We start with a5, so the total is 5.\n\n"
        "Next is b+6. The total was 5, and 5+6=11, so now it is 11.\n\n"
        "Next is c-3. The total was 11, and 11-3=8, so now it is 8."
        "\n</think>\n\nThe answer is \\boxed{8}."
    )


def test_oracle_trace_value():
    p = tw.ToyProblem("x", 3, [tw.Term("a", "", 5), tw.Term("b", "+", 6), tw.Term("c", "-", 3)])
    assert tw.oracle_trace(p) == "a5: 5\n\nb+6: 5+6=11\n\nc-3: 11-3=8\n</think>\n\nThe answer is \\boxed{8}."
    assert tw.answer_text(8) == "\n</think>\n\nThe answer is \\boxed{8}."


def test_overthinking_traces_open_verbosely():
    """The first step shows the habit, so the first sampled token chooses concise vs overthinking."""
    for j, p in enumerate(tw.make_problems(70, seed=18)):
        trace = tw.teacher_trace(p, random.Random(j), CFG)
        if trace != tw.oracle_trace(p):
            assert trace.startswith(f"We start with a{p.terms[0].value}, so the total is")
        else:
            assert trace.startswith(f"a{p.terms[0].value}: ")


def test_concise_traces_are_the_oracle():
    """The first draw decides the style; a concise trace is exactly the oracle (a final review marks the rest)."""
    cfg = dataclasses.replace(CFG, p_review=1.0)
    for j, p in enumerate(tw.make_problems(70, seed=13)):
        for r in range(6):
            seed = j * 10 + r
            concise = random.Random(seed).random() < cfg.p_concise
            trace = tw.teacher_trace(p, random.Random(seed), cfg)
            assert (trace == tw.oracle_trace(p)) == concise


def test_p_concise_one_gives_the_oracle_always():
    cfg = dataclasses.replace(CFG, p_concise=1.0, p_slip=1.0, p_check=1.0, p_review=1.0, p_verbose_step=1.0)
    for j, p in enumerate(tw.make_problems(35, seed=14)):
        assert tw.teacher_trace(p, random.Random(j), cfg) == tw.oracle_trace(p)


def test_concise_fraction_matches_p_concise():
    probs = tw.make_problems(70, seed=15)
    for p_concise in (0.25, 0.6):
        cfg = dataclasses.replace(CFG, p_concise=p_concise, p_review=1.0)
        rng = random.Random(p_concise)
        n = 4000
        hits = sum(tw.teacher_trace(p, rng, cfg) == tw.oracle_trace(p) for p in (probs[i % 70] for i in range(n)))
        sd = (p_concise * (1 - p_concise) / n) ** 0.5
        assert abs(hits / n - p_concise) < 4 * sd, (p_concise, hits / n)


def test_default_teacher_overthinks_on_average(tok):
    """Overthinking is the majority habit: teacher traces are well over the oracle's length on average."""
    probs = tw.make_problems(70, seed=16)
    rng = random.Random(0)
    oracle = sum(len(tok(tw.oracle_trace(p))["input_ids"]) for p in probs)
    teacher = sum(len(tok(tw.teacher_trace(p, rng, CFG))["input_ids"]) for p in probs)
    assert teacher / oracle > 1.8


def test_oracle_is_the_shortest_trace(tok):
    for j, p in enumerate(tw.make_problems(21, seed=17)):
        oracle = tw.oracle_trace(p)
        o_chars, o_toks = len(oracle), len(tok(oracle)["input_ids"])
        traces = [tw.teacher_trace(p, random.Random(j * 1000 + r), CFG) for r in range(60)]
        assert oracle in traces  # the concise style does occur
        assert min(len(t) for t in traces) == o_chars
        assert min(len(tok(t)["input_ids"]) for t in traces) == o_toks


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tok):
    rng = random.Random(21)
    for _ in range(100):
        p = tw.make_problem(rng, rng.randint(2, 8))
        text = tw.prompt_for(p.question, tok) + tw.teacher_trace(p, rng, CFG) + tok.eos_token
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # whatever the model emits decodes to text that re-encodes to the same text (tokens are counted that way)
    rng = random.Random(22)
    specials = set(tok.all_special_ids)
    plain = [i for i in range(len(tok)) if i not in specials]
    for _ in range(200):
        text = tok.decode([rng.choice(plain) for _ in range(rng.randint(1, 40))])
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_alphabet_is_the_worlds(tok):
    """The BPE alphabet is the teacher's characters only: an unseen character becomes <unk> (a limit, by design)."""
    assert tok.decode(tok("Q:a5,b+6 ✓")["input_ids"]) == "Q:a5,b+6 " + "<unk>" * 3  # one per UTF-8 byte of ✓


def test_tokenizer_numbers_and_separator_are_single_tokens(tok):
    for n in range(CFG.max_value + 1):
        assert len(tok(str(n), add_special_tokens=False)["input_ids"]) == 1, n
        assert len(tok(f" {n}", add_special_tokens=False)["input_ids"]) == 1, n  # as in 'the total is 42'
    assert len(tok("\n\n", add_special_tokens=False)["input_ids"]) == 1
    # inside a step, each number stays one token: 'b+6: 5+6=11' -> b + 6 : 5 + 6 = 11 (no split digits)
    pieces = [tok.decode([i]) for i in tok("b+6: 5+6=11", add_special_tokens=False)["input_ids"]]
    assert "11" in [s.strip() for s in pieces] and "5" in [s.strip() for s in pieces]


def test_tokenizer_specials(tok):
    assert len(tok) <= 256
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<pad>" and tok.eos_token_id != tok.pad_token_id
    for special in ("<think>", "</think>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    text = "<think>\na5: 5\n</think>\n\nThe answer is \\boxed{5}.<|end|>"
    kept = tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
    # <think> and </think> are ordinary added tokens (a trace must keep them); the chat markers are special
    assert kept == "<think>\na5: 5\n</think>\n\nThe answer is \\boxed{5}."
    assert tok.padding_side == "left"


def test_tokenizer_is_seeded():
    a = tr.train_tokenizer(CFG, 128, 300, seed=3)
    b = tr.train_tokenizer(CFG, 128, 300, seed=3)
    assert a.get_vocab() == b.get_vocab()
    assert len(a) <= 128


def test_prompt_for(tok):
    prompt = tw.prompt_for("Q:a5,b+6", tok)
    assert prompt == "<|user|>\nQ:a5,b+6\n<|assistant|>\n<think>\n"
    assert prompt.endswith("<think>\n")


# ----------------------------------------------------------------------------- model


def expected_parameters(vocab: int, c: PretrainConfig) -> int:
    """Closed form for a tied-embedding Llama: embeddings + per layer (q,k,v,o + gate,up,down + 2 norms) + final
    norm."""
    h, inter = c.hidden_size, c.intermediate_size
    return vocab * h + c.num_layers * (4 * h * h + 3 * h * inter + 2 * h) + h


def test_model_config_follows_pretrain_config(tok):
    c = tiny_pretrain_config()
    mc = tr.model_config(tok, c)
    assert (mc.model_type, mc.vocab_size, mc.hidden_size, mc.intermediate_size) == ("llama", len(tok), 32, 64)
    assert (mc.num_hidden_layers, mc.num_attention_heads, mc.num_key_value_heads) == (1, 2, 2)
    assert mc.tie_word_embeddings and mc.pad_token_id == tok.pad_token_id and mc.eos_token_id == tok.eos_token_id


def test_toy_model_has_about_a_million_parameters(tok):
    """The toy profile's model: 4 x 262,400 (layers) + 128 (final norm) + 128 x vocab (tied embeddings).

    That is 1,049,728 + 128 V: 1,079,936 for the shipped tokenizer's 236 tokens, and about 1.08M for any
    tokenizer of the toy world (its BPE saturates near 230-240 tokens, well under the 512 allowed).
    """
    c = load_profile("toy").pretrain
    model = tr.new_model(tok, c, seed=0)
    n = tr.count_parameters(model)
    assert n == expected_parameters(len(tok), c) == 1_049_728 + 128 * len(tok)
    assert expected_parameters(236, c) == 1_079_936
    assert 1.0e6 < n < 1.2e6
    # tied embeddings are counted once
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_new_model_is_seeded(tok):
    c = tiny_pretrain_config()
    a, b, d = tr.new_model(tok, c, 1), tr.new_model(tok, c, 1), tr.new_model(tok, c, 2)
    sa, sb, sd = a.state_dict(), b.state_dict(), d.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])


def batch_loss(model, x, y, pad_id) -> float:
    with torch.no_grad():
        return float(model(input_ids=x, attention_mask=(x != pad_id).long(), labels=y).loss)


def test_pretrain_lowers_the_loss(tok):
    cfg = dataclasses.replace(CFG, k_min=2, k_max=4)
    c = tiny_pretrain_config()
    c.n_tokens = int(tr._estimate_doc_tokens(tok, cfg) * c.batch_size * 20)  # about 20 steps
    model = tr.new_model(tok, c, seed=0)
    # a held-out batch from another seed's stream
    x, y, real = next(tr._batches(tok, cfg, c, seed=999))
    assert real == int((x != tok.pad_token_id).sum())
    assert (y[x == tok.pad_token_id] == -100).all()
    before = batch_loss(model, x, y, tok.pad_token_id)
    log = tr.pretrain(model, tok, cfg, c, seed=0, progress=False)
    after = batch_loss(model, x, y, tok.pad_token_id)
    assert after < before - 0.3, (before, after)
    assert 15 <= log.steps[-1] <= 25
    assert log.tokens[-1] >= c.n_tokens and log.tokens == sorted(log.tokens)
    assert log.loss[-1] < log.loss[0]
    assert max(log.lr) <= c.lr and log.lr[-1] < max(log.lr)  # cosine decay after the warm-up
    assert not model.training


def test_pretrain_masks_the_prompt(tok):
    """The loss covers the completion only: labels are -100 over each document's prompt."""
    c = tiny_pretrain_config()
    x, y, _ = next(tr._batches(tok, CFG, c, seed=1))
    assistant_think = tok("<|assistant|>\n<think>\n", add_special_tokens=False)["input_ids"]
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = next(i for i in range(len(row_x)) if row_x[i:i + len(assistant_think)] == assistant_think)
        n_prompt = start + len(assistant_think)
        assert all(v == -100 for v in row_y[:n_prompt])
        real = [i for i, t in enumerate(row_x) if t != tok.pad_token_id]
        assert row_y[n_prompt:real[-1] + 1] == row_x[n_prompt:real[-1] + 1]
        assert row_x[real[-1]] == tok.eos_token_id or len(real) == c.block_size


# ----------------------------------------------------------------------------- saving and loading


def test_save_and_load_round_trip(tok, tmp_path):
    c = tiny_pretrain_config()
    model = tr.new_model(tok, c, seed=3)
    target = tmp_path / "reasoner"
    manifest = {"seed": 3, "note": "test"}
    tr.save_reasoner(model, tok, target, manifest)
    # saving again over an existing folder replaces it
    tr.save_reasoner(model, tok, target, {**manifest, "again": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reasoner"], "no temp or old folder left behind"
    assert (target / "model.safetensors").exists()
    assert not list(target.glob("*.bin")) and not list(target.glob("*.pt"))
    assert tr.read_manifest(target) == {**manifest, "again": True}
    loaded, tok2 = tr.load_reasoner(target)
    assert not loaded.training
    ids = torch.tensor([tok(tw.prompt_for("Q:a5,b+6", tok) + "a5: 5", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    text = tw.prompt_for("Q:a5,b+6", tok) + tw.oracle_trace(tw.parse_question("Q:a5,b+6"))
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tw.prompt_for("Q:a5,b+6", tok2) == tw.prompt_for("Q:a5,b+6", tok)
    assert len(tok2) == len(tok) and tok2.eos_token_id == tok.eos_token_id and tok2.pad_token_id == tok.pad_token_id


def test_load_reasoner_missing_names_notebook_00(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"notebooks/00_base_model\.ipynb"):
        tr.load_reasoner(tmp_path / "nothing-here")


def test_world_description():
    d = tw.world_description(dataclasses.replace(CFG, k_min=3, k_max=5, max_value=19))
    assert d["k_range"] == [3, 5] and "19" in d["values"]
    habits = ("p_concise", "p_verbose_step", "p_check", "p_slip", "p_review")
    assert d["teacher"] == {k: getattr(CFG, k) for k in habits}


# ----------------------------------------------------------------------------- the shipped reasoner

HELDOUT_BARS = {"greedy_accuracy": (0.9, None), "greedy_over_oracle": (1.8, None),
                "sampled_accuracy": (0.3, 0.85), "mean_cv": (0.3, None)}


def test_shipped_reasoner_matches_config():
    """checkpoints/toy-reasoner is what the toy profile describes, was made from its seed, and reasons."""
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip(f"{SHIPPED.relative_to(REPO)} is absent: train it with notebooks/00_base_model.ipynb "
                    "(toy profile, pretrain.retrain=true) and copy the model folder there")
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from tsq_utils.model.generation import sample

    profile = load_profile("toy")
    # safetensors only: no pickled weights shipped
    assert not [p.name for p in SHIPPED.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    weights = load_file(SHIPPED / "model.safetensors")
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    expected = tr.model_config(tok, profile.pretrain)
    shipped = json.loads((SHIPPED / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "pad_token_id", "eos_token_id"):
        assert shipped[key] == getattr(expected, key), key
    assert shipped["vocab_size"] == len(tok)
    assert weights["model.embed_tokens.weight"].shape == (len(tok), profile.pretrain.hidden_size)
    assert sum(1 for k in weights if k.endswith("self_attn.q_proj.weight")) == profile.pretrain.num_layers

    man = tr.read_manifest(SHIPPED)
    missing = [k for k in ("seed", "pretrain_config", "toyworld_config", "tokens_seen", "wall_time_s", "heldout")
               if k not in man]
    assert not missing, f"toy_manifest.json lacks {missing}"
    assert man["seed"] == stage_seed(profile.seed, "base_model"), "made from the toy profile's seed"
    pre = {k: v for k, v in man["pretrain_config"].items() if k != "retrain"}
    assert pre == {k: v for k, v in dataclasses.asdict(profile.pretrain).items() if k != "retrain"}
    assert man["toyworld_config"] == dataclasses.asdict(profile.toyworld)
    assert isinstance(man["tokens_seen"], int) and man["tokens_seen"] > 0
    assert man["wall_time_s"] > 0
    held = man["heldout"]
    for key, (lo, hi) in HELDOUT_BARS.items():
        assert held[key] >= lo, f"heldout.{key} = {held[key]} is below {lo}"
        if hi is not None:
            assert held[key] <= hi, f"heldout.{key} = {held[key]} is above {hi}"

    model, tok = tr.load_reasoner(SHIPPED)
    probs = [tw.parse_question(q) for q in ("Q:a5,b+6,c-3", "Q:a17,b-4,c+9,d+2", "Q:a30,b+8,c-6,d-9,e+3,f-7")]
    res = sample(model, tok, [tw.prompt_for(p.question, tok) for p in probs], temperature=0, max_new_tokens=400)
    for p, text, reason in zip(probs, (t[0] for t in res.texts), (r[0] for r in res.finish_reasons)):
        assert reason == "stop", text
        assert re.search(r"\n</think>\n\nThe answer is \\boxed\{\d+\}\.$", text), text


def test_shipped_reasoner_was_trained_on_todays_teacher():
    """The shipped manifest's teacher fingerprint equals the current code's: a teacher change needs a retrained
    reasoner."""
    from tsq_utils.core.config import REPO_ROOT, load_profile
    from tsq_utils.task.toy import teacher_fingerprint
    from tsq_utils.model.toy_reasoner import read_manifest

    path = REPO_ROOT / "checkpoints" / "toy-reasoner"
    if not (path / "toy_manifest.json").exists():
        pytest.skip("checkpoints/toy-reasoner is absent")
    assert read_manifest(path)["teacher_fingerprint"] == teacher_fingerprint(load_profile("toy").toyworld)
