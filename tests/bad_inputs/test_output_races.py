"""Outputs stay safe against everything that happens while a command runs (issue 12, "Reliability II").

A file that appears at the output path during the write survives (the commit never replaces without --force),
two runs writing one new path leave exactly one winner, every file a command writes (charts, render's JSON,
the demo's report, a preset file named as the output) follows the same rules, new files get ordinary
permissions and --force keeps the replaced file's, and a dangling symbolic link counts as an existing file.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from contextlib import contextmanager

import pytest
from battery import inputs, sources  # noqa: F401  (fixtures)
from battery import WRITERS, assert_refused, invoke, require, snapshot, writing_args

from blora_tools.adapter import writer
from blora_tools.adapter.header import read_header
from blora_tools.adapter.writer import Entry, atomic_file, check_output, write_bytes_atomic, write_entries
from blora_tools.errors import OutputError


def _entries(on_write=None) -> list[Entry]:
    """Two small tensors; `on_write()` runs while the second one is produced (mid-write)."""

    def second():
        if on_write is not None:
            on_write()
        return b"\0" * 16

    return [Entry("a", "F32", (2,), lambda: b"\1" * 8), Entry("b", "F32", (4,), second)]


def _no_temporary_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.endswith(".tmp")]


# --- a file appearing while the command writes ---------------------------------------------------------------


def test_file_appearing_during_the_write_survives(tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="appeared while writing; nothing replaced"):
        write_entries(out, _entries(lambda: out.write_bytes(b"the other program's file")), {})
    assert out.read_bytes() == b"the other program's file"
    assert _no_temporary_files(tmp_path)


def test_file_appearing_during_the_write_is_replaced_with_force(tmp_path):
    out = tmp_path / "o.safetensors"
    write_entries(out, _entries(lambda: out.write_bytes(b"old")), {}, force=True)
    assert set(read_header(out).tensors) == {"a", "b"}


def test_symlink_appearing_during_the_write_survives(tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="appeared while writing"):
        write_entries(out, _entries(lambda: out.symlink_to(tmp_path / "nowhere")), {})
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("command", WRITERS)
def test_every_writer_keeps_a_file_that_appears_while_it_writes(runner, tmp_path, inputs, monkeypatch, command):
    """The file appears after the start-up check, from inside the write (the progress callback)."""
    require(command)
    from blora_tools.cli import output

    out = tmp_path / "out.safetensors"

    @contextmanager
    def progress(app, description, total):
        def advance(n=1):
            if not out.exists():
                out.write_bytes(b"written by someone else meanwhile")

        yield advance

    monkeypatch.setattr(output, "progress", progress)
    a, b = inputs
    before = snapshot(tmp_path)
    result = invoke(runner, writing_args(command, a, b, out))
    assert result.exit_code == 1, result.stderr
    # resize reports progress while it computes, before writing: then the writer's own check refuses it
    assert ("appeared while writing; nothing replaced" in result.stderr or "exists; pass --force" in result.stderr)
    assert str(out) in result.stderr and "Traceback" not in result.stderr
    after = snapshot(tmp_path)
    assert after.pop("out.safetensors") and out.read_bytes() == b"written by someone else meanwhile"
    assert after == before and _no_temporary_files(tmp_path)


def _race(tmp_path, commit_mode=None, monkeypatch=None) -> tuple[list, list]:
    """Two threads write one new path; both finish their data before either commits."""
    out = tmp_path / "o.safetensors"
    barrier = threading.Barrier(2, timeout=30)
    wins, losses = [], []

    def run(tag: bytes):
        entries = [Entry("t", "U8", (4,), lambda: (barrier.wait(), tag * 4)[1])]
        try:
            write_entries(out, entries, {}, hashes=False)
            wins.append(tag)
        except OutputError as err:
            losses.append(err)

    threads = [threading.Thread(target=run, args=(tag,)) for tag in (b"A", b"B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return wins, losses


@pytest.mark.parametrize("mode", ["renameat2", "hard-link", "no-links"])
def test_two_writers_to_one_new_path_exactly_one_wins(tmp_path, monkeypatch, mode):
    if mode != "renameat2":  # the fallbacks, as on kernels or file systems without renameat2 / hard links
        monkeypatch.setattr(writer, "_renameat2_noreplace", lambda tmp, path: False)
    if mode == "no-links":
        def no_links(*args, **kwargs):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

        monkeypatch.setattr(writer.os, "link", no_links)
    out = tmp_path / "o.safetensors"
    wins, losses = _race(tmp_path)
    assert len(wins) == 1 and len(losses) == 1, (wins, losses)
    assert "appeared while writing" in losses[0].message
    from safetensors.numpy import load_file

    assert bytes(load_file(out)["t"]) == wins[0] * 4
    assert _no_temporary_files(tmp_path)


@pytest.mark.parametrize("mode", ["hard-link", "no-links"])
def test_fallback_commits_refuse_an_existing_file(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(writer, "_renameat2_noreplace", lambda tmp, path: False)
    if mode == "no-links":
        monkeypatch.setattr(writer.os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no")))
    out = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="appeared while writing"):
        write_entries(out, _entries(lambda: out.write_bytes(b"keep")), {})
    assert out.read_bytes() == b"keep" and _no_temporary_files(tmp_path)
    write_entries(tmp_path / "new.safetensors", _entries(), {})
    assert set(read_header(tmp_path / "new.safetensors").tensors) == {"a", "b"}


# --- permissions ----------------------------------------------------------------------------------------------


@contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_new_outputs_get_ordinary_permissions(tmp_path, mask):
    """0666 less the umask, like any new file, not mkstemp's 0600 (a shared ComfyUI folder must read it)."""
    with _umask(mask):
        made = write_entries(tmp_path / "o.safetensors", _entries(), {})
        chart = write_bytes_atomic(tmp_path / "c.png", b"png")
        (tmp_path / "plain").write_bytes(b"")  # what open() gives a new file under this umask
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o666 & ~mask
    assert stat.S_IMODE(made.stat().st_mode) == expected and stat.S_IMODE(chart.stat().st_mode) == expected


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o664, 0o640, 0o644, 0o600])
def test_force_keeps_the_replaced_files_mode(tmp_path, mode):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    out.chmod(mode)
    with _umask(0o077):
        write_entries(out, _entries(), {}, force=True)
    assert stat.S_IMODE(out.stat().st_mode) == mode and set(read_header(out).tensors) == {"a", "b"}


