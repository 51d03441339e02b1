"""CPU schedules (placeholder pass: filled in below)."""

from __future__ import annotations


def cpu_schedule_pass():
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="QuantArenaCPUSchedule")
    def _pass(mod, _ctx):
        return mod

    return _pass
