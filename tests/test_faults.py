"""Signal handling: the first SIGTERM/SIGINT asks for a graceful stop; a second one exits at once."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, os.getcwd())
from nanodpo.scale.faults import GracefulStop
stop = GracefulStop()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.1)
print("requested:", stop.requested, flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("still running", flush=True)
"""


def test_first_signal_requests_a_stop_second_exits_at_once():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "requested: SIGTERM" in result.stdout
    assert "still running" not in result.stdout
    assert result.returncode == 130
    assert "exiting now without saving" in result.stderr
