"""The one-shot commands on embedded defaults: make sure there is a CA, issue an example
SVID with it and inspect the result, all through the `meshca` command line (`make run`
serves instead: examples/serve_defaults.py).

An existing CA is always kept: restarting never changes the trust bundle.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DATA_DIR = Path(".meshca")
EXAMPLE_DIR = DATA_DIR / "example"


def meshca(*args: str) -> None:
    """Run one meshca command, echoing it; stop with its exit code if it fails."""
    command = ["meshca", "--data-dir", str(DATA_DIR), *args]
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run([sys.executable, "-m", *command], check=False)
    if result.returncode != 0:
        sys.exit(result.returncode)
    print(flush=True)


def main() -> None:
    if (DATA_DIR / "ca" / "ca-cert.pem").exists():
        print(f"A CA already exists in {DATA_DIR / 'ca'}: keeping it.\n", flush=True)
    else:
        meshca("init")
    meshca(
        "issue", "--namespace", "default", "--service-account", "example", "--out", str(EXAMPLE_DIR)
    )
    meshca("inspect", str(EXAMPLE_DIR / "cert.pem"))
    meshca("bundle", "--out", str(EXAMPLE_DIR / "bundle.json"), "--format", "jwks")
    print(
        f"Done: the example SVID is in {EXAMPLE_DIR}/ (cert.pem, key.pem, bundle.pem, bundle.json)."
    )


if __name__ == "__main__":
    main()
