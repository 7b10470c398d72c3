"""Serving benchmark of ``bsbr-export serve`` (tokens/s, TTFT, per-token latency, peak RSS, the
one-at-a-time baseline, a long prompt arriving, memory per sequence, the targets); writes docs/serve/.

    python scripts/bench_serve.py            # full run on the bundled model (~15 min on 2 cores)
    python scripts/bench_serve.py --quick --out /tmp/serve-quick

See ``bsbr_export/bench/serving.py`` for what each number means (the report: ``serving_report.py``).
"""

from bsbr_export.bench.serving import main

if __name__ == "__main__":
    main()
