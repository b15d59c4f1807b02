"""The edge-CI examples in examples/ci/ stay true to the CLI and do what their comments say.

- Every ``ciard ...`` command line in the two workflow files and in the guide's code blocks names
  a real verb and only real options of it, and parses with click (values from the workflow's own
  variables): renaming a flag of ``ciard verify`` makes this test fail (checked below by renaming one).
- The GitHub workflow has the build -> edge jobs, fetches the build job's artifact, publishes the
  JUnit file and the Markdown summary in every case, and its exit-code handling is *executed*
  here with a fake ``ciard`` exiting 0/1/2/3; the GitLab job likewise.
- The guide's install line covers every third-party module that ``ciard verify`` imports from
  ciard_deploy's own code, measured by running it with torch hidden.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
import typer
import yaml

from ciard_deploy.cli import app

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CI = REPO / "examples" / "ci"
GITHUB = CI / "github-actions-verify.yml"
GITLAB = CI / "gitlab-ci-verify.yml"
GUIDE = CI / "README.md"

requires_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="the CI scripts are bash; no bash here")


# --------------------------------------------------------------------------- reading the files
def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: not a YAML mapping"
    return data


def github_on(wf: dict[str, Any]) -> Any:
    return wf.get("on", wf.get(True))  # YAML 1.1 reads the bare key `on` as True


def github_scripts(wf: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(job id, job, step) for every step with a ``run`` script."""
    for job_id, job in wf["jobs"].items():
        for step in job.get("steps", []):
            if "run" in step:
                yield job_id, job, step


def gitlab_jobs(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in cfg.items() if isinstance(v, dict) and ("script" in v or "trigger" in v)}


def gitlab_scripts(job: dict[str, Any]) -> list[str]:
    return [line for key in ("before_script", "script", "after_script") for line in job.get(key, [])]


def guide_blocks() -> list[str]:
    """The fenced bash code blocks of the guide."""
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", GUIDE.read_text(), flags=re.S)


# --------------------------------------------------------------------------- finding ciard commands in shell code
CONTROL = {"||", "&&", ";", "|", "(", ")", "&", ";;", "|&"}
KEYWORDS = {"then", "do", "else", "elif", "if", "while", "until", "!", "time", "exec", "command", "{", "}"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def shell_words(script: str) -> list[list[str]]:
    """Simple commands of a script, as word lists (quotes removed, ``${{ }}`` expressions kept as one word)."""
    script = re.sub(r"\$\{\{.*?\}\}", lambda m: m.group(0).replace(" ", ""), script)
    script = script.replace("\\\n", " ")
    commands: list[list[str]] = []
    for line in script.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            tokens = list(lex)
        except ValueError as e:  # an unbalanced quote spanning lines: not a command line we check
            raise AssertionError(f"cannot split shell line {line!r}: {e}") from None
        current: list[str] = []
        for tok in tokens + [";"]:
            if tok in CONTROL or (not current and tok in KEYWORDS):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(tok)
    return commands


def ciard_invocations(script: str) -> list[list[str]]:
    """The argument lists (after ``ciard``) of every command whose program is ``ciard``."""
    out = []
    for words in shell_words(script):
        while words and ASSIGNMENT.match(words[0]):  # FOO=bar ciard ...
            words = words[1:]
        if words and Path(words[0]).name == "ciard":
            out.append(words[1:])
    return out


def expand(word: str, env: dict[str, str]) -> str:
    """``$VAR`` / ``${VAR}`` from ``env`` (left as is when unknown)."""
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), word)


