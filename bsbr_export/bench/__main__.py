"""``python -m bsbr_export.bench JOB.json RESULT.json``: one child process of a benchmark run."""

import sys

from .child import child_main

if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2])
