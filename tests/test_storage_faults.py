"""Storage faults while sharding (issue 14, item 2): the S3 endpoint goes down for several seconds,
the disk fills up.

The S3 tests talk to a real moto server through :class:`s3proxy.FlakyProxy` (the writer's endpoint);
a poller reads the bucket directly from moto, so it sees what a reader would see while the endpoint
is down for the writer. The disk-full test runs ``msa shard`` in a user+mount namespace over a
size-limited tmpfs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from s3proxy import FlakyProxy

from shards import cli
from shards.manifest import MANIFEST_NAME, SHARD_RE, SIZES_NAME
from shards.writer import write_shards

BUCKET = "msa-shards"  # created by the s3_endpoint fixture (conftest)
ROOT = Path(__file__).resolve().parent.parent
OUTAGE_S = 6.0


class BucketWatcher:
    """Polls a prefix of the bucket straight from moto (not through the proxy) and records every
    version of every final name it sees (shards and manifest.json): key -> {(size, sha256), ...};
    ``shards_with_manifest``: the shard keys listed together with manifest.json the first time it
    showed up."""

    def __init__(self, endpoint: str, prefix: str):
        import boto3

        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.prefix = prefix.rstrip("/") + "/"
        self.seen: dict[str, set[tuple[int, str]]] = {}
        self._etags: set[tuple[str, str]] = set()
        self.shards_with_manifest: set[str] | None = None
        self.polls = 0

    def poll(self) -> set[str]:
        """One listing; fetches (and hashes) each final-name object version not seen before.
        Returns the shard keys listed."""
        listing = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=self.prefix).get("Contents", [])
        self.polls += 1
        keys = {o["Key"][len(self.prefix):]: o["ETag"] for o in listing}
        shards = {k for k in keys if SHARD_RE.match(k)}
        if MANIFEST_NAME in keys and self.shards_with_manifest is None:
            self.shards_with_manifest = shards
        for name, etag in keys.items():
            if (name in shards or name == MANIFEST_NAME) and (name, etag) not in self._etags:
                body = self.s3.get_object(Bucket=BUCKET, Key=self.prefix + name)["Body"].read()
                self._etags.add((name, etag))
                self.seen.setdefault(name, set()).add((len(body), hashlib.sha256(body).hexdigest()))
        return shards

    def check_complete(self) -> dict:
        """Assert every version seen under a final name is the complete file the final manifest
        lists, and that manifest.json appeared after every shard it lists; returns the manifest."""
        raw = self.s3.get_object(Bucket=BUCKET, Key=self.prefix + MANIFEST_NAME)["Body"].read()
        manifest = json.loads(raw)
        final = {s["name"]: (s["bytes"], s["sha256"])
                 for split in manifest["splits"].values() for s in split["shards"]}
        assert self.seen[MANIFEST_NAME] == {(len(raw), hashlib.sha256(raw).hexdigest())}
        for name, versions in self.seen.items():
            if name != MANIFEST_NAME:
                assert versions == {final[name]}, f"{name}: saw {versions}, manifest lists {final[name]}"
        assert self.shards_with_manifest is not None and set(final) <= self.shards_with_manifest
        return manifest


def _shard_while_watching(watcher: BucketWatcher, proxy: FlakyProxy, run, on_first_shard) -> dict:
    """``run()`` in a thread while ``watcher`` polls the bucket every 20 ms; ``on_first_shard(proxy)``
    once the first shard shows up. Returns what ``run`` returned (``value``) or raised (``error``),
    and the figures of the run (seconds from the start, shards present at the fault, polls)."""
    result: dict = {}

    def target():
        try:
            result["value"] = run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    down_polls = 0
    while thread.is_alive():
        shards = watcher.poll()
        if "fault_at" not in result and shards:
            on_first_shard(proxy)
            result["fault_at"], result["shards_at_fault"] = time.monotonic() - started, len(shards)
        down_polls += proxy.is_down
        time.sleep(0.02)
    result["done_at"] = time.monotonic() - started
    thread.join()
    watcher.poll()
    result["polls"], result["down_polls"] = watcher.polls, down_polls
    return result


@pytest.mark.slow
def test_s3_outage_during_sharding_is_retried_and_no_partial_object_is_visible(tiny_corpus, s3_endpoint, tmp_path,
                                                                                monkeypatch):
    # botocore's own retries off: its random backoff (up to 1+2+4+8 s) would make the run's length
    # vary, and the store's retry (shards.storage.RETRY_SECONDS) is what this test is about
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    annotations, images = tiny_corpus
    target = urlsplit(s3_endpoint)
    uri = f"s3://{BUCKET}/outage/synth"
    watcher = BucketWatcher(s3_endpoint, "outage/synth")
    with FlakyProxy(target.hostname, target.port) as proxy:
        opts = {"endpoint_url": proxy.endpoint_url}
        r = _shard_while_watching(
            watcher, proxy, lambda: write_shards(annotations, images, uri, shard_size=4, storage_options=opts,
                                                 progress=False),
            lambda proxy: proxy.outage(OUTAGE_S))
    assert "error" not in r, f"sharding did not survive a {OUTAGE_S:g} s outage: {r.get('error')!r}"
    m = r["value"]
    print("figures:", {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items() if k != "value"},
          "shards", len(m.shards()), "refused", proxy.refused)
    # the outage hit the run: the writer's connections were refused while shards were still to be
    # written, it finished after the endpoint came back, and the poller read the bucket meanwhile
    assert proxy.refused > 0 and r["shards_at_fault"] < len(m.shards()), r
    assert r["done_at"] - r["fault_at"] >= OUTAGE_S and r["down_polls"] > 0, r
    manifest = watcher.check_complete()
    assert manifest["digest"] == m.digest and set(watcher.seen) == {s.name for s in m.shards()} | {MANIFEST_NAME}
    # the same bytes as without faults, and the set verifies through the command line
    assert write_shards(annotations, images, str(tmp_path / "local"), shard_size=4, progress=False).digest == m.digest
    assert cli.main(["shard", "verify", uri, "--endpoint-url", s3_endpoint, "--no-progress"]) == 0


def test_s3_endpoint_down_too_long_fails_clearly_and_a_rerun_completes(tiny_corpus, s3_endpoint, monkeypatch,
                                                                       capsys):
    import shards.storage

    monkeypatch.setattr(shards.storage, "RETRY_SECONDS", 1.0)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off (they would add ~10 s)
    annotations, images = tiny_corpus
    target = urlsplit(s3_endpoint)
    uri = f"s3://{BUCKET}/down/synth"
    watcher = BucketWatcher(s3_endpoint, "down/synth")
    with FlakyProxy(target.hostname, target.port) as proxy:
        argv = ["shard", str(annotations), "--images", str(images), "--out", uri, "--shard-size", "4",
                "--no-progress", "--endpoint-url", proxy.endpoint_url]
        capsys.readouterr()
        r = _shard_while_watching(watcher, proxy, lambda: cli.main(argv), FlakyProxy.down)  # down for good
        err = capsys.readouterr().err.strip().splitlines()
        assert r.get("value") == cli.EXIT_STORAGE and proxy.refused > 1, (r, err)
        line = next(x for x in err if x.startswith("msa shard: storage error: "))
        assert f"{uri}/" in line and "still failing after retrying for 1 s" in line, err
        assert MANIFEST_NAME not in watcher.seen and watcher.seen, watcher.seen  # some shards, no manifest

        proxy.up()
        assert cli.main(argv) == 0
    assert cli.main(["shard", "verify", uri, "--endpoint-url", s3_endpoint, "--no-progress"]) == 0
    watcher.poll()
    # every shard seen during the failed run was complete: the re-run's manifest lists the same bytes
    manifest = watcher.check_complete()
    assert manifest["splits"]["train"]["images"] == 48 and len(watcher.seen) == 1 + sum(
        len(split["shards"]) for split in manifest["splits"].values())


def _namespace_works() -> str | None:
    """None if this process can mount a tmpfs in a new user+mount namespace, else why not."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d "
                            "&& umount $d && rmdir $d"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a user+mount namespace here: {probe.stderr.strip()[:200]}"
    return None


