"""Deployment files checked against the repository: Dockerfile, .dockerignore, install script, Spaces front
matter, accelerate configs and the GPU reproduction scripts.

Docker cannot run in CI, so the Dockerfile is parsed: every COPY source must exist and survive .dockerignore,
dependencies must come from scripts/install.sh, and the image's CMD is started here with the image's ENV.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import gradio
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
INSTALL_SCRIPT = "scripts/install.sh"
APP_START_TIMEOUT_S = 180  # only turns a hang into a failure; the app here starts in seconds


# ----- Dockerfile parsing ----------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with line continuations joined and comments dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, arguments = current.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a line continuation"
    return instructions


def instructions_of(keyword: str) -> list[str]:
    return [arguments for name, arguments in dockerfile_instructions(DOCKERFILE.read_text()) if name == keyword]


def dockerfile_env() -> dict:
    env = {}
    for arguments in instructions_of("ENV"):
        for item in shlex.split(arguments):
            name, separator, value = item.partition("=")
            assert separator, f"ENV {item!r} is not in NAME=value form"
            env[name] = value
    return env


def exec_form(arguments: str) -> list[str]:
    command = json.loads(arguments)
    assert isinstance(command, list) and all(isinstance(part, str) for part in command), arguments
    return command


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative, '/'-separated) out of the build context.

    A path is left out when it or a parent folder matches a pattern; '**/' matches any depth including
    none, and a later '!pattern' takes a match back.
    """
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        body = body.strip("/")
        variants = [body, body[3:]] if body.startswith("**/") else [body]
        if any(fnmatch.fnmatchcase(candidate, variant) for candidate in candidates for variant in variants):
            ignored = not negated
    return ignored


# ----- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_copy_sources_exist():
    copies = instructions_of("COPY") + instructions_of("ADD")
    assert copies, "the Dockerfile copies nothing"
    patterns = dockerignore_patterns()
    for arguments in copies:
        parts = [part for part in shlex.split(arguments) if not part.startswith("--")]
        assert len(parts) >= 2, f"COPY {arguments!r} needs a source and a destination"
        for source in parts[:-1]:
            assert (REPO / source).exists(), f"COPY source {source} is missing from the repository"
            if source != ".":
                assert not is_ignored(source, patterns), f"COPY source {source} is excluded by .dockerignore"


def test_dockerignore_excludes_history_and_runs():
    patterns = dockerignore_patterns()
    for path in (".git", ".git/HEAD", "checkpoints", "checkpoints/runs/demo/model/model.safetensors",
                 "promptkd/__pycache__/cli.cpython-311.pyc", ".pytest_cache"):
        assert is_ignored(path, patterns), f"{path} is sent to the Docker build"


def test_dockerignore_keeps_app_files():
    patterns = dockerignore_patterns()
    needed = ["app.py", "requirements.txt", "requirements-offline.txt", INSTALL_SCRIPT]
    needed += [str(path.relative_to(REPO)) for path in (REPO / "promptkd").rglob("*")
               if path.is_file() and "__pycache__" not in path.parts]
    assert any(path.startswith("promptkd/data/") for path in needed), "the shipped Dolly records are missing"
    for path in needed:
        assert not is_ignored(path, patterns), f"{path} is excluded by .dockerignore but the app needs it"


def test_dockerfile_installs_with_install_script():
    runs = instructions_of("RUN")
    installs = [command for command in runs if INSTALL_SCRIPT in command]
    assert len(installs) == 1, runs
    assert f"bash {INSTALL_SCRIPT}" in installs[0]
    assert 'TORCH_INDEX_URL="${TORCH_INDEX_URL}"' in installs[0]
    assert not [command for command in runs if "pip install" in command], "install packages through scripts/install.sh only"
    assert "TORCH_INDEX_URL=" in instructions_of("ARG")


def test_ci_and_readme_use_install_script():
    assert f"bash {INSTALL_SCRIPT}" in (REPO / ".ci" / "run").read_text()
    assert f"bash {INSTALL_SCRIPT}" in (REPO / "README.md").read_text()


