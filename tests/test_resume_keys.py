"""Resume keys on exactly what a stage reads (issue 16): the stage table, the profile values, inputs and code.

The pipeline here is the real bookkeeping (setup_stage, Stage.inputs/is_done/finish, require, manifests) around
fake stage bodies: each stage writes outputs whose bytes are a function of the profile values it reads and of
its inputs' hashes, as a real stage's are. So an edit that a stage does not read leaves it up to date, and a
stage that reruns with new outputs makes its downstream rerun. Fast: no model, no notebook runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tsq_utils.model import base_model as bm
from tsq_utils.core import config, fingerprint, pipeline, runner
from tsq_utils.core import stage as stage_mod
from tsq_utils.core.artifacts import path_hash, save_table
from tsq_utils.core.stage import setup_stage

from fake_tables import fake_table

REPO = Path(__file__).resolve().parent.parent
ORDER = list(pipeline.PIPELINE)


def _use_repo(mp: pytest.MonkeyPatch, root: Path) -> Path:
    """Point the package at a fake repository root: run folders, figures, notebooks and a ci profile under it."""
    mp.setattr(config, "REPO_ROOT", root)
    mp.setenv("TSQ_RUNS_DIR", str(root / "runs"))
    mp.setenv("TSQ_FIGURES_DIR", str(root / "figures"))
    mp.setenv("TSQ_NOTEBOOKS_DIR", str(root / "notebooks"))
    return root


def _new_repo(root: Path) -> Path:
    shutil.copytree(REPO / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("*.py", ".*"))
    (root / "profiles").mkdir()
    shutil.copy(config.PROFILES_DIR / "ci.yaml", root / "profiles" / "ci.yaml")
    return root


@pytest.fixture(scope="module", autouse=True)
def _package_snapshot(tmp_path_factory):
    """The code fingerprints read a snapshot of tsq_utils taken when the module starts: an edit another developer
    makes to the package while these tests run must not look like a code change to them."""
    root = Path(shutil.copytree(fingerprint.PACKAGE_DIR, tmp_path_factory.mktemp("snapshot") / "tsq_utils",
                                ignore=shutil.ignore_patterns("__pycache__")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fingerprint, "PACKAGE_DIR", root)
        yield root


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A fake repository root (copies of the notebooks and of profiles/ci.yaml) with no run yet."""
    return _use_repo(monkeypatch, _new_repo(tmp_path / "repo"))


@pytest.fixture(scope="module")
def _baseline(tmp_path_factory):
    """A fake repository root where the whole fake pipeline has run once (built once per module)."""
    root = _new_repo(tmp_path_factory.mktemp("baseline") / "repo")
    with pytest.MonkeyPatch.context() as mp:
        _use_repo(mp, root)
        assert run_pipeline(root) == ORDER
    return root


@pytest.fixture
def done(_baseline, tmp_path, monkeypatch):
    """A copy of the baseline: every stage complete (paths in a run folder are relative, so a copy resumes)."""
    return _use_repo(monkeypatch, Path(shutil.copytree(_baseline, tmp_path / "repo")))


def edit_profile(repo: Path, dotted: str, value) -> None:
    """Set one value of the test's ci.yaml (a dotted key)."""
    path = repo / "profiles" / "ci.yaml"
    raw = yaml.safe_load(path.read_text())
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    path.write_text(yaml.safe_dump(raw))


def _digest(*parts) -> bytes:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest().encode()


def run_fake_stage(repo: Path, name: str) -> bool:
    """One stage's bookkeeping around a fake body; True when it (re)computed, False when it was up to date."""
    st = setup_stage(name, str(repo / "profiles" / "ci.yaml"))
    reads = st.profile_reads()
    if name == "base_model":  # as prepare_base: the weights depend on what trains them; the pointer names them
        model = st.dir / "model"
        model.mkdir(exist_ok=True)
        trains = ("pretrain", "toyworld", "model", "seed")
        weights = _digest({k: v for k, v in reads.items() if k.split(".")[0] in trains})
        if not (model / "model.safetensors").exists() or (model / "model.safetensors").read_bytes() != weights:
            (model / "model.safetensors").write_bytes(weights)
        bm.write_pointer(st.dir, str(model), "toy")
    inputs = st.inputs()
    done = st.is_done()
    if not done:
        content = _digest(reads, {k: path_hash(p) for k, p in inputs.items()})
        for out in st.spec.outputs:
            if out == "base_model.json":
                continue
            if out in ("model", "static_mix_model"):
                (st.dir / out).mkdir(exist_ok=True)
                (st.dir / out / "model.safetensors").write_bytes(content + out.encode())
            elif out.endswith(".parquet"):
                save_table(fake_table(name, out, content=content.decode(), output=out), st.dir / out)
            else:
                (st.dir / out).write_bytes(content + out.encode())
    st.finish()
    return not done


