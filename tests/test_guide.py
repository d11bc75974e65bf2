"""The guide builds as a site and its commands run as written.

1. `mkdocs build --strict` builds the site of mkdocs.yml: a link or an anchor that does not
   resolve, or a page of docs/ left out of the navigation, fails it (what CI runs).
2. Every ```bash block of the docs/guide pages runs, page after page in the order of the site's
   navigation, in one fresh working directory (later pages use the runs earlier ones made), with
   the venv's bin first on PATH. Each block is one `bash -euo pipefail` script: every command in
   it must succeed, within the block's timeout. ```text blocks are shown, not run (commands for
   GPUs and several machines). $PORT is a free port, for the page that starts a server, and
   OMP_NUM_THREADS=1 keeps each command to one core (on a shared machine, two threads per
   process waiting on each other made a 30-step run 3-7x slower; docs/guide/faq.md).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent       # the venv's bin: python, monotile, mkdocs
BLOCK_TIMEOUT = 240                     # seconds for one block; all take ~130 s of CPU
EXAMPLES = {"text.md", "vision.md", "speech.md", "series.md", "explain.md", "adapting.md",
            "serving.md"}               # the worked examples: each runs something


def nav_pages(nav) -> list[str]:
    """The pages of mkdocs.yml's nav, in reading order."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in nav_pages(v)]
    return [p for item in nav for p in nav_pages(item)]


def guide_pages() -> list[Path]:
    import yaml
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    return [ROOT / "docs" / p for p in nav_pages(config["nav"]) if p.startswith("guide/")]


def bash_blocks(page: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    mkdocs = BIN / "mkdocs"
    assert mkdocs.exists(), "mkdocs is in the test extras: .venv/bin/pip install -e '.[test]'"
    done = subprocess.run([str(mkdocs), "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "guide" / "faq" / "index.html").exists()


def test_every_guide_page_is_in_the_nav_and_every_example_runs_something():
    pages = guide_pages()
    assert {p.name for p in pages} == {p.name for p in (ROOT / "docs" / "guide").glob("*.md")}
    assert {p.name for p in pages if bash_blocks(p)} >= EXAMPLES


def run_block(script: str, cwd: Path, env: dict, log: Path) -> tuple[int | None, float]:
    """Run one block as a bash script in its own process group; the group is ended after, so
    a server the block started in the background cannot outlive it. (exit status or None on
    timeout, seconds)."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return rc, time.monotonic() - start


def test_every_command_of_the_guide_runs_as_written(tmp_path):
    assert (BIN / "monotile").exists(), f"no monotile beside {sys.executable}"
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PORT=str(free_port()), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    timings = []
    for page in guide_pages():
        for i, script in enumerate(bash_blocks(page), 1):
            log = tmp_path / f"{page.stem}-{i}.log"
            rc, seconds = run_block(script, work, env, log)
            timings.append(f"{page.name} block {i}: {seconds:.1f} s")
            if rc != 0:
                why = "timed out" if rc is None else f"exit status {rc}"
                pytest.fail(f"docs/guide/{page.name}, bash block {i} ({why}):\n{script}\n"
                            f"--- output (last 3000 characters) ---\n"
                            f"{log.read_text(errors='replace')[-3000:]}")
    print("\n".join(timings))
