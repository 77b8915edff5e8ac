"""Notebook 06's ablations: rows, cache keys, caching and adoption (expensive stages mocked), tables, paper numbers."""

from __future__ import annotations

import dataclasses
import math
import string
from pathlib import Path

import pandas as pd
import pytest
import torch

import tsq_utils.ablations as A
from tsq_utils.core.artifacts import atomic_write_json, dir_hash, file_hash, load_table, save_table
from tsq_utils.core.config import ProfileError, RefinementConfig, SelectionConfig, load_profile, stage_seed
from tsq_utils.core.fingerprint import package_hash
from tsq_utils.method import refinement

# --------------------------------------------------------------------------- fixtures


def _samples() -> pd.DataFrame:
    """Three training problems x 4 graded samples: lengths and grades chosen so that every variant has pairs."""
    spec = {  # problem: (k, [(n_tokens, correct), ...])
        "p0": (2, [(10, True), (14, True), (20, False), (25, False)]),
        "p1": (3, [(12, True), (30, False), (8, False), (40, True)]),
        "p2": (3, [(5, True), (6, True), (7, True), (9, False)]),
    }
    rows = []
    for pid, (k, samples) in spec.items():
        for i, (n, ok) in enumerate(samples):
            rows.append(dict(problem_id=pid, k=k, sample_idx=i, prompt=f"Q {pid}\n<think>\n",
                             text=f"{pid} text {i} ({n})",
                             n_tokens=n, n_think_tokens=n - 3, correct=ok, status="correct" if ok else "wrong",
                             finish_reason="stop", gold="7"))
    return pd.DataFrame(rows)


@pytest.fixture
def prof():
    p = load_profile("ci")
    p.workers = 1  # the fakes below count calls in this process: no worker processes
    return p


def make_ctx(run_dir: Path, prof) -> A.AblationContext:
    problems = {"toy": pd.DataFrame({"problem_id": [f"e{i}" for i in range(4)], "k": [2, 3, 2, 3],
                                     "prompt": [f"q{i}" for i in range(4)], "gold": ["1", "2", "3", "4"]})}
    ctx = A.AblationContext(profile=prof, run_dir=run_dir, samples=_samples(), samples_sha="s" * 64,
                            base_hashes={"base_model": "b" * 64, "base_weights": "w" * 64}, tokenizer=None,
                            problems=problems, eval_n=2, device="cpu", grader="toy")
    ctx._base_model = "BASE"  # never load a model: the stages that would use it are mocked
    return ctx


@pytest.fixture
def ctx(tmp_path, prof):
    return make_ctx(tmp_path / "runs" / "ci", prof)


def row(ctx, **kw) -> A.Row:
    return A.make_row(ctx.profile, "x/y", "x", **kw)


def keys(ctx, **kw) -> dict:
    return A.row_keys(ctx, row(ctx, **kw))


class Fakes:
    """Stand-ins for the expensive stages (refine_pairs, rethreshold, dpo_l.train_and_save, evaluation.evaluate_model,
    the base model's loading) that count their calls."""

    def __init__(self, monkeypatch, fail_train: bool = False):
        from tsq_utils.method import dpo_l, evaluation, refinement
        from tsq_utils.model import base_model

        self.refine, self.rethreshold_eps, self.train, self.eval = [], [], [], []
        self.fail_train = fail_train
        monkeypatch.setattr(refinement, "refine_pairs", self.refine_pairs)
        monkeypatch.setattr(refinement, "rethreshold", self.rethreshold)
        monkeypatch.setattr(base_model, "load_base", lambda run_dir, profile: ("FRESH BASE", "TOK"))
        monkeypatch.setattr(dpo_l, "train_and_save", self.train_and_save)
        monkeypatch.setattr(evaluation, "evaluate_model", self.evaluate_model)
        monkeypatch.setattr(A.runner, "_eval_model", lambda ctx, model_dir: "BASE" if model_dir is None else model_dir)

    def refine_pairs(self, model, tokenizer, pairs, cfg, seed, grade_fn_factory=None, progress=True, **kw):
        self.refine.append({"epsilon": cfg.epsilon, "enabled": cfg.enabled, "seed": seed, "model": model})
        out = pairs.copy()
        out["chosen_original"], out["chosen_tokens_original"] = pairs["chosen"], pairs["chosen_tokens"]
        out["chosen"] = pairs["chosen"] + " (refined)"
        out["chosen_tokens"] = pairs["chosen_tokens"] - 1
        out["refined"], out["reverted"] = True, False
        log = pd.DataFrame({"accepted": [True, False], "orig_tokens": [4, 6], "final_tokens": [3, 6],
                            "skipped": ["", ""],
                            "kl": [[0.1, float("nan")], [0.2]], "cand_texts": [["a", "bb"], ["c"]],
                            "cand_tokens": [[1, 5], [1]]})
        return out, log

    def rethreshold(self, tokenizer, pairs, step_log, cfg, grade_fn_factory=None, **kw):
        self.rethreshold_eps.append(cfg.epsilon)
        out, _ = self.refine_pairs(None, tokenizer, pairs, cfg, 0)
        self.refine.pop()
        out["chosen"] = out["chosen"] + f" at {cfg.epsilon:g}"  # the kept candidates depend on ε
        return out, step_log

    def train_and_save(self, model, tokenizer, pairs, cfg, stage_dir, run, model_subdir="model"):
        seed, device, max_steps, progress = run.seed, run.device, run.max_steps, run.progress
        if self.fail_train:
            raise RuntimeError("training blew up")
        self.train.append({"cfg": cfg, "seed": seed, "pairs": len(pairs), "chosen": list(pairs["chosen"]),
                           "model": model, "device": device, "max_steps": max_steps, "progress": progress})
        (stage_dir / model_subdir).mkdir(parents=True)
        (stage_dir / model_subdir / "weights.txt").write_text(f"{cfg.eta} {cfg.lam} {seed}")
        return pd.DataFrame({"loss": [1.0, 0.5], "dpo_l_loss": [1.2, 0.7], "sft_loss": [0.8, 0.3]},
                            index=pd.Index([1, 2], name="step"))

    @staticmethod
    def results(problems: dict, n: int, name: str) -> pd.DataFrame:
        """Problems e0..e3 x n responses: correct when (i + j) is even, length 10 + i + j."""
        probs = problems["toy"]
        rows = [dict(problem_id=p, k=k, sample_idx=j, correct=(i + j) % 2 == 0, n_tokens=10 + i + j, model=name,
                     benchmark="toy")
                for i, (p, k) in enumerate(zip(probs["problem_id"], probs["k"])) for j in range(n)]
        return pd.DataFrame(rows)

    def evaluate_model(self, name, model, tokenizer, problems, spec, run):
        assert not run.progress and run.workers == 1  # 06 runs rows side by side, each evaluation in one process
        self.eval.append(model)
        return self.results(problems, spec.n, name)


