"""The cache is verified, not trusted: manifests at publish, checks at reuse, `cache verify`.

One tiny SFT-only run (micro model, 4 steps, one eval task) fills a cache once per
module; each end-to-end test damages a copy of it and runs again. The other tests
build entries by hand (a safetensors file written byte by byte), without training.
"""

import json
import shutil
import struct
import textwrap
import zipfile

import pytest
from click.testing import CliRunner

from posttrain.cache import (MANIFEST, Cache, check, curated_problems, entries, reflogps_problems,
                             safetensors_problem, save_dataset, write_manifest)
from posttrain.cli import main

RECIPE = """
name: tiny-verify
model: {name: builtin:micro-llama}
data:
  ins: {source: builtin:skills, limit: 32}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-2, max_steps: 4, batch_size: 8, max_length: 96}
pipelines:
  sft: [sft]
eval:
  tasks: [{repo}/evals/skills_mc.yaml]
  limit: 4
report: {resamples: 100}
"""


def run(recipe, out, cache, *extra):
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out), "--cache", str(cache), "--no-wandb",
                                       *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory, repo):
    """A cache holding one finished SFT stage and the evaluations of base and sft."""
    root = tmp_path_factory.mktemp("verify")
    recipe = root / "tiny.yaml"
    recipe.write_text(textwrap.dedent(RECIPE).replace("{repo}", str(repo)))
    result = run(recipe, root / "run", root / "cache")
    assert result.exit_code == 0, result.output
    (stage,) = [p for p in (root / "cache" / "stages").iterdir() if not p.name.startswith(".")]
    return {"recipe": recipe, "cache": root / "cache", "key": stage.name,
            "model_size": (stage / "model" / "model.safetensors").stat().st_size}


@pytest.fixture
def copy(trained, tmp_path):
    """A private copy of the trained cache, and the paths a test damages."""
    cache = tmp_path / "cache"
    shutil.copytree(trained["cache"], cache, symlinks=True)
    stage = cache / "stages" / trained["key"]
    return {**trained, "cache": cache, "stage": stage, "model": stage / "model" / "model.safetensors"}