def _sha256sums(text: str) -> dict[str, str]:
    """``sha256sum`` output -> {name: sha256}."""
    return {name: sha for sha, name in (line.split() for line in text.splitlines())}


_DISK_FULL_SCRIPT = r"""
set -u
dir=$1; small=$2; big=$3; shift 3
mount -t tmpfs -o size=$small tmpfs "$dir" || exit 99
"$@" --out "$dir/set" >/dev/null 2>"$dir.err1"; echo "$?" >"$dir.rc1"
(cd "$dir" && find . -type f -exec sha256sum {} + | sort -k2) >"$dir.files1"
mount -o remount,size=$big "$dir" || exit 98
"$@" --out "$dir/set" >/dev/null 2>"$dir.err2"; echo "$?" >"$dir.rc2"
{MSA} shard verify "$dir/set" --no-progress >"$dir.verify" 2>&1; echo "$?" >"$dir.rc3"
(cd "$dir" && find . -type f -exec sha256sum {} + | sort -k2) >"$dir.files2"
"""


def test_disk_full_during_shard_writing_leaves_no_manifest_and_a_rerun_completes(tiny_corpus, tmp_path):
    reason = _namespace_works()
    if reason:
        pytest.skip(reason)
    annotations, images = tiny_corpus
    msa = str(Path(sys.executable).parent / "msa")
    # what the set needs on a tmpfs (whole pages per file), from the same corpus sharded locally
    ref = tmp_path / "ref"
    write_shards(annotations, images, str(ref), shard_size=8, progress=False)
    page = os.sysconf("SC_PAGE_SIZE")
    need = sum(-(-f.stat().st_size // page) * page for f in ref.rglob("*") if f.is_file())
    shard_pages = sum(-(-f.stat().st_size // page) * page for f in ref.rglob("*.tar"))
    n_shards = len(list(ref.rglob("*.tar")))

    results = {}
    # half the shards fit; then all of them fit but not the manifest (the last page is missing)
    for case, small in {"mid-shards": shard_pages // 2 // page * page, "at-manifest": need - page}.items():
        d = tmp_path / case
        d.mkdir()
        cmd = [msa, "shard", str(annotations), "--images", str(images), "--shard-size", "8", "--no-progress"]
        proc = subprocess.run(["unshare", "-Urm", "sh", "-c", _DISK_FULL_SCRIPT.replace("{MSA}", msa), "sh",
                               str(d), str(small), str(4 * need), *cmd], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        out = {key: Path(f"{d}.{key}").read_text() for key in
               ("rc1", "err1", "files1", "rc2", "err2", "rc3", "verify", "files2")}
        results[case] = {**out, "rc1": int(out["rc1"]), "rc2": int(out["rc2"]), "rc3": int(out["rc3"]),
                         "err1": out["err1"].strip().splitlines(),
                         "files1": _sha256sums(out["files1"]), "files2": _sha256sums(out["files2"])}

    expected = {f"./set/{f.relative_to(ref).as_posix()}": hashlib.sha256(f.read_bytes()).hexdigest()
                for f in ref.rglob("*") if f.is_file()}
    for case, r in results.items():
        # first run: exit 3 (storage error), one clear line naming the file and the cause (a run that
        # succeeds here means the tmpfs held more than its size in whole pages: see ``need``)
        assert r["rc1"] == cli.EXIT_STORAGE, (case, r)
        assert len(r["err1"]) == 1 and r["err1"][0].startswith("msa shard: storage error: "), (case, r["err1"])
        assert "No space left on device" in r["err1"][0] and "/set/" in r["err1"][0], (case, r["err1"])
        named = r["err1"][0].split("msa shard: storage error: ")[1].split(": ")[0]
        # no manifest, no temporary file; what is under a final name is complete (the bytes are
        # deterministic: each file equals the one of the same name in the reference set)
        assert r["files1"] and f"./set/{MANIFEST_NAME}" not in r["files1"], (case, r["files1"])
        assert all(expected.get(f) == sha for f, sha in r["files1"].items()), (case, r["files1"])
        # second run with space: exit 0, verified, the same files as the reference set
        assert r["rc2"] == 0, (case, r["err2"])
        assert r["rc3"] == 0 and f"OK, {n_shards} shard(s) verified" in r["verify"], (case, r["verify"])
        assert r["files2"] == expected, case
        r["named"] = named
    assert results["mid-shards"]["named"].endswith(".tar")
    assert results["at-manifest"]["named"].endswith(f"/set/{MANIFEST_NAME}")
    assert f"./set/{SIZES_NAME}" in results["at-manifest"]["files1"]
