"""The command line: real files in, one clear line out on bad input, exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from metarec_dist.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_import_then_describe_json_reports_counts(shared_data, tmp_path, capsys):
    store = tmp_path / "store"
    code, out, _ = run_cli(capsys, "data", "import", shared_data / "ml-100k" / "ml-100k.inter", "--store", store)
    assert code == 0 and "943 users" in out
    code, out, _ = run_cli(capsys, "data", "describe", "ml-100k", "--store", store, "--json")
    stats = json.loads(out)
    assert code == 0
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1_682, 100_000)
    assert stats["sequence_length"]["min"] >= 3


def test_import_options_reach_the_core(shared_data, tmp_path, capsys):
    store = tmp_path / "store"
    code, out, _ = run_cli(
        capsys, "data", "import", shared_data / "LastFM.txt", "--store", store, "--name", "lfm",
        "--max-length", "50", "--k-core", "10", "--json",
    )
    report = json.loads(out)
    assert code == 0 and report["name"] == "lfm"
    assert report["truncated"] > 0 and report["k_core_dropped"] > 0
    code, out, _ = run_cli(capsys, "data", "describe", "lfm", "--store", store, "--json")
    assert json.loads(out)["sequence_length"]["max"] == 50


def test_generate_then_list_shows_every_domain(tmp_path, capsys):
    store = tmp_path / "store"
    code, out, _ = run_cli(capsys, "data", "generate", "--store", store, "--set", "related_sources=1",
                           "--set", "unrelated_sources=1", "--set", "noise_sources=1")
    assert code == 0 and "4 synthetic domains" in out
    code, out, _ = run_cli(capsys, "data", "list", "--store", store, "--json")
    listed = json.loads(out)["domains"]
    assert [d["domain"] for d in listed] == ["syn-noise-00", "syn-related-00", "syn-target", "syn-unrelated-00"]
    assert {d["source"] for d in listed} == {"noise", "related", "target", "unrelated"}


def test_generate_reads_the_shipped_config(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "data", "generate", "--config", REPO_ROOT / "configs" / "synthetic.yaml",
                           "--store", tmp_path / "s")
    assert code == 0 and "syn-target" in out


def bad_inputs(tmp_path, shared_data):
    """(argv after 'data import', text the one error line must contain) per bad input."""
    malformed = tmp_path / "malformed.txt"
    malformed.write_text("1 2 3 4\n2 5 6\n3 7 eight 9\n")
    lone = tmp_path / "lone.txt"
    lone.write_text("1 2 3 4\n2\n")
    header = tmp_path / "header.csv"
    header.write_text("customer,product,time\n1,2,3\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x00\x01\x02PK\x03\x04" * 100)
    not_utf8 = tmp_path / "latin.txt"
    not_utf8.write_bytes(b"1 2 3\n2 \xff\xfe 4\n")
    bad_header = tmp_path / "bad.inter"
    bad_header.write_text("user_id\titem_id\n1\t2\n")
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("user_id,item_id\n1,2\n")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("user_id,item_id,timestamp\n1,2,3\n1,2\n")
    empty_ids = tmp_path / "gaps.csv"
    empty_ids.write_text("user_id,item_id,timestamp\n1,2,3\n,4,5\n")
    return [
        ([malformed], f"{malformed}:3: 'eight' is not a non-negative integer"),
        ([lone], f"{lone}:2: a user id with no items"),
        ([header], "no user column 'user_id'"),
        ([header, "--user-column", "customer"], "no item column 'item_id'"),
        ([empty], "the file is empty"),
        ([blank], "the file is empty"),
        ([binary], "binary file"),
        ([not_utf8], "not a sequence file"),
        ([bad_header], f"{bad_header}:1: header field 'user_id' is not NAME:TYPE"),
        ([not_parquet], "not a Parquet file"),
        ([ragged], "malformed CSV"),
        ([empty_ids], f"{empty_ids}:3: empty user value"),
        ([tmp_path / "missing.txt"], "no such file"),
        ([tmp_path], "is a directory"),
        ([tmp_path / "data.json"], "cannot tell the format"),
        ([shared_data / "Beauty.txt", "--min-length", "2"], "field 'min_sequence_length'"),
        ([shared_data / "Beauty.txt", "--name", "../x"], "domain name '../x' is not allowed"),
    ]


def test_each_bad_input_gets_one_clear_line_and_leaves_nothing(shared_data, tmp_path, capsys):
    store = tmp_path / "store"
    (tmp_path / "data.json").write_text("{}")
    for argv, expected in bad_inputs(tmp_path, shared_data):
        code, out, err = run_cli(capsys, "data", "import", *argv, "--store", store)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert expected in err, (expected, err)
        assert "Traceback" not in err
        assert not store.exists() or not any(store.iterdir()), f"{argv} left {list(store.iterdir())}"


def test_unreadable_file_is_a_clear_error(tmp_path, capsys):
    import os

    path = tmp_path / "secret.txt"
    path.write_text("1 2 3 4\n")
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: permissions do not stop reads")
    code, _, err = run_cli(capsys, "data", "import", path, "--store", tmp_path / "s")
    assert code == 2 and "permission denied" in err


def test_reimport_needs_overwrite_and_keeps_the_first_import(shared_data, tmp_path, capsys):
    store = tmp_path / "store"
    assert run_cli(capsys, "data", "import", shared_data / "LastFM.txt", "--store", store)[0] == 0
    code, _, err = run_cli(capsys, "data", "import", shared_data / "LastFM.txt", "--store", store, "--max-length", "5")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    _, out, _ = run_cli(capsys, "data", "describe", "LastFM", "--store", store, "--json")
    assert json.loads(out)["interactions"] == 52_551
    code, _, _ = run_cli(capsys, "data", "import", shared_data / "LastFM.txt", "--store", store,
                         "--max-length", "5", "--overwrite")
    _, out, _ = run_cli(capsys, "data", "describe", "LastFM", "--store", store, "--json")
    assert code == 0 and json.loads(out)["sequence_length"]["max"] == 5


def test_describe_of_a_missing_domain_is_a_clear_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "data", "describe", "Beauty", "--store", tmp_path / "empty")
    assert code == 2 and "no domain 'Beauty'" in err


def test_bad_generator_config_names_the_field(tmp_path, capsys):
    config = tmp_path / "gen.yaml"
    config.write_text("seed: 1\nrelated_sourcez: 3\n")
    code, _, err = run_cli(capsys, "data", "generate", "--config", config, "--store", tmp_path / "s")
    assert code == 2 and "unknown key 'related_sourcez'" in err and str(config) in err
    code, _, err = run_cli(capsys, "data", "generate", "--set", "source_users=[10, 5]", "--store", tmp_path / "s")
    assert code == 2 and "source_users" in err


def test_console_script_exits_non_zero_without_traceback(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 a b\n")
    done = subprocess.run(
        [sys.executable, "-m", "metarec_dist", "data", "import", str(bad), "--store", str(tmp_path / "s")],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {bad}:1: 'a' is not a non-negative integer id; " \
        "sequence files hold integer ids only (use --format csv for other ids)"
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
