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
    (tmp_path / "evals" / "e").mkdir(parents=True)
    (tmp_path / "evals" / "e" / "eval.json").write_text("[")
    runner = CliRunner()
    for command in (["cache", "ls"], ["cache", "ls", "--json"], ["cache", "gc", "--dry-run"]):
        result = runner.invoke(main, [*command, "--cache", str(tmp_path)])
        assert result.exit_code == 0 and result.exception is None, result.output
    assert result.output.count("would remove") == 0
    verify = runner.invoke(main, ["cache", "verify", "--cache", str(tmp_path)])
    assert verify.exit_code == 2 and "5 corrupt" in verify.output and "Traceback" not in verify.output
    with pytest.raises(Exception, match="stage.json: missing, unreadable"):
        cache.stage_info("0" * 64)


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
