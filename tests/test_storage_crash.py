"""SIGKILL a process that is storing results, many times: nothing it acknowledged is lost."""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys
from pathlib import Path

from storage.db import Database
from storage.images import TEMP_PREFIX
from generation.request import JobState
from storage.jobs import job_detail
from storage.maintenance import reconcile
from storage.settings import StorageSettings

CHILD = Path(__file__).with_name("storage_crash_child.py")
ROUNDS = 20


async def _run_and_kill(data_dir: Path, rng: random.Random) -> list[tuple[str, str]]:
    """Start the child, kill it at a random moment, return the jobs it reported committed."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), str(data_dir), stdout=asyncio.subprocess.PIPE)
    assert child.stdout is not None
    assert await asyncio.wait_for(child.stdout.readline(), timeout=30) == b"ready\n"
    await asyncio.sleep(rng.uniform(0.0, 0.3))
    child.kill()
    output = await child.stdout.read()
    await child.wait()
    # A line cut short by the kill was never fully acknowledged; keep complete lines only.
    complete = output[: output.rfind(b"\n") + 1].decode().splitlines()
    return [(job_id, sha256) for job_id, sha256 in map(str.split, complete)]


def _final_files(images_dir: Path) -> list[Path]:
    return [p for p in images_dir.rglob("*") if p.is_file() and not p.name.startswith(TEMP_PREFIX)]


async def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random(1234)
    settings = StorageSettings(data_dir=tmp_path)
    acknowledged: list[tuple[str, str]] = []
    for _ in range(ROUNDS):
        acknowledged += await _run_and_kill(tmp_path, rng)

        # No final name ever holds a half-written file: each one hashes to its own name.
        for path in _final_files(settings.images_dir):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem, path

        async with Database.open(settings) as db:
            integrity = [row[0] for row in await db.fetch_all("PRAGMA integrity_check")]
            assert integrity == ["ok"]
            for job_id, sha256 in acknowledged:
                detail = await job_detail(db, job_id)
                assert detail is not None, f"acknowledged job {job_id} was lost"
                assert detail.job.state is JobState.DONE
                (image,) = detail.images
                assert image.sha256 == sha256
                stored = (settings.images_dir / image.path).read_bytes()
                assert hashlib.sha256(stored).hexdigest() == sha256
            # Start-up reconciliation: temp files left by the kill go; no row lost its file.
            report = await reconcile(db, grace_s=0)
            assert report.missing_images == [] and report.errors == []
        assert not [p for p in settings.images_dir.rglob(f"{TEMP_PREFIX}*")]
    assert len(acknowledged) >= ROUNDS  # the child really got work done between kills
