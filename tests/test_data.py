"""Tests for tsq_utils.task.data: benchmark loaders (local files, hub path), the R1 prompt, R1 traces."""

import datasets
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from tsq_utils.task.data import (
    BENCHMARK_COLUMNS,
    BENCHMARKS,
    R1_INSTRUCTION,
    BenchmarkLoadError,
    load_benchmark,
    load_r1_traces,
    normalize_number,
    parse_gsm8k_answer,
    r1_prompt,
    read_jsonl,
)

AIME25_7B = "aime25_DeepSeek-R1-Distill-Qwen-7B_aime_25_rollout_temperature0.6.jsonl"
AIME25_15B = "aime25_DeepSeek-R1-Distill-Qwen-1.5B_aime_25_rollout_temperature0.6.jsonl"


def local(shared_data, name):
    return load_benchmark(name, shared_data / BENCHMARKS[name].local_file)


# ----------------------------------------------------------------------------- local files


@pytest.mark.parametrize(
    "name, n, first_id, first_gold",
    [
        ("math500", 500, "math500/test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("gsm8k", 1319, "gsm8k/0", "18"),
        ("aime24", 30, "aime24/60", "204"),
        ("amc23", 40, "amc23/0", "27"),
        ("aime25", 30, "aime25/0", "70"),
    ],
)
def test_local_loaders_counts_and_golds(shared_data, name, n, first_id, first_gold):
    df = local(shared_data, name)
    assert list(df.columns) == BENCHMARK_COLUMNS
    assert len(df) == n == BENCHMARKS[name].n
    assert df["problem_id"].is_unique
    assert (df["problem"].str.len() >= 20).all() and (df["gold"].str.len() > 0).all()
    assert df["k"].dtype.kind == "i"
    assert df.iloc[0]["problem_id"] == first_id
    assert df.iloc[0]["gold"] == first_gold
    assert set(df["source"]) == {str(shared_data / BENCHMARKS[name].local_file)}


def test_math500_levels_and_known_golds(shared_data):
    df = local(shared_data, "math500")
    # MATH500 level counts (openai/prm800k test split)
    assert df["k"].value_counts().sort_index().to_dict() == {1: 43, 2: 90, 3: 105, 4: 128, 5: 134}
    assert df.iloc[0]["k"] == 2
    golds = df["gold"].tolist()
    assert golds[1] == "p - q"
    assert golds[2] == "\\frac{14}{3}" and golds[4] == "\\text{Evelyn}"
    assert {"x \\in [-2,7]", "\\text{(C)}", "5.4 \\text{ cents}"} <= set(golds)


def test_gsm8k_golds_are_plain_integers(shared_data):
    df = local(shared_data, "gsm8k")
    assert df["gold"].str.fullmatch(r"-?\d+").all()
    assert df["gold"].head(5).tolist() == ["18", "3", "70000", "540", "20"]
    # "#### 2,125" in the source: commas go
    raw = read_jsonl(shared_data / "gsm8k_test.jsonl")
    i = next(i for i, r in enumerate(raw) if r["answer"].endswith("#### 2,125"))
    assert df.iloc[i]["gold"] == "2125"


def test_amc_aime_golds_are_normalised(shared_data):
    amc = local(shared_data, "amc23")
    assert amc["gold"].head(6).tolist() == ["27", "36", "45", "3159", "36", "7"]
    assert "-1" in amc["gold"].tolist()
    assert not amc["gold"].str.contains(".", regex=False).any()
    aime24 = local(shared_data, "aime24")
    assert aime24["gold"].tolist()[:3] == ["204", "113", "371"]
    aime25 = local(shared_data, "aime25")
    assert aime25["gold"].tolist()[:4] == ["70", "588", "16", "117"]
    assert aime25["problem"].iloc[0].startswith("Find the sum of all integer bases $b>9$")
    # the 1.5B rollout file holds the same problems
    assert load_benchmark("aime25", shared_data / AIME25_15B)["gold"].tolist() == aime25["gold"].tolist()


def test_limit(shared_data):
    df = load_benchmark("gsm8k", shared_data / "gsm8k_test.jsonl", limit=5)
    assert df["problem_id"].tolist() == [f"gsm8k/{i}" for i in range(5)]
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("gsm8k", shared_data / "gsm8k_test.jsonl", limit=0)


def test_parse_gsm8k_answer_and_normalize_number():
    assert parse_gsm8k_answer("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert parse_gsm8k_answer("... \n#### 1,450,000") == "1450000"
    assert parse_gsm8k_answer("#### -3") == "-3"
    with pytest.raises(ValueError, match="####"):
        parse_gsm8k_answer("the answer is 18")
    assert normalize_number("27.0") == "27"
    assert normalize_number(27.0) == "27"
    assert normalize_number(-1.0) == "-1"
    assert normalize_number("2.50") == "2.5"
    assert normalize_number(12345678901234567890) == "12345678901234567890"  # no float rounding
    assert normalize_number("\\frac{1}{2}") == "\\frac{1}{2}"


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="math500, aime24, aime25, gsm8k, amc23"):
        load_benchmark("math5000")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_benchmark("gsm8k", tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2"):
        load_benchmark("gsm8k", bad)
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"question": "What is 1+1?", "solution": "2"}\n')
    with pytest.raises(ValueError, match="record 0 .*no answer field"):
        load_benchmark("gsm8k", no_answer)
    no_marker = tmp_path / "no_marker.jsonl"
    no_marker.write_text('{"question": "What is 1+1?", "answer": "2"}\n')
    with pytest.raises(ValueError, match="####"):
        load_benchmark("gsm8k", no_marker)


# ----------------------------------------------------------------------------- hub path


def test_hub_unreachable_says_to_pass_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/MATH-500' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BenchmarkLoadError, match="local_path") as err:
        load_benchmark("math500")
    assert "math500_test.jsonl" in str(err.value) and "HuggingFaceH4/MATH-500" in str(err.value)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_hub_rows_are_normalised(monkeypatch, name):
    # rows in each hub dataset's own schema (the field names its card documents)
    hub_rows = {
        "math500": [{"problem": "P1", "solution": "s", "answer": "\\frac{1}{2}", "subject": "Algebra",
                     "level": 3, "unique_id": "test/algebra/1.json"}],
        "aime24": [{"id": 60, "problem": "P1", "solution": "s", "answer": "204", "url": "u", "year": "2024"}],
        "aime25": [{"problem": "P1", "answer": "70", "id": "0"}],
        "gsm8k": [{"question": "P1", "answer": "work <<1+1=2>>2\n#### 1,002"}],
        "amc23": [{"id": 0, "question": "P1", "answer": 27.0, "url": "u"}],
        "math_train": [{"problem": "P1", "level": "Level 3", "type": "Algebra",
                        "solution": "So $x = \\boxed{2}$, and the answer is $\\boxed{\\frac{1}{2}}$."}],
    }[name]
    expected_gold = {"math500": "\\frac{1}{2}", "aime24": "204", "aime25": "70", "gsm8k": "1002", "amc23": "27",
                     "math_train": "\\frac{1}{2}"}
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list(hub_rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    df = load_benchmark(name)
    spec = BENCHMARKS[name]
    assert calls == [(spec.hub_id, spec.config, {"split": spec.split})]  # never trust_remote_code
    assert df.iloc[0]["problem"] == "P1"
    assert df.iloc[0]["gold"] == expected_gold[name]
    assert df.iloc[0]["k"] == (3 if name in ("math500", "math_train") else 0)
    assert df.iloc[0]["source"] == f"hf:{spec.hub_id}"


# ----------------------------------------------------------------------------- prompts


def tiny_tokenizer(chat_template):
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = chat_template
    return tok


# shaped like the DeepSeek-R1-Distill templates, before and after they began opening <think> themselves
TEMPLATE_NEW = (
    "<|begin|>{% for m in messages %}<|User|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)
TEMPLATE_OLD = TEMPLATE_NEW.replace("<think>\n", "")


def test_r1_prompt_plain():
    assert r1_prompt("  What is 1+1?\n") == "What is 1+1?\n" + R1_INSTRUCTION
    assert R1_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.mark.parametrize("template", [TEMPLATE_NEW, TEMPLATE_OLD])
def test_r1_prompt_chat_template_ends_with_one_think(template):
    p = r1_prompt("What is 1+1?", tiny_tokenizer(template))
    assert p == "<|begin|><|User|>What is 1+1?\n" + R1_INSTRUCTION + "<|Assistant|><think>\n"
    assert p.count("<think>") == 1


def test_r1_prompt_needs_a_chat_template():
    with pytest.raises(ValueError, match="chat template"):
        r1_prompt("What is 1+1?", tiny_tokenizer(None))


# ----------------------------------------------------------------------------- R1 traces


def test_load_r1_traces(shared_data):
    tr7 = load_r1_traces(shared_data / AIME25_7B)
    tr15 = load_r1_traces(shared_data / AIME25_15B)
    for tr, n_correct, n_finished in ((tr7, 12, 27), (tr15, 7, 25)):
        assert list(tr.columns) == ["problem_id", "problem", "completion", "is_correct", "gold", "extracted_answer"]
        assert len(tr) == 30
        assert tr["is_correct"].sum() == n_correct
        assert tr["completion"].str.contains("</think>", regex=False).sum() == n_finished
        # every completion continues a prompt that ends with "<think>\n"
        assert not tr["completion"].str.startswith("<think>").any()
    assert tr7["gold"].iloc[0] == "70" and tr7["extracted_answer"].iloc[0] == "70"
    assert tr7["completion"].iloc[0].startswith("Okay, so I have this problem")
    with pytest.raises(ValueError, match="rollout"):
        load_r1_traces(shared_data / "aime24_test.jsonl")
