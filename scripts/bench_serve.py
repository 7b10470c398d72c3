"""Serving benchmark of ``bsbr-export serve`` (tokens/s, TTFT, per-token latency, peak RSS, the
one-at-a-time baseline, a long prompt arriving, memory per sequence); writes docs/serve/.

    python scripts/bench_serve.py            # full run on the bundled model (~15 min on 2 cores)
    python scripts/bench_serve.py --quick --out /tmp/serve-quick

See ``bsbr_export/serve/bench.py`` for what each number means.
"""

from bsbr_export.serve.bench import main

if __name__ == "__main__":
    main()
