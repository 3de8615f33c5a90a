"""Fail early, with one clear message, when Java is missing or older than Spark 4.0 needs."""
import re
import shutil
import subprocess
import sys

REQUIRED = 17


def main() -> int:
    java = shutil.which("java")
    if java is None:
        print(f"ebbtide: Java {REQUIRED}+ is required by Spark 4.0 but `java` is not on PATH "
              f"(Debian: apt-get install openjdk-{REQUIRED}-jre-headless).", file=sys.stderr)
        return 1
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    major = int(match.group(1)) if match else 0
    if major == 1 and match and match.group(2):  # "1.8" style
        major = int(match.group(2))
    if major < REQUIRED:
        print(f"ebbtide: Spark 4.0 needs Java {REQUIRED}+, found: {out.splitlines()[0] if out else 'unknown'}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
