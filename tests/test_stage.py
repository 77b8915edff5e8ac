"""Stage set-up, upstream artifacts, manifests and resume."""

import json

import matplotlib
import pytest
import yaml
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tsq_utils.core import config  # noqa: E402
from tsq_utils.core.artifacts import file_hash, save_table  # noqa: E402

from fake_tables import fake_table  # noqa: E402
from tsq_utils.core.stage import STAGES, MissingArtifactError, notebook_for, setup_stage  # noqa: E402



def test_stages_in_pipeline_order():
    assert list(STAGES.items()) == [
        ("base_model", "00_base_model.ipynb"),
        ("sampling", "01_sampling.ipynb"),
        ("selection", "02_selection.ipynb"),
        ("refinement", "03_kl_refinement.ipynb"),
        ("training", "04_dpo_l_training.ipynb"),
        ("evaluation", "05_evaluation.ipynb"),
        ("ablations", "06_ablations.ipynb"),
        ("tldr", "07_tldr.ipynb"),
    ]
    assert notebook_for("refinement") == "notebooks/03_kl_refinement.ipynb"


def test_setup_stage_folders_seed_threads_and_summary(repo, capsys):
    st = setup_stage("sampling", "toy")
    assert st.name == "sampling" and st.profile.name == "toy" and st.params == {} and st.force is False
    assert st.seed == config.stage_seed(1234, "sampling")
    assert st.run_dir == repo / "runs" / "toy"
    assert st.dir == repo / "runs" / "toy" / "sampling" and st.dir.is_dir()
    assert st.figures == repo / "figures" / "toy" and st.figures.is_dir()
    assert torch.get_num_threads() == 1 == st.threads
    # seeded with the stage seed: the next draw equals a fresh draw after manual_seed(seed)
    drawn = torch.rand(3)
    torch.manual_seed(st.seed)
    assert torch.equal(drawn, torch.rand(3))
    out = capsys.readouterr().out
    for text in ["stage sampling", "notebooks/01_sampling.ipynb", "profile toy", f"seed     : {st.seed}",
                 "checkpoints/toy-reasoner", "sampling.n=48", "runs/toy/sampling", "torch ", "threads: 1"]:
        assert text in out, text


def test_stage_seeds_differ_between_stages(repo):
    assert setup_stage("sampling", "ci").seed != setup_stage("selection", "ci").seed


def test_dotted_params_override_profile(repo):
    st = setup_stage("selection", "toy", params={"selection.alpha": 0.35, "selection.q_fix": None, "note": "x"})
    assert st.profile.selection.alpha == 0.35
    assert st.profile.selection.q_fix == 0.2  # None keeps the profile's value
    assert st.params == {"selection.alpha": 0.35, "selection.q_fix": None, "note": "x"}


def test_bad_params_raise_clear_errors(repo):
    with pytest.raises(config.ProfileError, match=r"selection\.alpha.*above the maximum.*selection\.alpha=1\.5"):
        setup_stage("selection", "toy", params={"selection.alpha": 1.5})
    with pytest.raises(config.ProfileError, match="unknown key"):
        setup_stage("selection", "toy", params={"selection.alhpa": 0.1})
    with pytest.raises(config.ProfileError, match="unknown profile 'nope'"):
        setup_stage("selection", "nope")
    with pytest.raises(ValueError, match="unknown stage 'sample'"):
        setup_stage("sample", "toy")
    with pytest.raises(ValueError, match=r"params\['obj'\]"):
        setup_stage("selection", "toy", params={"obj": object()})