def release(st) -> None:
    """Let go of a stage that a test only asked (is_done/stale_reason), without finishing it."""
    stage_mod.release_lock(st.dir)


def run_pipeline(repo: Path) -> list[str]:
    """Every stage in order; the names of those that recomputed."""
    return [name for name in ORDER if run_fake_stage(repo, name)]


def test_a_fresh_run_computes_every_stage_and_a_second_reuses_all(repo):
    assert run_pipeline(repo) == ORDER
    assert run_pipeline(repo) == []
    m = json.loads((repo / "runs/ci/selection/manifest.json").read_text())
    selection = m["profile_config"]["selection"]
    assert m["profile_reads"] == {"seed": 1234, **{f"selection.{k}": v for k, v in selection.items()}}
    assert set(m["code"]) == {"package", "notebook", "modules", "git_commit", "git_dirty"}
    assert "tsq_utils/method/selection.py" in m["code"]["modules"]
    assert not any(f.startswith("tsq_utils/method/refinement") for f in m["code"]["modules"])  # module or package
    assert m["code"]["notebook"] == fingerprint.notebook_hash(repo / "notebooks/02_selection.ipynb") is not None


@pytest.mark.parametrize("dotted, value, rerun", [
    # unrelated to every stage
    ("description", "edited", []),
    # the tldr: section is read by 07 only (before: every stage compared the whole profile; 01 resampled)
    ("tldr.eta", 2.0, ["tldr"]),
    ("tldr.max_steps", 3, ["tldr"]),
    # the ablations: section is 06's
    ("ablations.seeds", 3, ["ablations"]),
    # a knob of stage X reruns X, and its new outputs rerun the stages that read them
    ("selection.max_pairs", 3, ["selection", "refinement", "training", "evaluation", "ablations", "tldr"]),
    ("refinement.epsilon", 0.01, ["refinement", "training", "evaluation", "ablations", "tldr"]),
    ("training.lr", 0.002, ["training", "evaluation", "ablations", "tldr"]),
    ("evaluation.n_samples", 3, ["evaluation", "ablations", "tldr"]),
    ("sampling.n", 3, ["sampling", "selection", "refinement", "training", "evaluation", "ablations", "tldr"]),
    # the evaluation set: 00 (its held-out count off the toy profile), 05 and what reads 05; not 01-04
    ("data.n_eval_problems", 7, ["base_model", "evaluation", "ablations", "tldr"]),
    # a retrained base model: new weights, so every stage that loads it
    ("pretrain.n_tokens", 20_000, ORDER),
])
def test_a_profile_edit_reruns_the_stages_that_read_it_and_their_downstream(done, dotted, value, rerun):
    edit_profile(done, dotted, value)
    assert run_pipeline(done) == rerun


def test_the_rerun_reason_names_the_changed_values(done, capsys):
    repo = done
    edit_profile(repo, "selection.alpha", 0.5)
    capsys.readouterr()
    st = setup_stage("selection", str(repo / "profiles" / "ci.yaml"))
    assert "will rerun: profile values changed: selection.alpha" in capsys.readouterr().out
    assert st.stale_reason() == "profile values changed: selection.alpha"
    release(st)


