"""The README's first command as a newcomer meets it: a fresh clone, a fresh virtual environment.

    python benchmarks/newcomer.py                    # the pip cache as this machine has it
    python benchmarks/newcomer.py --no-pip-cache     # every package downloaded from the index
    python benchmarks/newcomer.py --repo . --branch main --out benchmarks/results/newcomer.json

Clones the branch into a temporary folder, runs `bash scripts/main.sh` there (which creates
`.venv` and installs the project, prepares the data, trains, serves and starts the demo), then
once more in the same clone with the install and the prepared data cached (`install_cached`),
and records for each:

- `seconds_to_healthz`, `seconds_to_demo`: from the command's start to a 200 from the API's
  `/healthz`, and from the demo's page;
- `lines_before_banner` (and how many of them look like Ray's internals), the lines themselves
  with the second each was printed;
- `curl_ok`: every `curl` line of the banner, and of the README's API section, run as printed
  (the README's with `API` set to the job's address) answers JSON without an error `detail`;
- the machine: CPU model and flags that matter here (AVX2, AVX-512, AVX-512 BF16, AMX), cores,
  memory.

Then it sends Ctrl-C (SIGINT to the job's process group) and waits for the job to end. Only
loopback addresses are contacted. Results go to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from machine_info import machine  # sibling script
from models.files import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BANNER_RULE = "=" * 72
RAY_INTERNALS = re.compile(
    r"TrainingReport\(|Checkpoint successfully created|TrainController|\(pid=|"
    r"RayTrainWorker|ServeController|ProxyActor|ServeReplica|INFO worker\.py|"
    r"ray\.train|ray\.serve|StorageContext|raylet|gcs_server"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Output:
    """The job's merged stdout/stderr, line by line with the second each arrived."""

    def __init__(self, proc: subprocess.Popen, t0: float, echo: bool):
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(proc, t0, echo), daemon=True)
        self._thread.start()

    def _read(self, proc, t0, echo):
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self.lines.append((time.perf_counter() - t0, line))
            if echo:
                print(f"  | {line}", flush=True)

    def timed(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)

    def text(self) -> list[str]:
        return [line for _, line in self.timed()]

    def banner_end(self) -> int | None:
        """Index of the banner's closing rule, once it has been printed."""
        text = self.text()
        rules = [i for i, line in enumerate(text) if line == BANNER_RULE]
        return rules[1] if len(rules) >= 2 else None


def wait_200(url: str, proc: subprocess.Popen, t0: float, timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return None


def strip_comment(line: str, quote: str | None = None) -> tuple[str, str | None]:
    """A shell line without its trailing `# comment` -> (line, the quote still open at its end)."""
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), None
    return line, quote


def shell_commands(lines: list[str]) -> list[str]:
    """Shell lines -> whole commands: backslash continuations and multi-line quotes joined, comments left out."""
    commands, current, quote = [], "", None
    for raw in lines:
        line, quote = strip_comment(raw, quote)
        current = f"{current}\n{line}" if current else line
        if quote:
            continue
        if current.rstrip().endswith("\\"):
            continue
        if current.strip():
            commands.append(current)
        current = ""
    return commands


def is_assignment(command: str) -> bool:
    """`export NAME=...` or `NAME=...`: a line that sets what the following curl lines use."""
    words = command.split(maxsplit=1)
    first = words[1] if words and words[0] == "export" and len(words) > 1 else command
    name = first.split("=", 1)[0]
    return "=" in first and name.isidentifier() and not command.startswith("curl ")


def banner_commands(text: list[str], start: int, end: int) -> list[str]:
    block = [line.strip() for line in text[start:end]]
    return [c for c in shell_commands(block) if c.startswith("curl ") or is_assignment(c)]


def readme_commands(readme: Path) -> list[str]:
    """The `curl` commands of the README's API section (its first bash block) and the variables
    they use, as written."""
    text = readme.read_text()
    section = text[text.index("## The API") :]
    block = section[section.index("```bash") + len("```bash") :]
    block = block[: block.index("```")]
    return [c for c in shell_commands(block.strip().splitlines()) if c.lstrip().startswith("curl ") or is_assignment(c)]


def run_curls(commands: list[str], env: dict, cwd: Path, source: str) -> list[dict]:
    """Each curl line run as a user pastes it: after the lines before it that set variables."""
    prelude, out = [], []
    for c in commands:
        if is_assignment(c):
            prelude.append(c)
        else:
            out.append({"from": source, **run_curl(c, env, cwd, prelude)})
    return out


def run_curl(command: str, env: dict, cwd: Path, prelude: list[str] = ()) -> dict:
    """Run one printed `curl` line with bash; ok when it answers JSON with no error `detail`."""
    script = "\n".join([*prelude, command])
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)
    ok, why = False, ""
    try:
        body = json.loads(r.stdout)
        ok = r.returncode == 0 and not (isinstance(body, dict) and "detail" in body)
        why = "" if ok else str(body)[:300]
    except json.JSONDecodeError:
        why = (r.stdout or r.stderr)[:300] or f"exit {r.returncode}"
    return {"command": command, "ok": ok, **({"error": why} if why else {})}