def test_require_names_the_notebook_to_run(repo):
    st = setup_stage("selection", "toy")
    with pytest.raises(MissingArtifactError) as e:
        st.require("sampling", "samples.parquet")
    assert isinstance(e.value, FileNotFoundError)
    assert str(e.value) == ("runs/toy/sampling/samples.parquet is missing: run notebooks/01_sampling.ipynb first "
                            "(profile toy)")
    path = repo / "runs" / "toy" / "sampling" / "samples.parquet"
    save_table(fake_table("sampling", "samples.parquet"), path)
    # a file without a finished run of its stage is not handed on
    with pytest.raises(MissingArtifactError, match=r"no record of a finished run.*rerun notebooks/01_sampling\.ipynb"):
        st.require("sampling", "samples.parquet")
    setup_stage("sampling", "toy").finish({}, ["samples.parquet"])
    assert st.require("sampling", "samples.parquet") == path
    with pytest.raises(ValueError, match="unknown stage"):
        st.require("samplin", "samples.parquet")
    with pytest.raises(ValueError, match="relative path"):
        st.require("sampling", "../../etc/passwd")


def make_upstream(repo, content: str = "v1"):
    p = repo / "runs" / "toy" / "sampling" / "samples.parquet"
    save_table(fake_table("sampling", "samples.parquet", text=content), p)
    return p


def finished_stage(repo, params=None):
    """A selection stage that has written pairs.parquet and finished; returns (stage, inputs)."""
    inputs = {"samples": make_upstream(repo)}
    st = setup_stage("selection", "toy", params=params)
    assert not st.is_done(inputs)
    save_table(fake_table("selection", "pairs.parquet", 2, x=[1, 2]), st.dir / "pairs.parquet")
    st.finish(inputs, ["pairs.parquet"], summary={"n_pairs": 2}, extra={"note": "hi"})
    return st, inputs


def test_finish_writes_manifest_and_summary(repo):
    st, inputs = finished_stage(repo, params={"alpha": 0.2})
    m = json.loads((st.dir / "manifest.json").read_text())
    assert m == st.manifest()
    assert m["stage"] == "selection" and m["profile"] == "toy" and m["complete"] is True
    assert m["notebook"] == "notebooks/02_selection.ipynb" and m["profile_file"].endswith("profiles/toy.yaml")
    assert m["profile_config"] == json.loads(json.dumps(st.profile.to_dict()))
    assert m["params"] == {"alpha": 0.2} and m["seed"] == st.seed and m["threads"] == 1
    assert m["inputs"] == {"samples": {"path": "runs/toy/sampling/samples.parquet",
                                       "sha256": file_hash(inputs["samples"])}}
    assert m["outputs"] == ["pairs.parquet"] and m["summary"] == "summary.json"
    assert set(m["versions"]) == {"python", "torch", "transformers", "trl", "datasets", "tokenizers"}
    assert 0 <= m["wall_time_s"] < 60 and m["finished_at"].endswith("+00:00")
    assert m["extra"] == {"note": "hi"}
    assert json.loads((st.dir / "summary.json").read_text()) == {"n_pairs": 2}


def test_resume_when_everything_matches(repo, capsys):
    finished_stage(repo, params={"alpha": 0.2})
    st = setup_stage("selection", "toy", params={"alpha": 0.2})
    assert "previous : manifest from" in capsys.readouterr().out
    assert st.is_done({"samples": repo / "runs/toy/sampling/samples.parquet"})
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, reason",
    [
        ("params", "params changed: alpha"),
        # sampling.n is edited too, but 02 does not read it (pipeline.PIPELINE): only alpha is a reason
        ("profile_edit", "profile values changed: selection.alpha"),
        ("input", "inputs changed: samples"),
        ("input_name", "inputs changed: samples, samples2"),
        ("output", "outputs missing: pairs.parquet"),
        ("incomplete", "did not complete"),
        ("force", "force=True"),
    ],
)
def test_rerun_when_something_differs(repo, change, reason):
    finished_stage(repo, params={"alpha": 0.2})
    params, force, profile = {"alpha": 0.2}, False, "toy"
    inputs = {"samples": repo / "runs/toy/sampling/samples.parquet"}
    if change == "params":
        params = {"alpha": 0.3}
    elif change == "profile_edit":  # the same profile name, its YAML edited
        profile = repo / "toy.yaml"
        raw = yaml.safe_load((config.PROFILES_DIR / "toy.yaml").read_text())
        raw.setdefault("selection", {})["alpha"] = 0.3
        raw.setdefault("sampling", {})["n"] = 4
        profile.write_text(yaml.safe_dump(raw))
    elif change == "input":
        make_upstream(repo, "v2")
    elif change == "input_name":
        inputs = {"samples2": inputs["samples"]}
    elif change == "output":
        (repo / "runs/toy/selection/pairs.parquet").unlink()
    elif change == "incomplete":
        mpath = repo / "runs/toy/selection/manifest.json"
        m = json.loads(mpath.read_text())
        m["complete"] = False
        mpath.write_text(json.dumps(m))
    elif change == "force":
        force = True
    st = setup_stage("selection", profile, params=params, force=force)
    assert st.stale_reason(inputs) is not None and reason in st.stale_reason(inputs)
    assert not st.is_done(inputs)


