"""Every network wait ends within its deadline with one line naming what was waited for; bad addresses and job flags
are refused before any work, with exit status 2.

The servers are local and started here, on ports the system picks: a "silent" one that accepts connections and
never answers, a web server, and one that answers any request "HTTP/1.1 400" at once. Calls that used to wait
forever run in a daemon thread with a generous deadline, so that a regression fails the test instead of hanging it.
"""

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from configs import tiny
from urisc_jax import config_checks, multihost, volume_predict, volumes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A hang check's limit: far above the deadlines asked for (1.5 - 3 s), far below the minutes the waits used to take.
HANG_LIMIT_S = 60


@contextlib.contextmanager
def _silent_server():
  """A 127.0.0.1 server that accepts every connection and never sends a byte: (port, accepted connections)."""
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(64)
  accepted = []

  def accept():
    while True:
      try:
        accepted.append(server.accept()[0])
      except OSError:  # closed at the end of the test
        return

  threading.Thread(target=accept, daemon=True).start()
  try:
    yield server.getsockname()[1], accepted
  finally:
    server.close()
    for connection in accepted:
      connection.close()


@contextlib.contextmanager
def _http_400_server():
  """A 127.0.0.1 server that answers whatever it receives with an HTTP 400 and closes: its port."""
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(64)

  def serve():
    while True:
      try:
        connection = server.accept()[0]
      except OSError:
        return
      with connection:
        with contextlib.suppress(OSError):
          connection.settimeout(5)
          connection.recv(65536)
          connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\nConnection: close\r\n\r\n"
                             b"Bad Request")

  threading.Thread(target=serve, daemon=True).start()
  try:
    yield server.getsockname()[1]
  finally:
    server.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    del args


@contextlib.contextmanager
def _web_server():
  """Python's own web server on 127.0.0.1 (what `python -m http.server` runs): its port."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    yield server.server_address[1]
  finally:
    server.shutdown()
    server.server_close()


def _within(seconds: float, fn):
  """(the exception fn raised or None, elapsed seconds); fails the test if fn has not returned after `seconds`."""
  outcome = {}

  def call():
    try:
      fn()
      outcome["error"] = None
    except BaseException as e:  # pylint: disable=broad-except
      outcome["error"] = e

  start = time.monotonic()
  thread = threading.Thread(target=call, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"still waiting after {seconds} s"
  return outcome["error"], time.monotonic() - start


@pytest.fixture
def open_timeout():
  """Sets volumes' open deadline to 1.5 s for one test."""
  previous = volumes.OPEN_TIMEOUT_S
  volumes.set_open_timeout(1.5)
  yield 1.5
  volumes.set_open_timeout(previous)


def test_a_volume_on_a_silent_http_server_fails_within_the_deadline_naming_the_url(open_timeout):
  with _silent_server() as (port, accepted):
    spec = json.dumps({"driver": "zarr", "kvstore": f"http://127.0.0.1:{port}/em.zarr"})
    error, seconds = _within(HANG_LIMIT_S, lambda: volumes.open_input(spec))
    assert accepted  # the open did reach the server, and waited on it
  assert isinstance(error, volumes.VolumeError), error
  assert f"http://127.0.0.1:{port}/em.zarr" in str(error)
  assert "1.5 s" in str(error) and "config.predict.volume.open_timeout_s" in str(error)
  assert seconds < 20


def test_a_gs_volume_without_a_network_fails_within_the_deadline_naming_the_url(open_timeout, monkeypatch,
                                                                                 tmp_path):
  """Google Cloud Storage and its credential lookup (the GCE metadata server) both pointed at a silent local server,
  as a machine without a network leaves them: nothing here leaves 127.0.0.1."""
  with _silent_server() as (port, accepted):
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GCE_METADATA_ROOT", f"127.0.0.1:{port}")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no gcloud credentials file
    spec = json.dumps({"driver": "zarr", "kvstore": "gs://urisc-jax-test-bucket/em.zarr"})
    error, seconds = _within(HANG_LIMIT_S, lambda: volumes.open_input(spec))
    assert accepted
  assert isinstance(error, volumes.VolumeError), error
  assert "gs://urisc-jax-test-bucket/em.zarr" in str(error) and "1.5 s" in str(error)
  assert seconds < 20