def stop(proc: subprocess.Popen, timeout_s: float = 120) -> float | None:
    """Ctrl-C to the job's process group -> seconds it took to end (None: killed)."""
    if proc.poll() is not None:
        return 0.0
    t0 = time.perf_counter()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout_s)
        return time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def run_once(clone: Path, env: dict, extra_args: str, timeout_s: float, echo: bool) -> dict:
    """The first command once in `clone`, until its banner; its curl lines; Ctrl-C -> the figures."""
    api_port, demo_port = free_port(), free_port()
    command = f"bash scripts/main.sh --port {api_port} --demo-port {demo_port} {extra_args}".strip()
    print(f"==> {command}  (in {clone})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out = Output(proc, t0, echo=echo)
    api, demo = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{demo_port}"
    record: dict = {"command": command}
    try:
        record["seconds_to_healthz"] = wait_200(f"{api}/healthz", proc, t0, timeout_s)
        no_demo = "--no-demo" in extra_args
        record["seconds_to_demo"] = None if no_demo else wait_200(f"{demo}/", proc, t0, 300)
        deadline = time.monotonic() + 60
        while out.banner_end() is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        text, end = out.text(), out.banner_end()
        start = text.index(BANNER_RULE) if end is not None else None
        record["lines_before_banner"] = start
        before = text[:start] if start is not None else text
        record["ray_internal_lines_before_banner"] = sum(bool(RAY_INTERNALS.search(line)) for line in before)
        record["output_before_banner"] = [[round(t, 1), line] for t, line in out.timed()[: len(before)]]
        curls = []
        if end is not None:
            curls += run_curls(banner_commands(text, start, end), env, clone, "banner")
        # The README's block sets API itself; here it points at this run's port.
        readme = [c for c in readme_commands(clone / "README.md") if not c.startswith("API=")]
        curls += run_curls(readme, {**env, "API": api}, clone, "README")
        record["curls"] = curls
        record["curl_ok"] = bool(curls) and all(c["ok"] for c in curls)
    finally:
        record["seconds_to_stop_after_ctrl_c"] = stop(proc)
        record["exit_status"] = proc.returncode
    return record


HEADLINE = (
    "seconds_to_healthz",
    "seconds_to_demo",
    "lines_before_banner",
    "ray_internal_lines_before_banner",
    "curl_ok",
    "exit_status",
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(ROOT), help="repository to clone (default: this one)")
    p.add_argument("--branch", default="main")
    p.add_argument("--no-pip-cache", action="store_true", help="download every package (PIP_NO_CACHE_DIR=1)")
    p.add_argument("--args", default="", help="extra arguments of the first command, e.g. '--no-demo'")
    p.add_argument(
        "--fresh-only",
        action="store_true",
        help="skip the second run in the same clone (install and prepared data cached)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the API")
    p.add_argument("--keep", action="store_true", help="keep the clone")
    p.add_argument("--quiet", action="store_true", help="do not echo the job's output")
    p.add_argument("--out", type=Path, default=RESULTS / "newcomer.json")
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="newcomer-"))
    clone = work / "dynamic-interest"
    subprocess.run(["git", "clone", "--quiet", "--branch", a.branch, a.repo, str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "RAY_ADDRESS", "PYTHONPATH"))}
    env["PATH"] = os.pathsep.join(x for x in env.get("PATH", "").split(os.pathsep) if ".venv" not in x)
    if a.no_pip_cache:
        env["PIP_NO_CACHE_DIR"] = "1"
    record: dict = {"commit": commit, "pip_cache": not a.no_pip_cache, "machine": machine(libraries=False)}
    try:
        fresh = run_once(clone, env, a.args, a.timeout, echo=not a.quiet)  # fresh clone, fresh .venv
        record.update({k: fresh[k] for k in HEADLINE if k in fresh}, fresh=fresh)
        if not a.fresh_only:
            record["install_cached"] = run_once(clone, env, a.args, a.timeout, echo=not a.quiet)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, record, indent=2)
    runs = {"fresh": record.get("fresh", {}), "install_cached": record.get("install_cached", {})}
    print(json.dumps({name: {k: r.get(k) for k in HEADLINE} for name, r in runs.items() if r}, indent=2))
    failed = False
    for name, r in runs.items():
        for c in r.get("curls", []):
            if not c["ok"]:
                failed = True
                print(f"FAILED ({name}, {c['from']}): {c['command']}\n  -> {c.get('error')}", file=sys.stderr)
    ok = all(r.get("seconds_to_healthz") and r.get("curl_ok") for r in runs.values() if r)
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
