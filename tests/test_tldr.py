"""TLDR: the weight update, the checkpoint rule, the schedule, the pools, the sampler and callback, and training."""

import math
import string
from types import SimpleNamespace

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tsq_utils.core.config import ProfileError, TLDRConfig, ToyWorldConfig, load_profile
from tsq_utils.method.tldr import (
    LONG,
    POOL_COLUMNS,
    SHORT,
    MixtureBatchSampler,
    MixtureJob,
    MixtureSchedule,
    ReweightCallback,
    benefits,
    build_pools,
    choose_checkpoint,
    compression_table,
    dev_decoding,
    dev_eval,
    dev_problems,
    draw_pools,
    easy_max_k,
    mixture_dataset,
    oracle_answers,
    reference_points,
    save_model,
    system1_pool,
    system2_pool,
    train_mixture,
    update_weights,
)
from tsq_utils.model.generation import Decoding
from tsq_utils.task.registry import get_task

datasets.disable_progress_bars()

C = 1e-4
REFS = {"t_s": 100.0, "a_s": 0.4, "t_l": 500.0, "a_l": 0.8}


def smooth(x: float, c: float = C) -> float:
    return (1 - c) * x + c / 2


def test_benefits_hand_values_and_clipping():
    # (300 - 100) / 400 = 0.5; (0.8 - 0.7) / 0.4 = 0.25
    assert benefits(300, 0.7, **REFS) == pytest.approx((0.5, 0.25))
    assert benefits(50, 0.9, **REFS) == (0.0, 0.0)  # shorter than T_S, better than A_L: both clipped
    assert benefits(900, 0.0, **REFS) == pytest.approx((2.0, 2.0))  # not capped above
    # T_L < T_S or A_L < A_S: the gaps are absolute values
    assert benefits(300, 0.7, t_s=500, a_s=0.8, t_l=100, a_l=0.4) == pytest.approx((0.0, 0.0))


def test_benefits_coinciding_references():
    with pytest.raises(ValueError, match="T_L = T_S"):
        benefits(300, 0.7, t_s=200, a_s=0.4, t_l=200, a_l=0.8)
    with pytest.raises(ValueError, match="A_L = A_S"):
        benefits(300, 0.7, t_s=100, a_s=0.8, t_l=200, a_l=0.8)
    # with a floor on the gaps: (300 - 200) / 1 and (0.8 - 0.7) / 1
    assert benefits(300, 0.7, t_s=200, a_s=0.8, t_l=200, a_l=0.8, min_gap=1.0) == pytest.approx((100.0, 0.1))


def test_benefits_rejects_percentages_and_nan():
    with pytest.raises(ValueError, match="a_cur"):
        benefits(300, 70.0, **REFS)
    with pytest.raises(ValueError, match="t_cur"):
        benefits(float("nan"), 0.5, **REFS)


def test_update_zero_benefits_is_identity_up_to_smoothing():
    assert update_weights((0.5, 0.5), (0.0, 0.0)) == pytest.approx((0.5, 0.5), abs=1e-15)
    # (0.8, 0.2) -> (1-c)*0.8 + c/2 = 0.8 - 0.3c
    assert update_weights((0.8, 0.2), (0.0, 0.0)) == pytest.approx((0.8 - 0.3 * C, 0.2 + 0.3 * C), abs=1e-15)
    assert update_weights((0.8, 0.2), (0.0, 0.0), smoothing=0.0) == pytest.approx((0.8, 0.2), abs=1e-15)


def test_update_one_positive_benefit():
    # softmax(log 0.5 + 4*0.5, log 0.5) = (e^2, 1) / (e^2 + 1)
    s = math.exp(2) / (math.exp(2) + 1)
    assert update_weights((0.5, 0.5), (0.5, 0.0), eta=4.0) == pytest.approx((smooth(s), smooth(1 - s)), abs=1e-12)
    assert update_weights((0.5, 0.5), (0.0, 0.5), eta=4.0) == pytest.approx((smooth(1 - s), smooth(s)), abs=1e-12)
    # equal benefits cancel in the softmax
    assert update_weights((0.3, 0.7), (1.0, 1.0), eta=4.0, smoothing=0.0) == pytest.approx((0.3, 0.7))
    # from (0.3, 0.7) with b_long = 0.25, eta = 2: (0.3, 0.7 e^0.5) normalised
    z = 0.3 + 0.7 * math.exp(0.5)
    expected = (0.3 / z, 0.7 * math.exp(0.5) / z)
    assert update_weights((0.3, 0.7), (0.0, 0.25), eta=2.0, smoothing=0.0) == pytest.approx(expected)


