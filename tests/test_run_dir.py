"""The run directory and the filesystem: nothing outside its root, no user folder taken over,
environment failures (disk full, read-only) are messages with exit 1 and lose nothing."""

import errno
import json
import os
import random
import string
from pathlib import Path

import pytest
from click.testing import CliRunner

from posttrain.artifacts import MARKER, Area, PathEscape, RunDir, directory_owner, name_problem
from posttrain.cli import main
from posttrain.errors import PosttrainError, environment_failure
from tiny_recipes import write_recipe

# ----------------------------------------------------------------------------- Area


def nasty_names(count=3000, seed=0):
    """Names that try to escape: separators, dots, absolute paths, NUL, unicode, long."""
    rng = random.Random(seed)
    pieces = ["..", ".", "/", "\\", "\x00", "~", "/etc", "é", "名", "\u202e", " ", "\n", "%2e%2e", "a", "b_1",
              "[x]", "=", ",", "+", "-", "@", "$HOME", "*", "?"]
    fixed = ["..", ".", "", "/", "../x", "../../x", "/abs/path", "a/../../b", "x\x00y", "..\\x", "~root",
             "a" * 300, "ok", "sft+dpo[beta=0.1]"]
    out = list(fixed)
    for _ in range(count):
        out.append("".join(rng.choice(pieces + list(string.printable)) for _ in range(rng.randint(1, 8))))
    return out


def test_no_name_or_path_reaches_outside_the_area(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    area = Area(root)
    for name in nasty_names():
        # A name the recipe rule accepts is one plain component inside the root.
        if name_problem(name) is None:
            assert area.path("evals", name).parent == root.resolve() / "evals"
        # Whatever the name, a guarded path is inside the root or refused.
        for candidate in (lambda: area.path("stages", name), lambda: area.check(root / "stages" / name),
                          lambda: area.check(name)):
            try:
                resolved = candidate()
            except PathEscape:
                continue
            assert resolved.is_relative_to(root.resolve()) and resolved != root.resolve(), (name, resolved)


def test_area_refuses_writes_and_deletes_outside_and_through_symlinks(tmp_path):
    root, outside = tmp_path / "run", tmp_path / "precious"
    root.mkdir(), outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    area = Area(root)
    (root / "link").symlink_to(outside, target_is_directory=True)
    for action in (lambda: area.rmtree(root / ".." / "precious"), lambda: area.rmtree(outside),
                   lambda: area.write_text(root / "link" / "keep.txt", "x"), lambda: area.rmtree(root),
                   lambda: area.replace(outside / "keep.txt", root / "stolen"),
                   lambda: area.write_text(str(root / "a\x00b"), "x")):
        with pytest.raises(PathEscape):
            action()
    area.rmtree(root / "link")  # removes the link itself, never what it points to
    assert not (root / "link").exists() and (outside / "keep.txt").read_text() == "mine"


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    area = Area(tmp_path)
    target = area.write_text(tmp_path / "results.jsonl", "old\n")

    def full(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device", str(destination))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        area.write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_planted_links_inside_the_area_are_never_written_through(tmp_path):
    """A link planted at a folder inside the run directory, or at the temporary name an
    atomic write uses, must not lead a write, a copy or a delete outside."""
    from posttrain.evaluate import TaskRef, prepare_task_dir

    run, outside = tmp_path / "run", tmp_path / "user"
    (outside / "skills_mc").mkdir(parents=True)
    (outside / "skills_mc" / "precious.txt").write_text("mine")
    (run / "evals").mkdir(parents=True)
    (run / "evals" / "tasks").symlink_to(outside, target_is_directory=True)
    task = TaskRef("skills_mc", Path(__file__).resolve().parent.parent / "evals" / "skills_mc.yaml")
    with pytest.raises(PathEscape, match="symbolic link"):
        prepare_task_dir([task], run / "evals" / "tasks", RunDir(run).area)
    (run / f".report.md.{os.getpid()}.tmp").symlink_to(outside / "victim.txt")
    RunDir(run).area.write_text(run / "report.md", "report")
    RunDir(run).area.copyfile(run / "report.md", run / "copy.md")
    assert (run / "report.md").read_text() == "report" and not (run / "report.md").is_symlink()
    assert sorted(p.name for p in outside.rglob("*")) == ["precious.txt", "skills_mc"]


# ----------------------------------------------------------------------------- claiming --out


def test_directory_owner_and_claim(tmp_path):
    assert directory_owner(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert directory_owner(tmp_path / "empty") is None
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    assert directory_owner(user) == ""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "recipe.resolved.yaml").write_text("name: quickstart\nseeds: [0]\n")
    assert directory_owner(legacy) == "quickstart"
    with pytest.raises(PosttrainError, match="not empty and is not a posttrain run directory"):
        RunDir(user).claim("quickstart")
    with pytest.raises(PosttrainError, match="run directory of recipe 'quickstart', not 'other'"):
        RunDir(legacy).claim("other")
    RunDir(legacy).claim("quickstart")        # the same recipe: reused, marker added
    assert json.loads((legacy / MARKER).read_text())["recipe"] == "quickstart"
    RunDir(legacy).claim("other", force=True)  # another recipe only with --force
    assert directory_owner(legacy) == "other"
    (tmp_path / "file").write_text("x")
    with pytest.raises(PosttrainError, match="not a directory"):
        RunDir(tmp_path / "file").claim("x")
    assert (user / "thesis.tex").read_text() == "mine" and sorted(p.name for p in user.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("mine")), "is not empty and is not a posttrain run"),
    (lambda d: (d.mkdir(), (d / MARKER).write_text('{"recipe": "other"}')), "run directory of recipe 'other'"),
    (lambda d: d.write_text("a file"), "is a file"),  # click checks --out first
])
def test_run_refuses_an_out_dir_that_is_not_its_own(tmp_path, repo, setup, message):
    out = tmp_path / "out"
    setup(out)
    before = {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()}
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path, repo)), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and message in result.output and str(out) in result.output
    assert {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()} == before