def test_dockerfile_user_port_and_writable_paths():
    users = instructions_of("USER")
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] == "1000"
    assert any(re.search(r"useradd\b.*--uid 1000\b", command) for command in instructions_of("RUN"))
    assert "7860" in instructions_of("EXPOSE")

    env = dockerfile_env()
    assert env["GRADIO_SERVER_NAME"] == "0.0.0.0"
    assert env["GRADIO_SERVER_PORT"] == "7860"
    assert env["GRADIO_ANALYTICS_ENABLED"] == "False"
    chowned = " ".join(command for command in instructions_of("RUN") if "chown" in command)
    for name in ("PROMPTKD_HOME", "HF_HOME"):
        assert name in env, f"the image does not set {name}"
        assert "${" + name + "}" in chowned or env[name] in chowned, f"{name}={env[name]} is not given to uid 1000"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def test_image_command_serves_app(tmp_path):
    """Start the image's CMD with the image's ENV, bound to 127.0.0.1 on a free port, and fetch the page."""
    command = exec_form(instructions_of("CMD")[-1])
    assert command == ["python", "app.py"]
    healthcheck = instructions_of("HEALTHCHECK")[-1]
    health_command = exec_form(healthcheck.split(" CMD ", 1)[1])

    port = free_port()
    env = dict(os.environ)
    env.update(dockerfile_env())
    # The image listens on 0.0.0.0:7860 in its own network namespace; here the app stays on loopback.
    env.update(
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        HOME=str(tmp_path / "home"),
        PROMPTKD_HOME=str(tmp_path / "checkpoints"),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
    )
    log_path = tmp_path / "app.log"
    with open(log_path, "w") as log:
        app = subprocess.Popen(
            [sys.executable, *command[1:]], cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + APP_START_TIMEOUT_S
        status = None
        while status != 200 and time.monotonic() < deadline:
            assert app.poll() is None, f"python app.py exited with {app.returncode}:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.5)
            status = http_status(f"http://127.0.0.1:{port}/")
        assert status == 200, f"no HTTP 200 from the app within {APP_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}"

        health = subprocess.run([sys.executable, *health_command[1:]], env=env, capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stderr
    finally:
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()
    assert (tmp_path / "checkpoints").is_dir(), "the app did not use PROMPTKD_HOME"


# ----- install script ----------------------------------------------------------------------------


def pip_install_lines() -> list[str]:
    lines = (REPO / INSTALL_SCRIPT).read_text().splitlines()
    return [line.strip() for line in lines if "pip install" in line and not line.strip().startswith("#")]


def test_install_script_installs_both_requirement_files():
    lines = pip_install_lines()
    by_file = {match: line for line in lines for match in re.findall(r"-r\s+(\S+)", line)}
    assert sorted(by_file) == ["requirements-offline.txt", "requirements.txt"]
    assert "--no-deps" in by_file["requirements-offline.txt"].split()
    assert "--no-deps" not in by_file["requirements.txt"].split()

    others = [line for line in lines if "-r" not in line.split()]
    assert others == ['python -m pip install "$torch_pin" --index-url "$TORCH_INDEX_URL"']


def test_install_script_torch_pin_matches_requirements():
    script = (REPO / INSTALL_SCRIPT).read_text()
    assignment = next(line.strip() for line in script.splitlines() if line.strip().startswith("torch_pin="))
    result = subprocess.run(
        ["bash", "-c", f"set -euo pipefail; {assignment}; echo \"$torch_pin\""],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    pins = [line.split()[0] for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("torch==")]
    assert pins and result.stdout.strip() == pins[0]


def test_install_script_syntax():
    subprocess.run(["bash", "-n", str(REPO / INSTALL_SCRIPT)], check=True)


def test_requirements_are_pinned():
    for name in ("requirements.txt", "requirements-offline.txt"):
        for line in (REPO / name).read_text().splitlines():
            requirement = line.split("#", 1)[0].strip()
            if requirement:
                assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.]+", requirement), f"{name}: {requirement!r} is not pinned"


# ----- Hugging Face Spaces -----------------------------------------------------------------------


def readme_front_matter() -> dict:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "README.md does not start with the Spaces front matter"
    block, separator, _ = text[4:].partition("\n---\n")
    assert separator, "the Spaces front matter in README.md is not closed by a '---' line"
    return yaml.safe_load(block)


def test_spaces_front_matter():
    front = readme_front_matter()
    assert front["sdk"] == "gradio"
    assert str(front["sdk_version"]) == gradio.__version__
    assert f"gradio=={front['sdk_version']}" in (REPO / "requirements.txt").read_text().split()
    assert str(front["python_version"]) == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert (REPO / front["app_file"]).is_file()
    assert front["license"] == "apache-2.0"
    assert front["suggested_hardware"] == "t4-small"
    assert front["title"]
    assert len(front["short_description"]) <= 60
    assert front["models"] == [
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "openai-community/gpt2-medium",
        "openai-community/gpt2-large",
    ]
    assert front["datasets"] == ["databricks/databricks-dolly-15k"]


# ----- accelerate configs ------------------------------------------------------------------------


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    paths = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
    assert [path.name for path in paths] == ["multi_gpu.yaml", "multi_node.yaml"]
    for path in paths:
        config = load_config_from_file(str(path))
        assert config.distributed_type == DistributedType.MULTI_GPU, path.name
        assert config.num_processes % config.num_machines == 0, path.name


# ----- GPU reproduction --------------------------------------------------------------------------


def write_results(folder: Path, rows: list[dict], split: str = "test") -> Path:
    folder.mkdir(parents=True)
    results = {
        "split": split,
        "num_examples": 3,
        "indices": [14500, 14501, 14502],
        "max_new_tokens": 32,
        "bertscore_model": "roberta-large",
        "models": rows,
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def aggregate(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "aggregate_results.py"), *map(str, args)],
        capture_output=True, text=True, timeout=60,
    )


def test_aggregate_results_mean_and_std(tmp_path):
    runs = [
        write_results(tmp_path / f"seed{seed}-eval", [
            {"label": "teacher", "spec": "t", "em": 5.0, "rouge_l": 30.0, "bertscore": 80.0, "ece": 4.0},
            {"label": "ta_filter-k200-p0.9", "spec": "s", "em": em, "rouge_l": rouge, "bertscore": 70.0 + seed},
        ])
        for seed, em, rouge in ((1, 1.0, 20.0), (2, 2.0, 22.0), (3, 6.0, 27.0))
    ]
    result = aggregate(*runs)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "| method | n | EM | ROUGE-L | BERTScore | ECE (%) |" in lines
    assert "| teacher | 3 | 5.00 ± 0.00 | 30.00 ± 0.00 | 80.00 ± 0.00 | 4.00 ± 0.00 |" in lines
    # EM 1, 2, 6: mean 3, sample std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7) = 2.6458.
    # ROUGE-L 20, 22, 27: mean 23, sample std sqrt((9 + 1 + 16) / 2) = sqrt(13) = 3.6056.
    assert "| ta_filter-k200-p0.9 | 3 | 3.00 ± 2.65 | 23.00 ± 3.61 | 72.00 ± 1.00 | – |" in lines

    as_json = json.loads(aggregate("--json", *runs).stdout)
    em = as_json["methods"][1]["metrics"]["em"]
    assert em["values"] == [1.0, 2.0, 6.0]
    assert em["std"] == pytest.approx(7 ** 0.5)


def test_aggregate_results_single_run_has_no_std(tmp_path):
    run = write_results(tmp_path / "eval", [{"label": "baseline", "em": 2.5, "rouge_l": 20.0, "bertscore": 70.0}])
    result = aggregate(run / "results.json")
    assert result.returncode == 0, result.stderr
    assert "| baseline | 1 | 2.50 | 20.00 | 70.00 |" in result.stdout.splitlines()


def test_aggregate_results_rejects_mixed_splits(tmp_path):
    test_run = write_results(tmp_path / "test-eval", [{"label": "baseline", "em": 1.0}])
    validation_run = write_results(tmp_path / "validation-eval", [{"label": "baseline", "em": 1.0}], split="validation")
    result = aggregate(test_run, validation_run)
    assert result.returncode == 2
    assert "differ in 'split'" in result.stderr


def test_aggregate_results_missing_results(tmp_path):
    (tmp_path / "unfinished-eval").mkdir()
    result = aggregate(tmp_path / "unfinished-eval")
    assert result.returncode == 2
    assert f"{tmp_path / 'unfinished-eval' / 'results.json'} not found" in result.stderr

    result = aggregate(tmp_path / "no-such-run")
    assert result.returncode == 2
    assert f"{tmp_path / 'no-such-run'} not found" in result.stderr


@pytest.mark.parametrize("script", ["reproduce_gpu.sh", "docker_check.sh"])
def test_shell_script_syntax(script):
    subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)


