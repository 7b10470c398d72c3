"""State memory of a server: the budget beside the rows' buffers, and what one request holds."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError


def default_bank_memory() -> int:
    """The state memory a server takes beside its rows' buffers when none is given: half the
    memory available now (after the weights are mapped), at least 256 MiB."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = 8 * 2**30
    return max(256 * 2**20, avail // 2)


def _check_budget(state_memory, fixed: int, max_batch: int) -> None:
    if isinstance(state_memory, bool) or not isinstance(state_memory, int) or state_memory <= fixed:
        raise InputError(f"state memory must be more than the {fixed / 2**20:.1f} MiB that {max_batch} rows' "
                         f"buffers take; got {state_memory!r} bytes (lower --max-batch or raise --state-memory)")


def check_state_memory(export_dir, max_batch: int, state_memory: int | None) -> None:
    """Refuse, before anything loads, a state memory that cannot hold ``max_batch`` rows' buffers."""
    if state_memory is None:
        return
    from ..runtime.engine import _Spec, read_metadata, row_bytes

    spec = _Spec(read_metadata(Path(export_dir) / "extend.onnx")["config"])
    _check_budget(state_memory, max_batch * row_bytes(spec, 0, 1), max_batch)


def held_tokens(r) -> int:
    """Tokens a request's row holds at its longest: its prompt and every generated token but
    the last, which ends the request without being fed (max_tokens 0, a scored prompt: the prompt)."""
    return len(r.ids) + max(r.max_tokens - 1, 0)