# --- names and links at the output path ----------------------------------------------------------------------


def test_dangling_symlink_counts_as_an_existing_output(tmp_path):
    out = tmp_path / "o.safetensors"
    out.symlink_to(tmp_path / "missing-target.safetensors")
    with pytest.raises(OutputError, match="exists; pass --force"):
        check_output(out)
    with pytest.raises(OutputError, match="exists; pass --force"):
        write_entries(out, _entries(), {})
    assert out.is_symlink() and not (tmp_path / "missing-target.safetensors").exists()
    write_entries(out, _entries(), {}, force=True)  # --force replaces the link itself, not its target
    assert not out.is_symlink() and not (tmp_path / "missing-target.safetensors").exists()


@pytest.mark.parametrize("command", WRITERS)
def test_dangling_symlink_output_refused_by_every_writer(runner, tmp_path, inputs, command):
    require(command)
    a, b = inputs
    out = tmp_path / "out.safetensors"
    out.symlink_to(tmp_path / "elsewhere.safetensors")
    before = sorted(os.listdir(tmp_path))
    result = invoke(runner, writing_args(command, a, b, out))
    assert result.exit_code == 1 and "--force" in result.stderr and "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == before and out.is_symlink()


def test_symlink_to_an_input_is_that_input(tmp_path, inputs):
    link = tmp_path / "link.safetensors"
    link.symlink_to(inputs[0])
    with pytest.raises(OutputError, match="one of the inputs"):
        check_output(link, [inputs[0]], force=True)