# --------------------------------------------------------------------------- rows


def test_table_rows_follow_the_paper(prof):
    rows = {r.name: r for r in A.table_rows(prof)}
    assert [n for n in rows if n.startswith("table2/")] == ["table2/shortest", "table2/q_fix", "table2/q_dyn",
                                                             "table2/q_dyn_extra"]
    for n in ("shortest", "q_fix", "q_dyn", "q_dyn_extra"):
        r = rows[f"table2/{n}"]
        assert r.selection.variant == n and r.refine == "off" and not r.refinement.enabled
        assert r.objective == "dpo_l_sft" and r.training == prof.training
    assert rows["table3/none"].refine == "off"
    assert rows["table3/kl"].refinement.enabled and rows["table3/kl"].refinement.epsilon == prof.refinement.epsilon
    assert rows["table3/no_kl"].refinement.enabled and math.isinf(rows["table3/no_kl"].refinement.epsilon)
    # the objectives: L = eta * DPO-L + (1 - eta) * SFT, lam the weight of the length margin
    t = {n.split("/")[1]: rows[n].training for n in rows if n.startswith("table4/")}
    assert (t["dpo"].eta, t["dpo"].lam) == (1.0, 0.0)
    assert t["sft"].eta == 0.0
    assert (t["dpo_sft"].eta, t["dpo_sft"].lam) == (prof.training.eta, 0.0)
    assert t["dpo_l_sft"] == prof.training and (t["dpo_l_sft"].eta, t["dpo_l_sft"].lam) == (0.5, 1.0)
    assert all(rows[n].refine == "kl" for n in rows if n.startswith("table4/"))
    assert rows["base"].is_base and rows["base"].group == "base"


def test_sweeps_add_the_profiles_value_and_no_kl(prof):
    rows = {r.name: r for r in A.sweep_rows(prof)}  # ci: alphas [0.5], epsilons [0.05], etas [0.75]
    assert [n for n in rows if n.startswith("alpha/")] == ["alpha/0.2", "alpha/0.5"]
    assert rows["alpha/0.5"].selection.alpha == 0.5 and rows["alpha/0.5"].refine == "off"
    assert [n for n in rows if n.startswith("epsilon/")] == ["epsilon/0.005", "epsilon/0.05", "epsilon/inf"]
    assert rows["epsilon/0.05"].refinement.epsilon == 0.05 and rows["epsilon/inf"].refine == "no_kl"
    assert rows["sign/+1"].training.length_margin_sign == 1 and rows["sign/-1"].training.length_margin_sign == -1
    assert [rows[n].training.eta for n in rows if n.startswith("eta/")] == [0.5, 0.75]
    assert [r.x for r in A.sweep_rows(prof) if r.group == "alpha"] == [0.2, 0.5]


def test_headline_rows_get_every_seed_and_selection_by_name_or_group(prof):
    rows = A.build_rows(prof, seeds=3, headline=["table4/dpo", "table2"])
    seeds = pd.DataFrame([(r.name, r.seed) for r in rows], columns=["name", "seed"]).groupby("name")["seed"].apply(list)
    assert seeds["table4/dpo"] == [0, 1, 2] and seeds["table2/q_fix"] == [0, 1, 2]
    assert seeds["table4/sft"] == [0] and seeds["base"] == [0]
    picked = A.select_rows(rows, ["table4/dpo", "alpha"])
    assert sorted({r.name for r in picked}) == ["alpha/0.2", "alpha/0.5", "table4/dpo"]
    assert len([r for r in picked if r.name == "table4/dpo"]) == 3
    assert A.select_rows(rows, None) == rows
    with pytest.raises(ValueError, match="table9"):
        A.select_rows(rows, ["table9"])
    with pytest.raises(ValueError, match="headline"):
        A.build_rows(prof, headline=["nope"])
    with pytest.raises(ValueError, match="seeds"):
        A.build_rows(prof, seeds=0)


@pytest.mark.parametrize("kw, msg", [
    (dict(refine="maybe"), "refine"), (dict(objective="ppo"), "objective"), (dict(variant="longest"), "variant"),
    (dict(alpha=1.5), "alpha"), (dict(eta=-0.1), "eta"), (dict(length_margin_sign=0), "length_margin_sign"),
    (dict(epsilon=-1.0), "epsilon"), (dict(seed=-1), "seed"),
])
def test_make_row_rejects_bad_values(prof, kw, msg):
    with pytest.raises(ValueError, match=msg):
        A.make_row(prof, "x/y", "x", **kw)


def test_make_row_takes_the_fields_of_row_change_only(prof):
    """make_row's changes are RowChange's fields: a misspelt one is refused, not silently dropped."""
    with pytest.raises(TypeError, match="alpah"):
        A.make_row(prof, "x/y", "x", alpah=0.3)
    r = A.make_row(prof, "alpha/0.3", "a", **dataclasses.asdict(A.RowChange(variant="q_dyn", alpha=0.3, x=0.3)))
    assert (r.selection.variant, r.selection.alpha, r.x, r.seed, r.refine) == ("q_dyn", 0.3, 0.3, 0, "kl")


def test_profile_ablations_section_is_validated():
    with pytest.raises(ProfileError, match="ablations.alphas"):
        load_profile("ci", {"ablations.alphas": [0.1, 1.5]})
    with pytest.raises(ProfileError, match="ablations.epsilons"):
        load_profile("ci", {"ablations.epsilons": [-0.1]})
    with pytest.raises(ProfileError, match="ablations.headline"):
        load_profile("ci", {"ablations.headline": [""]})
    with pytest.raises(ProfileError, match="ablations.seeds"):
        load_profile("ci", {"ablations.seeds": 0})
    assert load_profile("toy").ablations.seeds >= 3


# --------------------------------------------------------------------------- cache keys


def test_same_inputs_same_keys(ctx, tmp_path, prof):
    other = make_ctx(tmp_path / "elsewhere", load_profile("ci"))
    for r in A.build_rows(prof):
        assert A.row_keys(ctx, r) == A.row_keys(other, r)  # the run folder is not an input
    assert A.cache_key({"a": 0, "b": [1, 2]}) == A.cache_key({"b": (1.0, 2.0), "a": 0.0})
    assert A.cache_key({"e": math.inf}) != A.cache_key({"e": 1e308})


