from click.testing import CliRunner

from conftest import REAL_TABLE, needs_real_data
from cxr_fast.cli import cli


@needs_real_data
def test_eda_of_the_real_table_shows_the_published_numbers(tmp_path):
    result = CliRunner().invoke(cli, ["eda", "--labels", str(REAL_TABLE), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report.md").read_text()
    for text in ("**112,120 images**", "**30,805 patients**", "No Finding: 60,361", "| Infiltration | 19,894 |",
                 "| Hernia | 227 |"):
        assert text in report, text
    for figure in ("prevalence", "cooccurrence", "demographics"):
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 10_000


def test_eda_of_the_synthetic_table(synth_dir, tmp_path):
    result = CliRunner().invoke(cli, ["eda", "--labels", str(synth_dir / "Data_Entry_2017.csv"), "--out",
                                      str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "**96 images**" in (tmp_path / "report.md").read_text()
