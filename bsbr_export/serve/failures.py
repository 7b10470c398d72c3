"""What the scheduler's loop does when something fails (mixed into ``serve.scheduler.Scheduler``).

- An exception in an engine call (or in sampling its logits) ends the requests of the rows that
  call touched (``_fail_rows``), with a generic error: the exception goes to the server log,
  never to a client (ONNX Runtime's messages hold paths and internals); the other rows carry on.
- Any other exception of a step of the loop (admission, ``metrics.sample``) is logged and the
  loop goes on (``_guarded``); a step that touched rows ends their requests itself.
- Should the loop thread end all the same (an exception that is not an ``Exception``), every
  request it held ends with an error (``_died``), so the server gives their tokens back, and
  ``submit`` refuses new requests (``ShuttingDown``: 503).
"""

from __future__ import annotations

import logging

log = logging.getLogger("bsbr_export.serve")

ENGINE_ERROR = "internal error while generating this completion (the server log has the details)"


class QueueFull(Exception):
    """More waiting requests than ``max_queue``: the caller answers 429."""


class ShuttingDown(Exception):
    """The scheduler no longer accepts requests (it is stopping, or its loop thread ended)."""


class FailureHandling:
    """The scheduler's failure paths (see the module docstring); needs ``_cv``, ``_rows``,
    ``_waiting``, ``_accepting`` and ``_finish`` of ``Scheduler``."""

    @staticmethod
    def _guarded(step, *args) -> None:
        """One step of the loop; what it raises is logged and the loop goes on (the steps end
        the requests a failed engine call touched themselves)."""
        try:
            step(*args)
        except Exception:
            log.exception("scheduler step %s failed", getattr(step, "__name__", step))

    def _died(self) -> None:
        with self._cv:
            self._accepting = False
            for r in [*self._waiting, *(r for r in self._rows if r is not None)]:
                try:
                    self._finish(r, "error", ENGINE_ERROR)
                except BaseException:
                    r.cancelled = True
            self._waiting.clear()

    def _fail_rows(self, reqs) -> None:
        """End ``reqs`` (the rows a failed call touched) with a generic error; the exception being
        handled goes to the log, not to the clients. Their rows are reset as they are freed."""
        log.exception("engine call failed; ending %d request(s) of rows %s", len(reqs), [r.row for r in reqs])
        with self._cv:
            for r in reqs:
                if r.finish_reason is None:
                    self._finish(r, "error", ENGINE_ERROR)
