"""An export killed midway (SIGTERM, Ctrl-C) leaves nothing that loads, and a rerun succeeds."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import export_to
from edgelm.artifact import read_manifest
from edgelm.errors import ArtifactError


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_export_leaves_no_artifact_and_rerun_succeeds(lstm_model, tmp_path, signum):
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "edgelm.cli", "export", str(lstm_model), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background jobs start with SIGINT ignored, and Python keeps
                            # an ignored SIGINT; restore the default so Ctrl-C means KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".art.partial-*")):  # the export has started writing
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ArtifactError):
        read_manifest(out)
    export_to(lstm_model, out)
    assert read_manifest(out, verify=True).validation_passed
