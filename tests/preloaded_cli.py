"""Run many `mixlora-lit` commands as real processes without paying the interpreter's imports for each.

One helper process imports the command's modules (Lightning alone takes about 6 s), checks that the
imports started no thread (a fork would copy a half-held lock), and then forks one child per command.
Each child is a separate process that sets `sys.argv` and calls the console script's `main()`, exactly
as `mixlora-lit ARGS` does: its own stdout, stderr and exit code, an uncaught exception printed by the
interpreter's handler. What this skips is only the start-up imports, which the real command's tests
(`test_paths_with_spaces_work`, the resume tests) still pay.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

_SERVER = r"""
import json, os, sys, threading, traceback

import mixlora_lit.cli
import mixlora_lit.lightning.cli, mixlora_lit.evaluation.standalone, mixlora_lit.sweep.driver
import mixlora_lit.report.build, mixlora_lit.data.prepare, mixlora_lit.base_models

if threading.active_count() != 1:
    sys.exit(f"imports started threads {threading.enumerate()}: forking would be unsafe")
jobs, parallel = json.load(sys.stdin)


def child(argv, out, err):
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = ["mixlora-lit", *argv]
    code = 1
    try:
        code = mixlora_lit.cli.main()
    except SystemExit as stop:  # what the interpreter does with sys.exit(x)
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


running, codes, queue = {}, {}, list(enumerate(jobs))
while queue or running:
    while queue and len(running) < parallel:
        index, (argv, out, err) = queue.pop(0)
        pid = os.fork()
        if pid == 0:
            child(argv, out, err)
        running[pid] = index
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps([codes[i] for i in range(len(jobs))]))
"""


def run_commands(commands: list[list[str]], env: dict[str, str], parallel: int = 3, timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """Each command's exit code, stdout and stderr, in order; `parallel` run at a time."""
    with tempfile.TemporaryDirectory(prefix="mixlora-cli-") as tmp:
        jobs = [[argv, str(Path(tmp) / f"{i}.out"), str(Path(tmp) / f"{i}.err")] for i, argv in enumerate(commands)]
        server = subprocess.run([sys.executable, "-c", _SERVER], input=json.dumps([jobs, parallel]),
                                capture_output=True, text=True, env=env, timeout=timeout)
        if server.returncode != 0:
            raise RuntimeError(f"the command server failed ({server.returncode}): {server.stderr[-3000:]}")
        codes = json.loads(server.stdout.strip().splitlines()[-1])
        return [subprocess.CompletedProcess(argv, code, Path(out).read_text(), Path(err).read_text())
                for code, (argv, out, err) in zip(codes, jobs)]