def truncate(path, size=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def run_model_file(out):
    (link,) = (out / "stages").glob("sft-*/model")
    return link.resolve() / "model.safetensors"


# ---------------------------------------------------------------- end to end


def test_entries_are_published_with_a_manifest(copy):
    manifest = json.loads((copy["stage"] / MANIFEST).read_text())
    assert manifest["files"]["model/model.safetensors"]["size"] == copy["model_size"]
    assert {"stage.json", "trainer_log.jsonl"} <= set(manifest["files"])
    for kind in ("evals", "datasets"):
        assert all((entry / MANIFEST).is_file() for entry in (copy["cache"] / kind).iterdir())
    result = CliRunner().invoke(main, ["cache", "verify", "--cache", str(copy["cache"])])
    assert result.exit_code == 0 and "0 corrupt" in result.output, result.output


def test_truncated_model_is_reported_and_retrained(copy, tmp_path):
    truncate(copy["model"])
    key, path = copy["key"], str(copy["model"])
    plan = CliRunner().invoke(main, ["plan", str(copy["recipe"]), "--cache", str(copy["cache"]), "--json"])
    assert plan.exit_code == 0, plan.output
    (row,) = json.loads(plan.stdout)["stages"]
    assert row["status"] == "train (corrupt)" and path in row["why"] and "truncated" in row["why"]
    listing = CliRunner().invoke(main, ["cache", "ls", "--cache", str(copy["cache"])])
    assert listing.exit_code == 0 and "CORRUPT" in listing.output

    result = run(copy["recipe"], tmp_path / "again", copy["cache"])
    assert result.exit_code == 0, result.output
    assert f"corrupt cache entry stages/{key[:12]} (sft, seed 0): {path}" in result.output
    assert "train  sft" in result.output and "reuse  sft" not in result.output
    # The model the new run links to and evaluated is whole again.
    used = run_model_file(tmp_path / "again")
    assert used == copy["model"].resolve() and used.stat().st_size == copy["model_size"]
    assert safetensors_problem(used) is None
    assert Cache(copy["cache"]).has_stage(key)


def test_broken_stage_json_is_no_traceback_and_is_retrained(copy, tmp_path):
    (copy["stage"] / "stage.json").write_text('{"stage": "sft", "cost": ')
    runner = CliRunner()
    for command in (["cache", "ls"], ["cache", "ls", "--json"], ["plan", str(copy["recipe"])]):
        result = runner.invoke(main, [*command, "--cache", str(copy["cache"])])
        assert result.exit_code == 0 and result.exception is None, result.output
    assert "train (corrupt)" in result.output
    result = run(copy["recipe"], tmp_path / "again", copy["cache"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert f"{copy['stage'] / 'stage.json'}: missing, unreadable or not a JSON object" in result.output
    assert "train  sft" in result.output
    assert json.loads((copy["stage"] / "stage.json").read_text())["key"] == copy["key"]


def test_stage_json_of_another_key_is_not_used(copy, tmp_path):
    info = json.loads((copy["stage"] / "stage.json").read_text())
    (copy["stage"] / "stage.json").write_text(json.dumps({**info, "key": "f" * 64}))
    write_manifest(Cache(copy["cache"]).area, copy["stage"])  # even with a matching manifest
    result = run(copy["recipe"], tmp_path / "again", copy["cache"])
    assert result.exit_code == 0 and "is the record of stage ffffffffffff" in result.output, result.output
    assert "train  sft" in result.output


def test_corrupt_eval_entry_is_evaluated_again(copy, tmp_path):
    evals = sorted((copy["cache"] / "evals").iterdir())
    (evals[0] / "eval.json").write_text('{"rows": [{"task": 1}]}')
    result = run(copy["recipe"], tmp_path / "again", copy["cache"])
    assert result.exit_code == 0, result.output
    assert f"corrupt cache entry evals/{evals[0].name[:12]}" in result.output
    assert str(evals[0] / "eval.json") in result.output
    assert "reuse  sft" in result.output and result.output.count("  eval   ") == 1
    assert result.output.count("reuse  eval") == 1
    rows = [json.loads(line) for line in (tmp_path / "again" / "results.jsonl").read_text().splitlines()]
    assert {row["pipeline"] for row in rows} == {"base", "sft"}


def test_cache_verify_finds_a_changed_byte_and_fix_removes_the_entry(copy):
    data = bytearray(copy["model"].read_bytes())
    data[-1] ^= 0xFF  # same size: only the hash tells
    copy["model"].write_bytes(bytes(data))
    assert check(Cache(copy["cache"]), next(e for e in entries(Cache(copy["cache"])) if e.key == copy["key"]),
                 hashes=False).ok
    runner = CliRunner()
    result = runner.invoke(main, ["cache", "verify", "--cache", str(copy["cache"])])
    assert result.exit_code == 2, result.output
    assert f"corrupt  stages/{copy['key'][:12]} sft (seed 0)" in result.output
    assert f"{copy['model']}: content differs" in result.output and "1 corrupt" in result.output
    # Reuse hashes an entry this small, so the run would not use it either.
    assert not Cache(copy["cache"]).has_stage(copy["key"])
    assert Cache(copy["cache"], hash_limit=0).has_stage(copy["key"])  # above the limit: sizes only
    only = runner.invoke(main, ["cache", "verify", "--cache", str(copy["cache"]), copy["key"][:8]])
    assert only.exit_code == 2 and "checked 1 entries" in only.output
    fixed = runner.invoke(main, ["cache", "verify", "--cache", str(copy["cache"]), "--fix"])
    assert fixed.exit_code == 0 and "(removed)" in fixed.output and not copy["stage"].exists()
    assert runner.invoke(main, ["cache", "verify", "--cache", str(copy["cache"])]).exit_code == 0
    unknown = runner.invoke(main, ["cache", "verify", "--cache", str(copy["cache"]), "0000000000"])
    assert unknown.exit_code == 2 and "0000000000: no cache entry" in unknown.output


def test_entry_from_before_manifests_is_adopted_or_retrained(copy):
    (copy["stage"] / MANIFEST).unlink()
    cache, lines = Cache(copy["cache"]), []
    assert not cache.has_stage(copy["key"])  # not trusted without its manifest: run claims it under the lock
    assert cache.verify("stages", copy["key"]).ok
    verdict = cache.claim("stages", copy["key"], lines.append)
    assert verdict and not verdict.manifest and "published before manifests" in lines[0]
    assert (copy["stage"] / MANIFEST).is_file() and cache.has_stage(copy["key"])

    (copy["stage"] / MANIFEST).unlink()
    truncate(copy["model"], copy["model_size"] - 4)
    lines.clear()
    assert cache.claim("stages", copy["key"], lines.append) is None
    assert f"{copy['model']}: " in lines[0] and "truncated" in lines[0] and not copy["stage"].exists()


# ---------------------------------------------------------------- without training


def safetensors_bytes(tensors: dict[str, int]) -> bytes:
    """A safetensors file of F32 vectors {name: length}, zeros."""
    header, offset = {}, 0
    for name, length in tensors.items():
        header[name] = {"dtype": "F32", "shape": [length], "data_offsets": [offset, offset + 4 * length]}
        offset += 4 * length
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + bytes(offset)


def fake_stage(cache: Cache, key: str, manifest: bool = True):
    entry = cache.stage_dir(key)
    (entry / "model").mkdir(parents=True)
    (entry / "model" / "model.safetensors").write_bytes(safetensors_bytes({"a": 10, "b": 3}))
    (entry / "model" / "config.json").write_text("{}")
    (entry / "stage.json").write_text(json.dumps({"stage": "sft", "seed": 0, "key": key, "chain": ["sft"],
                                                  "adapter": False, "cost": {}, "metrics": {}}))
    if manifest:
        write_manifest(cache.area, entry)
    return entry


def test_safetensors_structure_check(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes({"a": 10}))
    assert safetensors_problem(path) is None
    for broken in (b"", b"\x01", struct.pack("<Q", 10**9) + b"{}", struct.pack("<Q", 2) + b"{]",
                   safetensors_bytes({"a": 10})[:-1], safetensors_bytes({"a": 10}) + b"x"):
        path.write_bytes(broken)
        assert safetensors_problem(path), broken[:20]


def test_a_tampered_manifest_is_corrupt_not_followed(tmp_path):
    cache = Cache(tmp_path)
    entry = fake_stage(cache, "a" * 64)
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["files"]["../../outside.txt"] = {"size": 1, "sha256": "0" * 64}
    (entry / MANIFEST).write_text(json.dumps(manifest))
    verdict = cache.verify("stages", "a" * 64)
    assert not verdict.ok and "a path outside the entry" in verdict.problems[0]
    (entry / MANIFEST).write_text("[1, 2")
    assert "not valid JSON" in cache.verify("stages", "a" * 64).problems[0]


def test_structure_check_of_entries_without_manifest(tmp_path):
    cache = Cache(tmp_path)
    entry = fake_stage(cache, "9" * 64, manifest=False)
    runner = CliRunner()
    result = runner.invoke(main, ["cache", "verify", "--cache", str(tmp_path)])
    assert result.exit_code == 0 and "published before manifests; its structure checks out" in result.output
    index = entry / "model" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    (entry / "model" / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    problems = cache.verify("stages", "9" * 64).problems
    assert any("model-00001-of-00002.safetensors: listed in" in p for p in problems)
    assert any("pytorch_model.bin: not a readable zip archive" in p for p in problems)
    assert not any(".bin" in p for p in cache.verify("stages", "9" * 64, hashes=False).problems)  # ls: no full reads
    index.unlink()
    (entry / "model" / "pytorch_model.bin").unlink()
    fixed = runner.invoke(main, ["cache", "verify", "--cache", str(tmp_path), "--fix"])
    assert fixed.exit_code == 0 and "manifest recorded" in fixed.output and (entry / MANIFEST).is_file()
    assert cache.has_stage("9" * 64)


def test_listing_survives_any_broken_record(tmp_path):
    cache = Cache(tmp_path)
    for n, text in enumerate(['[1, 2]', '{"chain": 5, "seed": null}', '"x"', "\xff"]):
        entry = fake_stage(cache, f"{n}" * 64)
        (entry / "stage.json").write_text(text)
    (tmp_path / "evals" / ("e" * 64)).mkdir(parents=True)
    (tmp_path / "evals" / ("e" * 64) / "eval.json").write_text("[")
    runner = CliRunner()
    for command in (["cache", "ls"], ["cache", "ls", "--json"], ["cache", "gc", "--dry-run"]):
        result = runner.invoke(main, [*command, "--cache", str(tmp_path)])
        assert result.exit_code == 0 and result.exception is None, result.output
    assert result.output.count("would remove") == 0
    verify = runner.invoke(main, ["cache", "verify", "--cache", str(tmp_path)])
    assert verify.exit_code == 2 and "5 corrupt" in verify.output and "Traceback" not in verify.output
    with pytest.raises(Exception, match="stage.json: missing, unreadable"):
        cache.stage_record("0" * 64)


def test_hashes_are_not_recomputed_while_files_are_unchanged(tmp_path, monkeypatch):
    import posttrain.cache as cache_module

    cache = Cache(tmp_path)
    fake_stage(cache, "b" * 64)
    calls = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda path: calls.append(path) or real(path))
    assert cache.has_stage("b" * 64) and len(calls) == 3
    assert cache.has_stage("b" * 64) and len(calls) == 3  # plan, then the run: hashed once
    truncate(cache.stage_dir("b" * 64) / "model" / "config.json", 1)
    assert not cache.has_stage("b" * 64)


def test_corrupt_dataset_is_built_again(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(20)]
    target = tmp_path / "datasets" / ("d" * 64)
    save_dataset(rows, target)
    assert (target / MANIFEST).is_file()
    (data_file,) = target.glob("data-*.arrow")
    truncate(data_file)
    lines = []
    save_dataset(rows, target, lines.append)
    assert f"corrupt cache entry datasets/dddddddddddd: {data_file}" in lines[0]
    from datasets import load_from_disk

    assert load_from_disk(str(target))["text"] == [row["text"] for row in rows]
    (target / MANIFEST).unlink()  # from before manifests: rebuilt, not trusted
    save_dataset(rows, target, lines.append)
    assert (target / MANIFEST).is_file() and len(lines) == 1


def test_reflogps_and_curated_sets_are_checked(tmp_path):
    import io

    npz = tmp_path / "reflogps" / ("c" * 64 + ".npz")
    npz.parent.mkdir()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("chosen.npy", b"x" * 100)
        archive.writestr("rejected.npy", b"y" * 100)
    npz.write_bytes(buffer.getvalue())
    assert reflogps_problems(npz) == []
    truncate(npz)
    assert "not a readable zip archive" in reflogps_problems(npz)[0]
    curated = tmp_path / "curated" / "ins-0123456789abcdef.jsonl"
    curated.parent.mkdir()
    curated.write_text('{"a": 1}\n{"a": 2}\n')
    curated.with_suffix(".curation.json").write_text('{"rows_out": 3}')
    assert "2 rows, its curation report says 3" in curated_problems(curated)[0]
    result = CliRunner().invoke(main, ["cache", "verify", "--cache", str(tmp_path), "--fix"])
    assert result.exit_code == 0 and result.output.count("(removed)") == 2, result.output
    assert not npz.exists() and not curated.exists() and not curated.with_suffix(".curation.json").exists()


@pytest.mark.parametrize("option,value", [
    ("--older-than", "-1"), ("--older-than", "nan"), ("--older-than", "inf"), ("--older-than", "-inf"),
    ("--older-than", "soon"), ("--older-than", ""), ("--max-size", "-5GB"), ("--max-size", "nan"),
    ("--max-size", "inf"), ("--max-size", "1e400"), ("--max-size", "9" * 400), ("--max-size", "5XB"),
    ("--max-size", ""), ("--max-size", "GB"),
])
def test_gc_rejects_nonsensical_limits(tmp_path, option, value):
    cache = Cache(tmp_path / "cache")
    entry = fake_stage(cache, "e" * 64)
    result = CliRunner().invoke(main, ["cache", "gc", "--cache", str(cache.root), option, value])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
    assert "Traceback" not in result.output and entry.is_dir()


def test_gc_accepts_sensible_limits(tmp_path):
    cache = Cache(tmp_path / "cache")
    entry = fake_stage(cache, "e" * 64)
    for args in (["--older-than", "0.5"], ["--max-size", "1.5GB"], ["--older-than", "1e300", "--max-size", "0"]):
        result = CliRunner().invoke(main, ["cache", "gc", "--cache", str(cache.root), *args])
        assert result.exit_code == 0, result.output
    assert not entry.exists()  # --max-size 0 evicts everything not being trained


@pytest.mark.parametrize("key", ["../x", "/", "..", "../../", "......", "/tmp", "*", "stages", "\x00abcdef"])
def test_cache_rm_with_odd_keys_removes_nothing(tmp_path, key):
    cache = Cache(tmp_path / "cache")
    entry = fake_stage(cache, "f" * 64)
    neighbour = tmp_path / "x"
    neighbour.mkdir()
    result = CliRunner().invoke(main, ["cache", "rm", "--cache", str(cache.root), key])
    assert result.exit_code == 2 and "nothing removed" in result.output, result.output
    assert entry.is_dir() and neighbour.is_dir()


# ---------------------------------------------------------------- a folder of the user's

USER_FILES = {  # what a user keeps in a folder that --cache or POSTTRAIN_CACHE was pointed at
    "stages/mywork/thesis.tex": "\\documentclass{article}",
    "stages/.notes": "hidden, old: not a leftover of posttrain's",
    "evals/results/r.csv": "a,b\n1,2\n",
    "curated/notes.jsonl": '{"note": 1}\n',
    "curated/notes-0123456789abcdef.txt": "almost a curated set",
    "reflogps/x.npz": "not posttrain's",
    "datasets/photos/cat.jpg": "jpeg",
    "datasets/.tmp-photos-12": "old and hidden",
    "locks/mine.lock": "mine",
    "todo.txt": "buy milk",
}


def plant_user_folder(root, files=USER_FILES):
    import os

    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for path in root.rglob("*"):
        os.utime(path, (1e9, 1e9))  # 2001: older than any --older-than


def tree(root):
    """Every path under root with its bytes (or link target): what must not change."""
    return {str(p.relative_to(root)): (p.readlink() if p.is_symlink() else p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("command", [["cache", "rm", "--all"], ["cache", "gc", "--older-than", "0", "--max-size", "0"],
                                     ["cache", "verify", "--fix"], ["cache", "rm", "0123456789abcdef"]])
def test_cache_commands_refuse_a_folder_of_the_users(tmp_path, command):
    plant_user_folder(tmp_path / "P")
    before = tree(tmp_path / "P")
    result = CliRunner().invoke(main, [*command, "--cache", str(tmp_path / "P")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{tmp_path / 'P'}: is not empty and is not a posttrain cache" in result.output, result.output
    assert tree(tmp_path / "P") == before  # nothing removed, no marker written


def test_run_and_plan_refuse_a_folder_of_the_users(tmp_path, repo, monkeypatch):
    plant_user_folder(tmp_path / "P")
    before = tree(tmp_path / "P")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(textwrap.dedent(RECIPE).replace("{repo}", str(repo)))
    for args in (["run", str(recipe), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "P")],
                 ["run", str(recipe), "--out", str(tmp_path / "run"), "--dry-run", "--cache", str(tmp_path / "P")],
                 ["plan", str(recipe), "--cache", str(tmp_path / "P")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "is not empty and is not a posttrain cache" in result.output, result.output
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "P"))  # the environment variable, same rule
    result = CliRunner().invoke(main, ["plan", str(recipe)])
    assert result.exit_code == 2 and "POSTTRAIN_CACHE" in result.output, result.output
    assert tree(tmp_path / "P") == before and not (tmp_path / "run").exists()


def test_only_names_of_posttrains_shape_are_entries(tmp_path):
    """A marked cache that also holds the user's files: every command touches only entries."""
    import os

    from posttrain.cache import CACHE_MARKER

    cache = Cache(tmp_path / "P")
    cache.ensure()
    plant_user_folder(cache.root)
    user = tree(cache.root)
    stage = fake_stage(cache, "a" * 64)
    corrupt = fake_stage(cache, "b" * 64)
    truncate(corrupt / "model" / "model.safetensors")
    leftover = cache.root / "evals" / f".tmp-{'c' * 64}-123"
    leftover.mkdir()
    os.utime(leftover, (1e9, 1e9))
    assert {e.key for e in entries(cache)} == {"a" * 64, "b" * 64}
    runner = CliRunner()
    fixed = runner.invoke(main, ["cache", "verify", "--fix", "--cache", str(cache.root)])
    assert fixed.exit_code == 0 and "checked 2 entries" in fixed.output and not corrupt.exists(), fixed.output
    gc = runner.invoke(main, ["cache", "gc", "--older-than", "0", "--max-size", "0", "--cache", str(cache.root)])
    assert gc.exit_code == 0 and "1 leftovers" in gc.output and not stage.exists() and not leftover.exists()
    fake_stage(cache, "d" * 64)
    gone = runner.invoke(main, ["cache", "rm", "--all", "--cache", str(cache.root)])
    assert gone.exit_code == 0 and "removed 1 entry" in gone.output, gone.output
    left = tree(cache.root)
    assert {rel: data for rel, data in left.items() if rel in user} == user
    assert set(left) - set(user) - {CACHE_MARKER} <= {"stages"}  # the stages folder fake_stage made


@pytest.mark.parametrize("kind,name,entry", [
    ("stages", "a" * 64, True), ("stages", ".partial-" + "a" * 64, True), ("stages", "A" * 64, False),
    ("stages", "a" * 63, False), ("stages", "a" * 65, False), ("stages", "mywork", False),
    ("stages", ".partial-mywork", False), ("evals", "0" * 64, True), ("evals", ".partial-" + "0" * 64, False),
    ("datasets", "f" * 64, True), ("datasets", "photos", False), ("reflogps", "c" * 64 + ".npz", True),
    ("reflogps", "x.npz", False), ("reflogps", "c" * 64, False), ("curated", "ins-0123456789abcdef.jsonl", True),
    ("curated", "a-b.c-0123456789abcdef.jsonl", True), ("curated", "notes.jsonl", False),
    ("curated", "..-0123456789abcdef.jsonl", False), (".", "a" * 64, False), ("locks", "a" * 64, False),
    ("curated", ".hidden-0123456789abcdef.jsonl", False), ("curated", "ins-0123456789ABCDEF.jsonl", False),
])
def test_entry_name_shapes(kind, name, entry):
    from posttrain.cache import entry_name_ok

    assert entry_name_ok(kind, name) is entry


@pytest.mark.parametrize("kind,name,temporary", [
    ("evals", f".tmp-{'a' * 64}-77", True), ("datasets", f".tmp-{'a' * 64}-1", True),
    ("reflogps", f".{'a' * 64}.npz.tmp", True), ("reflogps", f".{'a' * 64}.npz.4242.tmp", True),
    ("reflogps", f".{'a' * 64}-99.npz", True), ("curated", ".ins-0123456789abcdef.jsonl.tmp", True),
    ("curated", ".ins-0123456789abcdef.curation.json.12.tmp", True),
    ("datasets", ".tmp-photos-12", False), ("stages", ".notes", False), ("stages", ".tmp", False),
    ("evals", ".x.tmp", False), ("evals", f".tmp-.partial-{'a' * 64}-1", False), ("stages", ".git", False),
])
def test_only_posttrains_leftovers_are_temporaries(kind, name, temporary):
    from posttrain.cache import is_temporary

    assert is_temporary(kind, name) is temporary


def test_a_cache_from_before_the_marker_is_adopted(tmp_path):
    from posttrain.cache import CACHE_MARKER

    cache = Cache(tmp_path / "old")
    entry = fake_stage(cache, "a" * 64)
    (cache.root / "todo.txt").write_text("the user's")  # beside posttrain-shaped entries: still adopted
    runner = CliRunner()
    dry = runner.invoke(main, ["cache", "gc", "--dry-run", "--older-than", "0", "--cache", str(cache.root)])
    assert dry.exit_code == 0 and not (cache.root / CACHE_MARKER).exists()  # a dry run writes nothing
    result = runner.invoke(main, ["cache", "rm", "a" * 8, "--cache", str(cache.root)])
    assert result.exit_code == 0 and not entry.exists(), result.output
    assert (cache.root / CACHE_MARKER).is_file() and (cache.root / "todo.txt").is_file()
    for layout in ("empty", "folders"):  # a new or empty folder, or posttrain's folders only
        root = tmp_path / layout
        root.mkdir()
        if layout == "folders":
            (root / "stages").mkdir()
            (root / "locks").mkdir()
        Cache(root).ensure()
        assert (root / CACHE_MARKER).is_file()
    Cache(tmp_path / "new" / "cache").ensure()
    assert (tmp_path / "new" / "cache" / CACHE_MARKER).is_file()
    Cache(tmp_path / "missing").ensure(create=False)  # rm, gc: nothing to remove, nothing made
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="exists and is not a directory"):
        Cache(tmp_path / "file").ensure()


# ---------------------------------------------------------------- links planted in the cache


def test_touch_replaces_a_planted_last_used_link(tmp_path):
    import os

    cache = Cache(tmp_path / "cache")
    entry = fake_stage(cache, "a" * 64)
    missing, existing = tmp_path / "created-outside", tmp_path / "kept-outside"
    existing.write_text("mine")
    os.utime(existing, (1e9, 1e9))
    for target in (missing, existing):
        marker = entry / ".last_used"
        marker.unlink(missing_ok=True)
        marker.symlink_to(target)
        cache.touch(entry)
        assert marker.is_file() and not marker.is_symlink()
    assert not missing.exists() and existing.read_text() == "mine" and existing.stat().st_mtime == 1e9
    cache.touch(cache.stage_dir("9" * 64))  # no such entry: nothing created
    assert not cache.stage_dir("9" * 64).exists()


def test_locks_never_follow_a_planted_link(tmp_path):
    from posttrain.cache import is_locked

    cache = Cache(tmp_path / "cache")
    cache.ensure()
    assert not is_locked(cache, "a" * 64) and not (cache.root / "locks").exists()  # asking writes nothing
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (cache.root / "locks").mkdir()
    (cache.root / "locks" / f"{'a' * 64}.lock").symlink_to(victim)
    with cache.lock("a" * 64):
        assert is_locked(Cache(cache.root), "a" * 64)
    assert victim.read_text() == "precious" and not (cache.root / "locks" / f"{'a' * 64}.lock").is_symlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    import shutil as sh

    sh.rmtree(cache.root / "locks")
    (cache.root / "locks").symlink_to(outside, target_is_directory=True)
    with cache.lock("b" * 64):
        pass
    assert not list(outside.iterdir()) and (cache.root / "locks").is_dir()
    assert not (cache.root / "locks").is_symlink()
    with pytest.raises(Exception, match="not a cache key"):
        cache.lock("../../x")


# ---------------------------------------------------------------- adoption checks the weights


def safetensors_with(values: bytes, dtype: str, count: int) -> bytes:
    head = json.dumps({"w": {"dtype": dtype, "shape": [count], "data_offsets": [0, len(values)]}}).encode()
    return struct.pack("<Q", len(head)) + head + values


@pytest.mark.parametrize("dtype,bad", [
    ("F32", struct.pack("<f", float("nan"))), ("F32", struct.pack("<f", float("-inf"))),
    ("F16", struct.pack("<e", float("inf"))), ("F16", struct.pack("<H", 0x7E01)),
    ("BF16", struct.pack("<H", 0x7FC0)), ("BF16", struct.pack("<H", 0xFF80)),
    ("F64", struct.pack("<d", float("nan"))), ("F8_E5M2", b"\x7f"), ("F8_E4M3", b"\xff"),
])
def test_non_finite_weights_are_found_in_every_float_dtype(tmp_path, dtype, bad):
    from posttrain.cache import nonfinite_problem

    width = len(bad)
    finite = {1: b"\x3c", 2: struct.pack("<H", 0x3C00 if dtype == "F16" else 0x3F80)}.get(width)
    finite = finite or (struct.pack("<f", 1.5) if width == 4 else struct.pack("<d", -2.0))
    count = 3 * 2**20 // width  # several chunks; the bad value in the last one
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_with(finite * (count - 1) + bad, dtype, count))
    assert safetensors_problem(path) is None
    assert "holds NaN or infinite values" in nonfinite_problem(path)
    path.write_bytes(safetensors_with(finite * count, dtype, count))
    assert nonfinite_problem(path) is None
    path.write_bytes(safetensors_with(b"\xff" * width * 4, "I32" if width == 4 else "U8", 4 * width // 4
                                      if width == 4 else 4 * width))
    assert nonfinite_problem(path) is None  # integers are never "non-finite"


def test_adoption_refuses_nan_weights_written_in_place(tmp_path):
    cache = Cache(tmp_path / "cache")
    entry = fake_stage(cache, "a" * 64, manifest=False)
    model = entry / "model" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-4:] = struct.pack("<f", float("nan"))  # same size: only the weights tell
    model.write_bytes(bytes(data))
    assert safetensors_problem(model) is None
    lines = []
    assert cache.claim("stages", "a" * 64, lines.append) is None
    assert f"{model}: tensor 'b' (F32) holds NaN or infinite values" in lines[0] and not entry.exists()
    entry = fake_stage(cache, "a" * 64, manifest=False)
    (entry / "model" / "model.safetensors").write_bytes(bytes(data))
    listing = CliRunner().invoke(main, ["cache", "ls", "--cache", str(cache.root)])
    assert listing.exit_code == 0 and "CORRUPT" not in listing.output  # ls reads no weights
    fixed = CliRunner().invoke(main, ["cache", "verify", "--fix", "--cache", str(cache.root)])
    assert fixed.exit_code == 0 and "holds NaN" in fixed.output and "(removed)" in fixed.output
    assert not entry.exists()
    entry = fake_stage(cache, "a" * 64, manifest=False)  # finite: adopted as before
    assert cache.claim("stages", "a" * 64, lines.append) and cache.has_stage("a" * 64)


def test_nan_model_without_manifest_is_retrained_not_adopted(copy, tmp_path):
    data = bytearray(copy["model"].read_bytes())
    data[-2:] = struct.pack("<H", 0x7FC0)  # a NaN in the last (bf16 or the high half of an f32) value
    copy["model"].write_bytes(bytes(data))
    (copy["stage"] / MANIFEST).unlink()
    plan = CliRunner().invoke(main, ["plan", str(copy["recipe"]), "--cache", str(copy["cache"]), "--json"])
    (row,) = json.loads(plan.stdout)["stages"]
    assert row["status"] == "train (corrupt)" and "NaN" in row["why"], row
    result = run(copy["recipe"], tmp_path / "again", copy["cache"])
    assert result.exit_code == 0 and "holds NaN or infinite values" in result.output, result.output
    assert "adopt" not in result.output and "train  sft" in result.output
    assert Cache(copy["cache"]).has_stage(copy["key"])


# ---------------------------------------------------------------- damaged checkpoints


def fake_checkpoint(trainer, step, damaged=False):
    folder = trainer / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    weights = safetensors_bytes({"a": 10})
    (folder / "model.safetensors").write_bytes(weights[:-7] if damaged else weights)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "posttrain_progress.json").write_text(json.dumps({"step": step, "wall_s": 1.0}))
    return folder


def test_latest_checkpoint_skips_a_damaged_one(tmp_path):
    import io

    from posttrain.cache import drop_incomplete_checkpoints, latest_checkpoint

    trainer = tmp_path / "trainer"
    first, second = fake_checkpoint(trainer, 2), fake_checkpoint(trainer, 4)
    assert latest_checkpoint(trainer) == second
    third = fake_checkpoint(trainer, 6, damaged=True)
    lines = []
    assert latest_checkpoint(trainer, lines.append) == second
    assert f"damaged checkpoint {third}: " in lines[0] and "truncated" in lines[0]
    (second / "trainer_state.json").write_text("{")
    assert latest_checkpoint(trainer) == first
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.pkl", b"x" * 1000)
    (first / "optimizer.pt").write_bytes(buffer.getvalue()[:-30])  # truncated: no central directory
    assert latest_checkpoint(trainer) is None
    assert latest_checkpoint(trainer, crc_limit=0) is None  # large checkpoints: the directory check still runs
    (first / "optimizer.pt").write_bytes(buffer.getvalue())
    assert latest_checkpoint(trainer) == first
    drop_incomplete_checkpoints(trainer)  # before resuming from `first`: the damaged newer ones go
    assert first.is_dir() and not second.exists() and not third.exists()


def test_plan_and_run_skip_a_damaged_checkpoint(copy, tmp_path, monkeypatch):
    """A real stage stopped at step 3 (checkpoints 2 and 3), its newest checkpoint truncated:
    plan shows the resume that will happen, the run resumes from step 2 without a traceback."""
    from contextlib import contextmanager

    import posttrain.training as training

    shutil.rmtree(copy["stage"])
    calls = []

    @contextmanager
    def stop_at_step_3(log):
        yield lambda: calls.append(1) or len(calls) >= 3

    monkeypatch.setattr(training, "stop_on_signals", stop_at_step_3)
    stopped = run(copy["recipe"], tmp_path / "stopped", copy["cache"], "-o", "output.checkpoint_steps=1")
    assert stopped.exit_code == 130, stopped.output
    monkeypatch.undo()
    trainer = Cache(copy["cache"]).partial_dir(copy["key"]) / "trainer"
    assert sorted(p.name for p in trainer.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    truncate(trainer / "checkpoint-3" / "model.safetensors")
    plan = CliRunner().invoke(main, ["plan", str(copy["recipe"]), "--cache", str(copy["cache"]), "--json",
                                     "-o", "output.checkpoint_steps=1"])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["stages"][0]["status"] == "resume@2"
    assert f"damaged checkpoint {trainer / 'checkpoint-3'}" in plan.stderr
    result = run(copy["recipe"], tmp_path / "again", copy["cache"], "-o", "output.checkpoint_steps=1")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert result.output.count(f"damaged checkpoint {trainer / 'checkpoint-3'}") == 1
    assert "resume from step 2" in result.output and Cache(copy["cache"]).has_stage(copy["key"])


def test_only_damaged_checkpoints_mean_training_afresh(copy, tmp_path):
    shutil.rmtree(copy["stage"])
    trainer = Cache(copy["cache"]).partial_dir(copy["key"]) / "trainer"
    damaged = fake_checkpoint(trainer, 2, damaged=True)
    plan = CliRunner().invoke(main, ["plan", str(copy["recipe"]), "--cache", str(copy["cache"]), "--json"])
    assert plan.exit_code == 0 and json.loads(plan.stdout)["stages"][0]["status"] == "train", plan.output
    assert f"damaged checkpoint {damaged}" in plan.stderr
    listing = CliRunner().invoke(main, ["cache", "ls", "--cache", str(copy["cache"])])
    assert "no checkpoint" in listing.output and "resume@" not in listing.output
    result = run(copy["recipe"], tmp_path / "again", copy["cache"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "train  sft" in result.output and "resume from" not in result.output
    assert Cache(copy["cache"]).has_stage(copy["key"])


def test_a_run_that_looks_before_another_marks_a_new_cache_still_takes_it(tmp_path, monkeypatch):
    """Two runs at once on a new cache: one looks for the marker (absent), the other marks
    the cache, then the first lists the folder and finds the marker. That is the other run's
    mark, not a stranger's folder (test_two_runs_at_once failed on it once)."""
    from pathlib import Path

    from posttrain.cache import CACHE_MARKER, Cache

    root = tmp_path / "cache"
    root.mkdir()
    (root / CACHE_MARKER).write_text('{"posttrain": "cache", "format": 1}\n')   # the other run's mark
    real_is_file, looks = Path.is_file, []

    def first_look_misses(path):
        if path.name == CACHE_MARKER and not looks:
            looks.append(path)
            return False          # as seen a moment before the other run wrote it
        return real_is_file(path)

    monkeypatch.setattr(Path, "is_file", first_look_misses)
    Cache(root).ensure()          # raised "is not empty and is not a posttrain cache"
    assert looks