def test_longest_file_name_the_folder_allows(tmp_path):
    """255 bytes is the limit on common file systems; the temporary name must not be longer than that."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    out = tmp_path / ("x" * (limit - len(".safetensors")) + ".safetensors")
    write_entries(out, _entries(), {})
    assert set(read_header(out).tensors) == {"a", "b"}
    png = tmp_path / ("y" * (limit - 4) + ".png")
    write_bytes_atomic(png, b"png")
    assert png.read_bytes() == b"png"


def test_temporary_files_have_short_names(tmp_path, monkeypatch):
    seen = []
    real = writer.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        seen.append(os.path.basename(name))
        return fd, name

    monkeypatch.setattr(writer.tempfile, "mkstemp", spy)
    write_entries(tmp_path / ("z" * 200 + ".safetensors"), _entries(), {})
    assert seen and all(name.startswith(".blora-") and len(name) <= 32 for name in seen)


# --- what safetensors cannot read is never written ------------------------------------------------------------


def test_a_header_safetensors_refuses_is_never_committed(tmp_path):
    """[2**63, 4, 0] holds no bytes, but safetensors' 64-bit element count overflows before it reaches the 0."""
    out = tmp_path / "o.safetensors"
    entries = [Entry("t", "F32", (2**63, 4, 0), lambda: b"")]
    with pytest.raises(OutputError, match="would not load"):
        write_entries(out, entries, {})
    assert os.listdir(tmp_path) == []


def test_written_files_are_checked_by_safetensors(tmp_path, monkeypatch):
    checked = []
    real = writer.check_readable
    monkeypatch.setattr(writer, "check_readable", lambda path: (checked.append(path), real(path))[1])
    out = write_entries(tmp_path / "o.safetensors", _entries(), {"k": "v"})
    assert len(checked) == 1 and checked[0].parent == tmp_path and checked[0] != out


# --- every other file a command writes ------------------------------------------------------------------------


@pytest.fixture
def chart_args(inputs, tmp_path):
    pytest.importorskip("matplotlib")
    a, b = inputs
    return {
        "inspect": lambda plot: ["inspect", a, "--plot", plot],
        "compare": lambda plot: ["compare", a, b, "--plot", plot],
    }


@pytest.mark.parametrize("command", ["inspect", "compare"])
def test_chart_over_an_existing_file_needs_force(runner, tmp_path, chart_args, command):
    require(command)
    chart = tmp_path / "chart.png"
    chart.write_bytes(b"the user's own picture")
    before = snapshot(tmp_path)
    result = invoke(runner, chart_args[command](chart))
    assert_refused(result, tmp_path, before, str(chart), "--force")
    result = invoke(runner, chart_args[command](chart) + ["--force"])
    assert result.exit_code == 0, result.stderr
    assert chart.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("command", ["inspect", "compare"])
def test_chart_onto_an_input_is_refused(runner, tmp_path, chart_args, inputs, command):
    require(command)
    a = inputs[0]
    renamed = tmp_path / "a.png"
    os.link(a, renamed)  # the input under a chart's name
    before = snapshot(tmp_path)
    result = invoke(runner, chart_args[command](renamed) + ["--force"])
    assert_refused(result, tmp_path, before, str(renamed), "is one of the inputs")


@pytest.mark.parametrize("command", ["inspect", "compare"])
def test_chart_folder_missing_or_wrong_suffix(runner, tmp_path, chart_args, command):
    require(command)
    before = snapshot(tmp_path)
    result = invoke(runner, chart_args[command](tmp_path / "no such folder" / "c.png"))
    assert_refused(result, tmp_path, before, "does not exist")
    result = invoke(runner, chart_args[command](tmp_path / "c.jpg"))
    assert_refused(result, tmp_path, before, "must end in .png or .svg or .pdf")