# --------------------------------------------------------------------------- checking them against the Typer app
# Duck-typed click objects: Typer >= 0.2x ships its own copy of click (typer._click), older ones use click.
def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def check_invocation(args: list[str], env: dict[str, str], root: Any = None) -> list[str]:
    """Problems of one ``ciard ARGS`` command line: unknown verb, unknown option, missing value, and
    whatever click's own parser rejects (types, required options, extra arguments)."""
    root = root or typer.main.get_command(app)
    args = [expand(a, env) for a in args]
    cmd = root
    path = ["ciard"]
    i = 0
    while hasattr(cmd, "commands"):  # a group: global options, then a verb
        group_opts = {o for p in cmd.params if _is_option(p) for o in (*p.opts, *p.secondary_opts)}
        while i < len(args) and args[i].startswith("-"):
            if args[i] not in group_opts:
                return [f"{' '.join(path)}: unknown option {args[i]} (valid: {', '.join(sorted(group_opts))})"]
            i += 1
        if i >= len(args):
            return [f"{' '.join(path)}: no verb"]
        sub = cmd.commands.get(args[i])
        if sub is None:
            return [f"{' '.join(path)}: no verb {args[i]!r} (verbs: {', '.join(sorted(cmd.commands))})"]
        path.append(args[i])
        cmd = sub
        i += 1
    rest = args[i:]
    where = " ".join(path)
    options = {o: p for p in cmd.params if _is_option(p) for o in (*p.opts, *p.secondary_opts)}
    problems = []
    j = 0
    while j < len(rest):
        word = rest[j]
        if word.startswith("-") and word != "-":
            name, eq, _ = word.partition("=")
            p = options.get(name)
            if p is None:
                problems.append(f"{where}: unknown option {name} (valid: {', '.join(sorted(options))})")
            elif not p.is_flag and not eq:
                if j + 1 >= len(rest) or rest[j + 1].startswith("--"):
                    problems.append(f"{where}: option {name} needs a value")
                j += 1
        j += 1
    if problems:
        return problems
    try:
        cmd.make_context(path[-1], list(rest), resilient_parsing=False)
    except Exception as e:  # click's UsageError / BadParameter (typer._click or click)
        message = e.format_message() if hasattr(e, "format_message") else f"{type(e).__name__}: {e}"
        problems.append(f"{where}: click rejects {rest}: {message}")
    return problems


def github_env(wf: dict[str, Any], job: dict[str, Any], step: dict[str, Any] | None = None,
               matrix: dict[str, Any] | None = None, outputs: dict[str, str] | None = None,
               workspace: str = "/workspace") -> dict[str, str]:
    """The environment a step sees: workflow, job and step ``env`` with their expressions evaluated."""
    if matrix is None:
        include = (job.get("strategy") or {}).get("matrix", {}).get("include") or [{}]
        matrix = include[0]
    env: dict[str, str] = {}
    context = {"matrix": matrix, "github": {"workspace": workspace}, "runner": {"os": "Linux"},
               "steps": {"verify": {"outputs": outputs or {}}}, "env": env}
    for layer in (wf.get("env") or {}, job.get("env") or {}, (step or {}).get("env") or {}):
        for k, v in layer.items():
            env[k] = github_expr(str(v), context)
    return env


def github_expr(text: str, context: dict[str, Any]) -> str:
    """Evaluates the ``${{ a.b.c }}`` lookups this project's workflow uses (anything else fails the test)."""

    def one(m: re.Match) -> str:
        expr = m.group(1).strip()
        if expr.startswith("hashFiles("):
            return "hash"
        node: Any = context
        for part in expr.split("."):
            if not isinstance(node, dict) or part not in node:
                if expr.startswith("steps."):
                    return ""  # an output not set evaluates to an empty string
                raise AssertionError(f"expression not understood by this test: {expr}")
            node = node[part]
        return str(node)

    return re.sub(r"\$\{\{(.*?)\}\}", one, text)


def all_commands() -> list[tuple[str, list[str], dict[str, str]]]:
    """(where, args, env) for every ciard command line in the examples."""
    found = []
    wf = load(GITHUB)
    for job_id, job, step in github_scripts(wf):
        env = github_env(wf, job, step)
        for args in ciard_invocations(step["run"]):
            found.append((f"{GITHUB.name} {job_id}/{step.get('name', step.get('id'))}", args, env))
    cfg = load(GITLAB)
    for job_id, job in gitlab_jobs(cfg).items():
        env = {**{k: str(v) for k, v in (cfg.get("variables") or {}).items()},
               **{k: str(v) for k, v in (job.get("variables") or {}).items()}}
        matrix = ((job.get("parallel") or {}).get("matrix") or [{}])[0]
        env.update({k: str(v) for k, v in matrix.items()})
        for line in gitlab_scripts(job):
            for args in ciard_invocations(line):
                found.append((f"{GITLAB.name} {job_id}", args, env))
    for block in guide_blocks():
        for args in ciard_invocations(block):
            found.append((GUIDE.name, args, {}))
    return found


