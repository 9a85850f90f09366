"""The table of teacher models, their licences as published, and how a run finds and reports the licence."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
from typer.testing import CliRunner

from datagen.cli import app
from datagen.teachers.runner import DEFAULT_TEACHER
from datagen.teachers.zoo import MODEL_TYPES, OUTPUTS, license_line, teacher_license


def card(folder, front_matter: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(f"---\n{front_matter}\n---\n# a model\n")
    return str(folder)


def test_licence_from_the_model_card_next_to_the_weights(tmp_path):
    lic = teacher_license(card(tmp_path / "large", "license: cc-by-nc-4.0\ntags:\n- depth"))
    assert lic == {"license": "cc-by-nc-4.0", "source": "model card", "non_commercial": True}
    line = license_line("my/large", lic)
    assert "NOT for commercial use" in line and "Depth-Anything-V2-Small-hf is Apache-2.0" in line
    lic = teacher_license(card(tmp_path / "pro", "license: other\nlicense_name: apple-amlr"))
    assert lic["license"] == "other (apple-amlr)"
    assert teacher_license(card(tmp_path / "small", "license: apache-2.0"))["non_commercial"] is False
    assert "NOT" not in license_line("x", teacher_license(str(tmp_path / "small")))


def test_licence_falls_back_to_the_table_then_to_unknown(tmp_path):
    # the default teacher's card is not on disk here: the table says what its card said
    lic = teacher_license(DEFAULT_TEACHER)
    assert lic["license"] == "cc-by-nc-4.0" and lic["non_commercial"] and "table" in lic["source"]
    assert teacher_license("depth-anything/Depth-Anything-V2-Small-hf")["license"] == "apache-2.0"
    # a folder without a card is not guessed from its name
    lic = teacher_license(str(tmp_path / "Depth-Anything-V2-Small-hf"))
    assert lic["license"] == "unknown" and "see the model card" in lic["source"]


def test_table_is_consistent():
    for m in MODEL_TYPES.values():
        assert m.output in (*OUTPUTS, "config") and m.checkpoints
        for c in m.checkpoints:
            assert c.params_m > 0 and "/" in c.hub_id
    small = {c.hub_id: c for m in MODEL_TYPES.values() for c in m.checkpoints}
    assert small["depth-anything/Depth-Anything-V2-Small-hf"].license == "apache-2.0"
    assert small[DEFAULT_TEACHER].license == "cc-by-nc-4.0"


def test_datagen_teachers_lists_types_kinds_licences_sizes():
    res = CliRunner().invoke(app, ["teachers"])
    assert res.exit_code == 0, res.output
    for name in ("depth_anything", "dpt", "zoedepth", "depth_pro", "prompt_depth_anything", "glpn"):
        assert f"| {name} |" in res.output
    for text in ("apache-2.0", "cc-by-nc-4.0", "apple-amlr", "mit", "335.3", "--teacher-output"):
        assert text in res.output


@pytest.mark.parametrize("flag, message", [("metric", "contradicts the model's config"), ("inverse", "use one of")])
def test_run_refuses_a_wrong_teacher_output_before_any_work(tmp_path, flag, message):
    from PIL import Image

    from datagen.teachers.runner import save_random_teacher

    teacher = save_random_teacher(tmp_path / "tiny")  # relative Depth Anything: its config says disparity
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "photos" / "a.jpg")
    res = CliRunner().invoke(app, ["run", "--source", "folder", "--root", str(tmp_path / "photos"), "--out",
                                   str(tmp_path / "out"), "--teacher", teacher, "--teacher-output", flag])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