def test_a_changed_input_changes_its_stage_and_everything_after(ctx):
    k = keys(ctx)
    assert set(k) == {"pairs", "scored", "refined", "model", "results"}
    a = keys(ctx, alpha=0.3)
    assert all(a[s] != k[s] for s in k)
    e = keys(ctx, epsilon=0.05)
    assert (e["pairs"], e["scored"]) == (k["pairs"], k["scored"])  # ε only decides which candidates are kept
    assert all(e[s] != k[s] for s in ("refined", "model", "results"))
    o = keys(ctx, objective="dpo")
    assert (o["pairs"], o["refined"]) == (k["pairs"], k["refined"]) and o["model"] != k["model"] != o["results"]
    s = keys(ctx, seed=1)
    assert s["refined"] == k["refined"] and s["model"] != k["model"]
    assert keys(ctx, length_margin_sign=1)["model"] != k["model"]
    assert keys(ctx, eta=0.75)["model"] != k["model"]
    ctx2 = dataclasses.replace(ctx, samples_sha="t" * 64)
    assert all(keys(ctx2)[s] != k[s] for s in k)
    ctx3 = dataclasses.replace(ctx, base_hashes={"base_model": "b" * 64, "base_weights": "v" * 64})
    b = keys(ctx3)
    assert b["pairs"] == k["pairs"] and all(b[s] != k[s] for s in ("scored", "refined", "model", "results"))
    ctx4 = dataclasses.replace(ctx, eval_n=3)
    n = keys(ctx4)
    assert all(n[s] == k[s] for s in ("pairs", "scored", "refined", "model")) and n["results"] != k["results"]
    ctx5 = dataclasses.replace(ctx, max_steps=5)
    assert keys(ctx5)["refined"] == k["refined"] and keys(ctx5)["model"] != k["model"]
    p6 = dataclasses.replace(ctx.profile, ablations=dataclasses.replace(ctx.profile.ablations, batch_size=2, lr=0.125))
    r6 = A.make_row(p6, "x/y", "x")
    assert r6.training.batch_size == 2 != ctx.profile.training.batch_size
    assert r6.training.lr == 0.125 != ctx.profile.training.lr
    b6 = A.row_keys(ctx, r6)
    assert b6["refined"] == k["refined"] and b6["model"] != k["model"]
    r = row(ctx)
    r.refinement = dataclasses.replace(r.refinement, n_candidates=r.refinement.n_candidates + 1)
    assert A.row_keys(ctx, r)["scored"] != k["scored"] and A.row_keys(ctx, r)["refined"] != k["refined"]


def test_irrelevant_changes_keep_the_key(ctx):
    # selection: alpha does not matter to Shortest; q_dyn with alpha 0 is Shortest (q = 0 gives k = 1)
    assert keys(ctx, variant="shortest", alpha=0.3) == keys(ctx, variant="shortest", alpha=0.9)
    assert keys(ctx, variant="q_dyn", alpha=0.0, refine="off") == keys(ctx, variant="shortest", refine="off")
    r1, r2 = row(ctx, variant="q_dyn"), row(ctx, variant="q_dyn")
    r2.selection = dataclasses.replace(r2.selection, q_fix=0.9)
    assert A.row_keys(ctx, r1) == A.row_keys(ctx, r2)
    r3, r4 = row(ctx, variant="q_fix", alpha=0.1), row(ctx, variant="q_fix", alpha=0.7)
    assert A.row_keys(ctx, r3) == A.row_keys(ctx, r4)
    # refinement: epsilon does not matter without refinement; the no-KL rewrite is epsilon = inf
    assert keys(ctx, refine="off", epsilon=0.05) == keys(ctx, refine="off")
    assert keys(ctx, refine="kl", epsilon=math.inf) == keys(ctx, refine="no_kl")
    # training: SFT (eta = 0) reads none of beta, lam, s; with lam = 0 the sign plays no part
    sft_a, sft_b = row(ctx, objective="sft"), row(ctx, objective="sft", length_margin_sign=1)
    sft_b.training = dataclasses.replace(sft_b.training, lam=3.0, beta=0.5)
    assert A.row_keys(ctx, sft_a) == A.row_keys(ctx, sft_b)
    assert keys(ctx, objective="dpo", length_margin_sign=1) == keys(ctx, objective="dpo", length_margin_sign=-1)
    # evaluation: the AUC budget only enters the metrics, not the results
    p2 = dataclasses.replace(ctx.profile, evaluation=dataclasses.replace(ctx.profile.evaluation, budget=999))
    assert A.row_keys(dataclasses.replace(ctx, profile=p2), row(ctx)) == keys(ctx)
    # the base row depends on the base model and the evaluation only
    base = A.make_row(ctx.profile, "base", "b", refine="off", objective="none")
    assert set(A.row_keys(ctx, base)) == {"results"}
    assert A.row_keys(ctx, base) == A.row_keys(ctx, dataclasses.replace(base, selection=row(ctx, alpha=0.9).selection))


def test_every_key_covers_the_code(ctx, monkeypatch):
    """An edit to tsq_utils gives every entry a new key: nothing computed by the old code is reused."""
    k = A.row_keys(ctx, row(ctx))
    base = A.make_row(ctx.profile, "base", "b", refine="off", objective="none")
    kb = A.row_keys(ctx, base)
    monkeypatch.setattr(A.cache_keys, "package_hash", lambda: "edited" * 10)
    k2, kb2 = A.row_keys(ctx, row(ctx)), A.row_keys(ctx, base)
    assert set(k2) == set(k) and all(k2[s] != k[s] for s in k) and kb2["results"] != kb["results"]


def test_selection_keys_follow_the_variant_registry(ctx, monkeypatch):
    """Each variant's pairs key reads exactly the knobs its registry entry declares, so a new variant that reads
    alpha gets one entry per alpha (before: selection_params encoded the knobs by hand, and a new variant shared one
    entry across alpha)."""
    from tsq_utils.method import selection

    def pairs_key(**sel):
        r = row(ctx, refine="off")
        r.selection = SelectionConfig(**{**dataclasses.asdict(r.selection), **sel})
        return A.row_keys(ctx, r)["pairs"]

    monkeypatch.setitem(selection.REGISTRY, "q_alpha_fix", selection.Variant(
        "q_alpha_fix", ("alpha", "q_fix"), lambda k, p: min(1.0, k["q_fix"] + k["alpha"] * p)))
    assert pairs_key(variant="q_alpha_fix", alpha=0.1) != pairs_key(variant="q_alpha_fix", alpha=0.3)
    assert pairs_key(variant="q_alpha_fix", q_fix=0.1) != pairs_key(variant="q_alpha_fix", q_fix=0.3)
    assert (pairs_key(variant="q_alpha_fix", extra_neg_ratio=2.0)
            == pairs_key(variant="q_alpha_fix", extra_neg_ratio=3.0))
    # the existing variants keep reading what they read: q_fix shares one entry across alpha, q_dyn does not
    assert pairs_key(variant="q_fix", alpha=0.1) == pairs_key(variant="q_fix", alpha=0.3)
    assert pairs_key(variant="q_dyn", alpha=0.1) != pairs_key(variant="q_dyn", alpha=0.3)
    # and it selects with its quantile: q = q_fix + alpha * p
    pairs, stats = selection.select_pairs(ctx.samples, variant="q_alpha_fix", alpha=0.5, q_fix=0.25, seed=0)
    p0 = stats.set_index("problem_id").loc["p0"]
    assert p0["q"] == 0.25 + 0.5 * 0.5 and p0["n_pos"] == 1  # ceil(0.5 * 2) = 1


