"""--config files of the jobs: every way a file can be wrong is a one-line error and exit
code 2 (no traceback), before any work starts; YAML and JSON (.json) both read. So are bad
values, from the file or flags: one line naming every bad field."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

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


def test_a_validation_error_is_one_line_naming_each_field():
    """pydantic's own text spends lines and a URL on each field; a job prints one line with
    dotted field paths, the value given, and a model-level reason without a field."""
    from jobs.auto_annotate import load_config
    from schemas.interactive import EngineConfig
    from schemas.settings_file import settings_error_message

    with pytest.raises(ValidationError) as e:
        load_config(["--pred-iou-thresh", "2", "--points-per-side", "x"])
    assert settings_error_message(e.value) == (
        "error: invalid settings: amg.points_per_side: Input should be a valid integer, unable to parse string as "
        "an integer (got 'x'); amg.pred_iou_thresh: Input should be less than or equal to 1 (got '2')")
    with pytest.raises(ValidationError) as e:
        EngineConfig(images_from="ds", output="ds")
    assert settings_error_message(e.value) == ("error: invalid settings: output must be a different dataset root "
                                               "from the one images or pre-fill come from")


def test_a_section_of_the_file_that_is_not_a_mapping_is_named(tmp_path):
    """`amg: [...]` in the file, with generator flags on top, is refused as a bad value of
    amg (not a TypeError from merging the flags into it)."""
    from jobs.auto_annotate import load_config
    from schemas.settings_file import settings_error_message

    (tmp_path / "run.yaml").write_text("amg: [8, 0.9]\nencoder: 4\n")
    with pytest.raises(ValidationError) as e:
        load_config(["--config", str(tmp_path / "run.yaml"), "--points-per-side", "8", "--encoder-actors", "2"])
    message = settings_error_message(e.value)
    assert message.startswith("error: invalid settings: amg: Input should be a valid dictionary") and \
        "; encoder: Input should be a valid dictionary" in message and "\n" not in message, message


def test_point_grids_alone_in_the_settings_file(tmp_path):
    """`amg: {point_grids: ...}` is the one grid source the user gave (points_per_side keeps
    no default 32 beside it); a points_per_side from the file or the flag as well names both."""
    from jobs.auto_annotate import load_config
    from schemas.settings_file import settings_error_message

    (tmp_path / "grids.yaml").write_text("amg:\n  point_grids: [[[0.5, 0.5]]]\n")
    amg = load_config(["--config", str(tmp_path / "grids.yaml")]).amg
    assert amg.points_per_side is None and amg.point_grids == (((0.5, 0.5),),)
    (tmp_path / "both.yaml").write_text("amg:\n  points_per_side: 32\n  point_grids: [[[0.5, 0.5]]]\n")
    for argv in (["--config", str(tmp_path / "both.yaml")],
                 ["--config", str(tmp_path / "grids.yaml"), "--points-per-side", "8"]):
        with pytest.raises(ValidationError) as e:
            load_config(argv)
        assert settings_error_message(e.value) == (
            "error: invalid settings: amg: points_per_side and point_grids are both given: give one of them"), argv


@pytest.mark.parametrize("job, argv, says", [
    ("auto_annotate.py", ["--box-nms-thresh", "2"], ["amg.box_nms_thresh: Input should be less than or equal to 1"]),
    ("auto_annotate.py", ["--box-nms-thresh", "2", "--chunk-images", "0"],
     ["amg.box_nms_thresh: ", "; chunk_images: Input should be greater than or equal to 1 (got '0')"]),
    ("rebuild.py", ["--pred-iou-thresh", "-1"], ["amg.pred_iou_thresh: Input should be greater than or equal to 0"]),
    ("rebuild.py", ["--pred-iou-thresh", "-1", "--model-type", "vit_x"],
     ["model_type: unknown model type 'vit_x'", "; amg.pred_iou_thresh: "]),
    # The automatic stage's flags (after --) are checked before round 0, not when it runs.
    ("data_engine.py", ["--root", "ROOT", "--synthetic-inputs", "2", "--", "--box-nms-thresh", "2"],
     ["amg.box_nms_thresh: "]),
    ("data_engine.py", ["--root", "ROOT", "--rounds", "0", "--held-out", "0"],
     ["rounds: Input should be greater than 0 (got 0); held_out.count: Input should be greater than 0 (got 0)"]),
])
def test_jobs_print_one_line_for_bad_values(tmp_path, job, argv, says):
    argv = [str(tmp_path / "engine") if a == "ROOT" else a for a in argv]
    r = subprocess.run([sys.executable, f"jobs/{job}", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: invalid settings: "), r.stderr
    assert all(s in r.stderr for s in says) and "https://" not in r.stderr, r.stderr
    assert not (tmp_path / "engine").exists()
