"""Regenerate docs/bad_input.md: every case of tests/test_bad_input.py run through the command-line entry
point, its exit code and the one line it prints.

    WANDB_MODE=disabled .venv/bin/python tests/tools/bad_input_table.py > docs/bad_input.md
"""

import contextlib
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from test_bad_input import CASES  # noqa: E402

from experiments import train  # noqa: E402

HEADER = """# Bad input: the tested cases

Every row is a case of `tests/test_bad_input.py` (run in-process through the command-line entry point,
`experiments.train.cli`): the arguments, the exit code and the one line printed on stderr; none of them
writes a record. Generated {date} by `tests/tools/bad_input_table.py` at commit {commit} (plus the
working tree's changes); regenerate it after changing a message.

| input | exit | line |
|---|---|---|"""


def run(args: list[str], tmp: str) -> tuple[int, str]:
    more = [a for a in (f"results_dir={tmp}/results", f"cache_dir={tmp}/cache", "logger=none")
            if not any(x.startswith(a.split("=")[0] + "=") for x in args)]
    GlobalHydra.instance().clear()
    sys.argv = ["lorabench-train", *args, *more]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            train.cli()
            code = 0
        except SystemExit as e:
            code = e.code
    return code, " / ".join(err.getvalue().strip().splitlines())


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    print(HEADER.format(date=time.strftime("%Y-%m-%d"), commit=commit.strip()))
    with tempfile.TemporaryDirectory() as tmp:
        for args, _ in CASES:
            code, line = run(args, tmp)
            print(f"| `{' '.join(args)}` | {code} | {line.replace('|', '/')} |")


if __name__ == "__main__":
    main()
