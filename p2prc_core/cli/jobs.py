"""One command on a peer, files in and results out: ``p2prc exec``, and ``p2prc jobs`` (ls,
show, logs, get, rm) for what it ran."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from p2prc_core.cli.base import (
    CliContext,
    ListingGroup,
    duration_option,
    gpu_option,
    json_option,
    main,
    pass_node,
    size_option,
)
from p2prc_core.exec_job import ExecSpec, Executor, worst
from p2prc_core.jobs import Job, JobStore
from p2prc_core.text import clean, format_when, human_duration


def executor(node: CliContext) -> Executor:
    """The node's job runner; its lines for people go to stderr."""
    return Executor(node.services.on_peers, JobStore(node.home),
                    lambda line: click.echo(line, err=True))


def parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    """``-e K=V`` pairs (the names are checked with the rest, before anything starts)."""
    found = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r}: expected NAME=VALUE", param_hint="-e")
        found[name] = value
    return found


@main.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("--on", "on", metavar="PEER|GROUP",
              help="A peer (a fresh container there), or a container or group of yours (the "
                   "command runs on each at once) [default: the best peer that fits].")
@click.option("--spread", type=click.IntRange(1, 64), metavar="N",
              help="Run on the N best peers at once (P2PRC_INDEX and P2PRC_COUNT tell each "
                   "its part).")
@click.option("--gpu", is_flag=False, flag_value="all", default=None, metavar="[N|I,J]",
              callback=gpu_option, help="NVIDIA GPUs: every free one, a count, or indexes.")
@click.option("--cpus", type=float, help="CPUs [default: the host's default].")
@click.option("--memory", callback=size_option, metavar="SIZE", help="Memory, e.g. 4G.")
@click.option("--image", help="An image the host offers [default: its first].")
@click.option("-i", "--input", "inputs", multiple=True, metavar="LOCAL[:REMOTE]",
              help="A file or folder to send [default REMOTE: under -w].")
@click.option("-o", "--output", "outputs", multiple=True, metavar="REMOTE[:LOCAL]",
              help="A file or folder to bring back when it ends [default LOCAL: "
                   "./p2prc-out/JOB/].")
@click.option("-e", "--env", "env", multiple=True, metavar="NAME=VALUE",
              help="An environment variable for the command.")
@click.option("-w", "--workdir", default="/job", show_default=True,
              help="Where the command runs, in the container.")
@click.option("--timeout", callback=duration_option, default="2h", show_default=True,
              metavar="DURATION", help="The command is interrupted after this long.")
@click.option("--keep", is_flag=True, help="Keep the container when the job ends.")
@click.option("--detach", is_flag=True,
              help="Start it, print the job id and return ('p2prc jobs logs/get JOB').")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_node
def exec_command(node: CliContext, on: str | None, spread: int | None,
                 gpu: bool | int | list[int] | None, cpus: float | None, memory: int | None,
                 image: str | None, inputs: tuple[str, ...], outputs: tuple[str, ...],
                 env: tuple[str, ...], workdir: str, timeout: int, keep: bool, detach: bool,
                 command: tuple[str, ...]) -> None:
    """Run COMMAND on the best peer that fits (or --on one): a fresh container, the -i
    inputs sent, output live, the -o outputs back, the container removed. Exits with
    COMMAND's exit code. Put COMMAND after '--': p2prc exec -i x.py -- python3 x.py"""
    if on and spread:
        raise click.UsageError("--on and --spread do not go together")
    spec = ExecSpec(command=list(command), inputs=inputs, outputs=outputs,
                    env=parse_env(env), workdir=workdir, timeout=timeout, gpu=gpu, cpus=cpus,
                    memory=memory, image=image, on=on, spread=spread or 0, keep=keep,
                    detach=detach, out_root=Path("p2prc-out"))
    if inputs or outputs:  # files to copy: this process's own memory setting (not a library's)
        from p2prc_core.stream_shell import keep_freed_memory

        keep_freed_memory()
    runs = executor(node).execute(spec)
    if detach:
        for run in runs:
            click.echo(run.job.id)
        first = runs[0].job.id
        click.echo(f"detached: 'p2prc jobs logs -f {first}' follows it, 'p2prc jobs get "
                   f"{first}' brings its outputs back", err=True)
        sys.exit(worst([0 if r.job.state == "detached" else 1 for r in runs]))
    for run in runs:
        if run.written:
            click.echo(f"outputs of {run.job.id} in "
                       + ", ".join(sorted({str(o.local) for o in run.outputs})), err=True)
    sys.exit(worst([run.exit_code for run in runs]))


