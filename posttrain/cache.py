"""The content-addressed cache shared by every run: finished stages and what feeds them.

Layout under the cache root (`POSTTRAIN_CACHE`, else `$XDG_CACHE_HOME/posttrain`,
else `~/.cache/posttrain`; `posttrain run --cache DIR` overrides both):

    stages/<key>/              a finished stage: model/, stage.json, trainer_log.jsonl
    stages/.partial-<key>/     a stage in progress: trainer/checkpoint-N/ to resume from
    datasets/<fingerprint>/    canonical rows as an Arrow dataset; `datasets` keeps its
                               tokenization caches beside it, so TRL's map() calls are
                               reused by every run and seed that feeds the same rows
    curated/                   curated datasets, by content of the source and the curation
    reflogps/<key>.npz         DPO reference log-probs per (reference model, tokenized pairs)
    evals/<key>/               one model's evaluation: lm-eval's output and result rows
    locks/<key>.lock           held while a stage trains, so two runs never train one key
    .posttrain-cache.json      the ownership marker: this folder is posttrain's cache

The cache may be pointed at any folder (`--cache`, POSTTRAIN_CACHE), so posttrain
never takes a folder of the user's for its cache: it writes into or deletes from a
root only once `Cache.ensure` found it new, empty, marked, or holding entries of
posttrain's making (then it is marked). And in any folder it only ever lists,
evicts or removes names of the exact shape it gives its entries (see ENTRY_NAMES):
a user's `stages/mywork/` is not an entry and is never touched.

A stage's key hashes everything that determines its output (see
`plan.stage_key_inputs`), so an entry is valid wherever it is found. Entries only
appear complete: each is written aside and renamed into place.

Entries are verified, not trusted. Stage, evaluation and dataset entries carry a
`manifest.json` (each file's size and SHA-256, written just before the atomic
publish). Reuse always compares sizes and hashes entries up to `HASH_LIMIT`;
`posttrain cache verify` hashes everything. An entry that fails is reported by key
and path, removed and made again. Entries published before manifests existed get
a structural check (JSON parses, every safetensors file's header and tensor
offsets match its size, zip CRCs) and are then adopted (a manifest written); those
that fail it are retrained; a stage adopted that way must also hold only finite
weights (see `nonfinite_problem`). Reference log-probs (`.npz`, zip CRCs) and curated
sets (JSONL rows against the count in their report) are checked structurally, and so
is a checkpoint before a stage resumes from it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.artifacts import STAGE_RECORD, Area, name_problem
from posttrain.errors import PosttrainError
from posttrain.records import BadRecord, StageRecord

PARTIAL_PREFIX = ".partial-"
PROGRESS_FILE = "posttrain_progress.json"   # written into a checkpoint once it is complete
KINDS = ("stages", "datasets", "curated", "reflogps", "evals")
MANIFEST = "manifest.json"                  # inside an entry: its files' sizes and SHA-256
MANIFESTED = ("stages", "evals", "datasets")  # the kinds that carry one
CACHE_MARKER = ".posttrain-cache.json"      # in the root: the folder is posttrain's cache
HEX64 = "[0-9a-f]{64}"                      # a SHA-256 hexdigest: every key and data fingerprint
# The exact names posttrain gives the entries in each kind folder: stage and eval keys
# (plan.stage_key_inputs, evaluation.eval_key), dataset fingerprints (data.sources.fingerprint),
# reference log-prob keys (stages.dpo.reflogps_key) and curated sets
# `<dataset>-<16 hex>.jsonl` beside their `.curation.json`. Nothing else is an entry.
ENTRY_NAMES = {
    "stages": re.compile(f"(?:{re.escape(PARTIAL_PREFIX)})?{HEX64}"),
    "datasets": re.compile(HEX64),
    "evals": re.compile(HEX64),
    "reflogps": re.compile(rf"{HEX64}\.npz"),
    "curated": re.compile(r"(?P<dataset>.+)-[0-9a-f]{16}\.(?:jsonl|curation\.json)"),
}
LOCK_NAME = re.compile(rf"{HEX64}\.lock(\.broken-[0-9a-f]{{32}})?")   # (a stale lock set aside: locks.py)
# Reuse hashes an entry when its files total at most this. SHA-256 ran at 1,456-1,532 MB/s
# on one core of the 2-core dev machine (hashlib with SHA-NI, files in the page cache), so
# 1 GiB costs ~0.7 s per reuse: small next to loading the model, let alone training it.
# Bigger entries (a 7B model is ~14 GB, ~10 s) get the size check on reuse, and hashes
# from `posttrain cache verify`.
HASH_LIMIT = 2**30


class CorruptEntry(PosttrainError):
    """A cache entry that fails its checks where it cannot be made again (e.g. read while
    another process removes it): the message names the entry's path."""