def test_selection_params_of_the_existing_variants_are_unchanged():
    """The registry gives the very payloads the hand-written selection_params gave (the toy pairs are unchanged)."""
    def sp(**kw):
        knobs = {"max_pairs": 7, "alpha": 0.2, "q_fix": 0.3, "extra_neg_ratio": 2.0}
        return A.selection_params(SelectionConfig(**{**knobs, **kw}))

    assert sp(variant="shortest") == {"variant": "shortest", "max_pairs": 7}
    assert sp(variant="q_fix") == {"variant": "q_fix", "max_pairs": 7, "q_fix": 0.3}
    assert sp(variant="q_dyn") == {"variant": "q_dyn", "max_pairs": 7, "alpha": 0.2}
    assert sp(variant="q_dyn", alpha=0.0) == {"variant": "shortest", "max_pairs": 7}
    assert sp(variant="q_dyn_extra") == {"variant": "q_dyn_extra", "max_pairs": 7, "alpha": 0.2, "extra_neg_ratio": 2.0}
    assert sp(variant="q_dyn_extra", alpha=0.0) == {"variant": "q_dyn_extra", "max_pairs": 7, "alpha": 0.0,
                                                    "extra_neg_ratio": 2.0}
    with pytest.raises(ValueError, match="unknown selection variant 'nope'"):
        sp(variant="nope")


def test_shared_rows_have_equal_keys(prof, ctx):
    rows = {(r.name, r.seed): r for r in A.build_rows(prof)}
    k = {n: A.row_keys(ctx, r) for n, r in rows.items()}
    assert k[("table2/q_dyn", 0)] == k[("table3/none", 0)] == k[("alpha/0.2", 0)]
    assert (k[("table3/kl", 0)] == k[("table4/dpo_l_sft", 0)] == k[("epsilon/0.005", 0)] == k[("sign/-1", 0)]
            == k[("eta/0.5", 0)])
    assert k[("table3/no_kl", 0)] == k[("epsilon/inf", 0)]
    assert k[("table4/dpo", 0)]["refined"] == k[("table3/kl", 0)]["refined"]
    assert k[("table4/dpo", 1)]["model"] != k[("table4/dpo", 0)]["model"]
    assert A.train_seed(prof, 0) == stage_seed(prof.seed, "training") != A.train_seed(prof, 1)


# --------------------------------------------------------------------------- caching


def test_a_cached_row_is_not_recomputed(monkeypatch, ctx):
    f = Fakes(monkeypatch)
    r = row(ctx)
    first = A.run_row(ctx, r)
    assert set(first["sources"].values()) == {"computed"}
    assert (len(f.refine), len(f.train), len(f.eval)) == (1, 1, 1)
    assert f.refine[0]["model"] == "BASE" and f.refine[0]["seed"] == stage_seed(ctx.profile.seed, "refinement")
    assert math.isinf(f.refine[0]["epsilon"]) and f.rethreshold_eps == [ctx.profile.refinement.epsilon]
    assert f.train[0]["seed"] == stage_seed(ctx.profile.seed, "training")
    # notebook 04's training function, quiet, on a freshly loaded base model, for the ablation's step budget
    assert f.train[0]["model"] == "FRESH BASE" and f.train[0]["progress"] is False
    assert f.train[0]["max_steps"] is None and f.train[0]["device"] == ctx.device
    # notebook 05's evaluation function, its results named by the cache key
    res = load_table(ctx.cache_dir / first["keys"]["results"] / "results.parquet")
    assert set(res["model"]) == {first["keys"]["results"]} and len(res) == 4 * ctx.eval_n
    assert all(c.endswith(f"(refined) at {ctx.profile.refinement.epsilon:g}") for c in f.train[0]["chosen"])
    second = A.run_row(ctx, r)
    assert set(second["sources"].values()) == {"cached"} and (len(f.refine), len(f.train), len(f.eval)) == (1, 1, 1)
    for stage, key in first["keys"].items():
        meta = (ctx.cache_dir / key / A.CACHE_META).read_text()
        assert f'"kind": "{stage}"' in meta and '"source": "computed"' in meta


def test_rows_share_their_common_prefix(monkeypatch, ctx, prof):
    f = Fakes(monkeypatch)
    out = A.run_rows(ctx, ["table3", "table4/dpo", "alpha", "epsilon/inf"], progress=False)
    # table3: none (refine off), kl, no_kl; table4/dpo (2 seeds on ci); alpha 0.2 (= table3/none) and 0.5;
    # eps inf (= no_kl)
    assert len(out) == 3 + 2 + 2 + 1
    assert [c["epsilon"] for c in f.refine] == [math.inf]  # one scoring run serves every ε
    assert f.rethreshold_eps == [prof.refinement.epsilon, math.inf]  # once per distinct ε
    # none, kl, no_kl, dpo x 2 seeds; alpha 0.5 picks the same pairs as alpha 0.2 here (one positive per problem)
    assert len(f.train) == 5 and len(f.eval) == 5
    dpo = [t for t in f.train if t["cfg"].eta == 1.0]
    assert [t["cfg"].lam for t in dpo] == [0.0, 0.0] and len({t["seed"] for t in dpo}) == 2
    shared = out.set_index(["name", "seed"])
    assert set(shared.loc[("alpha/0.2", 0)].dropna()) == {"cached"}
    assert shared.loc[("epsilon/inf", 0), "refined"] == "cached"
    twin = shared.loc[("alpha/0.5", 0)]
    none_keys = A.row_keys(ctx, next(r for r in A.build_rows(prof) if r.name == "table3/none"))
    assert twin["pairs"] == "computed" and twin["model"] == f"same pairs and settings as {none_keys['model']}"
    assert twin["results"] == f"same model as {none_keys['model']}"
    before = (len(f.refine), len(f.train), len(f.eval))
    again = A.run_rows(ctx, ["table3", "table4/dpo", "alpha", "epsilon/inf"], progress=False)
    assert (again.drop(columns=["name", "seed"]).fillna("cached") == "cached").all().all()
    assert (len(f.refine), len(f.train), len(f.eval)) == before
    plan = A.plan(ctx, A.select_rows(A.build_rows(prof), ["table3", "table4/dpo"]))
    assert plan["to_run"].sum() == 0 and plan.loc["model", "distinct"] == 5


def test_force_recomputes_a_shared_entry_once(monkeypatch, ctx):
    f = Fakes(monkeypatch)
    A.run_rows(ctx, ["table3/kl", "table4/dpo_l_sft"], progress=False)
    assert (len(f.refine), len(f.train)) == (1, 1)
    out = A.run_rows(ctx, ["table3/kl", "table4/dpo_l_sft"], force=True, progress=False)
    assert (len(f.refine), len(f.train)) == (2, 2)  # recomputed once, then reused by the second row
    assert list(out["model"]) == ["computed", "cached"]


