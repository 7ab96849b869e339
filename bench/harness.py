"""Shared pieces of bench/run and scripts/crash-test (not run on its own).

Usage: import harness (from bench/run and scripts/crash-test).

Why a module: both scripts build crmgate and the load generator, start
daemons on free 127.0.0.1 ports with a config in a temporary directory,
start relay sinks, and read the SQLite log read-only; keeping that in one
place keeps the two scripts about what they measure. Python 3.11, stdlib
only (sqlite3 reads the WAL database while the daemon runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def target_dir() -> Path:
    """The cargo target directory: $CARGO_TARGET_DIR, else ./target."""
    return Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))


def build() -> tuple[Path, Path]:
    """Build crmgate and the load generator; return their paths.

    Release mode, unless CRMGATE_PROFILE=debug (CI reuses the debug build of
    `cargo test` rather than compiling everything once more)."""
    profile = os.environ.get("CRMGATE_PROFILE", "release")
    log(f"building crmgate and examples/loadgen ({profile})…")
    flags = [] if profile == "debug" else ["--release"]
    subprocess.run(
        ["cargo", "build", *flags, "--bin", "crmgate", "--example", "loadgen"],
        cwd=REPO,
        check=True,
    )
    out = target_dir() / ("debug" if profile == "debug" else "release")
    return out / "crmgate", out / "examples" / "loadgen"


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    """Wait until something accepts on 127.0.0.1:port (or fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def postfix_tools() -> tuple[str, str]:
    """Paths of smtp-sink and smtp-source, installing Debian's postfix if needed.

    Only the two test tools are wanted: the postfix service must not run (it
    would take port 25), so it is stopped if the install started it.
    """
    def find(name: str) -> str | None:
        return shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/usr/lib/postfix/sbin/{name}") if os.path.exists(p)),
            None,
        )

    sink, source = find("smtp-sink"), find("smtp-source")
    if sink and source:
        return sink, source
    log("installing postfix for smtp-sink / smtp-source…")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "postfix"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    if subprocess.run(["postfix", "status"], capture_output=True).returncode == 0:
        subprocess.run(["postfix", "stop"], check=False)
    sink, source = find("smtp-sink"), find("smtp-source")
    if not (sink and source):
        raise RuntimeError("smtp-sink / smtp-source not found after installing postfix")
    return sink, source


def start_smtp_sink(sink: str, port: int) -> subprocess.Popen:
    """Postfix's smtp-sink on 127.0.0.1:port (it stores nothing)."""
    cmd = [sink]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root otherwise
    cmd += [f"127.0.0.1:{port}", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc


def write_config(directory: Path, listen_port: int, relay: str) -> Path:
    """A crmgate config for a load run: one agent on every work-notes list,
    caps raised so a load run is not throttled by the anti-ping-pong limits
    (a requester replying 20+ times an hour to one ticket is the load
    itself, not an auto-responder). Durability stays the default (FULL)."""
    state = directory / "state"
    path = directory / "crmgate.toml"
    path.write_text(f"""\
[gateway]
hostname = "bench.test"
state_dir = "{state}"
language = "en"
display_name = "Bench Support"

[smtp]
listen = "127.0.0.1:{listen_port}"
max_sessions = 512

[addresses]
public = "support@localhost"
internal = "support-notes@localhost"

[relay]
url = "{relay}"
retry_initial_seconds = 1
retry_max_seconds = 5

[auto]
max_per_address_per_hour = 1000000
max_per_address_per_day = 1000000
max_resends_per_ticket_hour = 1000000

[[agents]]
name = "Jane Agent"
email = "jane.agent@example.org"
default_notes_list = true
""")
    return path


class Daemon:
    """`crmgate serve` on a config; stderr goes to a log file in its directory."""

    def __init__(self, binary: Path, config: Path, port: int):
        self.binary, self.config, self.port = binary, config, port
        self.proc: subprocess.Popen | None = None
        self.log_path = config.parent / "crmgate.log"

    @property
    def db(self) -> Path:
        return self.config.parent / "state" / "crmgate.db"

    def start(self) -> None:
        logfile = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.binary), "--config", str(self.config), "serve"],
            stdout=logfile, stderr=logfile,
        )
        logfile.close()
        wait_port(self.port, self.proc)
        # The listener is bound before the schema is migrated: wait for it,
        # so the scripts can read the log as soon as `start` returns.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                query(self.db, "SELECT COUNT(*) FROM outbox")
                return
            except sqlite3.Error:
                time.sleep(0.05)
        raise RuntimeError(f"{self.db}: no schema 20 s after the listener was bound")

    def vm(self, key: str) -> int:
        """A /proc/<pid>/status figure in kB (VmHWM: peak RSS, VmRSS: now)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def kill(self) -> None:
        """SIGKILL: the crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), "--config", str(self.config), *args],
                              capture_output=True, text=True)


def query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read the log read-only (WAL: the daemon may be writing)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def queued(db: Path) -> int:
    return query(db, "SELECT COUNT(*) FROM outbox WHERE status = 'queued'")[0][0]


def wait_drained(db: Path, timeout: float) -> float | None:
    """Seconds until no outbox row is queued (None: still queued at timeout)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if queued(db) == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def loadgen(binary: Path, port: int, *args: str, check: bool = True) -> dict:
    """Run `loadgen send` against 127.0.0.1:port; its JSON figures.

    `--retries 3`: crmgate closes a session after 1,000 commands (`421`), as
    a careful MTA does; the message in flight then goes again on a new
    session, as an MTA's would, instead of being counted lost."""
    out = subprocess.run([str(binary), "send", "--server", f"127.0.0.1:{port}", "--retries", "3",
                          *args],
                         capture_output=True, text=True)
    if out.returncode != 0 and check:
        raise RuntimeError(f"loadgen failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_ms(pid: int) -> float:
    """User + system CPU time of a running process so far, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) * 1000.0 / tick


def children_cpu_ms() -> float:
    """User + system CPU time of the children waited for so far, in ms: a
    load generator's, measured around its run."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * 1000.0


def median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    if n == 0:
        return float("nan")
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def machine_state() -> str:
    """One line on the machine: cores, load average, free memory."""
    load = os.getloadavg()
    mem = {l.split(":")[0]: l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()}
    return (f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
            f"MemAvailable {int(mem.get('MemAvailable', 0)) // 1024} MiB")