# --------------------------------------------------------------------------- static checks
def test_the_workflow_files_are_valid_yaml():
    wf = load(GITHUB)
    assert wf.get("name") and github_on(wf) and set(wf["jobs"]) >= {"build", "verify-edge"}
    cfg = load(GITLAB)
    assert cfg["stages"] == ["build", "verify"] and set(gitlab_jobs(cfg)) == {"ciard-build", "ciard-verify-edge"}


def test_every_ciard_command_names_a_real_verb_and_real_flags():
    found = all_commands()
    verbs = {(where.split()[0], args[0]) for where, args, _ in found if args}
    for file in (GITHUB.name, GITLAB.name):
        assert {(file, v) for v in ("distill", "export", "pack", "verify")} <= verbs, verbs
    assert (GUIDE.name, "verify") in verbs
    problems = [f"{where}: {p}" for where, args, env in found for p in check_invocation(args, env)]
    assert problems == []


def test_a_renamed_flag_is_caught():
    """Sensitivity of the check: rename --min-robust of `ciard verify` and the examples stop passing."""
    root = typer.main.get_command(app)
    verify = root.commands["verify"]  # type: ignore[attr-defined]
    param = next(p for p in verify.params if "--min-robust" in getattr(p, "opts", ()))
    param.opts = ["--min-robust-acc"]
    problems = [p for where, args, env in all_commands() for p in check_invocation(args, env, root)]
    assert problems and all("--min-robust" in p for p in problems), problems
    assert {p.split(":")[0] for p in problems} == {"ciard verify"}
    # and the usual ways of getting it wrong
    assert check_invocation(["verfy", "a.onnx"], {})[0].startswith("ciard: no verb 'verfy'")
    assert "needs a value" in check_invocation(["verify", "a.onnx", "--pack"], {})[0]
    bad_value = ["verify", "a.onnx", "--pack", "p.npz", "--square-queries", "many"]
    assert "click rejects" in check_invocation(bad_value, {})[0]
    assert "click rejects" in check_invocation(["verify"], {})[0]  # ARTIFACT is required


def test_the_guides_gates_file_is_valid():
    from ciard_deploy.verify.gates import gates_from_mapping

    (block,) = re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(), flags=re.S)
    gates = gates_from_mapping(yaml.safe_load(textwrap.dedent(block)), source="README gates")
    assert gates.to_dict() == {"min_clean": 0.85, "min_robust": 0.40, "max_clean_drop": 0.02, "min_agreement": 0.97}


def test_github_workflow_has_the_edge_job_described():
    wf = load(GITHUB)
    build, edge = wf["jobs"]["build"], wf["jobs"]["verify-edge"]
    assert edge["needs"] == "build" or edge["needs"] == ["build"]
    assert "self-hosted" in edge["runs-on"]
    assert wf["permissions"].get("checks") == "write"  # the JUnit check run
    uses = {s.get("uses", "").split("@")[0]: s for s in edge["steps"]}
    upload = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    download = uses["actions/download-artifact"]
    assert download["with"]["name"] == upload["with"]["name"]
    assert "actions/checkout" in uses  # dorny/test-reporter lists files with git

    verify_step = next(s for s in edge["steps"] if s.get("id") == "verify")
    (args,) = ciard_invocations(verify_step["run"])
    env = github_env(wf, edge, verify_step)
    flags = {a: expand(b, env) for a, b in zip(args, args[1:]) if a.startswith("--")}
    assert args[0] == "verify" and {"--junit", "--markdown", "--json", "--pack"} <= set(flags)
    # the pack and the artifact come from the downloaded build folder, named as the build job wrote them
    built = " ".join(s["run"] for _, job, s in github_scripts(wf) if job is build)
    assert flags["--pack"].startswith(download["with"]["path"] + "/")
    assert flags["--pack"].replace(download["with"]["path"] + "/", upload["with"]["path"]) in built

    reporter = uses["dorny/test-reporter"]
    assert reporter["if"] == "always()" and reporter["with"]["reporter"] == "java-junit"
    assert reporter["with"]["path"] == flags["--junit"]
    summary = next(s for s in edge["steps"] if "GITHUB_STEP_SUMMARY" in s.get("run", ""))
    assert summary["if"] == "always()" and "verify.md" in summary["run"]
    judge = edge["steps"][-1]
    assert judge["if"] == "always()" and "exit 1" in judge["run"]
    # scripts get matrix values through env, never pasted into shell code (script injection)
    for step in edge["steps"]:
        assert "${{" not in step.get("run", ""), step.get("name")


