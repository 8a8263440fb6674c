"""Keep a study's evidence as it is produced: each finished trial's compact record, a consistent copy
of a SQLite study, and optionally a git commit of both, so a lost machine loses at most the trial
in progress.

Compact means what a report needs and nothing that can be recomputed or is large: `run.json`,
`config.yaml`, `metrics.csv`, `eval_history.json`, `predictions/*.jsonl` and the fit log's last
lines; never checkpoints or adapters.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

from .. import runs

COMPACT_FILES = (runs.RUN_RECORD, runs.CONFIG, runs.METRICS, runs.EVAL_HISTORY)
LOG_TAIL_LINES = 200


def archive_run(run_dir: Path, dest: Path, log: Path | None = None) -> list[Path]:
    """Copy `run_dir`'s compact record to `dest` (replacing an earlier copy); returns the files written."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    written = []
    for name in COMPACT_FILES:
        if (run_dir / name).is_file():
            written.append(Path(shutil.copy2(run_dir / name, dest / name)))
    predictions = run_dir / runs.PREDICTIONS_DIR
    if predictions.is_dir():
        (dest / runs.PREDICTIONS_DIR).mkdir()
        for file in sorted(predictions.glob("*.jsonl")):
            written.append(Path(shutil.copy2(file, dest / runs.PREDICTIONS_DIR / file.name)))
    if log is not None and log.is_file():
        lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
        lines = [ln for ln in lines if ln.strip()][-LOG_TAIL_LINES:]
        (dest / "fit.log.tail").write_text("\n".join(lines) + "\n")
        written.append(dest / "fit.log.tail")
    return written


def sqlite_file(storage: str) -> Path | None:
    scheme, _, rest = storage.partition("://")
    if scheme == "sqlite" and rest.startswith("/") and rest not in ("/", "/:memory:"):
        return Path(rest[1:])
    return None


def copy_sqlite(source: Path, dest: Path) -> Path:
    """A consistent copy of a live SQLite database (SQLite's online backup), written atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    partial.unlink(missing_ok=True)
    src, out = sqlite3.connect(source), sqlite3.connect(partial)
    try:
        src.backup(out)
    finally:
        out.close()
        src.close()
    partial.replace(dest)
    return dest


def git_commit(paths: list[Path], message: str) -> str:
    """Commit exactly `paths` (nothing else staged goes with them); returns a one-line outcome."""
    paths = [p for p in paths if p.exists()]
    if not paths:
        return "nothing to commit"
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                         cwd=paths[0].parent if paths[0].is_file() else paths[0])
    if top.returncode != 0:
        return f"not committed: {paths[0]} is not in a git work tree"
    root = Path(top.stdout.strip())
    names = [str(p.resolve().relative_to(root)) for p in paths]
    added = subprocess.run(["git", "add", "--", *names], cwd=root, capture_output=True, text=True)
    if added.returncode != 0:
        return f"not committed: git add failed: {' '.join((added.stderr or added.stdout).split())[:300]}"
    staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *names], cwd=root)
    if staged.returncode == 0:
        return "unchanged, nothing to commit"
    done = subprocess.run(["git", "commit", "-q", "-m", message, "--", *names], cwd=root, capture_output=True,
                          text=True)
    if done.returncode != 0:
        return f"git commit failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return f"committed {head.stdout.strip()}"


def main(argv: list[str] | None = None) -> int:
    """`python -m mixlora_lit.sweep.archive RUN_DIR DEST [--commit]`: archive one run (a study's base row)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mixlora_lit.sweep.archive", description=main.__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--commit", action="store_true", help="git-commit the archived files")
    args = parser.parse_args(argv)
    record = runs.read_record(args.run_dir)
    if record is None or record.status != "finished":
        print(f"{args.run_dir}: no finished run record; nothing archived")
        return 1
    written = archive_run(args.run_dir, args.dest)
    print(f"archived {args.run_dir} in {args.dest}")
    if args.commit:
        print(git_commit([args.dest], f"{record.run_name or args.dest.name}: {record.method} run finished; "
                                      f"compact record"))
    return 0 if written else 1


if __name__ == "__main__":
    raise SystemExit(main())
