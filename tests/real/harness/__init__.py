"""Run kohya-ss/sd-scripts' own trainer scripts on tiny random models, offline, on the CPU, for a few steps.

The opt-in `-m real` tests use this to train `--network_module kohya_plugin.blockwise` with the real trainer.
sd-scripts is never installed or copied: SD_SCRIPTS names a work tree, which goes on PYTHONPATH (after this
repository) and is the working directory, as when `python train_network.py` is run from it.

kohya needs its own pins (transformers 4.x), which the project's environment does not have, so the trainer runs
under a second interpreter: KOHYA_PYTHON if set, else a venv built once in the scratch folder from
requirements.txt (about 6 GB, mostly torch). prepare.py (tokenizers, tiny model, images) and launch.py (sizes
kohya's U-Net to the tiny model, then runs the trainer script) run under that interpreter.

Architectures are rows of TRAINERS here and of prepare.BUILDERS / launch.SIZERS: SD1, SDXL, Flux.1
(flux_train_network.py) and SD3 (sd3_train_network.py). network_plan.py, under the same interpreter, loads a tiny
model with kohya's loaders and reports the modules a network module plans for it, or merges a saved file into it;
replay.py drives a network module with tests/fake_trainer.py's Flux/SD3 call sequence.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
REQUIREMENTS = HERE / "requirements.txt"


@dataclass(frozen=True)
class Trainer:
    """An sd-scripts trainer script and the flags a tiny run of it needs."""

    script: str
    flags: tuple[str, ...] = ()
    model_args: tuple[str, ...] = ("--pretrained_model_name_or_path", "{model}")
    """The flags naming the prepared model's files; `{model}` is its folder (prepare.DIT_FILES for Flux/SD3)."""

    def model_flags(self, model: Path) -> list[str]:
        return [arg.format(model=model) for arg in self.model_args]


# Flux/SD3: latents and text-encoder outputs cached once (the VAE and text encoders then leave the loop), a short T5
# sequence, and for Flux the flow-matching settings of kohya's FLUX.1 examples.
_DIT_FLAGS = ("--cache_latents", "--cache_text_encoder_outputs", "--t5xxl_max_token_length", "16")
TRAINERS = {
    "sd1": Trainer("train_network.py", ("--sdpa",)),
    "sdxl": Trainer("sdxl_train_network.py", ("--sdpa", "--cache_text_encoder_outputs")),
    "flux": Trainer("flux_train_network.py",
                    (*_DIT_FLAGS, "--guidance_scale", "1.0", "--timestep_sampling", "sigmoid",
                     "--model_prediction_type", "raw", "--discrete_flow_shift", "3.0"),
                    ("--pretrained_model_name_or_path", "{model}/flux.safetensors", "--ae", "{model}/ae.safetensors",
                     "--clip_l", "{model}/clip_l", "--t5xxl", "{model}/t5xxl")),
    "sd3": Trainer("sd3_train_network.py", _DIT_FLAGS,
                   ("--pretrained_model_name_or_path", "{model}/sd3.safetensors", "--vae", "{model}/vae.safetensors",
                    "--clip_l", "{model}/clip_l", "--clip_g", "{model}/clip_g", "--t5xxl", "{model}/t5xxl")),
}
# The settings of every run: AdamW at a high rate so a few steps visibly move the factors; fp32 throughout.
COMMON_ARGS = ("--network_dim", "4", "--network_alpha", "1", "--optimizer_type", "AdamW", "--learning_rate", "1e-3",
               "--lr_scheduler", "constant", "--mixed_precision", "no", "--save_precision", "float",
               "--save_model_as", "safetensors", "--max_data_loader_n_workers", "0", "--seed", "42",
               "--network_train_unet_only")
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "COLUMNS": "160",
    # one thread: on a small shared machine, OpenMP threads spinning at barriers made a step 100x slower
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
}


class HarnessError(RuntimeError):
    """A step of the harness failed; the message ends with the tail of its log."""


@dataclass(frozen=True)
class Run:
    """One finished trainer run: its output folder and log."""

    folder: Path
    log: str

    @property
    def network_file(self) -> Path:
        return self.folder / "net.safetensors"

    def final_loss(self) -> float:
        """The last running-average loss on the trainer's progress bar."""
        found = re.findall(r"avr_loss=([^\],\s]+)", self.log)
        if not found:
            raise HarnessError(f"{self.folder}: the trainer logged no avr_loss")
        return float(found[-1])


