"""The images' HEALTHCHECK: GET a local /healthz; exit 0 on 200, else 1.

Why a script: neither base image has curl or wget, and Python is there anyway. With no argument
it asks the worker's port (INTEREST_METRICS_PORT); the ingest and monitor are given their URL.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 4.0


def worker_url() -> str:
    return f"http://127.0.0.1:{os.environ.get('INTEREST_METRICS_PORT', '9108')}/healthz"


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else worker_url()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
