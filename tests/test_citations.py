"""utils/citations.py: every measured figure of the notes, docs and README is cited to CSV rows that hold it, and
a wrong figure, a bad line number or an uncited percentage is reported (synthetic Markdown + CSV in tmp_path)."""
from pathlib import Path

import pytest

from tests.conftest import REPO
from utils.citations import DEFAULT_FILES, check_files, check_text, main

CSV = """dataset,model,seed,float_acc,int_acc,seconds,teacher
fashion_mnist,cnn,0,91.62,91.35,301.3,"a.pt,
b.pt"
fashion_mnist,cnn,1,91.62,91.16,182.7,
fashion_mnist,cnn,2,91.62,91.28,190.0,
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "qat.csv").write_text(CSV)  # line 1 header, 2-3 one row (quoted newline), 4, 5
    return tmp_path


def check(root: Path, markdown: str) -> list[str]:
    return check_text(markdown, "notes/x.md", root)


def test_the_repositorys_notes_docs_and_readme_pass():
    paths = [p for pattern in DEFAULT_FILES for p in sorted(REPO.glob(pattern))]
    assert len(paths) >= 12  # ten notes, DESIGN.md, README.md
    assert check_files(paths) == []


def test_honest_citations_pass(root):
    text = ("Seed 0 gave 91.35% in 301 s [results/qat.csv:L2], seeds 1 and 2 91.16 / 91.28% [results/qat.csv:L4-5]; "
            "mean 91.26 ± 0.10% [results/qat.csv:L2,L4-5], from 91.16% to 91.35% [results/qat.csv:L2,L4-5] (float − 0.27 "
            "[results/qat.csv:L2], +0.19 points [results/qat.csv:L2,L4]).\n")
    assert check(root, text) == []


def test_a_figure_not_in_the_cited_rows_is_reported(root):
    problems = check(root, "Seed 1 gave 91.17% [results/qat.csv:L4].\n")
    assert problems == ["notes/x.md:1: 91.17% is not in [results/qat.csv:L4]: no field, mean, std, min or max of "
                        "the cited rows (nor a difference, for a signed figure) equals it"]
    assert check(root, "Seed 0 gave 91.35% [results/qat.csv:L4].\n") != []  # a real figure, the wrong row
    assert check(root, "It took 250 s [results/qat.csv:L2].\n") != []  # seconds are checked too
    assert check(root, "float − 0.28 [results/qat.csv:L2]\n") != []  # and differences
    assert check(root, "a drop of 0.27 [results/qat.csv:L2]\n") != []  # unsigned, no "points": not a difference


def test_a_spread_must_be_the_std_of_the_column_of_its_mean(root):
    assert check(root, "mean 91.26 ± 0.10% [results/qat.csv:L2,L4-5]\n") == []
    problems = check(root, "mean 91.26 ± 0.11% [results/qat.csv:L2,L4-5]\n")
    assert problems == ["notes/x.md:1: 91.26 ± 0.11% is not the mean ± sample std of one column of "
                        "[results/qat.csv:L2,L4-5]"]


def test_bad_line_numbers_and_files_are_reported(root):
    assert check(root, "91.35% [results/qat.csv:L9]\n") == [
        "notes/x.md:1: results/qat.csv:L9 is past the end of the file (5 lines)"]
    assert check(root, "91.35% [results/qat.csv:L1]\n") == [
        "notes/x.md:1: results/qat.csv:L1 is the header, not a data row"]
    assert check(root, "91.35% [results/qat.csv:L3]\n") == [  # the second line of a quoted field
        "notes/x.md:1: results/qat.csv:L3 does not start a data row (blank, or inside a quoted field)"]
    assert check(root, "91.35% [results/ptq.csv:L2]\n") == ["notes/x.md:1: results/ptq.csv does not exist"]
    assert check(root, "91.35% [results/qat.csv:2]\n")[0].startswith("notes/x.md:1: malformed citation")


def test_an_uncited_percentage_or_spread_is_reported(root):
    text = "Intro.\n\nThe run gave 91.35%. Then [results/qat.csv:L2] cites nothing before it.\n\n91.26 ± 0.10 here.\n"
    assert check(root, text) == [
        "notes/x.md:3: 91.35% has no citation; cite the CSV row that holds it, or drop the figure",
        "notes/x.md:5: 91.26 has no citation; cite the CSV row that holds it, or drop the figure",
        "notes/x.md:5: 0.10 has no citation; cite the CSV row that holds it, or drop the figure"]
    # a citation covers its own sentence, clause and table cell only
    assert len(check(root, "It gave 91.35%; seed 1 91.16% [results/qat.csv:L4].\n")) == 1
    assert len(check(root, "| 91.35% | 91.16% [results/qat.csv:L4] |\n")) == 1


def test_code_generated_blocks_and_configuration_are_not_prose(root):
    text = ("Peak LR 1e-2, zeta 1.1, `--percentile 99.99%`, resnet8, W4A4 and ai-edge-litert 2.3.0, e.g. nothing.\n\n"
            "    python PTQ.py  # 12.5% in an indented block\n\n"
            "```\n91.30 ± 0.10%\n```\n"
            "<!-- begin:qat -->\n| 91.30% |\n<!-- end:qat -->\n"
            "A citation in code is none: `[results/qat.csv:L9]` 91.35%.\n")
    assert check(root, text) == ["notes/x.md:11: 91.35% has no citation; cite the CSV row that holds it, or drop "
                                 "the figure"]


def test_the_command_exits_1_on_a_problem(tmp_path, capsys):
    bad = tmp_path / "bad.md"
    bad.write_text("It gave 91.35%.\n")
    assert main([str(bad)]) == 1
    assert "91.35% has no citation" in capsys.readouterr().out
    good = tmp_path / "good.md"
    good.write_text("No figures.\n")
    assert main([str(good)]) == 0
    assert main([str(tmp_path / "missing.md")]) == 2