@main.group("jobs", cls=ListingGroup)
def jobs_group() -> None:
    """Jobs that 'p2prc exec' ran: ls, show, logs, get, rm."""


@jobs_group.command("ls")
@json_option
@pass_node
def jobs_ls(node: CliContext, as_json: bool = False) -> None:
    """List jobs, oldest first."""
    store = JobStore(node.home)
    jobs = store.all()
    if store.damaged:  # said once, on stderr: the listing itself stays whole
        click.echo(f"skipped {len(store.damaged)} damaged job record"
                   f"{'s' if len(store.damaged) > 1 else ''} in {store.root}: "
                   + ", ".join(clean(name, 64) for name in store.damaged[:5])
                   + (" ..." if len(store.damaged) > 5 else "")
                   + " (move them aside, or 'rm -r' them)", err=True)
    from p2prc_core.output import print_json, print_table  # rich: not for exec's start

    if as_json:
        print_json([j.as_dict() for j in jobs])
        return
    if not jobs:
        click.echo("No jobs yet: 'p2prc exec -- COMMAND'.")
        return
    print_table(("id", "peer", "command", "state", "exit", "duration"),
                [(j.id, j.peer_name, _short(j.command_text), j.state,
                  "-" if j.exit_code is None else j.exit_code, human_duration(j.duration))
                 for j in jobs])


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


@jobs_group.command("show")
@click.argument("job_id", metavar="JOB|last")
@json_option
@pass_node
def jobs_show(node: CliContext, job_id: str, as_json: bool = False) -> None:
    """Show one job: where it ran, its state and exit code, and where its outputs went."""
    from p2prc_core.output import print_json

    job = JobStore(node.home).get(job_id)
    if as_json:
        print_json(job.as_dict())
        return
    _print_job(job)


def _print_job(job: Job) -> None:
    rows = [("job", job.id), ("peer", job.peer_name), ("container", job.container_id[:12]),
            ("command", job.command_text), ("workdir", job.workdir), ("state", job.state),
            ("exit", "-" if job.exit_code is None else str(job.exit_code)),
            ("started", format_when(job.started)), ("duration", human_duration(job.duration))]
    rows += [("output", f"{o['remote']} -> {o['local']}") for o in job.outputs]
    if job.message:
        rows.append(("note", job.message))
    from p2prc_core.output import print_table

    print_table(("", ""), rows)


@jobs_group.command("logs")
@click.argument("job_id", metavar="JOB|last")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@pass_node
def jobs_logs(node: CliContext, job_id: str, follow: bool) -> None:
    """Print a detached job's output (its stderr to stderr), read from its container."""
    job = JobStore(node.home).get(job_id)
    if job.state != "detached":
        raise click.ClickException(f"job {job.id} is {job.state}: only a detached job's "
                                   f"output is kept in its container")
    sys.exit(executor(node).logs(job, follow))


@jobs_group.command("get")
@click.argument("job_id", metavar="JOB|last")
@click.option("--keep", is_flag=True, help="Keep the container after.")
@pass_node
def jobs_get(node: CliContext, job_id: str, keep: bool) -> None:
    """Bring a detached (or lost) job's outputs back, with its exit code, then remove its
    container."""
    from p2prc_core.stream_shell import keep_freed_memory

    keep_freed_memory()
    run = executor(node).get(JobStore(node.home).get(job_id), keep)
    job = run.job
    click.echo(f"job {job.id} exited {job.exit_code if job.exit_code is not None else '?'}; "
               f"outputs in " + (", ".join(sorted({o["local"] for o in job.outputs}))
                                 or "(none asked)"))
    click.echo(f"kept {job.container_id[:12]} on {job.peer_name}" if job.keep else
               f"removed its container {job.container_id[:12]} from {job.peer_name}")
    if run.output_errors:
        sys.exit(1)


@jobs_group.command("rm")
@click.argument("job_id", metavar="JOB")
@pass_node
def jobs_rm(node: CliContext, job_id: str) -> None:
    """Forget a job (its outputs stay where they are; a container it kept is not removed:
    'p2prc rm CONTAINER')."""
    store = JobStore(node.home)
    job = store.get(job_id)
    store.remove(job)
    click.echo(f"forgot job {job.id}")
