"""``python -m scheduler``: a scheduler candidate without HTTP (same as ``vramq scheduler``)."""

from __future__ import annotations

import asyncio
import logging
import sys

from core.settings import load_settings
from core.types import ConfigError
from scheduler.service import run_forever


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        asyncio.run(run_forever(settings))
    except ConfigError as exc:
        print(f"vramq scheduler: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