def default_root() -> Path:
    if os.environ.get("POSTTRAIN_CACHE"):
        return Path(os.environ["POSTTRAIN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "posttrain"


class Cache:
    def __init__(self, root: Path | str | None = None, hash_limit: int = HASH_LIMIT):
        self.root = Path(root).expanduser() if root else default_root()
        self.area = Area(self.root)   # every write and delete in the cache goes through it
        self.hash_limit = hash_limit  # reuse hashes entries up to this many bytes
        self.verified: dict[Path, tuple] = {}  # entries hashed intact by this process: their file stats
        self.warned: set[str] = set()  # damaged checkpoints already reported by this process

    def ensure(self, create: bool = True) -> None:
        """Make sure the root is posttrain's cache before a command writes into or deletes
        from it; raise PosttrainError (exit 2), writing nothing, when it is a folder of the
        user's. Marked (CACHE_MARKER): fine. Missing (made when `create`) or empty: marked
        now. Unmarked but holding entries of posttrain's shape (a cache from before the
        marker): adopted, marked. Anything else is refused. `create` False (rm, gc, verify
        --fix): a missing or empty root is left as it is, there being nothing to remove."""
        root = self.root
        if not root.exists():
            if not create:
                return
            root.mkdir(parents=True, exist_ok=True)
        if not root.is_dir():
            raise PosttrainError(f"{root}: the cache (--cache or POSTTRAIN_CACHE) exists and is not a directory")
        marker = root / CACHE_MARKER
        if marker.is_file() and not marker.is_symlink():
            return
        empty = not any(root.iterdir())
        if not empty and not holds_cache_layout(root):
            if marker.is_file() and not marker.is_symlink():
                return   # another run marked the new cache between the two looks (two runs at once)
            raise PosttrainError(
                f"{root}: is not empty and is not a posttrain cache (no {CACHE_MARKER} and no cache entries); "
                "posttrain never writes into or deletes from a folder of yours: point --cache or "
                "POSTTRAIN_CACHE at a new or empty directory")
        if empty and not create:
            return
        try:
            # Created in place, exclusively (no temporary file): two runs starting on one new
            # cache at once must never see the other's half-written marker as a stranger's file.
            fd = os.open(self.area.check(marker), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                         0o644)
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps({"posttrain": "cache", "format": 1}) + "\n")
        except FileExistsError:
            pass  # another process marked it first
        except OSError:
            pass  # a read-only cache still serves what it holds; the check runs again next time

    def entry_dir(self, kind: str, key: str) -> Path:
        """stages/<key>, evals/<key> or datasets/<key>; a key is one path component."""
        return self.area.path(kind, key)

    def verify(self, kind: str, key: str, hashes: bool | None = None) -> Verdict | None:
        """Check an entry (None: there is none). `hashes` None: hash it if it is at most
        `hash_limit` bytes; an entry this process already hashed is not hashed again
        while its files' sizes and mtimes are unchanged."""
        return verify_entry(kind, key, self.entry_dir(kind, key), hashes, self.hash_limit, self.verified)

    def claim(self, kind: str, key: str, log=print, what: str = "") -> Verdict | None:
        """The entry's verdict when it is there and intact (one from before manifests,
        `manifest` False, is adopted: its manifest is written now). A corrupt entry is
        reported by key and path and removed, and None returned (as for no entry), so the
        caller makes it again. Stages: call under the key's training lock."""
        verdict = self.verify(kind, key)
        if verdict is None:
            return None
        if verdict.problems:
            for problem in verdict.problems:
                log(f"  corrupt cache entry {kind}/{key[:12]}{what}: {problem}")
            self.area.rmtree(verdict.path)
            self.verified.pop(verdict.path, None)
            log(f"         removed {verdict.path}; {'training it again' if kind == 'stages' else 'computing it again'}")
            return None
        if not verdict.manifest:
            try:
                write_manifest(self.area, verdict.path)
                self.verified[verdict.path] = manifest_problems(verdict.path, False)[2]
            except OSError:
                pass  # a read-only cache still serves; the check runs again next time
            log(f"  adopt  cache entry {kind}/{key[:12]}{what}: published before manifests; its structure "
                + ("and finite weights check out" if kind == "stages" else "checks out") + ", manifest recorded")
        return verdict

    # ------------------------------------------------------------ stages

    def stage_dir(self, key: str) -> Path:
        return self.root / "stages" / key

    def partial_dir(self, key: str) -> Path:
        return self.root / "stages" / f"{PARTIAL_PREFIX}{key}"

    def has_stage(self, key: str) -> bool:
        """The finished stage is there, with a manifest it matches (see `verify`). An entry
        from before manifests or a corrupt one is False: `claim` adopts or removes it."""
        if not (self.stage_dir(key) / MANIFEST).is_file():
            return False  # nothing to check yet: `claim` adopts (after its checks) or removes it
        verdict = self.verify("stages", key)
        return verdict is not None and verdict.ok and verdict.manifest

    def stage_record(self, key: str) -> StageRecord:
        """The finished stage's record; a damaged one is a CorruptEntry naming its file."""
        path = self.stage_dir(key) / STAGE_RECORD
        try:
            return parse_stage_record(read_json(path), key)
        except BadRecord as exc:
            raise CorruptEntry(f"{path}: {exc}; run again to retrain it, or `posttrain cache verify --fix`") from None

    def touch(self, path: Path) -> None:
        """Mark an entry used now: `cache gc --older-than` evicts by last use. The marker
        is written afresh through the area (write aside, rename), never opened in place:
        a `.last_used` planted as a symlink is replaced, not followed."""
        if path.is_symlink() or not path.is_dir():
            return  # removed meanwhile (or not an entry): nothing to mark, nothing to create
        try:
            self.area.write_bytes(path / ".last_used", b"")
        except OSError:
            pass  # a read-only cache still serves

    def lock_path(self, key: str) -> Path:
        """locks/<key>.lock, where a symlink planted for the folder or the file is removed
        first (the lock is created there exclusively, and a planted link would block it)."""
        if not LOCK_NAME.fullmatch(f"{key}.lock"):
            raise PosttrainError(f"{key!r} is not a cache key (64 lowercase hex digits)")
        folder = self.root / "locks"
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            self.area.rmtree(folder)
        path = self.area.path("locks", f"{key}.lock")
        if path.is_symlink() or (path.exists() and not path.is_file()):
            self.area.rmtree(path)
        return path

    def lock(self, key: str):
        """An inter-process lock for training `key` (another run, maybe on another node of a
        cluster, may be training it): atomic create, so it holds on NFS/Lustre (see locks.py)."""
        from posttrain.locks import SharedFileLock

        path = self.lock_path(key)
        self.area.mkdir(path.parent)
        return SharedFileLock(path, self.area)

    def resume_checkpoint(self, key: str, log=print) -> Path | None:
        """The newest complete and intact checkpoint of an unfinished stage, or None. A
        damaged one is skipped and reported (once per process) by its path."""
        def report(line: str) -> None:
            if line not in self.warned:
                self.warned.add(line)
                log(line)
        return latest_checkpoint(self.partial_dir(key) / "trainer", report, self.hash_limit)

    # ------------------------------------------------------------ below the stage

    def dataset_dir(self, fingerprint: str) -> Path:
        return self.root / "datasets" / fingerprint

    def curated_dir(self) -> Path:
        return self.root / "curated"

    def eval_dir(self, key: str) -> Path:
        return self.root / "evals" / key


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_checkpoint(trainer_dir: Path, log=None, crc_limit: int = HASH_LIMIT) -> Path | None:
    """The checkpoint a stage resumes from: the newest that posttrain marked complete
    (after transformers' own files; a process killed mid-save leaves a directory that is
    skipped) and whose files pass `checkpoint_problems`. A damaged one (a truncated
    model file) is skipped for the one before it, and reported through `log`."""
    if not trainer_dir.is_dir() or trainer_dir.is_symlink():
        return None
    complete = [p for p in trainer_dir.glob("checkpoint-*") if (p / PROGRESS_FILE).is_file() and p.is_dir()
                and not p.is_symlink() and checkpoint_step(p) >= 0]
    for path in sorted(complete, key=checkpoint_step, reverse=True):
        problems = checkpoint_problems(path, crc_limit)
        if not problems:
            return path
        if log is not None:
            log(f"  damaged checkpoint {path}: {problems[0]}; not resuming from it")
    return None


def checkpoint_problems(path: Path, crc_limit: int = HASH_LIMIT) -> list[str]:
    """The structural check of cache entries, applied to a checkpoint: JSON parses,
    safetensors headers match their sizes, a sharded model's shards exist, and torch's
    zip files (optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin) have an
    intact central directory; their CRCs too while the checkpoint is at most `crc_limit`
    bytes. Measured here: zip CRCs at 2.8 GiB/s (page cache, one core), so <= 0.4 s per
    plan or resume; the directory check alone 0.3 ms whatever the size, which is what a
    larger checkpoint (a 7B model's optimizer state is ~56 GB) gets."""
    whole = tree_size(path) <= crc_limit
    problems = structure_problems(path, whole=whole)
    if not whole:
        for rel in entry_files(path):
            zipped = path / rel
            if zipped.suffix in (".pt", ".pth", ".bin") and is_zip(zipped):
                problem = zip_directory_problem(zipped)
                problems += [f"{zipped}: {problem}"] if problem else []
    return problems


def drop_incomplete_checkpoints(trainer_dir: Path) -> None:
    """Before resuming: remove the checkpoints that are incomplete, and those newer than
    the one resumed from (damaged ones: the trainer would save over them or rotate them in)."""
    area = Area(trainer_dir)
    resume = latest_checkpoint(trainer_dir)
    newest = checkpoint_step(resume) if resume else -1
    for path in trainer_dir.glob("checkpoint-*"):
        if not (path / PROGRESS_FILE).is_file() or checkpoint_step(path) > newest:
            area.rmtree(path)


def save_dataset(examples: list[dict], target: Path, log=print) -> Path:
    """Rows as an Arrow dataset on disk (written aside with a manifest, renamed), once per
    fingerprint. A copy there is reused when it matches its manifest; a corrupt one, or
    one from before manifests (rebuilding costs seconds), is replaced."""
    area = Area(target.parent)
    if target.exists() or target.is_symlink():
        verdict = verify_entry("datasets", target.name, target)
        if verdict is not None and verdict.ok and verdict.manifest:
            return target
        for problem in verdict.problems if verdict else ():
            log(f"  corrupt cache entry datasets/{target.name[:12]}: {problem}; building it again")
        area.rmtree(target)
    from datasets import Dataset

    tmp = area.check(target.with_name(f".tmp-{target.name}-{os.getpid()}"))
    area.rmtree(tmp)
    Dataset.from_list(examples).save_to_disk(str(tmp))
    write_manifest(area, tmp)
    try:
        area.replace(tmp, target)
    except OSError:  # another process published it first
        area.rmtree(tmp)
    return target


# ---------------------------------------------------------------- verification


@dataclass
class Verdict:
    kind: str
    key: str
    path: Path
    problems: list[str]   # each "<path>: <what is wrong>"; empty when intact
    manifest: bool        # False: published before manifests (only its structure was checked)
    hashed: bool = False  # True: contents compared with the recorded SHA-256 (not only sizes)

    @property
    def ok(self) -> bool:
        return not self.problems


def sha256_file(path: Path) -> str:
    import hashlib

    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def entry_files(entry: Path) -> list[str]:
    """The files an entry's manifest covers, relative and sorted: every regular file but the
    manifest and hidden ones (`.last_used`, temporaries)."""
    out = []
    for root, dirs, files in os.walk(entry):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(root, name)
            if not name.startswith(".") and path.is_file() and not path.is_symlink():
                out.append(path.relative_to(entry).as_posix())
    return sorted(name for name in out if name != MANIFEST)


def write_manifest(area: Area, entry: Path) -> dict:
    """Record every file's size and SHA-256 in `entry/manifest.json` (just before publishing)."""
    files = {}
    for rel in entry_files(entry):
        path = entry / rel
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": 1, "files": files}
    area.write_json(entry / MANIFEST, manifest)
    return manifest


def manifest_problem(manifest) -> str | None:
    """Why a parsed manifest.json cannot be used (None when it can)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest is None or not isinstance(files, dict):
        return "missing, unreadable or not valid JSON with a 'files' mapping"
    for rel, want in files.items():
        parts = rel.split("/")
        if rel.startswith("/") or "\\" in rel or any(part in ("", ".", "..") for part in parts):
            return f"lists {rel!r}, a path outside the entry"
        size, digest = (want.get("size"), want.get("sha256")) if isinstance(want, dict) else (None, None)
        if not isinstance(size, int) or size < 0 or not isinstance(digest, str) or len(digest) != 64:
            return f"entry for {rel!r} has no valid size and sha256"
    return None


def manifest_problems(entry: Path, hashes: bool | None, hash_limit: int = HASH_LIMIT,
                      memo: dict | None = None) -> tuple[list[str], bool, tuple]:
    """Compare an entry's files with its manifest: (problems, hashed, file stats). Sizes
    always; SHA-256 when `hashes` (None: when the entry is at most `hash_limit` bytes),
    unless `memo` says this process hashed the very same files (same stats) before."""
    manifest_path = entry / MANIFEST
    manifest = read_json(manifest_path)
    problem = manifest_problem(manifest)
    if problem:
        return [f"{manifest_path}: {problem}"], False, ()
    files, problems, stats = manifest["files"], [], []
    for rel, want in sorted(files.items()):
        path = entry / rel
        try:
            stat = path.stat()
        except OSError:
            problems.append(f"{path}: missing (published with {want['size']:,} bytes)")
            continue
        stats.append((rel, stat.st_size, stat.st_mtime_ns, stat.st_ino))
        if not path.is_file():
            problems.append(f"{path}: not a file")
        elif stat.st_size != want["size"]:
            problems.append(f"{path}: {stat.st_size:,} bytes, published with {want['size']:,} "
                            f"({'truncated' if stat.st_size < want['size'] else 'changed'})")
    if hashes is None:
        hashes = sum(want["size"] for want in files.values()) <= hash_limit
    signature = tuple(stats)
    if problems or not hashes or (memo is not None and memo.get(entry) == signature):
        return problems, hashes and not problems, signature
    for rel, want in sorted(files.items()):
        if sha256_file(entry / rel) != want["sha256"]:
            problems.append(f"{entry / rel}: content differs from what was published (SHA-256 mismatch)")
    if memo is not None and not problems:
        memo[entry] = signature
    return problems, True, signature


def parse_stage_record(info, key: str) -> StageRecord:
    """The record of stage `key` in a parsed stage.json (None: unreadable); BadRecord says
    why it cannot be used."""
    if not isinstance(info, dict):
        raise BadRecord("missing, unreadable or not a JSON object")
    return StageRecord.from_json(info, key)


def stage_json_problem(info, key: str) -> str | None:
    """Why a parsed stage.json cannot be used (None when it can)."""
    try:
        parse_stage_record(info, key)
    except BadRecord as exc:
        return str(exc)
    return None


def eval_json_problem(info) -> str | None:
    rows = info.get("rows") if isinstance(info, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        return "missing, unreadable or not a JSON object with a list of result rows"
    if any(not isinstance(row.get(field), str) for row in rows for field in ("task", "metric")):
        return "has a result row without task and metric"
    return None


def content_problems(kind: str, key: str, entry: Path) -> list[str]:
    """The records an entry's users parse (stage.json, eval.json), checked for what they need."""
    if kind == "stages":
        problem = stage_json_problem(read_json(entry / STAGE_RECORD), key)
        problems = [f"{entry / STAGE_RECORD}: {problem}"] if problem else []
        if not (entry / "model").is_dir():
            problems.append(f"{entry / 'model'}: missing")
        return problems
    if kind == "evals":
        problem = eval_json_problem(read_json(entry / "eval.json"))
        problems = [f"{entry / 'eval.json'}: {problem}"] if problem else []
        if not (entry / "out").is_dir():
            problems.append(f"{entry / 'out'}: missing")
        return problems
    return []


def verify_entry(kind: str, key: str, entry: Path, hashes: bool | None = None, hash_limit: int = HASH_LIMIT,
                 memo: dict | None = None) -> Verdict | None:
    """Check a stage, evaluation or dataset entry (None when there is none)."""
    if not (entry.exists() or entry.is_symlink()):
        return None
    if not entry.is_dir() or entry.is_symlink():
        return Verdict(kind, key, entry, [f"{entry}: not a directory"], manifest=False)
    if not (entry / MANIFEST).exists():
        # Published before manifests: the structure is all there is to check. Datasets
        # are rebuilt instead (seconds), so they are only flagged by `manifest=False`.
        # A stage adopted that way must also hold finite weights: NaN written in place
        # keeps every size, and adoption would make it permanent.
        whole = hashes is not False
        problems = [] if kind == "datasets" else structure_problems(entry, whole=whole)
        if kind == "stages" and whole and not problems:
            problems = weights_problems(entry)
        return Verdict(kind, key, entry, content_problems(kind, key, entry) + problems, manifest=False)
    problems, hashed, _stats = manifest_problems(entry, hashes, hash_limit, memo)
    return Verdict(kind, key, entry, problems + content_problems(kind, key, entry), manifest=True, hashed=hashed)


# Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                      "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole: its header must parse and its tensors must
    exactly fill the bytes after it (a truncated file fails; content errors need hashes)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0 or length > size - 8:
            return f"{size:,} bytes cannot hold the safetensors header it announces (truncated)"
        try:
            header = json.loads(fh.read(length))
        except (ValueError, RecursionError):
            return "safetensors header is not valid JSON"
    end = 0
    for name, tensor in header.items() if isinstance(header, dict) else [("?", None)]:
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(offset) for offset in tensor["data_offsets"])
            count = 1
            for dim in tensor["shape"]:
                count *= int(dim)
        except (TypeError, KeyError, ValueError):
            return f"tensor {name!r} has no valid shape and data_offsets"
        width = SAFETENSORS_DTYPES.get(tensor.get("dtype"))
        if begin < 0 or stop < begin or (width is not None and stop - begin != count * width):
            return f"tensor {name!r}: data_offsets {begin}..{stop} do not fit its dtype and shape"
        end = max(end, stop)
    if end != size - 8 - length:
        return (f"{size:,} bytes, its tensors need {8 + length + end:,} "
                f"({'truncated' if end > size - 8 - length else 'trailing bytes'})")
    return None


