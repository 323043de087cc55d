"""The suite: which groups of cases exist, and one run of them from cases to report."""
import importlib
import sys
import time

from . import case as case_module
from . import report

GROUPS = ("attention", "msfn", "blocks", "patch", "models", "streaming", "regions", "panet")


def group_module(group):
    if group not in GROUPS:
        raise ValueError(f"group: expected one of {GROUPS}, got {group!r}")
    return importlib.import_module(f"{__package__}.{group}")


def make_case(group, spec):
    """Rebuild a case from its group and spec (the memory subprocess does this)."""
    return group_module(group).make_case(spec)


SWEEPS = ("quick", "targets", "full")


def cases(groups, sweep, match=None):
    """The cases of ``groups`` in a sweep: "quick" (the default run, minutes), "targets" (just
    the shapes the issues' targets are stated at) or "full" (everything); with ``match``, only
    those whose "name shape" contains it (case-insensitive)."""
    if sweep not in SWEEPS:
        raise ValueError(f"sweep: expected one of {SWEEPS}, got {sweep!r}")
    found = [make_case(group, spec) for group in groups for spec in group_module(group).default_specs(sweep)]
    if match is None:
        return found
    found = [c for c in found if match.lower() in f"{c.name} {c.shape}".lower()]
    if not found:
        raise ValueError(f"case: no case of {list(groups)} in the {sweep} sweep matches {match!r}")
    return found


def run(groups, opts, sweep="quick", results_dir=report.RESULTS_DIR, write=True, stream=sys.stdout, wide=False,
        match=None):
    """Measure every case of ``groups`` (those matching ``match``: see :func:`cases`), print the
    summary (``wide``: the whole table) and the Targets, append the CSV rows and draw the plots,
    then print the groups' own sections (the models' profiles and largest image). Returns the rows."""
    started = time.perf_counter()
    rows = []
    for case in cases(groups, sweep, match):
        case_started = time.perf_counter()
        rows += case_module.measure(case, opts)
        print(f"  {case.group}: {case.name} {case.shape} ({time.perf_counter() - case_started:.0f} s)",
              file=sys.stderr, flush=True)
    case_module.add_speedups(rows)
    env = report.environment(opts.device)
    title = (f"sparse-attn benchmarks · {env['device']} · torch {env['torch']} · triton {env['triton']} · "
             f"commit {env['commit']} · {env['date']}")
    if wide:
        print(report.render_table(rows, title), file=stream)
        print(report.LEGEND, file=stream)
    else:
        print(report.render_summary(rows, title), file=stream)
    targets = [t for group in groups for t in getattr(group_module(group), "targets", lambda rows: [])(rows)]
    if targets:
        print("\nTargets (reports, not assertions)", file=stream)
        for target in targets:
            print("  " + target.line(), file=stream)
    if write:
        device_type = opts.device.split(":")[0]
        for path in report.append_csv(rows, env, results_dir) + report.plot(rows, env, device_type, results_dir):
            print(f"wrote {path}", file=stream)
    # The sections come last: they run more steps (the models' profiles and largest image), and
    # a run that dies in one (killed for memory, say) has still reported and saved its rows.
    for group in groups:
        section = getattr(group_module(group), "section", None)
        if section is not None:
            print(section(rows, opts, sweep), file=stream, flush=True)
    print(f"({time.perf_counter() - started:.0f} s)", file=stream)
    return rows