def test_a_dotted_param_equal_to_the_profile_changes_nothing(done):
    """-p 07:eta 4 with the profile's eta 4: the same effective value, so no rerun (compared as a profile value)."""
    repo = done
    eta = config.load_profile(str(repo / "profiles" / "ci.yaml")).tldr.eta
    st = setup_stage("tldr", str(repo / "profiles" / "ci.yaml"), {"tldr.eta": eta})
    assert st.stale_reason() is None
    release(st)
    st = setup_stage("tldr", str(repo / "profiles" / "ci.yaml"), {"tldr.eta": eta + 1})
    assert st.stale_reason() == "profile values changed: tldr.eta"
    release(st)


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """A copy of the tsq_utils sources that the code fingerprints read instead of the package's own."""
    root = Path(shutil.copytree(fingerprint.PACKAGE_DIR, tmp_path / "tsq_utils",
                                ignore=shutil.ignore_patterns("__pycache__")))
    monkeypatch.setattr(fingerprint, "PACKAGE_DIR", root)
    return root


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_a_code_edit_to_a_module_every_stage_uses_reruns_every_stage(done, pkg, capsys):
    repo = done
    _append(pkg / "core" / "artifacts.py", "\n_EDITED = 1\n")
    capsys.readouterr()
    st = setup_stage("sampling", str(repo / "profiles" / "ci.yaml"))
    assert "will rerun: code changed since the last run: tsq_utils/core/artifacts.py" in capsys.readouterr().out
    assert st.stale_reason() == "code changed since the last run: tsq_utils/core/artifacts.py"
    release(st)
    assert run_pipeline(repo) == ORDER  # the fake outputs are unchanged, but each stage's own code changed


def test_a_comment_docstring_or_formatting_edit_to_any_module_reruns_no_stage(done, pkg, _package_snapshot):
    repo = done
    for path in pkg.rglob("*.py"):
        src = path.read_text()
        path.write_text("# a new comment\n\n" + src.replace("\n\n\n", "\n\n\n\n") + "\n# the end\n")
    ref = pkg / "method" / "refinement" / "refine.py"
    text = ref.read_text()
    first = text.index('"""', text.index("def "))  # the first function's docstring
    ref.write_text(text[:first + 3] + "Reworded. " + text[first + 3:])
    assert fingerprint.code_hash(ref.read_text()) == fingerprint.code_hash(
        (_package_snapshot / "method" / "refinement" / "refine.py").read_text())
    assert run_pipeline(repo) == []


def test_an_edit_to_refinement_reruns_03_and_what_uses_it_not_01(done, pkg, capsys):
    repo = done
    _append(pkg / "method" / "refinement" / "refine.py", "\n_EDITED = 1\n")
    capsys.readouterr()
    rerun = run_pipeline(repo)
    # 03 and 06 (its rows refine) use refinement's code; 00, 01, 02, 04, 05 and 07 do not
    assert rerun == ["refinement", "ablations"]
    assert "code changed since the last run: tsq_utils/method/refinement/refine.py" in capsys.readouterr().out
    assert set(rerun) <= {"refinement", "ablations", *pipeline.downstream("refinement")}


def test_an_expensive_stage_is_kept_on_a_code_change_and_says_so(done, pkg, capsys, monkeypatch):
    repo = done
    edit_profile(repo, "expensive", ["sampling", "refinement"])  # not a resume key: reruns nothing by itself
    assert run_pipeline(repo) == []
    _append(pkg / "method" / "sampling.py", "\n_EDITED = 1\n")
    monkeypatch.delenv("TSQ_RERUN_ON_CODE_CHANGE", raising=False)
    capsys.readouterr()
    rerun = run_pipeline(repo)
    out = capsys.readouterr().out
    assert "sampling" not in rerun and "evaluation" in rerun  # 05 also uses method/sampling.py, and is not expensive
    assert "kept: code changed since" in out and "pass --rerun-on-code-change" in out
    assert "tsq_utils/method/sampling.py" in out
    m = json.loads((repo / "runs/ci/sampling/manifest.json").read_text())
    assert m["kept"].startswith("kept: code changed since")
    assert run_fake_stage(repo, "sampling") is False  # still kept, and said again
    st = setup_stage("sampling", str(repo / "profiles" / "ci.yaml"), rerun_on_code_change=True)
    assert st.stale_reason() == "code changed since the last run: tsq_utils/method/sampling.py"
    release(st)
    monkeypatch.setenv("TSQ_RERUN_ON_CODE_CHANGE", "1")  # what run_all.sh --rerun-on-code-change sets
    assert run_fake_stage(repo, "sampling") is True
    m = json.loads((repo / "runs/ci/sampling/manifest.json").read_text())
    assert m["kept"] is None