# A float is NaN or infinite exactly when all its exponent bits are set: the unsigned
# view and exponent mask of each safetensors float dtype (F8_E4M3 is e4m3fn: no infinity,
# NaN is S.1111.111, so its mask takes the mantissa too). Testing bits needs no torch,
# and numpy has no bfloat16.
NONFINITE_MASKS = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00),
                   "BF16": ("<u2", 0x7F80), "F8_E5M2": ("u1", 0x7C), "F8_E4M3": ("u1", 0x7F)}
# Read 1 MiB at a time: memory stays flat whatever the model, and the mask-and-max runs
# at 7-9 GiB/s on a chunk this size (16 MiB chunks fall out of the CPU cache: 3-5 GiB/s).
# Whole scan, file in the page cache, one core of the 2-core dev machine: 0.24-0.27 s per
# GiB (F32 and BF16 alike), where safe_open(framework="pt") + torch.isfinite took 2-3 s.
# It runs only when a stage from before manifests is adopted (once per entry), and on
# `cache verify` of such entries; from disk it is bound by the read speed instead.
FINITE_CHUNK = 2**20


def nonfinite_problem(path: Path) -> str | None:
    """The first tensor of a structurally whole .safetensors file that holds a NaN or an
    infinity (None when all are finite), read tensor by tensor in FINITE_CHUNK pieces."""
    import numpy as np

    buffer = bytearray(FINITE_CHUNK)
    with path.open("rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(length))
        tensors = [(name, t) for name, t in header.items()
                   if name != "__metadata__" and isinstance(t, dict) and t.get("dtype") in NONFINITE_MASKS]
        for name, tensor in sorted(tensors, key=lambda item: int(item[1]["data_offsets"][0])):
            dtype, mask = NONFINITE_MASKS[tensor["dtype"]]
            mask = np.dtype(dtype).type(mask)
            begin, stop = (int(offset) for offset in tensor["data_offsets"])
            fh.seek(8 + length + begin)
            left = stop - begin
            while left > 0:
                read = fh.readinto(memoryview(buffer)[: min(left, FINITE_CHUNK)])
                if not read:
                    return f"tensor {name!r}: the file ends inside its data (truncated)"
                values = np.frombuffer(buffer, dtype, count=read // np.dtype(dtype).itemsize)
                if (values & mask).max(initial=0) == mask:
                    return f"tensor {name!r} ({tensor['dtype']}) holds NaN or infinite values"
                left -= read
    return None


def weights_problems(entry: Path) -> list[str]:
    """Every .safetensors file of an entry (model, adapter, shards) checked for NaN and infinities."""
    problems = []
    for rel in entry_files(entry):
        if rel.endswith(".safetensors"):
            try:
                problem = nonfinite_problem(entry / rel)
            except OSError as exc:
                problem = f"unreadable ({exc.strerror})"
            problems += [f"{entry / rel}: {problem}; a diverged model is never used"] if problem else []
    return problems


def zip_directory_problem(path: Path) -> str | None:
    """A zip file's central directory reads and every member lies within the file (no
    CRC: cheap for any size; a truncated file loses its directory and fails)."""
    import zipfile

    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + 30 + len(info.filename) + info.compress_size > size:
                    return f"member {info.filename} runs past the end of the file (truncated)"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"not a readable zip archive ({exc})"
    return None


def zip_problem(path: Path) -> str | None:
    """A zip-based file (.npz, torch's .bin/.pt): every member's CRC must match."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"not a readable zip archive ({exc})"
    return f"member {bad} fails its CRC check" if bad else None


def json_file_problem(path: Path) -> str | None:
    try:
        text = path.read_bytes()
        if path.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    json.loads(line)
        else:
            json.loads(text)
    except ValueError as exc:
        return f"not valid JSON ({str(exc)[:80]})"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    return None


def structure_problems(entry: Path, whole: bool = True) -> list[str]:
    """What can be checked without a manifest: JSON and JSONL files parse, safetensors
    files are whole, a sharded model's shards exist and (`whole`: reading every byte)
    zip archives (torch's .bin) pass their CRCs."""
    problems = []
    for rel in entry_files(entry):
        path = entry / rel
        if path.suffix in (".json", ".jsonl"):
            problem = json_file_problem(path)
        elif path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif whole and path.suffix in (".npz", ".bin", ".pt", ".pth") and path.stat().st_size > 0:
            problem = zip_problem(path) if path.suffix != ".bin" or is_zip(path) else None
        else:
            problem = None
        if problem:
            problems.append(f"{path}: {problem}")
        if path.name.endswith(".index.json") and not problem:
            weight_map = (read_json(path) or {}).get("weight_map")
            for shard in sorted(set(weight_map.values()) if isinstance(weight_map, dict) else ()):
                if not isinstance(shard, str) or "/" in shard or not (path.parent / shard).is_file():
                    problems.append(f"{path.parent / str(shard)}: listed in {path.name} but missing")
    return problems


def is_zip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def reflogps_problems(path: Path) -> list[str]:
    """A cached reference log-probs file: a whole .npz with `chosen` and `rejected`."""
    import zipfile

    problem = zip_problem(path)
    if problem is None:
        with zipfile.ZipFile(path) as archive:
            if not {"chosen.npy", "rejected.npy"} <= set(archive.namelist()):
                problem = "lacks the chosen and rejected arrays"
    return [f"{path}: {problem}"] if problem else []


def curated_problems(path: Path) -> list[str]:
    """A curated set: JSONL of objects, as many rows as its curation report says."""
    return load_curated(path)[2]


def load_curated(path: Path) -> tuple[list[dict], dict, list[str]]:
    """A cached curated set read once: (rows, curation report, problems); the rows and
    report are usable only when there are no problems."""
    report_path = path.with_suffix(".curation.json")
    report = read_json(report_path)
    if not isinstance(report, dict):
        return [], {}, [f"{report_path}: missing, unreadable or not a JSON object"]
    try:
        rows = [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        return [], report, [f"{path}: not valid JSON lines ({str(exc)[:80]})"]
    if not all(isinstance(row, dict) for row in rows):
        return rows, report, [f"{path}: a row is not a JSON object"]
    expected = report.get("rows_out")
    if isinstance(expected, int) and expected != len(rows):
        return rows, report, [f"{path}: {len(rows):,} rows, its curation report says {expected:,} (truncated?)"]
    return rows, report, []


def check(cache: Cache, entry: Entry, hashes: bool | None = None) -> Verdict:
    """Any listed entry checked: `hashes` False compares sizes only (and skips the files
    without manifests that need reading whole), True hashes everything. Partial stages
    are training state, not results: nothing to check."""
    if entry.kind in MANIFESTED:
        verdict = verify_entry(entry.kind, entry.key, entry.path, hashes, cache.hash_limit)
        return verdict or Verdict(entry.kind, entry.key, entry.path, [f"{entry.path}: vanished"], manifest=False)
    if hashes is False:
        return Verdict(entry.kind, entry.key, entry.path, [], manifest=False)
    if entry.kind == "reflogps":
        return Verdict(entry.kind, entry.key, entry.path, reflogps_problems(entry.path), manifest=False)
    if entry.kind == "curated":
        return Verdict(entry.kind, entry.key, entry.path, curated_problems(entry.path), manifest=False)
    return Verdict(entry.kind, entry.key, entry.path, [], manifest=False)


@dataclass
class Checked:
    entry: Entry
    verdict: Verdict
    action: str = ""   # what --fix did: "removed", "manifest recorded", ...


def verify_cache(cache: Cache, items: list[Entry], fix: bool = False) -> list[Checked]:
    """`posttrain cache verify`: hash every entry in `items` (partial stages are skipped).

    With `fix`, a corrupt entry is removed (made again when next needed; not while a run
    trains it), an intact one from before manifests gets its manifest, and a dataset
    from before manifests is removed (rebuilt in seconds when next used).
    """
    out = []
    for entry in items:
        if entry.kind == "partial":
            continue
        verdict, action = check(cache, entry, hashes=True), ""
        legacy = entry.kind in MANIFESTED and not verdict.manifest
        if fix and (verdict.problems or (legacy and entry.kind == "datasets")):
            if in_training(cache, entry):
                action = "kept: a run is training it"
            else:
                remove(cache, entry)
                action = "removed" if verdict.problems else "removed: rebuilt when next used"
        elif fix and legacy:
            write_manifest(cache.area, entry.path)
            action = "manifest recorded"
        out.append(Checked(entry, verdict, action))
    return out


# ---------------------------------------------------------------- inspection and cleaning


@dataclass
class Entry:
    kind: str            # stages | partial | datasets | curated | reflogps | evals
    key: str
    path: Path
    size: int            # bytes
    last_used: float     # epoch seconds
    info: dict

    @property
    def label(self) -> str:
        if self.kind in ("stages", "partial"):
            chain = self.info.get("chain")
            chain = " -> ".join(map(str, chain)) if isinstance(chain, list) else ""
            chain = chain or str(self.info.get("stage", "?"))
            seed = self.info.get("seed")
            return f"{chain} (seed {seed})" if seed is not None else chain
        return str(self.info.get("label", ""))


def tree_size(path: Path) -> int:
    """Bytes under `path`, links counted as links (never followed)."""
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def last_used(path: Path) -> float:
    """When an entry was last used: its `.last_used` marker (a regular file, never a link
    followed), else the entry's own modification time."""
    import stat

    try:
        marker = (path / ".last_used").lstat()
        if stat.S_ISREG(marker.st_mode):
            return marker.st_mtime
    except OSError:
        pass
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def entry_name_ok(kind: str, name: str) -> bool:
    """Whether `name` in the `kind` folder has the exact shape posttrain gives its entries."""
    match = ENTRY_NAMES[kind].fullmatch(name) if kind in ENTRY_NAMES else None
    return match is not None and (kind != "curated" or name_problem(match["dataset"]) is None)


def kind_folder(cache: Cache, kind: str) -> Path | None:
    """The cache's folder of a kind, when it is a real folder (a link is never followed)."""
    folder = cache.root / kind
    return folder if folder.is_dir() and not folder.is_symlink() else None


def holds_cache_layout(root: Path) -> bool:
    """Whether an unmarked, non-empty folder is a cache posttrain wrote before the marker
    existed: it holds an entry, a leftover or a lock of posttrain's shape, or nothing but
    posttrain's own (empty) folders."""
    only_ours = True
    for top in root.iterdir():
        if top.name not in (*KINDS, "locks") or top.is_symlink() or not top.is_dir():
            only_ours = False
            continue
        for path in top.iterdir():
            if top.name == "locks":
                if LOCK_NAME.fullmatch(path.name):
                    return True
            elif entry_name_ok(top.name, path.name) or is_temporary(top.name, path.name):
                return True
            only_ours = False
    return only_ours


def entries(cache: Cache, kinds=KINDS) -> list[Entry]:
    """Every entry in the cache with its size and last use (locks are not entries)."""
    out = []
    for kind in kinds:
        folder = kind_folder(cache, kind)
        for path in sorted(folder.iterdir()) if folder else ():
            if not entry_name_ok(kind, path.name) or path.name.endswith(".curation.json"):
                continue  # not posttrain's (never touched), or a curated set's report (part of its entry)
            entry_kind, key = kind, path.name
            if kind == "stages" and key.startswith(PARTIAL_PREFIX):
                entry_kind, key = "partial", key[len(PARTIAL_PREFIX):]
            info = {}
            if entry_kind in ("stages", "partial"):
                info = read_object(path / STAGE_RECORD) or read_object(path / "pending.json")
                if entry_kind == "partial":
                    ckpt = latest_checkpoint(path / "trainer")
                    info["resume_step"] = checkpoint_step(ckpt) if ckpt else None
            elif kind == "evals":
                info = read_object(path / "eval.json")
            size = tree_size(path)
            key = key.removesuffix(".npz")
            if kind == "curated":  # <dataset>-<key>.jsonl beside its <dataset>-<key>.curation.json
                report = path.with_suffix(".curation.json")
                size += tree_size(report) if report.is_file() else 0
                dataset, _, key = key.removesuffix(".jsonl").rpartition("-")
                info = {"label": f"curated {dataset}"}
            out.append(Entry(entry_kind, key, path, size, last_used(path), info))
    return out


def read_json(path: Path) -> dict | None:
    """Parsed JSON (any type), or None when the file is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def read_object(path: Path) -> dict:
    """A JSON object from `path`, or {} (for listings, which must survive broken entries)."""
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def is_locked(cache: Cache, key: str) -> bool:
    """True while some process holds the training lock of `key`. No lock file (or none
    posttrain could have made): nobody holds it, and nothing is written to find out."""
    from posttrain.locks import lock_timeout

    Timeout = lock_timeout()
    path = cache.root / "locks" / f"{key}.lock"
    if kind_folder(cache, "locks") is None or path.is_symlink() or not path.is_file():
        return False
    lock = cache.lock(key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def in_training(cache: Cache, entry: Entry) -> bool:
    """A stage (or its partial dir) that a running posttrain holds the lock of: never removed."""
    return entry.kind in ("stages", "partial") and is_locked(cache, entry.key)


def remove(cache: Cache, entry: Entry) -> None:
    """Remove a listed entry; only ever a name of posttrain's shape in its kind's folder."""
    kind = "stages" if entry.kind == "partial" else entry.kind
    if entry.path.parent != cache.root / kind or not entry_name_ok(kind, entry.path.name):
        raise PosttrainError(f"refusing to remove {entry.path}: not a posttrain cache entry")
    cache.area.rmtree(entry.path)
    if entry.kind == "curated":
        cache.area.unlink(entry.path.with_suffix(".curation.json"))


def age_days(entry: Entry, now: float | None = None) -> float:
    return ((now or time.time()) - entry.last_used) / 86400


def is_temporary(kind: str, name: str) -> bool:
    """A leftover of one of posttrain's writers beside the entries of `kind`, by the names
    they give: `.tmp-<entry>-<pid>` (datasets, evaluations), `.<entry>.tmp` and
    `.<entry>.<pid>.tmp` (Area's atomic writes), `.<key>-<pid>.npz` (older log-prob writers)."""
    candidates = []
    if match := re.fullmatch(r"\.tmp-(.+)-\d+", name):
        candidates.append(match[1])
    if match := re.fullmatch(r"\.(.+)\.tmp", name):
        candidates += [match[1], re.sub(r"\.\d+$", "", match[1])]
    if kind == "reflogps" and (match := re.fullmatch(rf"\.({HEX64})-\d+\.npz", name)):
        candidates.append(f"{match[1]}.npz")
    return any(not entry.startswith(".") and entry_name_ok(kind, entry) for entry in candidates)


def stale_temporaries(cache: Cache, min_age_s: float = 3600) -> list[Path]:
    """Leftovers of writers that died, older than `min_age_s`."""
    now = time.time()
    out = []
    for kind in KINDS:
        folder = kind_folder(cache, kind)
        for path in sorted(folder.iterdir()) if folder else ():
            try:
                if is_temporary(kind, path.name) and now - path.lstat().st_mtime > min_age_s:
                    out.append(path)
            except OSError:
                pass  # its writer renamed it just now
    return out


def select_garbage(items: list[Entry], older_than_days: float | None, max_size: int | None,
                   locked=lambda entry: False, now: float | None = None) -> list[Entry]:
    """Entries to evict: unused for `older_than_days`, then least recently used ones
    until the rest fits in `max_size` bytes. Entries being trained (locked) are kept."""
    candidates = [e for e in items if not locked(e)]
    doomed = [e for e in candidates if older_than_days is not None and age_days(e, now) > older_than_days]
    if max_size is not None:
        remaining = sum(e.size for e in items) - sum(e.size for e in doomed)
        for entry in sorted((e for e in candidates if e not in doomed), key=lambda e: e.last_used):
            if remaining <= max_size:
                break
            doomed.append(entry)
            remaining -= entry.size
    return doomed


def find(items: list[Entry], prefix: str) -> list[Entry]:
    return [e for e in items if e.key.startswith(prefix)]


UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30,
         "T": 2**40, "TB": 2**40}


def parse_size(text: str) -> int:
    """'20GB', '500M', '1.5G', '1024' -> bytes (binary units). No sign, exponent, nan or inf."""
    import math
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", text.upper())
    size = float(match.group(1)) * UNITS[match.group(2)] if match else math.nan
    if not math.isfinite(size) or size > 2**80:
        raise ValueError(f"not a size: {text!r} (e.g. 500MB, 20GB, 1.5TB)")
    return int(size)


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"
