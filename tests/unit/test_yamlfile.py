"""Reading a user's YAML file (vk_provider.yamlfile): what cannot be used is a one-line YamlFileError
naming the file and the line, never a traceback, for the settings file as for workloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from vk_provider.cli import EXIT_USAGE, main
from vk_provider.config import ConfigError, load_settings
from vk_provider.yamlfile import MAX_ALIASED_VALUES, YamlFileError, read_yaml


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "file.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "line", "kind"),
    [
        ("version: 1\n[a, b]: 1\n", 2, "list"),
        ("labels:\n  ? {x: 1}\n  : y\n", 2, "mapping"),
        ("a: 1\n? !!set {x, y}\n: 2\n", 2, "set"),
        ("a:\n  b:\n    {c: 1}: 2\n", 3, "mapping"),
    ],
)
def test_a_mapping_key_that_is_a_list_or_a_mapping_is_an_error_on_its_line(
    tmp_path: Path, text: str, line: int, kind: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(YamlFileError) as caught:
        read_yaml(path, "workload file")
    assert str(caught.value) == (
        f"workload file {path} line {line}: a mapping key must be a string, number or boolean, not a {kind}"
    )
    assert read_yaml(write(tmp_path, "2: a\n2.5: b\ntrue: c\n"), "x") == {2: "a", 2.5: "b", True: "c"}


def test_a_settings_file_with_a_list_for_a_key_is_a_settings_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "node:\n  [name]: x\n")
    expected = f"settings file {path} line 2: a mapping key must be a string, number or boolean, not a list"
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path), env={})
    assert str(caught.value) == expected
    assert main(["run", "--config", str(path)]) == EXIT_USAGE
    assert capsys.readouterr().err == f"vk-provider: error: {expected}\n"


def bomb(levels: int, use: str = "") -> str:
    lines = ['x0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"x{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n" + use


def test_aliases_repeating_too_many_values_are_refused(tmp_path: Path) -> None:
    # A few hundred bytes standing for 9**9 values: whatever walks them (an error message quoting
    # one) would never be done.
    path = write(tmp_path, "version: 1\n" + bomb(9, "count: *a8\n"))
    with pytest.raises(YamlFileError) as caught:
        read_yaml(path, "workload file")
    assert str(caught.value) == (
        f"workload file {path} line 8: aliases (*name) repeat more than {MAX_ALIASED_VALUES} values here; "
        "write out what is meant"
    )
    # Aliases as meant still load.
    data = read_yaml(write(tmp_path, bomb(5, "count: *a4\n")), "x")  # 9**5 values: below the limit
    assert data["count"] is data["x4"]
    shared = "images: &images [nginx, redis]\na: *images\nb: *images\nloop: &loop [*loop]\n"
    data = read_yaml(write(tmp_path, shared), "x")
    assert data["a"] == data["b"] == ["nginx", "redis"]
    assert data["loop"][0] is data["loop"]  # a recursive alias: refused by what reads it, not here