def test_a_failing_row_leaves_no_entry_and_the_others_run(monkeypatch, ctx):
    f = Fakes(monkeypatch, fail_train=True)
    with pytest.raises(RuntimeError, match=r"2 of 3 ablation rows failed:[\s\S]*table2/q_fix[\s\S]*training blew up"):
        A.run_rows(ctx, ["base", "table2/q_fix", "table2/shortest"], progress=False)
    k = A.row_keys(ctx, next(r for r in A.build_rows(ctx.profile) if r.name == "table2/q_fix"))
    assert (ctx.cache_dir / k["pairs"]).is_dir() and not (ctx.cache_dir / k["model"]).exists()
    assert not [p for p in ctx.cache_dir.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    assert f.eval == ["BASE"]  # the base row ran


def test_summarize_reads_metrics_from_cached_results(monkeypatch, ctx, prof):
    Fakes(monkeypatch)
    rows = A.select_rows(A.build_rows(prof), ["base", "table4"])
    A.run_rows(ctx, rows, progress=False)
    s = A.summarize(ctx, A.build_rows(prof))
    # rows with the settings of a row that ran share its results: DPO-L + SFT is also Table 3's KL row, ε = 0.005, ...
    assert set(s["name"]) == {"base", "table4/dpo", "table4/sft", "table4/dpo_sft", "table4/dpo_l_sft", "table3/kl",
                              "epsilon/0.005", "sign/-1", "eta/0.5"}
    assert len(s[s["group"] == "table4"]) == 5  # table4/dpo has two seeds on ci
    # the fake results: problems e0..e3 x 2 responses, correct when (i + j) is even, length 10 + i + j
    first = s.iloc[0]
    assert first["acc"] == 0.5 and first["len_t"] == pytest.approx((10 + 12 + 12 + 14) / 4)
    assert first["acc_hard"] == 0.5  # the hard half: k = 3 (e1, e3)
    # its SE is problem-clustered: e1 and e3 each score 1 of 2, so the problem means agree and the SE is 0 (the
    # i.i.d. SE of the four responses would be sqrt(1/3)/2 = 0.289)
    assert first["acc_hard_se"] == 0.0 and first["acc_se"] == 0.0
    assert s.loc[s["name"] == "table4/sft", "n_pairs"].iloc[0] > 0
    assert s.loc[s["name"] == "table4/sft", "tokens_per_step_after"].iloc[0] == pytest.approx(4.5)
    assert s.loc[s["name"] == "table4/sft", "train_steps"].iloc[0] == 2
    assert (A.row_results(ctx, rows)["model"].isin([r.label for r in rows])).all()


def test_hard_half_accuracy_has_the_problem_clustered_se():
    """Hard half = k above the median. Problems a and b (k = 3) answered [1, 1] and [0, 0]: accuracy 0.5, and the SE
    of two problem means 1 and 0, sqrt(2/1 * (1² + 1²)) / 4 = 0.5, where the i.i.d. SE of four responses is 0.289."""
    res = pd.DataFrame({"problem_id": ["a", "a", "b", "b", "c", "c", "d", "d"], "k": [3, 3, 3, 3, 1, 1, 1, 1],
                        "correct": [True, True, False, False, True, False, True, True]})
    acc, se = A.report.hard_half(res)
    assert acc == 0.5 and se == pytest.approx(0.5)
    one = A.report.hard_half(res[res["problem_id"].isin(["a", "c"])])  # a hard half of one problem: no SE
    assert one[0] == 1.0 and math.isnan(one[1])
    assert math.isnan(A.report.hard_half(res.drop(columns="k"))[0])


def test_no_kl_is_epsilon_inf_through_rethreshold(monkeypatch, ctx):
    f = Fakes(monkeypatch)
    A.run_row(ctx, next(r for r in A.build_rows(ctx.profile) if r.name == "table3/no_kl"))
    assert f.refine[0]["enabled"] and math.isinf(f.refine[0]["epsilon"]) and f.rethreshold_eps == [math.inf]


# --------------------------------------------------------------------------- adoption of the pipeline's artifacts


def _stage(run_dir: Path, stage: str, files: dict, manifest: dict) -> None:
    """A fake finished pipeline stage, computed by today's code: its files first, then its manifest."""
    d = run_dir / stage
    d.mkdir(parents=True, exist_ok=True)
    for name, write in files.items():
        write(d / name)
    atomic_write_json(d / "manifest.json",
                      {"stage": stage, "complete": True, "code": {"package": package_hash()}, **manifest})


def test_default_row_adopts_notebooks_02_to_05(monkeypatch, ctx, prof):
    from tsq_utils.method import selection

    f = Fakes(monkeypatch)
    base_inputs = {k: {"sha256": v} for k, v in ctx.base_hashes.items()}
    pc = prof.to_dict()
    pairs, stats = selection.select_pairs(ctx.samples, seed=stage_seed(prof.seed, "selection"))
    _stage(ctx.run_dir, "selection", {"pairs.parquet": lambda p: save_table(pairs, p),
                                      "problem_stats.parquet": lambda p: save_table(stats, p)},
           {"profile_config": pc, "seed": stage_seed(prof.seed, "selection"),
            "inputs": {"samples": {"sha256": ctx.samples_sha}}})
    refined, log = f.refine_pairs(None, None, pairs, prof.refinement, 0)
    f.refine.clear()
    _stage(ctx.run_dir, "refinement", {"refined_pairs.parquet": lambda p: save_table(refined, p),
                                       "step_log.parquet": lambda p: save_table(log, p)},
           {"profile_config": pc, "seed": stage_seed(prof.seed, "refinement"),
            "inputs": {"pairs": {"sha256": file_hash(ctx.run_dir / "selection" / "pairs.parquet")}, **base_inputs}})

    def model_dir(p):
        p.mkdir()
        (p / "weights.txt").write_text("04")

    _stage(ctx.run_dir, "training", {"model": model_dir, "training_log.parquet": lambda p: save_table(
        pd.DataFrame({"step": [1], "loss": [0.3]}), p)},
        {"profile_config": pc, "seed": stage_seed(prof.seed, "training"),
         "inputs": {"pairs": {"sha256": file_hash(ctx.run_dir / "refinement" / "refined_pairs.parquet")},
                    **base_inputs}})
    res05 = pd.concat([f.results(ctx.problems, ctx.eval_n, m) for m in ("base", "tokensqueeze")], ignore_index=True)
    f.eval.clear()
    _stage(ctx.run_dir, "evaluation", {"results.parquet": lambda p: save_table(res05, p)},
           {"profile_config": pc, "seed": stage_seed(prof.seed, "evaluation"),
            "inputs": {"trained_model": {"sha256": dir_hash(ctx.run_dir / "training" / "model")}, **base_inputs}})

    rec = A.run_row(ctx, next(r for r in A.build_rows(prof) if r.name == "table3/kl"))
    assert rec["sources"] == {"pairs": "adopted from notebooks/02_selection.ipynb",
                              "refined": "adopted from notebooks/03_kl_refinement.ipynb",
                              "model": "adopted from notebooks/04_dpo_l_training.ipynb",
                              "results": "adopted from notebooks/05_evaluation.ipynb"}
    assert f.refine == [] and f.train == [] and f.eval == []
    got = load_table(ctx.cache_dir / rec["keys"]["results"] / "results.parquet")
    assert len(got) == len(res05) / 2 and set(got["model"]) == {rec["keys"]["results"]}
    base = A.run_row(ctx, A.make_row(prof, "base", "b", refine="off", objective="none"))
    assert base["sources"]["results"].startswith("adopted")
    # the pipeline's artifacts do not stand in for a row with other settings
    dpo = A.run_row(ctx, next(r for r in A.build_rows(prof) if r.name == "table4/dpo"))
    assert dpo["sources"] == {"pairs": "cached", "refined": "cached", "model": "computed", "results": "computed"}
    # another ε re-thresholds 03's step log: no new scoring run
    eps = A.run_row(ctx, next(r for r in A.build_rows(prof) if r.name == "epsilon/0.05"))
    assert eps["sources"]["pairs"] == "cached" and eps["sources"]["refined"] == "computed"
    assert eps["sources"]["scored"] == "adopted from notebooks/03_kl_refinement.ipynb"
    assert f.refine == [] and f.rethreshold_eps == [0.05]


def test_a_stale_or_mismatched_stage_is_not_adopted(monkeypatch, ctx, prof):
    from tsq_utils.method import selection

    Fakes(monkeypatch)
    pairs, stats = selection.select_pairs(ctx.samples, seed=stage_seed(prof.seed, "selection"))
    manifest = {"profile_config": prof.to_dict(), "seed": stage_seed(prof.seed, "selection"),
                "inputs": {"samples": {"sha256": "other" * 10}}}  # made from another samples table
    _stage(ctx.run_dir, "selection", {"pairs.parquet": lambda p: save_table(pairs, p),
                                      "problem_stats.parquet": lambda p: save_table(stats, p)}, manifest)
    r = row(ctx, refine="off")
    assert A.run_row(ctx, r)["sources"]["pairs"] == "computed"


@pytest.mark.parametrize("code", [None, {"package": "0" * 64}])
def test_a_stage_computed_by_other_code_is_not_adopted(monkeypatch, ctx, prof, code):
    """A manifest without a code fingerprint (an older version) or with another one: its pairs are recomputed."""
    from tsq_utils.method import selection

    Fakes(monkeypatch)
    pairs, stats = selection.select_pairs(ctx.samples, seed=stage_seed(prof.seed, "selection"))
    files = {"pairs.parquet": lambda p: save_table(pairs, p), "problem_stats.parquet": lambda p: save_table(stats, p)}
    manifest = {"profile_config": prof.to_dict(), "seed": stage_seed(prof.seed, "selection"),
                "inputs": {"samples": {"sha256": ctx.samples_sha}}}
    _stage(ctx.run_dir, "selection", files, {**manifest, "code": code})
    r = row(ctx, refine="off")
    assert A.run_row(ctx, r)["sources"]["pairs"] == "computed"
    other = make_ctx(ctx.run_dir.parent / "other", prof)
    _stage(other.run_dir, "selection", files, manifest)  # the same stage, computed by today's code
    assert A.run_row(other, r)["sources"]["pairs"] == "adopted from notebooks/02_selection.ipynb"


# --------------------------------------------------------------------------- tables, paper numbers, findings


def _summary(rows: list[dict]) -> pd.DataFrame:
    base = dict(group="", label="", x=float("nan"), seed=0, benchmark="toy", acc_se=0.05, len_t_se=2.0, len_a=50.0,
                auc=0.3, acc_hard=0.4, acc_hard_se=0.05, n=100, n_pairs=10, chosen_tokens=20.0,
                tokens_per_step_before=float("nan"), tokens_per_step_after=float("nan"), acceptance_rate=float("nan"))
    out = []
    for r in rows:
        d = {**base, **r}
        d["group"] = d["name"].split("/")[0]
        out.append(d)
    return pd.DataFrame(out)


def test_aggregate_table_shape_means_sds_and_paper_columns(prof):
    rows = A.build_rows(prof)
    s = _summary([
        dict(name="base", acc=0.4, len_t=100.0),
        dict(name="table4/dpo", seed=0, acc=0.50, len_t=60.0, auc=0.2),
        dict(name="table4/dpo", seed=1, acc=0.75, len_t=80.0, auc=0.4),
        dict(name="table4/sft", acc=0.6, len_t=90.0),
    ])
    t = A.aggregate(s, "table4", rows, benchmarks=["toy"])
    assert list(t.columns) == list(A.TABLE_COLUMNS)
    assert list(t["name"]) == ["table4/dpo", "table4/sft", "table4/dpo_sft", "table4/dpo_l_sft"]  # full shape
    dpo = t.set_index("name").loc["table4/dpo"]
    assert dpo["n_seeds"] == 2 and dpo["acc"] == pytest.approx(0.625) and dpo["acc_sd"] == pytest.approx(0.1767767)
    assert dpo["len_t"] == 70.0 and dpo["len_t_vs_base_pct"] == pytest.approx(-30.0)
    assert dpo["auc_sd"] == pytest.approx(0.1414214)
    assert (dpo["paper_acc"], dpo["paper_len_t"]) == (0.483, 4300)
    sft = t.set_index("name").loc["table4/sft"]
    assert sft["n_seeds"] == 1 and math.isnan(sft["acc_sd"])
    assert t.set_index("name").loc["table4/dpo_sft", "n_seeds"] == 0
    md = A.table_markdown(t, "T4")
    assert "| DPO | toy | 2 | 62.5 ± 17.7 | 70.0 ± 14.1 |" in md and "48.3 / 4300 / 42.0" in md and "—" in md
    t2 = A.aggregate(s, "table2", rows, benchmarks=["toy"])
    assert len(t2) == 4 and t2["paper_math500_acc"].tolist() == [0.908, 0.922, 0.928, 0.908]
    sweep = A.aggregate(_summary([dict(name="alpha/0.5", x=0.5, acc=0.3, len_t=5.0),
                                  dict(name="alpha/0.2", x=0.2, acc=0.4, len_t=6.0)]), "alpha")
    assert list(sweep["x"]) == [0.2, 0.5]
    with pytest.raises(ValueError, match="unknown group"):
        A.aggregate(s, "table9")


def test_save_tables_writes_csv_and_markdown(tmp_path, prof):
    s = _summary([dict(name="table3/kl", acc=0.5, len_t=40.0, tokens_per_step_after=3.25)])
    paths = A.save_tables({"table3": A.aggregate(s, "table3", A.build_rows(prof))}, tmp_path, A.TITLES)
    assert [p.name for p in paths] == ["table3_refinement.csv", "table3_refinement.md"]
    assert pd.read_csv(paths[0])["tokens_per_step_after"].tolist()[1] == 3.25
    assert "Table 3" in paths[1].read_text() and "3.25" in paths[1].read_text()


def test_paper_constants():
    p = A.PAPER_ABLATIONS.set_index(["row", "benchmark"])
    expect = {  # the papers (docs/method.md): Tables 2-4 (AIME24 acc / Len-T; MATH500 for Table 2) and Table 1's base
        ("table2/shortest", "AIME24"): (0.533, 5960), ("table2/shortest", "MATH500"): (0.908, 1926),
        ("table2/q_fix", "AIME24"): (0.550, 6126), ("table2/q_fix", "MATH500"): (0.922, 2054),
        ("table2/q_dyn_extra", "AIME24"): (0.523, 5666), ("table2/q_dyn_extra", "MATH500"): (0.908, 1742),
        ("table2/q_dyn", "AIME24"): (0.573, 6190), ("table2/q_dyn", "MATH500"): (0.928, 2180),
        ("table3/none", "AIME24"): (0.573, 6190), ("table3/no_kl", "AIME24"): (0.391, 6596),
        ("table3/token_pruning", "AIME24"): (0.544, 6378), ("table3/kl", "AIME24"): (0.575, 5157),
        ("table4/dpo", "AIME24"): (0.483, 4300), ("table4/sft", "AIME24"): (0.560, 5734),
        ("table4/dpo_sft", "AIME24"): (0.570, 5420), ("table4/dpo_l_sft", "AIME24"): (0.575, 5157),
        ("base", "AIME24"): (0.555, 7543), ("base", "MATH500"): (0.928, 3638),
    }
    assert len(p) == len(expect)
    for k, (acc, len_t) in expect.items():
        assert (p.loc[k, "acc"], p.loc[k, "len_t"]) == (acc, len_t), k
    # AUC: Table 1's where reported, else acc * (1 - Len-T / 32768)
    assert p.loc[("table3/kl", "AIME24"), "auc"] == 0.485 and p.loc[("base", "MATH500"), "auc"] == 0.836
    assert p.loc[("table4/dpo", "AIME24"), "auc"] == pytest.approx(0.483 * (1 - 4300 / 32768))
    assert p.loc[("table4/dpo", "AIME24"), "auc_source"] == "implied"
    ours = {r.name for r in A.table_rows(load_profile("ci"))}
    assert set(A.PAPER_ABLATIONS["row"]) - ours == {"table3/token_pruning"}  # TokenSkip has no row of ours


def _two_seeds(name: str, **kw) -> list[dict]:
    """Two training seeds of a row: kw gives each metric as a pair (seed 0, seed 1) or one value for both."""
    return [dict(name=name, seed=i, **{k: (v[i] if isinstance(v, tuple) else v) for k, v in kw.items()})
            for i in (0, 1)]


def test_findings_verdicts(prof):
    rows = A.build_rows(prof)
    s = _summary([
        *_two_seeds("table4/dpo", acc=(0.20, 0.22), len_t=30.0),
        *_two_seeds("table4/dpo_l_sft", acc=(0.60, 0.62), len_t=(50.0, 50.5)),
        *_two_seeds("table4/sft", acc=0.61, len_t=(49.0, 49.5)),
        *_two_seeds("table2/shortest", acc=0.5, len_t=40.0, acc_hard=(0.39, 0.35)),
        *_two_seeds("table2/q_dyn", acc=0.5, len_t=40.0, acc_hard=(0.40, 0.44)),
        dict(name="table2/q_dyn_extra", acc=0.30, len_t=38.0),  # one training seed
        *_two_seeds("table3/none", acc=(0.5, 0.6), len_t=(40.0, 41.0)),
        *_two_seeds("table3/kl", acc=(0.4, 0.5), len_t=(40.0, 41.0)),  # the same Len-T, other numbers differ
        *_two_seeds("alpha/0.2", x=0.2, acc=0.50), *_two_seeds("alpha/0.5", x=0.5, acc=(0.52, 0.50)),
    ])
    tables = {g: A.aggregate(s, g, rows, benchmarks=["toy"]) for g in A.TABLE_FILES}
    f = A.findings(tables).set_index("finding")["reproduced"]
    assert f["pure DPO loses accuracy"] == "yes"  # -40 points, far beyond 2 SE
    # -5 points, SE 2.8: within 2 SE, and (2 * 2.8 / 5)^2 * 2 = 2.5 -> 3 seeds would settle a difference this size
    assert f["Shortest hurts hard problems (accuracy on the hard half)"] == (
        "not settled: the paper's way within 2 SE; about 3 seeds would settle this size")
    assert f["SFT alone stays longer (Len-T)"] == "no"  # 49.25 < 50.25 (SE 0.35): the opposite way beyond 2 SE
    # one row trained once: no SE over training seeds, so neither yes nor no
    assert f["extra negatives cost accuracy"] == "not testable: one training seed (the difference goes the paper's way)"
    assert f["KL refinement shortens correct responses (Len-T)"] == "not testable: a tie (no difference)"
    assert f["a rewrite without the KL check costs accuracy"] == "—"  # not run
    # 1 point below the best, SE 1: not settled; (2 * 1 / 1)^2 * 2 = 8 seeds
    assert f["α = 0.2 is the best α (accuracy)"] == (
        "not settled: against the paper within 2 SE; about 8 seeds would settle this size")
    assert "| pure DPO loses accuracy |" in A.findings_markdown(A.findings(tables))
    # twins (the same pairs, one model): every number equal, nothing to test
    s2 = s.copy()
    s2.loc[s2["name"] == "table2/shortest", "acc_hard"] = s2.loc[s2["name"] == "table2/q_dyn", "acc_hard"].to_numpy()
    t2 = {g: A.aggregate(s2, g, rows, benchmarks=["toy"]) for g in A.TABLE_FILES}
    assert A.findings(t2).set_index("finding")["reproduced"][
        "Shortest hurts hard problems (accuracy on the hard half)"].startswith("not testable")


@pytest.mark.parametrize("alphas, verdict", [
    ({0.0: 0.9, 0.2: 0.9, 1.0: 0.8}, "not testable: a tie (α = 0.2 and α = 0 give the same accuracy)"),
    ({0.0: 0.9, 0.2: 0.8, 1.0: 0.7}, "not testable: one training seed"),
    ({0.0: 0.7, 0.2: 0.9, 1.0: 0.8}, "not testable: one training seed"),  # best, but against rows trained once
])
def test_alpha_finding_is_not_testable_on_a_tie_or_one_seed(alphas, verdict):
    s = _summary([dict(name=f"alpha/{x:g}", x=x, acc=a, len_t=40.0) for x, a in alphas.items()])
    t = {"alpha": A.aggregate(s, "alpha", benchmarks=["toy"])}  # the rows of the summary, whatever the profile's α
    assert A.findings(t).set_index("finding").loc["α = 0.2 is the best α (accuracy)", "reproduced"] == verdict


@pytest.mark.parametrize("diff, se, n_seeds, verdict", [
    (-5.0, 1.0, 3, "yes"), (5.0, 1.0, 3, "no"),
    (-1.0, 1.0, 3, "not settled: the paper's way within 2 SE; about 12 seeds would settle this size"),
    (1.5, 1.0, 3, "not settled: against the paper within 2 SE; about 6 seeds would settle this size"),
    (0.0, 1.0, 3, "not testable: a tie (no difference)"), (0.0, 0.0, 1, "not testable: a tie (no difference)"),
    (-5.0, 1.0, 1, "not testable: one training seed (the difference goes the paper's way)"),
    (5.0, 1.0, 1, "not testable: one training seed (the difference goes against the paper)"),
    (float("nan"), 1.0, 3, "—"),
])
def test_verdict_never_answers_on_a_tie_or_one_seed(diff, se, n_seeds, verdict):
    from tsq_utils.ablations.report import _verdict

    assert _verdict(diff, se, True, n_seeds) == verdict


def test_paired_difference_removes_what_the_rows_share():
    """Rows that move together over seeds (common random numbers): the paired SE is the SD of the per-seed differences
    / sqrt(n), far below the unpaired one; the finding then answers where the unpaired reading could not."""
    from tsq_utils.ablations.report import paired_difference, seeds_to_settle

    shared = (0.50, 0.70, 0.60)  # seed-to-seed swings both rows share
    s = _summary([dict(name="table4/dpo", seed=i, acc=v - 0.05 + e, len_t=30.0)
                  for i, (v, e) in enumerate(zip(shared, (0.0, 0.01, -0.01)))]
                 + [dict(name="table4/dpo_l_sft", seed=i, acc=v, len_t=50.0) for i, v in enumerate(shared)])
    d, se, n = paired_difference(s, "table4/dpo", "table4/dpo_l_sft", "acc", "toy")
    assert n == 3 and d == pytest.approx(-0.05)
    assert se == pytest.approx(0.01 / math.sqrt(3))  # SD of (-0.05, -0.04, -0.06) = 0.01
    rows = A.build_rows(load_profile("ci"))
    tables = {g: A.aggregate(s, g, rows, benchmarks=["toy"]) for g in A.TABLE_FILES}
    unpaired = A.findings(tables).set_index("finding").loc["pure DPO loses accuracy"]
    paired = A.findings(tables, summary=s).set_index("finding").loc["pure DPO loses accuracy"]
    assert unpaired["reproduced"].startswith("not settled")  # SD 0.1 per row: SE 0.08 against 5 points
    assert paired["reproduced"] == "yes" and paired["n_seeds"] == 3
    assert paired["se"] == pytest.approx(100 * 0.01 / math.sqrt(3))
    # closed form: n * (2 SE / |d|)^2, at least one seed more than now
    assert seeds_to_settle(-0.05, 0.05, 3) == 12 and seeds_to_settle(-1.0, 0.01, 3) == 4
    assert seeds_to_settle(0.0, 0.1, 3) is None and seeds_to_settle(0.1, float("nan"), 3) is None


# --------------------------------------------------------------------------- the no-KL rewrite, for real


def test_epsilon_inf_keeps_the_shortest_shorter_candidate_of_every_step():
    """refine_pairs with epsilon = inf (the no-KL rewrite): each step with a scored (shorter) candidate takes the
    shortest one; with epsilon = 0 none is taken. A tiny random model and a character tokenizer."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<|end|>": 2}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>")
    tok.add_tokens(["<think>", "</think>"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                         pad_token_id=0, eos_token_id=2, bos_token_id=None)).eval()
    text = "a5: start at 5\n\nb+6: 5+6=11\n\nc-3: 11-3=8\n</think>\n\nThe answer is \\boxed{8}."
    pairs = pd.DataFrame([dict(problem_id="p0", k=3, prompt="Q:a5,b+6,c-3\n<think>\n", chosen=text, rejected="long",
                               chosen_tokens=len(text), rejected_tokens=99, p=0.5, chosen_sample_idx=0,
                               rejected_sample_idx=1)])
    cfg = RefinementConfig(n_candidates=6, window=8, epsilon=math.inf, max_step_tokens=16, batch_size=4)
    out, log = refinement.refine_pairs(model, tok, pairs, cfg, seed=3, progress=False)
    scored_any = False
    for _, r in log.iterrows():
        shorter = [n for n, kl in zip(r["cand_tokens"], r["kl"]) if kl == kl and n < r["orig_tokens"]]
        if shorter:
            scored_any = True
            assert r["accepted"] and r["new_tokens"] == min(shorter)
        else:
            assert not r["accepted"]
    assert scored_any, "the random model drew no shorter candidate: the test checks nothing"
    assert out["chosen_tokens"].iloc[0] < out["chosen_tokens_original"].iloc[0]
    _, log0 = refinement.refine_pairs(model, tok, pairs, dataclasses.replace(cfg, epsilon=0.0), seed=3, progress=False)
    assert not log0["accepted"].any()


def test_sweep_and_tradeoff_figures(prof):
    import matplotlib

    matplotlib.use("Agg")
    from tsq_utils.lessons import plotting

    rows = A.build_rows(prof)
    s = _summary([dict(name="epsilon/0.005", x=0.005, acc=0.5, len_t=40.0, tokens_per_step_before=10.0,
                       tokens_per_step_after=9.0),
                  dict(name="epsilon/inf", x=math.inf, acc=0.3, len_t=30.0, tokens_per_step_before=10.0,
                       tokens_per_step_after=6.0),
                  dict(name="table4/dpo", acc=0.2, len_t=20.0), dict(name="table4/dpo", seed=1, acc=0.3, len_t=22.0)])
    eps = A.aggregate(s, "epsilon", rows, benchmarks=["toy"])
    fig = plotting.ablation_sweep_figure(eps, "ε", "t", logx=True, extra=[("tokens_per_step_after", "tokens per step")])
    assert len(fig.axes) == 3 and [t.get_text() for t in fig.axes[0].get_xticklabels()][-1] == "∞"
    t4 = A.aggregate(s, "table4", rows, benchmarks=["toy"])
    fig = plotting.ablation_tradeoff_figure({"table4": t4}, A.TITLES)
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == A.TITLES["table4"]