def test_gitlab_job_publishes_junit_and_the_report():
    cfg = load(GITLAB)
    build, edge = cfg["ciard-build"], cfg["ciard-verify-edge"]
    assert edge["needs"] == ["ciard-build"] and edge["tags"]
    (args,) = [a for line in edge["script"] for a in ciard_invocations(line)]
    env = {**edge["variables"], **edge["parallel"]["matrix"][0]}
    flags = {a: expand(b, env) for a, b in zip(args, args[1:]) if a.startswith("--")}
    art = edge["artifacts"]
    assert art["when"] == "always" and art["reports"]["junit"] == flags["--junit"]
    assert art.get("expose_as") and any(flags["--markdown"].startswith(p.rstrip("/")) for p in art["paths"])
    assert any(flags["--pack"].startswith(p.rstrip("/")) for p in build["artifacts"]["paths"])


# --------------------------------------------------------------------------- the exit-code handling, executed
FAKE_CIARD = textwrap.dedent("""\
    #!/usr/bin/env bash
    # stands in for `ciard verify`: writes the reports (exits 0 and 1 only, as the real one) and exits $FAKE_CIARD_EXIT
    printf '%s\\n' "$*" >> "$FAKE_CIARD_LOG"
    [ "$1" = verify ] || exit 0
    code="${FAKE_CIARD_EXIT:-0}"
    while [ $# -gt 0 ]; do
      if [ "$code" -le 1 ]; then
        case "$1" in
          --junit) mkdir -p "$(dirname "$2")"; echo '<testsuites name="ciard verify"/>' > "$2" ;;
          --markdown) mkdir -p "$(dirname "$2")"; echo "### FAKE REPORT exit $code" > "$2" ;;
          --json) mkdir -p "$(dirname "$2")"; echo '{}' > "$2" ;;
        esac
      fi
      shift
    done
    exit "$code"
""")


@pytest.fixture
def fake_ciard(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "ciard"
    exe.write_text(FAKE_CIARD)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_CIARD_LOG": str(tmp_path / "calls.log"),
            "HOME": str(tmp_path)}