def _open_dask_client(address: str, timeout_s: float = 1.5) -> None:
  with volume_predict.dask_client(address, timeout_s=timeout_s):
    pass


def test_a_dask_address_that_accepts_and_never_answers_fails_within_the_deadline():
  with _silent_server() as (port, accepted):
    address = f"tcp://127.0.0.1:{port}"
    error, seconds = _within(HANG_LIMIT_S, lambda: _open_dask_client(address))
    assert accepted
  assert isinstance(error, volumes.VolumeError), error
  assert f"config.predict.dask.address={address!r}" in str(error) and "1.5 s" in str(error)
  assert seconds < 20


@pytest.mark.parametrize("server", [_http_400_server, _web_server])
def test_a_web_server_at_the_dask_address_is_named_not_a_memory_error(server):
  with server() as port:
    address = f"tcp://127.0.0.1:{port}"
    error, seconds = _within(HANG_LIMIT_S, lambda: _open_dask_client(address))
  assert isinstance(error, volumes.VolumeError), repr(error)
  assert f"config.predict.dask.address={address!r}" in str(error)
  assert "allocate" not in str(error) and "EiB" not in str(error)
  assert seconds < 20


def test_a_dask_address_where_nothing_listens_fails_within_the_deadline():
  with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  address = f"tcp://127.0.0.1:{port}"
  error, seconds = _within(HANG_LIMIT_S, lambda: _open_dask_client(address))
  assert isinstance(error, volumes.VolumeError) and address in str(error), repr(error)
  assert seconds < 20


@pytest.mark.parametrize("address", ["localhost", "http://10.0.0.5:8786", "tcp://10.0.0.5:99999",
                                     "tcp://10.0.0.5:port", "tcp://", "10.0.0.5:8786/path"])
def test_a_malformed_or_unknown_scheme_dask_address_is_refused_by_the_config_check(address):
  config = tiny.get_config()
  config.predict.dask.address = address
  with pytest.raises(config_checks.ConfigError) as raised:
    config_checks.validate(config, "predict")
  message = str(raised.value)
  assert f"config.predict.dask.address={address!r}" in message and "tcp://HOST:PORT" in message
  error, _ = _within(HANG_LIMIT_S, lambda: _open_dask_client(address))  # the library refuses it too, unconnected
  assert isinstance(error, volumes.VolumeError) and "tcp://HOST:PORT" in str(error), repr(error)


@pytest.mark.parametrize("address", ["", "tcp://10.0.0.5:8786", "10.0.0.5:8786", "tls://[::1]:8786",
                                     "inproc://10.0.0.5/1234/1", "ucx://node1:13337"])
def test_well_formed_dask_addresses_pass_the_config_check(address):
  config = tiny.get_config()
  config.predict.dask.address = address
  config_checks.validate(config, "predict")


@pytest.mark.parametrize("key,value", [("predict.volume.open_timeout_s", 0.0), ("predict.volume.open_timeout_s", -1.0),
                                       ("predict.dask.timeout_s", 0.0), ("predict.dask.timeout_s", float("inf"))])
def test_network_deadlines_must_be_positive_seconds(key, value):
  config = tiny.get_config()
  section, name = key.rsplit(".", 1)
  config_checks._get(config, section)[name] = value  # pylint: disable=protected-access
  with pytest.raises(config_checks.ConfigError, match=f"config.{key}="):
    config_checks.validate(config, "predict")


@pytest.mark.parametrize("flags,fragment", [
    ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, "--coordinator_address='localhost'"),
    ({"coordinator_address": "http://10.0.0.1:1234", "num_processes": 2, "process_id": 1}, "no scheme"),
    ({"coordinator_address": "10.0.0.1:0", "num_processes": 2, "process_id": 1}, "a port in 1..65535"),
    ({"num_processes": 2}, "--coordinator_address=HOST:PORT, --num_processes=N and --process_id=I"),
])
def test_multi_process_flag_errors_name_the_flag_and_the_form(flags, fragment):
  with pytest.raises(ValueError) as raised:
    multihost.distributed_options(**flags, environ={})
  assert fragment in str(raised.value)


