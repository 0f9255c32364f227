"""results/paper/paper_numbers.yaml: the published numbers the paper/* reproductions are compared against.

Checks the schema (fields, types, unique ids, allowed papers and experiments, null values carry a claim),
that every paper experiment has at least one entry, and a few internal consistencies of the transcriptions
(table averages against their columns, the lorabench arithmetic) that catch a mistyped digit.
"""
from pathlib import Path

import pytest
import yaml

PATH = Path(__file__).resolve().parents[1] / "results" / "paper" / "paper_numbers.yaml"

# every paper experiment (conf/experiment/paper/<name>.yaml) except our own finding, which no paper reports
OWN_FINDINGS = frozenset({"paper/lr_fairness", "paper/lr_fairness_lm"})
ALLOWED_EXPERIMENTS = frozenset(
    f"paper/{p.stem}" for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment" / "paper").glob("*.yaml")
) - OWN_FINDINGS
ALLOWED_PAPERS = frozenset({"lora", "dora", "loraplus", "rslora", "galore", "adalora", "lorabench"})
REQUIRED_STR = ("id", "paper", "citation", "where", "row", "column", "metric", "setting", "experiment", "source")
OPTIONAL_STR = ("claim", "note")
ALL_KEYS = frozenset(REQUIRED_STR + OPTIONAL_STR + ("value", "verified"))


@pytest.fixture(scope="module")
def entries():
    data = yaml.safe_load(PATH.read_text(encoding="utf-8"))
    assert isinstance(data, list) and data, "paper_numbers.yaml must be a non-empty YAML list"
    return data


@pytest.fixture(scope="module")
def by_id(entries):
    return {e["id"]: e for e in entries}


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def test_entries_have_the_required_fields_and_types(entries):
    problems = []
    for i, e in enumerate(entries):
        where = f"entry {i} ({e.get('id', '?') if isinstance(e, dict) else e!r})"
        if not isinstance(e, dict):
            problems.append(f"{where}: not a mapping")
            continue
        if unknown := set(e) - ALL_KEYS:
            problems.append(f"{where}: unknown fields {sorted(unknown)}")
        for k in REQUIRED_STR:
            if not isinstance(e.get(k), str) or not e[k].strip():
                problems.append(f"{where}: '{k}' must be a non-empty string")
        for k in OPTIONAL_STR:
            if k in e and (not isinstance(e[k], str) or not e[k].strip()):
                problems.append(f"{where}: '{k}' must be a non-empty string when present")
        if "value" not in e:
            problems.append(f"{where}: 'value' is required (a number, or null with a claim)")
        elif e["value"] is None:
            if not isinstance(e.get("claim"), str) or not e["claim"].strip():
                problems.append(f"{where}: value is null, so 'claim' must hold the paper's statement")
        elif not _is_number(e["value"]):
            problems.append(f"{where}: 'value' must be a number or null, got {e['value']!r}")
        if not isinstance(e.get("verified"), bool):
            problems.append(f"{where}: 'verified' must be true or false")
        if e.get("paper") not in ALLOWED_PAPERS:
            problems.append(f"{where}: paper {e.get('paper')!r} not in {sorted(ALLOWED_PAPERS)}")
        if e.get("experiment") not in ALLOWED_EXPERIMENTS:
            problems.append(f"{where}: experiment {e.get('experiment')!r} not in the allowed list")
    assert not problems, "\n".join(problems)


def test_ids_are_unique(entries):
    ids = [e["id"] for e in entries]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"duplicate ids: {dupes}"


def test_every_experiment_has_an_entry(entries):
    missing = ALLOWED_EXPERIMENTS - {e["experiment"] for e in entries}
    assert not missing, f"experiments without any paper number: {sorted(missing)}"


def test_unverified_entries_say_why(entries):
    silent = [e["id"] for e in entries if not e["verified"] and not e.get("note")]
    assert not silent, f"verified: false needs a note on what could and could not be checked: {silent}"


def test_galore_table4_averages_match_their_columns(by_id):
    tasks = ("cola", "stsb", "mrpc", "rte", "sst2", "mnli", "qnli", "qqp")
    for row in ("full", "galore-r4", "lora-r4", "galore-r8", "lora-r8"):
        cols = [by_id[f"galore-t4-{row}-{t}"]["value"] for t in tasks]
        assert sum(cols) / len(cols) == pytest.approx(by_id[f"galore-t4-{row}-avg"]["value"], abs=0.006), row


def test_adalora_table1_averages_match_their_columns(by_id):
    # "All Ave." averages the 8 tasks, with MNLI m/mm and QQP Acc/F1 each averaged first.
    for row in ("full", "lora-r8", "adalora-1.27m", "lora-r2", "adalora-0.32m"):
        v = {c: by_id[f"adalora-t1-{row}-{c}"]["value"] for c in (
            "mnli-m", "mnli-mm", "sst2", "cola", "qqp-acc", "qqp-f1", "qnli", "rte", "mrpc", "stsb", "avg")}
        tasks = [(v["mnli-m"] + v["mnli-mm"]) / 2, v["sst2"], v["cola"], (v["qqp-acc"] + v["qqp-f1"]) / 2,
                 v["qnli"], v["rte"], v["mrpc"], v["stsb"]]
        assert sum(tasks) / len(tasks) == pytest.approx(v["avg"], abs=0.011), row


def test_lora_table7_amplification_is_the_ratio_of_its_norms(by_id):
    ratio = by_id["lora-t7-dwq-norm-r4"]["value"] / by_id["lora-t7-proj-r4-dwq"]["value"]
    assert ratio == pytest.approx(by_id["lora-amplification-r4"]["value"], abs=0.1)  # 6.91/0.32 = 21.59 ≈ 21.5
    ratio64 = by_id["lora-t7-dwq-norm-r64"]["value"] / by_id["lora-t7-proj-r64-dwq"]["value"]
    assert ratio64 == pytest.approx(by_id["lora-amplification-r64"]["value"], abs=0.15)  # 1.88, "around 2"


def test_lorabench_rank1_arithmetic(by_id):
    dims = [(784, 1000), (1000, 2000), (2000, 10)]
    trainable = sum(1 * (i + o) for i, o in dims)
    base = sum(i * o + o for i, o in dims)
    assert trainable == by_id["lorabench-digits-rank1-trainable"]["value"] == 6794
    assert base == by_id["lorabench-digits-base-params"]["value"] == 2_807_010
    assert round(100 * trainable / base, 3) == by_id["lorabench-digits-rank1-pct"]["value"]