def test_the_r1_profiles_mark_sampling_refinement_training_and_evaluation_expensive():
    for name in ("r1-1.5b", "r1-7b"):
        assert config.load_profile(name).expensive == ["sampling", "refinement", "training", "evaluation"]
    assert config.load_profile("toy").expensive == []
    with pytest.raises(config.ProfileError, match="expensive names unknown stages"):
        config.load_profile("ci", {"expensive": ["sampling", "smapling"]})


def test_stage_modules_follow_the_notebook_imports():
    mods = {s: stage_mod.stage_modules(s) for s in ORDER}
    assert "tsq_utils.method.sampling" in mods["sampling"] and "tsq_utils.method.refinement" not in mods["sampling"]
    assert "tsq_utils.method.refinement" in mods["refinement"] and "tsq_utils.method.refinement" in mods["ablations"]
    assert "tsq_utils.method.train_entry" in mods["training"]  # started by name: python -m tsq_utils.method...
    assert all("tsq_utils.core.stage" in m and "tsq_utils.core.artifacts" in m for m in mods.values())


def test_stage_modules_leave_the_lessons_out():
    """The lessons only present (figures, prose, widgets): no stage's fingerprint counts them, while the method modules
    the notebooks import stay counted (an edit to lessons/plotting.py once made 01 resample for four minutes)."""
    for s in ORDER:
        mods = stage_mod.stage_modules(s)
        assert not [m for m in mods if m.startswith("tsq_utils.lessons")], s
        assert not [f for f in stage_mod.stage_code(s)["modules"] if f.startswith("tsq_utils/lessons/")], s
    assert "tsq_utils.method.dpo_l" in stage_mod.stage_modules("training")  # 04 imports it beside dpo_step


def test_module_closure_skips_a_package_but_not_what_others_import(tmp_path):
    """skip names a package: its modules and what only they import are left out; a module the roots import
    themselves stays in even when a skipped module imports it too."""
    root = tmp_path / "tsq_utils"
    (root / "lessons").mkdir(parents=True)
    (root / "method").mkdir()
    files = {"__init__.py": "", "method/__init__.py": "", "lessons/__init__.py": "",
             "method/user.py": "from tsq_utils.lessons import plots\nfrom tsq_utils.method import shared\n",
             "lessons/plots.py": "from tsq_utils.method import shared, only_plots\n",
             "method/shared.py": "A = 1\n", "method/only_plots.py": "B = 2\n"}
    for rel, text in files.items():
        (root / rel).write_text(text)
    everything = fingerprint.module_closure(["tsq_utils.method.user"], root)
    assert {"tsq_utils.lessons.plots", "tsq_utils.method.only_plots"} <= set(everything)
    kept = fingerprint.module_closure(["tsq_utils.method.user"], root, skip=("tsq_utils.lessons",))
    assert "tsq_utils.method.shared" in kept and "tsq_utils.method.user" in kept
    assert not {"tsq_utils.lessons", "tsq_utils.lessons.plots", "tsq_utils.method.only_plots"} & set(kept)
    # a name that only starts like the package is not inside it
    assert "tsq_utils.lessons.plots" in fingerprint.module_closure(["tsq_utils.method.user"], root,
                                                                   skip=("tsq_utils.less",))


def test_module_closure_follows_a_package_into_its_modules(tmp_path):
    """A module split into a package (method/refinement.py -> method/refinement/) stays covered: the closure reaches
    the package's __init__ and each module it imports, relative or absolute, at import or in a function, and no
    module that nothing imports."""
    root = tmp_path / "tsq_utils"
    room = root / "method" / "room"
    room.mkdir(parents=True)
    files = {"__init__.py": "", "method/__init__.py": "", "method/user.py": "from .room import run\n",
             "method/room/__init__.py": "from .api import run\n",
             "method/room/api.py": ("from . import helpers\n\n\ndef run():\n"
                                    "    from tsq_utils.method.room.lazy import x\n    return x + helpers.Y\n"),
             "method/room/helpers.py": "Y = 1\n", "method/room/lazy.py": "x = 2\n", "method/room/unused.py": "z = 3\n"}
    for rel, text in files.items():
        (root / rel).write_text(text)
    mods = fingerprint.module_closure(["tsq_utils.method.user"], root)
    assert {f"tsq_utils.method.room{m}" for m in ("", ".api", ".helpers", ".lazy")} <= set(mods)
    assert "tsq_utils.method.room.unused" not in mods
    assert {"tsq_utils/method/room/__init__.py", "tsq_utils/method/room/api.py",
            "tsq_utils/method/room/lazy.py"} <= set(fingerprint.modules_hashes(mods, root))


