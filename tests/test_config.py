import pytest

from cxr_fast.config import RunConfig, dump_yaml, load_yaml, replace
from cxr_fast.errors import CxrFastError


def test_yaml_round_trip_and_partial_files(tmp_path):
    config = replace(RunConfig(), **{"optim.lr": 3e-4, "data.augment.hflip_prob": 0.5, "model.name": "convnext_atto"})
    dump_yaml(config, tmp_path / "full.yaml")
    assert load_yaml(tmp_path / "full.yaml") == config
    (tmp_path / "part.yaml").write_text("optim:\n  epochs: 3\ndata:\n  augment:\n    scale_range: [0.8, 1.2]\n")
    partial = load_yaml(tmp_path / "part.yaml")
    assert partial.optim.epochs == 3 and partial.data.augment.scale_range == (0.8, 1.2)
    assert partial.optim.lr == RunConfig().optim.lr  # untouched fields keep the defaults


def test_unknown_keys_are_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(CxrFastError, match=r"optim: unknown key\(s\) learning_rate"):
        load_yaml(tmp_path / "bad.yaml")


def test_cli_defaults_and_help_come_from_the_config():
    from click.testing import CliRunner

    from cxr_fast.cli import cli

    help_text = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    defaults = RunConfig()
    for flag, value in (("--lr", defaults.optim.lr), ("--batch-size", defaults.optim.batch_size),
                        ("--epochs", defaults.optim.epochs), ("--image-size", defaults.data.image_size),
                        ("--loader", defaults.loader)):
        assert flag in help_text and f"[default: {value}]" in help_text.split(flag, 1)[1][:400], flag


def test_settings_renamed_since_0_1_still_read():
    from cxr_fast.config import from_dict

    old = from_dict(RunConfig, {"data": {"augment": {"rotate_degrees": 5.0, "translate_fraction": 0.1}}})
    assert old.data.augment.rotate_range == (-5.0, 5.0) and old.data.augment.translate_range == (-0.1, 0.1)


def test_every_command_reads_its_settings_from_yaml_and_flags_win(tmp_path):
    import json

    from click.testing import CliRunner

    from cxr_fast.cli import cli

    # bench train's run is the run's own config: the same keys as a run's config.yaml, under `run`.
    (tmp_path / "bench.yaml").write_text("steps: 2\nwarmup: 1\nrun:\n  data: {image_size: 32}\n"
                                         "  optim: {batch_size: 2}\n  model: {name: resnet18}\n")
    result = CliRunner().invoke(cli, ["bench", "train", "--config", str(tmp_path / "bench.yaml"), "--model",
                                      "convnext_atto", "--json", str(tmp_path / "out.json")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out.json").read_text())
    assert (record["model"], record["steps"], record["warmup_steps"], record["image_size"]) == ("convnext_atto", 2, 1,
                                                                                                  32)
    (tmp_path / "bad.yaml").write_text("top_k: -1\n")
    result = CliRunner().invoke(cli, ["analyze", "--config", str(tmp_path / "bad.yaml"), "--checkpoint",
                                      str(tmp_path / "bench.yaml"), "--shards", str(tmp_path), "--out",
                                      str(tmp_path / "a")])
    assert result.exit_code == 2 and "analyze.top_k (--top-k) must be >= 0" in result.output


def test_an_annotation_the_settings_cannot_check_is_refused_and_defaults_are_not_shared():
    from dataclasses import dataclass
    from pathlib import Path

    import pytest

    from cxr_fast.settings import Checked, check_annotations, setting

    @dataclass(frozen=True)
    class Planted(Checked):
        where: Path = setting(Path("."), "A path the settings would pass unchecked.")

    with pytest.raises(TypeError, match="Planted.where: annotation .*Path.* is not one of"):
        check_annotations(Planted)

    @dataclass(frozen=True)
    class Listed(Checked):
        names: list = setting(["a"], "A mutable default.")

    first, second = Listed.__dataclass_fields__["names"].default_factory(), Listed().names
    first.append("b")
    assert second == ["a"] and first is not second