def _main(workdir, *flags) -> subprocess.Popen:
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]
  return subprocess.Popen(command, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _communicate(process: subprocess.Popen) -> tuple[str, str]:
  """(stdout, stderr) of a finished run; a run still going after the hang limit is killed and fails the test."""
  try:
    return process.communicate(timeout=HANG_LIMIT_S * 3)
  except subprocess.TimeoutExpired:
    process.kill()
    process.communicate()
    pytest.fail(f"{process.args} still running after {HANG_LIMIT_S * 3} s")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_the_command_line_refuses_bad_job_flags_with_one_line_and_status_2(tmp_path):
  """Bad multi-process flags and a flag that cannot be parsed: status 2, one line naming the flag, no usage text."""
  cases = {
      "address": (["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"],
                  "--coordinator_address='localhost'"),
      "incomplete": (["--num_processes=2"], "--process_id=I"),
      "unparsable": (["--num_processes=two"], "--num_processes=two"),
      "dask": (["--mode=predict", "--config.predict.dask.address=http://127.0.0.1:8786"],
               "config.predict.dask.address='http://127.0.0.1:8786'"),
  }
  started = {name: _main(tmp_path / name, *flags) for name, (flags, _) in cases.items()}
  for name, process in started.items():
    out, err = _communicate(process)
    assert process.returncode == 2, (name, err[-3000:])
    assert cases[name][1] in err, (name, err[-3000:])
    assert "Traceback" not in err and "USAGE" not in err and "flags:" not in err, (name, err[-3000:])
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, (name, err[-3000:])
    assert not (tmp_path / name).exists()  # refused before any work


def test_one_process_of_a_two_process_job_started_alone_exits_2_within_its_deadline(tmp_path):
  """Process 1 without a process 0, and process 0 without a process 1: each gives up after its 3 s with one line
  naming the coordinator and itself (JAX's own deadline aborts in C++ with a stack trace, status 134)."""
  started = {}
  for process_id in (0, 1):
    port = _free_port()
    started[process_id] = (port, time.monotonic(), _main(
        tmp_path / str(process_id), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
        f"--process_id={process_id}", "--initialization_timeout_s=3"))
  errors = {}
  for process_id, (port, start, process) in started.items():
    errors[process_id] = _, err = _communicate(process)
    seconds = time.monotonic() - start
    assert process.returncode == multihost.JOIN_FAILED_EXIT_CODE == 2, err[-3000:]
    assert f"process {process_id} of 2 waited 3 s" in err and f"--coordinator_address=127.0.0.1:{port}" in err
    assert "Check failure" not in err and "Traceback" not in err, err[-3000:]
    assert seconds < HANG_LIMIT_S * 2  # the 3 s deadline plus starting Python and JAX, on a busy machine
  assert "nothing listens there" in errors[1][1]  # process 1 says why: process 0 never started
  assert "process 1 did not join" in errors[0][1]


def test_a_volume_on_a_silent_server_exits_2_from_the_command_line(tmp_path):
  with _silent_server() as (port, _):
    spec = json.dumps({"driver": "zarr", "kvstore": f"http://127.0.0.1:{port}/em.zarr"})
    (tmp_path / "run").mkdir()  # an existing run's folder: --mode=predict refuses a --workdir that does not exist
    process = _main(tmp_path / "run", "--mode=predict", f"--config.predict.input={spec}",
                    f"--config.predict.output={tmp_path / 'out.zarr'}", "--config.predict.volume.open_timeout_s=2")
    _, err = _communicate(process)
  assert process.returncode == 2, err[-3000:]
  assert f"http://127.0.0.1:{port}/em.zarr" in err and "within 2 s" in err and "Traceback" not in err
  assert not (tmp_path / "out.zarr").exists()
