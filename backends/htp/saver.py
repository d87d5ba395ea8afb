"""QNN C API source of a graph, recorded by ``libQnnSaver.so`` (``saver_output.c`` + ``params.bin``).

The saver backend writes into ``./saver_output/`` of the current directory, so it runs in a child
process started in a scratch directory (``python saver.py MODEL OPTIONS_JSON``, importing only
onnxruntime): the caller's working directory and QNN state are left alone. ``saver_output.c`` replays the graph's
construction through the QNN C API (it reads ``params.bin`` from its working directory).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FILES = ("saver_output.c", "params.bin")
_OP = re.compile(r'\{"([^"]*)", "qti\.aisw", "([A-Za-z0-9_]+)"')


class SaverRun:
    """``libQnnSaver`` recording ``model`` in a child process, started now, collected by :meth:`finish`.

    It needs no HTP graph preparation, so it runs beside the context compile (on another core).
    ``provider_options``: the QNN EP options of the real compile (``qnn_saver_path`` is added).
    """

    def __init__(self, model: Path, provider_options: dict[str, str], timeout: float = 3600):
        opts = {**provider_options, "qnn_saver_path": str(Path(provider_options["backend_path"]).parent
                                                          / "libQnnSaver.so")}
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="fbqc_saver_")
        self._proc = subprocess.Popen([sys.executable, __file__, str(Path(model).resolve()), json.dumps(opts)],
                                      cwd=self._tmp.name, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)

    def finish(self, out_dir: Path) -> list[str]:
        """Wait for the child; move ``saver_output.c`` and ``params.bin`` into ``out_dir``."""
        try:
            out, err = self._proc.communicate(timeout=self.timeout)
            src = Path(self._tmp.name) / "saver_output"
            if self._proc.returncode != 0 or not all((src / f).is_file() for f in FILES):
                tail = (err or out).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"libQnnSaver did not write {' + '.join(FILES)}: {tail[0]}")
            for f in FILES:
                shutil.move(str(src / f), Path(out_dir) / f)
            return list(FILES)
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop the child (if still running) and remove its scratch directory."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()
        self._tmp.cleanup()


def qnn_ops(saver_c: Path) -> dict[str, str]:
    """``{QNN node name: QNN op type}`` from a ``saver_output.c`` (e.g. ``FullyConnected``)."""
    text = Path(saver_c).read_text(errors="replace")
    return {name: op for name, op in _OP.findall(text)}


def _main(model: str, options: str) -> None:
    """Child process: one session whose QNN backend calls go through the saver."""
    import onnxruntime as ort
    import onnxruntime_qnn as oq

    ort.register_execution_provider_library("QNNExecutionProvider", oq.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_provider_for_devices(devices, json.loads(options))
    with open(model, "rb") as f:                     # from bytes: graph names do not depend on the path
        ort.InferenceSession(f.read(), so)


if __name__ == "__main__":
    _main(*sys.argv[1:3])