def run_bash(script: str, env: dict[str, str], cwd: Path, flags: str = "-e") -> subprocess.CompletedProcess:
    f = cwd / f".step{abs(hash(script))}.sh"
    f.write_text(script)
    return subprocess.run(["bash", flags, str(f)], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


@requires_bash
@pytest.mark.parametrize("code, job_fails, annotation", [
    (0, False, None), (1, True, "::error title=gate failed::"), (2, True, "::error title=bad input::"),
    (3, True, "::error title=environment missing::"),
])
def test_github_edge_job_outcome_follows_the_exit_code(tmp_path, fake_ciard, code, job_fails, annotation):
    """Runs the edge job's steps from `ciard verify` on, as the runner would (bash -e; `if:` honoured),
    with `ciard` exiting ``code``."""
    wf = load(GITHUB)
    job = wf["jobs"]["verify-edge"]
    ws = tmp_path / "ws"
    ws.mkdir()
    files = {k: tmp_path / k.lower() for k in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "GITHUB_PATH")}
    for f in files.values():
        f.write_text("")
    steps = job["steps"]
    start = next(i for i, s in enumerate(steps) if s.get("id") == "verify")
    outputs: dict[str, str] = {}
    failed = False
    logs, results = [], {}
    for step in steps[start:]:
        cond = step.get("if", "success()")
        assert cond in ("always()", "success()"), f"condition not emulated: {cond}"
        if cond == "success()" and failed:
            continue
        if "run" not in step:  # an action (test reporter, upload): checked statically above
            continue
        env = {**fake_ciard, **github_env(wf, job, step, outputs=outputs, workspace=str(ws)),
               **{k: str(v) for k, v in files.items()}, "FAKE_CIARD_EXIT": str(code)}
        files["GITHUB_OUTPUT"].write_text("")
        proc = run_bash(step["run"], env, ws)
        logs.append(proc.stdout + proc.stderr)
        results[step.get("id") or step.get("name")] = proc.returncode
        for line in files["GITHUB_OUTPUT"].read_text().splitlines():
            k, _, v = line.partition("=")
            outputs[k] = v
        failed = failed or proc.returncode != 0
    log = "\n".join(logs)
    assert results["verify"] == 0, log  # the verify step itself never aborts: reports get published first
    assert outputs.get("exit_code") == str(code)
    assert failed == job_fails, log
    assert list(results.values())[-1] == code, log  # the job's last step exits with ciard's code
    summary = files["GITHUB_STEP_SUMMARY"].read_text()
    if code <= 1:
        assert f"FAKE REPORT exit {code}" in summary
        junit = next(s for s in steps if s.get("uses", "").startswith("dorny/test-reporter"))["with"]["path"]
        assert (ws / junit).is_file()  # what the reporter publishes is what verify wrote
    else:
        assert "wrote no report" in summary and f"exit code {code}" in summary
    if annotation:
        assert annotation in log
    assert "verify " in Path(fake_ciard["FAKE_CIARD_LOG"]).read_text()


@requires_bash
@pytest.mark.parametrize("code, message", [
    (0, "all gates passed"), (1, "GATE FAILED"), (2, "ERROR (bad input)"), (3, "ERROR (environment missing)"),
])
def test_gitlab_edge_job_outcome_follows_the_exit_code(tmp_path, fake_ciard, code, message):
    """Runs the job's `script` lines in one bash with -e and pipefail, as GitLab's shell executor does."""
    cfg = load(GITLAB)
    job = cfg["ciard-verify-edge"]
    ws = tmp_path / "ws"
    ws.mkdir()
    env = {**fake_ciard, "CI_PROJECT_DIR": str(ws), "FAKE_CIARD_EXIT": str(code)}
    for layer in (cfg.get("variables") or {}, job.get("variables") or {}, job["parallel"]["matrix"][0]):
        env.update({k: expand(str(v), env) for k, v in layer.items()})
    proc = run_bash("set -o pipefail\n" + "\n".join(job["script"]) + "\n", env, ws)
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert message in out
    if code <= 1:
        assert f"FAKE REPORT exit {code}" in out  # the Markdown report is printed into the job log
        assert (ws / job["artifacts"]["reports"]["junit"]).is_file()


# --------------------------------------------------------------------------- the guide's packages = verify's imports
#: After the conftest prelude (torch hidden and checked so): record what ciard_deploy's code imports, run the CLI.
RECORD_IMPORTS = '''
    import builtins, importlib.metadata

    direct = set()  # top-level modules imported by ciard_deploy's own code
    original_import, original_import_module = builtins.__import__, importlib.import_module

    def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and str((globals or {}).get("__name__", "")).startswith("ciard_deploy"):
            direct.add(name.split(".")[0])
        return original_import(name, globals, locals, fromlist, level)

    def recording_import_module(name, package=None):
        if not name.startswith(".") and str(sys._getframe(1).f_globals.get("__name__", "")).startswith("ciard_deploy"):
            direct.add(name.split(".")[0])
        return original_import_module(name, package)

    builtins.__import__ = recording_import
    importlib.import_module = recording_import_module
    import ciard_deploy.cli

    sys.argv = ["ciard", *json.loads(sys.argv[1])]
    code = 0
    try:
        ciard_deploy.cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    names = importlib.metadata.packages_distributions()
    third = sorted(m for m in direct
                   if m not in sys.stdlib_module_names and m != "ciard_deploy" and not m.startswith("_"))
    dists = sorted({d for m in third for d in names.get(m, [m])})
    print("RESULT " + json.dumps({"code": code, "modules": third, "distributions": dists}))
'''


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def guide_install_packages() -> set[str]:
    """Packages of the guide's `pip install` lines (not ciard-deploy itself)."""
    pkgs = set()
    for block in guide_blocks():
        for words in shell_words(block):
            if words[:2] == ["pip", "install"]:
                pkgs |= {_norm(re.split(r"[<>=!~\[]", w)[0]) for w in words[2:] if not w.startswith("-")}
    return pkgs - {"ciard-deploy"}