def test_normalized_code_ignores_comments_docstrings_and_formatting():
    a = 'def f(x):\n    """Doc."""\n    return x + 1  # one\n'
    b = '# header\n\n\ndef f( x ):\n    """Another doc,\n    longer."""\n\n    return (x+1)\n'
    assert fingerprint.code_hash(a) == fingerprint.code_hash(b)
    assert fingerprint.code_hash(a) != fingerprint.code_hash(a.replace("+ 1", "+ 2"))
    only_doc = 'def g():\n    """Only a docstring."""\n'
    assert fingerprint.code_hash(only_doc) == fingerprint.code_hash("def g():\n    pass\n")


def test_package_hash_follows_the_code(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(fingerprint.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    h = fingerprint.package_hash(pkg)
    assert h == fingerprint.package_hash(pkg) and len(h) == 64
    (pkg / "__pycache__").mkdir(exist_ok=True)
    (pkg / "__pycache__" / "x.py").write_text("not source")
    (pkg / "notes.txt").write_text("not python")
    assert fingerprint.package_hash(pkg) == h  # caches and other files do not count
    src = pkg / "method" / "selection.py"
    src.write_text(src.read_text() + "\n# a comment\n")
    assert fingerprint.package_hash(pkg) == h  # a comment is not code
    src.write_text(src.read_text() + "\n_EDITED = 1\n")
    h2 = fingerprint.package_hash(pkg)
    assert h2 != h  # a code edit counts
    (pkg / "sub").mkdir()
    (pkg / "sub" / "new.py").write_text("x = 1\n")
    assert fingerprint.package_hash(pkg) not in (h, h2)  # a new module, in a sub-package too


def _edit_notebook(path: Path, cell_type: str, edit) -> None:
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == cell_type)
    edit(cell)
    path.write_text(json.dumps(nb, indent=1))


def test_a_notebook_code_edit_reruns_that_stage(done, capsys):
    repo = done
    nb = repo / "notebooks" / "02_selection.ipynb"
    _edit_notebook(nb, "code", lambda c: c["source"].append("\n# a comment only\n"))
    assert run_pipeline(repo) == []  # a comment is not code
    _edit_notebook(nb, "code", lambda c: c["source"].append("\n_edited = 1\n"))
    capsys.readouterr()
    st = setup_stage("selection", str(repo / "profiles" / "ci.yaml"))
    assert ("will rerun: code changed since the last run: the code cells of notebooks/02_selection.ipynb"
            in capsys.readouterr().out)
    release(st)
    # 02 reruns; its outputs come out the same, so nothing downstream does
    assert run_pipeline(repo) == ["selection"]


def test_markdown_outputs_and_metadata_of_a_notebook_do_not_rerun(done):
    repo = done
    nb = repo / "notebooks" / "02_selection.ipynb"
    _edit_notebook(nb, "markdown", lambda c: c["source"].append("\nA clearer sentence.\n"))

    def outputs(c):
        c["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hello\n"]}]
        c["execution_count"] = 7
        c["metadata"]["collapsed"] = True

    _edit_notebook(nb, "code", outputs)
    assert run_pipeline(repo) == []


def test_notebook_hash_reads_code_cells_only(tmp_path):
    def nb(cells):
        path = tmp_path / "n.ipynb"
        path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
        return fingerprint.notebook_hash(path)

    code = {"cell_type": "code", "source": ["x = 1\n", "y = 2"], "outputs": [], "metadata": {}, "execution_count": None}
    md = {"cell_type": "markdown", "source": "# Title", "metadata": {}}
    h = nb([md, code])
    assert h == nb([code]) == nb([{**code, "source": "x = 1\ny = 2", "outputs": [{"output_type": "stream"}]}])
    assert nb([{**code, "source": "x = 2\ny = 2"}]) != h
    assert nb([code, code]) != h  # cell boundaries count
    assert fingerprint.notebook_hash(tmp_path / "missing.ipynb") is None


