"""The transfer study script (benchmarks/transfer.py, docs/transfer.md) runs end to end in
``--quick`` mode on the real shared data: every step through the project's commands, every
run's metrics.json read back, results JSON/Markdown/PNG written. A test of the script,
not of its numbers."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    return importlib.import_module("benchmarks.transfer")


def _run(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "benchmarks.transfer", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_scientific_title_only_text(shared_data):
    """The pretraining sets' item text is the title alone: every Scientific row
    'title. categories. brand. ' gives a non-empty title that starts the full text."""
    mod = _load()
    rows = (shared_data / "unisrec_scientific" / "Scientific.text").read_text(encoding="utf-8").splitlines()[1:]
    titles = {}
    for row in rows:
        asin, text = row.split("\t", 1)
        title = mod.scientific_title(text)
        assert title and text.startswith(title) and len(title) < len(text), row
        titles[asin] = title
    assert len(titles) == 4385
    assert titles["B0000223SI"] == ("PORTER-CABLE 740000801 4 1/2-Inch x 10yd 80 Grit Adhesive-Backed "
                                    "Sanding Roll")
    assert mod.scientific_title("Schwinn Roadster Kid's Tricycle, 12-Inch Wheel. . Schwinn. ") == \
        "Schwinn Roadster Kid's Tricycle, 12-Inch Wheel"


def test_a_run_cut_before_its_first_epoch_is_a_fractional_point(tmp_path):
    """The trainer's mid-epoch stop (train.max_wall_time before epoch 1 ends) leaves no
    history, one evaluation: the study plots it at steps / steps-per-epoch."""
    mod = _load()
    shards, run = tmp_path / "shards", tmp_path / "run"
    shards.mkdir()
    run.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"splits": {"train": {"samples": 34101}}}))
    (run / "config.yaml").write_text(f"data: {{url: {shards}, batch_size: 1024}}\n"
                                     "train: {gradient_accumulation_steps: 8, steps_per_epoch: 0}\n")
    m = {"history": [], "best_valid": {"ndcg@10": 0.031, "hr@10": 0.06}, "best_step": 2, "world_size": 1,
         "timings": {"train_seconds": 1500.0, "eval_seconds": 90.0}}
    assert mod._steps_per_epoch(m, run) == 5       # 34 micro-batches of 1024, 8 per step
    (point,) = mod._partial_point(m, run)
    assert point == {"epoch": 0.4, "value": 0.031, "seconds": 1590.0, "partial": True, "steps": 2,
                     "steps_per_epoch": 5}
    entry = {"partial_epoch": 0.4, "curve": [point]}
    assert mod._ran(entry) == "0.40 (2 of 5 steps of epoch 1)"
    assert mod._partial_point({**m, "history": [{"epoch": 1, "valid/ndcg@10": 0.1}]}, run) == []


def test_bad_input_is_one_line_exit_2(tmp_path):
    proc = _run("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--quick")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"python -m benchmarks.transfer: error: --data {tmp_path / 'nowhere'}: "
                                   "not a directory (the shared data folder holding seqrec_benchmark/, "
                                   "unisrec_scientific/ and missrec_scientific_mm_subset/)")
    (tmp_path / "data").mkdir()
    proc = _run("--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--runs", "a,zz")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "python -m benchmarks.transfer: error: --runs: unknown run(s) ['zz']; choose from " \
                                  "a,b,c,d,e,title"
    proc = _run("--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--pretrain-epochs", "0")
    assert proc.returncode == 2 and "--pretrain-epochs: must be >= 1" in proc.stderr


@pytest.mark.slow
def test_quick_study_end_to_end(shared_data, tmp_path):
    out = tmp_path / "study"
    proc = _run("--data", str(shared_data), "--out", str(out), "--quick")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    res = json.loads((out / "results.json").read_text())
    assert res["plan"]["domains"] == ["amazon2014-beauty", "amazon2014-toy"]
    assert list(res["runs"]) == ["a", "c", "d", "b", "title", "e"]
    for r, e in res["runs"].items():
        assert e["finished"], r
        assert e["epochs_run"] == 1 and e["best_epoch"] == 1, r
        assert all(0.0 <= e["test"][k] <= 1.0 for k in ("hr@10", "ndcg@10", "hr@50", "ndcg@50")), (r, e["test"])
        assert e["test"]["hr@50"] >= e["test"]["hr@10"], r
        assert len(e["curve"]) == 1 and e["curve"][0]["seconds"] > 0, (r, e["curve"])
    # what each run was: its own resolved config (the study's --set overrides applied)
    import yaml

    cfg = {r: yaml.safe_load((out / "runs" / f"ft-{r}" / "config.yaml").read_text()) for r in res["runs"]}
    assert cfg["a"]["train"]["init_from"] == str(out / "exports" / "pretrain") and cfg["a"]["model"]["use_id"]
    assert cfg["b"]["train"]["init_from"] == str(out / "exports" / "pretrain") and not cfg["b"]["model"]["use_id"]
    assert cfg["c"]["train"]["init_from"] is None and cfg["c"]["model"]["use_id"]
    assert cfg["d"]["model"]["type"] == "sasrec"
    assert cfg["e"]["train"]["init_from"] == str(out / "exports" / "pretrain_ml")
    assert cfg["title"]["data"]["url"] == str(out / "shards" / "scientific_title")
    # the pretraining mixes: per-domain user samples, real timestamps; MovieLens only in pretrain_ml
    pre = json.loads((out / "shards" / "pretrain" / "manifest.json").read_text())
    assert pre["time_source"] == "timestamp"
    assert [d["name"] for d in pre["dataset"]["domains"]] == ["amazon2014-beauty", "amazon2014-toy"]
    assert all(d["sample"]["max_users"] == 40 and d["counts"]["users"] == 40 for d in pre["dataset"]["domains"])
    ml = json.loads((out / "shards" / "pretrain_ml" / "manifest.json").read_text())
    assert [d["name"] for d in ml["dataset"]["domains"]][-1] == "movielens-1m"
    # the title-only target differs from the full one only in its item text
    import numpy as np

    from data_shards import load_item_table

    full, title = load_item_table(str(out / "shards" / "scientific")), load_item_table(str(out / "shards" /
                                                                                             "scientific_title"))
    assert list(full.item_ids) == list(title.item_ids)
    assert all(f.startswith(t) and len(t) < len(f) for f, t in zip(full.item_text[1:], title.item_text[1:]))
    np.testing.assert_array_equal(full.image, title.image)
    assert full.image_mask.sum() > 0
    md = (out / "results.md").read_text()
    assert "(a) pretrained, ID term" in md and "(d) SASRec scratch" in md and "Expectations:" in md
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    claims = [x["claim"] for x in res["expectations"]]
    assert "(a) beats (c) on test NDCG@10" in claims and all("outcome" in x for x in res["expectations"])
    # a second invocation reuses every finished step and rewrites the same results
    again = _run("--data", str(shared_data), "--out", str(out), "--quick")
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "exist, reused" in again.stdout
    assert "[transfer] fine-tune " not in again.stdout and "[transfer] pretrain " not in again.stdout
    res2 = json.loads((out / "results.json").read_text())
    assert res2["runs"] == res["runs"]
    # a variant of the same study (issue 28): its own pretraining (tag, overrides), a fine-tuning
    # override and two seeds; one record per fine-tuning run, and the doc table made from them
    records, doc = tmp_path / "records.json", tmp_path / "doc.md"
    var = _run("--data", str(shared_data), "--out", str(out), "--quick", "--runs", "a,c", "--pretrain-tag", "id",
               "--pretrain-set", "model.use_id=true", "--finetune-tag", "rows", "--finetune-set",
               "train.param_groups.rows.lr_scale=0.5", "--seeds", "2020,2021", "--records", str(records))
    assert var.returncode == 0, (var.stdout + var.stderr)[-3000:]
    assert "shards pretrain: exist, reused" in var.stdout and "[transfer] pretrain pretrain-id:" in var.stdout
    pre_cfg = yaml.safe_load((out / "runs" / "pretrain-id" / "config.yaml").read_text())
    assert pre_cfg["model"]["use_id"] is True
    recs = {r["name"]: r for r in json.loads(records.read_text())}
    assert set(recs) == {"a-id-rows-s2020", "a-id-rows-s2021", "c-rows-s2020", "c-rows-s2021"}
    a = recs["a-id-rows-s2021"]
    assert a["seed"] == 2021 and a["start"] == "pretrained" and a["pretraining"]["name"] == "pretrain-id"
    assert a["pretraining"]["overrides"] == ["model.use_id=true"] and a["pretraining_samples_seen"] == 2 * 128
    assert a["overrides"] == ["train.param_groups.rows.lr_scale=0.5"] and a["git_commit"]
    assert recs["c-rows-s2020"]["start"] == "scratch" and recs["c-rows-s2020"]["pretraining"] is None
    ft = yaml.safe_load((out / "runs" / "ft-a-id-rows-s2021" / "config.yaml").read_text())
    assert ft["train"]["seed"] == 2021 and ft["train"]["param_groups"]["rows"]["lr_scale"] == 0.5
    assert ft["train"]["init_from"] == str(out / "exports" / "pretrain-id")
    doc.write_text("# x\n\n<!-- transfer_results: generated by python -m benchmarks.transfer --report-only "
                   "--records ... -->\nold\n<!-- /transfer_results -->\ntail\n")
    rep = _run("--report-only", "--records", str(records), "--doc", str(doc))
    assert rep.returncode == 0, rep.stderr
    text = doc.read_text()
    assert "old" not in text and text.endswith("tail\n") and text.count("| (a) pretrained, ID term [a-id-rows-s") == 2
    assert "| a-id-rows | 2 |" in text        # the mean over the two seeds
