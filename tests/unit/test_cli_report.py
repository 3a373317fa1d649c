"""``vk-provider report``, ``simulate`` and ``db``: output, and one clear error line for bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from vk_provider.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from vk_provider.registry.migrate import head_revision

ROOT = Path(__file__).resolve().parents[2]

SMALL_WORKLOAD = """
version: 1
name: small
seed: 3
caches:
  - {name: nginx-cache, images: ["nginx:1.7.9"]}
pods:
  - name: web
    count: 6
    labels: {app: web}
    annotations: {k8s.aliyun.com/eci-image-cache: "true"}
    images: ["nginx:1.7.9"]
    arrival: {interval: 5s}
  - name: base
    namespace: other
    count: 4
    images: ["nginx:1.7.9"]
"""


def one_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vk-provider: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def workload(tmp_path: Path) -> Path:
    path = tmp_path / "small-workload.yaml"
    path.write_text(SMALL_WORKLOAD)
    return path


@pytest.fixture
def filled(tmp_path: Path, workload: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    db = tmp_path / "filled.db"
    assert main(["simulate", str(workload), "--db", str(db), "--no-chart"]) == EXIT_OK
    capsys.readouterr()
    return db


# ---- working commands --------------------------------------------------------------------------


def test_simulate_prints_summary_table_and_chart_path(
    tmp_path: Path, workload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "run.db"
    assert main(["simulate", str(workload), "--db", str(db)]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith(f"simulated 10 Pods of {workload} (seed 3)")
    assert "Pod start-up by cache outcome (10 Pods; filters: none)" in out
    assert any(line.startswith("auto_hit ") for line in out.splitlines())
    chart = tmp_path / "run-report.html"
    assert out.rstrip().endswith(f"chart: {chart}")
    assert "Pod start-up (simulated seconds)" in chart.read_text()


def test_simulate_twice_with_one_seed_prints_identical_json(
    tmp_path: Path, workload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = []
    for name in ("a.db", "b.db"):
        assert main(["simulate", str(workload), "--db", str(tmp_path / name), "--json", "--no-chart"]) == EXIT_OK
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0])["pods"] == 10
    assert main(["simulate", str(workload), "--db", str(tmp_path / "c.db"), "--json", "--no-chart", "--seed", "4"]) == 0
    assert capsys.readouterr().out != outputs[0]
    # Run again on a database that has it: the JSON stays clean; the summary says so on stderr.
    assert main(["simulate", str(workload), "--db", str(tmp_path / "a.db"), "--json", "--no-chart"]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == outputs[0]
    assert "vk-provider: replaced the 10 Pod starts of an earlier run of workload" in captured.err
    # Each run's Pods carry its workload's name: one workload picked out of a shared database.
    assert main(["report", "--db", str(tmp_path / "a.db"), "--json", "-l", "vk-provider.io/simulation=small"]) == 0
    assert json.loads(capsys.readouterr().out)["pods"] == 10
    assert main(["report", "--db", str(tmp_path / "a.db"), "--json", "-l", "vk-provider.io/simulation=other"]) == 0
    assert json.loads(capsys.readouterr().out)["pods"] == 0


def test_report_reads_what_simulate_wrote(filled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chart = tmp_path / "charts" / "c.html"
    assert main(["report", "--db", str(filled), "--csv", "--chart", str(chart), "--namespace", "other"]) == EXIT_OK
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert [(row["outcome"], row["pods"]) for row in rows] == [("none", "4")]
    assert captured.err.strip() == f"vk-provider: chart written to {chart}"
    assert chart.is_file()


def test_report_selector_filters(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--db", str(filled), "--json", "--no-chart", "-l", "app=web"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["pods"] == 6
    assert data["filters"] == {"selector": "app=web"}


def test_db_upgrade_current_and_downgrade(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "fresh.db")
    assert main(["db", "upgrade", "--db", db]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"{db}: at revision {head_revision()}"
    assert main(["db", "current", "--db", db]) == EXIT_OK
    assert capsys.readouterr().out.strip() == head_revision()
    assert main(["db", "downgrade", "base", "--db", db]) == EXIT_OK
    assert capsys.readouterr().out.strip().endswith("base (empty)")
    tables = sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert tables == [("alembic_version",)]


# ---- one error line each -----------------------------------------------------------------------


def test_report_on_a_missing_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.db"
    assert main(["report", "--db", str(missing)]) == EXIT_FAILURE
    one_error(capsys, "no registry database at", str(missing))
    assert not missing.exists()


def test_report_on_a_database_without_the_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert main(["report", "--db", str(empty)]) == EXIT_FAILURE
    one_error(capsys, "has no registry schema", "vk-provider db upgrade")


@pytest.mark.parametrize(
    "command",
    [["report"], ["db", "current"], ["db", "upgrade"], ["simulate", str(ROOT / "config" / "workload-seed.yaml")]],
)
def test_a_file_that_is_not_a_database(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # simulate says so before it runs (before, after the whole simulation), and nothing touches it.
    junk = tmp_path / "junk.db"
    junk.write_text("this is not SQLite, not even close " * 100)
    assert main([*command, "--db", str(junk)]) == EXIT_FAILURE
    one_error(capsys, f"{junk} is not a SQLite database")
    assert junk.read_text() == "this is not SQLite, not even close " * 100


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--selector", "app in (web"], ("label selector", "unbalanced")),
        (["--selector", "app=we b"], ("invalid label value",)),
        (["--since", "yesterday"], ("--since 'yesterday': not an ISO 8601 time",)),
        (["--until", "2026-13-01"], ("--until",)),
        (["--since", "2026-01-02", "--until", "2026-01-01"], ("is not after --since",)),
        (["--selector", "app in ()"], ("in needs at least one value in 'app in ()'",)),
        (["--selector", "app notin ( )"], ("notin needs at least one value",)),
        (["--since", "0001-01-01T00:00:00+05:00"], ("--since '0001-01-01T00:00:00+05:00': out of range",)),
        (["--until", "9999-12-31T23:59:59-05:00"], ("--until '9999-12-31T23:59:59-05:00': out of range",)),
        (["--namespace", ""], ("--namespace '': not a namespace name",)),
        (["--namespace", "Shop"], ("--namespace 'Shop': not a namespace name",)),
    ],
)
def test_report_bad_filters(
    filled: Path, flags: list[str], needles: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "--db", str(filled), *flags]) == EXIT_USAGE
    one_error(capsys, *needles)


def test_report_chart_that_cannot_be_written(filled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["report", "--db", str(filled), "--json", "--chart", str(blocker / "c.html")]) == EXIT_FAILURE
    one_error(capsys, f"cannot write the chart {blocker / 'c.html'}: ")


def _pod_starts(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("select count(*) from pod_starts").fetchone()[0])


def test_a_chart_never_overwrites_the_database_or_the_workload(
    filled: Path, workload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    starts, text = _pod_starts(filled), workload.read_text()
    assert main(["report", "--db", str(filled), "--csv", "--chart", str(filled)]) == EXIT_USAGE
    one_error(capsys, f"--chart {filled}", "exists and is not a vk-provider chart; not overwriting it")
    # Refused before the run: nothing simulated, nothing stored.
    assert main(["simulate", str(workload), "--db", str(filled), "--chart", str(filled)]) == EXIT_USAGE
    one_error(capsys, "is not a vk-provider chart")
    assert main(["simulate", str(workload), "--db", str(filled), "--chart", str(workload)]) == EXIT_USAGE
    one_error(capsys, "is not a vk-provider chart")
    assert _pod_starts(filled) == starts
    assert workload.read_text() == text


@pytest.mark.parametrize(
    "edit",
    [
        "update pod_starts set labels = 'not json'",
        "update pod_starts set labels = '[1, 2]'",
        "update pod_starts set started_at = 'garbage'",
    ],
)
def test_a_row_edited_by_hand_is_one_error_line(filled: Path, edit: str, capsys: pytest.CaptureFixture[str]) -> None:
    with sqlite3.connect(filled) as conn:
        conn.execute(edit)
    assert main(["report", "--db", str(filled), "--no-chart"]) == EXIT_FAILURE
    one_error(
        capsys, f"cannot read registry database {filled}: a Pod start row holds a value vk-provider did not write"
    )


def test_a_database_a_newer_vk_provider_made_is_refused_before_the_run(
    filled: Path, workload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(filled) as conn:
        conn.execute("update alembic_version set version_num = '9999'")
    starts = _pod_starts(filled)
    chart = filled.with_name("never.html")
    assert main(["simulate", str(workload), "--db", str(filled), "--chart", str(chart)]) == EXIT_FAILURE
    one_error(capsys, f"registry database {filled}: its schema is at revision '9999'", "a newer vk-provider wrote it")
    assert not chart.exists()  # refused before the run
    assert _pod_starts(filled) == starts
    assert main(["db", "upgrade", "--db", str(filled)]) == EXIT_FAILURE
    message = one_error(capsys, f"db upgrade {filled}: its schema is at revision '9999'")
    assert '"' not in message  # the cause is not quoted as a Python string


@pytest.mark.parametrize(
    ("db", "needle"),
    [
        (":memory:", "an in-memory database is lost when the command ends"),
        ("sqlite://", "an in-memory database is lost when the command ends"),
        ("mysql://u@h/d", "vk-provider keeps its registry in SQLite (a file) or PostgreSQL, not mysql"),
    ],
)
def test_databases_that_cannot_hold_a_registry_are_refused_before_anything(
    db: str,
    needle: str,
    workload: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["simulate", str(workload)], ["report"], ["db", "upgrade"], ["db", "current"]):
        assert main([*command, "--db", db]) == EXIT_USAGE
        one_error(capsys, f"registry database {db}: {needle}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small-workload.yaml"]  # no chart, no database


def test_a_new_database_the_run_could_not_be_stored_in_is_not_left_behind(
    workload: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import vk_provider.simulate
    from vk_provider.registry import migrate

    async def failing_store(result: object, db: str) -> object:
        await migrate.upgrade(db)  # the schema is made first, as the real store does
        raise RuntimeError("disk I/O error")

    monkeypatch.setattr(vk_provider.simulate, "store", failing_store)
    db = tmp_path / "new.db"
    assert main(["simulate", str(workload), "--db", str(db), "--no-chart"]) == EXIT_FAILURE
    one_error(capsys, f"cannot write registry database {db}: disk I/O error")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small-workload.yaml"]
    # An existing database is left as it was (the run's own transaction was not committed).
    assert main(["db", "upgrade", "--db", str(db)]) == EXIT_OK
    assert main(["simulate", str(workload), "--db", str(db), "--no-chart"]) == EXIT_FAILURE
    assert db.is_file()


def test_a_database_server_that_cannot_be_reached_is_found_out_before_the_run(
    workload: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chart = tmp_path / "c.html"
    db = "postgresql://u@127.0.0.1:1/registry"  # nothing listens on port 1
    assert main(["simulate", str(workload), "--db", db, "--chart", str(chart)]) == EXIT_FAILURE
    one_error(capsys, f"registry database {db}: ")
    assert not chart.exists()


def test_a_downgraded_registry_is_told_to_upgrade(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "down.db"
    assert main(["db", "upgrade", "--db", str(db)]) == EXIT_OK
    assert main(["db", "downgrade", "base", "--db", str(db)]) == EXIT_OK
    capsys.readouterr()
    assert main(["report", "--db", str(db), "--no-chart"]) == EXIT_FAILURE
    one_error(capsys, f"{db} has no registry schema (run `vk-provider db upgrade --db {db}`)")


def test_a_database_of_something_else_is_not_called_an_old_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("create table caches (id integer primary key, what text)")
    assert main(["report", "--db", str(other), "--no-chart"]) == EXIT_FAILURE
    message = one_error(capsys, f"{other} is not a vk-provider registry: it holds other tables (caches)")
    assert "db upgrade" not in message
    # Nor are the registry's tables mixed into it, by db upgrade or by a simulation.
    assert main(["db", "upgrade", "--db", str(other)]) == EXIT_FAILURE
    one_error(capsys, "it holds other tables (caches) and no registry schema: not a vk-provider registry")
    with sqlite3.connect(other) as conn:
        assert conn.execute("select name from sqlite_master where type = 'table'").fetchall() == [("caches",)]


def test_a_chart_replaces_an_earlier_chart(filled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chart = tmp_path / "c.html"
    for _ in range(2):
        assert main(["report", "--db", str(filled), "--json", "--chart", str(chart)]) == EXIT_OK
        capsys.readouterr()
    assert chart.read_text().startswith("<!DOCTYPE html>")
    chart.write_text("")  # an empty file is no loss either
    assert main(["report", "--db", str(filled), "--json", "--chart", str(chart)]) == EXIT_OK


def test_an_empty_chart_path_is_refused(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--db", str(filled), "--chart", ""]) == EXIT_USAGE
    one_error(capsys, "--chart needs a path")


def test_simulate_missing_workload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", str(tmp_path / "absent.yaml"), "--db", str(tmp_path / "x.db")]) == EXIT_USAGE
    one_error(capsys, "cannot read workload file", "absent.yaml")
    assert not (tmp_path / "x.db").exists()


def test_simulate_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npods: [\n")
    assert main(["simulate", str(bad), "--db", str(tmp_path / "x.db")]) == EXIT_USAGE
    one_error(capsys, f"workload file {bad} line 3: expected the node content")  # the parser's own reason


def test_simulate_workload_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"version: 1\nname: \xff\n")
    assert main(["simulate", str(bad), "--db", str(tmp_path / "x.db")]) == EXIT_USAGE
    one_error(capsys, f"workload file {bad}: not UTF-8 text")


def test_simulate_catalog_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog = tmp_path / "images.yaml"
    catalog.write_bytes(b"images: \xfe\n")
    work = tmp_path / "w.yaml"
    work.write_text(f"version: 1\ncatalogs: [{catalog}]\npods:\n  - {{name: p, images: [nginx]}}\n")
    assert main(["simulate", str(work), "--db", str(tmp_path / "x.db")]) == EXIT_USAGE
    one_error(capsys, f"image catalog {catalog}: not UTF-8 text")


def test_simulate_without_db_never_writes_the_agents_database(
    workload: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", str(workload), "--no-chart"]) == EXIT_OK
    assert (tmp_path / "vk-provider-sim.db").is_file()
    assert not (tmp_path / "vk-provider.db").exists()


def test_simulate_bad_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npods:\n  - name: web\n    images: [nginx]\n    arrival: {rate: never}\n")
    assert main(["simulate", str(bad), "--db", str(tmp_path / "x.db")]) == EXIT_USAGE
    one_error(capsys, str(bad), "pods[0].arrival.rate: must be a positive rate")


def test_simulate_cache_id_taken_in_the_database(
    filled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clash = tmp_path / "clash.yaml"
    taken = sqlite3.connect(filled).execute("SELECT imc_id FROM caches WHERE name = 'nginx-cache'").fetchone()[0]
    clash.write_text(
        f"version: 1\ncaches:\n  - {{name: other-cache, id: {taken}, images: [nginx]}}\npods:\n"
        "  - {name: p, images: [nginx]}\n"
    )
    assert main(["simulate", str(clash), "--db", str(filled), "--no-chart"]) == EXIT_FAILURE
    one_error(capsys, f"{clash}: cache 'other-cache' has the id {taken}, which cache 'nginx-cache' has in the database",
              "nothing of this run was written")  # fmt: skip


def test_db_downgrade_to_an_unknown_revision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "d.db")
    assert main(["db", "upgrade", "--db", db]) == EXIT_OK
    capsys.readouterr()
    assert main(["db", "downgrade", "9999", "--db", db]) == EXIT_FAILURE
    one_error(capsys, "db downgrade", "9999")


def test_db_current_on_a_missing_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "current", "--db", str(tmp_path / "none.db")]) == EXIT_FAILURE
    one_error(capsys, "no registry database at")


def test_db_current_leaves_an_empty_file_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    assert main(["db", "current", "--db", str(empty)]) == EXIT_OK
    assert capsys.readouterr().out.strip() == "base (empty)"
    assert empty.read_bytes() == b""  # asked, not made into a database


@pytest.mark.parametrize("command", [["report"], ["db", "current"], ["db", "downgrade", "base"]])
def test_reading_never_creates_a_database_named_by_url(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--db", "sqlite:///missing.db"]) == EXIT_FAILURE
    one_error(capsys, "no registry database at missing.db")
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.parametrize(
    ("command", "code"), [(["report"], EXIT_FAILURE), (["db", "current"], EXIT_USAGE), (["db", "upgrade"], EXIT_USAGE)]
)
def test_empty_or_unparsable_db(command: list[str], code: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--db", ""]) == code
    one_error(capsys, "no registry database given (--db is empty)")
    assert main([*command, "--db", "post gres://x"]) == code
    one_error(capsys, "registry database post gres://x: not a path or a SQLAlchemy URL")


def test_simulate_with_a_chart_it_cannot_write_stores_nothing(
    tmp_path: Path, workload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "never.db"
    assert main(["simulate", str(workload), "--db", str(db), "--chart", str(tmp_path)]) == EXIT_FAILURE
    one_error(capsys, "cannot write the chart")
    assert not db.exists()  # a second try is not told its Pods were "already recorded"


def test_output_to_a_reader_that_has_gone_is_no_error(filled: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # like `| head` that has stopped reading: every write is a broken pipe
    try:
        done = subprocess.run(
            [sys.executable, "-m", "vk_provider", "report", "--db", str(filled), "--no-chart", "--csv"],
            stdout=write,
            stderr=subprocess.PIPE,
            check=False,
        )
    finally:
        os.close(write)
    assert done.returncode == EXIT_OK
    assert done.stderr == b""


def test_a_report_leaves_the_file_it_reads_as_it_was(
    filled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "copy of the registry.db"  # in rollback-journal mode, as other tools leave it
    with sqlite3.connect(filled) as source, sqlite3.connect(plain) as copy:
        source.backup(copy)
        copy.execute("PRAGMA journal_mode = DELETE")
    before = plain.read_bytes()
    assert main(["report", "--db", str(plain), "--no-chart"]) == EXIT_OK
    assert "speed-up" in capsys.readouterr().out
    assert plain.read_bytes() == before
    with sqlite3.connect(plain) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    empty = tmp_path / "empty.db"
    empty.touch()
    assert main(["report", "--db", str(empty)]) == EXIT_FAILURE
    one_error(capsys, "has no registry schema")
    assert empty.stat().st_size == 0  # not turned into a database


@pytest.mark.parametrize(
    "command",
    [["report"], ["db", "current"], ["db", "upgrade"], ["simulate", str(ROOT / "config" / "workload-seed.yaml")]],
)
def test_a_directory_is_no_database(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # simulate says so before it runs; before, it ran, then failed to open it (sometimes with a
    # traceback from the SQLite driver's thread after the error line).
    directory = tmp_path / "registry.db"
    directory.mkdir()
    assert main([*command, "--db", str(directory)]) == EXIT_FAILURE
    one_error(capsys, f"registry database {directory} is a directory, not a file")
    assert list(directory.iterdir()) == []
    assert not (tmp_path / "registry-report.html").exists()


def test_simulate_refuses_another_workloads_cache_name_for_other_images(
    filled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(
        "version: 1\nname: other\ncaches:\n  - {name: nginx-cache, images: [redis:7.2]}\n"
        "pods:\n  - {name: p, images: [redis:7.2]}\n"
    )
    before = sqlite3.connect(filled).execute("SELECT count(*) FROM pod_starts").fetchone()
    assert main(["simulate", str(other), "--db", str(filled), "--no-chart"]) == EXIT_FAILURE
    one_error(capsys, f"{other}: cache 'nginx-cache' is already in the database as imc-",
              "and Pod starts used it (6 of workload 'small' (seed 3))", "nothing of this run was written")  # fmt: skip
    assert sqlite3.connect(filled).execute("SELECT count(*) FROM pod_starts").fetchone() == before


@pytest.mark.parametrize("seed", ["-1", "x", str(2**64)])
def test_simulate_seed_must_be_a_whole_number_from_zero(
    seed: str, tmp_path: Path, workload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["simulate", str(workload), "--db", str(tmp_path / "x.db"), "--seed", seed])
    assert exited.value.code == EXIT_USAGE
    assert f"--seed: must be a whole number from 0 to 18446744073709551615, got '{seed}'" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()


def test_report_without_db_points_at_what_simulate_wrote(
    tmp_path: Path, workload: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", str(workload), "--no-chart"]) == EXIT_OK  # into vk-provider-sim.db
    capsys.readouterr()
    assert main(["report"]) == EXIT_FAILURE
    one_error(capsys, "no registry database at", "(simulate writes vk-provider-sim.db unless given --db")
    assert main(["report", "--db", "vk-provider-sim.db", "--json"]) == EXIT_OK