def test_report_never_rewrites_a_user_folder_with_a_results_file(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "results.jsonl").write_text('{"pipeline": "a", "seed": 0, "task": "t", "metric": "m", "value": 1}\n')
    (user / "report.md").write_text("my notes")
    result = CliRunner().invoke(main, ["report", str(user)])
    assert result.exit_code == 2 and "is not a posttrain run directory" in result.output
    assert (user / "report.md").read_text() == "my notes" and sorted(p.name for p in user.iterdir()) == [
        "report.md", "results.jsonl"]


def test_merged_report_refuses_a_user_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["report", str(run), str(run), "--out", str(user)])
    assert result.exit_code == 2 and "posttrain never writes into a folder of yours" in result.output
    assert sorted(p.name for p in user.iterdir()) == ["keep.txt"]


# ----------------------------------------------------------------------------- environment failures


def test_environment_failure_is_found_in_a_wrapped_exception():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors")
        except OSError as inner:
            raise RuntimeError("safetensors: failed to write") from inner
    except RuntimeError as exc:
        failure = environment_failure(exc)
    assert failure is not None and failure.exit_code == 1
    assert "/x/model.safetensors" in str(failure) and "disk is full" in str(failure)
    assert environment_failure(ValueError("a bug")) is None


def test_disk_full_during_a_run_exits_1_and_the_rerun_finishes(tmp_path, repo, monkeypatch):
    """Disk full while writing results: exit 1, a message naming the file, no traceback; the
    stages stay in the cache, so the same command then finishes without training again.
    The run directory is the default, relative to the cwd (runs/<name>), as users run it."""
    write_recipe(tmp_path, repo)
    out = tmp_path / "runs" / "tiny"
    monkeypatch.chdir(tmp_path)
    real = Area.write_text

    def full_at_results(self, path, text):
        if Path(path).name == "results.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, path, text)

    monkeypatch.setattr(Area, "write_text", full_at_results)
    result = CliRunner().invoke(main, ["run", "tiny.yaml", "--no-wandb"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert f"could not write {out / 'results.jsonl'}: the disk is full" in result.output
    assert not (out / "results.jsonl").exists() and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(Area, "write_text", real)
    again = CliRunner().invoke(main, ["run", "tiny.yaml", "--no-wandb"])
    assert again.exit_code == 0, again.output
    assert "  train  " not in again.output and (out / "results.jsonl").is_file()


def test_read_only_out_dir_exits_1(tmp_path, repo, monkeypatch):
    out = tmp_path / "ro" / "run"
    real = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path, repo)), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "read-only" in result.output and str(tmp_path / "ro") in result.output
    assert isinstance(result.exception, SystemExit)
    assert not os.path.exists(tmp_path / "ro")


# ----------------------------------------------------------------------------- damaged records


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, repo):
    root = tmp_path_factory.mktemp("finished")
    out = root / "run"
    result = CliRunner().invoke(main, ["run", str(write_recipe(root, repo)), "--out", str(out), "--no-wandb",
                                       "--cache", str(root / "cache")])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("damage, expected", [
    (lambda run: (run / "results.jsonl").write_text((run / "results.jsonl").read_text()[:-40]),
     "results.jsonl:{last}: not valid JSON"),
    (lambda run: (run / "results.jsonl").write_bytes(b"\xff\xfe\x00garbage"), "results.jsonl: not UTF-8"),
    (lambda run: (run / "results.jsonl").write_text('{"pipeline": "sft"}\n'), "results.jsonl:1: missing 'seed'"),
    (lambda run: (run / "results.jsonl").write_text('{"pipeline": "sft", "seed": 0, "task": "t", "metric": "m", '
                                                    '"value": 1, "samples": "/etc/passwd"}\n'),
     "'samples' must be a file inside the run directory"),
    (lambda run: (run / "pipelines.json").write_text("{"), "pipelines.json:1: not valid JSON"),
    (lambda run: next(run.glob("stages/sft-*/stage.json")).write_text("[]"), "stage.json: expected a JSON dict"),
    (lambda run: next(run.glob("stages/sft-*/trainer_log.jsonl")).write_text("{oops\n"), "trainer_log.jsonl:1:"),
    (lambda run: (run / "recipe.resolved.yaml").write_text("a: [\n"), "recipe.resolved.yaml:2: not valid YAML"),
    (lambda run: (run / "results.jsonl").write_text('{"pipeline": "sft", "seed": 0, "task": 1, "metric": [],'
                                                    ' "value": "x"}\n'),
     "results.jsonl:1: wrong type for 'task', 'metric', 'value'"),
])
def test_report_on_damaged_records_names_the_file(finished_run, tmp_path, damage, expected):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run, symlinks=True)
    last = len((run / "results.jsonl").read_text().splitlines())
    damage(run)
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert expected.format(last=last) in result.output
