"""Stage 00 helpers: the base-model pointer, model folders, held-out problems, oracle lengths and reasoner checks."""

import json

import pandas as pd
import pytest

from tsq_utils.model import base_model as bm
from tsq_utils.task import toy as tw
from tsq_utils.model import toy_reasoner as tr
from tsq_utils.core.config import REPO_ROOT, ToyWorldConfig, load_profile
from tsq_utils.method.sampling import SAMPLE_COLUMNS, reasoner_checks
from tsq_utils.task.registry import get_task, training_task


@pytest.fixture(scope="module")
def tok():
    return tr.train_tokenizer(ToyWorldConfig(), vocab_size=128, n_docs=300, seed=0)


def n_tok(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_read_pointer_missing_names_notebook_00(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        bm.read_pointer(tmp_path, "toy")
    msg = str(e.value)
    assert "notebooks/00_base_model.ipynb" in msg and "toy" in msg and "base_model.json" in msg


def test_pointer_round_trip(tmp_path):
    stage_dir = tmp_path / "base_model"
    (tmp_path / "model").mkdir()
    path = bm.write_pointer(stage_dir, tmp_path / "model", "toy", {"note": "x"})
    assert path == stage_dir / bm.POINTER
    # stored relative to the run folder, read back resolved
    assert json.loads(path.read_text()) == {"model": "model", "kind": "toy", "relative_to": "run", "note": "x"}
    assert bm.read_pointer(tmp_path, "toy") == {"model": str(tmp_path / "model"), "kind": "toy", "note": "x"}
    bm.write_pointer(stage_dir, "org/model", "hub")  # overwritten, not merged
    assert bm.read_pointer(tmp_path, "r1") == {"model": "org/model", "kind": "hub"}
    assert [p.name for p in stage_dir.iterdir()] == [bm.POINTER]  # no temp file left
    assert json.loads(path.read_text())["kind"] == "hub"


def test_base_inputs(tmp_path):
    (tmp_path / "m").mkdir()
    bm.write_pointer(tmp_path / "base_model", tmp_path / "m", "toy")
    p = load_profile("toy")
    assert bm.base_inputs(tmp_path, p) == {"base_model": tmp_path / "base_model" / bm.POINTER,
                                           "base_weights": tmp_path / "m" / "model.safetensors"}
    bm.write_pointer(tmp_path / "base_model", "org/model", "hub")
    assert bm.base_inputs(tmp_path, p) == {"base_model": tmp_path / "base_model" / bm.POINTER}


def test_toy_model_dir(tmp_path):
    toy = load_profile("toy")
    assert tr.toy_model_dir(toy, tmp_path) == REPO_ROOT / "checkpoints" / "toy-reasoner"
    ci = load_profile("ci")
    assert ci.pretrain.retrain and tr.toy_model_dir(ci, tmp_path) == tmp_path / "base_model" / "model"


def test_model_sources_say_what_to_load_and_in_which_dtype(tmp_path):
    """The training entry point asks the registry (no source-name compare): the toy reasoner always trains from
    float32 weights as recorded; a hub model in model.dtype, its recorded hub id following model.local_override."""
    hub = load_profile("r1-1.5b", {"model.dtype": "bfloat16"})
    toy, src = load_profile("toy"), bm.model_source("hub")
    assert set(bm.MODEL_SOURCES) == {"toy", "hub"}
    assert bm.model_source("toy").dtype(toy) == "float32" and src.dtype(hub) == "bfloat16"
    assert bm.model_source("toy").resolve("runs/x/base_model/model", toy) == "runs/x/base_model/model"
    over = load_profile("r1-1.5b", {"model.local_override": str(tmp_path)})
    assert src.resolve(over.model.path, over) == str(tmp_path)  # the recorded hub id follows the override
    assert src.resolve("some/folder", over) == "some/folder"  # a recorded folder stays itself
    with pytest.raises(ValueError, match="unknown model kind 'gguf'"):
        bm.model_source("gguf")


def test_hub_model_ref(tmp_path):
    assert bm.hub_model_ref(load_profile("toy", {"model.source": "hub", "model.path": "org/m"})) == "org/m"
    # a local override that exists wins over the hub id; one that does not is an error naming it
    over = load_profile("toy", {"model.path": "org/m", "model.local_override": str(tmp_path)})
    assert bm.hub_model_ref(over) == str(tmp_path)
    gone = load_profile("toy", {"model.path": "org/m", "model.local_override": str(tmp_path / "gone")})
    with pytest.raises(FileNotFoundError, match="local_override"):
        bm.hub_model_ref(gone)


def test_heldout_problems(tok):
    p = load_profile("ci")
    task = training_task(p)
    held = task.problems(p, tok, "heldout", 8)
    assert len(held) == 8 and all(i.startswith("heldout-") for i in held["problem_id"])
    assert sorted(held["k"].value_counts().tolist()) == [4, 4]
    assert list(task.problems(p, tok, "heldout", 8)["problem"]) == list(held["problem"])  # seeded
    # the toy profile's held-out size is the one its shipped reasoner was measured on; others use data.n_eval_problems
    assert task.split_size(load_profile("toy"), "heldout") == 420
    assert task.split_size(p, "heldout") == p.data.n_eval_problems
    from tsq_utils.method.sampling import training_problems

    assert not set(training_problems(p, tok)["problem_id"]) & set(held["problem_id"])


def test_oracle_lengths_are_the_oracle_trace_tokens(tok):
    probs = tw.make_problems(7, seed=3)
    table = tw.problem_table(probs, tok)
    out = tw.oracle_lengths(table, tok)
    assert list(out.columns) == ["problem_id", "k", "oracle_text", "oracle_tokens"]
    for p, (_, row) in zip(probs, out.iterrows()):
        assert row["problem_id"] == p.problem_id and row["k"] == p.k
        assert row["oracle_text"] == tw.oracle_trace(p)
        assert row["oracle_tokens"] == n_tok(tok, tw.oracle_trace(p))
    # longer chains have longer oracles
    assert list(out["oracle_tokens"]) == sorted(out["oracle_tokens"])


def samples_table(rows: list[dict]) -> pd.DataFrame:
    base = {"prompt": "p", "text": "t", "n_think_tokens": 0, "status": "", "finish_reason": "stop", "gold": "0"}
    df = pd.DataFrame([{**base, **r} for r in rows])
    df["status"] = ["correct" if c else "wrong" for c in df["correct"]]
    return df[SAMPLE_COLUMNS]


def test_reasoner_checks_hand_built(tok):
    # two problems per k = 2 and k = 3
    held = tw.problem_table(tw.make_problems(4, seed=5, k_min=2, k_max=3), tok)
    oracle = dict(zip(held["problem_id"], (n_tok(tok, tw.oracle_trace(tw.parse_question(q))) for q in held["problem"])))
    ids, ks = list(held["problem_id"]), list(held["k"])
    # greedy: 3 of 4 right; lengths twice the oracle except the last (three times)
    mult = [2, 2, 2, 3]
    greedy = samples_table([{"problem_id": i, "k": k, "sample_idx": 0, "n_tokens": m * oracle[i], "correct": c}
                            for i, k, m, c in zip(ids, ks, mult, [True, True, False, True])])
    # sampled: two samples each with lengths 10 and 30 (CV 0.5) for problem 0, 20 and 20 (CV 0) for the rest
    sampled_rows = []
    for idx, (i, k) in enumerate(zip(ids, ks)):
        lens = (10, 30) if idx == 0 else (20, 20)
        oks = (True, False) if idx < 2 else (False, False)
        sampled_rows += [{"problem_id": i, "k": k, "sample_idx": j, "n_tokens": n, "correct": c}
                         for j, (n, c) in enumerate(zip(lens, oks))]
    sampled = samples_table(sampled_rows)

    out = reasoner_checks(greedy, sampled, held, tok, get_task("toy"))
    o = [oracle[i] for i in ids]
    g = [m * x for m, x in zip(mult, o)]
    assert out["heldout_problems"] == 4
    assert out["greedy_accuracy"] == 0.75
    assert out["greedy_tokens"] == pytest.approx(sum(g) / 4)
    assert out["oracle_tokens"] == pytest.approx(sum(o) / 4)
    assert out["greedy_over_oracle"] == pytest.approx(sum(g) / sum(o))
    assert 2 < out["greedy_over_oracle"] < 3
    assert out["sampled_accuracy"] == 2 / 8 and out["sampled_responses"] == 8
    assert out["mean_cv"] == pytest.approx(0.5 / 4)
    by_k = pd.DataFrame(out["by_k"]).set_index("k")
    assert list(by_k.index) == [2, 3]
    # make_problems alternates k: problems 0 and 2 have k = 2, problems 1 and 3 have k = 3
    assert ks == [2, 3, 2, 3]
    assert by_k.loc[2, "problems"] == 2 and by_k.loc[2, "greedy_acc"] == 0.5 and by_k.loc[3, "greedy_acc"] == 1.0
    assert by_k.loc[2, "oracle_tokens"] == pytest.approx(round((o[0] + o[2]) / 2, 4))
    assert by_k.loc[2, "sampled_acc"] == 0.25 and by_k.loc[3, "sampled_acc"] == 0.25
    assert by_k.loc[2, "length_cv"] == pytest.approx(0.25) and by_k.loc[3, "length_cv"] == 0.0
    assert out["oracle_len_by_k"].to_dict() == pytest.approx({2: (o[0] + o[2]) / 2, 3: (o[1] + o[3]) / 2})
    # everything but the plotting series is plain JSON
    json.dumps({k: v for k, v in out.items() if k != "oracle_len_by_k"})


def test_load_base_without_pointer(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"notebooks/00_base_model\.ipynb"):
        bm.load_base(tmp_path, load_profile("toy"))


def test_load_model_toy_folder(tok, tmp_path):
    from tsq_utils.core.config import PretrainConfig

    model = tr.new_model(tok, PretrainConfig(hidden_size=16, num_layers=1, num_heads=1, intermediate_size=32), 0)
    tr.save_reasoner(model, tok, tmp_path / "m", {})
    bm.write_pointer(tmp_path / "base_model", tmp_path / "m", "toy")
    loaded, tok2 = bm.load_base(tmp_path, load_profile("toy"))
    assert loaded.config.hidden_size == 16 and len(tok2) == len(tok)
