"""py-spy on every Python process of the product during a benchmark phase, and a top-functions summary.

Each process gets `py-spy record --nonblocking --format raw` (collapsed stacks) for the phase; the summary
lists, per process, the functions with the most samples on top of the stack (own time) and anywhere on
it (inclusive time), so the note can say where the CPU goes.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
from product import ProcessTree

SKIP = ("gcs_server", "raylet", "postgres", "valkey", "redis", "ray::IDLE")


def _label(proc: psutil.Process) -> str | None:
    """A short file-safe name for a Python process of the tree, None for those py-spy cannot read."""
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    if not cmdline or any(s in cmdline for s in SKIP):
        return None
    if cmdline.startswith("ray::"):
        name = cmdline.split()[0][len("ray::") :]
    elif "powerbank" in cmdline and " up" in cmdline:
        name = "api"
    elif "python" in cmdline:
        script = next((part for part in proc.cmdline() if part.endswith(".py")), "python")
        name = Path(script).stem
    else:
        return None
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-{proc.pid}")


class Profiler:
    def __init__(self, directory: Path | None, *, duration_s: float = 15.0) -> None:
        self.directory = directory
        self.duration_s = duration_s
        self.py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    @contextlib.contextmanager
    def phase(self, name: str, tree: ProcessTree) -> Iterator[None]:
        if self.directory is None:
            yield
            return
        out = self.directory / name
        out.mkdir(parents=True, exist_ok=True)
        running: list[tuple[str, subprocess.Popen[bytes]]] = []
        for proc in tree.processes():
            label = _label(proc)
            if label is None:
                continue
            command = [
                self.py_spy, "record", "--nonblocking", "--gil", "--rate", "50", "--format", "raw",
                "--duration", str(int(self.duration_s)), "--pid", str(proc.pid),
                "--output", str(out / f"{label}.txt"),
            ]  # fmt: skip
            running.append(
                (label, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            )
        try:
            yield
        finally:
            for _, process in running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(self.duration_s + 10)
                if process.poll() is None:
                    process.terminate()
            self.summarise(out)

    @staticmethod
    def summarise(directory: Path, top: int = 12) -> None:
        lines: list[str] = []
        for path in sorted(directory.glob("*.txt")):
            if path.name == "summary.txt":
                continue
            own: Counter[str] = Counter()
            inclusive: Counter[str] = Counter()
            total = 0
            for line in path.read_text().splitlines():
                stack, _, count_text = line.rpartition(" ")
                if not stack or not count_text.isdigit():
                    continue
                count = int(count_text)
                frames = [f for f in stack.split(";") if f]
                total += count
                if frames:
                    own[_short(frames[-1])] += count
                for frame in set(map(_short, frames)):
                    inclusive[frame] += count
            if total == 0:
                continue
            lines.append(f"== {path.stem}: {total} samples")
            lines.append("   own time:")
            lines += [f"   {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
            lines.append("   inclusive:")
            lines += [f"   {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top * 2)]
        (directory / "summary.txt").write_text("\n".join(lines) + "\n")


def _short(frame: str) -> str:
    """`func (path/to/module.py:123)` → `func (module.py)`."""
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not match:
        return frame
    function, path = match.groups()
    parts = Path(path).parts
    where = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{function} ({where})"