def test_chart_that_appears_while_drawing_survives(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from blora_tools.cli.plot import plot_blocks

    chart = tmp_path / "c.png"
    real = Figure.savefig

    def savefig(self, *args, **kwargs):
        chart.write_bytes(b"mine")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(OutputError, match="appeared while writing"):
        plot_blocks(chart, {"a": {"in0": 1.0}}, "t")
    assert chart.read_bytes() == b"mine" and _no_temporary_files(tmp_path)


def test_preset_file_is_an_input_of_reweight(runner, tmp_path, inputs):
    require("reweight")
    preset = tmp_path / "presets.safetensors"  # a preset file whose name would pass as an output
    preset.write_text("MINE:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,0\n")
    before = snapshot(tmp_path)
    for extra in ([], ["--force"]):
        result = invoke(runner, ["reweight", inputs[0], "--preset", "MINE", "--preset-file", preset, "-o", preset, *extra])
        assert_refused(result, tmp_path, before, str(preset), "is one of the inputs")


def test_render_side_file_follows_the_output_rules(tmp_path, inputs):
    from blora_tools.render.files import check_image_output

    png = tmp_path / "grid.png"
    side = tmp_path / "grid.json"
    side.write_text("{}")
    with pytest.raises(OutputError, match="--force"):
        check_image_output(png, False, with_json=True)
    assert check_image_output(png, True, with_json=True) == [png, side]
    side.unlink()
    side.symlink_to(tmp_path / "gone.json")  # dangling
    with pytest.raises(OutputError, match="--force"):
        check_image_output(png, False, with_json=True)
    side.unlink()
    os.link(inputs[0], side)  # the JSON side file is an input under another name
    with pytest.raises(OutputError, match="one of the inputs"):
        check_image_output(png, True, with_json=True, inputs=[inputs[0]])


def test_render_byte_writes_never_replace_without_force(tmp_path):
    png = tmp_path / "grid.png"
    png.write_bytes(b"old")
    with pytest.raises(OutputError, match="appeared while writing"):
        write_bytes_atomic(png, b"new")
    assert png.read_bytes() == b"old"
    write_bytes_atomic(png, b"new", force=True)
    assert png.read_bytes() == b"new"


def test_demo_refuses_its_report_and_chart_before_training(tmp_path, monkeypatch):
    import blora_tools.demo as demo

    monkeypatch.setattr(demo, "make_data", lambda seed: pytest.fail("trained although an output exists"))
    for name in ("report.md", "blocks.png"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_text("mine")
        with pytest.raises(OutputError, match="--force"):
            demo.run_demo(folder)
        assert (folder / name).read_text() == "mine"


def test_demo_report_is_written_atomically_and_not_over_a_file(tmp_path):
    import blora_tools.demo as demo

    report = tmp_path / "report.md"
    report.write_text("mine")
    with pytest.raises(OutputError, match="appeared while writing"):
        demo.write_report(_FakeDemo(), report, None)
    assert report.read_text() == "mine"
    demo.write_report(_FakeDemo(), report, None, force=True)
    assert report.read_text().startswith("# blora-tools demo")


class _FakeDemo:
    steps, seconds = 1, 0.5
    losses = {"base": {"character": 1.0, "style": float("nan")}}
    inspect = {"character": {"blocks": {"in0": {"norm": 1.0}}}, "style": {"blocks": {}}}
    files: dict = {}
    findings: list = []
    compare = {"blocks": {"in0": {"cosine": float("nan")}}}


def test_atomic_file_cleans_up_on_a_refused_verification(tmp_path):
    def refuse(path):
        raise OutputError("no")

    with pytest.raises(OutputError, match="no"):
        with atomic_file(tmp_path / "x.bin", verify=refuse) as f:
            f.write(b"data")
    assert os.listdir(tmp_path) == []