def test_the_workflows_install_what_the_guide_lists():
    wanted = guide_install_packages()
    edge = [s["run"] for job_id, _, s in github_scripts(load(GITHUB)) if job_id == "verify-edge"]
    for script in edge + gitlab_scripts(load(GITLAB)["ciard-verify-edge"]):
        for words in shell_words(script):
            if len(words) > 2 and Path(words[0]).name == "pip" and words[1] == "install" and "--no-deps" not in words:
                assert {_norm(w) for w in words[2:] if not w.startswith("-")} <= wanted, words


@pytest.mark.slow
def test_the_guide_lists_every_package_ciard_verify_imports(tmp_path, untrained_digits_onnx, run_torch_hidden):
    """Runs `ciard verify` (ONNX, live Square, a gates file) with torch hidden and records what
    ciard_deploy's code imports; each such distribution must be in the guide's install lines."""
    (tmp_path / "gates.yaml").write_text("gates:\n  min_clean: 0.0\n")
    args = ["verify", untrained_digits_onnx["onnx"], "--pack", untrained_digits_onnx["pack"], "--square-queries", 20,
            "--square-n", 8, "--gates", tmp_path / "gates.yaml", "--json", tmp_path / "r.json", "--quiet"]
    res, err = run_torch_hidden(RECORD_IMPORTS, tmp_path, args)
    assert res["code"] == 0, err[-3000:]
    imported = {_norm(d) for d in res["distributions"]}
    assert {"numpy", "onnxruntime", "pyyaml"} <= imported and "adversarial-robustness-toolbox" not in imported, res  # the probe works
    print(f"\nciard verify imports (from ciard_deploy's code): {res['distributions']}")
    listed = guide_install_packages()
    missing = sorted(imported - listed)
    assert missing == [], f"ciard verify imports {missing} (modules {res['modules']}); add them to {GUIDE.name}"
    # and a plain `pip install ciard-deploy` (the base dependencies, no extra) installs each of them
    reqs = re.search(r"^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(), flags=re.S | re.M).group(1)
    base = {_norm(m) for m in re.findall(r'^\s*"([A-Za-z0-9_.-]+)', reqs, flags=re.M)}
    assert sorted(imported - base) == [], f"ciard verify imports {sorted(imported - base)}: not base dependencies"


# --------------------------------------------------------------------------- README's own commands
README = REPO / "README.md"


def readme_blocks() -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    first, second = readme_blocks()[:2]
    assert "pip install -e '.[train]'" in first and ciard_invocations(first) == [["quickstart"]]  # torch: the extra
    test_cmd = re.search(r"python -m pytest[^\n`]*", second).group(0).strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), f"README's test command {test_cmd!r} is not a line of .ci/run"
    assert "pip install" in ci and "'.[dev]'" in ci and "'.[dev]'" in second


def test_every_ciard_command_in_the_readme_is_real():
    found = [args for block in readme_blocks() for args in ciard_invocations(block)]
    verbs = {args[0] for args in found if args}
    assert {"quickstart", "train", "distill", "eval", "export", "inspect", "pack", "verify"} <= verbs, verbs
    problems = [p for args in found for p in check_invocation(args, {})]
    assert problems == []
