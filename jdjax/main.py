"""Entry point: `python -m jdjax.main --config=configs/<method>.py[:variant] [--workdir=DIR]`.

The config is validated before anything is compiled or written; a bad config, a missing data
directory or an unreadable checkpoint ends the run with one message naming the fix and exit
status 2 (jdjax.cli). Rerunning the same command on the same workdir resumes from the last
checkpoint. A sweep (several runs) whose runs failed exits with status 1 after listing them.
"""

from __future__ import annotations

import sys

from jdjax import cli, tasks


def main(config, workdir: str) -> None:
    results = tasks.run(config, workdir)
    if results.get("status") == "failed":
        print(f"jdjax: {len(results.get('failed', {}))} run(s) failed: {results.get('failed')}; rerun the same "
              "command to retry them (finished runs are kept).", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    cli.run_app(main)
