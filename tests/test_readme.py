"""Every Python block in README.md runs as written, so the README stays true.

The blocks run as a user runs them: in a fresh interpreter without TRITON_INTERPRET (which the
test suite sets for itself), so `backend="auto"` picks what a user's machine picks. One
subprocess runs them all, each in its own namespace, and reports every block that failed.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)

RUNNER = textwrap.dedent("""
    import json, sys, traceback
    blocks = json.loads(sys.stdin.read())
    failed = []
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md[python block {i}]", "exec"), {})
        except Exception:
            failed.append((i, traceback.format_exc()))
    for i, tb in failed:
        print(f"--- block {i} failed:\\n{tb}")
    sys.exit(1 if failed else 0)
""")


def test_readme_has_examples():
    assert len(BLOCKS) >= 6


def test_readme_examples_run_as_written():
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(BLOCKS), text=True,
                          capture_output=True, env=env, timeout=600, cwd=README.parent)
    assert done.returncode == 0, done.stdout + done.stderr