def test_an_old_manifest_without_code_reruns(done):
    repo = done
    mpath = repo / "runs/ci/selection/manifest.json"
    m = json.loads(mpath.read_text())
    del m["code"]
    mpath.write_text(json.dumps(m))
    st = setup_stage("selection", str(repo / "profiles" / "ci.yaml"))
    assert "no profile reads or code fingerprint (written by an older version)" in st.stale_reason()
    release(st)


def test_a_reused_stage_keeps_the_code_record_it_was_computed_with(done, monkeypatch):
    repo = done
    mpath = repo / "runs/ci/selection/manifest.json"
    before = mpath.read_bytes()
    monkeypatch.setattr(stage_mod.fingerprint, "git_state", lambda: {"git_commit": "f" * 40, "git_dirty": False})
    assert run_fake_stage(repo, "selection") is False  # a commit of the same code is not a rerun
    assert mpath.read_bytes() == before


# ----------------------------------------------------------------------------- the table itself


def test_every_profile_key_is_read_by_some_stage_or_declared_unread():
    """A new profile field must be placed: read by a stage (a section read whole takes it in), or in NOT_READ."""
    for name in config.available_profiles():
        keys = pipeline.flatten(config.load_profile(name).to_dict())
        unread = [k for k in keys if k not in pipeline.NOT_READ and not any(pipeline.reads_key(s, k) for s in ORDER)]
        assert unread == [], name


def test_table_entries_name_real_profile_keys_and_stages():
    keys = pipeline.flatten(config.load_profile("toy").to_dict())
    for s in pipeline.PIPELINE.values():
        for k in (*s.reads, *s.skips):
            assert any(key == k or key.startswith(k + ".") for key in keys), (s.name, k)
        for k in s.skips:
            assert pipeline._covers(s.reads, k), (s.name, k)  # a skip takes a key out of a section the stage reads
        for up, _ in s.inputs.values():
            assert ORDER.index(up) < ORDER.index(s.name), (s.name, up)
    assert pipeline.downstream("selection") == ["refinement", "training", "evaluation", "tldr"]
    assert pipeline.downstream("evaluation") == ["tldr"]
    assert pipeline.downstream("tldr") == []


def _code_tree(nb: Path) -> ast.Module:
    """A notebook's code cells as one module (IPython magics and shell lines left out), parents marked."""
    lines = [line for c in fingerprint.notebook_code(nb) for line in c.splitlines()
             if not line.lstrip().startswith(("%", "!"))]
    tree = ast.parse("\n".join(lines))
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node
    return tree


def _notebook_reads(nb: Path, keys: dict) -> set[str]:
    """The profile keys (or sections) a notebook's code names: stage.profile.x.y, and P.x.y / C.y through aliases
    such as `P, C = stage.profile, stage.profile.selection`."""
    tree = _code_tree(nb)
    aliases: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for t, v in zip(targets, values):
                text = ast.unparse(v)
                if isinstance(t, ast.Name) and (text == "stage.profile" or text.startswith("stage.profile.")):
                    aliases[t.id] = text.split(".")[2:]
    uses = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(node.parent, ast.Attribute):
            continue
        parts, cur = [], node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        parts.reverse()
        if isinstance(cur, ast.Name) and cur.id == "stage" and parts[:1] == ["profile"]:
            path = parts[1:]
        elif isinstance(cur, ast.Name) and cur.id in aliases:
            path = aliases[cur.id] + parts
        else:
            continue
        # the longest prefix that is a profile key or section (P.toyworld.__class__, P.model.path.endswith)
        while path and not any(k == ".".join(path) or k.startswith(".".join(path) + ".") for k in keys):
            path = path[:-1]
        if path:
            uses.add(".".join(path))
    return uses


def test_the_notebook_scan_sees_aliased_reads_and_the_table_refuses_an_unread_key():
    keys = pipeline.flatten(config.load_profile("toy").to_dict())
    used = _notebook_reads(REPO / "notebooks" / "07_tldr.ipynb", keys)
    # P.training (a section passed on), C.eta (C = stage.profile.tldr), E.n_samples (E = ...evaluation)
    assert {"training", "tldr.eta", "evaluation.n_samples"} <= used
    assert pipeline.reads_key("tldr", "training.max_length") and not pipeline.reads_key("tldr", "training.lr")
    assert not pipeline.reads_key("tldr", "sampling.n") and pipeline.reads_key("tldr", "sampling.batch_size")


