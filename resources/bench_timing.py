"""Shared by the L1 benchmarks' reports: each VMM's own timing of how the
guest followed a resize request, from the lines the L1 scripts print.

  BENCH-TIMING vmm run=N phase=P first_ms=F settled_ms=S   (this VMM's last_resize)
  BENCH-EVENT qemu run=N phase=P ts=SECONDS actual=VALUE   (QEMU's QMP events)
"""

import re

_TIMING = re.compile(r"BENCH-TIMING vmm run=(\d+) phase=(\w+) first_ms=([\d.]+) settled_ms=([\d.]+)")
_EVENT = re.compile(r"BENCH-EVENT qemu run=(\d+) phase=(\w+) ts=([\d.]+) actual=(\d+)")


def first_to_settled(log, targets):
    """Seconds from the first change of the value to the change that reached
    the target, by VMM and (run, phase): {"vmm": {(1, "plug"): 0.05}, ...}.
    `targets` maps each phase to the value QEMU's events must reach."""
    out = {"vmm": {}, "qemu": {}}
    events = {}
    for line in open(log, errors="replace"):
        if m := _TIMING.search(line):
            out["vmm"][(int(m[1]), m[2])] = (float(m[4]) - float(m[3])) / 1e3
        elif m := _EVENT.search(line):
            events.setdefault((int(m[1]), m[2]), []).append((float(m[3]), int(m[4])))
    for (run, phase), evs in events.items():
        evs.sort()
        done = [ts for ts, value in evs if value == targets[phase]]
        if done:
            out["qemu"][(run, phase)] = done[0] - evs[0][0]
    return out