def reproduce_dry_run(output_dir: Path) -> list[list[str]]:
    env = dict(os.environ, DRY_RUN="1", OUTPUT_DIR=str(output_dir))
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "reproduce_gpu.sh")], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def test_reproduce_script_commands_are_valid(tmp_path):
    from promptkd.cli import build_parser, config_from_args
    from promptkd.config import DistillConfig, EvalConfig, SFTConfig

    runs = tmp_path / "runs"
    # A completed teacher SFT is skipped and a stopped student SFT is resumed.
    for name, state in (("gpu-ref-sft-teacher", "completed"), ("gpu-ref-sft-student", "stopped")):
        (runs / name).mkdir(parents=True)
        (runs / name / "status.json").write_text(json.dumps({"state": state, "command": "sft"}))
    commands = reproduce_dry_run(runs)

    parser = build_parser()
    configs = {"sft": [], "distill": [], "evaluate": []}
    classes = {"sft": SFTConfig, "distill": DistillConfig, "evaluate": EvalConfig}
    for command in commands[:-1]:
        assert command[command.index("-m") + 1] == "promptkd", command
        args = parser.parse_args(command[command.index("-m") + 2 :])
        configs[args.command].append(config_from_args(classes[args.command], args))
    assert commands[-1][:2] == ["python", "scripts/aggregate_results.py"]
    assert commands[-1][2:] == [str(runs / f"gpu-ref-seed{seed}-eval") for seed in (1, 2, 3)]

    [student_sft] = configs["sft"]
    assert student_sft.model == "gpt2-medium"
    assert student_sft.resume

    distills = configs["distill"]
    assert len(distills) == 3 * 7
    filters = sorted({(c.strategy, c.top_k, c.top_p) for c in distills if c.strategy == "ta_filter"})
    assert filters == [("ta_filter", 0, 0.98), ("ta_filter", 100, 0.95), ("ta_filter", 200, 0.9)]
    assert {c.strategy for c in distills} == {"baseline", "entropy_weighted", "soft_blend", "dynamic_blend", "ta_filter"}
    assert sorted({c.seed for c in distills}) == [1, 2, 3]
    for config in distills:
        assert config.teacher == str(runs / "gpu-ref-sft-teacher")
        assert config.student == str(runs / "gpu-ref-sft-student")

    evaluations = configs["evaluate"]
    assert len(evaluations) == 3
    for config in configs["sft"] + distills + evaluations:
        assert config.dataset == "databricks/databricks-dolly-15k"
        assert config.mixed_precision == "bf16"
    for config in evaluations:
        assert config.split == "test"
        assert config.max_new_tokens == 32
        assert config.eval_limit is None
        assert config.calibration
        assert len(config.models) == 9
        assert config.models[:2] == [f"teacher={runs / 'gpu-ref-sft-teacher'}", f"SFT student={runs / 'gpu-ref-sft-student'}"]


def test_reproduce_script_fresh_start(tmp_path):
    commands = reproduce_dry_run(tmp_path / "runs")
    teacher, student = commands[0], commands[1]
    assert teacher[teacher.index("--model") + 1] == "gpt2-large"
    assert student[student.index("--model") + 1] == "gpt2-medium"
    assert "--resume" not in teacher + student
    assert len(commands) == 2 + 3 * (7 + 1) + 1


def test_app_port_in_use_error(tmp_path):
    """A port already bound by another socket gives a one-line error with the fix, not a traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = dict(os.environ, PROMPTKD_HOME=str(tmp_path / "checkpoints"), HF_HUB_OFFLINE="1")
        result = subprocess.run(
            [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=APP_START_TIMEOUT_S,
        )

    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert "--port" in result.stderr
    assert "Traceback" not in result.stderr
