"""--config files of the jobs: every way a file can be wrong is a one-line error and exit
code 2 (no traceback), before any work starts; YAML and JSON (.json) both read."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from schemas.settings_file import SettingsFileError, read_settings_file

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_json_mappings_read(tmp_path):
    (tmp_path / "a.yaml").write_text("output: out\namg:\n  points_per_side: 8\n")
    (tmp_path / "b.json").write_text('{\n\t"output": "out",\n\t"amg": {"points_per_side": 8}\n}')  # tab-indented
    (tmp_path / "empty.yaml").write_text("")
    expected = {"output": "out", "amg": {"points_per_side": 8}}
    assert read_settings_file(tmp_path / "a.yaml") == expected
    assert read_settings_file(tmp_path / "b.json") == expected
    assert read_settings_file(tmp_path / "empty.yaml") == {}


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "broken.yaml").write_text("output: [out\namg: {\n")
    (tmp_path / "broken.json").write_text('{"output": "out",}')
    (tmp_path / "list.yaml").write_text("- output\n- out\n")
    (tmp_path / "latin1.yaml").write_bytes("output: caf\xe9\n".encode("latin-1"))
    (tmp_path / "folder").mkdir()
    return {
        "missing": (tmp_path / "missing.yaml", "no such file"),
        "broken yaml": (tmp_path / "broken.yaml", "not valid YAML at line"),
        "broken json": (tmp_path / "broken.json", "not valid JSON at line 1"),
        "not a mapping": (tmp_path / "list.yaml", "must hold a mapping of settings (field: value), not a list"),
        "not utf-8": (tmp_path / "latin1.yaml", "not UTF-8 text"),
        "a folder": (tmp_path / "folder", "is a folder"),
    }


def test_each_bad_file_is_one_error_naming_it(tmp_path):
    for path, message in bad_files(tmp_path).values():
        with pytest.raises(SettingsFileError) as e:
            read_settings_file(path)
        assert str(e.value).startswith(f"--config {path}: ") and message in str(e.value)


@pytest.mark.parametrize("job", ["auto_annotate.py", "data_engine.py", "train.py"])
def test_jobs_exit_2_on_a_bad_settings_file(tmp_path, job):
    files = bad_files(tmp_path)
    for path, message in (files["missing"], files["broken yaml"]):  # every kind is covered above
        r = subprocess.run([sys.executable, f"jobs/{job}", "--config", str(path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2, (job, path, r.stderr[-2000:])
        assert message in r.stderr and "Traceback" not in r.stderr


def test_train_exits_2_on_a_bad_value_in_its_settings_file(tmp_path):
    (tmp_path / "train.yaml").write_text("steps: -3\n")
    r = subprocess.run([sys.executable, "jobs/train.py", "--config", str(tmp_path / "train.yaml")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "steps" in r.stderr and "Traceback" not in r.stderr
