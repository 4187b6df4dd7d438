"""``mmm4rec data build`` / ``inspect`` through ``data_shards.cli`` (the main CLI mounts
the same ``register``)."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from data_shards import cli, read_manifest

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def test_register_adds_the_data_group_with_help(capsys):
    parser = argparse.ArgumentParser(prog="mmm4rec")
    cli.register(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["data", "build", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for needle in ("usage: mmm4rec data build", "--format {amazon2018,lcrec,recbole,unisrec}", "--input", "--out",
                   "--skip-bad", "--shard-size", "--image-features", "s3://", "AWS_ENDPOINT_URL"):
        assert needle in out, needle
    args = parser.parse_args(["data", "inspect", "somewhere"])
    assert args.func.__name__ == "_inspect"


def test_build_prints_a_summary_table_and_inspect_verifies(tmp_path, capsys):
    out = tmp_path / "office"
    assert cli.main(["data", "build", "--format", "lcrec", "--input", str(SAMPLES / "office"), "--out", str(out),
                     "--text-encoder", "none", "--shard-size", "500"]) == 0
    text = capsys.readouterr().out
    assert "split  users  samples" in text
    assert "train   1499    12787" in text
    assert "after 5-core       1499    398         17284" in text
    assert "sequences      3" in text
    assert read_manifest(str(out))["build"]["shard_size"] == 500
    assert cli.main(["data", "inspect", str(out), "--verify"]) == 0
    assert "verified 4 shards against the manifest checksums" in capsys.readouterr().out


def test_multi_domain_build_with_image_features(tmp_path, capsys):
    feat = SAMPLES / "scientific_mm" / "Scientific.feat3CLS"
    assert cli.main(["data", "build", "--text-encoder", "none", "--out", str(tmp_path / "mix"),
                     "--format", "lcrec", "--input", str(SAMPLES / "office"), "--domain", "office",
                     "--image-features", "-",
                     "--format", "unisrec", "--input", str(SAMPLES / "scientific_mm"), "--domain", "sci",
                     "--image-features", f"{feat},dim=512,encoder=CLIP ViT-B/32"]) == 0
    m = read_manifest(str(tmp_path / "mix"))
    assert m["name"] == "office+sci" and m["num_users"] == 1499 + 2928
    assert m["features"]["image"] == {"dim": 512, "dtype": "float32", "encoder": "CLIP ViT-B/32", "present": 1585}


def test_bad_records_stop_the_build_unless_skip_bad(tmp_path, capsys):
    src = tmp_path / "office_src"
    shutil.copytree(SAMPLES / "office", src)
    inter = json.loads((src / "Office.inter.json").read_text())
    inter["0"] = "not a list"
    (src / "Office.inter.json").write_text(json.dumps(inter))
    argv = ["data", "build", "--format", "lcrec", "--input", str(src), "--out", str(tmp_path / "o"),
            "--text-encoder", "none"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Office.inter.json: user 0: malformed record: expected a list of integer item ids" in err
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert cli.main(argv + ["--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad record(s): 1 malformed row" in out
    assert "Office.inter.json: user 0: malformed record" in out
    assert read_manifest(str(tmp_path / "o"))["dataset"]["bad_records"]["skipped"] == 1


def test_max_users_per_source_in_a_mix(tmp_path, capsys):
    """``--max-users``: once for every source or once per source ('-' = all); recorded in
    the manifest per domain and printed; a bad value is one line and exit 2."""
    base = ["data", "build", "--text-encoder", "none", "--k-core", "0",
            "--format", "lcrec", "--input", str(SAMPLES / "office"), "--domain", "office",
            "--format", "unisrec", "--input", str(SAMPLES / "scientific_mm"), "--domain", "sci"]
    assert cli.main([*base, "--max-users", "100", "--max-users", "-", "--sample-seed", "3",
                     "--out", str(tmp_path / "mix")]) == 0
    out = capsys.readouterr().out
    assert "office: users sampled: 100 of 1499 (seed 3), before the k-core filter" in out
    m = read_manifest(str(tmp_path / "mix"))
    office, sci = m["dataset"]["domains"]
    assert office["sample"] == {"max_users": 100, "seed": 3, "users_before": 1499} and office["counts"]["users"] == 100
    assert sci["sample"] is None and sci["counts"]["users"] == 2928
    assert m["num_users"] == 100 + 2928
    assert cli.main([*base, "--max-users", "50", "--out", str(tmp_path / "both")]) == 0
    assert [d["counts"]["users"] for d in read_manifest(str(tmp_path / "both"))["dataset"]["domains"]] == [50, 50]
    capsys.readouterr()
    assert cli.main([*base, "--max-users", "1", "--max-users", "2", "--max-users", "3",
                     "--out", str(tmp_path / "bad")]) == 2
    assert "--max-users: given 3 times for 2 source(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main([*base, "--max-users", "0", "--out", str(tmp_path / "bad")])
    assert exit_.value.code == 2
    assert "argument --max-users: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
