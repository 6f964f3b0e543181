"""The README and docs/ hold together: every relative link resolves (to a file of the repository, and to a heading
of it where the link names one), nothing links outside the repository, and every command has its section."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "benchmarks").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: pathlib.Path) -> set:
    """The anchors GitHub gives the headings of `page` (outside code blocks)."""
    found, code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            code = not code
        elif not code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def links(page: pathlib.Path) -> list:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves_inside_the_repository(page):
    for target in links(page):
        assert not re.match(r"[a-z]+:", target), f"{page.name} links outside the repository: {target}"
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        assert REPO in resolved.parents or resolved == REPO, f"{page.name}: {target} is outside the repository"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: {target} names no heading of {resolved.name}"


def test_the_readme_is_a_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_every_command_has_its_section(capsys):
    from bigjax import cli

    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    commands = re.search(r"\{([a-z,-]+)\}", capsys.readouterr().out).group(1).split(",")
    assert len(commands) > 10
    assert sorted(set(commands) - anchors(REPO / "docs" / "commands.md")) == []
