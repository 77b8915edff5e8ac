"""TLDR logic: benefits, the weight update, the checkpoint rule, the mixture schedule."""

import math

import numpy as np
import pytest

from tsq_utils.config import TLDRConfig
from tsq_utils.tldr import LONG, SHORT, MixtureSchedule, benefits, choose_checkpoint, draw_pools, update_weights

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
