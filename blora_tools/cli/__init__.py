"""The `blora-tools` command line: a Click group whose commands load lazily, one file each.

Commands are thin (parse → call the library → show). Errors are mapped here, in one place:
a BloraError prints one line on stderr and exits with its code; Ctrl-C exits 130, and SIGTERM and SIGHUP
(what `timeout`, systemd and a closed terminal send) are handled like Ctrl-C: the half-written temporary
file is removed, one line is printed and the exit code is 128 + the signal number (143, 129).
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import click

from blora_tools.cli.params import threads_option
from blora_tools.errors import BloraError

COMMANDS: dict[str, str] = {
    "inspect": "inspect_cmd",
    "blocks": "blocks_cmd",
    "prune": "prune_cmd",
    "reweight": "reweight_cmd",
    "merge": "merge_cmd",
    "resize": "resize_cmd",
    "convert": "convert_cmd",
    "compare": "compare_cmd",
    "render": "render_cmd",
    "plan": "plan_cmd",
    "demo": "demo_cmd",
}
"""Command name → module in blora_tools.cli defining `<module>` as a click.Command (e.g. inspect_cmd)."""
WHOLE_MODEL_COMMANDS = frozenset({"render"})
"""Commands that run a whole network (every free CPU); the others do per-module work (compute.PER_MODULE)."""


@dataclass
class App:
    """What every command gets: two consoles (data on stdout, trouble on stderr) and global flags."""

    quiet: bool = False
    color: bool = True
    device: str = "cpu"
    """`--device` of the commands that take it (cli/params.device_option)"""
    _out: object = field(default=None, repr=False)
    _err: object = field(default=None, repr=False)

    @property
    def out(self):
        if self._out is None:
            from rich.console import Console

            self._out = Console(no_color=not self.color, highlight=False, soft_wrap=True)
        return self._out

    @property
    def err(self):
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, no_color=not self.color, highlight=False, soft_wrap=True)
        return self._err


class LazyGroup(click.Group):
    """Loads each command's module only when that command runs (or help lists it)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module_name = COMMANDS.get(name)
        if module_name is None:
            return None
        module = importlib.import_module(f"blora_tools.cli.{module_name}")
        command = getattr(module, module_name)
        if not any(p.name == "threads" for p in command.params):  # every command gets the thread policy
            threads_option("whole_model" if name in WHOLE_MODEL_COMMANDS else "per_module")(command)
        return command

    def invoke(self, ctx: click.Context):
        _escape_unencodable_output()
        try:
            with _signals_as_interrupts():
                return super().invoke(ctx)
        except BloraError as err:
            _print_error(str(err))
            ctx.exit(err.exit_code)
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", signal.SIGINT)
            if signum == signal.SIGINT:
                _print_error("interrupted; nothing was written")
            else:
                _print_error(f"terminated by {signal.Signals(signum).name}; nothing was written")
            ctx.exit(128 + signum)


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every cleanup written for an interrupt runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_HANDLED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """While a command runs, SIGTERM/SIGHUP raise Signalled (a signal already ignored, as under nohup, stays
    ignored); the first one ignores further ones so they cannot cut the cleanup short. Handlers are restored
    afterwards (the CLI also runs inside other programs' processes, e.g. tests)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        for number in previous:
            signal.signal(number, signal.SIG_IGN)
        raise Signalled(signum)

    for number in _HANDLED_SIGNALS:
        if signal.getsignal(number) is not signal.SIG_IGN:
            previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _escape_unencodable_output() -> None:
    """Print text the terminal's encoding cannot hold (a file name with undecodable bytes) as escapes."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from blora_tools import __version__

    click.echo(f"blora-tools, version {__version__}")
    ctx.exit()


def _print_error(message: str) -> None:
    text = " ".join(message.split()).encode("utf-8", "backslashreplace").decode("utf-8")
    click.echo(f"error: {text}", err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
@click.option("-q", "--quiet", is_flag=True, help="Print only results and errors: no progress, no notes.")
@click.option("--no-color", is_flag=True, help="Plain text output (also when NO_COLOR is set).")
@click.pass_context
def main(ctx: click.Context, quiet: bool, no_color: bool) -> None:
    """Block-wise LoRA tools for Stable Diffusion (SD1, SD2, SDXL), Flux.1 and SD3/SD3.5.

    Look inside adapter files per block, and cut, re-weight, merge, resize, convert and render them into
    ordinary LoRA files that A1111/Forge, ComfyUI, diffusers and sd-scripts load unchanged.

    \b
    Blocks are named three ways, all accepted wherever a selector is asked for:
      paper groups  in0..in3, mid, out0..out3, te   (SDXL: in0..in2, out0..out2, te1, te2)
      LBW IDs       BASE, IN00..IN11, M00, OUT00..OUT11, ranges IN04-OUT05
      presets       style/upper, middle, bottom, character/all;  NOT or !term excludes
      Flux.1        BASE, D00..D18, S00..S37, double, single, parts like D05.img.q
      SD3 / SD3.5   BASE, J00..J37, joint, parts like J03.ctx   (blocks --arch flux|sd3)

    \b
    Start with:  blora-tools demo        (trains and cuts tiny adapters, no files needed)
                 blora-tools inspect FILE.safetensors
                 blora-tools blocks --arch sd1
    """
    ctx.obj = App(quiet=quiet, color=not no_color)


def run() -> None:
    """Entry point for `python -m blora_tools`."""
    main(prog_name="blora-tools")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