@pytest.mark.parametrize("stage", ORDER)
def test_what_a_notebook_reads_is_in_its_stage_reads(stage):
    """Every profile value a notebook names (P.sampling.batch_size, C.alpha, a dotted parameter key) is in the table."""
    nb = REPO / "notebooks" / pipeline.spec(stage).notebook
    keys = pipeline.flatten(config.load_profile("toy").to_dict())
    used = _notebook_reads(nb, keys)
    used |= {p.key for p in runner.notebook_params(nb).values() if p.key}
    assert used, stage
    missing = []
    for u in sorted(used):
        if u in pipeline.NOT_READ:
            continue  # the profile's name: the run folder itself
        assert any(k == u or k.startswith(u + ".") for k in keys), (stage, u)  # a real profile key
        under = [k for k in keys if k.startswith(u + ".")]  # a whole section passed on (refine_pairs(..., R))
        if not (pipeline.reads_key(stage, u) or any(pipeline.reads_key(stage, k) for k in under)):
            missing.append(u)
    assert missing == [], f"{stage} reads {missing}: add them to its reads in tsq_utils/core/pipeline.py"


def _strings(node: ast.AST) -> set[str]:
    return {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}


def _finish_outputs(nb: Path) -> set[str]:
    """The output names a notebook lists for stage.finish (the string constants of `outputs = ...` or outputs=...)."""
    names = set()
    for node in ast.walk(_code_tree(nb)):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "outputs" for t in node.targets):
            names |= _strings(node.value)
        if isinstance(node, ast.keyword) and node.arg == "outputs" and not isinstance(node.value, ast.Name):
            names |= _strings(node.value)
    return names


def _passed_inputs(nb: Path) -> set[str] | None:
    """The input names a notebook passes to is_done/finish (its `inputs = {...}` keys, base_inputs expanded); None
    when it passes none (then the table's are used)."""
    for node in ast.walk(_code_tree(nb)):
        names_assigned = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if not isinstance(node, ast.Assign) or "inputs" not in names_assigned:
            continue
        if not isinstance(node.value, ast.Dict):
            return set(pipeline.BASE_INPUTS) if "base_inputs" in ast.unparse(node.value) else {ast.unparse(node.value)}
        names = set()
        for k, v in zip(node.value.keys, node.value.values):
            if k is None:  # **base_model.base_inputs(...)
                names |= set(pipeline.BASE_INPUTS) if "base_inputs" in ast.unparse(v) else {ast.unparse(v)}
            else:
                names |= _strings(k)
        return names
    return None


@pytest.mark.parametrize("stage", ORDER)
def test_notebook_inputs_and_outputs_match_the_table(stage):
    s = pipeline.spec(stage)
    nb = REPO / "notebooks" / s.notebook
    passed = _passed_inputs(nb)
    if passed is not None:  # a notebook that calls is_done()/finish() without inputs uses the table's
        assert passed == set(s.input_names()), stage
    listed = _finish_outputs(nb)
    if listed:
        assert set(s.outputs) <= listed <= set(s.outputs) | set(s.optional_outputs), stage


def test_weights_copied_over_the_base_are_tampering_not_a_new_base(done):
    """Issue 26: trained weights copied over the base were recorded as "inputs changed: base_weights" by 03, then 00."""
    repo = done
    weights = repo / "runs/ci/base_model/model/model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"trained weights copied over the base")
    st = setup_stage("refinement", str(repo / "profiles" / "ci.yaml"))
    with pytest.raises(stage_mod.StaleArtifactError, match=r"base model's weights .*model.safetensors changed after "
                       r"notebooks/00_base_model.ipynb recorded them.*-p force True"):
        st.is_done()
    release(st)
    st = setup_stage("base_model", str(repo / "profiles" / "ci.yaml"))
    with pytest.raises(stage_mod.StaleArtifactError, match="changed after notebooks/00_base_model.ipynb recorded"):
        st.is_done()
    release(st)
    st = setup_stage("base_model", str(repo / "profiles" / "ci.yaml"), force=True)  # adopting them is explicit
    assert st.is_done() is False
    release(st)
    weights.write_bytes(good)
    assert run_pipeline(repo) == ["base_model"]  # the forced 00 was left incomplete; the same weights again after it