def test_smoothing_keeps_weights_inside_under_huge_benefits():
    w = (0.5, 0.5)
    for _ in range(50):
        w = update_weights(w, (1e9, 0.0), eta=4.0, smoothing=C)
        assert 0 < w[LONG] < w[SHORT] < 1 and sum(w) == pytest.approx(1.0, abs=1e-12)
    assert w == pytest.approx((1 - C / 2, C / 2), abs=1e-15)
    # and it can still come back: the long pool never reaches exactly 0
    back = update_weights(w, (0.0, 5.0), eta=4.0)
    assert back[LONG] > 0.5


def test_without_smoothing_a_dead_weight_stays_dead():
    w = update_weights((0.5, 0.5), (1e9, 0.0), smoothing=0.0)
    assert w == (1.0, 0.0)
    assert update_weights(w, (0.0, 1e3), smoothing=0.0) == (1.0, 0.0)


def test_update_rejects_bad_weights():
    with pytest.raises(ValueError, match="summing to 1"):
        update_weights((0.5, 0.6), (0, 0))
    with pytest.raises(ValueError, match="two numbers"):
        update_weights((1.0,), (0,))
    with pytest.raises(ValueError, match="smoothing"):
        update_weights((0.5, 0.5), (0, 0), smoothing=2.0)


def test_choose_checkpoint_rule():
    records = [
        {"step": 10, "dev_acc": 0.90, "dev_tokens": 500},
        {"step": 20, "dev_acc": 0.60, "dev_tokens": 300},
        {"step": 30, "dev_acc": 0.56, "dev_tokens": 100},  # exactly 0.7 * 0.8: not above the floor
        {"step": 40, "dev_acc": 0.70, "dev_tokens": 300},  # ties step 20 on tokens, higher accuracy
        {"step": 50, "dev_acc": 0.70, "dev_tokens": 300},  # ties step 40 entirely: the earlier wins
        {"step": 60, "dev_acc": 0.20, "dev_tokens": 10},
    ]
    assert choose_checkpoint(records, a_l=0.8, acc_floor=0.7)["step"] == 40
    assert choose_checkpoint(records, a_l=0.8, acc_floor=0.0)["step"] == 60
    assert choose_checkpoint(records, a_l=0.8, acc_floor=1.0)["step"] == 10  # only 0.9 > 0.8
    assert choose_checkpoint(records[1:], a_l=1.0, acc_floor=0.9) is None
    assert choose_checkpoint([], a_l=0.8) is None
    # a copy: editing it leaves the records alone
    choice = choose_checkpoint(records, a_l=0.8)
    choice["step"] = -1
    assert records[3]["step"] == 40
    with pytest.raises(ValueError, match="dev_tokens"):
        choose_checkpoint([{"step": 1, "dev_acc": 0.9}], a_l=0.8)


def test_draw_pools_proportions_and_determinism():
    a = draw_pools((0.25, 0.75), 20_000, np.random.default_rng(0))
    b = draw_pools((0.25, 0.75), 20_000, np.random.default_rng(0))
    assert np.array_equal(a, b) and set(np.unique(a)) <= {SHORT, LONG}
    assert a.mean() == pytest.approx(0.75, abs=0.01)
    assert (draw_pools((1.0, 0.0), 100, np.random.default_rng(1)) == SHORT).all()
    with pytest.raises(ValueError, match="weights"):
        draw_pools((0.5, 0.6), 3, np.random.default_rng(0))


def test_static_mix_never_reweights():
    cfg = TLDRConfig(update_every=2)
    sched = MixtureSchedule.from_config(cfg, seed=3, static=True, **REFS)
    assert sched.static and not any(sched.is_update_step(s) for s in range(1, 1000))
    for step in range(1, 20):
        assert sched.observe(step, t_cur=900, a_cur=0.0) == (0.5, 0.5)
    hist = sched.history_frame()
    assert len(hist) == 20 and (hist["w_short"] == 0.5).all() and not hist["updated"].iloc[1:].any()
    pools = sched.draw(100, 8)
    assert pools.shape == (100, 8) and pools.mean() == pytest.approx(0.5, abs=0.05)


