"""Crash-test child: stores jobs with one image each, forever, until it is SIGKILLed.

Prints "ready" once the database is open, then `<job id> <sha256>` for each job only after
`finish_job` has returned, i.e. exactly what the bot would have acknowledged to a user.
The PNG and request helpers also serve the storage tests, which need the same kind of data.
Usage: python tests/storage_crash_child.py DATA_DIR
"""

from __future__ import annotations

import asyncio
import io
import random
import sys
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from generation.request import GenerationRequest
from storage.db import Database
from storage.images import save_image
from storage.jobs import create_job, finish_job, start_job
from storage.settings import StorageSettings


def make_png(
    rng: random.Random, width: int = 32, height: int = 24, parameters: str = "a cat"
) -> bytes:
    """Random-pixel PNG with a `parameters` text chunk, as the pipeline hands it to storage."""
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def sample_request(**overrides: object) -> GenerationRequest:
    values: dict[str, object] = {"prompt": "a lighthouse at dusk", "model": "sd15", "steps": 20,
                                 "guidance": 7.0, "seed": 42, "width": 512, "height": 512}
    return GenerationRequest.model_validate({**values, **overrides})


async def _store_forever(data_dir: Path) -> None:
    rng = random.Random()
    async with Database.open(StorageSettings(data_dir=data_dir)) as db:
        print("ready", flush=True)
        while True:
            job = await create_job(db, sample_request(seed=rng.randrange(2**32)), owner_id=7,
                                   channel_id=8, guild_id=9)
            await start_job(db, job.id, device="cpu")
            image = await save_image(db, job.id, 0, job.request.seed,
                                     make_png(rng, width=rng.choice((32, 96, 160))))
            await finish_job(db, job.id)
            print(job.id, image.sha256, flush=True)


if __name__ == "__main__":
    asyncio.run(_store_forever(Path(sys.argv[1])))
