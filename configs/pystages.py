"""The Python stage of configs/python.toml."""

import json

import trio

from orchestrator.calls import StageRun


async def count_words(run: StageRun) -> None:
    """Count the lines and words of the text `extract` left in the item's workdir."""
    text = await trio.Path(run.workdir, "text").read_text()
    counts = {"item": run.item, "lines": len(text.splitlines()), "words": len(text.split())}
    await trio.Path(run.workdir, "counts.json").write_text(json.dumps(counts))
    run.log.info("{} words", counts["words"])