def _digest(*paths: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()[:12]


def _run(command: list[str], log: Path, **kwargs) -> str:
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        raise HarnessError(f"{' '.join(command[:3])} ... exited {done.returncode}; log {log}:\n{text[-4000:]}")
    return text


class Kohya:
    """An sd-scripts work tree, a scratch folder and the interpreter that runs the trainer."""

    def __init__(self, sd_scripts: Path, work: Path, python: Path | None = None):
        self.sd_scripts = sd_scripts.resolve()
        self.work = work.resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self._python = python
        self._plans: dict[tuple, dict[str, list[int]]] = {}

    @classmethod
    def from_env(cls, default_work: Path) -> "Kohya | None":
        """From SD_SCRIPTS, KOHYA_REAL_WORK (else default_work) and KOHYA_PYTHON; None when SD_SCRIPTS is unset."""
        tree = os.environ.get("SD_SCRIPTS")
        if not tree:
            return None
        if not Path(tree, "train_network.py").is_file():
            raise HarnessError(f"SD_SCRIPTS={tree} has no train_network.py: not an sd-scripts work tree")
        python = os.environ.get("KOHYA_PYTHON")
        return cls(Path(tree), Path(os.environ.get("KOHYA_REAL_WORK") or default_work), Path(python) if python else None)

    @property
    def python(self) -> Path:
        """KOHYA_PYTHON, or the scratch venv, built (or updated) from requirements.txt the first time."""
        if self._python is None:
            venv = self.work / "venv"
            stamp = venv / f".requirements-{_digest(REQUIREMENTS)}"
            if not stamp.is_file():
                if not (venv / "bin" / "python").is_file():
                    _run([sys.executable, "-m", "venv", str(venv)], self.work / "venv.log")
                _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)],
                     self.work / "pip.log")
                stamp.touch()
            self._python = venv / "bin" / "python"
        return self._python

    def commit(self) -> str | None:
        done = subprocess.run(["git", "-C", str(self.sd_scripts), "rev-parse", "HEAD"], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    def environment(self) -> dict[str, str]:
        return {**os.environ, **OFFLINE_ENV, "HF_HOME": str(self.work / "hf_home"),
                "PYTHONPATH": os.pathsep.join([str(REPO), str(self.sd_scripts)])}

    def run_python(self, args: list[str], log: Path, cwd: Path | None = None) -> str:
        """Run the harness interpreter, offline, with this repository and sd-scripts importable; returns the log."""
        return _run([str(self.python), *args], log, cwd=cwd, env=self.environment())

    def prepare(self, arch: str) -> Path:
        """The tokenizers, tiny model and images for `arch`, written again when prepare.py or its inputs change."""
        folder = self.work / "prepared" / arch
        inputs = (HERE / "prepare.py", HERE / "tiny_dit.py", REPO / "blora_tools" / "models.py", REQUIREMENTS)
        stamp = folder / f".prepare-{_digest(*inputs)}"
        if not stamp.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.parent.mkdir(parents=True, exist_ok=True)
            self.run_python([str(HERE / "prepare.py"), "--arch", arch, "--out", str(folder)],
                            self.work / f"prepare-{arch}.log")
            stamp.touch()
        return folder

    def train(self, name: str, arch: str, network_module: str, network_args: list[str] = (),
              extra_args: list[str] = (), steps: int = 3) -> Run:
        """Run the arch's trainer script once; the network goes to WORK/runs/<name>/net.safetensors."""
        prepared = self.prepare(arch)
        trainer = TRAINERS[arch]
        out = self.work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        args = [*trainer.model_flags(prepared / "model"),
                "--tokenizer_cache_dir", str(prepared / "tokenizers"),
                "--dataset_config", str(prepared / "data" / "dataset.toml"),
                "--output_dir", str(out), "--output_name", "net", "--network_module", network_module,
                "--max_train_steps", str(steps), *COMMON_ARGS, *trainer.flags]
        if network_args:
            args += ["--network_args", *network_args]
        launch = [str(HERE / "launch.py"), "--arch", arch, "--model", str(prepared / "model"),
                  "--script", str(self.sd_scripts / trainer.script), "--", *args, *extra_args]
        log = self.run_python(launch, out / "train.log", cwd=self.sd_scripts)
        if not Run(out, log).network_file.is_file():
            raise HarnessError(f"the trainer exited 0 but wrote no {out / 'net.safetensors'}")
        return Run(out, log)

    def plan(self, arch: str, network_module: str, network_args: list[str] = (), dim: int = 4,
             alpha: float = 1.0) -> dict[str, list[int]]:
        """{module name: [rank, in, out]} that `network_module` plans for the tiny Flux/SD3 model (network_plan.py);
        computed once per session and arguments."""
        import json

        key = (arch, network_module, tuple(network_args), dim, alpha)
        if key in self._plans:
            return self._plans[key]
        out = self.work / "plans" / f"{arch}-{_digest_text(network_module, dim, alpha, *network_args)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        self.run_python([str(HERE / "network_plan.py"), "plan", "--arch", arch, "--model",
                         str(self.prepare(arch) / "model"), "--module", network_module, "--out", str(out),
                         "--dim", str(dim), "--alpha", str(alpha), "--", *network_args],
                        out.with_suffix(".log"), cwd=self.sd_scripts)
        self._plans[key] = json.loads(out.read_text())
        return self._plans[key]

    def merge(self, arch: str, network_module: str, weights: Path) -> Path:
        """`network_module`'s create_network_from_weights + merge_to of `weights` into the tiny model; the file
        with each module's layer weight before (`<name>.base`) and after (`<name>.merged`)."""
        out = weights.with_name(weights.stem + "-merged.safetensors")
        self.run_python([str(HERE / "network_plan.py"), "merge", "--arch", arch, "--model",
                         str(self.prepare(arch) / "model"), "--module", network_module, "--weights", str(weights),
                         "--out", str(out)], out.with_suffix(".log"), cwd=self.sd_scripts)
        return out


    def replay(self, name: str, arch: str, network_module: str, network_args: list[str] = (), steps: int = 10) -> Path:
        """tests/fake_trainer.py's Flux/SD3 call sequence driving `network_module` under this interpreter
        (replay.py); the folder with its net.safetensors and replay.json."""
        out = self.work / "replays" / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        self.run_python([str(HERE / "replay.py"), "--arch", arch, "--module", network_module, "--out", str(out),
                         "--steps", str(steps), "--", *network_args], out / "replay.log", cwd=self.sd_scripts)
        return out


def _digest_text(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:12]