def test_folder_inputs_are_hashed(repo):
    model = repo / "runs/toy/training/model"
    model.mkdir(parents=True)
    (model / "w.safetensors").write_bytes(b"1")
    st = setup_stage("evaluation", "toy")
    (st.dir / "metrics.parquet").write_bytes(b"x")
    st.finish({"model": model}, ["metrics.parquet"])
    assert st.is_done({"model": model})
    (model / "w.safetensors").write_bytes(b"2")
    st2 = setup_stage("evaluation", "toy")
    assert not st2.is_done({"model": model})


def test_finish_checks_outputs_and_inputs(repo):
    st = setup_stage("selection", "toy")
    with pytest.raises(FileNotFoundError, match="outputs not found.*pairs.parquet"):
        st.finish({}, ["pairs.parquet"])
    with pytest.raises(FileNotFoundError, match="input 'samples'"):
        st.finish({"samples": repo / "nope.parquet"}, [])
    with pytest.raises(TypeError, match="list of file names"):
        st.finish({}, "pairs.parquet")
    assert not (st.dir / "manifest.json").exists()
    with pytest.raises(MissingArtifactError, match="run notebooks/02_selection.ipynb first"):
        st.manifest()


def test_save_fig_png_and_pdf(repo):
    st = setup_stage("evaluation", "toy")
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    png = st.save_fig(fig, "fig3_budget", pdf=True)
    plt.close(fig)
    assert png == repo / "figures" / "toy" / "fig3_budget.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    dpi = Image.open(png).info["dpi"]
    assert round(dpi[0]) == round(dpi[1]) == 120
    assert (png.parent / "fig3_budget.pdf").read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match="plain file name"):
        st.save_fig(fig, "../escape")


def test_a_stage_that_reruns_nothing_keeps_its_finished_at(repo):
    """Issue 26: 06 (which never asks is_done: its rows are cached one by one) rewrote finished_at on every run."""
    import json as _json

    from tsq_utils.core.artifacts import save_table as _save
    from tsq_utils.core.stage import setup_stage as _setup
    import pandas as _pd

    st = _setup("ablations", "ci")
    _save(_pd.DataFrame({"row": ["a"]}), st.dir / "summary.parquet")
    first = st.finish({}, ["summary.parquet"], summary={"rows_run": 1})
    first["finished_at"] = "2020-01-01T00:00:00+00:00"  # long ago: a rewrite would show
    st.manifest_path.write_text(_json.dumps(first))
    m1 = _json.loads(st.manifest_path.read_text())
    st = _setup("ablations", "ci")
    _save(_pd.DataFrame({"row": ["a"]}), st.dir / "summary.parquet")  # the same bytes again
    again = st.finish({}, ["summary.parquet"], summary={"rows_run": 1})
    assert again["finished_at"] == first["finished_at"] and _json.loads(st.manifest_path.read_text()) == m1
    st = _setup("ablations", "ci")
    _save(_pd.DataFrame({"row": ["b"]}), st.dir / "summary.parquet")  # a real change: a new record
    changed = st.finish({}, ["summary.parquet"], summary={"rows_run": 1})
    assert changed["output_hashes"] != first["output_hashes"]