def test_dynamic_schedule_updates_on_update_steps_only():
    sched = MixtureSchedule(update_every=2, eta=4.0, smoothing=C, seed=0, **REFS)
    assert sched.observe(1, t_cur=300, a_cur=0.8) == (0.5, 0.5)  # not an update step
    w = sched.observe(2, t_cur=300, a_cur=0.8)  # b = (0.5, 0): the short pool gains
    s = math.exp(2) / (math.exp(2) + 1)
    assert w == pytest.approx((smooth(s), smooth(1 - s)), abs=1e-12)
    assert sched.history[-1]["updated"] and sched.history[-1]["b_short"] == pytest.approx(0.5)
    # draws follow the new weights
    assert sched.draw(500, 8).mean() == pytest.approx(smooth(1 - s), abs=0.02)


def test_schedule_draws_are_seeded():
    a = MixtureSchedule(seed=7, **REFS).draw(10, 4)
    b = MixtureSchedule(seed=7, **REFS).draw(10, 4)
    c = MixtureSchedule(seed=8, **REFS).draw(10, 4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_schedule_validates():
    with pytest.raises(ValueError, match="update_every"):
        MixtureSchedule(update_every=0, **REFS)
    with pytest.raises(ValueError, match="T_L = T_S"):
        MixtureSchedule(t_s=100, a_s=0.4, t_l=100, a_l=0.8)
    MixtureSchedule(t_s=100, a_s=0.4, t_l=100, a_l=0.8, min_gap=1.0)  # allowed with a floor


# --------------------------------------------------------------------------- gap floors


def test_benefits_with_a_pair_of_floors():
    # T_L = T_S = 200 floored at 1 token, A_L = A_S = 0.8 floored at 0.125 (one of 8 dev problems)
    assert benefits(203, 0.55, t_s=200, a_s=0.8, t_l=200, a_l=0.8, min_gap=(1.0, 0.125)) == pytest.approx((3.0, 2.0))
    # apart by more than the floors: the floors change nothing
    assert benefits(300, 0.7, min_gap=(1.0, 0.125), **REFS) == pytest.approx(benefits(300, 0.7, **REFS))
    with pytest.raises(ValueError, match="pair"):
        benefits(300, 0.7, min_gap=(1.0, 0.1, 0.1), **REFS)
    with pytest.raises(ValueError, match="positive"):
        benefits(300, 0.7, min_gap=(1.0, 0.0), **REFS)


def test_reference_points_floors_and_flags():
    long, short = {"dev_tokens": 120.0, "dev_acc": 0.9}, {"dev_tokens": 40.0, "dev_acc": 0.6}
    refs = reference_points(long, short, n_dev=10)
    assert (refs["t_s"], refs["a_s"], refs["t_l"], refs["a_l"]) == (40.0, 0.6, 120.0, 0.9)
    assert refs["min_gap"] == [1.0, 0.1] and not refs["token_gap_floored"] and not refs["acc_gap_floored"]
    tie = reference_points(long, {"dev_tokens": 120.0, "dev_acc": 0.9}, n_dev=10)
    assert tie["token_gap_floored"] and tie["acc_gap_floored"]
    with pytest.raises(ValueError, match="T_L = T_S"):
        reference_points(long, {"dev_tokens": 120.0, "dev_acc": 0.5}, n_dev=10, floor_gaps=False)
    assert reference_points(long, short, n_dev=10, floor_gaps=False)["min_gap"] is None
    with pytest.raises(ValueError, match="dev_acc"):
        reference_points(long, {"dev_tokens": 1.0}, n_dev=10)


# --------------------------------------------------------------------------- pools


def _answers(rows):
    """An answers/samples table from (problem_id, k, sample_idx, n_tokens, correct[, finish_reason]) tuples."""
    out = []
    for r in rows:
        pid, k, j, n, ok = r[:5]
        out.append({"problem_id": pid, "k": k, "sample_idx": j, "prompt": f"<{pid}>", "text": f"{pid}/{j}/{n}",
                    "n_tokens": n, "correct": ok, "finish_reason": r[5] if len(r) > 5 else "stop"})
    return pd.DataFrame(out)


def test_system1_pool_keeps_easy_problems_with_their_short_answer():
    short = _answers([("e1", 2, 0, 10, True), ("e2", 3, 0, 14, True), ("e3", 3, 0, 9, False),
                      ("h1", 4, 0, 20, True), ("h2", 6, 0, 30, True)])
    pool = system1_pool(short, easy_max_k=3)
    assert list(pool["problem_id"]) == ["e1", "e2"]  # e3's only answer is wrong; h1, h2 are hard
    assert (pool["pool"] == "short").all() and list(pool["completion"]) == ["e1/0/10", "e2/0/14"]
    assert list(pool["prompt"]) == ["<e1>", "<e2>"] and list(pool["n_tokens"]) == [10, 14]
    assert list(pool.columns) == POOL_COLUMNS


def test_system2_pool_takes_the_shortest_correct_sample_of_hard_problems():
    samples = _answers([
        ("h1", 5, 0, 40, True), ("h1", 5, 1, 20, False), ("h1", 5, 2, 30, True), ("h1", 5, 3, 30, True),
        ("h2", 6, 0, 50, False), ("h2", 6, 1, 35, False),  # no correct sample: not in the pool
        ("h3", 4, 0, 12, True, "length"), ("h3", 4, 1, 25, True),  # an unfinished response never counts
        ("e1", 2, 0, 5, True),  # easy: System-1's business
    ])
    pool = system2_pool(samples, easy_max_k=3).set_index("problem_id")
    assert sorted(pool.index) == ["h1", "h3"]
    assert pool.loc["h1", "n_tokens"] == 30 and pool.loc["h1", "sample_idx"] == 2  # tie on 30: the lower index
    assert pool.loc["h1", "completion"] == "h1/2/30" and pool.loc["h3", "sample_idx"] == 1
    assert (pool["pool"] == "long").all()


def test_build_pools_and_empty_pools():
    short = _answers([("e1", 2, 0, 10, True)])
    samples = _answers([("h1", 5, 0, 40, True), ("e1", 2, 0, 30, True)])
    pools = build_pools(short, samples, easy_max_k=3)
    assert list(pools["pool"]) == ["short", "long"] and list(pools["problem_id"]) == ["e1", "h1"]
    with pytest.raises(ValueError, match="System-2 pool is empty"):
        build_pools(short, _answers([("h1", 5, 0, 40, False)]), easy_max_k=3)
    with pytest.raises(ValueError, match="System-1 pool is empty"):
        build_pools(_answers([("h9", 7, 0, 10, True)]), samples, easy_max_k=3)
    with pytest.raises(ValueError, match="lacks column"):
        system2_pool(samples.drop(columns="correct"), easy_max_k=3)


def test_easy_max_k_and_its_validation():
    toy = load_profile("toy")
    assert easy_max_k(toy) == (toy.toyworld.k_min + toy.toyworld.k_max) // 2
    assert easy_max_k(load_profile("toy", {"tldr.easy_max_k": 3})) == 3
    with pytest.raises(ProfileError, match="easy_max_k"):
        load_profile("toy", {"tldr.easy_max_k": toy.toyworld.k_max})
    assert easy_max_k(load_profile("ci")) == 2  # k 2..3: easy 2, hard 3


@pytest.fixture(scope="module")
def toy_tok():
    from tsq_utils.model.toy_reasoner import train_tokenizer

    return train_tokenizer(ToyWorldConfig(k_min=2, k_max=4, max_value=19), vocab_size=128, n_docs=200, seed=0)


def test_oracle_answers_are_the_oracle_traces(toy_tok):
    from tsq_utils.task.toy import make_problems, oracle_trace, problem_table

    probs = make_problems(6, seed=1, k_min=2, k_max=4, max_value=19, split="train")
    ans = oracle_answers(problem_table(probs, toy_tok), toy_tok, get_task("toy"))
    assert list(ans["problem_id"]) == [p.problem_id for p in probs] and ans["correct"].all()
    assert list(ans["text"]) == [oracle_trace(p) for p in probs]
    assert list(ans["n_tokens"]) == [len(toy_tok(oracle_trace(p), add_special_tokens=False)["input_ids"])
                                     for p in probs]
    assert all(pr.endswith("<think>\n") for pr in ans["prompt"])


def test_dev_problems_are_their_own_split(toy_tok):
    prof = load_profile("ci", {"tldr.n_dev_problems": 10})
    dev = dev_problems(prof, toy_tok)
    assert len(dev) == 10 and dev["problem_id"].str.startswith("dev-").all()
    assert dict(dev["k"].value_counts()) == {2: 5, 3: 5}
    assert dev.equals(dev_problems(prof, toy_tok))  # seeded
    with pytest.raises(ValueError, match="toy world only"):
        dev_problems(load_profile("ci", {"data.train": "gsm8k"}), toy_tok)


# --------------------------------------------------------------------------- the sampler and the callback


def test_sampler_follows_the_current_weights_batch_by_batch():
    sched = MixtureSchedule(update_every=1, seed=0, **REFS)
    labels = [SHORT] * 5 + [LONG] * 3
    sampler = MixtureBatchSampler(labels, batch_size=50, num_batches=40, weights=sched, seed=1)
    it = iter(sampler)
    first = [next(it) for _ in range(20)]
    sched.observe(1, t_cur=300, a_cur=0.8)  # b = (0.5, 0): the short pool gains, read by the very next batch
    rest = list(it)
    log = pd.DataFrame(sampler.log)
    assert (log["w_short"].iloc[:20] == 0.5).all() and (log["w_short"].iloc[20:] == sched.weights[SHORT]).all()
    share_long = lambda batches: np.mean([b >= 5 for batch in batches for b in batch])  # noqa: E731
    assert share_long(first) == pytest.approx(0.5, abs=0.05)
    assert share_long(rest) == pytest.approx(sched.weights[LONG], abs=0.03)
    assert (log["n_short"] + log["n_long"] == 50).all()
    assert log["n_long"].iloc[20:].sum() == sum(b >= 5 for batch in rest for b in batch)


def test_sampler_walks_each_pool_before_repeating_and_validates():
    sampler = MixtureBatchSampler([SHORT] * 4 + [LONG] * 2, batch_size=4, num_batches=2, weights=(1.0, 0.0), seed=0)
    rows = [r for batch in sampler for r in batch]
    assert sorted(rows[:4]) == [0, 1, 2, 3] and sorted(rows[4:]) == [0, 1, 2, 3]  # one pass, then a reshuffled one
    MixtureBatchSampler([SHORT] * 3, batch_size=2, num_batches=1, weights=(1.0, 0.0))  # no long rows, never drawn
    with pytest.raises(ValueError, match="long pool has no rows"):
        MixtureBatchSampler([SHORT] * 3, batch_size=2, num_batches=1, weights=(0.5, 0.5))
    with pytest.raises(ValueError, match="long pool has no rows"):
        MixtureBatchSampler([SHORT] * 3, batch_size=2, num_batches=1, weights=MixtureSchedule(**REFS))
    with pytest.raises(ValueError, match="pool_labels"):
        MixtureBatchSampler([0, 2], batch_size=2, num_batches=1, weights=(0.5, 0.5))


class _Scripted:
    """A dev evaluation that returns scripted numbers per call and remembers the model's weights at each call."""

    def __init__(self, numbers):
        self.numbers, self.calls, self.snapshots = list(numbers), 0, []

    def __call__(self, model):
        self.snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        t, a = self.numbers[self.calls]
        self.calls += 1
        return {"dev_tokens": t, "dev_acc": a}


def _drive(callback, model, max_steps):
    """Call the callback's on_step_end as the trainer would after every optimizer step."""
    for step in range(1, max_steps + 1):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # a different model after every step
        callback.on_step_end(None, SimpleNamespace(global_step=step, max_steps=max_steps), None, model=model)


def test_callback_reweights_on_update_steps_and_keeps_the_chosen_checkpoint():
    sched = MixtureSchedule(update_every=4, seed=0, **REFS)
    # evaluated every 2 steps and after the last (7): steps 2, 4, 6, 7; update steps are 4 only (8 is never reached)
    evaluate = _Scripted([(450, 0.8), (300, 0.8), (200, 0.5), (150, 0.6)])
    cb = ReweightCallback(evaluate, eval_every=2, weights=sched, acc_floor=0.7)
    model = torch.nn.Linear(2, 2)
    _drive(cb, model, max_steps=7)
    rec = pd.DataFrame(cb.records)
    assert list(rec["step"]) == [2, 4, 6, 7] and list(rec["updated"]) == [False, True, False, False]
    s = math.exp(2) / (math.exp(2) + 1)  # at step 4: b = ((300 - 100) / 400, 0) = (0.5, 0)
    assert list(rec["w_short"]) == pytest.approx([0.5, smooth(s), smooth(s), smooth(s)])
    assert rec["b_short"].iloc[2] == pytest.approx(0.25) and rec["b_long"].iloc[2] == pytest.approx(0.75)
    # floor 0.7 * 0.8 = 0.56: steps 2 and 4 qualify, step 7 too (0.6); step 7 has the fewest tokens
    assert cb.best_step == 7
    assert all(torch.equal(cb.best_state[k], evaluate.snapshots[3][k]) for k in cb.best_state)


def test_static_callback_never_reweights_and_fixed_weights_have_no_choice():
    static = MixtureSchedule(update_every=math.inf, seed=0, **REFS)
    cb = ReweightCallback(_Scripted([(450, 0.1)] * 3), eval_every=1, weights=static)
    _drive(cb, torch.nn.Linear(2, 2), max_steps=3)
    assert [r["w_short"] for r in cb.records] == [0.5] * 3 and not any(r["updated"] for r in cb.records)
    assert cb.best_state is None  # accuracy 0.1 never passes the floor
    fixed = ReweightCallback(_Scripted([(40, 0.5)]), eval_every=5, weights=(1.0, 0.0))
    _drive(fixed, torch.nn.Linear(2, 2), max_steps=3)
    assert fixed.records == [{"step": 3, "dev_tokens": 40, "dev_acc": 0.5, "w_short": 1.0, "w_long": 0.0}]
    assert fixed.best_state is None


# --------------------------------------------------------------------------- training on a tiny model

SPECIAL = ["<pad>", "<eos>", "<think>", "</think>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


@pytest.fixture(scope="module")
def tiny():
    vocab = {t: i for i, t in enumerate(SPECIAL + list(CHARS) + ["<unk>"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  additional_special_tokens=["<think>", "</think>"])
    tok.padding_side = "left"
    return tok


def _tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg)


TINY_POOLS = pd.DataFrame({
    "pool": ["short"] * 4 + ["long"] * 3,
    "prompt": [f"Q:a{i},b+1\n<think>\n" for i in range(4)] + [f"Q:a{i},b+1,c+2,d-1\n<think>\n" for i in range(3)],
    "completion": [f"a{i}: {i}\n\nb+1: {i}+1={i + 1}\n</think>\n\n\\boxed{{{i + 1}}}" for i in range(4)]
    + [f"We start with a{i}.\n\nNext b+1.\n\nWait, let me check.\n</think>\n\n\\boxed{{{i + 2}}}" for i in range(3)],
})


def test_training_loop_reweights_records_and_chooses(tiny, tmp_path):
    model = _tiny_model(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TLDRConfig(update_every=2, max_steps=5, batch_size=3, lr=1e-2)
    sched = MixtureSchedule.from_config(cfg, seed=0, **REFS)
    evaluate = _Scripted([(300, 0.8), (250, 0.75), (320, 0.3)])  # steps 2, 4 and the last, 5
    job = MixtureJob(weights=sched, eval_every=cfg.update_every, output_dir=tmp_path / "out", seed=0, progress=False)
    run = train_mixture(model, tiny, TINY_POOLS, cfg, evaluate, job)
    assert list(run.records["step"]) == [2, 4, 5] and list(run.records["updated"]) == [True, True, False]
    assert len(run.batches) == 5 and (run.batches["n_short"] + run.batches["n_long"] == 3).all()
    # the batches of steps 3-4 were drawn with the weights set after step 2, step 5's with those after step 4
    w = run.records.set_index("step")["w_short"]
    assert list(run.batches["w_short"]) == pytest.approx([0.5, 0.5, w[2], w[2], w[4]])
    assert w[2] > 0.5 and w[4] > w[2]  # b = (0.5, 0) at step 2 and (0.375, 0.125) at step 4: short gains twice
    assert run.chosen["step"] == 4  # 250 tokens at 0.75 > 0.56; step 5 fails the floor
    assert all(torch.equal(run.model.state_dict()[k], evaluate.snapshots[1][k]) for k in before)
    assert any(not torch.equal(before[k], evaluate.snapshots[1][k]) for k in before)  # training moved the weights
    assert len(run.log) == 5 and run.log["loss"].notna().all()
    path = save_model(run.model, tiny, tmp_path / "model")
    assert (path / "model.safetensors").exists() and not (tmp_path / "out").exists()


def test_static_training_keeps_one_to_one(tiny, tmp_path):
    cfg = TLDRConfig(update_every=2, max_steps=4, batch_size=4, lr=1e-3)
    static = MixtureSchedule.from_config(cfg, seed=0, static=True, **REFS)
    job = MixtureJob(weights=static, eval_every=2, output_dir=tmp_path / "out", seed=0, progress=False)
    run = train_mixture(_tiny_model(tiny), tiny, TINY_POOLS, cfg, _Scripted([(300, 0.8)] * 2), job)
    assert (run.batches["w_short"] == 0.5).all() and (run.records["w_short"] == 0.5).all()
    assert not run.records["updated"].any() and run.chosen["step"] == 2  # a tie on tokens: the earlier step


def test_dev_decoding_is_one_answer_at_the_dev_temperature():
    p = load_profile("ci", {"tldr.dev_temperature": 0.3})
    spec = dev_decoding(p, 9)
    assert (spec.n, spec.temperature, spec.top_p, spec.max_new_tokens, spec.batch_size, spec.seed) == (
        1, 0.3, 1.0, p.evaluation.max_new_tokens, p.sampling.batch_size, 9)


def test_dev_eval_does_not_move_the_global_rng(tiny):
    model = _tiny_model(tiny)
    dev = pd.DataFrame({"problem_id": ["d0", "d1"], "k": [2, 2], "prompt": ["Q:a1,b+1\n<think>\n"] * 2,
                        "gold": ["2", "3"]})
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    out = dev_eval(model, tiny, dev, get_task("toy"), Decoding(n=1, temperature=1.0, max_new_tokens=6, seed=0))
    assert torch.equal(torch.rand(3), expected)
    assert out["n"] == 2 and 0 <= out["dev_acc"] <= 1 and out["dev_tokens"] > 0


def test_mixture_dataset_validates(tiny):
    ds = mixture_dataset(TINY_POOLS, tiny)
    assert ds["pool"] == [SHORT] * 4 + [LONG] * 3 and ds["prompt"][0] == TINY_POOLS["prompt"][0]
    with pytest.raises(ValueError, match="pool must be one of"):
        mixture_dataset(TINY_POOLS.assign(pool="medium"), tiny)
    with pytest.raises(ValueError, match="empty"):
        mixture_dataset(TINY_POOLS.iloc[:0], tiny)


def test_compression_table():
    idx = pd.MultiIndex.from_tuples([("base", "a"), ("base", "b"), ("tldr", "a"), ("tldr", "b")],
                                    names=["model", "benchmark"])
    table = pd.DataFrame({"acc": [0.8, 0.6, 0.7, 0.6], "len_t": [100, 200, 50, 250], "len_a": [100, 200, 50, 250]},
                         index=idx)
    out = compression_table(table)
    # A.C.R. of tldr: mean(max(0, 1 - 50/100), max(0, 1 - 250/200)) = mean(0.5, 0) = 0.25
    assert out.loc["tldr", "acr"] == pytest.approx(0.25) and out.loc["base", "acr"] == 0.0
    assert out.loc["tldr", "acc"] == pytest.approx(0.65) and out.loc["tldr", "len_a"] == pytest.approx(150)
    with pytest.raises(ValueError, match="no 'orig'"):
        compression_table(table, base="orig")
